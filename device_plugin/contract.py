"""What a container allocated slices of a vnpu device receives from the device plugin.

Everything here is a function of the device alone: the kubelet never says which pod an ``Allocate``
is for, so nothing in the answer may depend on the pod. What is pod-specific (the share group, its
credential, the weights to attach) is in the pod spec the operator writes (:mod:`vnpu.sharing`).

The runtime (``vnpu.runtime``) reads these names; the device plugin writes them. Keep this module
dependency-free so either side can import it cheaply.
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
#: Where the device's socket directory is mounted inside the container.
ENV_SOCKET_DIR = "VNPU_SOCKET_DIR"

#: Fixed container path of the device's socket directory: a bind mount of ``<socket root>/<device>/``
#: on the host, the same for every container on that device. Weight-holders create their sockets here
#: under names only their group can compute (see :mod:`vnpu.sharing`), and no other user can list it
#: (see ``vnpu.device_plugin.plugin.ensure_socket_dir``).
SOCKET_DIR_IN_CONTAINER = "/var/run/vnpu/share"
#: Default host directory holding one socket directory per physical device.
DEFAULT_SOCKET_ROOT = "/var/run/vnpu/devices"

#: Vendor variables selecting the visible accelerator.
ENV_ASCEND_VISIBLE_DEVICES = "ASCEND_VISIBLE_DEVICES"
ENV_NVIDIA_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
ENV_CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def device_dir_name(device_id: str) -> str:
    """A device ID as one safe directory name (backends report IDs such as ``npu0`` or GPU UUIDs)."""
    name = _UNSAFE.sub("_", device_id)
    if not name or set(name) <= {"."}:
        raise ValueError(f"device id {device_id!r} cannot name a directory")
    return name


def device_socket_dir(socket_root: str | Path, device_id: str) -> Path:
    """The host directory of the sockets of ``device_id`` under ``socket_root``."""
    return Path(socket_root) / device_dir_name(device_id)
