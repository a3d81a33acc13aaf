"""The configuration LP (Gilmore-Gomory) for share-aware packing: a strong lower bound, and often a proof.

A *configuration* is what one device can hold: some replicas of some demands, paying each share
group's weights once when any of its replicas is there (the cost model of :mod:`vnpu.operator.packing`).
The configuration LP covers every demand's replicas with fractional devices of any configuration:

    min Σ_p λ_p   s.t.  Σ_p a_dp λ_p >= replicas_d  for every demand d,   λ >= 0

Its optimum, rounded up, is a lower bound on the devices any packing needs, and for bin packing it is
famously tight (within one device of the optimum on every instance tried so far: the MIRUP
conjecture), far tighter than the device-indexed MILP's linear relaxation, whose symmetric devices
make the MILP's proven bound crawl (``bench/packing.py``: ``exact_optimum``).

The configurations are too many to list, so they are generated (column generation): solve the LP over
the columns found so far, and ask the *pricing problem* for the configuration of most dual value; stop
when none is worth more than one device. Pricing is a knapsack over the device's slices in two levels:
within a group, a bounded knapsack of its demands' replicas behind the group's weights; across groups,
a multiple-choice knapsack (each group once, at one of its sizes). Device capacities are tens of
slices, so both are small dynamic programs.

The integer program over the generated columns ("price and branch") then gives a packing; when it
needs no more devices than the rounded-up LP bound, it is optimal. When it needs more, and the device is
small enough that its *maximal* configurations (no further replica fits) can all be listed, the integer
program over all of them is exact: every packing's devices are each contained in a maximal
configuration, and covering a demand more than asked is harmless (a replica dropped only frees room).
Either way the instance's optimum is then known.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vnpu.api import slices_for_mib
from vnpu.operator.packing import Demand, group_weight_mib

#: Reduced costs below this are noise of the LP solver, not a better column.
EPSILON = 1e-9


@dataclass(frozen=True)
class Item:
    """One demand in slices: its group's weights, its replica, how many replicas it needs."""

    group: int
    replica: int
    count: int


def items_of(demands: Sequence[Demand]) -> tuple[list[Item], list[int]]:
    """Demands as :class:`Item` s, and each group's weight slices (its largest demand's). Demands of
    one group with equal replica slices are one item: for packing they are interchangeable."""
    weight_mib = group_weight_mib(demands)
    names = sorted(weight_mib)
    index = {g: i for i, g in enumerate(names)}
    counts: dict[tuple[int, int], int] = {}
    for d in demands:
        if d.replicas > 0:
            key = (index[d.share_group], slices_for_mib(d.replica_mib))
            counts[key] = counts.get(key, 0) + d.replicas
    items = [Item(group, replica, count) for (group, replica), count in sorted(counts.items())]
    return items, [slices_for_mib(weight_mib[g]) for g in names]


