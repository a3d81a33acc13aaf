"""The entry point: :func:`pack` runs several packings from the same kept state and returns the best
(fewest unplaced replicas by priority, then fewest devices, slices and moves)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from vnpu.operator.packing.cluster import Cluster
from vnpu.operator.packing.inputs import Demand, Node, Placement
from vnpu.operator.packing.outputs import Dropped, PackResult
from vnpu.operator.packing.packer import Packer

#: Randomised packing variants tried besides the two main strategies: at most VARIANTS, and no more
#: than VARIANT_BUDGET / (replicas + devices) of them (each is a whole packing run, whose cost grows
#: with both), so they help on small, tight problems (where they find the optimum the greedy order
#: misses) and cost nothing at scale; none run in the steady state (nothing new to place).
VARIANTS = 64
VARIANT_BUDGET = 15_000


def pack(
    nodes: Sequence[Node],
    demands: Sequence[Demand],
    current: Sequence[Placement] = (),
    *,
    offered: Sequence[Placement] = (),
    defragment: bool = False,
    preempt: bool = True,
    improve: bool = True,
    share_weights: bool = True,
) -> PackResult:
    """Place every replica of ``demands`` on the devices of ``nodes``.

    ``current`` placements are kept where still valid (stability). ``offered`` placements, of replicas
    that do not run yet, are taken after every kept one, where they still fit: a waking model's first
    replica offered its group's warm holder's device never takes the room of a running replica. With
    ``defragment`` the cluster is also re-packed from scratch, and that plan wins only if it leaves
    fewer replicas unplaced (highest priority first) or uses fewer devices. ``preempt`` lets a replica
    that fits nowhere evict strictly lower-priority ones. ``improve`` runs the local-improvement pass.
    ``share_weights=False`` gives the share-blind plan (every replica carries its own weights: no
    weight-holders, replica slices include the weights), for comparisons. Deterministic: equal inputs
    in any order give equal results. Raises ValueError for duplicate node, device or model names, or
    negative sizes.
    """
    cluster = Cluster(nodes, demands)
    levels = sorted({d.priority for d in demands}, reverse=True)
    options = {"preempt": preempt, "improve": improve, "share": share_weights}
    stable = _best_plan(cluster, current, levels, keep=True, offered=offered, **options)
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
    cluster: Cluster,
    current: Sequence[Placement],
    levels: Sequence[int],
    *,
    keep: bool,
    preempt: bool,
    improve: bool,
    share: bool,
    offered: Sequence[Placement] = (),
) -> PackResult:
    """The best of several plans from the same kept state (lowest :func:`_score`, the first on ties):

    (A) share-aware chunk packing; (B) a share-blind best-fit-decreasing by replica, re-accounted with
    sharing (which only frees room), then completed and improved like A: B makes "sharing never costs
    more than not sharing" hold by construction; (R1..Rk) randomised variants of A with fixed seeds,
    as many as :data:`VARIANT_BUDGET` allows for the size of the problem.
    """

    current_map = cluster.current_map([*current, *offered])  # (a replica taking its offer stays put)
    candidates, static_drops = cluster.keep_candidates(current) if keep else ([], [])
    offers = cluster.offer_candidates(offered, candidates) if keep else []

    def start(share_weights: bool = True) -> Packer:
        packer = Packer(cluster, share_weights, current_map)
        if keep:
            packer.keep_current(candidates, static_drops, offers)
        return packer

    def finish(packer: Packer) -> Packer:
        packer.place_all(preempt)
        if improve:
            packer.improve()
            if packer.unplaced:  # the improvement pass may have made room for what did not fit
                packer.unplaced = []
                packer.place_all(preempt)
                packer.improve()
        return align(packer)

    def align(packer: Packer) -> Packer:
        """A fresh plan renamed onto the running devices where interchangeable (fewest moves), with
        its new replicas numbered after the running ones they replace."""
        if not keep and current_map:
            packer = packer.aligned_with_current()
        packer.match_indices()
        return packer

    if not share:
        blind = start(share_weights=False)
        blind.place_all(preempt)
        blind = align(blind)
        return blind.result()
    total_replicas = sum(d.replicas for d in cluster.demands)
    plan_a = start()
    new_replicas = total_replicas - len(plan_a.placed)
    runs = [finish(plan_a)]
    if new_replicas > 0:  # in the steady state (nothing to place) every strategy gives plan A
        blind = start(share_weights=False)
        blind.place_all(preempt)
        plan_b = start()
        # A running replica the blind start could not keep (it pays its own weights there) is new in
        # the blind plan but kept in plan B: copy only as many new replicas as plan B still misses.
        placed = Counter(di for di, _ in plan_b.placed)
        for (di, replica), (o, _, kept) in blind.placed.items():
            if kept or (di, replica) in plan_b.placed or placed[di] >= cluster.demands[di].replicas:
                continue
            if plan_b.may_add(di, o):
                plan_b.place(di, o, 1, replicas=[replica])
                placed[di] += 1
        runs.append(finish(plan_b))
        for seed in range(min(VARIANTS, VARIANT_BUDGET // (total_replicas + len(cluster.dev_id)))):
            variant = start()
            variant.perturb(random.Random(seed))
            runs.append(finish(variant))
    return min(runs, key=lambda run: run.score(levels)).result()  # the first of equals: A before B


#: :func:`consolidate` acts only while the plan needs more than this times a fresh repack's devices.
CONSOLIDATE_BOUND = 1.05
#: ... and a move that empties no device must save at least this many slices (weights, mostly).
MIN_SLICES_PER_MOVE = 16


def consolidate(
    nodes: Sequence[Node],
    demands: Sequence[Demand],
    current: Sequence[Placement],
    *,
    max_moves: int,
    bound: float = CONSOLIDATE_BOUND,
    min_slices_per_move: int = MIN_SLICES_PER_MOVE,
    tries: int = 24,
) -> PackResult:
    """A stable plan that may move at most ``max_moves`` running replicas to use fewer devices.

    Between the sticky plan (no moves) and a fresh repack (fewest devices, most replicas moved). It
    does nothing while the sticky plan needs at most ``bound`` times the devices of a fresh repack
    (computed here), so moves are spent only on drift. Under churn a sticky plan drifts mostly by
    weight copies: a group that grew where its devices were full got another copy elsewhere, and its
    scale-downs leave copies holding a replica or two. So the candidates are, cheapest first (fewest
    replicas to move): the copies of groups with several (their replicas offered to the packer as new,
    which puts them next to the group's other copies, paying no weights) and whole devices. A
    candidate is taken only if the plan then places everything and needs fewer devices, or saves at
    least ``min_slices_per_move`` slices per replica moved (room the next arrivals fill instead of
    opening devices); moves that buy less are not worth a restart.
    """
    best = pack(nodes, demands, current)
    if max_moves <= 0 or best.unplaced:
        return best
    target = bound * pack(nodes, demands).devices_used()
    group_of = {d.model: d.share_group for d in demands}
    moves = 0
    while best.devices_used() > target and moves < max_moves:
        kept = best.placements()
        improved = None
        for group, device in _drain_candidates(best, max_moves - moves)[:tries]:
            trial = [
                p for p in kept if (p.node, p.device) != device or group not in (None, group_of[p.model])
            ]
            result = pack(nodes, demands, trial)
            moved = result.moved_from(kept)
            if result.unplaced or not moved or moves + moved > max_moves:
                continue
            saved = best.slices_used() - result.slices_used()
            if result.devices_used() < best.devices_used() or saved >= min_slices_per_move * moved:
                improved = result, moved
                break
        if improved is None:
            break
        best, moves = improved[0], moves + improved[1]
    return best


def _drain_candidates(plan: PackResult, budget: int) -> list[tuple[str | None, tuple[str, str]]]:
    """(share group or None for the whole device, (node, device)) to empty, at most ``budget``
    replicas each: fewest replicas first, then the biggest weight copy, then the least-used device."""
    replicas: dict[tuple[str, str], int] = {}
    used = plan.slices_by_device()
    copies: dict[str, dict[tuple[str, str], int]] = {}  # group -> (node, device) -> its replicas there
    for a in plan.assignments:
        key = (a.node, a.device)
        replicas[key] = replicas.get(key, 0) + 1
        per_device = copies.setdefault(a.share_group, {})
        per_device[key] = per_device.get(key, 0) + 1
    weights: dict[tuple[str, tuple[str, str]], int] = {}
    for h in plan.weight_holders:
        weights[(h.share_group, (h.node, h.device))] = h.slices
    ranked: list[tuple[int, int, int, str, tuple[str, str]]] = [
        (n, 0, used[key], "", key) for key, n in replicas.items() if n <= budget
    ]
    ranked += [
        (n, -weights.get((group, key), 0), used[key], group, key)
        for group, devices in copies.items()
        if len(devices) > 1
        for key, n in devices.items()
        if n <= budget
    ]
    ranked.sort()
    return [(group or None, key) for _, _, _, group, key in ranked]
