"""vnpu.operator.packing: the share-aware packer (pure): scenarios and hypothesis properties."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vnpu.api import slices_for_mib
from vnpu.operator.packing import (
    Demand,
    Device,
    Node,
    PackResult,
    Placement,
    Reason,
    Spread,
    Taint,
    Toleration,
    consolidate,
    drain,
    pack,
)

GIB = 1024


def cluster(n_nodes: int, devices: int = 8, slices: int = 64, **node_kwargs) -> list[Node]:
    return [
        Node(f"node-{i}", tuple(Device(f"npu{j}", slices) for j in range(devices)), **node_kwargs)
        for i in range(n_nodes)
    ]


def per_device(result: PackResult) -> dict[tuple[str, str], int]:
    return result.slices_by_device()


# ------------------------------------------------------------------------------------------ sharing


def test_replicas_of_a_group_share_one_weight_copy_per_device():
    result = pack(
        cluster(1, devices=2), [Demand("m", "g", replicas=4, replica_mib=2 * GIB, weight_mib=10 * GIB)]
    )
    assert {a.device for a in result.assignments} == {"npu0"}
    assert [a.slices for a in result.assignments] == [2, 2, 2, 2]
    assert [h.slices for h in result.weight_holders] == [10]
    assert result.weight_holders[0].models == ("m",)
    assert sum(a.weight_holder for a in result.assignments) == 1
    assert result.slices_used() == 10 + 4 * 2
    assert result.saved_by_sharing_mib([Demand("m", "g", 4, 2 * GIB, 10 * GIB)]) == {"m": 30 * GIB}


def test_models_with_the_same_share_group_share_weights():
    demands = [Demand("chat", "llama", 2, 3 * GIB, 16 * GIB), Demand("batch", "llama", 3, 5 * GIB, 16 * GIB)]
    result = pack(cluster(1, devices=4), demands)
    assert result.devices_used() == 1
    assert len(result.weight_holders) == 1 and result.weight_holders[0].models == ("batch", "chat")
    assert result.slices_used() == 16 + 2 * 3 + 3 * 5


def test_a_group_whose_weights_are_loaded_pays_only_its_replicas_there():
    """``Device.loaded``: a holder outside the problem (its slices not free) already has the group's
    weights on the device, so the group's replicas take only their own slices there, and taking them
    off again never frees those weights (they stay held)."""
    demand = Demand("m", "g", replicas=10, replica_mib=GIB, weight_mib=4 * GIB)
    loaded = [Node("n", (Device("npu0", 16, free_slices=12, loaded=frozenset({"g"})),))]
    result = pack(loaded, [demand])
    assert [a.device for a in result.assignments] == ["npu0"] * 10 and result.unplaced == ()
    # The holder is the one already there: the plan names it, so replicas map it.
    assert [(h.device, h.slices) for h in result.weight_holders] == [("npu0", 4)]
    # Without the flag the same room holds the weights and 8 replicas.
    plain = pack([Node("n", (Device("npu0", 16, free_slices=12),))], [demand])
    assert len(plain.assignments) == 8 and len(plain.unplaced) == 2
    # A higher-priority model preempting every replica there gets their slices, not the weights.
    urgent = Demand("u", "other", replicas=1, replica_mib=12 * GIB, priority=10)
    kept = result.placements()
    preempted = pack(loaded, [demand, urgent], kept)
    assert [a.model for a in preempted.assignments] == ["u"] and len(preempted.unplaced) == 10
    too_big = pack(loaded, [demand, replace(urgent, replica_mib=13 * GIB)], kept)
    assert [u.model for u in too_big.unplaced] == ["u"] and len(too_big.assignments) == 10
    # Other groups pay their weights there as usual.
    other = pack(loaded, [Demand("o", "h", replicas=1, replica_mib=GIB, weight_mib=4 * GIB)])
    assert other.slices_used() == 5 and [h.share_group for h in other.weight_holders] == ["h"]


def test_a_group_overflowing_one_device_opens_a_second_copy():
    # 64-slice devices: weights 28 + 6 per replica -> 6 replicas per device.
    result = pack(cluster(1, devices=4), [Demand("m", "g", 8, 6 * GIB, 28 * GIB)])
    assert result.devices_used() == 2
    assert sorted(Counter(a.device for a in result.assignments).values()) == [2, 6]
    assert len(result.weight_holders) == 2


def test_zero_weight_models_get_no_weight_holder():
    result = pack(cluster(1), [Demand("m", "g", 3, 4 * GIB, 0)])
    assert result.weight_holders == () and len(result.assignments) == 3


def test_mixed_slice_sizes_are_converted_per_device():
    nodes = [
        Node("fine", (Device("a", 16, slice_mib=512),)),
        Node("coarse", (Device("b", 8, slice_mib=1024),)),
    ]
    result = pack(nodes, [Demand("m", "g", 2, 1536, 2048, node_selector={})])
    for a in result.assignments:
        size = 512 if a.node == "fine" else 1024
        assert a.slices == slices_for_mib(1536, size)
    assert not result.unplaced


# ------------------------------------------------------------------------------ selectors and taints


def test_node_selector_and_its_reason():
    nodes = [
        Node("a", (Device("d", 64),), labels={"zone": "x"}),
        Node("b", (Device("d", 64),), labels={"zone": "y"}),
    ]
    ok = pack(nodes, [Demand("m", "g", 2, GIB, GIB, node_selector={"zone": "y"})])
    assert {a.node for a in ok.assignments} == {"b"}
    bad = pack(nodes, [Demand("m", "g", 2, GIB, GIB, node_selector={"zone": "z"})])
    assert [u.replica for u in bad.unplaced] == [0, 1]
    assert bad.unplaced[0].code == Reason.NODE_SELECTOR
    assert "no node matches nodeSelector {'zone': 'z'}" in bad.unplaced[0].reason


def test_taints_need_tolerations():
    gpu = Taint("dedicated", "llm", "NoSchedule")
    nodes = [
        Node("tainted", (Device("d", 64),), taints=(gpu,)),
        Node("soft", (Device("d", 64),), taints=(Taint("x", "", "PreferNoSchedule"),)),
    ]
    result = pack(nodes, [Demand("m", "g", 1, GIB, GIB, node_selector={})])
    assert result.assignments[0].node == "soft"  # PreferNoSchedule does not exclude
    only_tainted = pack(nodes[:1], [Demand("m", "g", 1, GIB, GIB)])
    assert only_tainted.unplaced[0].code == Reason.TAINTED
    assert "dedicated=llm:NoSchedule" in only_tainted.unplaced[0].reason
    for tol in (
        Toleration("dedicated", "Equal", "llm", "NoSchedule"),
        Toleration("dedicated", "Exists"),
        Toleration(operator="Exists"),
    ):
        assert pack(nodes[:1], [Demand("m", "g", 1, GIB, GIB, tolerations=(tol,))]).assignments
    for tol in (
        Toleration("dedicated", "Equal", "other"),
        Toleration("dedicated", "Exists", effect="NoExecute"),
    ):
        assert pack(nodes[:1], [Demand("m", "g", 1, GIB, GIB, tolerations=(tol,))]).unplaced


def test_no_execute_taint_evicts_running_replicas_no_schedule_does_not():
    demand = Demand("m", "g", 1, GIB, GIB)
    running = [Placement("m", 0, "a", "d", 1)]
    for effect, kept in (("NoSchedule", True), ("NoExecute", False)):
        nodes = [
            Node("a", (Device("d", 64),), taints=(Taint("k", "v", effect),)),
            Node("b", (Device("d", 64),)),
        ]
        result = pack(nodes, [demand], running)
        assert result.assignments[0].kept is kept
        assert result.assignments[0].node == ("a" if kept else "b")
        assert bool(result.dropped) is not kept


# ------------------------------------------------------------------------------------------- reasons


def test_insufficient_memory_message_names_the_numbers():
    nodes = [Node("a", (Device("d", 16, free_slices=6),))]
    result = pack(nodes, [Demand("m", "g", 1, 4 * GIB, 5 * GIB)])
    u = result.unplaced[0]
    assert u.code == Reason.INSUFFICIENT_MEMORY
    assert (
        u.reason == "insufficient memory: needs 9 slices (4 per replica + 5 for the weights), largest free 6"
    )
    assert (u.replica_mib, u.weight_mib) == (4 * GIB, 5 * GIB)


def test_device_too_small_and_no_nodes():
    result = pack(cluster(1, devices=1, slices=32), [Demand("m", "g", 1, 8 * GIB, 28 * GIB)])
    assert result.unplaced[0].code == Reason.DEVICE_TOO_SMALL
    assert "the largest eligible device has 32" in result.unplaced[0].reason
    assert pack([], [Demand("m", "g", 1, GIB)]).unplaced[0].code == Reason.NO_NODES


def test_unhealthy_devices_and_unready_nodes_are_skipped():
    nodes = [
        Node("a", (Device("d0", 64, healthy=False), Device("d1", 64))),
        Node("b", (Device("d0", 64),), ready=False),
        Node("c", (Device("d0", 64),), schedulable=False),
    ]
    result = pack(nodes, [Demand("m", "g", 7, 10 * GIB, 0)])
    assert {(a.node, a.device) for a in result.assignments} == {("a", "d1")}
    assert len(result.assignments) == 6 and len(result.unplaced) == 1


# -------------------------------------------------------------------------------------------- spread


def test_best_effort_spread_uses_distinct_nodes_first():
    demand = Demand("m", "g", 5, 2 * GIB, 4 * GIB, spread=Spread.BEST_EFFORT)
    result = pack(cluster(3), [demand])
    assert sorted(Counter(a.node for a in result.assignments).values()) == [1, 2, 2]
    unspread = pack(cluster(3), [replace(demand, spread=Spread.NONE)])
    assert len({a.node for a in unspread.assignments}) == 1  # packed: one device, one weight copy


def test_hard_spread_leaves_extra_replicas_unplaced():
    result = pack(cluster(3), [Demand("m", "g", 5, 2 * GIB, 4 * GIB, spread=Spread.HARD)])
    assert len({a.node for a in result.assignments}) == 3 == len(result.assignments)
    assert [u.code for u in result.unplaced] == [Reason.SPREAD, Reason.SPREAD]


def test_spread_prefers_devices_already_holding_the_group():
    nodes = cluster(2, devices=2)
    demands = [
        Demand("a", "shared", 2, 2 * GIB, 20 * GIB),
        Demand("b", "shared", 2, 2 * GIB, 20 * GIB, spread=Spread.BEST_EFFORT),
    ]
    current = [Placement("a", 0, "node-0", "npu1", 2), Placement("a", 1, "node-1", "npu0", 2)]
    result = pack(nodes, demands, current)
    by_model = result.by_model()
    assert {(a.node, a.device) for a in by_model["b"]} == {("node-0", "npu1"), ("node-1", "npu0")}
    assert len(result.weight_holders) == 2


# ------------------------------------------------------------------------------------------ priority


def test_higher_priority_is_placed_first_whatever_the_names():
    nodes = cluster(1, devices=1, slices=16)
    for low, high in (("a", "z"), ("z", "a")):
        demands = [
            Demand(low, low, 1, 10 * GIB, 0, priority=0),
            Demand(high, high, 1, 10 * GIB, 0, priority=5),
        ]
        result = pack(nodes, demands)
        assert [a.model for a in result.assignments] == [high]
        assert [u.model for u in result.unplaced] == [low]


def test_higher_priority_preempts_running_lower_priority():
    nodes = cluster(1, devices=1, slices=16)
    demands = [
        Demand("low", "l", 1, 10 * GIB, 0, priority=0),
        Demand("high", "h", 1, 10 * GIB, 0, priority=9),
    ]
    result = pack(nodes, demands, [Placement("low", 0, "node-0", "npu0", 10)])
    assert [a.model for a in result.assignments] == ["high"]
    assert [u.model for u in result.unplaced] == ["low"]
    assert result.dropped[0].reason == "preempted by high (priority 9)"
    no_preempt = pack(nodes, demands, [Placement("low", 0, "node-0", "npu0", 10)], preempt=False)
    assert [a.model for a in no_preempt.assignments] == ["low"]


def test_a_priority_preempts_only_its_own_tenants_replicas():
    """A priority is its tenant's own to set: it orders that tenant's demand, and never evicts another
    tenant's running replica, however low that one's priority."""
    nodes = cluster(1, devices=1, slices=16)
    running = [Placement("b/low", 0, "node-0", "npu0", 10)]
    other = [
        Demand("b/low", "l", 1, 10 * GIB, 0, priority=-1000, tenant="b"),
        Demand("a/high", "h", 1, 10 * GIB, 0, priority=1000, tenant="a"),
    ]
    result = pack(nodes, other, running)
    assert [a.model for a in result.assignments] == ["b/low"] and not result.dropped
    assert [u.model for u in result.unplaced] == ["a/high"]
    own = [replace(other[0], tenant="a"), other[1]]
    result = pack(nodes, own, running)
    assert [a.model for a in result.assignments] == ["a/high"]
    assert result.dropped[0].reason == "preempted by a/high (priority 1000)"


# ----------------------------------------------------------------------------------------- stability


def test_running_replicas_stay_put():
    demands = [Demand("a", "ga", 3, 4 * GIB, 8 * GIB), Demand("b", "gb", 2, 2 * GIB, 2 * GIB)]
    # A deliberately poor current layout: every replica on its own device.
    current = [Placement("a", i, "node-0", f"npu{i}", 4) for i in range(3)]
    current += [Placement("b", i, "node-1", f"npu{i}", 2) for i in range(2)]
    result = pack(cluster(2), demands, current)
    assert all(a.kept for a in result.assignments) and not result.dropped
    assert result.devices_used() == 5
    defragmented = pack(cluster(2), demands, current, defragment=True)
    assert defragmented.devices_used() == 1
    assert {d.reason for d in defragmented.dropped} == {"moved by defragmentation"}
    assert sum(a.kept for a in defragmented.assignments) == 5 - len(defragmented.dropped)
    assert sum(a.kept for a in defragmented.assignments) >= 1  # index matching keeps some in place


def test_scale_down_drops_the_highest_indices_and_scale_up_adds_next_to_the_group():
    current = [Placement("m", i, "node-0", "npu0", 2) for i in range(4)]
    down = pack(cluster(1), [Demand("m", "g", 2, 2 * GIB, 10 * GIB)], current)
    assert [a.replica for a in down.assignments] == [0, 1] and all(a.kept for a in down.assignments)
    assert [(d.placement.replica, d.reason) for d in down.dropped] == [
        (2, "scaled down to 2 replicas"),
        (3, "scaled down to 2 replicas"),
    ]
    up = pack(cluster(1), [Demand("m", "g", 6, 2 * GIB, 10 * GIB)], current)
    assert {a.device for a in up.assignments} == {"npu0"}
    assert [a.kept for a in up.assignments] == [True] * 4 + [False] * 2


def test_replicas_on_lost_capacity_are_replaced():
    current = [Placement("m", 0, "node-0", "npu0", 2), Placement("m", 1, "node-1", "npu0", 2)]
    nodes = cluster(3, devices=1)
    nodes[0] = replace(nodes[0], devices=(Device("npu0", 64, healthy=False),))
    nodes[1] = replace(nodes[1], ready=False)
    result = pack(nodes, [Demand("m", "g", 2, 2 * GIB, 4 * GIB)], current)
    assert {a.node for a in result.assignments} == {"node-2"}
    assert sorted(d.reason for d in result.dropped) == [
        "device npu0 is unhealthy",
        "node node-1 is not ready",
    ]
    gone = pack(cluster(1, devices=1), [Demand("m", "g", 2, 2 * GIB, 4 * GIB)], current)
    assert "node-1" in {d.placement.node for d in gone.dropped}


def test_changed_replica_size_is_replaced_and_cordon_keeps():
    current = [Placement("m", 0, "node-0", "npu0", 2)]
    resized = pack(cluster(1), [Demand("m", "g", 1, 3 * GIB, 4 * GIB)], current)
    assert resized.assignments[0].slices == 3 and not resized.assignments[0].kept
    assert "per-replica memory changed" in resized.dropped[0].reason
    cordoned = pack(cluster(1, schedulable=False), [Demand("m", "g", 2, 2 * GIB, 4 * GIB)], current)
    assert [a.kept for a in cordoned.assignments] == [True]
    assert cordoned.unplaced[0].code == Reason.NO_ELIGIBLE_NODE and "cordoned" in cordoned.unplaced[0].reason


def test_a_replica_not_yet_scheduled_on_a_node_cordoned_since_is_placed_again():
    """A running replica stays on a cordoned node (the drain evicts it, one at a time under its
    budget); one the scheduler has yet to bind there never will be, and it pinned its holder there too
    (the holder's budget held the drain for ever). It is a new pod still: placed again elsewhere."""
    nodes = [*cluster(1, schedulable=False), Node("node-1", (Device("npu0", 64),))]
    demand = [Demand("m", "g", 1, 2 * GIB, 4 * GIB)]
    running = pack(nodes, demand, [Placement("m", 0, "node-0", "npu0", 2)])
    assert [(a.node, a.kept) for a in running.assignments] == [("node-0", True)]
    waiting = pack(nodes, demand, [Placement("m", 0, "node-0", "npu0", 2, bound=False)])
    assert [(a.node, a.kept) for a in waiting.assignments] == [("node-1", False)]
    assert "not scheduled yet" in waiting.dropped[0].reason


def test_current_placements_count_against_capacity():
    nodes = [Node("a", (Device("d", 16),))]
    current = [Placement("x", 0, "a", "d", 8)]
    result = pack(
        nodes, [Demand("x", "gx", 1, 8 * GIB, 4 * GIB), Demand("y", "gy", 1, 4 * GIB, 1 * GIB)], current
    )
    assert result.assignments[0].kept and [u.model for u in result.unplaced] == ["y"]


def test_share_blind_mode_carries_weights_in_every_replica():
    demands = [Demand("m", "g", 4, 2 * GIB, 10 * GIB)]
    blind = pack(cluster(1), demands, share_weights=False)
    assert blind.weight_holders == () and [a.slices for a in blind.assignments] == [12] * 4
    assert blind.devices_used() == 1 and blind.slices_used() == 48
    assert blind.saved_by_sharing_mib(demands) == {"m": 0}
    assert pack(cluster(1), demands).slices_used() == 18


def test_mixed_exclusions_are_listed_like_the_scheduler_does():
    nodes = [
        Node("a", (Device("d", 64),), labels={"zone": "x"}),
        Node("b", (Device("d", 64),), labels={"zone": "y"}, taints=(Taint("gpu", "", "NoSchedule"),)),
        Node("c", (Device("d", 64),), labels={"zone": "y"}, ready=False),
    ]
    u = pack(nodes, [Demand("m", "g", 1, GIB, node_selector={"zone": "y"})]).unplaced[0]
    assert u.code == Reason.NO_ELIGIBLE_NODE
    assert u.reason == (
        "0/3 nodes are available: 1 didn't match nodeSelector, 1 had untolerated taints {gpu:NoSchedule}, "
        "1 not ready"
    )


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="node names"):
        pack(cluster(1) + cluster(1), [])
    with pytest.raises(ValueError, match="models must be unique"):
        pack(cluster(1), [Demand("m", "g", 1, 1), Demand("m", "h", 1, 1)])
    with pytest.raises(ValueError, match="twice"):
        pack([Node("a", (Device("d", 1), Device("d", 1)))], [])
    with pytest.raises(ValueError, match="non-negative"):
        pack(cluster(1), [Demand("m", "g", -1, 1)])


