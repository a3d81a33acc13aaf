"""The planner on a shared cluster: failures stay with their model, uncertainty keeps running pods,
capacity and status come from what really runs. Pure: no API server (tests/integration covers that)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import replace

import pytest
from test_planner import CONFIG, NOW, as_pods, estimate, keys_for, model, node, run

from vnpu import api
from vnpu.cluster.kwok import npu_node_manifest
from vnpu.memory import EstimateError
from vnpu.operator.config import PLACEHOLDER_PRIORITY_CLASS
from vnpu.operator.estimate_cache import EstimateCache
from vnpu.operator.planner import Failure
from vnpu.operator.pods import short_hash
from vnpu.operator.spec import Rollout, SpecError, parse_spec
from vnpu.operator.state import ObservedNode, parse_node, parse_pod


def conditions(update) -> dict:
    return {c["type"]: c for c in update.status["conditions"]}


def test_a_model_in_backoff_gets_no_writes_and_says_why_while_others_converge() -> None:
    bad, good = model("bad", 2, ns="quota"), model("good", 2, ns="team")
    failure = Failure('pods "x" is forbidden: exceeded quota', NOW + dt.timedelta(seconds=8), 3, "Forbidden")
    result = run([bad, good], [node("n1")], failures={"quota/bad": failure})
    assert {p["metadata"]["namespace"] for p in result.create} == {"team"}
    status = {u.model.name: u for u in result.statuses}
    degraded = conditions(status["bad"])["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "Forbidden"
    assert "exceeded quota" in degraded["message"]
    assert "Forbidden" in [e.reason for e in status["bad"].events]
    assert conditions(status["good"])["Degraded"]["status"] == "False"
    assert result.requeue_after == pytest.approx(8)
    # Once the backoff has passed, the model is planned (and written) again.
    later = run([bad, good], [node("n1")], failures={"quota/bad": replace(failure, retry_at=NOW)})
    assert {p["metadata"]["namespace"] for p in later.create} == {"quota", "team"}


def test_a_notready_node_keeps_its_pods_for_the_grace_period() -> None:
    m = model("a", 2, placement={"spreadAcrossNodes": True})
    pods = as_pods(run([m], [node("n1"), node("n2")]).create)

    def not_ready_since(seconds_ago: float):
        n = parse_node(
            {
                "metadata": {"name": "n2", "annotations": {api.ANNOTATION_DEVICES: _inventory("n2")}},
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "Unknown",
                            "lastTransitionTime": (NOW - dt.timedelta(seconds=seconds_ago)).strftime(
                                "%Y-%m-%dT%H:%M:%SZ"
                            ),
                        }
                    ]
                },
                "spec": {"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]},
            }
        )
        return [node("n1"), n, node("n3")]

    within = run([m], not_ready_since(60), pods)
    assert within.delete == [] and within.create == []
    assert within.requeue_after == pytest.approx(240)
    degraded = conditions(within.statuses[0])["Degraded"]
    assert degraded["reason"] == "NodeNotReady" and "n2" in degraded["message"]
    past = run([m], not_ready_since(301), pods)
    forced = [d for d in past.delete if d.force]
    assert forced and {p.node for p in pods if p.name in {d.name for d in forced}} == {"n2"}
    assert conditions(past.statuses[0])["Degraded"]["reason"] == "NodeLost"
    # Model pods tolerate the lifecycle controller's taints for exactly the grace period.
    replica = next(
        p for p in run([m], [node("n1")]).create if p["metadata"]["labels"][api.LABEL_ROLE] == "replica"
    )
    assert {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
            "tolerationSeconds": CONFIG.node_grace_seconds} in replica["spec"]["tolerations"]  # fmt: skip


def _inventory(name: str) -> str:
    from vnpu.cluster.kwok import simulated_inventory

    return simulated_inventory(name, 2, 16 * 1024, 1024).to_json()


def test_an_estimate_error_on_a_running_model_keeps_its_pods() -> None:
    m = model("a", 2)
    nodes = [node("n1")]
    pods = as_pods(run([m], nodes).create)
    result = run(
        [m], nodes, pods, estimates={m.key: EstimateError("cannot read hf://org/m: NFS stale handle")}
    )
    assert result.delete == [] and result.create == []
    status = result.statuses[0].status
    degraded = conditions(result.statuses[0])["Degraded"]
    assert status["phase"] == "Degraded" and degraded["reason"] == "EstimateFailed"
    assert "NFS stale handle" in degraded["message"] and status["readyReplicas"] == 2
    # The same error on a model that runs nothing yet: it fails with the reason, and creates nothing.
    fresh = run([model("b", 1)], nodes, estimates={("ns", "b"): EstimateError("set spec.weights.sizeMiB")})
    assert fresh.statuses[0].status["phase"] == "Failed" and fresh.create == []


def test_estimate_failures_are_retried_with_backoff_not_cached() -> None:
    now = [0.0]
    calls = []

    def flaky(spec, cache_dir=None, file_roots=(), block_size=None, read_files=True):
        calls.append(now[0])
        if len(calls) < 3:
            raise OSError("Stale file handle")
        return estimate()

    cache = EstimateCache("/models/hf", clock=lambda: now[0], estimate=flaky)
    m = model("a")
    assert isinstance(cache.get(m), EstimateError)
    assert isinstance(cache.get(m), EstimateError) and len(calls) == 1  # within its backoff
    assert cache.retry_in(m) == pytest.approx(1)
    now[0] = 1.0
    assert isinstance(cache.get(m), EstimateError) and cache.retry_in(m) == pytest.approx(2)
    now[0] = 3.0
    assert cache.get(m) == estimate() and cache.retry_in(m) is None
    now[0] = 100.0
    assert cache.get(m) == estimate() and len(calls) == 3  # a success is cached for the generation


def test_pods_anyone_else_made_that_hold_vnpu_memory_are_subtracted() -> None:
    foreign = parse_pod(
        {
            "metadata": {"namespace": "other", "name": "squatter"},
            "spec": {
                "nodeName": "n1",
                "containers": [{"resources": {"limits": {"vnpu.io/memory-0": "14", "cpu": "1"}}}],
            },
            "status": {"phase": "Running"},
        },
        managed=False,
    )
    result = run([model("a", 1)], [node("n1", devices=1)], [foreign])
    # 16 slices - 14 held = 2 free: weights (4) + a replica (1) no longer fit there.
    assert [p["metadata"]["labels"][api.LABEL_ROLE] for p in result.create] == ["placeholder"]
    finished = replace(foreign, finished=True)
    assert "placeholder" not in [
        p["metadata"]["labels"][api.LABEL_ROLE]
        for p in run([model("a", 1)], [node("n1", devices=1)], [finished]).create
    ]


def test_a_pod_labelled_ours_is_charged_what_its_requests_hold_not_what_its_annotation_says() -> None:
    """With the chart's pod admission policy off, a tenant can label a pod of its own as ours. Its
    requests are what the kubelet allocates, so they are what the packer must not give away."""
    a, b = model("a", 1, ns="team-a"), model("b", 1, ns="team-b")
    nodes = [node("n1", devices=1)]
    pods = as_pods(run([a], nodes).create)
    assert run([a], nodes, pods).create == []  # settled: a holder (4 slices) and a replica (1)
    # The replica, as team-a could have written it itself: the same labels and annotations, but
    # requests of 12 slices (the annotation still says 1).
    forged = []
    for p in run([a], nodes).create:
        if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_REPLICA:
            for c in p["spec"]["containers"]:
                limits = c["resources"]["limits"]
                for resource in [r for r in limits if api.is_vnpu_resource(r)]:
                    limits[resource] = c["resources"]["requests"][resource] = "12"
        forged.append(p)
    forged_pods = as_pods(forged)
    assert [p.slices for p in forged_pods if p.role == api.ROLE_REPLICA] == [1]
    # b's holder and replica (5 slices) fit beside the honest pods, not beside the forged one.
    honest = run([a, b], nodes, pods).create
    assert {p["metadata"]["labels"][api.LABEL_ROLE] for p in honest} == {"weights", "replica"}
    tricked = run([a, b], nodes, forged_pods).create
    assert [p["metadata"]["labels"][api.LABEL_ROLE] for p in tricked] == ["placeholder"]


def test_a_pod_labelled_our_placeholder_is_free_only_at_the_placeholder_class() -> None:
    """Our placeholders are not charged: the replicas they keep room for preempt them. A tenant (pod
    admission policy off) can pre-create the placeholder its unplaceable model is planned, bound to a
    device by nodeName and at its own priority: nothing preempts that one, so it is charged."""
    a, b = model("a", 1, ns="team-a"), model("b", 1, ns="team-b")
    nodes = [node("n1", devices=1)]
    estimates = {a.key: estimate(weights=40 * 1024), b.key: estimate()}  # a fits on no device
    [placeholder] = run([a], nodes, estimates={a.key: estimates[a.key]}).create
    assert placeholder["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_PLACEHOLDER
    assert placeholder["spec"]["priorityClassName"] == PLACEHOLDER_PRIORITY_CLASS

    def bound(manifest: dict, priority_class: str | None) -> dict:
        pod = json.loads(json.dumps(manifest))
        pod["spec"]["nodeName"] = "n1"
        pod["spec"].pop("priorityClassName")
        if priority_class:
            pod["spec"]["priorityClassName"] = priority_class
        for c in pod["spec"]["containers"]:
            for what in ("requests", "limits"):
                wanted = c["resources"][what]
                for resource in [r for r in wanted if api.is_vnpu_resource(r)]:
                    del wanted[resource]
                wanted["vnpu.io/memory-0"] = "16"  # the whole device
        return pod

    def roles_of_b(pod: dict) -> list[str]:
        created = run([a, b], nodes, as_pods([pod]), estimates=estimates).create
        return sorted(
            p["metadata"]["labels"][api.LABEL_ROLE] for p in created if p["metadata"]["namespace"] == "team-b"
        )

    # Ours, scheduled onto the device (a node came): b's replicas preempt it, so b is placed there.
    assert roles_of_b(bound(placeholder, PLACEHOLDER_PRIORITY_CLASS)) == ["replica", "weights"]
    # The tenant's own, at its own priority: b is not placed on memory nothing will give back.
    assert roles_of_b(bound(placeholder, None)) == ["placeholder"]


def test_a_model_named_like_anothers_cut_name_is_degraded_not_ready_on_the_others_pod() -> None:
    """A model name too long for a pod name is cut and tagged with a hash of it; another model of the
    namespace may be named exactly that. Their replicas' names then meet: the API server keeps one
    pod, and the model without one must say so, not count the other's pod as its own."""
    a_name = "chat-" + "x" * 55
    room = 63 - len("0-abcdef") - 1
    b_name = f"{a_name[: room - 7]}-{short_hash(a_name)}"
    a, b = model(a_name, 1, modelName="llama"), model(b_name, 1, modelName="llama")
    nodes = [node("n1", devices=1)]
    created = {}
    for p in as_pods(run([b, a], nodes).create):
        created.setdefault(p.name, p)  # the API server keeps the first pod of a name
    replicas = [p for p in created.values() if p.role == api.ROLE_REPLICA]
    assert len(replicas) == 1  # the collision itself: one pod for two models
    ready = [replace(p, ready=True, phase="Running") for p in created.values()]
    result = run([a, b], nodes, ready)
    status = {s.model.name: s.status for s in result.statuses}
    winner, loser = (a_name, b_name) if replicas[0].model == a_name else (b_name, a_name)
    assert status[winner]["readyReplicas"] == 1
    assert status[loser]["readyReplicas"] == 0
    degraded = next(c for c in status[loser]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "PodNameTaken"
    assert f"model {winner}'s" in degraded["message"]


def test_a_crash_looping_holder_makes_the_model_degraded_and_its_replicas_unready() -> None:
    m = model("a", 2)
    nodes = [node("n1", devices=1)]
    manifests = run([m], nodes).create
    crashing = []
    for manifest in manifests:
        status = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        if manifest["metadata"]["labels"][api.LABEL_ROLE] == "weights":
            status = {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [
                    {
                        "name": "weights",
                        "ready": False,
                        "restartCount": 2,
                        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}},
                    }
                ],
            }
        crashing.append(parse_pod({**manifest, "status": status}))
    result = run([m], nodes, crashing)
    status = result.statuses[0].status
    degraded = conditions(result.statuses[0])["Degraded"]
    assert degraded["reason"] == "CrashLoopBackOff" and "weight-holder" in degraded["message"]
    assert "restarted 2 times" in degraded["message"]
    assert status["readyReplicas"] == 0 and status["phase"] == "Degraded"
    assert conditions(result.statuses[0])["Ready"]["status"] == "False"


