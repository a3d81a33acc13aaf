"""Renaming a fresh repack onto the running devices, so that defragmentation restarts only what must move.

A fresh repack (``pack(..., defragment=True)``) names its devices by where its greedy filled them
first, so nearly every running replica lands on "another" device even where the new plan holds the
same replicas together. Renaming a planned device onto another of the same kind (slice size,
capacity, free room, health, weights already loaded) on a node that every demand's selector and
tolerations treat alike gives the same plan: the same devices used, the same slices, every selector
and taint still met. Devices holding a replica of a spread demand are renamed only within their node,
so each node keeps its replicas of every spread demand (hard spread stays one per node). Of those
renamings we pick, greedily by overlap, one that puts each planned device where the most of its
replicas already run. Pure: device ordinals in, a mapping out.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator

from vnpu.operator.packing.cluster import Cluster
from vnpu.operator.packing.inputs import Spread

#: Replicas per demand on one device or node: {place: {demand: count}}.
Counts = dict[int, dict[int, int]]


def device_mapping(
    cluster: Cluster, planned: Iterable[tuple[int, int]], running: Iterable[tuple[int, int]]
) -> dict[int, int]:
    """{device the plan uses: device to use instead}, injective, each onto an interchangeable device.

    ``planned`` and ``running`` are (demand, device ordinal) pairs, one per replica: the fresh plan and
    the running state. Devices the plan does not use are left out (they hold nothing to rename). A
    device holding a replica of a spread demand is renamed only within its node (its node keeps the
    same replicas of that demand); the others go to any device of the same kind on a node every
    selector and toleration treats alike, whichever holds the most of their replicas already."""
    c = cluster
    plan, run = _count(planned), _count(running)
    eligibility = [tuple(ok[ni] for ok in c.node_ok) for ni in range(len(c.nodes))]

    def kind(o: int) -> tuple[int, int, int, bool, bool, frozenset[str]]:
        return (
            c.dev_cls[o],
            c.dev_total[o],
            c.dev_available[o],
            c.dev_ok_new[o],
            c.dev_ok_kept[o],
            c.dev_loaded[o],
        )

    def pinned(o: int) -> bool:
        return any(c.demands[di].spread != Spread.NONE for di in plan[o])

    running_on: dict[int, set[int]] = {}  # demand -> devices running it: the only targets that gain
    for o, per in run.items():
        for di in per:
            running_on.setdefault(di, set()).add(o)

    def gain(a: int, b: int) -> int:
        """Replicas that stay if planned device ``a`` is running device ``b``."""
        mine, theirs = plan[a], run.get(b, {})
        return sum(min(n, theirs.get(di, 0)) for di, n in mine.items())

    def gains(a: int) -> Iterator[tuple[int, int]]:
        for b in set().union(*(running_on.get(di, ()) for di in plan[a])):
            yield b, gain(a, b)

    everywhere = range(len(c.dev_id))
    mapping = _match(
        sorted(o for o in plan if pinned(o)), everywhere, lambda o: (c.dev_node[o], kind(o)), gains
    )
    taken = set(mapping.values())
    mapping.update(
        _match(
            sorted(o for o in plan if not pinned(o)),
            (o for o in everywhere if o not in taken),
            lambda o: (eligibility[c.dev_node[o]], kind(o)),
            gains,
        )
    )
    # Greedy, so checked: never keep fewer in place than the plan's own names would.
    if sum(gain(o, o) for o in plan) > sum(gain(o, t) for o, t in mapping.items()):
        return {o: o for o in plan}
    return mapping


def _count(pairs: Iterable[tuple[int, int]]) -> Counts:
    out: Counts = {}
    for di, o in pairs:
        per = out.setdefault(o, {})
        per[di] = per.get(di, 0) + 1
    return out


def _match(
    sources: Iterable[int],
    targets: Iterable[int],
    profile: Callable[[int], Hashable],
    gains: Callable[[int], Iterable[tuple[int, int]]],
) -> dict[int, int]:
    """Injective map of ``sources`` onto ``targets`` of the same profile: the pairs that keep the most
    (``gains(source)``: (target, replicas kept) for the targets worth a look) first, greedily, then each
    remaining source onto itself if free, else the first free target."""
    profile_of = {t: profile(t) for t in targets}
    free_by_profile: dict[Hashable, list[int]] = {}
    for t, p in profile_of.items():
        free_by_profile.setdefault(p, []).append(t)
    free = set(profile_of)
    profiled = [(s, profile(s)) for s in sources]
    pairs = sorted(
        (-gain, s, t)
        for s, p in profiled
        for t, gain in gains(s)
        if gain > 0 and t in free and profile_of[t] == p
    )
    out: dict[int, int] = {}
    for _, s, t in pairs:
        if s not in out and t in free:
            out[s] = t
            free.discard(t)
    for s, p in profiled:
        if s in out:
            continue
        same = free_by_profile[p]
        t = s if s in free else next(t for t in same if t in free)
        out[s] = t
        free.discard(t)
    return out
