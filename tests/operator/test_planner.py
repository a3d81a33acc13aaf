"""The pure reconcile pass: observed state in, pod actions and statuses out."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from typing import Any

import pytest

from vnpu import api, sharing
from vnpu.cluster.kwok import npu_node_manifest
from vnpu.memory import EstimateError, MemoryEstimate
from vnpu.operator import planner
from vnpu.operator.config import OperatorConfig
from vnpu.operator.planner import Plan, default_share_group, plan
from vnpu.operator.pods import placeholder_pod_name, render, replica_pod_name
from vnpu.operator.spec import parse_spec
from vnpu.operator.state import ObservedModel, ObservedPod, ObservedSecret, parse_node, parse_pod

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
    return ObservedModel(ns, name, f"uid-{name}", 1, parse_spec(full), deleting=False, raw_spec=full)


def estimate(weights: int = 4096, per_replica: int = 1024) -> MemoryEstimate:
    return MemoryEstimate(
        weights_mib=weights,
        device_weights_mib=weights,
        kv_cache_mib=per_replica,
        activation_mib=0,
        overhead_mib=0,
        staging_mib=0,
    )


def keys_for(models, uid: str = "key-1") -> list[ObservedSecret]:
    """The key Secrets of the models' share groups, as a previous pass would have created them."""
    groups = sorted({(m.namespace, m.spec.share_group) for m in models})
    return [
        ObservedSecret(ns, sharing.secret_name(g), f"{uid}-{ns}-{g}", g, (), terminating=False)
        for ns, g in groups
    ]


def run(models, nodes, pods=(), estimates=None, config=CONFIG, secrets=None, **kwargs) -> Plan:
    """One pass; unless told otherwise the groups' key Secrets already exist."""
    estimates = estimates or {m.key: estimate() for m in models}
    secrets = keys_for(models) if secrets is None else secrets
    result = plan(models, nodes, list(pods), estimates, config, NOW, secrets=secrets, **kwargs)
    # The intents, rendered: what the reconciler would create, in its order.
    result.create = [render(i, config) for i in result.create]  # type: ignore[misc]
    return result


