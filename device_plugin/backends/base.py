"""The backend interface and the backend factory."""

from __future__ import annotations

import abc
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "ascend", "nvidia", "simulated")


class BackendError(RuntimeError):
    """The backend could not report any device (tool missing, output unparseable, library error)."""


@dataclass(frozen=True)
class DeviceNode:
    """A device file the container needs (``/dev/...``), with cgroup permissions."""

    host_path: str
    container_path: str
    permissions: str = "rw"


@dataclass(frozen=True)
class PhysicalDevice:
    """One accelerator as a backend reports it in one poll.

    ``total_mib`` is None when the backend could not read it this time (the device table then keeps
    the last known size so slice IDs stay stable). ``reason`` explains an unhealthy device.
    """

    id: str
    index: int
    model: str
    total_mib: int | None
    used_mib: int | None = None
    numa_node: int | None = None
    healthy: bool = True
    reason: str = ""
    #: What the vendor's visible-devices variable takes (Ascend logic ID, NVIDIA UUID, ...).
    visible_id: str = ""


class Backend(abc.ABC):
    """Discovers devices and describes what a container needs to use one of them."""

    name: str = "abstract"

    @abc.abstractmethod
    def discover(self) -> list[PhysicalDevice]:
        """All devices with current health. Raise BackendError when nothing can be reported;
        report a per-device problem as ``healthy=False`` with a reason instead."""

    @abc.abstractmethod
    def container_env(self, device: PhysicalDevice) -> dict[str, str]:
        """Vendor environment variables selecting ``device`` inside the container."""

    def device_nodes(self, device: PhysicalDevice) -> list[DeviceNode]:
        """Device files to expose for ``device`` (none by default)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release backend resources (libraries, handles)."""


def read_numa_node(pci_bus_id: str, sysfs_root: str | Path = "/sys") -> int | None:
    """The NUMA node of a PCI device from sysfs, or None when unknown (missing file or -1)."""
    bus_id = pci_bus_id.strip().lower()
    # NVML reports an 8-digit domain ("00000000:17:00.0"); sysfs uses 4 digits.
    domain, _, rest = bus_id.partition(":")
    if rest and len(domain) > 4:
        bus_id = f"{domain[-4:]}:{rest}"
    path = Path(sysfs_root, "bus", "pci", "devices", bus_id, "numa_node")
    try:
        value = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return value if value >= 0 else None


def create_backend(name: str, **options: object) -> Backend:
    """Build a backend by name. ``auto`` picks ascend when ``npu-smi`` is on PATH, else nvidia when
    NVML initialises, else simulated. Options are passed to the chosen backend's constructor."""
    from vnpu.device_plugin.backends.ascend import AscendBackend
    from vnpu.device_plugin.backends.nvidia import NvidiaBackend
    from vnpu.device_plugin.backends.simulated import SimulatedBackend

    def pick(cls: type[Backend], keys: tuple[str, ...]) -> Backend:
        return cls(**{k: v for k, v in options.items() if k in keys and v is not None})  # type: ignore[arg-type]

    ascend_keys = ("npu_smi", "sysfs_root", "timeout_s")
    nvidia_keys = ("sysfs_root",)
    simulated_keys = ("config_path", "spec")
    if name == "ascend":
        return pick(AscendBackend, ascend_keys)
    if name == "nvidia":
        return pick(NvidiaBackend, nvidia_keys)
    if name == "simulated":
        return pick(SimulatedBackend, simulated_keys)
    if name != "auto":
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if options.get("config_path") or options.get("spec"):
        return pick(SimulatedBackend, simulated_keys)
    if shutil.which(str(options.get("npu_smi") or "npu-smi")):
        log.info("backend auto-detected", extra={"backend": "ascend"})
        return pick(AscendBackend, ascend_keys)
    if NvidiaBackend.available():
        log.info("backend auto-detected", extra={"backend": "nvidia"})
        return pick(NvidiaBackend, nvidia_keys)
    log.info("no accelerator found; using the simulated backend", extra={"backend": "simulated"})
    return pick(SimulatedBackend, simulated_keys)
