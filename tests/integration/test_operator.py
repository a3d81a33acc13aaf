"""The operator end to end against the real apiserver, scheduler, controller-manager and kwok nodes.

Each test runs ``vnpu operator`` as a real process watching the test's namespace, applies
InferenceModels, and asserts on what the API server ends up holding: pods, placements, status,
events. Replicas are 1 GiB (kvCacheMiB 768 + activationMiB 256), weights 4 GiB, devices 16 GiB.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import json
import subprocess
from typing import Any

import pytest
import yaml
from kubernetes import client
from operator_harness import OperatorProcess, get_model, live, pods_of

from vnpu import api, sharing
from vnpu.cluster.helm import CHART, placeholder_priority_class
from vnpu.cluster.kwok import KWOK_ANNOTATION, npu_node_manifest
from vnpu.cluster.processes import wait_until
from vnpu.cluster.volumes import ensure_local_claim
from vnpu.gateway.discovery import parse_slice
from vnpu.gateway.routing import ModelKey
from vnpu.operator import network_policy
from vnpu.operator.config import PLACEHOLDER_PRIORITY_CLASS

GIB = 1024


def spec(replicas: int = 2, weights_mib: int = 4 * GIB, **extra: Any) -> dict[str, Any]:
    return {
        "modelName": "m",
        "source": {"uri": "pvc://models/m.safetensors"},
        "weights": {"sizeMiB": weights_mib},
        "replicas": replicas,
        "memory": {"kvCacheMiB": 768, "activationMiB": 256},
        **extra,
    }


@pytest.fixture
def cluster(control_plane, kube_bin_dir):
    control_plane.start_scheduler()
    control_plane.start_controller_manager()
    control_plane.start_kwok()
    # The chart ships the placeholder PriorityClass; the operator, run here without the chart, never
    # creates one.
    control_plane.kubectl("apply", "-f", "-", input=placeholder_priority_class(kube_bin_dir))
    return control_plane


@pytest.fixture(autouse=True)
def model_claim(request, namespace, tmp_path):
    """The `models` claim every pvc://models/... source here mounts (bound like a real one)."""
    cp = request.getfixturevalue("control_plane")
    cp.start_controller_manager()  # its persistent-volume binder completes the binding
    ensure_local_claim(cp, namespace, "models", tmp_path / "models")


@pytest.fixture
def operator(cluster, namespace, tmp_path):
    op = OperatorProcess(cluster, namespace, tmp_path).start()
    yield op
    # Models go first, while the operator can still run their finalizer.
    cluster.kubectl("delete", "infm", "--all", "-n", namespace, "--timeout=60s", check=False)
    op.stop()


def apply(cp, namespace: str, name: str, model_spec: dict[str, Any]) -> None:
    body = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": model_spec,
    }
    cp.kubectl("apply", "-f", "-", input=json.dumps(body))