def test_defragmentation_renames_the_new_plan_onto_running_devices():
    """Two half-empty devices (what deletions leave): the repack needs one, and names it after one of
    them, so one replica restarts, not both."""
    demands = [Demand("a", "ga", 1, 6 * GIB, 0), Demand("b", "gb", 1, 6 * GIB, 0)]
    current = [Placement("a", 0, "node-1", "npu3", 6), Placement("b", 0, "node-0", "npu5", 6)]
    merged = pack(cluster(2, slices=16), demands, current, defragment=True)
    assert merged.devices_used() == 1 and merged.moved_from(current) == 1
    assert {(a.node, a.device) for a in merged.assignments} < {("node-1", "npu3"), ("node-0", "npu5")}


def test_defragmentation_keeps_hard_spread_on_distinct_nodes_when_renaming():
    demands = [Demand("s", "gs", 2, 2 * GIB, 0, spread=Spread.HARD), Demand("a", "ga", 4, 2 * GIB, 0)]
    # A drifted layout: "a" spread over four devices, "s" on npu1 of each node.
    current = [Placement("s", i, f"node-{i}", "npu1", 2) for i in range(2)]
    current += [Placement("a", i, f"node-{i % 2}", f"npu{2 + i}", 2) for i in range(4)]
    merged = pack(cluster(2, devices=6, slices=16), demands, current, defragment=True)
    check_invariants(cluster(2, devices=6, slices=16), demands, merged, current)
    assert merged.devices_used() < pack(cluster(2, devices=6, slices=16), demands, current).devices_used()
    assert len({a.node for a in merged.assignments if a.model == "s"}) == 2


