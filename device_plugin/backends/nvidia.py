"""NVIDIA GPUs through NVML (``nvidia-ml-py``, imported lazily so CPU-only installs never need it).

Each GPU is one vnpu device ``gpu<index>``. Containers get ``NVIDIA_VISIBLE_DEVICES`` (read by the
NVIDIA container toolkit) and ``CUDA_VISIBLE_DEVICES`` both set to the GPU's UUID: CUDA accepts
UUIDs, so the selection is right whether or not the toolkit hides the other GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vnpu.device_plugin.backends.base import Backend, BackendError, PhysicalDevice, read_numa_node
from vnpu.device_plugin.contract import ENV_CUDA_VISIBLE_DEVICES, ENV_NVIDIA_VISIBLE_DEVICES

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuReport:
    """What NVML said about one GPU in one poll (``error`` set when a query failed)."""

    index: int
    name: str = ""
    uuid: str = ""
    pci_bus_id: str = ""
    total_bytes: int | None = None
    used_bytes: int | None = None
    error: str = ""


def to_device(report: GpuReport, sysfs_root: str | Path = "/sys") -> PhysicalDevice:
    """The vnpu view of one GPU report (pure apart from the sysfs NUMA lookup)."""
    return PhysicalDevice(
        id=f"gpu{report.index}",
        index=report.index,
        model=report.name or "NVIDIA GPU",
        total_mib=None if report.total_bytes is None else report.total_bytes // MIB,
        used_mib=None if report.used_bytes is None else report.used_bytes // MIB,
        numa_node=read_numa_node(report.pci_bus_id, sysfs_root) if report.pci_bus_id else None,
        healthy=not report.error,
        reason=f"NVML query failed: {report.error}" if report.error else "",
        visible_id=report.uuid or str(report.index),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvidiaBackend(Backend):
    """Queries NVML on every poll; a failing GPU is reported unhealthy with NVML's error."""

    name = "nvidia"

    def __init__(self, sysfs_root: str | Path = "/sys") -> None:
        self.sysfs_root = sysfs_root
        self._nvml: Any = None

    @staticmethod
    def problem() -> str:
        """Why NVML cannot be used here ("" when it can): nvidia-ml-py missing, or NVML failing to
        initialise (no driver, libnvidia-ml.so.1 not mounted into this container)."""
        try:
            import pynvml
        except ImportError:
            return "nvidia-ml-py is not installed (pip install 'vnpu[cuda]')"
        try:
            pynvml.nvmlInit()
            pynvml.nvmlShutdown()
        except Exception as exc:  # NVMLError_LibraryNotFound, driver errors: all mean "no"
            return f"NVML did not initialise: {exc}"
        return ""

    @staticmethod
    def available() -> bool:
        """True when nvidia-ml-py is installed and NVML initialises (a driver is present)."""
        return not NvidiaBackend.problem()

    def _lib(self) -> Any:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                raise BackendError(
                    "the nvidia backend needs nvidia-ml-py (pip install 'vnpu[cuda]')"
                ) from exc
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                raise BackendError(f"NVML initialisation failed: {exc}") from exc
            self._nvml = pynvml
        return self._nvml

    def _report(self, nvml: Any, index: int) -> GpuReport:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            return GpuReport(
                index=index,
                name=_text(nvml.nvmlDeviceGetName(handle)),
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
                total_bytes=int(memory.total),
                used_bytes=int(memory.used),
            )
        except nvml.NVMLError as exc:
            return GpuReport(index=index, error=str(exc))

    def discover(self) -> list[PhysicalDevice]:
        nvml = self._lib()
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            raise BackendError(f"NVML cannot count devices: {exc}") from exc
        return [to_device(self._report(nvml, i), self.sysfs_root) for i in range(count)]

    def container_env(self, device: PhysicalDevice) -> dict[str, str]:
        return {ENV_NVIDIA_VISIBLE_DEVICES: device.visible_id, ENV_CUDA_VISIBLE_DEVICES: device.visible_id}

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            finally:
                self._nvml = None
