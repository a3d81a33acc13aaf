"""The operator on a shared cluster, against the real API server, scheduler, controller-manager and kwok:
one tenant never stalls another, HA that holds, no needless outages, capacity and status from reality.

Each test runs ``vnpu operator`` as a real process (two for HA). kwok marks pods Ready once bound, so
"Ready" here is the API server's Ready condition, as a real kubelet would set it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import test_operator
from kubernetes import client, watch
from model_files import hostile_gguf, safetensors
from operator_harness import OperatorProcess, get_model, live, pods_of
from test_operator import GIB, apply, events_of, replica_pods, spec, wait_phase

from vnpu import api
from vnpu.cluster.processes import wait_until

# The fixtures of test_operator.py: the scheduler, controller-manager and kwok; the `models` claim; and
# one operator watching the test's namespace.
cluster = test_operator.cluster
model_claim = test_operator.model_claim
operator = test_operator.operator


def local(**kwargs: Any) -> dict[str, Any]:
    """A model spec whose source needs no claim (the `models` claim exists in the test's namespace only)."""
    return {**spec(**kwargs), "source": {"uri": "file:///models/m.safetensors"}}


def condition(model: dict[str, Any], type_: str) -> dict[str, Any]:
    return {c["type"]: c for c in model.get("status", {}).get("conditions", [])}.get(type_, {})


def new_namespace(cp: Any, name: str, labels: dict[str, str] | None = None) -> str:
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
    cp.kubectl("apply", "-f", "-", input=json.dumps(body))
    return name


def serving(pod: Any) -> bool:
    """Ready and not going away."""
    return pod.metadata.deletion_timestamp is None and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
    )


class PodFollower:
    """Every state of the pods matching ``selector`` that the API server goes through, one watch event
    at a time, from a list taken now: ``on_state(pods by name, the event's pod)`` after each event."""

    def __init__(self, cp: Any, namespace: str, selector: str, on_state: Any) -> None:
        core = client.CoreV1Api(cp.api_client())
        listed = core.list_namespaced_pod(namespace, label_selector=selector)
        self.state = {p.metadata.name: p for p in listed.items}
        self._done = threading.Event()
        args = (core, namespace, selector, listed.metadata.resource_version, on_state)
        self._thread = threading.Thread(target=self._follow, args=args, daemon=True)
        self._thread.start()

    def _follow(self, core: Any, namespace: str, selector: str, version: str, on_state: Any) -> None:
        w = watch.Watch()
        for ev in w.stream(
            core.list_namespaced_pod,
            namespace,
            label_selector=selector,
            resource_version=version,
            timeout_seconds=180,
        ):
            pod = ev["object"]
            if ev["type"] == "DELETED":
                self.state.pop(pod.metadata.name, None)
            else:
                self.state[pod.metadata.name] = pod
            on_state(self.state, pod)
            if self._done.is_set():
                w.stop()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(30)