def best_configuration(
    items: Sequence[Item], weights: Sequence[int], capacity: int, values: Sequence[float]
) -> tuple[float, list[int]]:
    """The configuration of most total value (``values[i]`` per replica of item ``i``) that fits one
    device: (its value, replicas per item)."""
    by_group: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        if values[i] > EPSILON:
            by_group.setdefault(item.group, []).append(i)
    # Per group: best[c] = most value of its replicas in c slices (weights excluded), and how.
    options: list[tuple[list[int], list[tuple[int, float, list[int]]]]] = []
    for g, members in by_group.items():
        room = capacity - weights[g]
        if room <= 0:
            continue
        best = [0.0] * (room + 1)
        choice: list[list[int]] = [[0] * len(members) for _ in range(room + 1)]
        for m, i in enumerate(members):  # bounded knapsack, one copy of the item at a time
            r, v = items[i].replica, values[i]
            for _ in range(min(items[i].count, room // max(1, r))):
                for c in range(room, r - 1, -1):
                    if best[c - r] + v > best[c] + EPSILON:
                        best[c] = best[c - r] + v
                        choice[c] = choice[c - r].copy()
                        choice[c][m] += 1
        sizes = [(weights[g] + c, best[c], choice[c]) for c in range(1, room + 1) if best[c] > EPSILON]
        if sizes:
            options.append((members, sizes))
    # Across groups: multiple-choice knapsack over the device's slices.
    total = [0.0] * (capacity + 1)
    picks: list[list[tuple[int, int]]] = [[] for _ in range(capacity + 1)]  # (option group index, size)
    for k, (_, sizes) in enumerate(options):
        new_total, new_picks = total.copy(), [p.copy() for p in picks]
        for c in range(capacity + 1):
            for j, (s, v, _) in enumerate(sizes):
                if s <= c and total[c - s] + v > new_total[c] + EPSILON:
                    new_total[c] = total[c - s] + v
                    new_picks[c] = [*picks[c - s], (k, j)]
        total, picks = new_total, new_picks
    c = max(range(capacity + 1), key=lambda c: total[c])
    counts = [0] * len(items)
    for k, j in picks[c]:
        members, sizes = options[k]
        for m, n in enumerate(sizes[j][2]):
            counts[members[m]] += n
    return total[c], counts


def maximal_configurations(
    items: Sequence[Item], weights: Sequence[int], capacity: int, limit: int
) -> list[list[int]] | None:
    """Every configuration to which no further replica can be added (None: more than ``limit``)."""
    counts = [0] * len(items)
    present: dict[int, int] = {}
    found: list[list[int]] = []

    def saturated(used: int) -> bool:
        return not any(
            counts[i] < item.count
            and used + item.replica + (0 if present.get(item.group) else weights[item.group]) <= capacity
            for i, item in enumerate(items)
        )

    def visit(i: int, used: int) -> bool:
        if i == len(items):
            if used and saturated(used):
                found.append(counts.copy())
            return len(found) <= limit
        item = items[i]
        had = present.get(item.group, 0)
        for k in range(item.count, -1, -1):
            cost = k * item.replica + (weights[item.group] if k and not had else 0)
            if used + cost > capacity:
                continue
            counts[i] = k
            present[item.group] = had + k
            ok = visit(i + 1, used + cost)
            present[item.group] = had
            if not ok:
                return False
        counts[i] = 0
        return True

    return found if visit(0, 0) else None


def configuration_lp(
    demands: Sequence[Demand],
    capacity: int,
    *,
    time_limit: float = 60.0,
    max_configurations: int = 100_000,
) -> dict[str, Any]:
    """The configuration LP's bound and, where it can be had, the proven optimum (module docstring).

    Returns ``lp`` (the LP optimum), ``lower_bound`` (rounded up, or the optimum once proven; None if
    the time ran out first), ``devices`` (the best packing found, None if none), ``proven_optimal``,
    ``method`` (how: ``price-and-branch`` or ``all maximal configurations``), ``columns``,
    ``iterations`` and ``seconds``.
    """
    import numpy as np
    from scipy.optimize import linprog

    started = time.perf_counter()
    items, weights = items_of(demands)
    for item in items:
        if weights[item.group] + item.replica > capacity:
            raise ValueError("a replica does not fit on an empty device")
    need = np.array([item.count for item in items], dtype=float)
    columns: list[list[int]] = []
    for i, item in enumerate(items):  # start: each item alone, as many replicas as fit
        column = [0] * len(items)
        column[i] = min(item.count, (capacity - weights[item.group]) // max(1, item.replica))
        columns.append(column)
    lp_value, converged, iterations = 0.0, not items, 0
    while items and time.perf_counter() - started < time_limit:
        iterations += 1
        a = np.array(columns, dtype=float).T  # items x columns
        res = linprog(np.ones(len(columns)), A_ub=-a, b_ub=-need, bounds=(0, None), method="highs")
        if res.status != 0:
            raise RuntimeError(f"configuration LP failed: {res.message}")
        lp_value = float(res.fun)
        duals = [max(0.0, -float(m)) for m in res.ineqlin.marginals]
        value, column = best_configuration(items, weights, capacity, duals)
        if value <= 1 + EPSILON or column in columns:
            converged = True
            break
        columns.append(column)
    bound = math.ceil(lp_value - 1e-6) if converged else None
    devices = _integer_master(columns, need, _left(started, time_limit)) if items else 0
    method = "price-and-branch"
    if devices is None or bound is None or devices > bound:
        every = maximal_configurations(items, weights, capacity, max_configurations)
        if every is not None:
            exact = _integer_master(every, need, _left(started, time_limit))
            if exact is not None:
                devices, bound, method = exact, exact, "all maximal configurations"
                columns = every
    return {
        "lp": round(lp_value, 6),
        "lower_bound": bound,
        "devices": devices,
        "proven_optimal": devices is not None and devices == bound,
        "method": method,
        "columns": len(columns),
        "iterations": iterations,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _left(started: float, time_limit: float) -> float:
    return max(1.0, time_limit - (time.perf_counter() - started))


def _integer_master(columns: list[list[int]], need: Any, time_limit: float) -> int | None:
    """Fewest devices covering every item with the given configurations (None: not solved in time)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    a = np.array(columns, dtype=float).T
    res = milp(
        np.ones(len(columns)),
        integrality=np.ones(len(columns)),
        bounds=Bounds(0, np.inf),
        constraints=LinearConstraint(a, need, np.inf),
        options={"time_limit": time_limit, "disp": False},
    )
    return round(res.fun) if res.status == 0 else None