def test_hard_spread_holds_when_the_share_blind_plan_drops_a_kept_replica():
    """Regression (found by the defragmentation property): the share-blind run (B) dropped a kept
    hard-spread replica, placed a new one on that node, and its placement was copied into the
    share-aware run that had kept the first: two replicas of a hard-spread model on one node."""
    nodes = [
        Node("n0", (Device("d0", 8), Device("d1", 16), Device("d2", 64, free_slices=36))),
        Node("n1", (Device("d0", 32),)),
        Node("n2", (Device("d0", 8), Device("d1", 8), Device("d2", 64))),
    ]
    demands = [
        Demand("m0", "g1", 4, 5632, 11776, spread=Spread.BEST_EFFORT),
        Demand("m1", "g0", 3, 512, 7680, spread=Spread.HARD),
    ]
    current = [
        Placement("m0", i, node, dev, 6)
        for i, (node, dev) in enumerate(
            [("n0", "d2"), ("n0", "d2"), ("n1", "d0"), ("n1", "d0"), ("n2", "d2")]
        )
    ]
    current += [Placement("m1", 0, "n0", "d2", 1), Placement("m1", 1, "n2", "d2", 1)]
    result = pack(nodes, demands, current)
    check_invariants(nodes, demands, result, current)
    assert [u.replica for u in result.unplaced] == [2]


