"""The node device inventory (annotation ``vnpu.io/devices``): written by the device plugin, read by
the operator's packer. One module so the two sides can never disagree on the format."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


@dataclass(frozen=True)
class DeviceInfo:
    """One physical accelerator as the device plugin sees it."""

    id: str
    index: int
    model: str
    total_mib: int
    slice_mib: int
    slices: int
    health: str = HEALTHY
    numa_node: int | None = None
    reason: str = ""  #: why the device is unhealthy, empty when healthy
    #: The extended resource advertising this device's slices (``vnpu.io/memory-<index>``); empty in an
    #: inventory written by a device plugin older than per-device resources.
    resource: str = ""

    @property
    def healthy(self) -> bool:
        return self.health == HEALTHY


@dataclass(frozen=True)
class NodeInventory:
    """All devices of one node, in index order."""

    devices: tuple[DeviceInfo, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps(
            {"devices": [asdict(d) for d in self.devices]}, sort_keys=True, separators=(",", ":")
        )

    @classmethod
    def from_json(cls, text: str) -> NodeInventory:
        """Parse an annotation value; raises ValueError with the offending part on malformed input."""
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"inventory is not JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
            raise ValueError("inventory must be an object with a 'devices' list")
        devices = []
        for i, raw in enumerate(data["devices"]):
            try:
                devices.append(
                    DeviceInfo(
                        id=str(raw["id"]),
                        index=int(raw["index"]),
                        model=str(raw.get("model", "")),
                        total_mib=int(raw["total_mib"]),
                        slice_mib=int(raw["slice_mib"]),
                        slices=int(raw["slices"]),
                        health=str(raw.get("health", HEALTHY)),
                        numa_node=None if raw.get("numa_node") is None else int(raw["numa_node"]),
                        reason=str(raw.get("reason", "")),
                        resource=str(raw.get("resource", "")),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"inventory device #{i} is malformed: {exc!r}") from exc
        return cls(tuple(devices))
