"""bench/churn.py: the trace is seeded, and a short run writes its results with provenance."""

from __future__ import annotations

import json

from vnpu.bench.churn import main, trace
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
    sticky, consolidating = data["summary"]
    assert sticky["policy"] == "sticky" and sticky["moves_total"] == 0
    assert consolidating["events"] == 60 and len(data["steps"]) == 60
    assert data["steps"][-1]["fresh_devices"] >= 1
    # The extra devices split into extra weight copies and extra free room, against the fresh repack.
    extra = sticky["devices_at_end"] - sticky["fresh_repack_devices_at_end"]
    split = sticky["extra_weights_in_devices"] + sticky["extra_free_in_devices"]
    assert abs(split - extra) <= 0.11  # both place every replica: their replica slices are equal
    assert sticky["weight_copies"] >= 1 and sticky["fresh_weight_copies"] >= 1
    assert (out / "churn.png").stat().st_size > 10_000 and (out / "churn.md").exists()