def wait_phase(cp, namespace: str, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    """Waits for the model's phase; a timeout says the phase and conditions it was left in."""

    def reached() -> bool:
        return get_model(cp, namespace, name).get("status", {}).get("phase") == phase

    try:
        wait_until(reached, timeout, f"{name} phase {phase}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; the model was left with {status_summary(cp, namespace, name)}") from None
    return get_model(cp, namespace, name)


def status_summary(cp, namespace: str, name: str) -> str:
    status = get_model(cp, namespace, name).get("status", {})
    conditions = [
        f"{c['type']}={c['status']} ({c.get('reason', '')}: {c.get('message', '')})"
        for c in status.get("conditions", [])
    ]
    return f"phase {status.get('phase')!r}, {status.get('readyReplicas', 0)} ready, " + "; ".join(conditions)


def replica_pods(cp, namespace: str, model: str) -> list[Any]:
    return live(pods_of(cp, namespace, f"{api.LABEL_MODEL}={model},{api.LABEL_ROLE}={api.ROLE_REPLICA}"))


def holder_pods(cp, namespace: str) -> list[Any]:
    return live(pods_of(cp, namespace, f"{api.LABEL_ROLE}={api.ROLE_WEIGHTS}"))


def events_of(cp, namespace: str, name: str) -> list[Any]:
    events = client.CoreV1Api(cp.api_client()).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return list(events.items)


def test_shared_weights_one_holder_per_device(cluster, namespace, kwok_nodes, operator) -> None:
    (node,) = kwok_nodes(1, devices=1, device_mib=16 * GIB)
    apply(cluster, namespace, "chat", spec(replicas=2, shareGroup="smollm"))
    apply(cluster, namespace, "chat-b", spec(replicas=2, shareGroup="smollm"))
    a = wait_phase(cluster, namespace, "chat", "Ready")
    wait_phase(cluster, namespace, "chat-b", "Ready")
    holders = holder_pods(cluster, namespace)
    assert len(holders) == 1, "two models of one share group on one device map one weight copy"
    (holder,) = holders
    assert holder.spec.node_name == node and holder.metadata.annotations[api.ANNOTATION_SLICES] == "4"
    assert {o.name for o in holder.metadata.owner_references} == {"chat", "chat-b"}
    replicas = replica_pods(cluster, namespace, "chat") + replica_pods(cluster, namespace, "chat-b")
    assert len(replicas) == 4
    for pod in replicas:
        assert pod.spec.node_name == node
        assert pod.metadata.annotations["vnpu.io/weight-holder"] == holder.metadata.name
        assert pod.spec.containers[0].resources.limits == {"vnpu.io/memory-0": "1"}
    # 4 GiB weights + 4 x 1 GiB replicas = 8 GiB on a 16 GiB device; without sharing it would be 20 GiB.
    assert (
        a["status"]["memory"]["savedBySharingMiB"]
        + get_model(cluster, namespace, "chat-b")["status"]["memory"]["savedBySharingMiB"]
        == 3 * 4 * GIB
    )
    assert len(a["status"]["placements"]) == 2 and a["status"]["readyReplicas"] == 2
    assert "Placed" in [e.reason for e in events_of(cluster, namespace, "chat")]
    metrics = operator.metrics()
    assert f'vnpu_operator_placed_replicas{{model="chat",namespace="{namespace}"}} 2.0' in metrics
    assert f'vnpu_operator_memory_saved_by_sharing_mib{{model="chat",namespace="{namespace}"}}' in metrics
    assert "vnpu_operator_reconcile_duration_seconds_count" in metrics
    assert 'vnpu_operator_pod_actions_total{action="create",role="weights"} 1.0' in metrics
    # One key Secret for the (namespace, group), owned by both models, mounted by holder and replicas.
    (secret,) = (
        client.CoreV1Api(cluster.api_client())
        .list_namespaced_secret(namespace, label_selector=f"{api.LABEL_ROLE}=share-key")
        .items
    )
    assert secret.metadata.name == sharing.secret_name("smollm") and secret.immutable
    assert {o.name for o in secret.metadata.owner_references} == {"chat", "chat-b"}
    assert len(base64.b64decode(secret.data[sharing.SECRET_KEY_FIELD])) == sharing.KEY_BYTES
    for pod in [holder, *replicas]:
        volumes = {v.name: v for v in pod.spec.volumes}
        assert volumes["share-key"].secret.secret_name == secret.metadata.name
    # A deleted model's series go with it; the other model's stay.
    cluster.kubectl("delete", "infm", "chat-b", "-n", namespace, "--timeout=60s")
    wait_until(lambda: 'model="chat-b"' not in operator.metrics(), 30, "chat-b's series removed")
    assert f'vnpu_operator_placed_replicas{{model="chat",namespace="{namespace}"}} 2.0' in operator.metrics()


def test_spread_across_nodes(cluster, namespace, kwok_nodes, operator) -> None:
    nodes = kwok_nodes(3, devices=2, device_mib=16 * GIB)
    apply(cluster, namespace, "spread", spec(replicas=3, placement={"spreadAcrossNodes": True}))
    wait_phase(cluster, namespace, "spread", "Ready")
    assert sorted(p.spec.node_name for p in replica_pods(cluster, namespace, "spread")) == sorted(nodes)
    assert len(holder_pods(cluster, namespace)) == 3


def test_priority_decides_who_waits(cluster, namespace, kwok_nodes, operator) -> None:
    kwok_nodes(1, devices=1, device_mib=8 * GIB)  # room for 4 GiB weights + 4 replicas of one model
    apply(cluster, namespace, "low", spec(replicas=4, shareGroup="low", priority=-10))
    wait_phase(cluster, namespace, "low", "Ready")
    apply(cluster, namespace, "high", spec(replicas=4, shareGroup="high", priority=100))
    high = wait_phase(cluster, namespace, "high", "Ready")
    low = wait_phase(cluster, namespace, "low", "CapacityPending")
    assert high["status"]["readyReplicas"] == 4
    pending = {c["type"]: c for c in low["status"]["conditions"]}["CapacityPending"]
    assert pending["status"] == "True" and pending["message"]
    # One placeholder for low's 4 replicas: a device's worth, the weights once (what the packer needs).
    placeholders = live(pods_of(cluster, namespace, f"{api.LABEL_ROLE}={api.ROLE_PLACEHOLDER}"))
    assert len(placeholders) == 1
    for ph in placeholders:
        assert ph.spec.priority_class_name == "vnpu-placeholder" and ph.spec.priority < 0
        assert ph.spec.containers[0].resources.requests == {"vnpu.io/memory-0": "8"}

    def unschedulable() -> bool:
        pods = live(pods_of(cluster, namespace, f"{api.LABEL_ROLE}={api.ROLE_PLACEHOLDER}"))
        return all(
            any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in p.status.conditions or [])
            for p in pods
        )

    wait_until(unschedulable, 30, "placeholders marked Unschedulable by the scheduler")
    assert "CapacityPending" in [e.reason for e in events_of(cluster, namespace, "low")]

    # Capacity arrives (what the Cluster Autoscaler would do): placeholders go, low gets placed.
    kwok_nodes(1, devices=1, device_mib=8 * GIB)
    wait_phase(cluster, namespace, "low", "Ready")
    wait_until(
        lambda: not live(pods_of(cluster, namespace, f"{api.LABEL_ROLE}={api.ROLE_PLACEHOLDER}")),
        30,
        "placeholders removed",
    )


