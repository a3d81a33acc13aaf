"""``--network-policy`` against the real API server: each namespace with models gets the policy
before its pods, the operator keeps it as it wants it, and a namespace whose policy is refused gets
no pods while another converges. (Enforcement is the CNI's; the clusters here run none that enforces
NetworkPolicy, so what is checked is the object and which pods its selector takes.)"""

from __future__ import annotations

import datetime as dt
import json

import test_operator
from kubernetes import client
from operator_harness import OperatorProcess, get_model, live, pods_of
from test_operator import GIB, apply, replica_pods, spec, wait_phase
from test_operator_shared_cluster import condition, local, new_namespace

from vnpu import api
from vnpu.cluster.processes import wait_until
from vnpu.operator import network_policy

# The fixtures of test_operator.py: the scheduler, controller-manager and kwok; the `models` claim.
cluster = test_operator.cluster
model_claim = test_operator.model_claim

GATEWAY = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vnpu-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}},
}
# Peers spelled with empty fields, which the API server drops when it stores them: the policy must
# still settle (written once, then only read).
MONITORING = {
    "namespaceSelector": {"matchLabels": {"team": "monitoring"}, "matchExpressions": []},
    "podSelector": {
        "matchLabels": {},
        "matchExpressions": [{"key": "app", "operator": "Exists", "values": []}],
    },
}
NODES = {"ipBlock": {"cidr": "10.0.0.0/8", "except": []}}
STORED = [
    {
        "namespaceSelector": {"matchLabels": {"team": "monitoring"}},
        "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
    },
    {"ipBlock": {"cidr": "10.0.0.0/8"}},
]


