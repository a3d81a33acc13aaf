"""What a container that was allocated ``vnpu.io/memory`` slices receives from the device plugin.

The runtime (``vnpu.runtime``) reads these names; the device plugin writes them in its Allocate
response. Keep this module dependency-free so either side can import it cheaply.
"""

from __future__ import annotations

import re
from pathlib import Path

#: The physical device the slices belong to (an ID from the ``vnpu.io/devices`` inventory).
ENV_DEVICE = "VNPU_DEVICE"
#: Device memory the container may use: allocated slices x slice size, in MiB.
ENV_MEMORY_LIMIT_MIB = "VNPU_MEMORY_LIMIT_MIB"
#: Number of slices allocated and the slice size, for diagnostics.
ENV_SLICES = "VNPU_SLICES"
ENV_SLICE_MIB = "VNPU_SLICE_MIB"
#: The pod's share group (``vnpu.io/share-group`` annotation); empty when the pod has none.
ENV_SHARE_GROUP = "VNPU_SHARE_GROUP"
#: Where the share group's socket directory is mounted inside the container (set only with a group).
ENV_SOCKET_DIR = "VNPU_SOCKET_DIR"

#: Fixed container path of the share-group socket directory (a bind mount of
#: ``<share root>/<share group>/`` on the host; only the pod's own group is mounted).
SOCKET_DIR_IN_CONTAINER = "/var/run/vnpu/share"
#: Default host directory holding one sub-directory per share group.
DEFAULT_SHARE_ROOT = "/var/run/vnpu/share-groups"

#: Vendor variables selecting the visible accelerator.
ENV_ASCEND_VISIBLE_DEVICES = "ASCEND_VISIBLE_DEVICES"
ENV_NVIDIA_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
ENV_CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"

# A share group becomes a directory name on the host: allow only what cannot escape the root.
_SHARE_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def validate_share_group(group: str) -> str:
    """Return ``group`` if it is safe as a single directory name, else raise ValueError."""
    if not _SHARE_GROUP.match(group) or ".." in group:
        raise ValueError(
            f"share group {group!r} must be 1-128 characters of letters, digits, '-', '_' or '.', "
            "start with a letter or digit and contain no '..'"
        )
    return group


def share_group_host_dir(share_root: str | Path, group: str) -> Path:
    """The host directory of ``group``'s sockets under ``share_root``."""
    return Path(share_root) / validate_share_group(group)
