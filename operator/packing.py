"""Share-aware packing of model replicas onto (node, device) pairs: pure, deterministic, no Kubernetes.

Cost model (DESIGN.md "Placement"): the first replica of a share group on a device pays the group's
weights + its own KV/activation; every further replica of that group on that device pays only its own
part. The weights live in a weight-holder pod per (device, group), sized to the weights' slices.

Algorithm, per priority level from the highest down:

1. Kept placements (``current``) are validated and committed first, highest priority first, so running
   replicas stay where they are (unless ``defragment=True``).
2. Demands with ``spreadAcrossNodes`` are placed replica by replica on the nodes that hold the fewest
   replicas of that model (best effort: distinct nodes while possible, then the least-loaded ones;
   ``Spread.HARD``: distinct nodes or unplaced). Within a node, a device already holding the group's
   weights is preferred, then the tightest device with room for weights + replica.
3. Other demands are packed best-fit-decreasing by *chunk*: a demand first fills the devices already
   holding its weights (each replica costs only its own slices there), then opens the largest chunk
   ``weights + k·replica`` that the emptiest eligible device can take on the tightest device that fits
   it. Chunks of all demands of a level are taken largest first (a lazy priority queue).
4. A replica that fits nowhere may preempt placements of strictly lower priority (kept ones; newly
   placed lower levels are not placed yet) on the device where that evicts the least; evicted replicas
   are re-placed at their own level or reported unplaced.
5. A local-improvement pass empties lightly used devices by moving their new replicas into the room
   left on other used devices (never moving kept replicas), then replica indices are matched to the
   current placements so a replica that stays on its device keeps its index.

The plan returned is the best (fewest unplaced replicas by priority, then fewest devices, slices and
moves) of several runs from the same kept state: (A) the share-aware packing above; (B) a share-blind
best-fit-decreasing by replica, re-accounted with sharing and completed like A, which makes "sharing
never costs more than not sharing" hold by construction; and, when few replicas are to be placed, up
to 64 randomised variants of A with fixed seeds (jittered chunk order, chunks balanced across devices
or split to fill gaps), which find the exact optimum on the small mixes where the greedy order misses
it. In the steady state (nothing new to place) only A runs.

Unplaced replicas come with a code and a message (``no node matches nodeSelector``, ``insufficient
memory: needs 9 slices, largest free 6``, ...). Cost: building the indexes is O(devices · distinct
eligibility signatures); a chunk or replica placement is O(slice values) via per-signature free-slice
buckets, so 10,000 replicas on 8,000 devices pack in well under two seconds (see bench/packing.py).

Capacity bookkeeping is per device in that device's own slices (``slice_mib`` may differ per node), so
demands are given in MiB and converted per device with :func:`vnpu.api.slices_for_mib`.
"""

from __future__ import annotations

import enum
import heapq
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from vnpu.api import DEFAULT_SLICE_MIB, slices_for_mib

#: Randomised packing variants tried besides the two main strategies: at most VARIANTS, and no more
#: than VARIANT_BUDGET / (replicas + devices) of them (each is a whole packing run, whose cost grows
#: with both), so they help on small, tight problems (where they find the optimum the greedy order
#: misses) and cost nothing at scale; none run in the steady state (nothing new to place).
VARIANTS = 64
VARIANT_BUDGET = 15_000

NO_SCHEDULE = "NoSchedule"
NO_EXECUTE = "NoExecute"
PREFER_NO_SCHEDULE = "PreferNoSchedule"


