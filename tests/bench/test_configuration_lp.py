"""bench/configuration_lp.py: the pricing knapsack and the maximal configurations against brute force,
the bound against vnpu's plans, and the integer program closing a gap the LP rounds away (its agreement
with the device MILP is checked in test_bench_packing.py)."""

from __future__ import annotations

import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vnpu.bench.configuration_lp import (
    Item,
    best_configuration,
    configuration_lp,
    items_of,
    maximal_configurations,
)
from vnpu.bench.packing import cluster_for, quality_suite
from vnpu.operator.packing import Demand, group_weight_mib, pack

GIB = 1024


def _fits(counts: tuple[int, ...], items: list[Item], weights: list[int], capacity: int) -> bool:
    groups = {item.group for item, n in zip(items, counts, strict=True) if n}
    used = sum(weights[g] for g in groups) + sum(
        n * item.replica for item, n in zip(items, counts, strict=True)
    )
    return used <= capacity


def _every_configuration(items: list[Item], weights: list[int], capacity: int) -> list[tuple[int, ...]]:
    ranges = [range(item.count + 1) for item in items]
    return [c for c in itertools.product(*ranges) if any(c) and _fits(c, items, weights, capacity)]


small_items = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 5), st.integers(1, 4)), min_size=1, max_size=4
).map(lambda rows: [Item(g, r, n) for g, r, n in rows])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=small_items,
    weights=st.lists(st.integers(0, 4), min_size=3, max_size=3),
    capacity=st.integers(6, 14),
    seed=st.integers(0, 10**6),
)
def test_pricing_finds_the_most_valuable_configuration(items, weights, capacity, seed):
    rng = random.Random(seed)
    values = [rng.choice([0.0, rng.random()]) for _ in items]
    value, counts = best_configuration(items, weights, capacity, values)
    brute = max(
        (
            sum(v * n for v, n in zip(values, c, strict=True))
            for c in _every_configuration(items, weights, capacity)
        ),
        default=0.0,
    )
    assert abs(value - brute) < 1e-9
    assert all(n <= item.count for item, n in zip(items, counts, strict=True))
    assert _fits(tuple(counts), items, weights, capacity)
    assert abs(sum(v * n for v, n in zip(values, counts, strict=True)) - value) < 1e-9


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=small_items,
    weights=st.lists(st.integers(0, 4), min_size=3, max_size=3),
    capacity=st.integers(6, 14),
)
def test_maximal_configurations_are_exactly_the_saturated_ones(items, weights, capacity):
    every = set(_every_configuration(items, weights, capacity))

    def saturated(c: tuple[int, ...]) -> bool:
        return not any(
            tuple(n + (i == j) for j, n in enumerate(c)) in every
            for i in range(len(c))
            if c[i] < items[i].count
        )

    found = maximal_configurations(items, weights, capacity, limit=10_000)
    assert found is not None
    assert sorted(map(tuple, found)) == sorted(c for c in every if saturated(c))
    if found:  # one more than the limit allows: None
        assert maximal_configurations(items, weights, capacity, limit=len(found) - 1) is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 6), st.integers(1, 12), st.integers(1, 20)),
        min_size=1,
        max_size=6,
    )
)
def test_the_bound_never_exceeds_a_packing(rows):
    # (group, replicas, replica GiB, weight GiB) on 32-GiB devices; a demand that fits nowhere is skipped.
    demands = [
        Demand(f"m{i}", f"g{g}", n, r * GIB, w * GIB) for i, (g, n, r, w) in enumerate(rows) if r + w <= 32
    ]
    weights = group_weight_mib(demands)
    demands = [d for d in demands if d.replica_mib + weights[d.share_group] <= 32 * GIB]
    result = configuration_lp(demands, 32)
    plan = pack(cluster_for(64, 32), demands)
    assert not plan.unplaced
    assert result["lower_bound"] is not None and result["lower_bound"] <= plan.devices_used()
    if result["proven_optimal"]:
        assert result["devices"] <= plan.devices_used()


def test_the_integer_program_closes_a_gap_the_lp_rounds_away():
    # medium-02 of the committed suite: the LP is exactly 16, yet no packing uses fewer than 17 devices.
    mix = next(m for m in quality_suite(4) if m.name == "medium-02")
    result = configuration_lp(mix.demands, mix.device_gib)
    assert abs(result["lp"] - 16) < 1e-6
    assert result["proven_optimal"] and result["devices"] == result["lower_bound"] == 17
    assert result["method"] == "all maximal configurations"
    assert pack(cluster_for(64, 32), mix.demands).devices_used() == 17


def test_demands_of_one_group_and_size_are_one_item():
    demands = [
        Demand("a", "g", 2, 2 * GIB, 4 * GIB),
        Demand("b", "g", 3, 2 * GIB, 6 * GIB),  # the group's weights are its largest demand's
        Demand("c", "g", 1, 5 * GIB, 4 * GIB),
        Demand("d", "h", 0, 1 * GIB, 1 * GIB),  # no replicas: no item, but its group is still known
    ]
    items, weights = items_of(demands)
    assert items == [Item(0, 2, 5), Item(0, 5, 1)]
    assert weights == [6, 1]
