"""Scale to zero, keep-warm and wake against the real API server, scheduler and kwok nodes (issue 13).

The gateway's part (holding a request while it scales a model to 1) is tests/integration/
test_gateway.py; here the operator's: an idle model goes to 0 through its scale subresource, keepWarm
decides whether its weight-holder stays, and a wake (``kubectl scale --replicas=1``, what the gateway
does) lands on the warm holder's device and is not undone before the gateway reports the request.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import test_operator
from kubernetes import client
from operator_harness import get_model
from test_operator import GIB, apply, events_of, holder_pods, replica_pods, spec, wait_phase

from vnpu import api
from vnpu.api import service_name, warm_service_name
from vnpu.cluster.processes import wait_until
from vnpu.gateway.discovery import parse_slice
from vnpu.operator.kube import Kube

IDLE_S = 30  # the CRD's minimum
# test_operator's fixtures: its kwok cluster, the operator process, the models claim (autouse).
cluster = test_operator.cluster
operator = test_operator.operator
model_claim = test_operator.model_claim


def _long_ago() -> str:
    return (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _scaled(keep_warm: str, group: str) -> dict:
    return spec(
        replicas=2,
        shareGroup=group,
        scaling={"minReplicas": 0, "idleSeconds": IDLE_S, "keepWarm": keep_warm},
    )


def test_idle_models_go_to_zero_keep_warm_decides_and_a_wake_attaches(
    cluster, namespace, kwok_nodes, operator
) -> None:
    kwok_nodes(1, devices=2, device_mib=16 * GIB)
    apply(cluster, namespace, "warm", _scaled("Always", "warm"))
    apply(cluster, namespace, "cold", _scaled("Never", "cold"))
    apply(cluster, namespace, "steady", spec(replicas=1, shareGroup="steady"))  # minReplicas 1: stays
    for name in ("warm", "cold", "steady"):
        wait_phase(cluster, namespace, name, "Ready")
        # The gateway's activity: a request an hour ago (the operator's own clock starts at first sight).
        cluster.kubectl(
            "annotate", "infm", name, "-n", namespace, "--overwrite",
            f"{api.ANNOTATION_LAST_REQUEST}={_long_ago()}", f"{api.ANNOTATION_REQUESTS}=3",
        )  # fmt: skip
    (warm_holder,) = [
        h for h in holder_pods(cluster, namespace) if h.metadata.labels[api.LABEL_SHARE_GROUP] == "warm"
    ]
    # Its holder answers while it has no replica (--serve, port http) behind a warm Service; keepWarm
    # Never's holder only holds, and has none.
    holder_args = {
        h.metadata.labels[api.LABEL_SHARE_GROUP]: h.spec.containers[0].args
        for h in holder_pods(cluster, namespace)
    }
    assert "--serve" in holder_args["warm"] and "--serve" not in holder_args["cold"]
    services = {
        s["metadata"]["name"]: s
        for s in json.loads(cluster.kubectl("get", "svc", "-n", namespace, "-o", "json").stdout)["items"]
    }
    assert services[warm_service_name("warm")]["spec"]["selector"][api.LABEL_SHARE_GROUP] == "warm"
    assert warm_service_name("cold") not in services and service_name("cold") in services

    for name in ("warm", "cold"):
        wait_phase(cluster, namespace, name, "Idle", timeout=IDLE_S + 40)
        assert get_model(cluster, namespace, name)["spec"]["replicas"] == 0
        assert "ScaledToZero" in {e.reason for e in events_of(cluster, namespace, name)}
    wait_until(lambda: not replica_pods(cluster, namespace, "warm"), 60, "warm's replicas gone")
    wait_until(lambda: not replica_pods(cluster, namespace, "cold"), 60, "cold's replicas gone")
    groups = lambda: {h.metadata.labels[api.LABEL_SHARE_GROUP]: h for h in holder_pods(cluster, namespace)}  # noqa: E731
    wait_until(lambda: "cold" not in groups(), 60, "keepWarm Never: the holder released")
    assert groups()["warm"].metadata.uid == warm_holder.metadata.uid, "keepWarm Always: the same holder stays"
    status = get_model(cluster, namespace, "warm")["status"]
    assert status["scaling"]["warm"] is True and status["readyReplicas"] == 0
    assert get_model(cluster, namespace, "cold")["status"]["scaling"]["warm"] is False
    assert get_model(cluster, namespace, "steady")["spec"]["replicas"] == 1
    assert 'vnpu_operator_warm_holders{pool="default"} 1.0' in operator.metrics()

    # A wake, as the gateway does it; its last request is still an hour old (the gateway's counts come
    # a few seconds later): the model must stay up, on the warm holder's device, mapping its weights.
    cluster.kubectl("scale", "-n", namespace, "infm/warm", "--replicas=1")
    wait_phase(cluster, namespace, "warm", "Ready")
    (replica,) = replica_pods(cluster, namespace, "warm")
    assert (
        replica.metadata.annotations[api.ANNOTATION_DEVICE]
        == warm_holder.metadata.annotations[api.ANNOTATION_DEVICE]
    )
    assert replica.metadata.annotations["vnpu.io/weight-holder"] == warm_holder.metadata.name
    assert groups()["warm"].metadata.uid == warm_holder.metadata.uid
    time.sleep(8)  # a few resync passes (3 s)
    assert get_model(cluster, namespace, "warm")["spec"]["replicas"] == 1


def test_the_scale_down_loses_to_a_concurrent_wake(cluster, namespace, kwok_nodes, operator) -> None:
    """The operator's scale-down carries the resourceVersion it planned from: if the gateway scaled the
    model meanwhile, the API server refuses it (409) and the wake stands."""
    kwok_nodes(1, devices=1, device_mib=16 * GIB)
    apply(cluster, namespace, "race", spec(replicas=1))
    read = get_model(cluster, namespace, "race")["metadata"]["resourceVersion"]
    cluster.kubectl("scale", "-n", namespace, "infm/race", "--replicas=2")  # the wake lands first
    kube = Kube(cluster.api_client(), (namespace,))
    assert kube.scale_model(namespace, "race", 0, read) is False
    assert get_model(cluster, namespace, "race")["spec"]["replicas"] == 2
    # At the version it reads now it goes through (retried: the operator's status writes move it too).
    wait_until(
        lambda: kube.scale_model(
            namespace, "race", 0, get_model(cluster, namespace, "race")["metadata"]["resourceVersion"]
        ),
        30,
        "a scale at the current version",
    )
    assert get_model(cluster, namespace, "race")["spec"]["replicas"] == 0


def test_a_warm_service_routes_to_its_own_weights_only_and_after_an_upgrade_too(
    cluster, namespace, kwok_nodes, operator
) -> None:
    """Two models of one explicit shareGroup with different weights: a holder each, and each warm
    Service's EndpointSlice lists its own model's holder only (a holder answers any model name). An
    operator from before vnpu.io/weights left holders without the label and warm Services selecting
    the whole group: the operator labels the holders and patches the selectors in place."""
    kwok_nodes(1, devices=2, device_mib=16 * GIB)
    at_zero = {"minReplicas": 0, "keepWarm": "Always"}
    for name in ("llama", "mistral"):
        uri = f"pvc://models/{name}.safetensors"
        apply(
            cluster,
            namespace,
            name,
            spec(replicas=1, shareGroup="team", source={"uri": uri}, scaling=at_zero),
        )
    for name in ("llama", "mistral"):
        wait_phase(cluster, namespace, name, "Ready")
    holder_of = {
        next(e.value for e in h.spec.containers[0].env if e.name == "VNPU_MODEL_URI").split("/")[-1]: h
        for h in holder_pods(cluster, namespace)
    }
    assert set(holder_of) == {"llama.safetensors", "mistral.safetensors"}
    core = client.CoreV1Api(cluster.api_client())
    discovery = client.DiscoveryV1Api(cluster.api_client())

    def warm_endpoints(model: str) -> set[str]:
        slices = discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"{api.LABEL_MODEL}={model},{api.LABEL_ROLE}={api.ROLE_WEIGHTS}"
        )
        found = [parse_slice(client.ApiClient().sanitize_for_serialization(x)) for x in slices.items]
        return {e.pod for s in found if s is not None and s.warm for e in s.endpoints}

    def routed_alone() -> bool:
        return all(
            warm_endpoints(m) == {holder_of[f"{m}.safetensors"].metadata.name} for m in ("llama", "mistral")
        )

    wait_until(routed_alone, 60, "each warm Service's EndpointSlice: its own model's holder only")

    # The state an older operator left: holders without the label, warm Services selecting the group.
    for h in holder_of.values():
        cluster.kubectl("label", "pod", h.metadata.name, "-n", namespace, f"{api.LABEL_WEIGHTS}-")
    remove = [{"op": "remove", "path": "/spec/selector/" + api.LABEL_WEIGHTS.replace("/", "~1")}]
    uid = {}
    for m in ("llama", "mistral"):
        name = warm_service_name(m)
        uid[m] = core.read_namespaced_service(name, namespace).metadata.uid
        cluster.kubectl("patch", "svc", name, "-n", namespace, "--type=json", "-p", json.dumps(remove))

    def upgraded() -> bool:
        labelled = all(
            api.LABEL_WEIGHTS in (core.read_namespaced_pod(h.metadata.name, namespace).metadata.labels or {})
            for h in holder_of.values()
        )
        selectors = [core.read_namespaced_service(warm_service_name(m), namespace).spec.selector for m in uid]
        return labelled and all(api.LABEL_WEIGHTS in s for s in selectors) and routed_alone()

    wait_until(upgraded, 60, "the holders labelled and the warm Services' selectors patched")
    # In place: the same Services.
    assert {m: core.read_namespaced_service(warm_service_name(m), namespace).metadata.uid for m in uid} == uid


def test_a_busy_model_stays_up_under_a_gateway_whose_clock_runs_behind(
    cluster, namespace, kwok_nodes, operator
) -> None:
    """A gateway an hour behind writes last-request times an hour old while it counts requests: the
    operator used to scale the busy model to 0 once idleSeconds passed from its first sight. It now
    takes each move of the counter, seen by its own clock, as a request; once the counter stops, the
    model goes to 0 as any idle one."""
    kwok_nodes(1, devices=1, device_mib=16 * GIB)
    apply(cluster, namespace, "busy", _scaled("Never", "busy"))
    wait_phase(cluster, namespace, "busy", "Ready")

    def report(total: int) -> None:  # a gateway flush, its clock an hour behind
        cluster.kubectl(
            "annotate", "infm", "busy", "-n", namespace, "--overwrite",
            f"{api.ANNOTATION_LAST_REQUEST}={_long_ago()}", f"{api.ANNOTATION_REQUESTS}={total}",
        )  # fmt: skip

    total, until = 0, time.monotonic() + IDLE_S + 15
    while time.monotonic() < until:
        total += 2
        report(total)
        assert get_model(cluster, namespace, "busy")["spec"]["replicas"] == 2, f"scaled down at {total}"
        time.sleep(3)
    wait_phase(cluster, namespace, "busy", "Idle", timeout=IDLE_S + 40)  # no more requests
    assert get_model(cluster, namespace, "busy")["spec"]["replicas"] == 0