def test_each_namespace_gets_its_policy_before_its_pods_and_a_refused_one_gets_no_pods(
    cluster, namespace, kwok_nodes, tmp_path
) -> None:
    kwok_nodes(1, devices=1, device_mib=16 * GIB)
    networking = client.NetworkingV1Api(cluster.api_client())
    core = client.CoreV1Api(cluster.api_client())
    blocked = new_namespace(cluster, f"np-{namespace.removeprefix('t-')}")
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-policies"},
             "spec": {"hard": {"count/networkpolicies.networking.k8s.io": "0"}}}  # fmt: skip
    cluster.kubectl("apply", "-n", blocked, "-f", "-", input=json.dumps(quota))
    wait_until(
        lambda: core.read_namespaced_resource_quota("no-policies", blocked).status.hard, 30, "quota seen"
    )
    op = OperatorProcess(cluster, namespace, tmp_path).start(
        "-n", blocked, "--network-policy", "--network-policy-from", json.dumps(GATEWAY),
        *(f"--network-policy-from={json.dumps(peer)}" for peer in (MONITORING, NODES)),
    )  # fmt: skip
    try:
        apply(cluster, namespace, "open", spec(replicas=2))
        apply(cluster, blocked, "shut", local(replicas=1))
        wait_phase(cluster, namespace, "open", "Ready")

        def policy() -> client.V1NetworkPolicy:
            return networking.read_namespaced_network_policy(network_policy.NAME, namespace)

        made = policy()
        assert made.metadata.labels[api.LABEL_MANAGED_BY] == api.MANAGED_BY_VALUE
        body = client.ApiClient().sanitize_for_serialization(made.spec)
        assert body == {
            "podSelector": {"matchLabels": {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {}}, GATEWAY, *STORED]}],
        }
        # It takes every pod the operator made there (holder and replicas), and was there first.
        selected = {
            p.metadata.name
            for p in live(pods_of(cluster, namespace, f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}"))
        }
        assert {p.metadata.name for p in live(pods_of(cluster, namespace))} == selected and len(selected) == 3
        first_pod = min(p.metadata.creation_timestamp for p in live(pods_of(cluster, namespace)))
        assert made.metadata.creation_timestamp <= first_pod

        # The refused namespace: no pods, and its model says why, in the server's words.
        def refused() -> bool:
            c = condition(get_model(cluster, blocked, "shut"), "Degraded")
            return f"keeping NetworkPolicy {network_policy.NAME}" in c.get("message", "") and (
                "exceeded quota" in c.get("message", "")
            )

        wait_until(refused, 60, "the refusal in the blocked model's status")
        assert not live(pods_of(cluster, blocked)), "pods created without their policy"

        # Deleted, it comes back; edited to let everyone in, it is put back (within a resync, 3 s here).
        networking.delete_namespaced_network_policy(network_policy.NAME, namespace)
        wait_until(lambda: policy().metadata.uid != made.metadata.uid, 30, "the policy re-created")
        others = {"labels": {"team": "a"}, "annotations": {"example.com/owner": "team-a"}}
        networking.patch_namespaced_network_policy(
            network_policy.NAME, namespace, {"spec": {"ingress": [{}]}, "metadata": others}
        )
        wait_until(lambda: len(policy().spec.ingress[0]._from or []) == 4, 30, "the policy put back")
        # Others' labels and annotations stay: only the spec is put back.
        assert policy().metadata.labels["team"] == "a"
        assert policy().metadata.annotations["example.com/owner"] == "team-a"
        # (The operator logs once its write is done: the test may see the write first.)
        wait_until(lambda: "updated NetworkPolicy" in op.log(), 10, "the put back logged")
        assert "created NetworkPolicy" in op.log()
        # Settled, it is read once a resync and never written again (its peers spelled as stored).
        version = policy().metadata.resource_version
        stamp = dt.datetime.now(dt.UTC)
        wait_until(lambda: (dt.datetime.now(dt.UTC) - stamp).total_seconds() > 8, 10, "three resyncs")
        assert policy().metadata.resource_version == version

        # Quota lifted: the blocked namespace gets its policy, then its pods.
        cluster.kubectl("delete", "-n", blocked, "resourcequota", "no-policies")
        wait_phase(cluster, blocked, "shut", "Ready", timeout=120)
        assert networking.read_namespaced_network_policy(network_policy.NAME, blocked)
    finally:
        for ns in (namespace, blocked):
            cluster.kubectl("delete", "infm", "--all", "-n", ns, "--timeout=60s", check=False)
        op.stop()


def test_a_namespace_whose_quota_our_policy_fills_goes_on_converging(
    cluster, namespace, kwok_nodes, tmp_path
) -> None:
    """Quota admission runs before the API server looks for the name (kubernetes#106842): where a
    ResourceQuota of one NetworkPolicy is filled by ours, creating it again is refused 403 "exceeded
    quota", not 409. The policy there is read, never created again: resyncs and a restart later, the
    models are not Degraded and the namespace still converges."""
    kwok_nodes(1, devices=1, device_mib=16 * GIB)
    core = client.CoreV1Api(cluster.api_client())
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "one-policy"},
             "spec": {"hard": {"count/networkpolicies.networking.k8s.io": "1"}}}  # fmt: skip
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(quota))
    wait_until(
        lambda: core.read_namespaced_resource_quota("one-policy", namespace).status.hard, 30, "quota seen"
    )
    op = OperatorProcess(cluster, namespace, tmp_path).start("--network-policy")

    def quiet_for_resyncs() -> None:
        """Three resyncs (3 s each here) with the policy there: each keeps it without a refusal."""
        stamp = dt.datetime.now(dt.UTC)
        wait_until(lambda: (dt.datetime.now(dt.UTC) - stamp).total_seconds() > 10, 15, "three resyncs")
        assert condition(get_model(cluster, namespace, "q"), "Degraded").get("status") != "True"
        assert "exceeded quota" not in op.log()

    try:
        apply(cluster, namespace, "q", spec(replicas=1))
        wait_phase(cluster, namespace, "q", "Ready")
        used = core.read_namespaced_resource_quota("one-policy", namespace).status.used or {}
        assert used.get("count/networkpolicies.networking.k8s.io") == "1"  # (quota admission counted it)
        quiet_for_resyncs()
        op.stop()
        op.start("--network-policy")  # a new operator's first pass finds the policy there
        quiet_for_resyncs()
        apply(cluster, namespace, "q", spec(replicas=2))
        wait_until(lambda: len(replica_pods(cluster, namespace, "q")) == 2, 60, "the second replica")
        wait_until(
            lambda: get_model(cluster, namespace, "q")["status"].get("readyReplicas") == 2, 60, "ready"
        )
        quiet_for_resyncs()
        assert op.log().count("created NetworkPolicy") == 1
    finally:
        cluster.kubectl("delete", "infm", "--all", "-n", namespace, "--timeout=60s", check=False)
        op.stop()