# ------------------------------------------------------------------------------------------ properties

LABELS = [{}, {"zone": "a"}, {"zone": "b"}, {"zone": "a", "pool": "big"}]
TAINTS = [(), (Taint("dedicated", "llm"),), (Taint("maint", "", "NoExecute"),)]
TOLERATIONS = [(), (Toleration("dedicated", "Exists"),), (Toleration(operator="Exists"),)]


@st.composite
def instances(draw, *, uniform: bool = False, allow_spread: bool = True):
    """A small random cluster and demand set; ``uniform``: healthy, ready nodes without labels or taints
    and one slice size (so slice counts compare across plans)."""
    nodes = []
    for i in range(draw(st.integers(1, 4))):
        devices = []
        for j in range(draw(st.integers(1, 3))):
            total = draw(st.sampled_from([8, 16, 32, 64]))
            slice_mib = 1024 if uniform else draw(st.sampled_from([1024, 1024, 512]))
            devices.append(
                Device(
                    f"d{j}",
                    total,
                    slice_mib=slice_mib,
                    healthy=draw(st.booleans()) or uniform,
                    free_slices=draw(st.integers(0, total)) if draw(st.booleans()) else None,
                )
            )
        nodes.append(
            Node(
                f"n{i}",
                tuple(devices),
                labels={} if uniform else draw(st.sampled_from(LABELS)),
                taints=() if uniform else draw(st.sampled_from(TAINTS)),
                ready=uniform or draw(st.integers(0, 5)) > 0,
                schedulable=uniform or draw(st.integers(0, 5)) > 0,
            )
        )
    demands = []
    for k in range(draw(st.integers(1, 6))):
        group = f"g{draw(st.integers(0, 3))}"
        demands.append(
            Demand(
                model=f"m{k}",
                share_group=group,
                replicas=draw(st.integers(0, 8)),
                replica_mib=draw(st.integers(1, 12)) * 512,
                weight_mib=draw(st.integers(0, 40)) * 512,
                priority=draw(st.integers(-1, 1)),
                node_selector={} if uniform else draw(st.sampled_from([{}, {}, {"zone": "a"}])),
                tolerations=() if uniform else draw(st.sampled_from(TOLERATIONS)),
                spread=draw(st.sampled_from(list(Spread))) if allow_spread else Spread.NONE,
            )
        )
    return nodes, demands