def test_an_unschedulable_replica_surfaces_the_schedulers_reason() -> None:
    m = model("a", 1)
    nodes = [node("n1", devices=1)]
    pods = []
    for manifest in run([m], nodes).create:
        status = {"phase": "Pending"}
        if manifest["metadata"]["labels"][api.LABEL_ROLE] == "replica":
            status["conditions"] = [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 1 Insufficient vnpu.io/memory-0.",
                }
            ]
        pods.append(parse_pod({**manifest, "status": status}))
    degraded = conditions(run([m], nodes, pods).statuses[0])["Degraded"]
    assert degraded["reason"] == "Unschedulable" and "Insufficient vnpu.io/memory-0" in degraded["message"]


def test_the_spec_is_parsed_once_with_its_defaults_in_one_place() -> None:
    spec = parse_spec({"modelName": "m", "source": {"uri": "file:///m.gguf"}, "memory": {"kvCacheMiB": 1}})
    assert spec.replicas == 1 and spec.runtime.port == 8000 and spec.priority == 0
    assert spec.rollout == Rollout("RollingUpdate", "25%", 0)
    assert (spec.rollout.surge(4), spec.rollout.unavailable(4)) == (1, 0)
    assert (spec.rollout.surge(10), spec.rollout.unavailable(10)) == (3, 0)  # surge rounds up
    assert Rollout(max_surge=0, max_unavailable=0).surge(4) == 1  # never stuck at 0/0
    assert Rollout(max_surge=0, max_unavailable="50%").unavailable(5) == 2  # rounds down
    assert Rollout("Recreate").unavailable(3) == 3 and Rollout("Recreate").surge(3) == 0
    with pytest.raises(SpecError, match=r"spec\.rollout\.maxSurge"):
        parse_spec({"source": {"uri": "file:///m"}, "rollout": {"maxSurge": "lots"}})
    with pytest.raises(SpecError, match=r"spec\.source\.uri"):
        parse_spec({"modelName": "m"})