def test_one_tenant_never_stalls_another(cluster, namespace, kwok_nodes, tmp_path) -> None:
    """A restricted namespace, a namespace at its quota, an unplaceable model on a 3-node cluster and a
    healthy namespace, in one operator: each model ends as it should, none holds up the others."""
    kwok_nodes(3, devices=1, device_mib=16 * GIB)
    suffix = namespace.removeprefix("t-")
    restricted = new_namespace(cluster, f"r-{suffix}", {"pod-security.kubernetes.io/enforce": "restricted"})
    quota = new_namespace(cluster, f"q-{suffix}")
    cluster.kubectl(
        "apply", "-n", quota, "-f", "-",
        input=json.dumps({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "pods"},
                          "spec": {"hard": {"pods": "0"}}}),
    )  # fmt: skip
    healthy = namespace
    op = OperatorProcess(cluster, healthy, tmp_path).start("-n", restricted, "-n", quota)
    try:
        apply(cluster, quota, "starved", local(replicas=1, weights_mib=2 * GIB))
        apply(cluster, healthy, "nowhere", spec(replicas=1, placement={"nodeSelector": {"pool": "none"}}))
        apply(cluster, restricted, "strict", local(replicas=2, weights_mib=2 * GIB))
        apply(cluster, healthy, "fine", spec(replicas=2, weights_mib=2 * GIB))
        wait_phase(cluster, restricted, "strict", "Ready", timeout=90)
        wait_phase(cluster, healthy, "fine", "Ready", timeout=90)
        nowhere = wait_phase(cluster, healthy, "nowhere", "CapacityPending", timeout=90)
        assert "nodeSelector" in condition(nowhere, "CapacityPending")["message"]

        def refused() -> bool:
            c = condition(get_model(cluster, quota, "starved"), "Degraded")
            return c.get("status") == "True" and "exceeded quota" in c.get("message", "")

        wait_until(refused, 60, "the quota's refusal in the starved model's status")
        starved = get_model(cluster, quota, "starved")
        assert condition(starved, "Degraded")["reason"] == "Forbidden"
        assert any(e.reason == "Forbidden" for e in events_of(cluster, quota, "starved"))
        assert (
            f'vnpu_operator_api_errors_total{{model="starved",namespace="{quota}",reason="Forbidden"}}'
            in (op.metrics())
        )
        # The placeholders of the unplaceable model are valid pods on a 3-node cluster.
        placeholders = live(pods_of(cluster, healthy, f"{api.LABEL_ROLE}={api.ROLE_PLACEHOLDER}"))
        assert len(placeholders) == 1 and placeholders[0].spec.node_selector == {"pool": "none"}
        # The restricted namespace runs the model: its pods pass the restricted profile as created.
        for pod in live(pods_of(cluster, restricted)):
            assert (
                pod.spec.security_context.run_as_non_root
                and pod.spec.automount_service_account_token is False
            )
            (container,) = pod.spec.containers
            assert container.security_context.capabilities.drop == ["ALL"]
            assert container.security_context.read_only_root_filesystem
        # Quota lifted: the model converges on its own (its backoff ends, nothing else to do).
        cluster.kubectl("delete", "-n", quota, "resourcequota", "pods")
        wait_phase(cluster, quota, "starved", "Ready", timeout=120)
    finally:
        for ns in (quota, restricted, healthy):
            cluster.kubectl("delete", "infm", "--all", "-n", ns, "--timeout=60s", check=False)
        op.stop()


def test_a_placeholder_over_the_quota_never_holds_up_the_models_replicas(
    cluster, namespace, kwok_nodes, operator
) -> None:
    """A quota on vnpu.io/memory-0 that the model's pods fit and its placeholder does not: the refusal is
    the model's Degraded condition and Event, retried with a backoff of its own, while a replica that
    goes is replaced at once (not after the placeholder's backoff, 32 s by its 6th refusal)."""
    kwok_nodes(1, devices=1, device_mib=8 * GIB)  # 4 GiB of weights + 4 replicas of 1 GiB: the 5th waits
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "npu"},
             "spec": {"hard": {"requests.vnpu.io/memory-0": "8"}}}  # fmt: skip
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(quota))
    apply(cluster, namespace, "q", spec(replicas=5))

    def refusals() -> int:
        series = f'vnpu_operator_api_errors_total{{model="q",namespace="{namespace}",reason="Forbidden"}} '
        lines = [line for line in operator.metrics().splitlines() if line.startswith(series)]
        return int(float(lines[0].split()[-1])) if lines else 0

    wait_until(lambda: refusals() >= 6, 90, "the placeholder refused 6 times")
    model = get_model(cluster, namespace, "q")
    degraded = condition(model, "Degraded")
    assert degraded["reason"] == "Forbidden" and "placeholder" in degraded["message"]
    assert "exceeded quota" in degraded["message"]
    assert any(e.reason == "Forbidden" for e in events_of(cluster, namespace, "q"))
    assert not live(pods_of(cluster, namespace, f"{api.LABEL_ROLE}={api.ROLE_PLACEHOLDER}"))
    replicas = replica_pods(cluster, namespace, "q")
    assert len(replicas) == 4 and all(serving(p) for p in replicas)
    victim = replicas[0]
    cluster.kubectl("delete", "pod", "-n", namespace, victim.metadata.name, "--wait=false")

    def replaced() -> bool:
        pods = {p.metadata.name: p for p in replica_pods(cluster, namespace, "q")}
        new = pods.get(victim.metadata.name)
        return new is not None and new.metadata.uid != victim.metadata.uid and serving(new)

    # 25 s: within the placeholder's 32 s backoff, with room for a loaded machine (kwok, a pass, the
    # scheduler, readiness).
    wait_until(replaced, 25, "the deleted replica re-created within the placeholder's backoff")
    assert refusals() < 8  # the placeholder is still backed off, not retried at every pass