def check_invariants(
    nodes: list[Node], demands: list[Demand], result: PackResult, current: list[Placement] = ()
) -> None:
    node_of = {n.name: n for n in nodes}
    device_of = {(n.name, d.id): d for n in nodes for d in n.devices}
    demand_of = {d.model: d for d in demands}
    group_mib: dict[str, int] = defaultdict(int)
    for d in demands:
        group_mib[d.share_group] = max(group_mib[d.share_group], d.weight_mib)
    # No device over capacity (what is free for the packer).
    for key, used in per_device(result).items():
        assert used <= device_of[key].available, (key, used)
    # Every replica is placed exactly once or reported unplaced with a reason.
    placed = Counter((a.model, a.replica) for a in result.assignments)
    unplaced = Counter((u.model, u.replica) for u in result.unplaced)
    assert max(placed.values(), default=1) == 1 and max(unplaced.values(), default=1) == 1
    assert not set(placed) & set(unplaced)
    # Each model has exactly its replica count of distinct indices: below the count, or kept from
    # ``current`` (a scale-down keeps its survivors' indices).
    kept_indices = {(p.model, p.replica) for p in current}
    for d in demands:
        mine = {r for m, r in set(placed) | set(unplaced) if m == d.model}
        assert len(mine) == d.replicas, (d.model, mine)
        assert all(r < d.replicas or (d.model, r) in kept_indices for r in mine)
    assert all(u.reason and u.code in Reason for u in result.unplaced)
    running = {(p.model, p.replica, p.node, p.device) for p in current}
    for a in result.assignments:
        d, node, dev = demand_of[a.model], node_of[a.node], device_of[(a.node, a.device)]
        assert a.slices == slices_for_mib(d.replica_mib, dev.slice_mib)
        assert dev.healthy and node.ready
        assert all(node.labels.get(k) == v for k, v in d.node_selector.items())
        for taint in node.taints:
            tolerated = any(t.tolerates(taint) for t in d.tolerations)
            if taint.effect == "NoExecute" or (taint.effect == "NoSchedule" and not a.kept):
                assert tolerated, (a, taint)
        if not a.kept:
            assert node.schedulable
        else:
            assert (a.model, a.replica, a.node, a.device) in running
    # Weight-holders: exactly one per (device, group) with replicas and weights, of the right size.
    groups_on = {(a.node, a.device, a.share_group) for a in result.assignments}
    holders = {(h.node, h.device, h.share_group): h for h in result.weight_holders}
    assert set(holders) == {k for k in groups_on if group_mib[k[2]] > 0}
    for (node, device, group), h in holders.items():
        assert h.slices == slices_for_mib(group_mib[group], device_of[(node, device)].slice_mib)
    charged = Counter((a.node, a.device, a.share_group) for a in result.assignments if a.weight_holder)
    assert charged == Counter(groups_on)
    # Hard spread: one replica per node.
    for d in demands:
        if d.spread == Spread.HARD:
            nodes_used = [a.node for a in result.assignments if a.model == d.model]
            assert len(nodes_used) == len(set(nodes_used))