@pytest.mark.parametrize("memory", ["1e5000", "-1e5000", "9223372036854775808", "a lot"])
def test_a_resource_quantity_no_node_can_hold_is_an_invalid_spec(memory: str) -> None:
    """The API server takes a quantity of ``1e5000`` (an int32 exponent); the operator then wrote an
    offloaded holder's memory as an integer of 5,000 digits, past Python's limit on converting one to
    text, and the pass failed for every model. It is now this model's InvalidSpec, naming the field."""
    raw = {"source": {"uri": "file:///m"}, "runtime": {"resources": {"limits": {"memory": memory}}}}
    with pytest.raises(SpecError, match=r"spec\.runtime\.resources\.limits\.memory"):
        parse_spec(raw)
    requests = {"memory": "1e3", "cpu": ".5"}
    fine = {"source": {"uri": "file:///m"}, "runtime": {"resources": {"requests": requests}}}
    assert parse_spec(fine).runtime.requests == requests


def test_an_estimate_that_fails_unexpectedly_is_that_models_error_not_the_passs() -> None:
    """Whatever the estimate raises (a bug, an input nobody foresaw), the reconcile pass gets an
    EstimateError for that model, retried with backoff, and every other model still converges."""

    def broken(spec, cache_dir=None, file_roots=(), block_size=None, read_files=True):
        raise TypeError("unhashable type: 'dict'")

    cache = EstimateCache(None, estimate=broken)
    error = cache.get(model("a"))
    assert (
        isinstance(error, EstimateError)
        and "failed unexpectedly" in str(error)
        and "unhashable" in str(error)
    )
    assert cache.retry_in(model("a")) is not None