def test_scale_up_and_down_through_the_scale_subresource(cluster, namespace, kwok_nodes, operator) -> None:
    kwok_nodes(1, devices=2, device_mib=16 * GIB)
    apply(cluster, namespace, "sc", spec(replicas=1))
    wait_phase(cluster, namespace, "sc", "Ready")
    cluster.kubectl("scale", "-n", namespace, "infm/sc", "--replicas=5")
    wait_until(lambda: len(replica_pods(cluster, namespace, "sc")) == 5, 60, "5 replicas")
    wait_phase(cluster, namespace, "sc", "Ready")
    before = {p.metadata.name for p in replica_pods(cluster, namespace, "sc")}
    cluster.kubectl("scale", "-n", namespace, "infm/sc", "--replicas=2")
    wait_until(lambda: len(replica_pods(cluster, namespace, "sc")) == 2, 60, "2 replicas")
    after = replica_pods(cluster, namespace, "sc")
    assert {p.metadata.name for p in after} <= before, "scale-down keeps running replicas in place"
    assert sorted(p.metadata.labels["vnpu.io/replica"] for p in after) == ["0", "1"]


def test_hpa_drives_replicas(cluster, namespace, kwok_nodes, operator) -> None:
    kwok_nodes(1, devices=2, device_mib=16 * GIB)
    apply(cluster, namespace, "auto", spec(replicas=1))
    wait_phase(cluster, namespace, "auto", "Ready")
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "auto", "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": "auto"},
            "minReplicas": 3,
            "maxReplicas": 6,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(hpa))
    # Below minReplicas the HPA controller scales through our scale subresource without metrics.
    wait_until(lambda: get_model(cluster, namespace, "auto")["spec"]["replicas"] == 3, 90, "HPA scaled to 3")
    wait_until(lambda: len(replica_pods(cluster, namespace, "auto")) == 3, 60, "3 replica pods")


