"""What the packer is given: nodes and their devices (free slices, labels, taints), demands per
model, and where replicas run now. Plain frozen dataclasses with Kubernetes' toleration semantics;
no Kubernetes imports."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vnpu.api import DEFAULT_SLICE_MIB

NO_SCHEDULE = "NoSchedule"
NO_EXECUTE = "NoExecute"
PREFER_NO_SCHEDULE = "PreferNoSchedule"


@dataclass(frozen=True)
class Taint:
    key: str
    value: str = ""
    effect: str = NO_SCHEDULE


@dataclass(frozen=True)
class Toleration:
    """Kubernetes toleration semantics: empty key with ``Exists`` tolerates everything; empty effect
    matches every effect; ``Exists`` ignores the value."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if not self.key:
            return self.operator == "Exists"
        if self.key != taint.key:
            return False
        return self.operator == "Exists" or self.value == taint.value


@dataclass(frozen=True)
class Device:
    """One physical accelerator. ``free_slices`` is what is free *for this packing problem*: the total
    minus slices held by pods the packer does not manage (not our replicas, weight-holders or
    placeholders). None means all of it."""

    id: str
    total_slices: int
    slice_mib: int = DEFAULT_SLICE_MIB
    healthy: bool = True
    free_slices: int | None = None
    #: Share groups whose weights a pod outside this problem already holds here (their slices are not
    #: in ``free_slices``): a rolling update's old replicas still map the holder its new ones will use.
    #: Replicas of these groups pay only their own slices on this device.
    loaded: frozenset[str] = frozenset()

    @property
    def available(self) -> int:
        free = self.total_slices if self.free_slices is None else self.free_slices
        return max(0, min(free, self.total_slices))


@dataclass(frozen=True)
class Node:
    """A node: ``ready`` False (or a lost node) evicts its replicas; ``schedulable`` False (cordoned)
    keeps running replicas but takes no new ones."""

    name: str
    devices: tuple[Device, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    ready: bool = True
    schedulable: bool = True


class Spread(enum.StrEnum):
    """``spreadAcrossNodes``: the CRD's boolean ``true`` maps to BEST_EFFORT."""

    NONE = "none"
    BEST_EFFORT = "best-effort"  #: distinct nodes while capacity allows, then the least-loaded nodes
    HARD = "hard"  #: at most one replica per node; the rest stay unplaced


@dataclass(frozen=True)
class Demand:
    """What one model asks for. ``model`` is a unique key (e.g. ``namespace/name``); demands with the
    same ``share_group`` share one weight copy per device (the group's weights are the largest
    ``weight_mib`` among its demands; 0 means no weight-holder). A replica that fits nowhere preempts
    only lower-priority replicas of its own ``tenant`` (by default every demand is of one tenant)."""

    model: str
    share_group: str
    replicas: int
    replica_mib: int
    weight_mib: int = 0
    priority: int = 0
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    spread: Spread = Spread.NONE
    tenant: str = ""


def group_weight_mib(demands: Iterable[Demand]) -> dict[str, int]:
    """Each share group's weights: the largest ``weight_mib`` any of its demands declares."""
    out: dict[str, int] = {}
    for d in demands:
        out[d.share_group] = max(out.get(d.share_group, 0), d.weight_mib)
    return out


@dataclass(frozen=True)
class Placement:
    """Where a replica runs now (input, for stability). ``bound`` False: its pod waits for the
    scheduler, a new pod still, kept only where a new replica may go."""

    model: str
    replica: int
    node: str
    device: str
    slices: int
    bound: bool = True
