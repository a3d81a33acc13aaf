"""Placeholders ask the Cluster Autoscaler for what the packer would need on the nodes it would add."""

from __future__ import annotations

from typing import Any

from test_planner import as_pods, estimate, model, run

from vnpu import api
from vnpu.cluster.kwok import npu_node_manifest
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
