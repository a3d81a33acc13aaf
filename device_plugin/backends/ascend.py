"""Ascend NPUs: devices, memory and health parsed from ``npu-smi info`` (and ``npu-smi info -m``).

``npu-smi info`` prints one block per card: a card line (NPU ID, name, health, power, temperature)
followed by one line per chip (chip ID, on multi-chip cards the device/logic ID, PCI bus ID, AI core
usage, memory usage and on HBM parts HBM usage). Each chip is one vnpu device: its memory is the
HBM total where reported, else the memory total. ``npu-smi info -m`` maps (NPU ID, chip ID) to the
chip logic ID, which is the ``/dev/davinci<N>`` number and the ``ASCEND_VISIBLE_DEVICES`` value on
standard Atlas servers (where logic and physical IDs coincide).

npu-smi loads the driver's libraries (``/usr/local/Ascend/driver/lib64/...``): the backend runs it with
those folders on ``LD_LIBRARY_PATH``, as the driver's ``set_env.sh`` would.

Parsing is pure (:func:`parse_info`, :func:`parse_chip_map`); :class:`AscendBackend` only runs the tool.
A chip whose fields cannot be parsed is reported unhealthy with the reason; output with no device
table at all raises BackendError.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vnpu.device_plugin.backends.base import Backend, BackendError, DeviceNode, PhysicalDevice, read_numa_node
from vnpu.device_plugin.contract import ENV_ASCEND_VISIBLE_DEVICES

#: Card health values npu-smi prints that still allow scheduling (Warning = minor alarm).
SCHEDULABLE_HEALTH = ("OK", "Warning")
#: Device files every Ascend container needs besides its own /dev/davinci<N>.
SHARED_DEVICE_FILES = ("/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc")
#: Where the Ascend driver installs itself; npu-smi loads its libraries from below it.
DEFAULT_DRIVER_PATH = "/usr/local/Ascend/driver"
#: Library folders of the driver, in the order the driver's own set_env.sh puts them on LD_LIBRARY_PATH.
DRIVER_LIBRARY_DIRS = ("lib64", "lib64/common", "lib64/driver")

_BUS_ID = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]$")
_USAGE_PAIR = re.compile(r"(\S+)\s*/\s*(\S+)")


@dataclass(frozen=True)
class ChipReport:
    """One chip row of ``npu-smi info`` together with its card's row."""

    npu_id: int
    chip_id: int
    logic_id: int | None
    name: str
    health: str
    bus_id: str
    total_mib: int | None
    used_mib: int | None
    problem: str = ""  #: why a field could not be parsed; empty when the row was clean


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _parse_usage(cell: str, prefer_last: bool) -> tuple[int | None, int | None, str]:
    """(used, total, problem) from the memory part of a chip row."""
    pairs = _USAGE_PAIR.findall(cell)
    if not pairs:
        return None, None, f"no memory usage in {cell!r}"
    used_s, total_s = pairs[-1] if prefer_last else pairs[0]
    try:
        used, total = int(used_s), int(total_s)
    except ValueError:
        return None, None, f"unparseable memory usage {used_s!r} / {total_s!r}"
    if total <= 0:
        return used, None, f"memory total is {total} MiB"
    return used, total, ""