def test_two_operators_one_writer_and_the_standby_takes_over(
    cluster, namespace, kwok_nodes, tmp_path
) -> None:
    kwok_nodes(2, devices=1, device_mib=16 * GIB)
    lease = f"vnpu-{namespace}"
    args = ("--leader-elect", "--leader-election-namespace", namespace, "--leader-election-id", lease,
            "--lease-duration", "6", "--renew-deadline", "4", "--retry-period", "1")  # fmt: skip
    first = OperatorProcess(cluster, namespace, tmp_path / "a").start(*args)
    wait_until(lambda: "vnpu_operator_leader 1.0" in first.metrics(), 30, "the first operator leads")
    second = OperatorProcess(cluster, namespace, tmp_path / "b").start(*args)
    try:
        apply(cluster, namespace, "ha", spec(replicas=2))
        wait_phase(cluster, namespace, "ha", "Ready")
        before = {p.metadata.name for p in live(pods_of(cluster, namespace))}
        assert "vnpu_operator_leader 0.0" in second.metrics()
        assert "created" not in second.log() and "deleted pod" not in second.log(), "the standby wrote"
        first.kill()  # no release: the standby must wait out the Lease
        wait_until(lambda: "vnpu_operator_leader 1.0" in second.metrics(), 60, "the standby leads")
        apply(cluster, namespace, "after", spec(replicas=1, shareGroup="after"))
        wait_phase(cluster, namespace, "after", "Ready")
        wait_phase(cluster, namespace, "ha", "Ready")
        after = {p.metadata.name for p in live(pods_of(cluster, namespace))}
        assert before <= after, "the new leader kept every pod the old one made"
        assert "deleted pod" not in second.log()
        holder = client.CoordinationV1Api(cluster.api_client()).read_namespaced_lease(lease, namespace)
        assert holder.spec.holder_identity and holder.spec.lease_transitions >= 1
    finally:
        cluster.kubectl("delete", "infm", "--all", "-n", namespace, "--timeout=60s", check=False)
        second.stop()
        first.stop()


def test_a_context_change_rolls_four_replicas_and_four_stay_ready(
    cluster, namespace, kwok_nodes, operator
) -> None:
    kwok_nodes(2, devices=1, device_mib=16 * GIB)
    apply(cluster, namespace, "roll", spec(replicas=4))
    wait_phase(cluster, namespace, "roll", "Ready")
    selector = f"{api.LABEL_MODEL}=roll,{api.LABEL_ROLE}={api.ROLE_REPLICA}"
    lowest: list[int] = []
    templates: set[str] = set()

    def record(state: dict[str, Any], pod: Any) -> None:
        templates.add(pod.metadata.labels.get(api.LABEL_TEMPLATE_HASH, ""))
        lowest.append(sum(1 for p in state.values() if serving(p)))

    follower = PodFollower(cluster, namespace, selector, record)
    changed = spec(replicas=4)
    changed["memory"]["kvCacheMiB"] = 1792  # a longer context: 2 GiB per replica instead of 1
    apply(cluster, namespace, "roll", changed)

    def rolled() -> bool:
        pods = replica_pods(cluster, namespace, "roll")
        return len(pods) == 4 and all(p.metadata.annotations[api.ANNOTATION_SLICES] == "2" for p in pods)

    wait_until(rolled, 120, "every replica rolled to 2 slices")

    def complete() -> bool:
        model = get_model(cluster, namespace, "roll")
        return condition(model, "Progressing").get("reason") == "RolloutComplete" and (
            model["status"].get("phase") == "Ready"
        )

    wait_until(complete, 60, "the rollout complete in the model's status")
    model = get_model(cluster, namespace, "roll")
    follower.stop()
    assert lowest and min(lowest) >= 4, f"fewer than 4 ready replicas at some moment: {min(lowest)}"
    assert len(templates) >= 2, "the watch saw pods of both templates"
    reasons = [e.reason for e in events_of(cluster, namespace, "roll")]
    assert "RollingUpdate" in reasons and "RolloutComplete" in reasons
    assert condition(model, "Progressing")["reason"] == "RolloutComplete"
    assert model["status"]["updatedReplicas"] == 4