def shuffled(nodes: list[Node], demands: list[Demand], current: list[Placement], seed: int):
    rng = random.Random(seed)
    nodes = [
        replace(
            n,
            devices=tuple(rng.sample(n.devices, len(n.devices))),
            labels=dict(rng.sample(sorted(n.labels.items()), len(n.labels))),
        )
        for n in nodes
    ]
    return rng.sample(nodes, len(nodes)), rng.sample(demands, len(demands)), rng.sample(current, len(current))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.integers(0, 2**32), st.booleans())
def test_property_invariants_and_determinism(instance, seed, defragment):
    nodes, demands = instance
    first = pack(nodes, demands)
    check_invariants(nodes, demands, first)
    # Re-pack a perturbed demand set with the first plan as the running state.
    rng = random.Random(seed)
    changed = [replace(d, replicas=max(0, d.replicas + rng.randint(-2, 2))) for d in demands]
    current = first.placements()
    second = pack(nodes, changed, current, defragment=defragment)
    check_invariants(nodes, changed, second, current)
    # Same input in any order -> same output.
    n2, d2, c2 = shuffled(nodes, changed, current, seed)
    assert pack(n2, d2, c2, defragment=defragment) == second


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_property_repacking_the_result_keeps_everything(instance):
    nodes, demands = instance
    first = pack(nodes, demands)
    again = pack(nodes, demands, first.placements())
    before = {(a.model, a.replica, a.node, a.device, a.slices) for a in first.assignments}
    after = {(a.model, a.replica, a.node, a.device, a.slices) for a in again.assignments if a.kept}
    assert before == after and not again.dropped
    assert {(u.model, u.replica) for u in again.unplaced} <= {(u.model, u.replica) for u in first.unplaced}


def drifted(nodes: list[Node], demands: list[Demand], seed: int) -> list[Placement]:
    """A running state that drifted: the demands grown, then placed one at a time (the caller's
    ``demands`` scale it back)."""
    rng = random.Random(seed)
    grown = [replace(d, replicas=d.replicas + rng.randint(0, 4)) for d in demands]
    order = rng.sample(grown, len(grown))
    current: list[Placement] = []
    for i in range(len(order)):
        current = pack(nodes, order[: i + 1], current).placements()
    return current


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans().flatmap(lambda uniform: instances(uniform=uniform)), st.integers(0, 2**16))
def test_property_defragmentation_renames_without_changing_the_plan(instance, seed):
    """From a drifted running state (the demands grown, placed one at a time, then scaled back), a
    defragmenting repack that wins is still valid (selectors, taints, capacity, hard spread), is as
    good as a repack that knows nothing of what runs, and restarts no more replicas than that repack
    would under its own names."""
    nodes, demands = instance
    current = drifted(nodes, demands, seed)
    stable = pack(nodes, demands, current)
    merged = pack(nodes, demands, current, defragment=True)
    check_invariants(nodes, demands, merged, current)
    if merged == stable:
        return
    blind = pack(nodes, demands)
    assert (len(merged.unplaced), merged.devices_used(), merged.slices_used()) == (
        len(blind.unplaced),
        blind.devices_used(),
        blind.slices_used(),
    )
    assert merged.moved_from(current) <= blind.moved_from(current)


def unshared(demands: list[Demand]) -> list[Demand]:
    """The same replicas, each paying its own copy of its group's weights (one group per replica)."""
    group_mib: dict[str, int] = defaultdict(int)
    for d in demands:
        group_mib[d.share_group] = max(group_mib[d.share_group], d.weight_mib)
    return [
        replace(
            d,
            model=f"{d.model}/{r}",
            share_group=f"{d.model}/{r}",
            replicas=1,
            weight_mib=group_mib[d.share_group],
        )
        for d in demands
        for r in range(d.replicas)
    ]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(uniform=True, allow_spread=False))