def test_node_loss_replaces_replicas(cluster, namespace, kwok_nodes, operator) -> None:
    first, second = kwok_nodes(2, devices=1, device_mib=16 * GIB)
    apply(cluster, namespace, "ha", spec(replicas=2, placement={"spreadAcrossNodes": True}))
    wait_phase(cluster, namespace, "ha", "Ready")
    (third,) = kwok_nodes(1, devices=1, device_mib=16 * GIB)
    client.CoreV1Api(cluster.api_client()).delete_node(first)

    def moved() -> bool:
        return sorted(p.spec.node_name or "" for p in replica_pods(cluster, namespace, "ha")) == sorted(
            [second, third]
        )

    wait_until(moved, 90, "replica re-placed from the lost node")
    wait_phase(cluster, namespace, "ha", "Ready")
    assert all(h.spec.node_name != first for h in holder_pods(cluster, namespace))


def test_a_node_not_ready_past_its_grace_loses_its_replicas_for_good_and_the_model_is_ready_again(
    cluster, namespace, kwok_nodes, tmp_path
) -> None:
    """A node NotReady past the grace period, with no kubelet left to confirm that its pods ended: its
    replicas are re-placed and its pods force-deleted. It still exists, so the pod GC never takes
    them. A delete the API server took as graceful left them Terminating, and the model Degraded
    (NodeLost), for as long as the node stayed."""
    core = client.CoreV1Api(cluster.api_client())
    op = OperatorProcess(cluster, namespace, tmp_path).start("--node-grace-seconds", "3")
    try:
        first, second = kwok_nodes(2, devices=1, device_mib=16 * GIB)
        apply(cluster, namespace, "ha", spec(replicas=2, placement={"spreadAcrossNodes": True}))
        wait_phase(cluster, namespace, "ha", "Ready")
        (third,) = kwok_nodes(1, devices=1, device_mib=16 * GIB)

        # The node's kubelet is gone for good: the node object is made again without kwok's annotation
        # (kwok, which forgets a node once it is deleted, finishes none of its pods' deletes) and NotReady.
        core.delete_node(first)
        again = npu_node_manifest(first, devices=1, device_mib=16 * GIB)
        del again["metadata"]["annotations"][KWOK_ANNOTATION]
        core.create_node(again)
        now = api.format_time(dt.datetime.now(dt.UTC))
        stopped = {"type": "Ready", "status": "False", "reason": "KubeletStopped", "message": "gone"}
        stopped |= {"lastHeartbeatTime": now, "lastTransitionTime": now}
        core.patch_node_status(first, {"status": {"conditions": [stopped], **again["status"]}})

        def replaced() -> bool:
            return sorted(p.spec.node_name for p in pods_of(cluster, namespace)) == sorted(
                [second, second, third, third]  # a replica and its weight-holder on each; none left
            )

        wait_until(replaced, 90, "every pod on the NotReady node gone and its replica re-placed")
        assert wait_phase(cluster, namespace, "ha", "Ready")["status"]["readyReplicas"] == 2
        assert [c.status for c in core.read_node(first).status.conditions if c.type == "Ready"] == ["False"]
    finally:
        cluster.kubectl("delete", "infm", "--all", "-n", namespace, "--timeout=60s", check=False)
        op.stop()