def test_an_operator_killed_again_and_again_mid_rollout_keeps_four_ready_and_no_duplicates(
    cluster, namespace, kwok_nodes, tmp_path
) -> None:
    """The rollout's state is only what the API server holds: an operator SIGKILLed just after it
    created a surge pod, or just after one became Ready, resumes it where it stood."""
    kwok_nodes(2, devices=1, device_mib=16 * GIB)
    op = OperatorProcess(cluster, namespace, tmp_path).start()
    try:
        apply(cluster, namespace, "roll", spec(replicas=4))
        wait_phase(cluster, namespace, "roll", "Ready")
        selector = f"{api.LABEL_MODEL}=roll,{api.LABEL_ROLE}={api.ROLE_REPLICA}"
        lowest: list[int] = []
        follower = PodFollower(
            cluster, namespace, selector, lambda state, _: lowest.append(sum(map(serving, state.values())))
        )
        changed = spec(replicas=4)
        changed["memory"]["kvCacheMiB"] = 1792  # 2 slices a replica instead of 1
        apply(cluster, namespace, "roll", changed)

        def new_ones(ready: bool) -> int:
            return sum(
                1
                for p in replica_pods(cluster, namespace, "roll")
                if p.metadata.annotations[api.ANNOTATION_SLICES] == "2" and (serving(p) or not ready)
            )

        for step in range(1, 4):  # killed after the step-th surge pod exists, then after it is Ready
            for ready in (False, True):
                wait_until(lambda r=ready, n=step: new_ones(r) >= n, 60, f"{step} new replica(s), {ready=}")
                op.kill()
                op.start()
        wait_until(lambda: new_ones(True) == 4 and len(replica_pods(cluster, namespace, "roll")) == 4, 120,
                   "every replica rolled")  # fmt: skip
        follower.stop()
        assert lowest and min(lowest) >= 4, f"fewer than 4 ready replicas at some moment: {min(lowest)}"
        pods = live(pods_of(cluster, namespace))
        indices = [
            p.metadata.labels[api.LABEL_REPLICA]
            for p in pods
            if p.metadata.labels[api.LABEL_ROLE] == "replica"
        ]
        assert sorted(indices) == ["0", "1", "2", "3"], indices
        holders = [(p.spec.node_name, p.metadata.annotations[api.ANNOTATION_DEVICE])
                   for p in pods if p.metadata.labels[api.LABEL_ROLE] == api.ROLE_WEIGHTS]  # fmt: skip
        assert len(holders) == len(set(holders)), f"two holders on one device: {holders}"
        assert op.starts == 7
    finally:
        cluster.kubectl("delete", "infm", "--all", "-n", namespace, "--timeout=60s", check=False)
        op.stop()


def test_capacity_and_status_come_from_what_really_runs(cluster, namespace, kwok_nodes, operator) -> None:
    (node,) = kwok_nodes(1, devices=1, device_mib=16 * GIB)
    # Someone else's pod, in a namespace the operator does not serve, holds 10 of the device's 16 slices.
    other = new_namespace(cluster, f"o-{namespace.removeprefix('t-')}")
    squatter = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "squatter", "namespace": other},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause",
                 "resources": {"limits": {"vnpu.io/memory-0": "10"}}}]},
    }  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(squatter))
    apply(cluster, namespace, "big", spec(replicas=3, weights_mib=4 * GIB))  # 4 + 3 = 7 > 6 free
    big = wait_phase(cluster, namespace, "big", "CapacityPending")
    assert len(big["status"]["placements"]) == 2, "4 + 2 slices fit next to the squatter's 10, not 3"
    # Its placed replicas run (kwok starts them a moment after the status says where they go).
    wait_until(
        lambda: all(p.status.phase == "Running" for p in replica_pods(cluster, namespace, "big")),
        30,
        "big's placed replicas running",
    )
    cluster.kubectl("delete", "-n", other, "pod", "squatter", "--wait=true")
    wait_phase(cluster, namespace, "big", "Ready")

    # A weight-holder that crash-loops (its status as a kubelet would write it): the model is Degraded
    # with the kubelet's reason and its replicas are not counted ready.
    core = client.CoreV1Api(cluster.api_client())
    (holder,) = live(pods_of(cluster, namespace, f"{api.LABEL_ROLE}={api.ROLE_WEIGHTS}"))
    crash = {
        "status": {
            "conditions": [
                {"type": "Ready", "status": "False"},
                {"type": "ContainersReady", "status": "False"},
            ],
            "containerStatuses": [{
                "name": "weights", "image": "x", "imageID": "", "ready": False, "restartCount": 2,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s restarting"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
            }],
        }
    }  # fmt: skip
    core.patch_namespaced_pod_status(holder.metadata.name, namespace, crash)

    def degraded() -> bool:
        return condition(get_model(cluster, namespace, "big"), "Degraded").get("reason") == "CrashLoopBackOff"

    wait_until(degraded, 60, "the crash-looping holder in the model's status")
    big = get_model(cluster, namespace, "big")
    assert big["status"]["readyReplicas"] == 0 and big["status"]["phase"] == "Degraded"
    assert "restarted 2 times" in condition(big, "Degraded")["message"]