# ---------------------------------------------------------------------------------------------------
# Inputs


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
    ``weight_mib`` among its demands; 0 means no weight-holder)."""

    model: str
    share_group: str
    replicas: int
    replica_mib: int
    weight_mib: int = 0
    priority: int = 0
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    spread: Spread = Spread.NONE


@dataclass(frozen=True)
class Placement:
    """Where a replica runs now (input, for stability)."""

    model: str
    replica: int
    node: str
    device: str
    slices: int


# ---------------------------------------------------------------------------------------------------
# Outputs


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

    def devices_used(self) -> int:
        return len(
            {(a.node, a.device) for a in self.assignments} | {(h.node, h.device) for h in self.weight_holders}
        )

    def slices_used(self) -> int:
        return sum(a.slices for a in self.assignments) + sum(h.slices for h in self.weight_holders)

    def by_model(self) -> dict[str, list[Assignment]]:
        out: dict[str, list[Assignment]] = {}
        for a in self.assignments:
            out.setdefault(a.model, []).append(a)
        return out

    def saved_by_sharing_mib(self, demands: Iterable[Demand]) -> dict[str, int]:
        """Per model: the weight MiB its replicas did not pay because a copy was already on the device
        (each replica not charged for the weights saves one copy). Sums to Σ_devices (n-1)·weights."""
        group_mib: dict[str, int] = {}
        for d in demands:
            group_mib[d.share_group] = max(group_mib.get(d.share_group, 0), d.weight_mib)
        holders = {(h.node, h.device, h.share_group) for h in self.weight_holders}
        out: dict[str, int] = {}
        for a in self.assignments:
            shared = (a.node, a.device, a.share_group) in holders and not a.weight_holder
            saved = group_mib.get(a.share_group, 0) if shared else 0
            out[a.model] = out.get(a.model, 0) + saved
        return out


# ---------------------------------------------------------------------------------------------------
# Free-slice index


class _FreeIndex:
    """Devices eligible for one (selector, tolerations) signature, bucketed by free slices per slice
    size class. A bitmask of non-empty buckets makes best-fit and largest-free O(1)-ish queries."""

    def __init__(self, n_classes: int, max_slices: Sequence[int]) -> None:
        self.buckets: list[list[dict[int, None]]] = [
            [{} for _ in range(max_slices[c] + 1)] for c in range(n_classes)
        ]
        self.masks = [0] * n_classes
        self.largest_total = [0] * n_classes  #: the biggest eligible device of each class, in slices

    @classmethod
    def build(
        cls,
        n_classes: int,
        max_slices: Sequence[int],
        eligible: Sequence[int],
        free: Sequence[int],
        dev_cls: Sequence[int],
        dev_total: Sequence[int],
    ) -> _FreeIndex:
        """An index over the ``eligible`` devices (in ordinal order within each bucket)."""
        index = cls(n_classes, max_slices)
        grouped: dict[tuple[int, int], list[int]] = {}
        for o in eligible:
            grouped.setdefault((dev_cls[o], free[o]), []).append(o)
            if dev_total[o] > index.largest_total[dev_cls[o]]:
                index.largest_total[dev_cls[o]] = dev_total[o]
        for (c, f), ordinals in grouped.items():
            index.buckets[c][f] = dict.fromkeys(ordinals)
            index.masks[c] |= 1 << f
        return index

    def add(self, cls: int, ordinal: int, free: int, total: int) -> None:
        self.buckets[cls][free][ordinal] = None
        self.masks[cls] |= 1 << free
        self.largest_total[cls] = max(self.largest_total[cls], total)

    def move(self, cls: int, ordinal: int, old: int, new: int) -> None:
        bucket = self.buckets[cls][old]
        del bucket[ordinal]
        if not bucket:
            self.masks[cls] &= ~(1 << old)
        self.buckets[cls][new][ordinal] = None
        self.masks[cls] |= 1 << new

    def best_fit(self, cls: int, need: int) -> int | None:
        """A device with the fewest free slices that are still >= ``need`` (first such in order)."""
        m = self.masks[cls] >> need
        if not m:
            return None
        v = need + (m & -m).bit_length() - 1
        return next(iter(self.buckets[cls][v]))

    def max_free(self, cls: int) -> int:
        return self.masks[cls].bit_length() - 1

    def walk(self, cls: int, need: int) -> Iterator[int]:
        """Devices with >= ``need`` free, tightest first."""
        m = self.masks[cls] >> need
        v = need
        while m:
            low = (m & -m).bit_length() - 1
            v += low
            m >>= low
            yield from self.buckets[cls][v]  # callers stop iterating before they change the index
            m >>= 1
            v += 1


# ---------------------------------------------------------------------------------------------------
# The packer


_Signature = tuple[tuple[tuple[str, str], ...], tuple[Toleration, ...]]


def _signature(d: Demand) -> _Signature:
    tolerations = tuple(sorted(set(d.tolerations), key=lambda t: (t.key, t.operator, t.value, t.effect)))
    return tuple(sorted(d.node_selector.items())), tolerations


def _blocking_taints(
    node: Node, tolerations: tuple[Toleration, ...], effects: tuple[str, ...]
) -> list[Taint]:
    return [
        t for t in node.taints if t.effect in effects and not any(tol.tolerates(t) for tol in tolerations)
    ]


class _Cluster:
    """The static side of one :func:`pack` call, computed once and shared by every packing run:
    devices flattened in (node name, device id) order (the ordinal is the tie-breaker everywhere),
    demands in model order with their slices per slice size, and per eligibility signature the
    devices new replicas may use."""

    def __init__(self, nodes: Sequence[Node], demands: Sequence[Demand]) -> None:
        self.nodes = sorted(nodes, key=lambda n: n.name)
        if len({n.name for n in self.nodes}) != len(self.nodes):
            raise ValueError("node names must be unique")
        self.demands = sorted(demands, key=lambda d: d.model)
        if len({d.model for d in self.demands}) != len(self.demands):
            raise ValueError("demand models must be unique")
        for d in self.demands:
            if d.replicas < 0 or d.replica_mib < 0 or d.weight_mib < 0:
                raise ValueError(f"demand {d.model!r}: replicas and sizes must be non-negative")
        self.demand_index = {d.model: i for i, d in enumerate(self.demands)}
        self.dev_id: list[str] = []
        self.dev_node: list[int] = []
        self.dev_cls: list[int] = []
        self.dev_total: list[int] = []
        self.dev_available: list[int] = []
        self.dev_ok_kept: list[bool] = []  # healthy device on a ready node
        self.dev_ok_new: list[bool] = []  # ... that is also schedulable
        self.slice_sizes = sorted(
            {dev.slice_mib for n in self.nodes for dev in n.devices} or {DEFAULT_SLICE_MIB}
        )
        cls_of = {s: i for i, s in enumerate(self.slice_sizes)}
        self.dev_ordinal: dict[tuple[str, str], int] = {}
        for ni, node in enumerate(self.nodes):
            for dev in sorted(node.devices, key=lambda x: x.id):
                if (node.name, dev.id) in self.dev_ordinal:
                    raise ValueError(f"device {dev.id!r} appears twice on node {node.name!r}")
                self.dev_ordinal[(node.name, dev.id)] = len(self.dev_id)
                self.dev_id.append(dev.id)
                self.dev_node.append(ni)
                self.dev_cls.append(cls_of[dev.slice_mib])
                self.dev_total.append(max(0, dev.total_slices))
                self.dev_available.append(dev.available)
                self.dev_ok_kept.append(dev.healthy and node.ready)
                self.dev_ok_new.append(dev.healthy and node.ready and node.schedulable)
        self.max_slices = [0] * len(self.slice_sizes)
        for o, total in enumerate(self.dev_total):
            self.max_slices[self.dev_cls[o]] = max(self.max_slices[self.dev_cls[o]], total)
        # Share groups' weights: the largest any of their demands declares.
        self.group_mib: dict[str, int] = {}
        for d in self.demands:
            self.group_mib[d.share_group] = max(self.group_mib.get(d.share_group, 0), d.weight_mib)
        self.rep_slices = [[slices_for_mib(d.replica_mib, s) for s in self.slice_sizes] for d in self.demands]
        self.w_slices = [
            [slices_for_mib(self.group_mib[d.share_group], s) for s in self.slice_sizes] for d in self.demands
        ]
        # Eligibility signatures (selector, tolerations): ids, nodes that pass, devices new replicas may use.
        self.sig = [_signature(d) for d in self.demands]
        sig_ids: dict[_Signature, int] = {}
        self.sig_of = [sig_ids.setdefault(sig, len(sig_ids)) for sig in self.sig]
        self.signatures = list(sig_ids)
        self.node_ok: list[list[bool]] = []
        self.eligible: list[list[int]] = []
        self.dev_sigs: list[list[int]] = [[] for _ in self.dev_id]
        for sid, (selector, tolerations) in enumerate(self.signatures):
            ok = [
                all(node.labels.get(k) == v for k, v in selector)
                and not _blocking_taints(node, tolerations, (NO_SCHEDULE, NO_EXECUTE))
                for node in self.nodes
            ]
            self.node_ok.append(ok)
            eligible = [o for o in range(len(self.dev_id)) if self.dev_ok_new[o] and ok[self.dev_node[o]]]
            self.eligible.append(eligible)
            for o in eligible:
                self.dev_sigs[o].append(sid)

    def current_map(self, current: Sequence[Placement]) -> dict[tuple[int, int], tuple[int, int]]:
        """(demand, replica) -> (device ordinal, slices) of the running replicas we know."""
        out = {}
        for p in current:
            di = self.demand_index.get(p.model)
            o = self.dev_ordinal.get((p.node, p.device))
            if di is not None and o is not None:
                out[(di, p.replica)] = (o, p.slices)
        return out

    def keep_candidates(
        self, current: Sequence[Placement]
    ) -> tuple[list[tuple[Placement, int, int]], list[Dropped]]:
        """The running replicas that may stay, as (placement, demand, device) in the order they are
        committed (highest priority first), and those that may not, with the reason. What still
        depends on capacity (room, hard spread) is decided per run in :meth:`_Packer.keep_current`."""
        order = sorted(
            current,
            key=lambda p: (
                -self.demands[self.demand_index[p.model]].priority if p.model in self.demand_index else 0,
                p.model,
                p.replica,
                p.node,
                p.device,
            ),
        )
        seen: set[tuple[str, int]] = set()
        candidates: list[tuple[Placement, int, int]] = []
        dropped: list[Dropped] = []
        for p in order:
            reason = self._why_not_keep(p, seen)
            if reason:
                dropped.append(Dropped(p, reason))
                continue
            seen.add((p.model, p.replica))
            candidates.append((p, self.demand_index[p.model], self.dev_ordinal[(p.node, p.device)]))
        return candidates, dropped

    def _why_not_keep(self, p: Placement, seen: set[tuple[str, int]]) -> str:
        di = self.demand_index.get(p.model)
        if di is None:
            return "the model no longer asks for replicas"
        d = self.demands[di]
        if p.replica < 0 or p.replica >= d.replicas:
            return f"scaled down to {d.replicas} replicas"
        if (p.model, p.replica) in seen:
            return "duplicate placement of the same replica"
        o = self.dev_ordinal.get((p.node, p.device))
        if o is None:
            return f"device {p.device} on node {p.node} no longer exists"
        node = self.nodes[self.dev_node[o]]
        if not node.ready:
            return f"node {node.name} is not ready"
        if not self.dev_ok_kept[o]:
            return f"device {p.device} is unhealthy"
        if any(node.labels.get(k) != v for k, v in d.node_selector.items()):
            return f"node {node.name} no longer matches the nodeSelector"
        evicting = _blocking_taints(node, self.sig[di][1], (NO_EXECUTE,))
        if evicting:
            return f"node {node.name} has an untolerated NoExecute taint {_taint_str(evicting[0])}"
        if p.slices != self.rep_slices[di][self.dev_cls[o]]:
            return f"per-replica memory changed ({p.slices} -> {self.rep_slices[di][self.dev_cls[o]]} slices)"
        return ""


class _Packer:
    """Mutable state of one packing run (see the module docstring for the algorithm)."""

    def __init__(
        self,
        cluster: _Cluster,
        share: bool = True,
        current: dict[tuple[int, int], tuple[int, int]] | None = None,
    ) -> None:
        c = cluster
        #: False: the share-blind model, every replica pays its own copy of the weights.
        self.share = share
        # Static data, shared read-only with the other runs of the same pack() call.
        self.nodes, self.demands, self.demand_index = c.nodes, c.demands, c.demand_index
        self.dev_id, self.dev_node, self.dev_cls, self.dev_total = (
            c.dev_id,
            c.dev_node,
            c.dev_cls,
            c.dev_total,
        )
        self.dev_ok_kept, self.dev_ok_new, self.dev_ordinal = c.dev_ok_kept, c.dev_ok_new, c.dev_ordinal
        self.slice_sizes, self.group_mib = c.slice_sizes, c.group_mib
        self.rep_slices, self.w_slices, self.sig = c.rep_slices, c.w_slices, c.sig
        self.node_ok, self.dev_sigs = c.node_ok, c.dev_sigs
        self.sig_of = c.sig_of
        # Capacity: free slices per device and one free-slice index per eligibility signature.
        self.dev_free = list(c.dev_available)
        self.indexes = [
            _FreeIndex.build(
                len(c.slice_sizes), c.max_slices, eligible, self.dev_free, c.dev_cls, c.dev_total
            )
            for eligible in c.eligible
        ]
        # Share groups present per device (replica counts), and the devices holding each group.
        self.dev_groups: list[dict[str, int]] = [{} for _ in self.dev_id]
        self.group_devices: dict[str, dict[int, None]] = {g: {} for g in self.group_mib}
        # Chunk ordering knobs of the randomised variants (see ``perturb``); neutral by default.
        self.jitter = [1.0] * len(self.demands)
        self.balanced = [False] * len(self.demands)
        self.split = [False] * len(self.demands)
        self.rng: random.Random | None = None
        # Placements: (demand, replica) -> (device ordinal, slices, kept); per (demand, node) counts.
        self.placed: dict[tuple[int, int], tuple[int, int, bool]] = {}
        self.model_node_count: list[dict[int, int]] = [{} for _ in self.demands]
        self.missing: list[list[int]] = [[] for _ in self.demands]
        self.unplaced: list[Unplaced] = []
        self.dropped: list[Dropped] = []
        # Where ``current`` had each replica (device, slices): decides ``Assignment.kept`` (shared).
        self.current: dict[tuple[int, int], tuple[int, int]] = current if current is not None else {}
        self.kept_by_priority: list[tuple[int, int, int]] = []  # (priority, demand, replica) kept
        self.node_verdicts: dict[int, tuple[int, tuple[Reason, str] | None]] = {}
        self.on_device: dict[int, list[tuple[int, int]]] = {}  # filled by ``improve``

    def _eligible_nodes(self, di: int) -> list[bool]:
        """Per node: may new replicas of demand ``di`` go there (selector and taints)."""
        return self.node_ok[self.sig_of[di]]

    def demand_index_of(self, di: int) -> _FreeIndex:
        """The free-slice index of the devices new replicas of demand ``di`` may use."""
        return self.indexes[self.sig_of[di]]

    # -- primitive moves ------------------------------------------------------------------------

    def _set_free(self, o: int, new: int) -> None:
        old = self.dev_free[o]
        if old != new:
            cls = self.dev_cls[o]
            for sid in self.dev_sigs[o]:
                self.indexes[sid].move(cls, o, old, new)
            self.dev_free[o] = new

    def cost(self, di: int, o: int) -> int:
        """Slices one more replica of demand ``di`` takes on device ``o`` (weights if not there yet)."""
        cls = self.dev_cls[o]
        cost = self.rep_slices[di][cls]
        if not self.share or self.demands[di].share_group not in self.dev_groups[o]:
            cost += self.w_slices[di][cls]
        return cost

    def place(
        self,
        di: int,
        o: int,
        count: int,
        kept: bool = False,
        replicas: Sequence[int] = (),
        update_index: bool = True,
    ) -> None:
        """Put ``count`` replicas of demand ``di`` on device ``o`` (taking indices from ``missing``
        unless ``replicas`` names them). ``update_index=False`` leaves the free-slice indexes to the
        caller (bulk updates)."""
        d = self.demands[di]
        cls = self.dev_cls[o]
        r = self.rep_slices[di][cls]
        groups = self.dev_groups[o]
        cost = r * count if self.share else (r + self.w_slices[di][cls]) * count
        if d.share_group not in groups:
            cost += self.w_slices[di][cls] if self.share else 0
            groups[d.share_group] = 0
            self.group_devices[d.share_group][o] = None
        groups[d.share_group] += count
        if cost > self.dev_free[o]:
            raise AssertionError(f"bug: over-committing device {self.dev_id[o]}")
        if update_index:
            self._set_free(o, self.dev_free[o] - cost)
        else:
            self.dev_free[o] -= cost
        indices = list(replicas) if replicas else [self.missing[di].pop(0) for _ in range(count)]
        for replica in indices:
            self.placed[(di, replica)] = (o, r, kept)
        counts = self.model_node_count[di]
        node = self.dev_node[o]
        counts[node] = counts.get(node, 0) + count

    def unplace(self, di: int, replica: int) -> int:
        """Remove one placed replica; returns its device. The replica index becomes missing again."""
        o, r, _ = self.placed.pop((di, replica))
        d = self.demands[di]
        groups = self.dev_groups[o]
        groups[d.share_group] -= 1
        w = self.w_slices[di][self.dev_cls[o]]
        freed = r if self.share else r + w
        if groups[d.share_group] == 0:
            del groups[d.share_group]
            del self.group_devices[d.share_group][o]
            freed += w if self.share else 0
        self._set_free(o, self.dev_free[o] + freed)
        counts = self.model_node_count[di]
        counts[self.dev_node[o]] -= 1
        self.missing[di].append(replica)
        self.missing[di].sort()
        return o

    # -- phase 1: kept placements ----------------------------------------------------------------

    def keep_current(
        self, candidates: Sequence[tuple[Placement, int, int]], static_drops: Sequence[Dropped]
    ) -> None:
        """Commit the running replicas that are still valid (see :meth:`_Cluster.keep_candidates`) and
        still fit, highest priority first. The indexes are updated once per device at the end."""
        self.dropped.extend(static_drops)
        before: dict[int, int] = {}
        for p, di, o in candidates:
            node = self.dev_node[o]
            if self.demands[di].spread == Spread.HARD and self.model_node_count[di].get(node, 0) > 0:
                reason = f"spreadAcrossNodes=hard: another replica already runs on node {p.node}"
            elif self.cost(di, o) > self.dev_free[o]:
                reason = f"device {p.device} no longer has room for it"
            else:
                before.setdefault(o, self.dev_free[o])
                self.place(di, o, 1, kept=True, replicas=[p.replica], update_index=False)
                self.kept_by_priority.append((self.demands[di].priority, di, p.replica))
                continue
            self.dropped.append(Dropped(p, reason))
        for o, old in before.items():
            new, self.dev_free[o] = self.dev_free[o], old
            self._set_free(o, new)

    # -- phases 2-4: new placements ---------------------------------------------------------------

    def place_all(self, preempt: bool) -> None:
        taken: list[set[int]] = [set() for _ in self.demands]
        for di, replica in self.placed:
            taken[di].add(replica)
        for di, d in enumerate(self.demands):
            self.missing[di] = [r for r in range(d.replicas) if r not in taken[di]]
        self.kept_by_priority.sort()
        levels = sorted({d.priority for d in self.demands}, reverse=True)
        for level in levels:
            members = [di for di, d in enumerate(self.demands) if d.priority == level]
            spread = [di for di in members if self.demands[di].spread != Spread.NONE]
            packed = [di for di in members if self.demands[di].spread == Spread.NONE]
            for di in sorted(spread, key=lambda di: (-self._chunk_mib(di, 1), self.demands[di].model)):
                self._place_spread(di, preempt)
            self._place_chunks(packed, preempt)

    def _chunk_mib(self, di: int, k: int) -> int:
        d = self.demands[di]
        return self.group_mib[d.share_group] + k * d.replica_mib

    def _place_spread(self, di: int, preempt: bool) -> None:
        d = self.demands[di]
        idx = self.demand_index_of(di)
        counts = self.model_node_count[di]
        level = 0
        while self.missing[di]:
            o = self._spread_target(di, idx, level)
            if o is not None:
                self.place(di, o, 1)
                continue
            max_count = max(counts.values(), default=0)
            if d.spread == Spread.BEST_EFFORT and level < max_count:
                level += 1  # every node with <= level replicas is full: allow one more per node
                continue
            if preempt and self._preempt(di, max_level=level):
                continue
            self._give_up(di)

    def _spread_target(self, di: int, idx: _FreeIndex, level: int) -> int | None:
        """Tightest device on a node with <= ``level`` replicas of this model: one already holding the
        group's weights first, else one with room for weights + replica."""
        counts = self.model_node_count[di]
        best: tuple[int, int] | None = None
        ok = self._eligible_nodes(di)
        for o in self.group_devices[self.demands[di].share_group] if self.share else ():
            if (
                self.dev_ok_new[o]
                and ok[self.dev_node[o]]
                and counts.get(self.dev_node[o], 0) <= level
                and self.rep_slices[di][self.dev_cls[o]] <= self.dev_free[o]
            ):
                key = (self.dev_free[o] - self.rep_slices[di][self.dev_cls[o]], o)
                if best is None or key < best:
                    best = key
        if best is not None:
            return best[1]
        candidates = []
        for cls in range(len(self.slice_sizes)):
            need = self.rep_slices[di][cls] + self.w_slices[di][cls]
            for o in idx.walk(cls, need):
                if counts.get(self.dev_node[o], 0) <= level and (
                    not self.share or self.demands[di].share_group not in self.dev_groups[o]
                ):
                    candidates.append(((self.dev_free[o] - need) * self.slice_sizes[cls], o))
                    break
        return min(candidates)[1] if candidates else None

    def _place_chunks(self, members: list[int], preempt: bool) -> None:
        """Best-fit decreasing by chunk for the non-spread demands of one priority level."""
        heap: list[tuple[float, str, int]] = []
        for di in members:
            if self.missing[di]:
                heap.append((-self._next_chunk(di)[0], self.demands[di].model, di))
        heapq.heapify(heap)
        while heap:
            _, model, di = heapq.heappop(heap)
            if not self.missing[di]:
                continue
            if self._fill_group_devices(di):
                if self.missing[di]:
                    heapq.heappush(heap, (-self._next_chunk(di)[0], model, di))
                continue
            key, k, cls = self._next_chunk(di)
            if k == 0:
                if preempt and self._preempt(di):
                    heapq.heappush(heap, (-self._next_chunk(di)[0], model, di))
                else:
                    self._give_up(di)
                continue
            if heap and key < -heap[0][0]:  # stale key: a bigger chunk of another demand goes first
                heapq.heappush(heap, (-key, model, di))
                continue
            need = self.w_slices[di][cls] + k * self.rep_slices[di][cls]
            o = self.demand_index_of(di).best_fit(cls, need)
            assert o is not None, "bug: chunk sized to the largest free device does not fit"
            self.place(di, o, k)
            if self.missing[di]:
                heapq.heappush(heap, (-self._next_chunk(di)[0], model, di))

    def _fill_group_devices(self, di: int) -> bool:
        """Add replicas of ``di`` to eligible devices already holding its group's weights (each costs
        only its own slices), tightest device first. True if any replica was placed."""
        if not self.share or self.balanced[di] or self.split[di]:
            return False  # (variants that shape a demand's chunks must not have them merged back)
        ok = self._eligible_nodes(di)
        rep = self.rep_slices[di]
        candidates = sorted(
            (self.dev_free[o], o)
            for o in self.group_devices[self.demands[di].share_group]
            if self.dev_ok_new[o] and ok[self.dev_node[o]] and rep[self.dev_cls[o]] <= self.dev_free[o]
        )
        placed = False
        for _, o in candidates:
            if not self.missing[di]:
                break
            r = rep[self.dev_cls[o]]
            k = min(len(self.missing[di]), self.dev_free[o] // r if r else len(self.missing[di]))
            if k:
                self.place(di, o, k)
                placed = True
        return placed

    def _next_chunk(self, di: int) -> tuple[float, int, int]:
        """(ordering key, replicas, slice class) of the next chunk of ``di``: the most replicas the
        emptiest eligible device can take (or, in a ``balanced`` variant, the remaining replicas spread
        evenly over as few devices). The key is the chunk's MiB (times the variant's jitter)."""
        idx = self.demand_index_of(di)
        n = len(self.missing[di]) if self.share else 1  # share-blind: one replica at a time (plain BFD)
        best = (0, 0, 0)
        for cls in range(len(self.slice_sizes)):
            room = idx.max_free(cls) - self.w_slices[di][cls]
            r = self.rep_slices[di][cls]
            if room < 0 or (r and room < r):
                continue
            k = min(n, room // r) if r else n
            if self.balanced[di] and 0 < k < n:
                k = -(-n // -(-n // k))
            elif self.split[di] and k > 1 and self.rng is not None:
                k = self.rng.randint(1, k)
            mib = self._chunk_mib(di, k)
            if (k, mib) > (best[1], best[0]):
                best = (mib, k, cls)
        return best[0] * self.jitter[di], best[1], best[2]

    def perturb(self, rng: random.Random) -> None:
        """Make this run a randomised variant (GRASP-style): jitter the chunk order, balance some
        demands' chunks. Deterministic for a given ``rng`` seed."""
        self.rng = rng
        self.jitter = [rng.uniform(0.7, 1.3) for _ in self.demands]
        self.balanced = [rng.random() < 0.4 for _ in self.demands]
        self.split = [rng.random() < 0.3 for _ in self.demands]

    def _preempt(self, di: int, max_level: int | None = None) -> bool:
        """Evict strictly lower-priority replicas from the one device where that frees room for one
        replica of ``di`` at the least cost; the victims go back to their own level's queue."""
        d = self.demands[di]
        if not self.kept_by_priority or self.kept_by_priority[0][0] >= d.priority:
            return False  # nothing of lower priority runs (lower levels are placed after this one)
        ok = self._eligible_nodes(di)
        victims_by_device: dict[int, list[tuple[int, int, int]]] = {}
        for prio, dj, replica in self.kept_by_priority:
            if prio >= d.priority:
                break
            where = self.placed.get((dj, replica))
            if where is not None and self.demands[dj].share_group != d.share_group:
                victims_by_device.setdefault(where[0], []).append((prio, dj, replica))
        best: tuple[tuple[int, int, int, int], list[tuple[int, int, int]]] | None = None
        for o, victims in victims_by_device.items():
            if not (self.dev_ok_new[o] and ok[self.dev_node[o]]):
                continue
            if max_level is not None and self.model_node_count[di].get(self.dev_node[o], 0) > max_level:
                continue  # spread: only nodes with at most ``max_level`` replicas of this model
            need = self.cost(di, o)
            free = self.dev_free[o]
            group_left = dict(self.dev_groups[o])
            chosen = []
            for prio, dj, replica in sorted(victims, key=lambda v: (v[0], -v[2], self.demands[v[1]].model)):
                if free >= need:
                    break
                chosen.append((prio, dj, replica))
                w = self.w_slices[dj][self.dev_cls[o]]
                free += self.placed[(dj, replica)][1] + (0 if self.share else w)
                g = self.demands[dj].share_group
                group_left[g] -= 1
                if group_left[g] == 0 and self.share:
                    free += w
            if free >= need and chosen:
                key = (max(v[0] for v in chosen), len(chosen), free - need, o)
                if best is None or key < best[0]:
                    best = (key, chosen)
        if best is None:
            return False
        o = best[0][3]
        for _, dj, replica in best[1]:
            placement = self._as_placement(dj, replica)
            self.unplace(dj, replica)
            self.dropped.append(Dropped(placement, f"preempted by {d.model} (priority {d.priority})"))
        self.place(di, o, 1)
        return True

    def _as_placement(self, di: int, replica: int) -> Placement:
        o, r, _ = self.placed[(di, replica)]
        return Placement(
            self.demands[di].model, replica, self.nodes[self.dev_node[o]].name, self.dev_id[o], r
        )

    def _give_up(self, di: int) -> None:
        code, reason = self._explain(di)
        d = self.demands[di]
        for replica in self.missing[di]:
            self.unplaced.append(
                Unplaced(
                    d.model,
                    replica,
                    d.share_group,
                    d.priority,
                    code,
                    reason,
                    d.replica_mib,
                    self.group_mib[d.share_group],
                )
            )
        self.missing[di] = []

    def _explain(self, di: int) -> tuple[Reason, str]:
        """Why demand ``di`` does not fit, most specific cause first."""
        d = self.demands[di]
        if not self.nodes:
            return Reason.NO_NODES, "no nodes with vnpu devices in the cluster"
        sid = self.sig_of[di]
        if sid not in self.node_verdicts:
            self.node_verdicts[sid] = self._node_verdict(self.sig[di])
        eligible_nodes, verdict = self.node_verdicts[sid]
        if verdict is not None:
            return verdict
        idx = self.demand_index_of(di)
        # The slice class with the biggest eligible device decides the message.
        cls = max(
            range(len(self.slice_sizes)), key=lambda c: (idx.largest_total[c] * self.slice_sizes[c], -c)
        )
        biggest = idx.largest_total[cls]
        if biggest == 0 and idx.max_free(cls) < 0:
            return Reason.NO_ELIGIBLE_NODE, "no healthy device on the eligible nodes"
        w, r = self.w_slices[di][cls], self.rep_slices[di][cls]
        weights = f" ({r} per replica + {w} for the weights)" if w else ""
        if w + r > biggest:
            return Reason.DEVICE_TOO_SMALL, (
                f"needs {w + r} slices{weights} of {self.slice_sizes[cls]} MiB, "
                f"the largest eligible device has {biggest}"
            )
        if d.spread == Spread.HARD:
            return Reason.SPREAD, (
                f"spreadAcrossNodes=hard: each of the {eligible_nodes} eligible nodes already runs a replica "
                f"or has no room for one ({w + r} slices{weights})"
            )
        return Reason.INSUFFICIENT_MEMORY, (
            f"insufficient memory: needs {w + r} slices{weights}, largest free {max(idx.max_free(cls), 0)}"
        )

    def _node_verdict(self, sig: _Signature) -> tuple[int, tuple[Reason, str] | None]:
        """(eligible nodes, the reason when there are none) for one signature, in the scheduler's
        style: ``0/12 nodes are available: 3 didn't match nodeSelector, 9 had untolerated taints``."""
        selector, tolerations = sig
        excluded: dict[str, int] = {}
        taints: set[str] = set()
        eligible = 0
        for node in self.nodes:
            if any(node.labels.get(k) != v for k, v in selector):
                why = "didn't match nodeSelector"
            elif blocking := _blocking_taints(node, tolerations, (NO_SCHEDULE, NO_EXECUTE)):
                why = "had untolerated taints"
                taints.update(_taint_str(t) for t in blocking)
            elif not node.ready:
                why = "not ready"
            elif not node.schedulable:
                why = "unschedulable (cordoned)"
            elif not any(dev.healthy for dev in node.devices):
                why = "had no healthy device"
            else:
                eligible += 1
                continue
            excluded[why] = excluded.get(why, 0) + 1
        if eligible:
            return eligible, None
        total = len(self.nodes)
        if excluded.get("didn't match nodeSelector") == total:
            return 0, (Reason.NODE_SELECTOR, f"no node matches nodeSelector {dict(selector)}")
        parts = []
        for what, n in sorted(excluded.items()):
            suffix = f" {{{', '.join(sorted(taints))}}}" if what == "had untolerated taints" else ""
            parts.append(f"{n} {what}{suffix}")
        only_taints = set(excluded) <= {"had untolerated taints", "didn't match nodeSelector"}
        code = Reason.TAINTED if only_taints else Reason.NO_ELIGIBLE_NODE
        return 0, (code, f"0/{total} nodes are available: {', '.join(parts)}")

    # -- phase 5: local improvement --------------------------------------------------------------

    def improve(self) -> None:
        """Empty lightly used devices by moving their replicas into the room left on other used
        devices; a device is only touched if it holds new replicas of non-spread demands only (kept
        replicas never move here), and a move is committed only if the whole device empties."""
        self.on_device = {}
        for (di, replica), (o, _, _) in self.placed.items():
            self.on_device.setdefault(o, []).append((di, replica))
        movable = [
            o
            for o, reps in self.on_device.items()
            if all(not self.placed[k][2] and self.demands[k[0]].spread == Spread.NONE for k in reps)
        ]
        movable.sort(
            key=lambda o: ((self.dev_total[o] - self.dev_free[o]) * self.slice_sizes[self.dev_cls[o]], o)
        )
        for o in movable:
            self._try_empty(o)

    def _try_empty(self, o: int) -> bool:
        """Move every replica on device ``o`` to other used devices, if they all fit. The moves are
        planned first against an overlay of what the plan adds, so a failed attempt changes nothing."""
        moving = sorted(self.on_device.get(o, []))
        if not moving:
            return False
        added_slices: dict[int, int] = {}
        added_groups: dict[int, set[str]] = {}
        plan: list[tuple[int, int, int]] = []
        for di, replica in moving:
            target = self._improve_target(di, o, added_slices, added_groups)
            if target is None:
                return False
            group = self.demands[di].share_group
            cost = self.rep_slices[di][self.dev_cls[target]]
            if group not in self.dev_groups[target] and group not in added_groups.get(target, ()):
                cost += self.w_slices[di][self.dev_cls[target]]
            added_slices[target] = added_slices.get(target, 0) + cost
            added_groups.setdefault(target, set()).add(group)
            plan.append((di, replica, target))
        for di, replica in moving:
            self.unplace(di, replica)
        for di, replica, target in plan:
            self.missing[di].remove(replica)
            self.place(di, target, 1, replicas=[replica])
            self.on_device[target].append((di, replica))
        del self.on_device[o]
        return True

    def _improve_target(
        self, di: int, exclude: int, added_slices: dict[int, int], added_groups: dict[int, set[str]]
    ) -> int | None:
        """The tightest other *used* device with room for one replica of ``di``, given what the
        planned moves add: one holding the group's weights first (replica only), else one with room
        for weights + replica."""
        ok = self._eligible_nodes(di)
        group = self.demands[di].share_group
        best: tuple[int, int] | None = None
        holding = list(self.group_devices[group]) + [t for t, gs in added_groups.items() if group in gs]
        for o in holding:
            free = self.dev_free[o] - added_slices.get(o, 0)
            if (
                o != exclude
                and self.dev_ok_new[o]
                and ok[self.dev_node[o]]
                and self.rep_slices[di][self.dev_cls[o]] <= free
            ) and (best is None or (free, o) < best):
                best = (free, o)
        if best is not None:
            return best[1]
        idx = self.demand_index_of(di)
        candidates = []
        for cls in range(len(self.slice_sizes)):
            need = self.rep_slices[di][cls] + self.w_slices[di][cls]
            for o in idx.walk(cls, need):
                if self.dev_free[o] == self.dev_total[o]:
                    break  # the remaining buckets hold empty devices (or bigger, rarer ones): stop here
                free = self.dev_free[o] - added_slices.get(o, 0)
                if o != exclude and o in self.on_device and free >= need:
                    candidates.append(((free - need) * self.slice_sizes[cls], o))
                    break
        return min(candidates)[1] if candidates else None

    # -- output ---------------------------------------------------------------------------------

    def score(self, levels: Sequence[int]) -> tuple[tuple[int, ...], int, int, int]:
        """This run's :func:`_score`, from its state (no result objects built)."""
        per_priority: dict[int, int] = {}
        for u in self.unplaced:
            per_priority[u.priority] = per_priority.get(u.priority, 0) + 1
        devices = set()
        slices = moves = 0
        for (di, replica), (o, r, _) in self.placed.items():
            devices.add(o)
            slices += r if self.share else r + self.w_slices[di][self.dev_cls[o]]
            moves += self.current.get((di, replica)) != (o, r)
        if self.share:
            for o in devices:
                cls = self.dev_cls[o]
                slices += sum(
                    slices_for_mib(self.group_mib[g], self.slice_sizes[cls]) for g in self.dev_groups[o]
                )
        return tuple(per_priority.get(level, 0) for level in levels), len(devices), slices, moves

    def result(self) -> PackResult:
        charged: dict[tuple[int, str], tuple[str, int]] = {}
        holder_models: dict[tuple[int, str], set[str]] = {}
        for (di, replica), (o, _, _) in self.placed.items():
            d = self.demands[di]
            key = (o, d.share_group)
            holder_models.setdefault(key, set()).add(d.model)
            if key not in charged or (d.model, replica) < charged[key]:
                charged[key] = (d.model, replica)
        assignments = []
        for (di, replica), (o, r, _) in self.placed.items():
            d = self.demands[di]
            assignments.append(
                Assignment(
                    model=d.model,
                    replica=replica,
                    node=self.nodes[self.dev_node[o]].name,
                    device=self.dev_id[o],
                    slices=r if self.share else r + self.w_slices[di][self.dev_cls[o]],
                    share_group=d.share_group,
                    weight_holder=self.share and charged[(o, d.share_group)] == (d.model, replica),
                    kept=self.current.get((di, replica)) == (o, r),
                )
            )
        assignments.sort(key=lambda a: (a.model, a.replica))
        holders = []
        for (o, group), models in sorted(holder_models.items()):
            slices = slices_for_mib(self.group_mib[group], self.slice_sizes[self.dev_cls[o]])
            if slices and self.share:
                holders.append(
                    WeightHolder(
                        self.nodes[self.dev_node[o]].name,
                        self.dev_id[o],
                        group,
                        slices,
                        tuple(sorted(models)),
                    )
                )
        final = {(a.model, a.replica): a for a in assignments}
        dropped = [
            x
            for x in self.dropped
            if not ((a := final.get((x.placement.model, x.placement.replica))) and a.kept)
        ]
        dropped.sort(
            key=lambda x: (x.placement.model, x.placement.replica, x.placement.node, x.placement.device)
        )
        unplaced = sorted(self.unplaced, key=lambda u: (u.model, u.replica))
        return PackResult(tuple(assignments), tuple(holders), tuple(unplaced), tuple(dropped))

    def match_indices(self) -> None:
        """Renumber the new replicas of each demand so that one landing on the device where ``current``
        had replica ``i`` is replica ``i`` (after defragmentation most replicas can then stay)."""
        by_demand: dict[int, list[tuple[int, int]]] = {}
        for (di, replica), (o, _, kept) in self.placed.items():
            if not kept:
                by_demand.setdefault(di, []).append((replica, o))
        for di, entries in by_demand.items():
            slots: dict[int, int] = {}
            for _, o in entries:
                slots[o] = slots.get(o, 0) + 1
            unmatched = []
            new_device: dict[int, int] = {}
            for replica, _ in sorted(entries):
                was = self.current.get((di, replica))
                if was is not None and slots.get(was[0], 0) > 0:
                    slots[was[0]] -= 1
                    new_device[replica] = was[0]
                else:
                    unmatched.append(replica)
            leftover = sorted(o for o, n in slots.items() for _ in range(n))
            new_device.update(zip(unmatched, leftover, strict=True))
            for replica, _ in entries:
                del self.placed[(di, replica)]
            for replica, o in sorted(new_device.items()):
                self.placed[(di, replica)] = (o, self.rep_slices[di][self.dev_cls[o]], False)


def _taint_str(t: Taint) -> str:
    return f"{t.key}={t.value}:{t.effect}" if t.value else f"{t.key}:{t.effect}"


def pack(
    nodes: Sequence[Node],
    demands: Sequence[Demand],
    current: Sequence[Placement] = (),
    *,
    defragment: bool = False,
    preempt: bool = True,
    improve: bool = True,
    share_weights: bool = True,
) -> PackResult:
    """Place every replica of ``demands`` on the devices of ``nodes``.

    ``current`` placements are kept where still valid (stability). With ``defragment`` the cluster is
    also re-packed from scratch, and that plan wins only if it leaves fewer replicas unplaced (highest
    priority first) or uses fewer devices. ``preempt`` lets a replica that fits nowhere evict strictly
    lower-priority ones. ``improve`` runs the local-improvement pass. ``share_weights=False`` gives the
    share-blind plan (every replica carries its own weights: no weight-holders, replica slices include
    the weights), for comparisons. Deterministic: equal inputs in any order give equal results.
    Raises ValueError for duplicate node, device or model names, or negative sizes.
    """
    cluster = _Cluster(nodes, demands)
    levels = sorted({d.priority for d in demands}, reverse=True)
    options = {"preempt": preempt, "improve": improve, "share": share_weights}
    stable = _best_plan(cluster, current, levels, keep=True, **options)
    if not defragment or not current:
        return stable
    fresh = _best_plan(cluster, current, levels, keep=False, **options)
    if _score(fresh, levels) >= _score(stable, levels):
        return stable
    reasons = {(x.placement.model, x.placement.replica): x.reason for x in stable.dropped}
    kept = {(a.model, a.replica) for a in fresh.assignments if a.kept}
    dropped = tuple(
        Dropped(p, reasons.get((p.model, p.replica), "moved by defragmentation"))
        for p in sorted(current, key=lambda p: (p.model, p.replica, p.node, p.device))
        if (p.model, p.replica) not in kept
    )
    return PackResult(fresh.assignments, fresh.weight_holders, fresh.unplaced, dropped)


def _score(result: PackResult, levels: Sequence[int]) -> tuple[tuple[int, ...], int, int, int]:
    """Lower is better: unplaced replicas at each priority (highest first), devices, slices, moves."""
    per_priority: dict[int, int] = {}
    for u in result.unplaced:
        per_priority[u.priority] = per_priority.get(u.priority, 0) + 1
    unplaced = tuple(per_priority.get(level, 0) for level in levels)
    moves = sum(1 for a in result.assignments if not a.kept)
    return unplaced, result.devices_used(), result.slices_used(), moves


def _best_plan(
    cluster: _Cluster,
    current: Sequence[Placement],
    levels: Sequence[int],
    *,
    keep: bool,
    preempt: bool,
    improve: bool,
    share: bool,
) -> PackResult:
    """The best of several plans from the same kept state (lowest :func:`_score`, the first on ties):

    (A) share-aware chunk packing; (B) a share-blind best-fit-decreasing by replica, re-accounted with
    sharing (which only frees room), then completed and improved like A: B makes "sharing never costs
    more than not sharing" hold by construction; (R1..Rk) randomised variants of A with fixed seeds,
    as many as :data:`VARIANT_BUDGET` allows for the size of the problem.
    """

    current_map = cluster.current_map(current)
    candidates, static_drops = cluster.keep_candidates(current) if keep else ([], [])

    def start(share_weights: bool = True) -> _Packer:
        packer = _Packer(cluster, share_weights, current_map)
        if keep:
            packer.keep_current(candidates, static_drops)
        return packer

    def finish(packer: _Packer) -> _Packer:
        packer.place_all(preempt)
        if improve:
            packer.improve()
            if packer.unplaced:  # the improvement pass may have made room for what did not fit
                packer.unplaced = []
                packer.place_all(preempt)
                packer.improve()
        packer.match_indices()
        return packer

    if not share:
        blind = start(share_weights=False)
        blind.place_all(preempt)
        blind.match_indices()
        return blind.result()
    total_replicas = sum(d.replicas for d in cluster.demands)
    plan_a = start()
    new_replicas = total_replicas - len(plan_a.placed)
    runs = [finish(plan_a)]
    if new_replicas > 0:  # in the steady state (nothing to place) every strategy gives plan A
        blind = start(share_weights=False)
        blind.place_all(preempt)
        plan_b = start()
        for (di, replica), (o, _, kept) in blind.placed.items():
            if not kept and (di, replica) not in plan_b.placed and plan_b.cost(di, o) <= plan_b.dev_free[o]:
                plan_b.place(di, o, 1, replicas=[replica])
        runs.append(finish(plan_b))
        for seed in range(min(VARIANTS, VARIANT_BUDGET // (total_replicas + len(cluster.dev_id)))):
            variant = start()
            variant.perturb(random.Random(seed))
            runs.append(finish(variant))
    return min(runs, key=lambda run: run.score(levels)).result()  # the first of equals: A before B