def test_bad_spec_is_refused_and_unreadable_source_fails_clearly(
    cluster, namespace, kwok_nodes, operator
) -> None:
    proc = cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        check=False,
        input=json.dumps(
            {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "metadata": {"name": "neg"},
                "spec": spec(weights_mib=-1),
            }
        ),
    )
    assert proc.returncode != 0 and "spec.weights.sizeMiB" in proc.stderr
    kwok_nodes(1)
    # Valid for the API server, but nothing tells the operator how big a pvc:// model is.
    apply(cluster, namespace, "unsized", {"modelName": "x", "source": {"uri": "pvc://models/x.gguf"}})
    failed = wait_phase(cluster, namespace, "unsized", "Failed")
    placed = {c["type"]: c for c in failed["status"]["conditions"]}["Placed"]
    assert placed["reason"] == "InvalidSpec" and "sizeMiB" in placed["message"]
    assert not replica_pods(cluster, namespace, "unsized")
    assert "InvalidSpec" in [e.reason for e in events_of(cluster, namespace, "unsized")]
    # A file:// source points into the operator's own filesystem: it is not read (no --model-file-root
    # here), so the status tells nothing of the file; before, it quoted its first 8 bytes as a number.
    apply(cluster, namespace, "snoop", {"modelName": "x", "source": {"uri": "file:///etc/passwd"}})
    failed = wait_phase(cluster, namespace, "snoop", "Failed")
    placed = {c["type"]: c for c in failed["status"]["conditions"]}["Placed"]
    assert placed["reason"] == "InvalidSpec" and "--model-file-root" in placed["message"]
    assert "header" not in placed["message"] and not any(ch.isdigit() for ch in placed["message"])


def test_delete_cleans_up_pods_and_unneeded_holders(cluster, namespace, kwok_nodes, operator) -> None:
    kwok_nodes(1, devices=1, device_mib=16 * GIB)
    apply(cluster, namespace, "one", spec(replicas=1, shareGroup="g"))
    apply(cluster, namespace, "two", spec(replicas=1, shareGroup="g"))
    wait_phase(cluster, namespace, "one", "Ready")
    wait_phase(cluster, namespace, "two", "Ready")
    assert len(holder_pods(cluster, namespace)) == 1
    cluster.kubectl("delete", "-n", namespace, "infm/one", "--timeout=60s")
    assert not replica_pods(cluster, namespace, "one")
    assert len(holder_pods(cluster, namespace)) == 1, "the group's holder stays while 'two' uses it"
    cluster.kubectl("delete", "-n", namespace, "infm/two", "--timeout=60s")
    wait_until(lambda: not live(pods_of(cluster, namespace)), 60, "every pod of the group gone")


def conditions_of(cp, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in get_model(cp, namespace, name).get("status", {}).get("conditions", [])}