def test_property_sharing_never_costs_more_than_not_sharing(instance):
    nodes, demands = instance
    demands = [replace(d, priority=0) for d in demands]
    shared, alone = pack(nodes, demands), pack(nodes, unshared(demands))
    assert len(shared.assignments) >= len(alone.assignments)
    if not alone.unplaced:
        assert not shared.unplaced
        assert shared.devices_used() <= alone.devices_used()
        assert shared.slices_used() <= alone.slices_used()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(uniform=True, allow_spread=False), st.integers(1, 8), st.integers(0, 8))
def test_property_lower_priority_is_left_unplaced_first(instance, replica_half_gib, weight_half_gib):
    nodes, demands = instance
    # Equal sizes, distinct groups: any replica can use any free room another one could.
    demands = [
        replace(d, share_group=d.model, replica_mib=replica_half_gib * 512, weight_mib=weight_half_gib * 512)
        for d in demands
    ]
    result = pack(nodes, demands)
    if result.unplaced:
        worst_unplaced = max(u.priority for u in result.unplaced)
        placed_models = {a.model for a in result.assignments}
        for d in demands:
            if d.priority < worst_unplaced:
                assert d.model not in placed_models, d


def test_emptying_a_device_looks_past_smaller_empty_devices_to_a_bigger_used_one():
    """Found by the property above: a small replica placed best fit on an 8-slice device could move to
    the 64-slice device its neighbours use, but the search for a target stopped at the first empty
    device (16 slices, fewer free than the used 64-slice one): with devices of mixed sizes, sharing
    used two devices where not sharing used one."""
    nodes = [
        Node("n0", (Device("d0", 8), Device("d1", 8, free_slices=0), Device("d2", 16))),
        Node("n1", (Device("d0", 64),)),
    ]
    demands = [Demand("m0", "g0", 2, 4608, 19968), Demand("m1", "g1", 1, 512, 0)]
    shared, alone = pack(nodes, demands), pack(nodes, unshared(demands))
    assert shared.devices_used() == alone.devices_used() == 1
    assert {(a.node, a.device) for a in shared.assignments} == {("n1", "d0")}


def test_consolidation_moves_nothing_within_its_bound():
    nodes = [Node("n", tuple(Device(f"d{i}", 16) for i in range(3)))]
    demands = [Demand("a", "ga", 1, 6 * 1024, 0), Demand("b", "gb", 1, 6 * 1024, 0)]
    current = [Placement("a", 0, "n", "d0", 6), Placement("b", 0, "n", "d1", 6)]
    # 2 devices against a fresh repack's 1: within a bound of 2x, the drift is not worth a move.
    kept = consolidate(nodes, demands, current, max_moves=4, bound=2.0)
    assert kept.devices_used() == 2 and all(a.kept for a in kept.assignments)


def test_consolidation_merges_a_thin_weight_copy_only_when_the_move_saves_enough():
    nodes = [Node("n", tuple(Device(f"d{i}", 16) for i in range(2)))]
    demands = [
        Demand("a", "g", 3, 2 * 1024, 8 * 1024),
        Demand("b", "g", 1, 2 * 1024, 8 * 1024),
        Demand("c", "h", 1, 6 * 1024, 0),
    ]
    # d0: g's weights + 3 replicas of a (2 slices free); d1: a second copy of g for b's one replica, + c.
    current = [Placement("a", i, "n", "d0", 2) for i in range(3)]
    current += [Placement("b", 0, "n", "d1", 2), Placement("c", 0, "n", "d1", 6)]
    # Both plans use 2 devices, so a bound below 1 forces the question: is 8 slices per move enough?
    merged = consolidate(nodes, demands, current, max_moves=1, bound=0.9, min_slices_per_move=8)
    where = {(a.model, a.replica): a.device for a in merged.assignments}
    assert where[("b", 0)] == "d0" and merged.slices_used() == 16 + 6
    stays = consolidate(nodes, demands, current, max_moves=1, bound=0.9, min_slices_per_move=9)
    assert all(a.kept for a in stays.assignments)


# ------------------------------------------------------------------------------------------ draining


def fragmented() -> tuple[list[Node], list[Demand], list[Placement]]:
    """What a deletion leaves: ``c`` (5 GiB) beside a deleted model on npu0, ``b`` (10 GiB) alone on npu1;
    both fit on one 16 GiB device."""
    demands = [Demand("b", "gb", 1, 10 * GIB, 0), Demand("c", "gc", 1, 5 * GIB, 0)]
    current = [Placement("b", 0, "node-0", "npu1", 10), Placement("c", 0, "node-0", "npu0", 5)]
    return cluster(1, devices=2, slices=16), demands, current


def test_a_drain_empties_a_device_into_room_that_is_free_now():
    nodes, demands, current = fragmented()
    drained = drain(nodes, demands, pack(nodes, demands, current), max_moves=1)
    assert drained.devices_used() == 1 and drained.moved_from(current) == 1
    (c,) = [a for a in drained.assignments if a.model == "c"]
    assert (c.replica, c.node, c.device, c.kept) == (0, "node-0", "npu1", False)  # same index, new device
    assert [(d.placement, d.reason) for d in drained.dropped] == [(current[1], "moved by defragmentation")]


