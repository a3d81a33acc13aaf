"""What a container gets for slices of one device: a pure function of the device and the slice count.

This is the core both front ends over the device table share. The device plugin turns it into a
``ContainerAllocateResponse`` (:mod:`.service`); a DRA driver (``resource.k8s.io/v1`` with consumable
capacity) would turn the same :class:`ContainerEdits` into a CDI spec's ``containerEdits`` for the
device and capacity in a claim's allocation result. Neither may look at pods: the kubelet's
``Allocate`` names device IDs only, and a pod's own wiring (share group, credential) is in the pod
spec the operator wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vnpu.device_plugin import contract
from vnpu.device_plugin.backends.base import Backend, DeviceNode
from vnpu.device_plugin.devices import DeviceEntry


class AllocationError(ValueError):
    """An allocation the plugin refuses (the kubelet fails the pod's admission with this text)."""


@dataclass(frozen=True)
class Mount:
    host_path: str
    container_path: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerEdits:
    """Environment, mounts and device files for one container on one device."""

    env: Mapping[str, str]
    mounts: tuple[Mount, ...]
    device_nodes: tuple[DeviceNode, ...]


def container_edits(entry: DeviceEntry, slices: int, backend: Backend, *, socket_root: str) -> ContainerEdits:
    """The edits for ``slices`` slices of ``entry``'s device. Raises AllocationError when the device is
    unhealthy or the count is impossible."""
    if not entry.healthy:
        raise AllocationError(f"device {entry.id} is unhealthy: {entry.reason}")
    if not 0 < slices <= entry.slices:
        raise AllocationError(f"device {entry.id} has {entry.slices} slices; {slices} cannot be allocated")
    env = dict(backend.container_env(entry.device))
    env.update(
        {
            contract.ENV_DEVICE: entry.id,
            contract.ENV_MEMORY_LIMIT_MIB: str(slices * entry.slice_mib),
            contract.ENV_SLICES: str(slices),
            contract.ENV_SLICE_MIB: str(entry.slice_mib),
            contract.ENV_SOCKET_DIR: contract.SOCKET_DIR_IN_CONTAINER,
        }
    )
    socket_dir = contract.device_socket_dir(socket_root, entry.id)
    mounts = (Mount(str(socket_dir), contract.SOCKET_DIR_IN_CONTAINER, read_only=False),)
    return ContainerEdits(env, mounts, tuple(backend.device_nodes(entry.device)))