def test_each_model_has_a_service_that_comes_back_and_never_takes_someone_elses(
    cluster, namespace, kwok_nodes, operator
) -> None:
    kwok_nodes(1, devices=1, device_mib=16 * GIB)
    core = client.CoreV1Api(cluster.api_client())
    # Someone's own Service, under the name the operator would give the model "taken".
    theirs = core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "vnpu-taken", "labels": {"team": "a"}},
            "spec": {"selector": {"app": "mine"}, "ports": [{"name": "web", "port": 8080}]},
        },
    )
    apply(cluster, namespace, "chat", spec(replicas=2, shareGroup="g"))
    apply(cluster, namespace, "taken", spec(replicas=1, shareGroup="g"))
    chat = wait_phase(cluster, namespace, "chat", "Ready")
    endpoint = f"http://vnpu-chat.{namespace}.svc:80"
    wait_until(
        lambda: get_model(cluster, namespace, "chat")["status"].get("endpoint") == endpoint,
        30,
        "status.endpoint of chat",
    )
    svc = core.read_namespaced_service("vnpu-chat", namespace)
    assert svc.spec.type == "ClusterIP" and svc.spec.cluster_ip
    assert svc.spec.selector == {
        api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE,
        api.LABEL_ROLE: api.ROLE_REPLICA,
        api.LABEL_MODEL: "chat",
    }
    (port,) = svc.spec.ports
    assert (port.name, port.port, port.target_port, port.protocol) == ("http", 80, "http", "TCP")
    assert svc.metadata.labels == {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE, api.LABEL_MODEL: "chat"}
    (owner,) = svc.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == (api.KIND, "chat", chat["metadata"]["uid"])
    assert owner.controller and owner.block_owner_deletion
    printed = cluster.kubectl("get", "infm", "chat", "-n", namespace).stdout
    assert "ENDPOINT" in printed.splitlines()[0] and endpoint in printed

    # The EndpointSlice controller copies the labels: the gateway finds both replicas, on port http.
    replicas = {p.metadata.name for p in replica_pods(cluster, namespace, "chat")}

    def routable() -> bool:
        slices = client.DiscoveryV1Api(cluster.api_client()).list_namespaced_endpoint_slice(
            namespace, label_selector=api.LABEL_MODEL
        )
        found = [parse_slice(client.ApiClient().sanitize_for_serialization(x)) for x in slices.items]
        of_chat = [s for s in found if s is not None and s.key == ModelKey(namespace, "chat") and not s.warm]
        pods = {e.pod for s in of_chat for e in s.endpoints}
        return pods == replicas

    wait_until(routable, 60, "the gateway's view of chat: both replicas ready on port http")

    # Someone deletes the Service: it is back at once (the operator watches its Services).
    core.delete_namespaced_service("vnpu-chat", namespace)
    wait_until(
        lambda: core.read_namespaced_service("vnpu-chat", namespace).metadata.uid != svc.metadata.uid,
        30,
        "the model's Service created again",
    )
    wait_until(
        lambda: get_model(cluster, namespace, "chat")["status"].get("endpoint") == endpoint,
        30,
        "status.endpoint of chat again",
    )

    # The name "taken" would get is someone else's: left as it is, and the model says why.
    wait_until(
        lambda: (
            conditions_of(cluster, namespace, "taken").get("Degraded", {}).get("reason") == "ServiceNameTaken"
        ),
        30,
        "taken: Degraded, ServiceNameTaken",
    )
    degraded = conditions_of(cluster, namespace, "taken")["Degraded"]
    assert degraded["status"] == "True" and "vnpu-taken" in degraded["message"]
    assert "endpoint" not in get_model(cluster, namespace, "taken")["status"]
    still = core.read_namespaced_service("vnpu-taken", namespace)
    assert still.metadata.resource_version == theirs.metadata.resource_version
    assert not still.metadata.owner_references and still.metadata.labels == {"team": "a"}
    assert "ServiceNameTaken" in [e.reason for e in events_of(cluster, namespace, "taken")]
    # Once that Service is gone, the model gets its own (the name is looked at again every resync).
    core.delete_namespaced_service("vnpu-taken", namespace)
    wait_until(
        lambda: (
            get_model(cluster, namespace, "taken")["status"].get("endpoint")
            == f"http://vnpu-taken.{namespace}.svc:80"
        ),
        30,
        "taken: its own Service once the name is free",
    )
    assert conditions_of(cluster, namespace, "taken")["Degraded"]["status"] == "False"