def test_hostile_activity_annotations_never_blind_the_operator(
    cluster, namespace, kwok_nodes, operator
) -> None:
    """The gateway's activity annotations are anyone's to write who may edit the model. A superscript
    digit or 5,000 digits made the models informer's parse raise, so it relisted and failed forever and
    no model anywhere was seen to change; 400 digits overflowed the demand forecast and failed every
    pass. Each is now read as absent: the model stays Ready and a model created after it converges."""
    kwok_nodes(1, devices=1, device_mib=16 * GIB)
    apply(cluster, namespace, "hostile", spec(replicas=1, weights_mib=2 * GIB, shareGroup="h"))
    wait_phase(cluster, namespace, "hostile", "Ready")

    def annotate(key: str, value: str) -> None:
        cluster.kubectl("annotate", "--overwrite", "infm", "hostile", "-n", namespace, f"{key}={value}")

    annotate(api.ANNOTATION_REQUESTS, "1")  # a baseline the forecast folds the next value into
    wait_until(
        lambda: get_model(cluster, namespace, "hostile")["status"].get("demand", {}).get("total") == 1,
        30,
        "the counter in the model's demand",
    )
    for value in ("9" * 400, "²", "9" * 5000):
        annotate(api.ANNOTATION_REQUESTS, value)
    annotate(api.ANNOTATION_LAST_REQUEST, "9999-12-31T23:59:59-23:59")
    apply(cluster, namespace, "after", spec(replicas=1, weights_mib=2 * GIB, shareGroup="a"))
    wait_phase(cluster, namespace, "after", "Ready")
    hostile = get_model(cluster, namespace, "hostile")
    assert hostile["status"]["phase"] == "Ready" and len(replica_pods(cluster, namespace, "hostile")) == 1
    assert "vnpu_operator_reconcile_errors_total 0.0" in operator.metrics()