def parse_info(text: str) -> list[ChipReport]:
    """Chips from ``npu-smi info`` output; raises BackendError when there is no device table."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    header = next(
        (i for i, ln in enumerate(lines) if ln.startswith("|") and "Health" in ln and "Name" in ln), None
    )
    if header is None or header + 1 >= len(lines) or "Bus-Id" not in lines[header + 1]:
        raise BackendError(
            "npu-smi info output has no device table (header 'NPU Name | Health' / 'Bus-Id' missing)"
        )
    second = _cells(lines[header + 1])
    has_device_col = "Device" in second[0]
    has_hbm = "HBM-Usage" in lines[header + 1]

    chips: list[ChipReport] = []
    card: tuple[int, str, str] | None = None  # (npu id, name, health) of the current card
    card_problem = ""
    for line in lines[header + 2 :]:
        if "Process id" in line or "Process name" in line:
            break  # the process table follows the device table
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        if len(cells) < 3:
            continue
        first, second_cell, rest = cells[0].split(), cells[1], cells[2]
        if _BUS_ID.match(second_cell):
            if card is None:
                raise BackendError(f"npu-smi info chip row before any card row: {line.strip()!r}")
            npu_id, name, health = card
            problem = card_problem
            try:
                chip_id = int(first[0])
                logic_id = int(first[1]) if has_device_col and len(first) > 1 else None
            except (IndexError, ValueError):
                raise BackendError(f"npu-smi info chip row has no chip id: {line.strip()!r}") from None
            used, total, mem_problem = _parse_usage(rest, prefer_last=has_hbm)
            chips.append(
                ChipReport(
                    npu_id,
                    chip_id,
                    logic_id,
                    name,
                    health,
                    second_cell.lower(),
                    total,
                    used,
                    "; ".join(p for p in (problem, mem_problem) if p),
                )
            )
        else:
            try:
                npu_id = int(first[0])
            except (IndexError, ValueError):
                raise BackendError(f"npu-smi info card row has no NPU id: {line.strip()!r}") from None
            name = " ".join(first[1:]) or "Ascend"
            card, card_problem = (npu_id, name, second_cell or "Unknown"), ""
            if not second_cell:
                card_problem = "card health is empty"
    if not chips:
        raise BackendError("npu-smi info output lists no chips")
    return chips


def parse_chip_map(text: str) -> dict[tuple[int, int], int]:
    """(NPU ID, chip ID) -> chip logic ID from ``npu-smi info -m``; rows without one (MCU) are skipped."""
    mapping: dict[tuple[int, int], int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        if parts[2].isdigit():
            mapping[(int(parts[0]), int(parts[1]))] = int(parts[2])
    return mapping


def to_devices(
    chips: list[ChipReport], chip_map: dict[tuple[int, int], int], sysfs_root: str | Path = "/sys"
) -> list[PhysicalDevice]:
    """PhysicalDevices (one per chip) with health, logic IDs and NUMA nodes."""
    devices: list[PhysicalDevice] = []
    for order, chip in enumerate(chips):
        logic = (
            chip.logic_id if chip.logic_id is not None else chip_map.get((chip.npu_id, chip.chip_id), order)
        )
        reasons = []
        if chip.health not in SCHEDULABLE_HEALTH:
            reasons.append(f"npu-smi reports health {chip.health!r} for NPU {chip.npu_id}")
        if chip.problem:
            reasons.append(f"npu-smi output for NPU {chip.npu_id} chip {chip.chip_id}: {chip.problem}")
        devices.append(
            PhysicalDevice(
                id=f"npu{logic}",
                index=logic,
                model=chip.name if chip.name.lower().startswith("ascend") else f"Ascend {chip.name}",
                total_mib=chip.total_mib,
                used_mib=chip.used_mib,
                numa_node=read_numa_node(chip.bus_id, sysfs_root),
                healthy=not reasons,
                reason="; ".join(reasons),
                visible_id=str(logic),
            )
        )
    ids = [d.id for d in devices]
    if len(set(ids)) != len(ids):
        raise BackendError(f"npu-smi output maps two chips to one logic id: {ids}")
    return devices


def npu_smi_environment(environ: Mapping[str, str], driver_path: str | Path) -> dict[str, str]:
    """The environment npu-smi runs with: the driver's library folders ahead of ``LD_LIBRARY_PATH``.
    Only npu-smi gets them (the plugin's own Python must not load the host's libraries)."""
    dirs = [str(Path(driver_path, d)) for d in DRIVER_LIBRARY_DIRS]
    inherited = [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p and p not in dirs]
    return {**environ, "LD_LIBRARY_PATH": ":".join(dirs + inherited)}


class AscendBackend(Backend):
    """Runs ``npu-smi`` (path configurable, with the driver's libraries) and parses its output.

    ``device_files`` are the shared device files every container on an NPU gets besides its own
    ``/dev/davinci<N>`` (the chart's ``devicePlugin.ascend.deviceFiles``)."""

    name = "ascend"

    def __init__(
        self,
        npu_smi: str = "npu-smi",
        sysfs_root: str | Path = "/sys",
        timeout_s: float = 10.0,
        driver_path: str | Path = DEFAULT_DRIVER_PATH,
        device_files: Sequence[str] = SHARED_DEVICE_FILES,
    ) -> None:
        self.npu_smi = npu_smi
        self.sysfs_root = sysfs_root
        self.timeout_s = timeout_s
        self.driver_path = driver_path
        self.device_files = tuple(device_files)
        self._chip_map: dict[tuple[int, int], int] = {}

    def _run(self, *args: str) -> str:
        cmd = [self.npu_smi, *args]
        env = npu_smi_environment(os.environ, self.driver_path)
        try:
            # Lenient decoding: npu-smi prints tenants' process names, which may hold any bytes; a strict
            # decode would fail the whole poll and take every NPU on the node Unhealthy.
            done = subprocess.run(
                cmd,
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                timeout=self.timeout_s,
                check=False,
                env=env,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"{' '.join(cmd)} failed: {exc}") from exc
        if done.returncode != 0:
            raise BackendError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def discover(self) -> list[PhysicalDevice]:
        chips = parse_info(self._run("info"))
        if not self._chip_map:
            # The logic-ID map is static: read it until it is known. A failure only loses the mapping
            # (chips then fall back to the Device column or their order), not the devices.
            try:
                self._chip_map = parse_chip_map(self._run("info", "-m"))
            except BackendError:
                self._chip_map = {}
        return to_devices(chips, self._chip_map, self.sysfs_root)

    def container_env(self, device: PhysicalDevice) -> dict[str, str]:
        return {ENV_ASCEND_VISIBLE_DEVICES: device.visible_id}

    def device_nodes(self, device: PhysicalDevice) -> list[DeviceNode]:
        own = f"/dev/davinci{device.visible_id}"
        return [DeviceNode(own, own), *(DeviceNode(p, p) for p in self.device_files)]