def test_a_refused_service_never_holds_back_the_models_pods(cluster, namespace, kwok_nodes, operator) -> None:
    """Services are created behind the pods (by the reporter): a namespace with no room for Services
    still gets its pods, and the model says why it has no endpoint until there is room."""
    kwok_nodes(1, devices=1, device_mib=16 * GIB)
    core = client.CoreV1Api(cluster.api_client())
    quota = {"metadata": {"name": "no-services"}, "spec": {"hard": {"services": "0"}}}
    core.create_namespaced_resource_quota(namespace, quota)
    wait_until(
        lambda: core.read_namespaced_resource_quota("no-services", namespace).status.hard is not None,
        30,
        "the quota observed",
    )
    apply(cluster, namespace, "chat", spec(replicas=2))
    wait_until(lambda: len(replica_pods(cluster, namespace, "chat")) == 2, 60, "both replica pods")
    wait_until(
        lambda: (
            "exceeded quota"
            in conditions_of(cluster, namespace, "chat").get("Degraded", {}).get("message", "")
        ),
        60,
        "chat: Degraded with the server's quota message",
    )
    assert "endpoint" not in get_model(cluster, namespace, "chat")["status"]
    assert any("vnpu-chat" in e.message for e in events_of(cluster, namespace, "chat") if e.type == "Warning")
    core.delete_namespaced_resource_quota("no-services", namespace)
    endpoint = f"http://vnpu-chat.{namespace}.svc:80"
    wait_until(
        lambda: get_model(cluster, namespace, "chat")["status"].get("endpoint") == endpoint,
        120,  # within the model's backoff
        "chat: its Service once the quota is gone",
    )
    assert conditions_of(cluster, namespace, "chat")["Degraded"]["status"] == "False"
    assert core.read_namespaced_service("vnpu-chat", namespace).metadata.owner_references


def test_operator_killed_repeatedly_mid_reconcile_leaves_no_duplicates(
    cluster, namespace, kwok_nodes, tmp_path
):
    kwok_nodes(2, devices=2, device_mib=16 * GIB)
    op = OperatorProcess(cluster, namespace, tmp_path)
    try:
        for i in range(4):
            apply(cluster, namespace, f"m{i}", spec(replicas=3, shareGroup=f"g{i % 2}"))
        for _ in range(4):  # kill it while it is creating pods, start again
            op.start()
            wait_until(lambda: len(pods_of(cluster, namespace)) > 0, 30, "some pods created")
            op.kill()
        op.start()
        for i in range(4):
            wait_phase(cluster, namespace, f"m{i}", "Ready", timeout=90)
        pods = live(pods_of(cluster, namespace))
        replicas = [p for p in pods if p.metadata.labels[api.LABEL_ROLE] == api.ROLE_REPLICA]
        per_index = collections.Counter(
            (p.metadata.labels[api.LABEL_MODEL], p.metadata.labels["vnpu.io/replica"]) for p in replicas
        )
        assert len(replicas) == 12 and set(per_index.values()) == {1}, per_index
        holders = collections.Counter(
            (
                p.metadata.labels["vnpu.io/share-group"],
                p.spec.node_name,
                p.metadata.annotations[api.ANNOTATION_DEVICE],
            )
            for p in pods
            if p.metadata.labels[api.LABEL_ROLE] == api.ROLE_WEIGHTS
        )
        assert set(holders.values()) == {1}
        used = {(p.spec.node_name, p.metadata.annotations[api.ANNOTATION_DEVICE]) for p in replicas}
        assert {(n, d) for _, n, d in holders} == used, "a holder exactly where replicas of its group run"
    finally:
        cluster.kubectl("delete", "infm", "--all", "-n", namespace, "--timeout=60s", check=False)
        op.stop()


RBAC_MODES = {
    # operator.watchNamespaces empty: one ClusterRole; the operator watches every namespace.
    "cluster-wide": False,
    # operator.watchNamespaces = [the test's namespace]: a Role there, cluster-wide only what is
    # cluster-scoped; the operator watches that namespace.
    "watch-namespaces": True,
}