def as_pods(manifests: list[dict[str, Any]], ready: bool = True) -> list[ObservedPod]:
    """The pods the API server would hold for these manifests (a uid each, Running on the node they
    are pinned to, Ready or not)."""
    pods = []
    for m in manifests:
        meta = {**m["metadata"], "uid": m["metadata"].get("uid") or f"uid-{m['metadata']['name']}"}
        status = {"phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}]}
        m = {**m, "metadata": meta, "status": status}
        pinned = parse_pod(m).node  # (the scheduler binds it there: spec.nodeName)
        pods.append(parse_pod({**m, "spec": {**m["spec"], "nodeName": pinned}} if pinned else m))
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
    assert holder["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "true"
    for r in replicas:
        ann = r["metadata"]["annotations"]
        assert ann[api.ANNOTATION_DEVICE] == "n1-npu0"
        assert ann[api.ANNOTATION_SLICES] == "1"
        assert ann["vnpu.io/weight-holder"] == holder["metadata"]["name"]
        # The chosen device's own resource: the scheduler and kubelet enforce the device.
        assert r["spec"]["containers"][0]["resources"]["limits"] == {"vnpu.io/memory-0": "1"}
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
    placed = run([m], [node("n1", devices=1)], estimates=est)
    assert "placeholder" not in roles(placed.create)  # not before the pods it runs: they go first
    first = run([m], [node("n1", devices=1)], as_pods(placed.create), estimates=est)
    placeholders = [p for p in first.create if p["metadata"]["labels"][api.LABEL_ROLE] == "placeholder"]
    assert len(placeholders) == 2 and first.unplaced_slices == 2 * (12 + 3)
    ph = placeholders[0]
    assert ph["spec"]["priorityClassName"] == "vnpu-placeholder"
    assert ph["spec"]["containers"][0]["resources"]["requests"] == {"vnpu.io/memory-0": "15"}
    # No node-name exclusion (matchFields NotIn takes one value: invalid on 2+ nodes): a valid pod on
    # any cluster, at a negative priority that every replica preempts.
    assert "affinity" not in ph["spec"] and ph["spec"]["securityContext"]["runAsNonRoot"]
    status = first.statuses[0].status
    assert status["phase"] == "CapacityPending"
    assert {c["type"]: c["status"] for c in status["conditions"]}["CapacityPending"] == "True"
    assert "CapacityPending" in [e.reason for e in first.statuses[0].events]

    pods = as_pods(placed.create + first.create)
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


def test_spec_change_rolls_replicas_with_surge_and_never_below_the_ready_count() -> None:
    nodes = [node("n1", devices=1)]
    pods = as_pods(run([model("a", 1)], nodes).create)
    changed = model("a", 1, runtime={"image": "vnpu:2"})
    # Surge first: the new holder and replica start beside the old ones, nothing is deleted yet.
    first = run([changed], nodes, pods)
    assert first.delete == []
    assert {p["spec"]["containers"][0]["image"] for p in first.create} == {"vnpu:2"}
    (new,) = [p for p in first.create if p["metadata"]["labels"][api.LABEL_ROLE] == "replica"]
    assert new["metadata"]["annotations"][api.ANNOTATION_DEVICE] == "n1-npu0"
    progressing = {c["type"]: c for c in first.statuses[0].status["conditions"]}["Progressing"]
    assert progressing["reason"] == "RollingUpdate"
    assert "RollingUpdate" in [e.reason for e in first.statuses[0].events]
    assert first.statuses[0].status["readyReplicas"] == 1  # the old replica still serves
    # Not ready yet: the old replica stays.
    waiting = run([changed], nodes, [*pods, *as_pods(first.create, ready=False)])
    assert waiting.delete == [] and waiting.create == []
    # Ready: the old replica goes; its holder stays while the replica terminates.
    ready = [*pods, *as_pods(first.create)]
    second = run([changed], nodes, ready)
    old_replica = next(p for p in pods if p.role == "replica")
    old_holder = next(p for p in pods if p.role == "weights")
    assert [d.name for d in second.delete] == [old_replica.name] and second.create == []
    terminating = [replace(p, terminating=True) if p.name == old_replica.name else p for p in ready]
    third = run([changed], nodes, terminating)
    assert third.delete == [] and third.create == []
    gone = run([changed], nodes, [p for p in ready if p.name != old_replica.name])
    assert [d.name for d in gone.delete] == [old_holder.name]
    done = run([changed], nodes, [p for p in ready if p.name not in (old_replica.name, old_holder.name)])
    status = done.statuses[0].status
    assert {c["type"]: c for c in status["conditions"]}["Progressing"]["reason"] == "RolloutComplete"


def test_rollout_of_four_replicas_keeps_four_ready_at_every_step() -> None:
    nodes = [node("n1", devices=2)]
    pods = as_pods(run([model("a", 4)], nodes).create)
    changed = model("a", 4, memory={"kvCacheMiB": 2048})
    for _ in range(20):
        result = run([changed], nodes, pods, estimates={changed.key: estimate(per_replica=2048)})
        gone = {d.name for d in result.delete}
        pods = [p for p in pods if p.name not in gone] + as_pods(result.create)
        ready = [p for p in pods if p.role == "replica" and p.ready]
        assert len(ready) >= 4, "maxUnavailable 0: never fewer ready replicas than asked for"
        assert len([p for p in pods if p.role == "replica"]) <= 5, "maxSurge 25% of 4 = 1"
        if not result.create and not result.delete:
            break
    replicas = [p for p in pods if p.role == "replica"]
    assert len(replicas) == 4 and {p.slices for p in replicas} == {2}


def test_recreate_strategy_deletes_before_it_creates() -> None:
    nodes = [node("n1", devices=1)]
    pods = as_pods(run([model("a", 2)], nodes).create)
    changed = model("a", 2, runtime={"image": "vnpu:2"}, rollout={"strategy": "Recreate"})
    result = run([changed], nodes, pods)
    assert {d.name for d in result.delete} == {p.name for p in pods if p.role == "replica"}
    assert [p for p in result.create if p["metadata"]["labels"][api.LABEL_ROLE] == "replica"] == []


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
    (update,) = [u for u in result.set_owners if u.kind == "Pod"]
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
    (update,) = [u for u in later.set_owners if u.kind == "Pod"]
    assert [r["uid"] for r in update.owner_references] == ["uid-b"]
    assert holder.name not in {d.name for d in later.delete}


def _holders(pods: list[ObservedPod]) -> list[str]:
    return sorted(p.name for p in pods if p.role == "weights")


def _mapped(pods: list[ObservedPod]) -> dict[str, str]:
    """Replica pod -> the holder it maps (its vnpu.io/weight-holder annotation)."""
    return {p.name: p.weight_holder or "" for p in pods if p.role == "replica"}


def _apply(pods: list[ObservedPod], result: Plan) -> list[ObservedPod]:
    """The pods after a pass's writes (deletions done, creations running and Ready)."""
    gone = {(d.namespace, d.name) for d in result.delete}
    return [p for p in pods if (p.namespace, p.name) not in gone] + as_pods(result.create)


def test_a_holder_that_replicas_map_stays_when_its_group_is_sized_anew() -> None:
    """A model of a larger holder need joins a running group. A holder's name hashes its size, a
    replica's does not: the resized holder was a new pod (which cannot start beside the old one:
    one socket per group and device) and the old one was deleted as out of the plan, from under every
    replica of the device mapping it, which were never rolled. Now the mapped holder stays, charged at
    its own size, and new replicas there map it; the new size comes once nothing maps it."""
    nodes = [node("n1", devices=1, device_gib=32)]
    a, b = model("a", 2, shareGroup="g"), model("b", 1, shareGroup="g")
    bigger = {a.key: estimate(), b.key: replace(estimate(), overhead_mib=2048)}
    pods = as_pods(run([a], nodes, estimates=bigger).create)
    (holder,) = _holders(pods)

    joined = run([a, b], nodes, pods, estimates=bigger)
    assert roles(joined.create) == ["replica"] and not joined.delete
    pods = _apply(pods, joined)
    assert _holders(pods) == [holder]
    assert set(_mapped(pods).values()) == {holder}  # b's new replica maps it too
    (update,) = [u for u in joined.set_owners if u.kind == "Pod"]
    assert update.name == holder and len(update.owner_references) == 2
    assert {x["weightHolder"] for u in joined.statuses for x in u.status["placements"]} == {holder}
    settled = run([a, b], nodes, pods, estimates=bigger)
    assert not settled.create and not settled.delete
    assert [(i.holder.name, i.in_use) for i in settled.holder_budgets] == [(holder, True)]

    # Once nothing maps it (here the replicas are gone), a holder of the group's size now replaces it.
    unmapped = [p for p in pods if p.role != "replica"]
    fresh = run([a, b], nodes, unmapped, estimates=bigger)
    assert [(d.role, d.name) for d in fresh.delete] == [("weights", holder)]
    (created,) = [m for m in fresh.create if m["metadata"]["labels"][api.LABEL_ROLE] == "weights"]
    assert created["metadata"]["name"] != holder


def test_a_holder_that_replicas_map_stays_when_its_group_shrinks() -> None:
    """The other way round: the larger model leaves the group. Its holder stays for the other model's
    replicas, charged at its own (larger) size, so the packer never gives its memory away twice."""
    nodes = [node("n1", devices=1, device_gib=9)]  # 9 slices of 1 GiB
    a, b = model("a", 2, shareGroup="g"), model("b", 1, shareGroup="g")
    c = model("c", 1, memory={"kvCacheMiB": 1024})  # no group of a's: needs its own weights
    sizes = {a.key: estimate(weights=2048), b.key: replace(estimate(weights=2048), overhead_mib=2048)}
    sizes[c.key] = estimate(weights=3072)
    pods = as_pods(run([a, b], nodes, estimates=sizes).create)
    (holder,) = _holders(pods)
    assert next(p for p in pods if p.role == "weights").slices == 4  # 2 GiB of weights and b's 2 GiB
    gone_b = replace(b, deleting=True)
    left = run([a, gone_b], nodes, pods, estimates=sizes)
    assert [d.role for d in left.delete] == ["replica"] and not left.create
    pods = [p for p in _apply(pods, left) if p.model != "b"]
    assert _holders(pods) == [holder] and set(_mapped(pods).values()) == {holder}
    # 4 + 2 x 1 slices in use: c (3 for its weights, 1 replica) does not fit in the 3 left, as it would
    # were the holder counted at a's 2 slices.
    with_c = run([a, c], nodes, pods, estimates=sizes)
    assert not with_c.delete
    assert [m["metadata"]["labels"][api.LABEL_ROLE] for m in with_c.create] == ["placeholder"]


def _holder_manifest(result: Plan, name: str, pods: list[ObservedPod]) -> dict[str, Any]:
    refs = next(u for u in result.set_owners if u.kind == "Pod").owner_references
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


def test_an_offloaded_groups_pods_keep_resident_at_most_what_its_holder_pays_for() -> None:
    """Under async offload the holder's slices pay for the budget less the estimate's ring; the
    runtime's ring is smaller (its units are smaller than a layer), so left to the budget alone it kept
    more resident than that and the holder refused its limit. Holder and replicas get the cap alike."""
    m = model("big", 2, offload={"mode": "async", "deviceBudgetMiB": 8000, "prefetchDepth": 2})
    est = replace(estimate(weights=15_317), device_weights_mib=8000 - 834, staging_mib=834)
    result = run([m], [node("n1", devices=1)], estimates={m.key: est})
    assert roles(result.create) == ["replica", "replica", "weights"]
    for pod in result.create:
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["VNPU_OFFLOAD_BUDGET_MIB"] == "8000"
        assert env["VNPU_OFFLOAD_RESIDENT_MIB"] == str(8000 - 834)
    plain = run([model("small", 1)], [node("n1", devices=1)])
    for pod in plain.create:
        assert "VNPU_OFFLOAD_RESIDENT_MIB" not in {e["name"] for e in pod["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize(
    "offload", [None, {"mode": "async", "deviceBudgetMiB": 8000}], ids=["resident", "offloaded"]
)
def test_a_holder_pays_for_its_own_process_on_the_device_beside_the_weights(offload) -> None:
    """``memory.overheadMiB`` is what a runtime process takes on the device besides its data (the
    framework, the CUDA or CANN context: about 500 MiB per process on an H200). A weight-holder is such
    a process: its slices hold it beside the weights, or a full device ran past its memory by one
    context per holder. What it holds is still the weights alone: the resident cap its replicas plan to
    under offload, and the figure views count as shared."""
    spec = {"memory": {"kvCacheMiB": 1024, "overheadMiB": 512}} | ({"offload": offload} if offload else {})
    m = model("big", 2, **spec)
    weights = 7_166 if offload else 15_317
    est = {m.key: replace(estimate(weights=15_317), device_weights_mib=weights, overhead_mib=512)}
    result = run([m], [node("n1", devices=1, device_gib=32)], estimates=est)
    by_role = {p["metadata"]["labels"][api.LABEL_ROLE]: p for p in result.create}
    holder = by_role["weights"]
    assert holder["metadata"]["annotations"][api.ANNOTATION_SLICES] == str(
        api.slices_for_mib(weights + 512, 1024)
    )
    assert holder["metadata"]["annotations"][api.ANNOTATION_WEIGHTS_MIB] == str(weights)
    for pod in result.create:
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env.get("VNPU_OFFLOAD_RESIDENT_MIB") == (str(weights) if offload else None)
    # A second pass over its own result changes nothing.
    again = run([m], [node("n1", devices=1, device_gib=32)], as_pods(result.create), est)
    assert again.create == [] and again.delete == []


def test_models_of_equal_weights_held_otherwise_never_share_a_holder() -> None:
    """One explicit group, one source: a model without offload holds every weight on the device, an
    offloaded one holds them in host memory with a resident part its budget and depth decide. Sharing
    one holder, whichever model sorted first set its env: a resident replica then copied all the
    weights from host memory into its own slices on a GPU, or an offloaded one found a plan other than
    the holder's. Each way of holding is its own holder, on the same device if it fits."""
    resident = model("a", 1, shareGroup="g")
    offloaded = model("b", 1, shareGroup="g", offload={"mode": "async", "deviceBudgetMiB": 3000})
    other_budget = model("c", 1, shareGroup="g", offload={"mode": "async", "deviceBudgetMiB": 2000})
    models = [resident, offloaded, other_budget]
    estimates = {
        resident.key: estimate(),
        offloaded.key: replace(estimate(), device_weights_mib=2000, staging_mib=500),
        other_budget.key: replace(estimate(), device_weights_mib=1000, staging_mib=500),
    }
    result = run(models, [node("n1", devices=1, device_gib=32)], estimates=estimates)
    env_of = {
        p["metadata"]["name"]: {e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]}
        for p in result.create
    }
    holders = {
        env[sharing.ENV_WEIGHTS_ID]: (name, env) for name, env in env_of.items() if name.startswith("vnpu-w-")
    }
    assert len(holders) == 3  # one device, three holders
    for p in result.create:
        if p["metadata"]["labels"][api.LABEL_ROLE] != "replica":
            continue
        env = env_of[p["metadata"]["name"]]
        holder_name, holder_env = holders[env[sharing.ENV_WEIGHTS_ID]]
        assert p["metadata"]["annotations"]["vnpu.io/weight-holder"] == holder_name
        for var in ("VNPU_OFFLOAD_BUDGET_MIB", "VNPU_PREFETCH_DEPTH", "VNPU_OFFLOAD_RESIDENT_MIB"):
            assert env.get(var) == holder_env.get(var)
    assert {env.get("VNPU_OFFLOAD_BUDGET_MIB") for _, env in holders.values()} == {None, "3000", "2000"}
    # Without offload the identity is what it always was: an upgrade renames no other holder.
    plain = sharing.weights_id("file:///models/m.gguf", "", CONFIG.runtime_image)
    assert plain in holders and holders[plain][1].get("VNPU_OFFLOAD_BUDGET_MIB") is None
    second = run(models, [node("n1", devices=1, device_gib=32)], as_pods(result.create), estimates)
    assert second.create == [] and second.delete == []


def test_an_upgrade_rolls_an_offloaded_models_replicas_onto_its_new_holder(monkeypatch) -> None:
    """An older operator's offloaded pods carry an identity without the way of holding: the replicas
    are of another template and roll (surge first) onto a holder of the new identity, while the old
    holder stays for the old replicas that map it."""
    m = model("b", 2, offload={"mode": "async", "deviceBudgetMiB": 3000})
    est = {m.key: replace(estimate(), device_weights_mib=2000, staging_mib=500)}
    n = [node("n1", devices=2)]
    with monkeypatch.context() as older:  # the operator before the way of holding was in the identity
        older.setattr(planner, "_holding_generation", lambda spec: "")
        older.setattr(
            planner,
            "model_weights_id",
            lambda model, config: sharing.weights_id(
                model.spec.source.uri, "", model.spec.image(config.runtime_image)
            ),
        )
        old = as_pods(run([m], n, estimates=est).create)
    result = run([m], n, old, est)
    assert result.delete == []  # surge: nothing goes before its successor is Ready
    created = [p for p in result.create if p["metadata"]["labels"][api.LABEL_ROLE] == "replica"]
    assert len(created) == 1  # maxSurge 25% of 2 replicas: one at a time
    ids = {
        e["value"]
        for p in created
        for e in p["spec"]["containers"][0]["env"]
        if e["name"] == sharing.ENV_WEIGHTS_ID
    }
    assert ids == {planner.model_weights_id(m, CONFIG)}
    # Pass after pass, each new pod Ready at once: the old replicas go as their successors are Ready,
    # then their holder; at the end every pod is of the new identity.
    pods = [*old, *as_pods(result.create)]
    for _ in range(8):
        step = run([m], n, pods, est)
        deleted = {d.name for d in step.delete}
        pods = [p for p in pods if p.name not in deleted] + as_pods(step.create)
    assert not {p.name for p in pods} & {p.name for p in old}
    fresh = run([m], n, estimates=est).create
    assert {p.name for p in pods} == {p["metadata"]["name"] for p in fresh}


@pytest.mark.parametrize(
    ("offload", "holder_memory"),
    [
        ({"mode": "async", "deviceBudgetMiB": 8000, "prefetchDepth": 2}, ("16341Mi", "17365Mi")),
        (None, ("1Gi", "2Gi")),
    ],
    ids=["offloaded", "resident"],
)
def test_an_offloaded_holder_asks_host_memory_for_the_weights_it_keeps_there(offload, holder_memory) -> None:
    """``runtime.resources`` sizes a replica, which holds no weights; an offloaded group's holder keeps
    every weight in host memory for its replicas to stream from, so its memory request and limit add
    them (15,317 MiB here), or it met the replicas' limit as it loaded and was OOM-killed in a loop.
    A holder whose arena is on the device takes the replicas' values as they are."""
    resources = {"requests": {"memory": "1Gi", "cpu": "1"}, "limits": {"memory": "2Gi"}}
    spec = {"runtime": {"resources": resources}} | ({"offload": offload} if offload else {})
    m = model("big", 1, **spec)
    est = replace(estimate(weights=15_317), device_weights_mib=8000 - 834 if offload else 15_317)
    result = run([m], [node("n1", devices=1)], estimates={m.key: est})
    by_role = {pod["metadata"]["labels"][api.LABEL_ROLE]: pod for pod in result.create}
    holder = by_role["weights"]["spec"]["containers"][0]["resources"]
    replica = by_role["replica"]["spec"]["containers"][0]["resources"]
    assert (holder["requests"]["memory"], holder["limits"]["memory"]) == holder_memory
    assert holder["requests"]["cpu"] == "1"
    assert (replica["requests"]["memory"], replica["limits"]["memory"]) == ("1Gi", "2Gi")


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
            {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
            {"name": "share-key", "secret": {"secretName": sharing.secret_name(m.spec.share_group),
                                              "defaultMode": 0o440}},
            {"name": "scratch", "emptyDir": {}},
        ]  # fmt: skip
        (container,) = pod["spec"]["containers"]
        assert container["volumeMounts"] == [
            {"name": "model", "mountPath": "/mnt/pvc/models", "readOnly": True},
            {"name": "share-key", "mountPath": sharing.KEY_MOUNT_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": "/tmp"},
        ]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["VNPU_MODEL_URI"] == "pvc://models/smollm2/m.gguf"
        assert env["VNPU_MAX_CONTEXT"] == "4096"
        assert env["VNPU_MAX_BATCH"] == "2" and env["VNPU_DEFAULT_PRIORITY"] == "0"
        # The share identity: namespace from the API server, group, weights, and where the key is.
        namespace_env = next(e for e in container["env"] if e["name"] == sharing.ENV_SHARE_NAMESPACE)
        assert namespace_env == {
            "name": sharing.ENV_SHARE_NAMESPACE,
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        }
        assert env[sharing.ENV_SHARE_GROUP] == m.spec.share_group
        assert env[sharing.ENV_WEIGHTS_ID] == sharing.weights_id(
            "pvc://models/smollm2/m.gguf", "q4_1", CONFIG.runtime_image
        )
        assert env[sharing.ENV_SHARE_KEY_FILE] == sharing.KEY_FILE
        uid = sharing.share_uid("ns", m.spec.share_group)
        # The restricted Pod Security profile, pod and container level.
        assert pod["spec"]["securityContext"] == {
            "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }  # fmt: skip
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        }  # fmt: skip
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert env["TMPDIR"] == "/tmp"
        assert "VNPU_MODEL_DTYPE" not in env, "a file quantisation is not a runtime dtype"
    # How they stop: a replica's grace covers its drain of the requests in flight; its holder waits for
    # it to detach, past that grace, and is itself killed only after that wait.
    grace = {pod["metadata"]["labels"][api.LABEL_ROLE]: pod["spec"]["terminationGracePeriodSeconds"]
             for pod in result.create}  # fmt: skip
    assert api.REPLICA_DRAIN_S < grace["replica"] < api.HOLDER_DRAIN_S < grace["weights"]


def test_a_groups_key_secret_comes_first_and_its_pods_follow_once_it_exists() -> None:
    a, b = model("a", 2, shareGroup="g"), model("b", 1, shareGroup="g")
    nodes = [node("n1", devices=1)]
    first = run([a, b], nodes, secrets=[])
    assert first.create == [] and [(x.namespace, x.share_group) for x in first.create_secrets] == [
        ("ns", "g")
    ]
    assert [r.name for r in first.create_secrets[0].owners] == ["a", "b"]  # owned by the group's models
    assert {s.status["phase"] for s in first.statuses} == {"Running"}  # placed; pods wait for the key
    second = run([a, b], nodes, secrets=keys_for([a]))
    assert roles(second.create) == ["replica", "replica", "replica", "weights"]
    assert second.create_secrets == []
    (owners,) = [u for u in second.set_owners if u.kind == "Secret"]  # the observed Secret had no owners
    assert sorted(r["uid"] for r in owners.owner_references) == ["uid-a", "uid-b"]


def test_two_namespaces_with_the_same_model_never_share_a_holder_a_key_or_a_user() -> None:
    team_a, team_b = model("chat", 2, ns="team-a"), model("chat", 2, ns="team-b")
    assert team_a.spec.share_group == team_b.spec.share_group  # the same default group name
    result = run([team_a, team_b], [node("n1", devices=1)])
    holders = [p for p in result.create if p["metadata"]["labels"][api.LABEL_ROLE] == "weights"]
    assert sorted(h["metadata"]["namespace"] for h in holders) == ["team-a", "team-b"]
    for pod in result.create:
        ns = pod["metadata"]["namespace"]
        if pod["metadata"]["labels"][api.LABEL_ROLE] == "replica":
            holder = pod["metadata"]["annotations"][api.ANNOTATION_WEIGHT_HOLDER]
            assert holder in {h["metadata"]["name"] for h in holders if h["metadata"]["namespace"] == ns}
    users = {p["metadata"]["namespace"]: p["spec"]["securityContext"]["runAsUser"] for p in result.create}
    assert users["team-a"] != users["team-b"]
    # Two groups, two holders' worth of weights on the one device: nothing is shared across namespaces.
    assert all(s.saved_mib == 4096 for s in result.statuses)


def test_a_source_change_rolls_the_holder_with_the_replicas() -> None:
    nodes = [node("n1", devices=1)]
    old = model("a", 2)
    pods = as_pods(run([old], nodes).create)
    new = model("a", 2, source={"uri": "file:///models/m-v2.gguf"}, shareGroup=old.spec.share_group)
    result = run([new], nodes, pods, secrets=keys_for([old]))
    old_holder = next(p for p in pods if p.role == "weights")
    new_holder = next(p for p in result.create if p["metadata"]["labels"][api.LABEL_ROLE] == "weights")
    assert new_holder["metadata"]["name"] != old_holder.name
    assert old_holder.name not in {d.name for d in result.delete}, "old replicas still map it"
    env = {e["name"]: e.get("value") for e in new_holder["spec"]["containers"][0]["env"]}
    assert env["VNPU_MODEL_URI"] == "file:///models/m-v2.gguf"
    for replica in (p for p in result.create if p["metadata"]["labels"][api.LABEL_ROLE] == "replica"):
        # New replicas attach to the new holder only: its weights id is in their identity.
        assert (
            replica["metadata"]["annotations"][api.ANNOTATION_WEIGHT_HOLDER] == new_holder["metadata"]["name"]
        )
        renv = {e["name"]: e.get("value") for e in replica["spec"]["containers"][0]["env"]}
        assert renv[sharing.ENV_WEIGHTS_ID] == env[sharing.ENV_WEIGHTS_ID]


def test_a_new_key_rolls_the_group_without_taking_it_down_first() -> None:
    nodes = [node("n1", devices=1)]
    m = model("a", 2)
    pods = as_pods(run([m], nodes).create)
    # Someone deleted the Secret: a new one is planned and the running pods stay meanwhile.
    gone = run([m], nodes, pods, secrets=[])
    assert len(gone.create_secrets) == 1 and gone.delete == [] and gone.create == []
    # The new Secret (a new uid: a new key) is there: the group's pods roll to new names, the old
    # ones going only as the new ones are Ready.
    rolled = run([m], nodes, pods, secrets=keys_for([m], uid="key-2"))
    assert rolled.delete == [] and len(rolled.create) == 2  # a new holder and one surge replica
    assert not {p["metadata"]["name"] for p in rolled.create} & {p.name for p in pods}
    next_ = run([m], nodes, [*pods, *as_pods(rolled.create)], secrets=keys_for([m], uid="key-2"))
    assert {d.name for d in next_.delete} <= {p.name for p in pods} and next_.delete


def test_a_key_secret_goes_once_its_group_has_no_model_and_no_pod() -> None:
    nodes = [node("n1", devices=1)]
    m = model("a", 1)
    pods = as_pods(run([m], nodes).create)
    deleting = ObservedModel(m.namespace, m.name, m.uid, m.generation, m.spec, deleting=True)
    while_pods_run = run([deleting], nodes, pods, secrets=keys_for([m]))
    assert while_pods_run.delete_secrets == []
    after = run([deleting], nodes, [], secrets=keys_for([m]))
    assert [x.name for x in after.delete_secrets] == [sharing.secret_name(m.spec.share_group)]


def test_a_node_whose_device_plugin_predates_per_device_resources_is_not_used() -> None:
    manifest = npu_node_manifest("old", devices=1, device_mib=16 * 1024)
    inventory = manifest["metadata"]["annotations"][api.ANNOTATION_DEVICES].replace(
        ',"resource":"vnpu.io/memory-0"', ""
    )
    manifest["metadata"]["annotations"][api.ANNOTATION_DEVICES] = inventory
    manifest["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    old = parse_node(manifest)
    assert "predates vnpu 0.2" in old.inventory_error
    result = run([model("a", 1)], [old])
    assert result.create == [] or roles(result.create) == ["placeholder"]


def test_an_unhealthy_device_without_a_resource_of_its_own_leaves_the_node_usable() -> None:
    """The device plugin gives a device whose index another device holds no resource (it is unhealthy):
    that is not a plugin older than per-device resources, and the node's other devices take replicas."""
    manifest = npu_node_manifest("dup", devices=2, device_mib=16 * 1024)
    inventory = json.loads(manifest["metadata"]["annotations"][api.ANNOTATION_DEVICES])
    inventory["devices"][1] |= {"index": 0, "resource": "", "health": "Unhealthy", "reason": "index 0 taken"}
    manifest["metadata"]["annotations"][api.ANNOTATION_DEVICES] = json.dumps(inventory)
    manifest["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    dup = parse_node(manifest)
    assert dup.inventory_error == ""
    result = run([model("a", 1)], [dup])
    assert roles(result.create) == ["replica", "weights"]
    for pod in result.create:
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert [r for r in limits if r.startswith("vnpu.io/")] == [api.device_resource(0)]


def test_a_pod_the_kubelet_refused_at_admission_is_replaced() -> None:
    """Right after a kubelet restart, pods admitted before the device plugin registered again end
    Failed (UnexpectedAdmissionError) for good: the pass deletes them, the next creates them anew."""
    nodes = [node("n1", devices=1)]
    m = model("a", 2)
    created = run([m], nodes).create
    pods = as_pods(created)
    failed_name = next(p.name for p in pods if p.role == "replica")
    manifest = next(x for x in created if x["metadata"]["name"] == failed_name)
    refused = parse_pod(
        {**manifest, "status": {"phase": "Failed", "reason": "UnexpectedAdmissionError",
                                "message": "Allocate failed due to no healthy devices present"}}
    )  # fmt: skip
    pods = [refused if p.name == failed_name else p for p in pods]
    result = run([m], nodes, pods)
    (deletion,) = result.delete
    assert deletion.name == failed_name and "UnexpectedAdmissionError" in deletion.reason
    assert result.create == []  # same name: created once the failed pod is gone
    after = run([m], nodes, [p for p in pods if p.name != failed_name])
    assert [x["metadata"]["name"] for x in after.create] == [failed_name]


DEFRAGMENT = OperatorConfig(defragment=True, defragment_max_moves=1)


def fragmented_pods() -> tuple[list[ObservedModel], list[Any], dict[Any, MemoryEstimate], list[ObservedPod]]:
    """``a`` (5 GiB) beside a deleted 10 GiB model on npu0, ``b`` (5 GiB) alone on npu1: one device
    would do."""
    nodes = [node("n1", devices=2)]
    a, b, c = model("a", 1), model("b", 1, shareGroup="gb"), model("c", 1, shareGroup="gc")
    est = {a.key: estimate(), b.key: estimate(), c.key: estimate(weights=8192, per_replica=2048)}
    pods = as_pods(run([a, c], nodes, estimates=est).create)
    pods += as_pods(run([a, b, c], nodes, pods, estimates=est).create)
    gone = {d.name for d in run([a, b], nodes, pods, estimates=est).delete}
    pods = [p for p in pods if p.name not in gone]
    assert len({p.device for p in pods}) == 2
    return [a, b], nodes, est, pods


def test_defragmentation_moves_make_before_break_one_batch_at_a_time() -> None:
    models, nodes, est, pods = fragmented_pods()
    assert run(models, nodes, pods, estimates=est).create == []  # sticky by default
    first = run(models, nodes, pods, estimates=est, config=DEFRAGMENT)
    assert first.delete == []  # the pod it replaces serves until the new one is Ready
    (moved,) = [p for p in first.create if p["metadata"]["labels"][api.LABEL_ROLE] == "replica"]
    old = next(p for p in pods if p.uid == moved["metadata"]["annotations"][api.ANNOTATION_REPLACES])
    assert (old.model, old.replica) == (moved["metadata"]["labels"][api.LABEL_MODEL], 0)
    assert moved["metadata"]["annotations"][api.ANNOTATION_DEVICE] != old.device
    mine = next(s for s in first.statuses if s.model.name == old.model)
    assert [e.reason for e in mine.events].count("Defragmenting") == 1
    assert mine.status["phase"] == "Ready" and mine.status["readyReplicas"] == 1
    # Starting: nothing goes, nothing more moves; a restarted operator reads the same from the pods.
    starting = [*pods, *as_pods(first.create, ready=False)]
    waiting = run(models, nodes, starting, estimates=est, config=DEFRAGMENT)
    assert waiting.create == [] and waiting.delete == []
    assert all(s.status["readyReplicas"] == 1 for s in waiting.statuses)
    # Given up (the new pod deleted by hand): the old pod is the replica again, nothing else moves.
    abandoned = [replace(p, terminating=True) if p.replaces else p for p in starting]
    kept = run(models, nodes, abandoned, estimates=est, config=DEFRAGMENT)
    assert kept.create == [] and all(d.name != old.name for d in kept.delete)
    # Ready: the old replica goes; then its holder, once the replica is gone (while it terminates, it
    # finishes its requests in flight on the holder's weights).
    ready = [*pods, *as_pods(first.create)]
    done = run(models, nodes, ready, estimates=est, config=DEFRAGMENT)
    assert [d.name for d in done.delete] == [old.name] and done.create == []
    assert "defragmentation" in done.delete[0].reason
    terminating = [replace(p, terminating=True) if p.name == old.name else p for p in ready]
    draining = run(models, nodes, terminating, estimates=est, config=DEFRAGMENT)
    assert draining.delete == [] and draining.create == []
    gone = [p for p in ready if p.name != old.name]
    holder = run(models, nodes, gone, estimates=est, config=DEFRAGMENT)
    assert [d.name for d in holder.delete] == [old.weight_holder]
    left = [p for p in ready if p.name not in (old.name, old.weight_holder)]
    assert len({p.device for p in left}) == 1
    settled = run(models, nodes, left, estimates=est, config=DEFRAGMENT)
    assert settled.create == [] and settled.delete == []
    # Moved back later: the new pod takes the old pod's name, and the claim the first move left on
    # its successor names the old pod's uid, so it never reaches the new one.
    (successor,) = [p for p in left if p.replaces]
    back = replace(old, uid="uid-back", replaces=successor.uid, ready=False)
    moving = run(models, nodes, [*left, back], estimates=est, config=DEFRAGMENT)
    assert moving.delete == [] and roles(moving.create) == ["weights"]  # the holder it maps, again
    arrived = run(models, nodes, [*left, replace(back, ready=True)], estimates=est, config=DEFRAGMENT)
    assert [d.name for d in arrived.delete] == [successor.name]


def settle(models, nodes, pods, estimates, config) -> list[ObservedPod]:
    """Passes until nothing changes: each pass's deletions go, its creations start not Ready and are
    Ready by the next pass. At every pass each model still serves from a Ready replica."""
    for _ in range(12):
        result = run(models, nodes, pods, estimates=estimates, config=config)
        assert all(s.status["readyReplicas"] >= 1 for s in result.statuses), "a model stopped serving"
        if not result.create and not result.delete and all(p.ready for p in pods):
            return pods
        pods = step(pods, result)
    raise AssertionError("did not settle")


def test_a_move_in_flight_yields_to_a_deletion_a_scale_up_and_a_spec_change() -> None:
    """The worst moments for a move: its model is deleted, scaled up or changed while the new pod is
    still starting. The move never costs the model its serving replica, and never outlives it."""
    models, nodes, est, pods = fragmented_pods()
    first = run(models, nodes, pods, estimates=est, config=DEFRAGMENT)
    starting = [*pods, *as_pods(first.create, ready=False)]
    (successor,) = [p for p in starting if p.replaces]
    old = next(p for p in pods if p.uid == successor.replaces)
    assert successor.model == "a"
    b = models[1]
    # Deleted: both pods of the move go, with the holders they map; b keeps everything.
    gone = run([b], nodes, starting, estimates=est, config=DEFRAGMENT)
    assert gone.create == []
    assert {d.name for d in gone.delete} == {
        old.name,
        successor.name,
        old.weight_holder,
        successor.weight_holder,
    }
    # Scaled up: the new replica joins and the move completes (the old pod serves until its successor
    # is Ready); a ends with two replicas on b's device, and the old pod is gone.
    scaled = settle([model("a", 2), b], nodes, starting, est, DEFRAGMENT)
    replicas = [p for p in scaled if p.role == "replica"]
    assert sorted((p.model, p.replica) for p in replicas) == [("a", 0), ("a", 1), ("b", 0)]
    assert old.name not in {p.name for p in scaled} and len({p.device for p in scaled}) == 1
    # Changed (a new image) while the successor starts: the successor is of the old template, so the
    # rollout replaces it; a ends on one pod of the new template, and the old pod is gone.
    changed = model("a", 1, runtime={"image": "vnpu:2"})
    rolled = settle([changed, b], nodes, starting, est, DEFRAGMENT)
    (last,) = [p for p in rolled if p.role == "replica" and p.model == "a"]
    assert last.name not in {p.name for p in starting} and old.name not in {p.name for p in rolled}


def test_defragmentation_waits_for_a_settled_cluster() -> None:
    models, nodes, est, pods = fragmented_pods()
    not_ready = [replace(p, ready=False) if p.role == "weights" else p for p in pods]
    assert run(models, nodes, not_ready, estimates=est, config=DEFRAGMENT).create == []
    scaled = [model("a", 2), models[1]]  # a replica to add: that comes first
    result = run(scaled, nodes, pods, estimates=est, config=DEFRAGMENT)
    assert result.delete == [] and all(
        api.ANNOTATION_REPLACES not in p["metadata"]["annotations"] for p in result.create
    )


def test_a_replaces_annotation_written_by_hand_deletes_nothing_it_should_not() -> None:
    """A tenant can annotate its own pods; a claim on another model's pod, a cycle, or two claims on one
    pod are ignored: the duplicate index resolves as any other and no other model loses a pod."""
    models, nodes, est, pods = fragmented_pods()
    a = next(p for p in pods if p.role == "replica" and p.model == "a")
    b = next(p for p in pods if p.role == "replica" and p.model == "b")
    hostile = [
        replace(a, replaces=b.uid)
        if p.name == a.name
        else replace(p, replaces=a.uid)
        if p.name == b.name
        else p
        for p in pods
    ]
    for attempt in (hostile, [replace(p, replaces=b.uid) if p.name == a.name else p for p in pods]):
        result = run(models, nodes, attempt, estimates=est)
        assert result.delete == [] and result.create == []
        assert all(s.status["readyReplicas"] == 1 for s in result.statuses)


def step(pods: list[ObservedPod], result: Plan) -> list[ObservedPod]:
    """The pods once ``result`` is applied: its deletions gone, what was there Ready, its creations
    starting (Ready by the next pass)."""
    gone = {(d.namespace, d.name) for d in result.delete}
    kept = [replace(p, ready=True) for p in pods if (p.namespace, p.name) not in gone]
    return kept + as_pods(result.create, ready=False)


def slices_by_device(pods: list[ObservedPod]) -> dict[tuple[str, str], int]:
    """Slices the pods hold per (node, device): what the scheduler and the device plugin would allow."""
    used: dict[tuple[str, str], int] = {}
    for p in pods:
        if p.role != "placeholder" and p.node and p.device:
            used[(p.node, p.device)] = used.get((p.node, p.device), 0) + p.slices
    return used


def test_a_rollout_that_keeps_the_weights_uses_the_running_holder_on_a_full_device() -> None:
    """New-template replicas of unchanged weights map the holder the old ones map (the same pod): its
    weights are not charged twice, so the rollout proceeds in the 2 free slices instead of waiting for
    5 that never come."""
    nodes = [node("n1", devices=1)]  # 16 slices
    est = {("ns", "a"): estimate()}  # weights 4 slices, 1 per replica
    pods = as_pods(run([model("a", 10)], nodes, estimates=est).create)  # 14 of 16
    (holder,) = [p.name for p in pods if p.role == "weights"]
    (old_template,) = {p.template for p in pods if p.role == "replica"}
    changed = model("a", 10, memory={"kvCacheMiB": 1000})  # a new pod template, the same sizes
    for _ in range(20):
        result = run([changed], nodes, pods, estimates=est)
        assert result.statuses[0].status["readyReplicas"] >= 10
        assert not [d for d in result.delete if d.role == "weights"]
        assert {d.reason for d in result.delete if d.role == "replica"} <= {
            "replaced by the new pod template"
        }
        holders = {x["weightHolder"] for x in result.statuses[0].status["placements"]}
        assert holders <= {holder}
        if not result.create and not result.delete and all(p.ready for p in pods):
            break
        pods = step(pods, result)
        assert slices_by_device(pods)[("n1", "n1-npu0")] <= 16
    else:
        raise AssertionError("did not settle")
    replicas = [p for p in pods if p.role == "replica"]
    assert len(replicas) == 10 and old_template not in {p.template for p in replicas}
    assert [p.name for p in pods if p.role != "replica"] == [holder]


def test_two_weights_in_one_explicit_share_group_each_keep_their_running_holder() -> None:
    """An explicit shareGroup named by two models of different weights is two weight copies: each
    model's rollout maps its own running holder (the second model's, too), so neither rollout charges
    its weights twice and stalls on a full device."""
    nodes = [node("n1", devices=2)]  # 16 slices each

    def family(name: str, kv: int) -> ObservedModel:
        source = {"uri": f"file:///models/{name}.gguf"}
        return model(name, 10, source=source, shareGroup="family", memory={"kvCacheMiB": kv})

    est = {("ns", "a"): estimate(), ("ns", "b"): estimate()}  # weights 4 slices, 1 per replica
    pods = as_pods(run([family("a", 1024), family("b", 1024)], nodes, estimates=est).create)  # 14 of 16 each
    holders = sorted(p.name for p in pods if p.role == "weights")
    assert len(holders) == 2
    (old_b,) = {p.template for p in pods if p.model == "b"}
    for _ in range(30):
        result = run([family("a", 1024), family("b", 1000)], nodes, pods, estimates=est)
        assert not [d for d in result.delete if d.role == "weights"]
        if not result.create and not result.delete and all(p.ready for p in pods):
            break
        pods = step(pods, result)
        assert max(slices_by_device(pods).values()) <= 16
    else:
        raise AssertionError("b's rollout did not settle")
    assert sorted(p.name for p in pods if p.role == "weights") == holders
    b = [p for p in pods if p.model == "b"]
    assert len(b) == 10 and {p.role for p in b} == {"replica"} and old_b not in {p.template for p in b}


def test_a_rollout_whose_holder_is_being_recreated_evicts_no_other_model() -> None:
    """The holder the old replicas map was evicted as team-a changes kvCacheMiB: the new replica comes
    with a new copy of it under the same name, which the old replicas then map too. Counted once, the
    device has room for everything; counted twice, team-b's Ready replica was taken for it."""
    nodes = [node("n1", devices=1)]  # 16 slices

    def chat(kv: int) -> ObservedModel:
        return model("chat", 2, ns="team-a", memory={"kvCacheMiB": kv})

    x = model("x", 1, ns="team-b", memory={"kvCacheMiB": 2048})

    def est(kv: int) -> dict[tuple[str, str], MemoryEstimate]:
        return {("team-a", "chat"): estimate(per_replica=kv), x.key: estimate(per_replica=2048)}

    pods = as_pods(run([chat(1024), x], nodes, estimates=est(1024)).create)  # 4+1+1 and 4+2 of 16
    team_b = sorted(p.name for p in pods if p.namespace == "team-b")
    pods = [p for p in pods if not (p.namespace == "team-a" and p.role == "weights")]
    for _ in range(12):
        result = run([chat(2048), x], nodes, pods, estimates=est(2048))
        assert not [d for d in result.delete if d.namespace == "team-b"]
        assert not [c for c in result.create if c["metadata"]["namespace"] == "team-b"]
        assert {s.model.name: s.status["readyReplicas"] for s in result.statuses} == {"chat": 2, "x": 1}
        if not result.create and not result.delete and all(p.ready for p in pods):
            break
        pods = step(pods, result)
        assert slices_by_device(pods)[("n1", "n1-npu0")] <= 16
    else:
        raise AssertionError("did not settle")
    assert sorted(p.name for p in pods if p.namespace == "team-b") == team_b
    assert sorted((p.role, p.slices) for p in pods if p.namespace == "team-a") == [
        ("replica", 2),
        ("replica", 2),
        ("weights", 4),
    ]


def test_a_terminating_holder_still_mapped_is_counted_once() -> None:
    """A holder being deleted whose replicas still run (their model's estimate fails, so they are kept
    as they are) holds its memory once, not once as terminating and again as mapped: the model beside
    it on the full device keeps every replica."""
    nodes = [node("n1", devices=1)]  # 16 slices
    a, b = model("a", 2), model("b", 6, shareGroup="gb")
    est = {a.key: estimate(), b.key: estimate()}
    pods = as_pods(run([a, b], nodes, estimates=est).create)  # 4+2 and 4+6: full
    (holder,) = [p.name for p in pods if p.role == "weights" and p.share_group != "gb"]
    pods = [replace(p, terminating=True) if p.name == holder else p for p in pods]
    failing = {**est, a.key: EstimateError("cannot read file:///models/m.gguf: stale NFS handle")}
    for _ in range(3):
        result = run([a, b], nodes, pods, estimates=failing)
        assert result.create == [] and result.delete == []
        assert {s.model.name: s.status["readyReplicas"] for s in result.statuses} == {"a": 2, "b": 6}


def test_a_rollout_takes_no_room_from_another_tenants_running_replicas() -> None:
    """team-a changes kvCacheMiB on a full device: its old replicas run, so it is not a waking model
    offered its holder's device ahead of everyone. team-b's Ready replicas (sorting after team-a)
    stay where they run; team-a's first new replica goes to the free device, the second to the room
    its retired old replica leaves (beside the holder there)."""
    nodes = [node("n1", devices=2)]
    a, b = model("chat", 2, ns="team-a"), model("chat", 6, ns="team-b")
    est = {a.key: estimate(), b.key: estimate()}
    pods = as_pods(run([a, b], nodes, estimates=est).create)
    assert slices_by_device(pods) == {("n1", "n1-npu0"): 16}  # 4+2 and 4+6
    team_b = sorted(p.name for p in pods if p.namespace == "team-b")
    changed = model("chat", 2, ns="team-a", memory={"kvCacheMiB": 1000})  # a new template, same sizes
    for _ in range(12):
        result = run([changed, b], nodes, pods, estimates=est)
        assert not [d for d in result.delete if d.namespace == "team-b"]
        assert not [c for c in result.create if c["metadata"]["namespace"] == "team-b"]
        assert [s.status["readyReplicas"] for s in result.statuses] == [2, 6]
        if not result.create and not result.delete and all(p.ready for p in pods):
            break
        pods = step(pods, result)
    else:
        raise AssertionError("did not settle")
    assert sorted(p.name for p in pods if p.namespace == "team-b") == team_b
    (new,) = {p.template for p in as_pods(run([changed], nodes).create) if p.role == "replica"}
    assert sorted((p.role, p.device, p.template) for p in pods if p.namespace == "team-a") == [
        ("replica", "n1-npu0", new),
        ("replica", "n1-npu1", new),
        ("weights", "n1-npu0", None),
        ("weights", "n1-npu1", None),
    ]


LONG = "llama-3-1-8b-instruct-q4-k-m-customer-support-finetune-v"  # 56 characters


def test_two_long_model_names_that_differ_past_the_cut_get_their_own_pods() -> None:
    """Pod names are cut to 63 characters: two models of one namespace, template and group whose names
    differ only past the cut each get their own replica and placeholder, and each counts only its own
    Ready replica."""
    a, b = model(LONG + "1", 1, modelName="llama"), model(LONG + "2", 1, modelName="llama")
    nodes = [node("n1", devices=1)]
    first = run([a, b], nodes)
    replicas = [p for p in first.create if p["metadata"]["labels"][api.LABEL_ROLE] == "replica"]
    assert sorted(p["metadata"]["labels"][api.LABEL_MODEL] for p in replicas) == [a.name, b.name]
    assert len({p["metadata"]["name"] for p in replicas}) == 2
    assert all(len(p["metadata"]["name"]) <= 63 for p in first.create)
    pods = as_pods(first.create)
    second = run([a, b], nodes, pods)
    assert second.create == [] and second.delete == []
    for s in second.statuses:
        (placed,) = s.status["placements"]
        assert next(p for p in pods if p.name == placed["pod"]).model == s.model.name
        assert s.status["readyReplicas"] == 1
    # No room at all: one placeholder each.
    est = {m.key: estimate(weights=32 * 1024) for m in (a, b)}
    pending = run([a, b], nodes, estimates=est)
    names = [p["metadata"]["name"] for p in pending.create]
    assert len(names) == 2 and len(set(names)) == 2 and all(len(n) <= 63 for n in names)


def test_names_that_fit_are_the_names_they_always_were() -> None:
    """An upgrade renames (and so restarts) nothing whose name was not cut."""
    assert replica_pod_name("llama", 0, "n1", "n1-npu0", "1/t") == "llama-0-f39857"
    assert replica_pod_name("a" * 54, 3, "n1", "n1-npu0", "1/t") == "a" * 54 + "-3-f39857"  # 63: fits
    assert placeholder_pod_name("llama", 3) == "llama-pending-3"


def test_a_replica_under_its_old_cut_name_is_rolled_make_before_break() -> None:
    """A long-named model's replicas named before names were kept distinct are of its current template
    but not under the plan's name: they are replaced like an older template, never below the Ready
    count, and nothing else restarts."""
    m = model(LONG + "1", 2, modelName="llama")
    nodes = [node("n1", devices=1)]

    def cut(name: str) -> str:  # the old naming: the model name cut, nothing of it kept
        suffix = name.rsplit("-", 2)
        return f"{m.name[: 63 - len(suffix[1]) - len(suffix[2]) - 2].rstrip('-.')}-{suffix[1]}-{suffix[2]}"

    created = as_pods(run([m], nodes).create)
    pods = [replace(p, name=cut(p.name)) if p.role == "replica" else p for p in created]
    old = sorted(p.name for p in pods if p.role == "replica")
    assert len(set(old)) == 2 and not set(old) & {p.name for p in created}
    for _ in range(12):
        result = run([m], nodes, pods)
        assert result.statuses[0].status["readyReplicas"] >= 2
        assert {d.name for d in result.delete} <= set(old)
        if not result.create and not result.delete and all(p.ready for p in pods):
            break
        pods = step(pods, result)
    else:
        raise AssertionError("did not settle")
    assert sorted(p.name for p in pods) == sorted(p.name for p in created)


def test_a_model_created_again_replaces_its_predecessors_pods_make_before_break() -> None:
    """``a`` is deleted and created again (a new uid) before the garbage collector got to its pods: they
    are not the new model's (the collector deletes them whenever it gets there), so new replicas owned
    by the new uid start beside them under other names (indices the old pods do not hold), and the old
    ones go only as those are Ready."""
    nodes = [node("n1", devices=1)]
    old = model("a", 3)
    pods = as_pods(run([old], nodes).create)
    left = sorted(p.name for p in pods if p.role == "replica")
    again = replace(old, uid="uid-a-2")
    for _ in range(20):
        result = run([again], nodes, pods)
        assert result.statuses[0].status["readyReplicas"] >= 3
        assert {d.name for d in result.delete} <= set(left)
        assert all("earlier model of the same name" in d.reason for d in result.delete)
        by_name = {p.name: p for p in pods}
        for x in result.statuses[0].status["placements"]:  # the plan's replicas: new pods, never old ones
            assert x["pod"] not in by_name or by_name[x["pod"]].owner_uids == ("uid-a-2",)
        if not result.create and not result.delete and all(p.ready for p in pods):
            break
        pods = step(pods, result)
    else:
        raise AssertionError("did not settle")
    replicas = [p for p in pods if p.role == "replica"]
    assert len(replicas) == 3 and all(p.owner_uids == ("uid-a-2",) for p in replicas)
    assert run([again], nodes, pods).statuses[0].status["readyReplicas"] == 3


def test_a_scaled_down_replica_keeps_its_holder_while_it_terminates_on_a_full_device() -> None:
    """8 replicas and their holder fill a device exactly. Scaled to 7, the replica that goes finishes
    its requests in flight on the holder's weights: the holder stays while it terminates, charged once
    (kept outside the plan, and the 7 that stay are not charged its weights again), so nothing else
    moves; once the replica is gone, nothing changes either."""
    nodes = [node("n1", devices=1)]
    est = estimate(weights=8192, per_replica=1024)
    full = model("llama", replicas=8)
    created = run([full], nodes, estimates={full.key: est}).create
    assert roles(created) == ["replica"] * 8 + ["weights"]
    pods = as_pods(created)
    fewer = model("llama", replicas=7)
    first = run([fewer], nodes, pods, estimates={fewer.key: est})
    (gone,) = first.delete
    assert first.create == []
    terminating = [replace(p, terminating=True) if p.name == gone.name else p for p in pods]
    draining = run([fewer], nodes, terminating, estimates={fewer.key: est})
    assert draining.create == [] and draining.delete == []
    (holder,) = [p for p in pods if p.role == api.ROLE_WEIGHTS]
    placements = draining.statuses[0].status["placements"]
    assert len(placements) == 7 and {x["weightHolder"] for x in placements} == {holder.name}
    after = run([fewer], nodes, [p for p in pods if p.name != gone.name], estimates={fewer.key: est})
    assert after.create == [] and after.delete == []


def test_a_replica_the_scheduler_has_not_bound_leaves_a_node_cordoned_since() -> None:
    """Placed on n1, then n1 is cordoned before the scheduler bound the replica: it would stay Pending
    there for as long as the cordon lasts. The pass places it on n2 and deletes the waiting pod; a
    bound replica on the cordoned node stays (a drain evicts it under its budget)."""
    pods = as_pods(run([model("a", 1)], [node("n1", devices=1)]).create)
    cordoned = [replace(node("n1", devices=1), schedulable=False), node("n2", devices=1)]
    assert run([model("a", 1)], cordoned, pods).delete == []
    waiting = [replace(p, bound=False) if p.role == api.ROLE_REPLICA else p for p in pods]
    result = run([model("a", 1)], cordoned, waiting)
    assert sorted(d.role for d in result.delete) == [api.ROLE_REPLICA, api.ROLE_WEIGHTS]  # (n1's holder too)
    created = [(c["metadata"]["labels"][api.LABEL_ROLE], c["metadata"]["annotations"][api.ANNOTATION_DEVICE])
               for c in result.create]  # fmt: skip
    assert (api.ROLE_REPLICA, "n2-npu0") in created


def test_a_deletion_carries_the_uid_of_the_pod_it_means() -> None:
    """Deleted with that uid as a precondition: a pod made again under the name since stays."""
    m = model("llama", replicas=2)
    nodes = [node("n1", devices=1)]
    pods = as_pods(run([m], nodes).create)
    (gone,) = run([replace(m, spec=replace(m.spec, replicas=1))], nodes, pods).delete
    assert gone.uid == next(p.uid for p in pods if p.name == gone.name) != ""