def test_hf_sources_are_sized_from_the_configured_model_cache(tmp_path) -> None:
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from vnpu.operator.config import OperatorConfig
    from vnpu.operator.main import build_parser
    from vnpu.operator.reconciler import Reconciler

    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    save_file({"w": np.zeros((1024, 512), dtype=np.float32)}, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "hidden_size": 256, "intermediate_size": 512,
                    "vocab_size": 1000, "torch_dtype": "float32"})
    )  # fmt: skip
    args = build_parser().parse_args(["--model-cache-dir", str(tmp_path)])
    config = OperatorConfig(model_cache_dir=args.model_cache_dir)
    estimates = Reconciler(config)._estimates
    m = model("hf", source={"uri": "hf://org/tiny"}, memory={"maxContextTokens": 1000, "maxBatch": 4})
    assert estimates.get(m).weights_mib == 2  # the header, read from the cache: 512 Ki float32
    without = EstimateCache(None).get(m)
    assert isinstance(without, EstimateError) and "local model cache" in str(without)


def test_file_sources_are_read_only_under_the_model_file_roots(tmp_path) -> None:
    """A tenant's ``file://`` source must not make the operator read (and report bytes of) a file of its
    own, such as its service-account token: only directories named by --model-file-root are read."""
    import numpy as np
    from safetensors.numpy import save_file

    from vnpu.operator.config import OperatorConfig
    from vnpu.operator.main import build_parser
    from vnpu.operator.reconciler import Reconciler

    models, secrets = tmp_path / "models", tmp_path / "secrets"
    models.mkdir()
    secrets.mkdir()
    save_file({"w": np.zeros((1024, 512), dtype=np.float32)}, str(models / "m.safetensors"))
    (secrets / "token").write_text("eyJhbGciOiJSUzI1NiJ9.secret")
    (models / "escape").symlink_to(secrets / "token")  # a link inside the root to a file outside
    sized = {"memory": {"kvCacheMiB": 64}}
    inside = model("in", source={"uri": f"file://{models}/m.safetensors"}, **sized)
    outside = [
        model(name, source={"uri": uri}, **sized)
        for name, uri in (
            ("token", f"file://{secrets}/token"),
            ("link", f"file://{models}/escape"),
            ("absent", f"file://{secrets}/absent"),
        )
    ]

    default = Reconciler(OperatorConfig())._estimates
    assert isinstance(default.get(inside), EstimateError)  # none by default
    args = build_parser().parse_args(["--model-file-root", str(models)])
    estimates = Reconciler(OperatorConfig(model_file_roots=tuple(args.model_file_root)))._estimates
    assert estimates.get(inside).weights_mib == 2  # the header, read under the root
    messages = set()
    for m in outside:
        error = estimates.get(m)
        assert isinstance(error, EstimateError) and "--model-file-root" in str(error)
        messages.add(str(error).replace(str(m.raw_spec["source"]["uri"]), "URI"))
    # The same answer whether the file exists or not, and nothing of what it holds.
    assert len(messages) == 1 and "eyJ" not in messages.pop()


