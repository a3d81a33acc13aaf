"""The pure reconcile pass: observed state in, pod actions and statuses out."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from vnpu import api
from vnpu.cluster.kwok import npu_node_manifest
from vnpu.memory import EstimateError, MemoryEstimate
from vnpu.operator.config import OperatorConfig
from vnpu.operator.planner import Plan, creation_waves, default_share_group, plan
from vnpu.operator.state import ObservedModel, ObservedPod, parse_node, parse_pod

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
CONFIG = OperatorConfig()


def node(name: str, devices: int = 2, device_gib: int = 16, ready: bool = True) -> Any:
    manifest = npu_node_manifest(name, devices=devices, device_mib=device_gib * 1024)
    manifest["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return parse_node(manifest)


def model(name: str, replicas: int = 2, ns: str = "ns", **spec: Any) -> ObservedModel:
    full = {
        "modelName": name,
        "source": {"uri": "file:///models/m.gguf"},
        "replicas": replicas,
        "memory": {"kvCacheMiB": 1024},
        **spec,
    }
    return ObservedModel(ns, name, f"uid-{name}", 1, full, deleting=False)


def estimate(weights: int = 4096, per_replica: int = 1024) -> MemoryEstimate:
    return MemoryEstimate(
        weights_mib=weights,
        device_weights_mib=weights,
        kv_cache_mib=per_replica,
        activation_mib=0,
        overhead_mib=0,
        staging_mib=0,
    )


def run(models, nodes, pods=(), estimates=None, config=CONFIG) -> Plan:
    estimates = estimates or {m.key: estimate() for m in models}
    return plan(models, nodes, list(pods), estimates, config, NOW)


def as_pods(manifests: list[dict[str, Any]], ready: bool = True) -> list[ObservedPod]:
    pods = []
    for m in manifests:
        m = {**m, "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}]}}
        pods.append(parse_pod(m))
    return pods


def roles(manifests: list[dict[str, Any]]) -> list[str]:
    return sorted(m["metadata"]["labels"][api.LABEL_ROLE] for m in manifests)


def test_replicas_share_one_weight_holder_per_device() -> None:
    m = model("llama", replicas=3)
    result = run([m], [node("n1", devices=1)])
    assert roles(result.create) == ["replica", "replica", "replica", "weights"]
    holder = next(p for p in result.create if p["metadata"]["labels"][api.LABEL_ROLE] == "weights")
    replicas = [p for p in result.create if p["metadata"]["labels"][api.LABEL_ROLE] == "replica"]
    assert holder["metadata"]["annotations"][api.ANNOTATION_SLICES] == "4"
    assert holder["metadata"]["annotations"][api.ANNOTATION_WEIGHTS_MIB] == "4096"  # what views count
    assert holder["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    for r in replicas:
        ann = r["metadata"]["annotations"]
        assert ann[api.ANNOTATION_DEVICE] == "n1-npu0"
        assert ann[api.ANNOTATION_SLICES] == "1"
        assert ann["vnpu.io/weight-holder"] == holder["metadata"]["name"]
        assert r["spec"]["containers"][0]["resources"]["limits"][api.RESOURCE_MEMORY] == "1"
        term = r["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["nodeSelectorTerms"][0]["matchFields"][0]["values"] == ["n1"]
        assert r["metadata"]["ownerReferences"][0]["uid"] == "uid-llama"
    status = result.statuses[0].status
    assert status["phase"] == "Running" and status["replicas"] == 3
    assert status["memory"] == {"weightsMiB": 4096, "perReplicaMiB": 1024, "savedBySharingMiB": 2 * 4096}
    assert [e.reason for e in result.statuses[0].events] == ["Placed"]


def test_a_second_pass_over_its_own_result_changes_nothing() -> None:
    models = [model("a", 3), model("b", 2, shareGroup="other")]
    nodes = [node("n1"), node("n2")]
    first = run(models, nodes)
    pods = as_pods(first.create)
    second = run(models, nodes, pods)
    assert second.create == [] and second.delete == []
    assert all(s.status["phase"] == "Ready" for s in second.statuses)


def test_scale_down_deletes_the_highest_replicas_and_unused_holders() -> None:
    nodes = [node("n1", devices=1)]
    pods = as_pods(run([model("a", 3)], nodes).create)
    result = run([model("a", 1)], nodes, pods)
    deleted = sorted(d.name for d in result.delete)
    assert len(deleted) == 2 and all(d.role == "replica" for d in result.delete)
    kept = {p.replica for p in pods if p.role == "replica" and p.name not in deleted}
    assert kept == {0}
    assert result.create == []
    pods = [p for p in pods if p.name not in deleted]
    gone = run([model("a", 0)], nodes, pods)
    assert roles([{"metadata": {"labels": {api.LABEL_ROLE: d.role}}} for d in gone.delete]) == [
        "replica",
        "weights",
    ]


def test_lost_node_pods_are_force_deleted_and_replaced_elsewhere() -> None:
    m = model("a", 2, placement={"spreadAcrossNodes": True})
    pods = as_pods(run([m], [node("n1"), node("n2")]).create)
    assert {p.node for p in pods if p.role == "replica"} == {"n1", "n2"}
    result = run([m], [node("n1"), node("n2", ready=False), node("n3")], pods)
    forced = [d for d in result.delete if d.force]
    assert forced and all(p.node == "n2" for p in pods if p.name in {d.name for d in forced})
    new_nodes = {
        p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ][0]["matchFields"][0]["values"][0]
        for p in result.create
    }
    assert new_nodes == {"n3"}
    degraded = {c["type"]: c for c in result.statuses[0].status["conditions"]}["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "NodeLost"


def test_unplaced_demand_gets_placeholders_until_capacity_arrives() -> None:
    m = model("big", 3)
    est = {m.key: estimate(weights=12 * 1024, per_replica=3 * 1024)}
    first = run([m], [node("n1", devices=1)], estimates=est)
    placeholders = [p for p in first.create if p["metadata"]["labels"][api.LABEL_ROLE] == "placeholder"]
    assert len(placeholders) == 2 and first.unplaced_slices == 2 * (12 + 3)
    ph = placeholders[0]
    assert ph["spec"]["priorityClassName"] == "vnpu-placeholder"
    assert ph["spec"]["containers"][0]["resources"]["requests"][api.RESOURCE_MEMORY] == "15"
    not_in = ph["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert not_in["nodeSelectorTerms"][0]["matchFields"][0] == {
        "key": "metadata.name",
        "operator": "NotIn",
        "values": ["n1"],
    }
    status = first.statuses[0].status
    assert status["phase"] == "CapacityPending"
    assert {c["type"]: c["status"] for c in status["conditions"]}["CapacityPending"] == "True"
    assert "CapacityPending" in [e.reason for e in first.statuses[0].events]

    pods = as_pods(first.create)
    second = run([m], [node("n1", devices=1), node("n2", devices=2)], pods, estimates=est)
    assert sorted(d.name for d in second.delete) == sorted(p["metadata"]["name"] for p in placeholders)
    assert "placeholder" not in roles(second.create)


def test_invalid_spec_fails_with_the_reason_and_creates_nothing() -> None:
    m = model("bad")
    result = run(
        [m], [node("n1")], estimates={m.key: EstimateError("spec.weights.sizeMiB is required for pvc://")}
    )
    assert result.create == []
    status = result.statuses[0].status
    assert status["phase"] == "Failed"
    placed = {c["type"]: c for c in status["conditions"]}["Placed"]
    assert placed["reason"] == "InvalidSpec" and "sizeMiB" in placed["message"]


def test_spec_change_replaces_pods_in_place() -> None:
    nodes = [node("n1", devices=1)]
    pods = as_pods(run([model("a", 1)], nodes).create)
    changed = model("a", 1, runtime={"image": "vnpu:2"})
    result = run([changed], nodes, pods)
    old = {p.name for p in pods if p.role == "replica"}
    assert {d.name for d in result.delete} == old
    (new,) = [p for p in result.create if p["metadata"]["labels"][api.LABEL_ROLE] == "replica"]
    assert new["metadata"]["annotations"][api.ANNOTATION_DEVICE] == "n1-npu0"
    assert new["spec"]["containers"][0]["image"] == "vnpu:2"


def test_status_unchanged_is_not_patched_again() -> None:
    m = model("a", 1)
    nodes = [node("n1")]
    first = run([m], nodes)
    pods = as_pods(first.create)
    second = run([m], nodes, pods)
    settled = ObservedModel(
        m.namespace, m.name, m.uid, m.generation, m.spec, False, second.statuses[0].status
    )
    third = run([settled], nodes, pods)
    assert not third.statuses[0].changed and third.statuses[0].events == ()


@pytest.mark.parametrize("uri", ["file:///a.gguf", "hf://org/m@v2"])
def test_default_share_group_is_a_valid_label(uri: str) -> None:
    group = default_share_group({"source": {"uri": uri}, "weights": {"dtype": "bfloat16"}})
    assert len(group) <= 63 and group.replace("-", "").isalnum() and group.islower()


def test_a_holder_is_owned_by_every_model_using_it() -> None:
    nodes = [node("n1", devices=1)]
    # The first pass sees one model of the group; its holder is owned by that model alone.
    a = model("a", 1, shareGroup="g")
    pods = as_pods(run([a], nodes).create)
    b = model("b", 1, shareGroup="g")
    result = run([a, b], nodes, pods)
    (update,) = result.set_owners
    holder = next(p for p in pods if p.role == "weights")
    assert update.name == holder.name
    assert sorted(r["uid"] for r in update.owner_references) == ["uid-a", "uid-b"]
    # Deleting `a` hands the holder to `b` before anything else happens.
    deleting = ObservedModel(a.namespace, a.name, a.uid, a.generation, a.spec, deleting=True)
    pods = [*pods, *as_pods([m for m in result.create])]
    pods = [
        p if p.role != "weights" else parse_pod({**_holder_manifest(result, holder.name, pods)}) for p in pods
    ]
    later = run([deleting, b], nodes, pods)
    assert [r["uid"] for r in later.set_owners[0].owner_references] == ["uid-b"]
    assert holder.name not in {d.name for d in later.delete}


def _holder_manifest(result: Plan, name: str, pods: list[ObservedPod]) -> dict[str, Any]:
    refs = result.set_owners[0].owner_references
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {
                api.LABEL_ROLE: "weights",
                api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE,
                api.LABEL_SHARE_GROUP: "g",
            },
            "annotations": {api.ANNOTATION_DEVICE: "n1-npu0", api.ANNOTATION_SLICES: "4"},
            "ownerReferences": refs,
        },
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Running"},
    }


def test_pods_a_device_plugin_could_confuse_are_created_in_separate_waves() -> None:
    a, b = model("a", 2, shareGroup="ga"), model("b", 2, shareGroup="gb")
    result = run([a, b], [node("n1", devices=2)])
    replicas = [m for m in result.create if m["metadata"]["labels"][api.LABEL_ROLE] == "replica"]
    waves = creation_waves(replicas)
    assert sorted(len(w) for w in waves) == [1, 1, 1, 1], "4 one-slice replicas on one node: 4 waves"

    def pinned(name: str, node_name: str, slices: int) -> dict[str, Any]:
        term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node_name]}]}
        return {
            "metadata": {"name": name, "annotations": {api.ANNOTATION_SLICES: str(slices)}},
            "spec": {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
                    }
                }
            },
        }

    pods = [
        pinned("x1", "n1", 1),
        pinned("y1", "n2", 1),
        pinned("x2", "n1", 1),
        pinned("z", "n1", 3),
        {"metadata": {"name": "placeholder"}, "spec": {}},
    ]
    assert [[p["metadata"]["name"] for p in w] for w in creation_waves(pods)] == [
        ["x1", "y1", "z", "placeholder"],
        ["x2"],
    ]


def test_model_pods_mount_the_pvc_and_carry_the_runtime_settings() -> None:
    m = model(
        "p",
        1,
        source={"uri": "pvc://models/smollm2/m.gguf"},
        weights={"dtype": "q4_1"},
        memory={"maxContextTokens": 4096, "maxBatch": 2},
    )
    result = run([m], [node("n1", devices=1)])
    assert roles(result.create) == ["replica", "weights"]
    for pod in result.create:
        assert pod["spec"]["volumes"] == [
            {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
        ]
        (container,) = pod["spec"]["containers"]
        assert container["volumeMounts"] == [
            {"name": "model", "mountPath": "/mnt/pvc/models", "readOnly": True}
        ]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["VNPU_MODEL_URI"] == "pvc://models/smollm2/m.gguf"
        assert env["VNPU_MAX_CONTEXT"] == "4096"
        assert "VNPU_MODEL_DTYPE" not in env, "a file quantisation is not a runtime dtype"
