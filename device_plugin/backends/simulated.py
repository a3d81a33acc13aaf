"""Simulated devices: declared in a YAML/JSON file or a short spec; the default without an accelerator.

Used by tests, demos and kwok-scale runs. The file is re-read whenever it changes, so a test or an
operator can flip a device's health (or break the file) and watch the plugin react::

    model: sim-910B          # optional, default "vnpu-sim"
    devices:
      - memory_mib: 32768     # required
        id: npu0              # optional, default npu<index>
        numa_node: 0          # optional
        used_mib: 512         # optional
        health: Healthy       # or Unhealthy
        reason: ""            # why it is unhealthy

The spec form ``COUNTxMIB[:NUMA_NODES]`` (e.g. ``8x65536:2``) declares COUNT equal devices spread
evenly over NUMA_NODES nodes. Simulated devices behave like Ascend NPUs towards containers
(``ASCEND_VISIBLE_DEVICES``) but need no device files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from vnpu.device_plugin.backends.base import Backend, BackendError, PhysicalDevice, numa_node_or_none
from vnpu.device_plugin.contract import ENV_ASCEND_VISIBLE_DEVICES
from vnpu.inventory import HEALTHY, UNHEALTHY

DEFAULT_SPEC = "2x16384"
DEFAULT_MODEL = "vnpu-sim"
_SPEC = re.compile(r"^\s*(?P<count>\d+)\s*x\s*(?P<mib>\d+)\s*(?::\s*(?P<numa>\d+))?\s*$")


def parse_spec(spec: str, model: str = DEFAULT_MODEL) -> list[PhysicalDevice]:
    """Devices from ``COUNTxMIB[:NUMA_NODES]``; raises BackendError on a malformed spec."""
    m = _SPEC.match(spec)
    if not m:
        raise BackendError(f"simulated device spec {spec!r} is not COUNTxMIB[:NUMA_NODES] (e.g. 8x65536:2)")
    count, mib = int(m.group("count")), int(m.group("mib"))
    numa_nodes = int(m.group("numa")) if m.group("numa") else 0
    if count < 1 or mib < 1 or (m.group("numa") and numa_nodes < 1):
        raise BackendError(f"simulated device spec {spec!r} needs COUNT, MIB and NUMA_NODES >= 1")
    per_node = -(-count // numa_nodes) if numa_nodes else 0
    return [
        PhysicalDevice(
            id=f"npu{i}",
            index=i,
            model=model,
            total_mib=mib,
            used_mib=0,
            numa_node=(i // per_node) if numa_nodes else None,
            visible_id=str(i),
        )
        for i in range(count)
    ]


def write_config(path: Path, devices: list[dict[str, Any]], model: str = DEFAULT_MODEL) -> Path:
    """Write a config file of ``devices`` (entries as above), replaced atomically: the backend re-reads
    the file when it changes, and a poll must never see half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"model": model, "devices": devices}))
    os.replace(tmp, path)
    return path


def parse_config(data: Any) -> list[PhysicalDevice]:
    """Devices from a parsed config document; raises BackendError naming the offending entry."""
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list) or not data["devices"]:
        raise BackendError("simulated config must be a mapping with a non-empty 'devices' list")
    model = str(data.get("model", DEFAULT_MODEL))
    devices: list[PhysicalDevice] = []
    for i, raw in enumerate(data["devices"]):
        try:
            if not isinstance(raw, dict):
                raise TypeError("entry is not a mapping")
            health = str(raw.get("health", HEALTHY))
            if health not in (HEALTHY, UNHEALTHY):
                raise ValueError(f"health must be {HEALTHY} or {UNHEALTHY}, got {health!r}")
            total = int(raw["memory_mib"])
            if total < 1:
                raise ValueError(f"memory_mib must be >= 1, got {total}")
            numa = raw.get("numa_node")
            healthy = health == HEALTHY
            devices.append(
                PhysicalDevice(
                    id=str(raw.get("id", f"npu{i}")),
                    index=int(raw.get("index", i)),
                    model=str(raw.get("model", model)),
                    total_mib=total,
                    used_mib=int(raw.get("used_mib", 0)),
                    numa_node=None
                    if numa is None
                    else numa_node_or_none(int(numa), f"simulated config device #{i}"),
                    healthy=healthy,
                    reason=""
                    if healthy
                    else str(raw.get("reason") or "declared unhealthy in the simulated config"),
                    visible_id=str(raw.get("index", i)),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"simulated config device #{i} is malformed: {exc!r}") from exc
    ids = [d.id for d in devices]
    if len(set(ids)) != len(ids):
        raise BackendError(f"simulated config has duplicate device ids: {ids}")
    return devices


class SimulatedBackend(Backend):
    """Devices from ``config_path`` (re-read when it changes) or from ``spec``."""

    name = "simulated"

    def __init__(self, config_path: str | Path | None = None, spec: str | None = None) -> None:
        self.config_path = Path(config_path) if config_path else None
        self.spec = spec or DEFAULT_SPEC
        self._cache_key: tuple[int, int] | None = None
        self._cached: list[PhysicalDevice] = []

    def discover(self) -> list[PhysicalDevice]:
        if self.config_path is None:
            return parse_spec(self.spec)
        try:
            st = self.config_path.stat()
            key = (st.st_mtime_ns, st.st_size)
            if key == self._cache_key:
                return self._cached
            text = self.config_path.read_text()
        except OSError as exc:
            raise BackendError(f"cannot read simulated config {self.config_path}: {exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise BackendError(f"simulated config {self.config_path} is not valid YAML: {exc}") from exc
        devices = parse_config(data)
        self._cache_key, self._cached = key, devices
        return devices

    def container_env(self, device: PhysicalDevice) -> dict[str, str]:
        return {ENV_ASCEND_VISIBLE_DEVICES: device.visible_id or str(device.index)}