def _node_with_inventory(name: str, change: Callable[[list[dict]], None]) -> ObservedNode:
    """A Ready node whose device plugin wrote a well-formed inventory that ``change`` made unusable."""
    manifest = npu_node_manifest(name, devices=2, device_mib=16 * 1024)
    manifest["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    inventory = json.loads(manifest["metadata"]["annotations"][api.ANNOTATION_DEVICES])
    change(inventory["devices"])
    manifest["metadata"]["annotations"][api.ANNOTATION_DEVICES] = json.dumps(inventory)
    return parse_node(manifest)


BAD_INVENTORIES = {
    "slice_mib 0": (lambda devs: devs[0].update(slice_mib=0), "slice_mib 0"),
    "slice_mib -1": (lambda devs: devs[0].update(slice_mib=-1), "slice_mib -1"),
    "negative slices": (lambda devs: devs[0].update(slices=-5), "slices -5"),
    "negative total_mib": (lambda devs: devs[0].update(total_mib=-1), "total_mib -1"),
    "device id twice": (lambda devs: devs[1].update(id=devs[0]["id"]), "appears twice"),
    "resource twice": (lambda devs: devs[1].update(resource=devs[0]["resource"]), "two devices"),
}


@pytest.mark.parametrize("case", sorted(BAD_INVENTORIES))
def test_a_node_with_an_unusable_inventory_is_left_out_and_the_pass_goes_on(case: str) -> None:
    """One node's odd inventory (valid JSON) must not stop the operator: the node is left out with the
    reason, every model is placed on the other nodes, pass after pass."""
    change, reason = BAD_INVENTORIES[case]
    bad = _node_with_inventory("bad", change)
    assert reason in bad.inventory_error
    nodes = [node("good"), bad]
    models = [model("a", 2, ns="team-a"), model("b", 1, ns="team-b")]
    pods: list = []
    for _ in range(3):
        result = run(models, nodes, pods)
        assert result.delete == []
        pods += as_pods(result.create)
    assert sorted((p.namespace, p.role, p.node) for p in pods) == [
        ("team-a", "replica", "good"),
        ("team-a", "replica", "good"),
        ("team-a", "weights", "good"),
        ("team-b", "replica", "good"),
        ("team-b", "weights", "good"),
    ]
    assert all(s.status["readyReplicas"] == s.model.spec.replicas for s in result.statuses)


def test_a_warm_holder_on_a_node_whose_inventory_went_bad_does_not_stop_a_wake() -> None:
    """The wake offers the warm holder's device by its slice size: a node whose inventory turned
    unusable is left out of that too, and the model wakes on another node."""
    scaled = {"minReplicas": 0, "keepWarm": "Always"}
    nodes = [node("n1", devices=1)]
    pods = as_pods(run([model("a", 1, scaling=scaled)], nodes).create)
    asleep = run([model("a", 0, scaling=scaled)], nodes, pods)
    pods = [p for p in pods if p.name not in {d.name for d in asleep.delete}]
    assert [p.role for p in pods] == ["weights"]  # kept warm
    bad = _node_with_inventory("n1", lambda devs: devs[0].update(slice_mib=0))
    woken = run([model("a", 1, scaling=scaled)], [bad, node("n2", devices=1)], pods)
    placed = sorted(
        (p["metadata"]["labels"][api.LABEL_ROLE], p["metadata"]["annotations"][api.ANNOTATION_DEVICE])
        for p in woken.create
    )
    assert placed == [("replica", "n2-npu0"), ("weights", "n2-npu0")]


def test_a_frozen_models_shared_holder_and_key_outlive_its_neighbour() -> None:
    """``a`` (estimate failing, its pods kept as they are) and ``b`` share a group's holder and key
    Secret. The plan keeps ``a`` among their owners, so when ``b`` is deleted the garbage collector
    (simulated: it deletes what only ``b`` owned) leaves ``a``'s Ready replicas their holder and key."""
    nodes = [node("n1", devices=1)]
    a, b = model("a", 2, shareGroup="g"), model("b", 1, shareGroup="g")
    pods = as_pods(run([a, b], nodes).create)
    (secret,) = keys_for([a])
    secrets = [replace(secret, owner_uids=(a.uid, b.uid))]
    failing = {a.key: EstimateError("cannot read file:///models/m.gguf: stale NFS handle"), b.key: estimate()}

    def apply(result, pods, secrets):
        owners = {(u.kind, u.name): tuple(r["uid"] for r in u.owner_references) for u in result.set_owners}
        gone = {d.name for d in result.delete}
        pods = [
            replace(p, owner_uids=owners.get(("Pod", p.name), p.owner_uids))
            for p in pods
            if p.name not in gone
        ]
        secrets = [replace(x, owner_uids=owners.get(("Secret", x.name), x.owner_uids)) for x in secrets]
        return pods, secrets

    for _ in range(2):
        result = run([a, b], nodes, pods, estimates=failing, secrets=secrets)
        assert result.delete == [] and result.create == []
        assert {s.model.name: s.status["readyReplicas"] for s in result.statuses} == {"a": 2, "b": 1}
        pods, secrets = apply(result, pods, secrets)
    deleting = replace(b, deleting=True)
    result = run([a, deleting], nodes, pods, estimates=failing, secrets=secrets)
    assert sorted(d.name for d in result.delete) == sorted(p.name for p in pods if p.model == "b")
    pods, secrets = apply(result, pods, secrets)
    # b is gone: the garbage collector deletes what b alone owned.
    pods = [p for p in pods if set(p.owner_uids) - {b.uid}]
    secrets = [x for x in secrets if set(x.owner_uids) - {b.uid}]
    assert sorted(p.role for p in pods) == ["replica", "replica", "weights"] and len(secrets) == 1
    after = run([a], nodes, pods, estimates=failing, secrets=secrets)
    assert after.delete == [] and after.create == [] and after.statuses[0].status["readyReplicas"] == 2
