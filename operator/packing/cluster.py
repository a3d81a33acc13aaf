"""The static side of one packing problem: devices flattened in a stable order, demands with their
slices per slice size, and which devices each eligibility signature (selector, tolerations) may use.
Computed once per :func:`vnpu.operator.packing.pack` call and shared by every packing run."""

from __future__ import annotations

from collections.abc import Sequence

from vnpu.api import DEFAULT_SLICE_MIB, slices_for_mib
from vnpu.operator.packing.inputs import (
    NO_EXECUTE,
    NO_SCHEDULE,
    Demand,
    Node,
    Placement,
    Taint,
    Toleration,
    group_weight_mib,
)
from vnpu.operator.packing.outputs import Dropped

Signature = tuple[tuple[tuple[str, str], ...], tuple[Toleration, ...]]


def signature(d: Demand) -> Signature:
    tolerations = tuple(sorted(set(d.tolerations), key=lambda t: (t.key, t.operator, t.value, t.effect)))
    return tuple(sorted(d.node_selector.items())), tolerations


def blocking_taints(node: Node, tolerations: tuple[Toleration, ...], effects: tuple[str, ...]) -> list[Taint]:
    return [
        t for t in node.taints if t.effect in effects and not any(tol.tolerates(t) for tol in tolerations)
    ]


class Cluster:
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
        loaded: list[frozenset[str]] = []
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
                loaded.append(dev.loaded)
        self.max_slices = [0] * len(self.slice_sizes)
        for o, total in enumerate(self.dev_total):
            self.max_slices[self.dev_cls[o]] = max(self.max_slices[self.dev_cls[o]], total)
        self.group_mib = group_weight_mib(self.demands)
        # Per device: the groups (of these demands) whose weights are there already, held outside.
        self.dev_loaded = [frozenset(g for g in gs if g in self.group_mib) for gs in loaded]
        self.rep_slices = [[slices_for_mib(d.replica_mib, s) for s in self.slice_sizes] for d in self.demands]
        self.w_slices = [
            [slices_for_mib(self.group_mib[d.share_group], s) for s in self.slice_sizes] for d in self.demands
        ]
        # Eligibility signatures (selector, tolerations): ids, nodes that pass, devices new replicas may use.
        self.sig = [signature(d) for d in self.demands]
        sig_ids: dict[Signature, int] = {}
        self.sig_of = [sig_ids.setdefault(sig, len(sig_ids)) for sig in self.sig]
        self.signatures = list(sig_ids)
        self.node_ok: list[list[bool]] = []
        self.eligible: list[list[int]] = []
        self.dev_sigs: list[list[int]] = [[] for _ in self.dev_id]
        for sid, (selector, tolerations) in enumerate(self.signatures):
            ok = [
                all(node.labels.get(k) == v for k, v in selector)
                and not blocking_taints(node, tolerations, (NO_SCHEDULE, NO_EXECUTE))
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
        depends on capacity (room, hard spread) is decided per run in :meth:`Packer.keep_current`.

        A scale-down drops, like a ReplicaSet picking its victims, the replicas whose going frees the
        most: those on the devices holding the fewest replicas of their share group (a thin weight
        copy goes away whole), the highest index first among equals. Replica indices are identities,
        not a range: the survivors keep theirs, and new replicas take the lowest free ones."""
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
        valid: list[tuple[Placement, int, int]] = []
        dropped: list[Dropped] = []
        for p in order:
            reason = self._why_not_keep(p, seen)
            if reason:
                dropped.append(Dropped(p, reason))
                continue
            seen.add((p.model, p.replica))
            valid.append((p, self.demand_index[p.model], self.dev_ordinal[(p.node, p.device)]))
        # Scale-down: per demand, the replicas beyond its count go, thinnest weight copy first.
        on_device: dict[tuple[int, str], int] = {}  # (device, share group) -> valid replicas there
        per_demand: dict[int, list[tuple[Placement, int, int]]] = {}
        for p, di, o in valid:
            key = (o, self.demands[di].share_group)
            on_device[key] = on_device.get(key, 0) + 1
            per_demand.setdefault(di, []).append((p, di, o))
        excess: set[tuple[str, int]] = set()
        for di, entries in per_demand.items():
            d = self.demands[di]
            if len(entries) > d.replicas:
                ranked = sorted(entries, key=lambda e: (on_device[(e[2], d.share_group)], -e[0].replica))
                for p, _, _ in ranked[: len(entries) - d.replicas]:
                    excess.add((p.model, p.replica))
                    dropped.append(Dropped(p, f"scaled down to {d.replicas} replicas"))
        candidates = [e for e in valid if (e[0].model, e[0].replica) not in excess]
        return candidates, dropped

    def offer_candidates(
        self, offered: Sequence[Placement], kept: Sequence[tuple[Placement, int, int]]
    ) -> list[tuple[Placement, int, int]]:
        """The offered placements (replicas that do not run yet, offered a device: a waking model's
        first replica on its warm holder's) that are valid for a replica no kept placement has, as
        (placement, demand, device) in the order they are tried, after every kept one. An offer is a
        new pod: it must pass the rules of a new placement too (a device of a schedulable node whose
        NoSchedule taints the model tolerates), or a warm holder on a cordoned node would pin the
        woken replica there, Pending for as long as the cordon lasts."""
        seen = {(p.model, p.replica) for p, _, _ in kept}
        out = []
        for p in sorted(offered, key=lambda p: (p.model, p.replica, p.node, p.device)):
            if not self._why_not_keep(p, seen) and self._new_placement_ok(p):
                seen.add((p.model, p.replica))
                out.append((p, self.demand_index[p.model], self.dev_ordinal[(p.node, p.device)]))
        return out

    def _new_placement_ok(self, p: Placement) -> bool:
        """Whether a new replica of ``p``'s model may go on ``p``'s device (the packer's own rule)."""
        o = self.dev_ordinal[(p.node, p.device)]
        return self.dev_ok_new[o] and self.node_ok[self.sig_of[self.demand_index[p.model]]][self.dev_node[o]]

    def _why_not_keep(self, p: Placement, seen: set[tuple[str, int]]) -> str:
        di = self.demand_index.get(p.model)
        if di is None:
            return "the model no longer asks for replicas"
        d = self.demands[di]
        if p.replica < 0:
            return f"replica index {p.replica} is not valid"
        if d.replicas == 0:
            return "scaled down to 0 replicas"
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
        evicting = blocking_taints(node, self.sig[di][1], (NO_EXECUTE,))
        if evicting:
            return f"node {node.name} has an untolerated NoExecute taint {taint_str(evicting[0])}"
        if p.slices != self.rep_slices[di][self.dev_cls[o]]:
            return f"per-replica memory changed ({p.slices} -> {self.rep_slices[di][self.dev_cls[o]]} slices)"
        if not p.bound and not self._new_placement_ok(p):
            # (cordoned or tainted after it was placed: the scheduler never binds it there)
            return (
                f"not scheduled yet, and node {node.name} takes no new pod (cordoned or tainted NoSchedule)"
            )
        return ""


def taint_str(t: Taint) -> str:
    return f"{t.key}={t.value}:{t.effect}" if t.value else f"{t.key}:{t.effect}"
