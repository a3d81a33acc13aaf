"""Placeholders ask the Cluster Autoscaler for what the packer would need on the nodes it would add."""

from __future__ import annotations

from typing import Any

from test_planner import as_pods, estimate, model, run

from vnpu import api
from vnpu.cluster.kwok import npu_node_manifest
from vnpu.operator.placeholders import MAX_PER_MODEL
from vnpu.operator.state import parse_node

GIB = 1024


def pool_node(name: str, devices: int = 1, device_gib: int = 16, slice_mib: int = 1024, **labels: str) -> Any:
    manifest = npu_node_manifest(
        name, devices=devices, device_mib=device_gib * GIB, slice_mib=slice_mib, labels=labels
    )
    manifest["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    return parse_node(manifest)


def placeholders(result: Any) -> list[dict[str, Any]]:
    return [p for p in result.create if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_PLACEHOLDER]


def requests(result: Any) -> list[dict[str, str]]:
    """What each placeholder requests of the vnpu.io/memory resources."""
    return [p["spec"]["containers"][0]["resources"]["requests"] for p in placeholders(result)]


def test_placeholders_ask_in_the_slices_of_the_pool_they_stand_for() -> None:
    """A unit of vnpu.io/memory-0 is a slice of that node's sliceMiB: a 48 GiB replica asks 12 of a pool
    of 4096 MiB slices (a fresh 64 GiB device offers 16), not 48 at the default 1024."""
    filler, big = model("filler", 1), model("big", 1, shareGroup="big")
    est = {m.key: estimate(weights=40 * GIB, per_replica=8 * GIB) for m in (filler, big)}
    result = run([filler, big], [pool_node("n1", device_gib=64, slice_mib=4096)], estimates=est)
    assert requests(result) == [{"vnpu.io/memory-0": "12"}]
    assert result.unplaced_slices == 12


def test_a_placeholder_of_small_slices_does_not_fit_where_its_replica_does_not() -> None:
    """At 256 MiB slices a 14 GiB replica asks 56 slices: more than the 24 left on the only device, so
    it stays pending for the autoscaler instead of binding there (14 units would)."""
    n1 = pool_node("n1", slice_mib=256)
    filler, big = model("filler", 1), model("big", 1, shareGroup="big")
    est = {filler.key: estimate(weights=8 * GIB, per_replica=2 * GIB), big.key: estimate(12 * GIB, 2 * GIB)}
    pods = as_pods(run([filler], [n1], estimates={filler.key: est[filler.key]}).create)
    assert sum(s for p in pods for _, s in p.requests) == 40  # of 64
    result = run([filler, big], [n1], pods, estimates=est)
    assert requests(result) == [{"vnpu.io/memory-0": "56"}]


def test_a_placeholder_rounds_the_weights_and_the_replica_each_as_the_packer_does() -> None:
    """4.5 GiB of weights and an 11.5 GiB replica make 16 GiB, but 5 + 12 = 17 slices to the packer:
    the placeholder asks 17, so no 16-slice node is bought for a pause pod the replica cannot follow."""
    m = model("edge", 1)
    est = {m.key: estimate(weights=4608, per_replica=11776)}
    assert run([m], [pool_node("fresh", devices=8)], estimates=est).statuses[0].status["unplaced"]
    result = run([m], [pool_node("full", device_gib=1)], estimates=est)
    assert requests(result) == [{"vnpu.io/memory-0": "17"}]
    assert result.unplaced_slices == 17


def test_placeholders_name_the_pool_when_the_models_pools_differ() -> None:
    """Two pools the model may use, of other device and slice sizes: the placeholders stand for one of
    them (one whose device holds a replica; then the fewest devices) and name it, so the autoscaler
    never sizes the other pool by its slices. A pool of another nodeSelector does not count; pools of
    one shape: no pool named."""
    filler = model("filler", 1)
    m = model("m", 1, shareGroup="m", placement={"nodeSelector": {"tier": "npu"}})
    est = {filler.key: estimate(weights=60 * GIB, per_replica=4 * GIB), m.key: estimate(20 * GIB, 4 * GIB)}
    small = pool_node("s1", device_gib=16, slice_mib=1024, tier="npu", **{"vnpu.io/pool": "a-small"})
    large = pool_node("l1", device_gib=64, slice_mib=4096, tier="npu", **{"vnpu.io/pool": "b-large"})
    other = pool_node("o1", device_gib=32, slice_mib=512, **{"vnpu.io/pool": "0-other"})
    result = run([filler, m], [small, large, other], estimates=est)
    assert [s.status["placements"][0]["node"] for s in result.statuses if s.model.name == "filler"] == ["l1"]
    (ph,) = placeholders(result)
    assert ph["spec"]["nodeSelector"] == {"tier": "npu", "vnpu.io/pool": "b-large"}
    assert requests(result) == [{"vnpu.io/memory-0": "6"}]  # 5 + 1 slices of 4096 MiB
    # Pools of one shape: its units, and no pool in the nodeSelector.
    filler = model("filler", 2, placement={"spreadAcrossNodes": True})
    big = pool_node("s2", device_gib=64, tier="npu", **{"vnpu.io/pool": "c"})
    result = run([filler, m], [big, pool_node("s3", device_gib=64, tier="npu")], estimates=est)
    (ph,) = placeholders(result)
    assert ph["spec"]["nodeSelector"] == {"tier": "npu"}
    assert requests(result) == [{"vnpu.io/memory-0": "24"}]


def test_placeholders_for_the_unlabelled_pool_keep_off_the_labelled_ones() -> None:
    """The pool a placeholder stands for may be the nodes without the pool label: sized in their 4096
    MiB slices, it must not bind to a node of a labelled pool of smaller slices (6 units there are
    1.5 GiB, free on any node: nothing would stay pending and the autoscaler would never scale)."""
    filler = model("filler", 1)
    m = model("m", 1, shareGroup="m", placement={"nodeSelector": {"tier": "npu"}})
    est = {filler.key: estimate(weights=60 * GIB, per_replica=4 * GIB), m.key: estimate(20 * GIB, 4 * GIB)}
    small = pool_node("s1", device_gib=16, slice_mib=256, tier="npu", **{"vnpu.io/pool": "a-small"})
    large = pool_node("l1", device_gib=64, slice_mib=4096, tier="npu")
    result = run([filler, m], [small, large], estimates=est)
    (ph,) = placeholders(result)
    assert requests(result) == [{"vnpu.io/memory-0": "6"}]  # 5 + 1 slices of 4096 MiB
    assert ph["spec"]["nodeSelector"] == {"tier": "npu"}
    terms = ph["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms == {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "vnpu.io/pool", "operator": "DoesNotExist"}]}]
    }


def nodes_for(result: Any, template: dict[str, int]) -> int:
    """The nodes of ``template`` (resource -> units) the Cluster Autoscaler's estimator adds for the
    pending placeholders: first fit by their requests, as it bin-packs pods onto template nodes."""
    free: list[dict[str, int]] = []
    for request in requests(result):
        ((resource, units),) = request.items()
        for node in free:
            if node.get(resource, 0) >= int(units):
                node[resource] -= int(units)
                break
        else:
            free.append(dict(template))
            assert free[-1].get(resource, 0) >= int(units), "fits no fresh node"
            free[-1][resource] -= int(units)
    return len(free)


def test_placeholders_ask_for_the_devices_the_packer_would_fill_not_a_node_per_replica() -> None:
    """16 replicas of 4 GiB sharing 20 GiB of weights: the packer puts them on 2 devices of one fresh
    8-device node (the weights once per device), so the placeholders ask for those 2 devices' worth,
    one a device, not 16 copies of the weights that the autoscaler would spread over 8 nodes."""
    n1 = pool_node("n1", devices=8, device_gib=64)
    filler = model("filler", 8, placement={"spreadAcrossNodes": False})
    m = model("m", 16, shareGroup="m", source={"uri": "file:///m.gguf"}, priority=-1)
    est = {filler.key: estimate(weights=60 * GIB, per_replica=4 * GIB), m.key: estimate(20 * GIB, 4 * GIB)}
    result = run([filler, m], [n1], estimates=est)
    assert sum(u["replicas"] for u in result.statuses[1].status["unplaced"]) == 16
    assert requests(result) == [{"vnpu.io/memory-0": "64"}, {"vnpu.io/memory-1": "40"}]  # 20 + 11·4, 20 + 5·4
    assert result.unplaced_slices == 104
    template = {f"vnpu.io/memory-{i}": 64 for i in range(8)}
    assert nodes_for(result, template) == 1
    fresh = run([m], [pool_node("new0", devices=8, device_gib=64)], estimates={m.key: est[m.key]})
    assert not fresh.statuses[0].status["unplaced"]  # the packer needs that one node too
    names = [p["metadata"]["name"] for p in placeholders(result)]
    assert len(set(names)) == 2 and all(n.startswith("m-pending-") for n in names)
    # The remainder shrinks as replicas get placed: one placeholder for what is left.
    fewer = run([filler, model("m", 9, shareGroup="m", source={"uri": "file:///m.gguf"}, priority=-1)], [n1],
                estimates=est)  # fmt: skip
    assert requests(fewer) == [{"vnpu.io/memory-0": "56"}]


def test_a_spread_model_or_an_unknown_pool_gets_a_placeholder_per_replica() -> None:
    """spreadAcrossNodes wants a node per replica; with no node of the pool known, a device's size is
    unknown: one replica each, on a node's first device."""
    n1 = pool_node("n1", devices=1, device_gib=16)
    filler = model("filler", 1, priority=1)
    est = {filler.key: estimate(weights=14 * GIB, per_replica=2 * GIB)}
    spread = model("s", 3, shareGroup="s", placement={"spreadAcrossNodes": True})
    nowhere = model("x", 3, shareGroup="x", placement={"nodeSelector": {"pool": "none"}})
    for m in (spread, nowhere):
        result = run([filler, m], [n1], estimates={**est, m.key: estimate(4 * GIB, 2 * GIB)})
        assert requests(result) == [{"vnpu.io/memory-0": "6"}] * 3, m.name


def test_a_placeholder_is_replaced_when_what_it_stands_for_changes() -> None:
    """A model moved to another pool, grown, or given another toleration: its placeholder goes and one of
    the new shape comes, instead of the autoscaler scaling the old pool for the old size; unchanged, it
    stays."""
    nodes = [pool_node("n1")]
    filler = model("filler", 1)
    est = {filler.key: estimate(weights=14 * GIB, per_replica=GIB)}  # fills n1's only device
    before = model("big", 1, shareGroup="big", placement={"nodeSelector": {"pool": "a"}})
    first = run([filler, before], nodes, estimates={**est, before.key: estimate(8 * GIB)})
    pods = as_pods(first.create)
    (old,) = placeholders(first)
    assert old["spec"]["nodeSelector"] == {"pool": "a"} and requests(first) == [{"vnpu.io/memory-0": "9"}]
    same = run([filler, before], nodes, pods, estimates={**est, before.key: estimate(8 * GIB)})
    assert same.create == [] and same.delete == []
    toleration = {"key": "npu", "operator": "Exists", "effect": "NoSchedule"}
    changes = {
        "pool": (model("big", 1, shareGroup="big", placement={"nodeSelector": {"pool": "b"}}), 8 * GIB),
        "size": (before, 40 * GIB),
        "tolerations": (
            model(
                "big",
                1,
                shareGroup="big",
                placement={"nodeSelector": {"pool": "a"}, "tolerations": [toleration]},
            ),
            8 * GIB,
        ),
    }
    for what, (after, weights) in changes.items():
        result = run([filler, after], nodes, pods, estimates={**est, after.key: estimate(weights)})
        assert [d.name for d in result.delete] == [old["metadata"]["name"]], what
        (new,) = placeholders(result)
        assert new["metadata"]["name"] != old["metadata"]["name"], what
        assert new["spec"]["nodeSelector"] == after.spec.placement.node_selector, what
        assert new["spec"]["tolerations"] == [t.manifest() for t in after.spec.placement.tolerations], what
        assert requests(result) == [{"vnpu.io/memory-0": str(weights // GIB + 1)}], what


def test_new_placeholders_wait_for_the_models_pods_and_existing_ones_stay() -> None:
    """A placeholder created beside its model's new pods could take the namespace quota they need (it
    is admitted first: they wait for their key Secret): it waits for them. One that exists stays while
    a replica of its model is re-created."""
    m = model("big", 3)
    est = {m.key: estimate(weights=12 * GIB, per_replica=3 * GIB)}
    nodes = [pool_node("n1")]
    unkeyed = run([m], nodes, estimates=est, secrets=[])
    assert unkeyed.create == [] and unkeyed.create_secrets  # no pod before the key, nor a placeholder
    placed = run([m], nodes, estimates=est)
    assert "placeholder" not in [p["metadata"]["labels"][api.LABEL_ROLE] for p in placed.create]
    pods = as_pods(placed.create)
    pending = run([m], nodes, pods, estimates=est)
    assert len(placeholders(pending)) == 2
    pods += as_pods(pending.create)
    replica = next(p for p in pods if p.role == "replica")
    again = run([m], nodes, [p for p in pods if p is not replica], estimates=est)
    assert [p["metadata"]["name"] for p in again.create] == [replica.name] and again.delete == []


def test_a_model_has_at_most_max_per_model_placeholders_and_the_gauge_counts_all_it_asks() -> None:
    """1,000 replicas (the CRD's most) of a size no known device holds were 1,000 pending pods of one
    model, planned in every pass of every tenant. The autoscaler is shown the first
    ``MAX_PER_MODEL``, one replica each; the gauge still counts what all 1,000 ask."""
    huge = model("huge", 1000, weights={"sizeMiB": 64 * GIB})
    result = run([huge], [pool_node("n1")], estimates={huge.key: estimate(weights=64 * GIB, per_replica=GIB)})
    assert len(placeholders(result)) == MAX_PER_MODEL
    assert set(map(str, requests(result))) == {str({"vnpu.io/memory-0": str(64 + 1)})}
    assert result.unplaced_slices == 1000 * (64 + 1)
    # Replicas that fit a device: a device-worth each (weights once, 15 replicas), capped alike.
    # 15 run on n1; the placeholders of the other 985 wait for those pods, then come.
    many, est = model("many", 1000), {("ns", "many"): estimate(weights=GIB, per_replica=GIB)}
    pods = as_pods(run([many], [pool_node("n1")], estimates=est).create)
    result = run([many], [pool_node("n1")], pods, estimates=est)
    assert len(placeholders(result)) == MAX_PER_MODEL < -(-985 // 15)
    assert result.unplaced_slices == -(-985 // 15) * 1 + 985 * 1
