"""bench/churn.py: the trace is seeded, and a short run writes its results with provenance."""

from __future__ import annotations

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from vnpu.bench.churn import devices_floor, main, trace
from vnpu.operator.packing import Demand, Device, Node, Placement, consolidate, pack


def test_the_trace_is_seeded_and_mixes_every_kind_of_event():
    events = trace(3, 200, 50)
    assert events == trace(3, 200, 50) and len(events) == 200
    assert {kind for kind, _, _ in events} == {"arrive", "scale", "delete"}


def test_consolidation_frees_a_device_within_its_move_budget():
    nodes = [Node("n", tuple(Device(f"d{i}", 16) for i in range(3)))]
    demands = [Demand("a", "ga", 1, 6 * 1024, 0), Demand("b", "gb", 1, 6 * 1024, 0)]
    # Two half-empty devices (what deletions leave behind): one move frees one of them.
    current = [Placement("a", 0, "n", "d0", 6), Placement("b", 0, "n", "d1", 6)]
    assert pack(nodes, demands, current).devices_used() == 2
    assert consolidate(nodes, demands, current, max_moves=0).devices_used() == 2
    merged = consolidate(nodes, demands, current, max_moves=1)
    assert merged.devices_used() == 1 and sum(not a.kept for a in merged.assignments) == 1


def test_a_short_run_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "new" / "dir"
    assert main(["--events", "60", "--models", "20", "--nodes", "20", "--out", str(out)]) == 0
    data = json.loads((out / "churn.json").read_text())
    assert data["provenance"]["command"].startswith("vnpu bench churn")
    sticky, draining, consolidating = data["summary"]
    assert sticky["policy"] == "sticky" and sticky["moves_total"] == 0
    assert consolidating["events"] == 60 and len(data["steps"]) == 60
    assert data["steps"][-1]["fresh_devices"] >= 1
    # The extra devices split into extra weight copies and extra free room, against the fresh repack.
    extra = sticky["devices_at_end"] - sticky["fresh_repack_devices_at_end"]
    split = sticky["extra_weights_in_devices"] + sticky["extra_free_in_devices"]
    assert abs(split - extra) <= 0.11  # both place every replica: their replica slices are equal
    assert sticky["weight_copies"] >= 1 and sticky["fresh_weight_copies"] >= 1
    assert (out / "churn.png").stat().st_size > 10_000 and (out / "churn.md").exists()
    assert 0 < sticky["floor_with_goal_moves_left"] <= sticky["ratio_at_end"]
    # The end pass spends at most the moves the goal leaves, never loses ground, and never beats the floor.
    assert draining["policy"] == "draining" and data["settings"]["drain_max_moves"] == 10
    for row in data["steps"]:
        assert row["draining_moves"] <= 10  # a batch moves at most --drain-max-moves replicas
    for s in (sticky, draining, consolidating):
        # The operator's batches from the end state never lose ground.
        assert s["drain_batches_ratio"] <= s["ratio_at_end"]
        assert s["drain_batches_moves"] <= 10 * s["drain_batches"]
        limit = max(s["moves_total"], int(0.05 * s["replicas_at_end"]))
        assert s["moves_total"] + s["end_pass_moves"] <= limit
        assert s["floor_with_goal_moves_left"] <= s["end_pass_ratio"] <= s["ratio_at_end"]
        # A defragmenting repack reaches the fresh repack's devices, at most restarting every replica.
        assert s["defragment_ratio"] <= s["ratio_at_end"]
        assert 0 <= s["defragment_moves"] <= s["replicas_at_end"]
        # The price curve drains more devices at each point, up to the goal or every device.
        curve = data["price_curves"][s["policy"]]
        assert [p["drained"] for p in curve] == sorted({p["drained"] for p in curve})
        assert curve[-1]["ratio"] <= 1.05 or curve[-1]["drained"] >= s["devices_at_end"]
        met = [p["moves"] for p in curve if p["ratio"] <= 1.05]
        assert s["drain_moves_to_goal_ratio"] == (met[0] if met else None)


def test_the_devices_floor_counts_only_weight_copies_moves_can_empty():
    nodes = [Node("n", tuple(Device(f"d{i}", 16) for i in range(2)))]
    demands = [Demand("a", "g", 2, 2 * 1024, 10 * 1024)]
    # Two copies of one group's 10-slice weights, one 2-slice replica each: 24 slices on 2 devices.
    plan = pack(nodes, demands, [Placement("a", 0, "n", "d0", 2), Placement("a", 1, "n", "d1", 2)])
    assert plan.devices_used() == 2 and len(plan.weight_holders) == 2
    assert devices_floor(plan, 0, 16) == 2
    assert devices_floor(plan, 1, 16) == 1  # one move empties a copy: 14 slices fit one device
    assert devices_floor(pack(nodes, demands), 5, 16) == 1  # one copy left: nothing more to empty


def test_the_devices_floor_counts_the_devices_moves_can_empty():
    """Six 1-slice replicas, two on each of three devices: they fit one device, but emptying a device
    takes two moves."""
    nodes = [Node("n", tuple(Device(f"d{i}", 16) for i in range(3)))]
    demands = [Demand("a", "g", 6, 1024, 0)]
    plan = pack(nodes, demands, [Placement("a", r, "n", f"d{r // 2}", 1) for r in range(6)])
    assert plan.devices_used() == 3
    assert [devices_floor(plan, m, 16) for m in (0, 1, 2, 3, 4, 6)] == [3, 3, 2, 2, 1, 1]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(0, 12), st.integers(0, 2)),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 2**16),
)
def test_no_plan_reached_with_m_moves_beats_the_devices_floor(models, seed):
    """The floor is a bound: a fresh repack, reached with however many moves it makes, never uses fewer
    devices than the floor for that many moves from the plan it left."""
    nodes = [Node(f"n{i}", tuple(Device(f"d{j}", 32) for j in range(4))) for i in range(2)]
    demands = [
        Demand(f"m{i}", f"g{group}", replicas, replica_gib * 1024, weight_gib * 1024)
        for i, (replicas, replica_gib, weight_gib, group) in enumerate(models)
    ]
    # A drifted running plan: the demands placed one at a time, in a seeded order.
    order = random.Random(seed).sample(demands, len(demands))
    current: list[Placement] = []
    for i in range(len(order)):
        current = pack(nodes, order[: i + 1], current).placements()
    sticky = pack(nodes, demands, current)
    fresh = pack(nodes, demands, current, defragment=True)
    if sticky.unplaced or fresh.unplaced:
        return
    moves = fresh.moved_from(sticky.placements())
    assert fresh.devices_used() >= devices_floor(sticky, moves, 32)
    assert devices_floor(sticky, moves, 32) <= sticky.devices_used()
