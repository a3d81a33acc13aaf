"""What the packer returns: assignments, weight-holders, what could not be placed (with a code and a
message in the scheduler's words) and which running placements were dropped."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from vnpu.operator.packing.inputs import Demand, Placement, group_weight_mib


@dataclass(frozen=True)
class Assignment:
    """A replica placed on a device. ``weight_holder`` marks the one replica per (device, group) that is
    charged for the group's weights (they live in that device's :class:`WeightHolder` pod); ``kept``
    is True when the replica stays exactly where ``current`` had it."""

    model: str
    replica: int
    node: str
    device: str
    slices: int
    share_group: str
    weight_holder: bool
    kept: bool


@dataclass(frozen=True)
class WeightHolder:
    """One weight copy: group ``share_group``'s weights on ``device``, for the replicas of ``models``."""

    node: str
    device: str
    share_group: str
    slices: int
    models: tuple[str, ...]


class Reason(enum.StrEnum):
    NO_NODES = "NoNodes"
    NODE_SELECTOR = "NodeSelectorMismatch"
    TAINTED = "Tainted"
    NO_ELIGIBLE_NODE = "NoEligibleNode"
    DEVICE_TOO_SMALL = "DeviceTooSmall"
    INSUFFICIENT_MEMORY = "InsufficientMemory"
    SPREAD = "SpreadConstraint"


@dataclass(frozen=True)
class Unplaced:
    """A replica that could not be placed, why, and what it would need (for placeholders/autoscaling)."""

    model: str
    replica: int
    share_group: str
    priority: int
    code: Reason
    reason: str
    replica_mib: int
    weight_mib: int


@dataclass(frozen=True)
class Dropped:
    """A current placement that is not kept where it was (the replica may be re-placed elsewhere)."""

    placement: Placement
    reason: str


@dataclass(frozen=True)
class PackResult:
    assignments: tuple[Assignment, ...]
    weight_holders: tuple[WeightHolder, ...]
    unplaced: tuple[Unplaced, ...]
    dropped: tuple[Dropped, ...]

    def steady(self) -> bool:
        """Whether the plan keeps every running replica where it runs and adds, drops and leaves
        unplaced none: nothing is left to do but wait (a scale, a lost device or missing room would
        come first)."""
        return not self.unplaced and not self.dropped and all(a.kept for a in self.assignments)

    def devices_used(self) -> int:
        return len(
            {(a.node, a.device) for a in self.assignments} | {(h.node, h.device) for h in self.weight_holders}
        )

    def slices_by_device(self) -> dict[tuple[str, str], int]:
        """Slices used per (node, device): its replicas and its weight copies."""
        used: dict[tuple[str, str], int] = {}
        for a in self.assignments:
            used[(a.node, a.device)] = used.get((a.node, a.device), 0) + a.slices
        for h in self.weight_holders:
            used[(h.node, h.device)] = used.get((h.node, h.device), 0) + h.slices
        return used

    def slices_used(self) -> int:
        return sum(a.slices for a in self.assignments) + sum(h.slices for h in self.weight_holders)

    def placements(self) -> list[Placement]:
        """The plan as running placements: the ``current`` of the next :func:`pack` once it is applied."""
        return [Placement(a.model, a.replica, a.node, a.device, a.slices) for a in self.assignments]

    def moved_from(self, before: Iterable[Placement]) -> int:
        """Running replicas this plan puts on another device than ``before`` (a replica removed by a
        scale-down is not a move, nor is a new one)."""
        was = {(p.model, p.replica): (p.node, p.device) for p in before}
        return sum(
            1 for a in self.assignments if (k := (a.model, a.replica)) in was and was[k] != (a.node, a.device)
        )

    def by_model(self) -> dict[str, list[Assignment]]:
        out: dict[str, list[Assignment]] = {}
        for a in self.assignments:
            out.setdefault(a.model, []).append(a)
        return out

    def saved_by_sharing_mib(self, demands: Iterable[Demand]) -> dict[str, int]:
        """Per model: the weight MiB its replicas did not pay because a copy was already on the device
        (each replica not charged for the weights saves one copy). Sums to Σ_devices (n-1)·weights."""
        group_mib = group_weight_mib(demands)
        holders = {(h.node, h.device, h.share_group) for h in self.weight_holders}
        out: dict[str, int] = {}
        for a in self.assignments:
            shared = (a.node, a.device, a.share_group) in holders and not a.weight_holder
            saved = group_mib.get(a.share_group, 0) if shared else 0
            out[a.model] = out.get(a.model, 0) + saved
        return out