@pytest.mark.parametrize("namespaced", RBAC_MODES.values(), ids=RBAC_MODES.keys())
def test_operator_runs_under_exactly_the_chart_rbac(
    cluster, namespace, kwok_nodes, kube_bin_dir, tmp_path, namespaced
):
    release, release_ns = ("rbac-ns" if namespaced else "rbac-cw"), "vnpu-rbac"
    # (The namespaced release also keeps NetworkPolicies: its Role holds that rule, and only there.)
    values = (
        ["--set", f"operator.watchNamespaces={{{namespace}}}", "--set", "operator.networkPolicy.enabled=true"]
        if namespaced
        else []
    )
    rendered = subprocess.run(
        [str(kube_bin_dir / "helm"), "template", release, str(CHART), "-n", release_ns,
         "--show-only", "templates/operator-rbac.yaml",
         "--show-only", "templates/operator-scope-policy.yaml", *values],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(rendered) if d)
    # (One Role and RoleBinding are always there: the leader-election Lease in the release namespace.
    # The policy bounding what the operator's identity may write comes with its RBAC.)
    assert kinds == sorted(
        ["ClusterRole", "ClusterRoleBinding", "ServiceAccount", "Role", "RoleBinding"]
        + ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
        + (["Role", "RoleBinding"] if namespaced else [])
    )
    cluster.kubectl("create", "namespace", release_ns, check=False)
    cluster.kubectl("apply", "-f", "-", input=rendered)
    kubeconfig = cluster.kubeconfig_for(
        f"{release}-operator", f"system:serviceaccount:{release_ns}:{release}-vnpu-operator"
    )

    def can_i(*args: str) -> bool:
        out = cluster.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
        return out.stdout.strip() == "yes"

    # The identity is really confined: it may not get a Secret by name, touch deployments or create a
    # PriorityClass; with watchNamespaces it may create pods and Services only in the watched namespace
    # (it reads pods everywhere: any pod holding vnpu memory counts).
    assert not can_i("get", "secrets", "-A") and not can_i("create", "deployments", "-A")
    assert not can_i("create", "priorityclasses")
    assert can_i("create", "pods", "-n", namespace) and can_i("create", "services", "-n", namespace)
    assert can_i("create", "pods", "-n", "default") is not namespaced
    assert can_i("create", "services", "-n", "default") is not namespaced
    assert can_i("list", "pods", "-A")
    # NetworkPolicies: created, and read and updated by the one name the operator keeps.
    assert can_i("create", "networkpolicies", "-n", namespace) is namespaced
    assert can_i("update", f"networkpolicies/{network_policy.NAME}", "-n", namespace) is namespaced
    assert not can_i("update", "networkpolicies/someone-elses", "-n", namespace)
    assert not can_i("get", "networkpolicies/someone-elses", "-n", namespace)
    assert not can_i("delete", "networkpolicies", "-n", namespace)
    kwok_nodes(1, devices=1, device_mib=16 * GIB)
    op = OperatorProcess(cluster, namespace, tmp_path, kubeconfig=kubeconfig, clusterwide=not namespaced)
    try:
        op.start(*(["--network-policy"] if namespaced else []))
        apply(cluster, namespace, "rbac", spec(replicas=2))
        wait_phase(cluster, namespace, "rbac", "Ready")
        wait_until(lambda: get_model(cluster, namespace, "rbac")["status"].get("endpoint"), 30, "its Service")
        wait_until(lambda: "created PodDisruptionBudget" in op.log(), 30, "its PodDisruptionBudget")
        if namespaced:
            assert "created NetworkPolicy" in op.log()
        assert "CapacityPending" not in [e.reason for e in events_of(cluster, namespace, "rbac")]
        cluster.kubectl("delete", "-n", namespace, "infm/rbac", "--timeout=60s")
        assert not live(pods_of(cluster, namespace))
    finally:
        cluster.kubectl("delete", "infm", "--all", "-n", namespace, "--timeout=60s", check=False)
        op.stop()
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)
    # Any denial is a missing rule. (Cluster-wide, the operator also sees what other tests left in
    # namespaces being deleted, where nothing new may be created: not a matter of RBAC.)
    denials = [
        line
        for line in op.log().splitlines()
        if ("orbidden" in line or " 403" in line) and "because it is being terminated" not in line
    ]
    assert not denials, "\n".join(denials[:5])
    refused = [line for line in op.log().splitlines() if f"{release}-vnpu-operator-scope" in line]
    assert not refused, "\n".join(refused[:5])  # everything the operator writes passes its scope policy
    assert f"PriorityClass {PLACEHOLDER_PRIORITY_CLASS} is missing" not in op.log()  # it read the chart's