def test_a_drain_moves_nothing_without_budget_or_gain():
    nodes, demands, current = fragmented()
    stable = pack(nodes, demands, current)
    assert drain(nodes, demands, stable, max_moves=0) == stable
    # Two 10 GiB replicas cannot share a 16 GiB device: nothing to gain, nothing moves.
    wide = [Demand("b", "gb", 1, 10 * GIB, 0), Demand("c", "gc", 1, 10 * GIB, 0)]
    running = [Placement("b", 0, "node-0", "npu1", 10), Placement("c", 0, "node-0", "npu0", 10)]
    assert drain(nodes, wide, pack(nodes, wide, running), max_moves=4) == pack(nodes, wide, running)


def test_a_drain_empties_the_device_that_costs_fewest_moves():
    """12 GiB alone on npu0, 4 + 4 GiB on npu1: both devices fit on either; emptying npu0 restarts one
    replica, emptying npu1 two."""
    demands = [Demand("big", "g1", 1, 12 * GIB, 0), Demand("s", "g2", 2, 4 * GIB, 0)]
    current = [
        Placement("big", 0, "node-0", "npu0", 12),
        Placement("s", 0, "node-0", "npu1", 4),
        Placement("s", 1, "node-0", "npu1", 4),
    ]
    nodes = cluster(1, devices=2, slices=20)
    drained = drain(nodes, demands, pack(nodes, demands, current), max_moves=2)
    assert {(a.model, a.device) for a in drained.assignments} == {("big", "npu1"), ("s", "npu1")}
    assert drained.moved_from(current) == 1


@st.composite
def fragmentable(draw):
    """Instances where deletions leave devices half used: small replicas and weights on a few 16-slice
    devices, with or without the heterogeneous nodes of :func:`instances`."""
    if draw(st.booleans()):
        return draw(instances())
    nodes = cluster(draw(st.integers(1, 3)), devices=draw(st.integers(2, 4)), slices=16)
    demands = [
        Demand(
            f"m{k}",
            f"g{draw(st.integers(0, 4))}",
            draw(st.integers(1, 5)),
            draw(st.integers(1, 6)) * 512,
            draw(st.integers(0, 8)) * 512,
        )
        for k in range(draw(st.integers(2, 8)))
    ]
    return nodes, demands


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fragmentable(), st.integers(0, 2**16), st.integers(0, 6))
def test_property_a_drain_stays_within_its_budget_and_breaks_nothing_first(instance, seed, budget):
    """From a drifted running state, a drain is a valid plan that moves at most ``budget`` running
    replicas, each under its old index, never onto a device a moved replica leaves (each new pod can
    start while the one it replaces still runs), with no more devices and nothing more unplaced than
    the stable plan, whatever the input order."""
    nodes, demands = instance
    drifting = drifted(nodes, demands, seed)
    rng = random.Random(seed + 1)
    demands = [replace(d, replicas=0) if rng.random() < 0.3 else d for d in demands]  # deletions
    first = pack(nodes, demands, drifting)
    if not first.steady():
        assert drain(nodes, demands, first, max_moves=budget) == first  # a scale comes first
    current = first.placements()  # ... then the steady state
    stable = pack(nodes, demands, current)
    drained = drain(nodes, demands, stable, max_moves=budget)
    check_invariants(nodes, demands, drained, current)
    assert drained.devices_used() <= stable.devices_used() and drained.unplaced == stable.unplaced
    if drained == stable:
        return
    assert drained.devices_used() < stable.devices_used() and all(x.reason for x in drained.dropped)
    moved = [d.placement for d in drained.dropped]
    assert 0 < drained.moved_from(current) == len(moved) <= budget
    left = {(p.node, p.device) for p in moved}
    assert not any((a.node, a.device) in left for a in drained.assignments)
    was = {(p.model, p.replica) for p in moved}
    assert was == {(a.model, a.replica) for a in drained.assignments if not a.kept} & was
    n2, d2, c2 = shuffled(nodes, demands, current, seed)
    assert drain(n2, d2, pack(n2, d2, c2), max_moves=budget) == drained


def test_a_scale_down_never_leaves_more_replicas_than_asked():
    """Found by the defragmentation property: 7 replicas of m1 run, it scales to 4. The share-blind
    start (every replica paying its own weights) keeps 3 of the 4 survivors and places a new one; the
    share-aware plan B keeps all 4 and used to copy the blind plan's new replica too: 5 of 4."""
    dev = lambda i, s: Device(i, s)  # noqa: E731
    nodes = [Node("n0", (dev("d0", 8), dev("d1", 8), dev("d2", 32))), Node("n1", (dev("d0", 64),))]
    demands = [
        Demand("m0", "g0", 5, 3584, 6656, priority=1),
        Demand("m1", "g3", 4, 2560, 0, priority=1, spread=Spread.BEST_EFFORT),
        Demand("m2", "g1", 3, 512, 0, priority=0, spread=Spread.BEST_EFFORT),
        Demand("m3", "g2", 7, 512, 12800, priority=0),
        Demand("m4", "g1", 0, 2560, 8704, priority=0),
    ]
    current = drifted(nodes, demands, 0)
    assert len([p for p in current if p.model == "m1"]) == 7
    for result in (pack(nodes, demands, current), pack(nodes, demands, current, defragment=True)):
        check_invariants(nodes, demands, result, current)
        assert sorted(a.replica for a in result.assignments if a.model == "m1") == [3, 4, 5, 6]
