"""Draining devices within a move budget: the operator's defragmentation, one safe batch at a time.

A fresh repack (``pack(..., defragment=True)``) reaches the fewest devices but moves most replicas at
once, and moves them into room that replicas moving out still hold. A drain instead picks a few
devices to empty, cordons them (they take nothing new) and re-places only their replicas, into room
that is free *now* on the other devices. So each moved replica can start beside the one it replaces
and take over once Ready (make-before-break): the operator keeps the old pod until then. The devices
drained are the ones whose emptying buys the most per move: their free slices plus weight copies that
are not their group's fullest (a copy the group's other devices can absorb), over their replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from vnpu.operator.packing.inputs import Demand, Node, Placement
from vnpu.operator.packing.outputs import Dropped, PackResult
from vnpu.operator.packing.plans import pack

#: Drained sets :func:`drain` evaluates at most (each is one packer run).
DRAIN_TRIES = 32

DeviceKey = tuple[str, str]  # (node, device)


@dataclass(frozen=True)
class WeightCopy:
    """One share group's weights on one device, with the replicas that map them there."""

    share_group: str
    node: str
    device: str
    replicas: int
    slices: int
    #: The group's copy with the most replicas (the dearest to empty): the one a group keeps.
    fullest: bool


def weight_copies(plan: PackResult) -> list[WeightCopy]:
    """Every (share group, device) the plan's replicas use, sorted, with its replicas and weights."""
    per_copy: dict[tuple[str, str, str], int] = {}
    for a in plan.assignments:
        key = (a.share_group, a.node, a.device)
        per_copy[key] = per_copy.get(key, 0) + 1
    weights = {(h.share_group, h.node, h.device): h.slices for h in plan.weight_holders}
    fullest: dict[str, tuple[str, str, str]] = {}
    for key, n in per_copy.items():
        kept = fullest.get(key[0])
        if kept is None or (n, key) > (per_copy[kept], kept):
            fullest[key[0]] = key
    return [
        WeightCopy(*key, n, weights.get(key, 0), fullest[key[0]] == key)
        for key, n in sorted(per_copy.items())
    ]


def waste_by_device(plan: PackResult, nodes: Sequence[Node]) -> dict[DeviceKey, int]:
    """Per used device, the slices emptying it would give back beyond its replicas' own: its free
    slices (those no pod holds, the plan's or another's) plus its weight copies that are not their
    group's fullest."""
    available = _available(nodes)
    waste = {key: max(0, available.get(key, used) - used) for key, used in plan.slices_by_device().items()}
    for c in weight_copies(plan):
        if not c.fullest:
            waste[(c.node, c.device)] += c.slices
    return waste


def drain(
    nodes: Sequence[Node],
    demands: Sequence[Demand],
    stable: PackResult,
    *,
    max_moves: int,
    tries: int = DRAIN_TRIES,
) -> PackResult:
    """``stable`` (the plan :func:`pack` gives for what runs now), or one that empties devices by
    moving at most ``max_moves`` of its running replicas.

    Devices are considered most waste per replica first; one is added to the drained set when the
    packer then still places everything and uses fewer devices, within the budget. Drained devices are
    cordoned for the plan (no room for anything), so every moved replica lands in room that no pod
    holds now. Only from a steady state (:meth:`PackResult.steady`): while the stable plan places,
    drops or leaves unplaced any replica (a scale, a lost device, too little room), that comes first
    and ``stable`` is returned, as it is when no drain helps or ``max_moves`` is 0. Moved replicas are
    in ``dropped``.
    """
    if max_moves <= 0 or not stable.steady():
        return stable
    current = stable.placements()  # steady: exactly what runs
    waste = waste_by_device(stable, nodes)
    running: dict[DeviceKey, list[Placement]] = {}
    for p in current:
        running.setdefault((p.node, p.device), []).append(p)
    candidates = sorted(
        (key for key, on in running.items() if len(on) <= max_moves),
        key=lambda key: (-waste[key] / len(running[key]), len(running[key]), key),
    )
    available = _available(nodes)
    best, moves = stable, 0
    drained: set[DeviceKey] = set()
    used, room = _room(best, available)
    for key in candidates[:tries]:
        if moves + len(running[key]) > max_moves:
            continue
        # Its replicas must fit in room on the other devices in use (one newly opened would free none):
        # a cheap necessary test before a packer run.
        mine = sum(a.slices for a in best.assignments if (a.node, a.device) == key)
        if mine > room - (available.get(key, 0) - used[key]):
            continue
        trial = _pack_drained(nodes, demands, current, drained | {key})
        if trial.unplaced or trial.devices_used() >= best.devices_used():
            continue
        best, moves = trial, moves + len(running[key])  # every running replica there moves
        drained.add(key)
        used, room = _room(best, available)
    if not drained:
        return stable
    moved = [p for key in sorted(drained) for p in running[key]]
    return replace(
        _renumbered(best, moved), dropped=tuple(Dropped(p, "moved by defragmentation") for p in moved)
    )


def _renumbered(plan: PackResult, moved: Sequence[Placement]) -> PackResult:
    """The plan with each moved replica under the index it ran as (the packer numbers re-placed
    replicas from the lowest free index): a move is then one replica on another device, and its new
    pod names the pod it replaces by model and index."""
    free: dict[str, list[int]] = {}
    for p in sorted(moved, key=lambda p: (p.model, p.replica)):
        free.setdefault(p.model, []).append(p.replica)
    placed = {(a.model, a.replica) for a in plan.assignments if a.kept}
    fresh = sorted(
        (a for a in plan.assignments if not a.kept and a.replica not in free.get(a.model, ())),
        key=lambda a: (a.model, a.replica),
    )
    taken = {(a.model, a.replica) for a in plan.assignments if not a.kept} | placed
    index: dict[tuple[str, int], int] = {}
    for a in fresh:
        spare = [i for i in free.get(a.model, ()) if (a.model, i) not in taken]
        if spare:
            index[(a.model, a.replica)] = spare[0]
            taken.add((a.model, spare[0]))
    assignments = tuple(
        replace(a, replica=index.get((a.model, a.replica), a.replica)) for a in plan.assignments
    )
    return replace(plan, assignments=assignments)


def _available(nodes: Sequence[Node]) -> dict[DeviceKey, int]:
    """Slices per device that no pod outside the plan holds."""
    return {(n.name, d.id): d.available for n in nodes for d in n.devices}


def _room(plan: PackResult, available: dict[DeviceKey, int]) -> tuple[dict[DeviceKey, int], int]:
    """Slices used per device in use, and the free slices on all of them together."""
    used = plan.slices_by_device()
    return used, sum(max(0, available.get(key, 0) - n) for key, n in used.items())


def _pack_drained(
    nodes: Sequence[Node], demands: Sequence[Demand], current: Sequence[Placement], drained: set[DeviceKey]
) -> PackResult:
    cordoned = [
        replace(
            n,
            devices=tuple(replace(d, free_slices=0) if (n.name, d.id) in drained else d for d in n.devices),
        )
        for n in nodes
    ]
    return pack(cordoned, demands, [p for p in current if (p.node, p.device) not in drained])
