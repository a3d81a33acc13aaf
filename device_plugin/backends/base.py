"""The backend interface and the backend factory."""

from __future__ import annotations

import abc
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "ascend", "nvidia", "simulated")
#: What ``auto`` does on a node with no accelerator: advertise nothing, or simulated devices.
FALLBACKS = ("none", "simulated")


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


#: The largest NUMA node ID taken as real, + 1: Linux's MAX_NUMNODES is at most 1024 (NODES_SHIFT
#: <= 10). A larger one (a corrupt sysfs, a typo in a config) cannot be a node, and past int64 it
#: cannot even be sent: the kubelet's TopologyInfo would fail every ListAndWatch of that device.
MAX_NUMA_NODES = 1024
_numa_warned: set[str] = set()  # the sources an out-of-range NUMA node was reported for (warned once)


def numa_node_or_none(value: int, source: str) -> int | None:
    """``value`` as a NUMA node: None (unknown) when negative or not below MAX_NUMA_NODES; an
    out-of-range one is warned about once per ``source`` (the file or config entry it came from)."""
    if 0 <= value < MAX_NUMA_NODES:
        return value
    if value >= MAX_NUMA_NODES and source not in _numa_warned:
        _numa_warned.add(source)
        log.warning(
            "NUMA node %d out of range (0..%d); taking it as unknown",
            value,
            MAX_NUMA_NODES - 1,
            extra={"source": source, "numa_node": value},
        )
    return None


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
    return numa_node_or_none(value, str(path))


@dataclass(frozen=True)
class Detection:
    """What ``auto`` found on this node: the backend to use (None: no accelerator) and, for each
    vendor it ruled out, why — the plugin logs these so an empty node says what it looked for."""

    backend: str | None
    reasons: tuple[str, ...] = ()


def ascend_driver_library(driver_path: str | Path) -> Path:
    """Where the Ascend driver installs its DCMI library (the vendor's management API)."""
    return Path(driver_path, "lib64", "driver", "libdcmi.so")


def detect(npu_smi: str, driver_path: str | Path, nvml_problem: Callable[[], str]) -> Detection:
    """Ascend first (``npu-smi`` found, or the driver's DCMI library present), then NVIDIA (NVML
    initialises: ``nvml_problem()`` returns "" when it does, else why not)."""
    reasons = []
    if shutil.which(npu_smi):
        return Detection("ascend")
    dcmi = ascend_driver_library(driver_path)
    if dcmi.exists():
        # An Ascend node whose npu-smi is not where we look: still Ascend; discovery then fails with
        # npu-smi's path in every poll, which says exactly what to mount.
        return Detection("ascend", (f"npu-smi not found at {npu_smi!r} although {dcmi} exists",))
    reasons.append(f"Ascend: no npu-smi at {npu_smi!r} and no DCMI library at {dcmi}")
    problem = nvml_problem()
    if not problem:
        return Detection("nvidia")
    reasons.append(f"NVIDIA: {problem}")
    return Detection(None, tuple(reasons))


class NoAccelerator(Backend):
    """What ``auto`` uses on a node without accelerators (unless told to fall back to simulated
    devices): it advertises nothing, so a real cluster never schedules onto devices that do not exist."""

    name = "none"

    def __init__(self, reasons: Sequence[str] = ()) -> None:
        self.reasons = tuple(reasons)

    def discover(self) -> list[PhysicalDevice]:
        return []

    def container_env(self, device: PhysicalDevice) -> dict[str, str]:
        return {}


def create_backend(name: str, *, fallback: str = "none", **options: object) -> Backend:
    """Build a backend by name. ``auto`` picks ascend when ``npu-smi`` (or the Ascend driver's DCMI
    library) is present, else nvidia when NVML initialises; with neither it uses ``fallback``:
    ``none`` (advertise nothing, log why) or ``simulated``. Options are passed to the chosen
    backend's constructor; the simulated ones are ignored unless the simulated backend is chosen."""
    from vnpu.device_plugin.backends.ascend import DEFAULT_DRIVER_PATH, AscendBackend
    from vnpu.device_plugin.backends.nvidia import NvidiaBackend
    from vnpu.device_plugin.backends.simulated import SimulatedBackend

    def pick(cls: type[Backend], keys: tuple[str, ...]) -> Backend:
        return cls(**{k: v for k, v in options.items() if k in keys and v is not None})  # type: ignore[arg-type]

    ascend_keys = ("npu_smi", "sysfs_root", "timeout_s", "driver_path", "device_files")
    nvidia_keys = ("sysfs_root",)
    simulated_keys = ("config_path", "spec")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; choose one of {', '.join(FALLBACKS)}")
    if name == "ascend":
        return pick(AscendBackend, ascend_keys)
    if name == "nvidia":
        return pick(NvidiaBackend, nvidia_keys)
    if name == "simulated":
        return pick(SimulatedBackend, simulated_keys)
    if name != "auto":
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    found = detect(
        str(options.get("npu_smi") or "npu-smi"),
        str(options.get("driver_path") or DEFAULT_DRIVER_PATH),
        NvidiaBackend.problem,
    )
    if found.backend == "ascend":
        log.info("backend auto-detected", extra={"backend": "ascend", "notes": list(found.reasons)})
        return pick(AscendBackend, ascend_keys)
    if found.backend == "nvidia":
        log.info("backend auto-detected", extra={"backend": "nvidia"})
        return pick(NvidiaBackend, nvidia_keys)
    if fallback == "simulated":
        log.warning(
            "no accelerator found; advertising simulated devices (fallback simulated)",
            extra={"backend": "simulated", "reasons": list(found.reasons)},
        )
        return pick(SimulatedBackend, simulated_keys)
    ignored = [k for k in simulated_keys if options.get(k)]
    log.warning(
        "no accelerator found; advertising no devices. Install the driver (or mount it into this "
        "pod), or set --backend simulated / --fallback simulated for simulated devices",
        extra={"backend": "none", "reasons": list(found.reasons), "ignored_simulated_options": ignored},
    )
    return NoAccelerator(found.reasons)