def test_defragmentation_moves_a_replica_make_before_break(cluster, namespace, kwok_nodes, tmp_path) -> None:
    """A deletion leaves two half-used devices; with --defragment the operator moves one replica onto
    the other device, starting the new pod beside the old one, which goes only once the new one is
    Ready: every model keeps a Ready replica at every moment the API server went through."""
    kwok_nodes(1, devices=2, device_mib=16 * GIB)

    def sized(source: str, weights_gib: int) -> dict[str, Any]:
        return {
            **spec(replicas=1, weights_mib=weights_gib * GIB),
            "source": {"uri": f"pvc://models/{source}"},
        }

    op = OperatorProcess(cluster, namespace, tmp_path).start("--defragment", "--defragment-max-moves", "1")
    selector = f"{api.LABEL_ROLE}={api.ROLE_REPLICA}"
    try:
        apply(cluster, namespace, "a", sized("a.safetensors", 4))
        apply(cluster, namespace, "c", sized("c.safetensors", 8))
        wait_phase(cluster, namespace, "a", "Ready", timeout=90)
        wait_phase(cluster, namespace, "c", "Ready", timeout=90)
        apply(cluster, namespace, "b", sized("b.safetensors", 4))
        wait_phase(cluster, namespace, "b", "Ready", timeout=90)
        devices = {
            p.metadata.annotations[api.ANNOTATION_DEVICE] for p in live(pods_of(cluster, namespace, selector))
        }
        assert len(devices) == 2, devices

        lowest: dict[str, int] = {"a": 1, "b": 1}

        def record(state: dict[str, Any], _: Any) -> None:
            for model in lowest:
                mine = [p for p in state.values() if p.metadata.labels.get(api.LABEL_MODEL) == model]
                lowest[model] = min(lowest[model], sum(1 for p in mine if serving(p)))

        follower = PodFollower(cluster, namespace, selector, record)
        cluster.kubectl("delete", "infm", "c", "-n", namespace, "--timeout=60s")

        def one_device() -> bool:
            pods = [
                p
                for p in live(pods_of(cluster, namespace, selector))
                if p.metadata.deletion_timestamp is None
            ]
            return len(pods) == 2 and len({p.metadata.annotations[api.ANNOTATION_DEVICE] for p in pods}) == 1

        wait_until(one_device, 120, "a and b on one device")
        follower.stop()
        moved = [
            e
            for model in ("a", "b")
            for e in events_of(cluster, namespace, model)
            if e.reason == "Defragmenting"
        ]
        assert len(moved) == 1, [e.message for e in moved]
        assert "vnpu_operator_defragment_moves_total 1.0" in op.metrics()
        assert min(lowest.values()) >= 1, f"a model had no Ready replica at some moment: {lowest}"
        wait_phase(cluster, namespace, "a", "Ready")
        wait_phase(cluster, namespace, "b", "Ready")
    finally:
        cluster.kubectl("delete", "infm", "--all", "-n", namespace, "--timeout=60s", check=False)
        op.stop()


def test_a_tenants_slow_model_files_never_hold_up_another_tenants_model(
    cluster, namespace, kwok_nodes, tmp_path
) -> None:
    """Three models of one namespace whose files take seconds of CPU each to read (a hostile GGUF
    header inside every size bound), then a model of another namespace whose files read at once: that
    one is placed and Ready while the first namespace's are still being read, one at a time, each
    saying so in its status. The reads ran inside the reconcile pass before: the other tenant's model
    waited for all three."""
    kwok_nodes(1, devices=1, device_mib=16 * GIB)
    roots = tmp_path / "model-files"
    roots.mkdir()
    hostile_gguf(roots / "slow.gguf")
    safetensors(roots / "ok.safetensors")
    evil = new_namespace(cluster, f"e-{namespace.removeprefix('t-')}")
    op = OperatorProcess(cluster, namespace, tmp_path).start("-n", evil, "--model-file-root", str(roots))

    def sized_by(file: str) -> dict[str, Any]:
        return {
            "modelName": "m",
            "source": {"uri": f"file://{roots / file}"},
            "replicas": 1,
            "memory": {"kvCacheMiB": 256, "activationMiB": 64},
        }

    try:
        for i in range(3):
            apply(cluster, evil, f"slow-{i}", sized_by("slow.gguf"))

        def reading() -> bool:
            c = condition(get_model(cluster, evil, "slow-0"), "Progressing")
            return c.get("reason") == "Estimating" and "reading" in c.get("message", "")

        wait_until(reading, 60, "slow-0's files being read")

        def queued() -> bool:
            c = condition(get_model(cluster, evil, "slow-2"), "Placed")
            return c.get("reason") == "Estimating" and "namespace's models first" in c.get("message", "")

        wait_until(queued, 30, "slow-2 waiting its namespace's turn")
        assert get_model(cluster, evil, "slow-2")["status"]["phase"] == "Pending"

        apply(cluster, namespace, "fine", sized_by("ok.safetensors"))
        fine = wait_phase(cluster, namespace, "fine", "Ready", timeout=60)
        assert fine["status"]["memory"]["weightsMiB"] == 2  # sized from its file
        still = [
            n for n in ("slow-0", "slow-1", "slow-2")
            if condition(get_model(cluster, evil, n), "Progressing").get("reason") == "Estimating"
        ]  # fmt: skip
        assert still, "the other namespace's model waited for every slow read"
        assert "vnpu_operator_estimates_pending 0.0" not in op.metrics()
        assert "vnpu_operator_reconcile_errors_total 0.0" in op.metrics()
    finally:
        for ns in (evil, namespace):
            cluster.kubectl("delete", "infm", "--all", "-n", ns, "--timeout=60s", check=False)
        op.stop()
