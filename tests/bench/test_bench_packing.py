"""bench/packing.py: its baselines and exact optimum on hand-checked instances, vnpu against the
optimum on seeded mixes, and a smoke run of ``vnpu bench packing --quick``."""

from __future__ import annotations

import json
import random

from vnpu.bench.configuration_lp import configuration_lp
from vnpu.bench.packing import (
    cluster_for,
    counting_lower_bound,
    exact_optimum,
    ffd_without_sharing,
    kubernetes_most_allocated,
    main,
    make_mix,
)
from vnpu.operator.packing import Demand, pack

GIB = 1024


def test_baselines_on_a_hand_checked_instance():
    # 64-slice devices; weights 28 + 6 per replica: shared, 6 replicas fit one device (28 + 36 = 64);
    # share-blind, each replica takes 34 slices, so one per device.
    demands = [Demand("m", "g", 6, 6 * GIB, 28 * GIB)]
    assert ffd_without_sharing(demands, 100, 64) == (6, 0)
    assert ffd_without_sharing(demands, 4, 64) == (4, 2)
    # Share-blind bin-packing: one 34-slice pod per 64-slice device, 6 devices (8 on the node).
    assert kubernetes_most_allocated(demands, 1, 64, seed=0) == (6, 0, 0)
    assert (
        kubernetes_most_allocated(demands, 1, 64, seed=0)[0] >= exact_optimum(demands, 64, 6, 10)["devices"]
    )
    assert counting_lower_bound(demands, 64) == 1
    assert exact_optimum(demands, 64, 6, 10)["devices"] == 1
    assert pack(cluster_for(8, 64), demands).devices_used() == 1


def test_most_allocated_packs_onto_the_fullest_node_and_counts_what_it_cannot_place():
    demands = [Demand("m", "g", 4, 2 * GIB, 2 * GIB)]
    assert kubernetes_most_allocated(demands, 4, 64, seed=1) == (1, 0, 0)  # 4 x 4 slices on one device
    big = [Demand("m", "g", 3, 30 * GIB, 30 * GIB)]  # 60 slices each: one per device
    assert kubernetes_most_allocated(big, 1, 64, seed=1)[:2] == (3, 0)
    tiny = [Demand("m", "g", 10, 30 * GIB, 30 * GIB)]
    assert kubernetes_most_allocated(tiny, 1, 64, seed=1) == (8, 2, 120)


def test_the_counting_bound_is_below_the_optimum():
    rng = random.Random(7)
    for i in range(6):
        mix = make_mix(rng, f"b{i}", models=rng.randint(2, 5), max_replicas=6, device_gib=32)
        optimum = exact_optimum(mix.demands, 32, pack(cluster_for(64, 32), mix.demands).devices_used(), 20)
        assert optimum["proven_optimal"] and counting_lower_bound(mix.demands, 32) <= optimum["devices"]


def test_exact_optimum_splits_groups_to_fill_gaps():
    # Two 32-slice devices: A (20 + 4) and B (2 + 3 x 2): A alone leaves 8, B needs 8 with one copy.
    demands = [
        Demand("a", "ga", 1, 4 * GIB, 20 * GIB),
        Demand("b", "gb", 3, 2 * GIB, 2 * GIB),
        Demand("c", "gc", 1, 30 * GIB, 0),
    ]
    result = exact_optimum(demands, 32, 3, 10)
    assert result["proven_optimal"] and result["devices"] == 2


def test_vnpu_and_the_configuration_lp_match_the_exact_optimum_on_seeded_mixes():
    rng = random.Random(2024)
    for i in range(12):
        mix = make_mix(
            rng,
            f"t{i}",
            models=rng.randint(2, 6),
            max_replicas=rng.choice([4, 8]),
            device_gib=rng.choice([32, 64]),
        )
        plan = pack(cluster_for(64, mix.device_gib), mix.demands)
        optimum = exact_optimum(mix.demands, mix.device_gib, plan.devices_used(), 20)
        assert optimum["proven_optimal"], mix
        assert plan.devices_used() == optimum["devices"], mix
        configurations = configuration_lp(mix.demands, mix.device_gib)  # a second, independent proof
        assert configurations["proven_optimal"], (mix, configurations)
        assert configurations["devices"] == configurations["lower_bound"] == optimum["devices"], mix
        assert configurations["lp"] <= optimum["devices"] + 1e-6


def test_quick_run_writes_json_table_and_plot(tmp_path, capsys):
    assert main(["--quick", "--runs", "1", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "packing.json").read_text())
    assert data["scale"]["replicas"] == 10_000 and data["scale"]["devices"] == 8000
    assert len(data["mixes"]) == 3 and all("optimum" in m for m in data["mixes"])
    assert all(m["lower_bound"] >= 1 and "gap" in m for m in data["mixes"])
    assert data["provenance"]["command"].startswith("vnpu bench packing") and data["provenance"]["commit"]
    assert (tmp_path / "packing.png").stat().st_size > 10_000
    assert "vnpu/opt" in (tmp_path / "packing.md").read_text()
    assert "wrote" in capsys.readouterr().out
