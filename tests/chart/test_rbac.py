"""The chart's RBAC: cluster-wide only what is cluster-scoped when ``operator.watchNamespaces`` is set
(a Role and RoleBinding per watched namespace for the operator and the gateway), no PriorityClass
create anywhere, and the device plugin's own-node policy on by default. Rendering checks here; the
operator running under exactly these rules in both modes is
tests/integration/test_operator.py::test_operator_runs_under_exactly_the_chart_rbac, the device
plugin's policy against the API server tests/chart/test_device_plugin_policy.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_chart import helm, render

from vnpu.cluster.helm import CHART
from vnpu.operator import network_policy
from vnpu.operator.config import PLACEHOLDER_PRIORITY, PLACEHOLDER_PRIORITY_CLASS

NAMESPACED = ["--set", "operator.watchNamespaces={team-a,team-b}"]
OPERATOR_SA = {"kind": "ServiceAccount", "name": "vnpu-operator", "namespace": "vnpu-system"}
GATEWAY_SA = {"kind": "ServiceAccount", "name": "vnpu-gateway", "namespace": "vnpu-system"}
#: Namespaced resources the operator works on in the namespaces it serves.
OPERATOR_NAMESPACED = {
    "inferencemodels",
    "inferencemodels/status",
    "inferencemodels/scale",
    "inferencemodels/finalizers",
    "pods",
    "secrets",
    "services",
    "poddisruptionbudgets",
    "events",
}
#: Cluster-wide in both modes: nodes, the namespaces kopf follows, the CRD kopf discovers, the
#: placeholder class, and a read of pods everywhere (any pod holding vnpu.io memory counts).
OPERATOR_CLUSTER = {"nodes", "namespaces", "customresourcedefinitions", "priorityclasses", "pods"}
#: The one Role in the release namespace, in both modes: the leader-election Lease.
LEADER_ROLE = ("Role", "vnpu-system", "vnpu-operator-leader-election")


def rbac(docs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(kind, namespace, name) -> object, for Roles, ClusterRoles and their bindings."""
    kinds = {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    return {
        (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
        for d in docs
        if d["kind"] in kinds
    }


def resources(role: dict[str, Any]) -> set[str]:
    return {r for rule in role["rules"] for r in rule["resources"]}


def lease_id(docs: list[dict[str, Any]]) -> tuple[str, str]:
    """(namespace, name) of the Lease the operator's Deployment elects its leader on."""
    (operator,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    ]
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    value = {a.split("=", 1)[0]: a.split("=", 1)[-1] for a in args if a.startswith("--leader-")}
    assert "--leader-elect" in value, args
    return value["--leader-election-namespace"], value["--leader-election-id"]


def test_cluster_wide_by_default_with_no_role(kube_bin_dir: Path) -> None:
    objects = rbac(render(kube_bin_dir))
    roles = [k for k in objects if k[0] in ("Role", "RoleBinding")]
    assert roles == [LEADER_ROLE, ("RoleBinding", *LEADER_ROLE[1:])]
    operator = objects[("ClusterRole", "", "vnpu-operator")]
    assert resources(operator) == OPERATOR_NAMESPACED | OPERATOR_CLUSTER
    assert resources(objects[("ClusterRole", "", "vnpu-gateway")]) == {
        "inferencemodels",
        "inferencemodels/scale",
        "endpointslices",
    }
    assert objects[("ClusterRoleBinding", "", "vnpu-operator")]["subjects"] == [OPERATOR_SA]


def test_watch_namespaces_gives_roles_there_and_cluster_wide_only_cluster_scoped(kube_bin_dir: Path) -> None:
    objects = rbac(render(kube_bin_dir, *NAMESPACED))
    default = rbac(render(kube_bin_dir))
    assert resources(objects[("ClusterRole", "", "vnpu-operator")]) == OPERATOR_CLUSTER
    # The gateway reads and wakes models only: nothing cluster-wide at all.
    assert not [k for k in objects if k[0].startswith("Cluster") and k[2] == "vnpu-gateway"]
    for ns in ("team-a", "team-b"):
        role = objects[("Role", ns, "vnpu-operator")]
        # The same rules as the cluster-wide role gives the operator, split: namespace by namespace,
        # and what stays cluster-wide (a read of pods among them).
        cluster_rules = default[("ClusterRole", "", "vnpu-operator")]["rules"]
        split = role["rules"] + objects[("ClusterRole", "", "vnpu-operator")]["rules"]
        assert sorted(map(json.dumps, split)) == sorted(map(json.dumps, cluster_rules))
        (pod_write,) = [r for r in role["rules"] if r["resources"] == ["pods"]]
        assert pod_write["verbs"] == ["create", "delete", "patch"]
        binding = objects[("RoleBinding", ns, "vnpu-operator")]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "vnpu-operator",
        }
        assert binding["subjects"] == [OPERATOR_SA]
        gateway = objects[("Role", ns, "vnpu-gateway")]
        assert gateway["rules"] == default[("ClusterRole", "", "vnpu-gateway")]["rules"]
        assert objects[("RoleBinding", ns, "vnpu-gateway")]["subjects"] == [GATEWAY_SA]
    assert {k[1] for k in objects if k[0] == "Role"} == {"team-a", "team-b", "vnpu-system"}


@pytest.mark.parametrize(
    "values",
    [[], NAMESPACED, ["--set", "operator.replicas=2"], [*NAMESPACED, "--set", "operator.replicas=2"]],
    ids=["cluster-wide", "namespaced", "two-replicas", "namespaced-two-replicas"],
)
def test_nobody_may_create_a_priority_class(kube_bin_dir: Path, values: list[str]) -> None:
    """The chart ships the placeholder PriorityClass; the operator may only read that one, to say so
    when it is missing."""
    docs = render(kube_bin_dir, *values)
    rules = [rule for role in rbac(docs).values() for rule in role.get("rules", [])]
    (priority,) = [r for r in rules if "priorityclasses" in r["resources"]]
    assert priority == {
        "apiGroups": ["scheduling.k8s.io"],
        "resources": ["priorityclasses"],
        "resourceNames": [PLACEHOLDER_PRIORITY_CLASS],
        "verbs": ["get"],
    }
    # One writer among replicas is a Lease in the release namespace (no kopf peering, at any count).
    assert not [r for r in rules if r["apiGroups"] == ["kopf.dev"]]
    leases = [
        (name, role)
        for (kind, ns, name), role in rbac(docs).items()
        if any("leases" in r["resources"] for r in role.get("rules", []))
    ]
    assert [name for name, _ in leases] == ["vnpu-operator-leader-election"]
    # Read and renewed by the name the Deployment gives it, never listed, watched, patched or deleted;
    # a create cannot be named (RBAC does not know the name of an object not yet made).
    group = {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"]}
    assert leases[0][1]["rules"] == [
        {**group, "verbs": ["create"]},
        {**group, "resourceNames": [lease_id(docs)[1]], "verbs": ["get", "update"]},
    ]
    assert lease_id(docs) == ("vnpu-system", "vnpu-operator")


def test_without_placeholders_the_operator_reads_no_priority_class(kube_bin_dir: Path) -> None:
    docs = render(kube_bin_dir, "--set", "operator.placeholders.enabled=false")
    assert "priorityclasses" not in resources(rbac(docs)[("ClusterRole", "", "vnpu-operator")])


def test_the_chart_ships_the_placeholder_class_the_operator_uses(kube_bin_dir: Path) -> None:
    (pc,) = [d for d in render(kube_bin_dir) if d["kind"] == "PriorityClass"]
    assert pc["metadata"]["name"] == PLACEHOLDER_PRIORITY_CLASS and pc["value"] == PLACEHOLDER_PRIORITY
    assert pc["preemptionPolicy"] == "Never" and pc["globalDefault"] is False


def test_the_device_plugin_own_node_policy_is_on_by_default(kube_bin_dir: Path) -> None:
    docs = render(kube_bin_dir)
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    policy = policies["vnpu-device-plugin-own-node"]
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"] == (
        "request.userInfo.username == 'system:serviceaccount:vnpu-system:vnpu-device-plugin'"
    )
    bindings = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert {"policyName": "vnpu-device-plugin-own-node", "validationActions": ["Deny"]} in [
        b["spec"] for b in bindings
    ]
    off = render(kube_bin_dir, "--set", "devicePlugin.nodeRestriction.enabled=false")
    assert "vnpu-device-plugin-own-node" not in json.dumps(off)
    # The plugin's RBAC stays as narrow as RBAC can say: get and patch nodes, nothing else.
    plugin_role = rbac(docs)[("ClusterRole", "", "vnpu-device-plugin")]
    assert plugin_role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]


@pytest.mark.integration
def test_namespaced_gateway_and_operator_are_confined_to_their_namespaces(
    control_plane: Any, kube_bin_dir: Path, namespace: str
) -> None:
    """Against the API server: with watchNamespaces, the operator and the gateway may act in the
    watched namespace and nowhere else; cluster-wide only reads of cluster-scoped objects."""
    release = "rbac-confined"
    out = helm(
        kube_bin_dir, "template", release, str(CHART), "-n", "vnpu-rbac-confined",
        "--set", f"operator.watchNamespaces={{{namespace}}}",
        "--show-only", "templates/operator-rbac.yaml", "--show-only", "templates/gateway.yaml",
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out) if d and d["kind"] not in ("Deployment", "Service")]
    listing = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    control_plane.kubectl("create", "namespace", "vnpu-rbac-confined", check=False)
    control_plane.kubectl("apply", "-f", "-", input=listing)
    try:

        def can(who: str, *args: str) -> bool:
            user = f"system:serviceaccount:vnpu-rbac-confined:{release}-vnpu-{who}"
            out = control_plane.kubectl(
                "auth", "can-i", *args, f"--as={user}", "--as-group=system:serviceaccounts", check=False
            )
            return out.stdout.strip() == "yes"

        assert can("operator", "create", "pods", "-n", namespace)
        assert can("operator", "delete", "secrets", "-n", namespace)
        assert can("operator", "patch", "inferencemodels.vnpu.io", "-n", namespace)
        assert can("operator", "list", "nodes")
        assert not can("operator", "create", "pods", "-n", "default")
        # Pods are read everywhere (a foreign pod holding vnpu memory counts), written nowhere else.
        assert can("operator", "list", "pods", "--all-namespaces")
        assert not can("operator", "delete", "pods", "-n", "default")
        assert not can("operator", "patch", "pods", "-n", "default")
        assert not can("operator", "create", "secrets", "-n", "kube-system")
        assert not can("operator", "create", "priorityclasses")
        assert not can("operator", "get", "priorityclasses/system-node-critical")
        assert can("operator", "get", f"priorityclasses/{PLACEHOLDER_PRIORITY_CLASS}")
        assert can("gateway", "list", "endpointslices.discovery.k8s.io", "-n", namespace)
        assert can("gateway", "patch", "inferencemodels.vnpu.io", "--subresource=scale", "-n", namespace)
        assert not can("gateway", "list", "endpointslices.discovery.k8s.io", "--all-namespaces")
        assert not can("gateway", "patch", "inferencemodels.vnpu.io", "-n", "default")
        assert not can("gateway", "list", "nodes")
    finally:
        control_plane.kubectl("delete", "-f", "-", "--ignore-not-found", input=listing, check=False)


@pytest.mark.integration
def test_the_operator_leads_through_its_own_lease_and_may_not_take_another(
    control_plane: Any, kube_bin_dir: Path, namespace: str, tmp_path: Path
) -> None:
    """Against the API server, under the chart's RBAC: the real operator, with the leader-election
    arguments its Deployment gets, creates, holds and releases its Lease; given another Lease of the
    release namespace, one expired (any candidate may take it over), it cannot read or update it."""
    from kubernetes import client

    from vnpu.cluster.controlplane import free_port
    from vnpu.cluster.processes import ManagedProcess, wait_until

    release = f"l{namespace[2:]}"  # short: the client certificate's CN (64 at most) names the account
    out = helm(
        kube_bin_dir, "template", release, str(CHART), "-n", namespace,
        "--show-only", "templates/operator-rbac.yaml", "--show-only", "templates/operator-deployment.yaml",
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out) if d]
    lease_ns, lease_name = lease_id(docs)
    assert (lease_ns, lease_name) == (namespace, f"{release}-vnpu-operator")
    listing = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(rbac(docs).values())})
    control_plane.kubectl("apply", "-f", "-", input=listing)
    kubeconfig = control_plane.kubeconfig_for(
        f"{release}-operator", f"system:serviceaccount:{namespace}:{release}-vnpu-operator"
    )
    leases = client.CoordinationV1Api(control_plane.api_client())

    def can(*args: str) -> bool:
        proc = control_plane.kubectl(
            "auth", "can-i", *args, "-n", namespace, kubeconfig=kubeconfig, check=False
        )
        return proc.stdout.strip() == "yes"

    def operator(lease: str) -> ManagedProcess:
        return ManagedProcess(
            f"operator-{lease}",
            [
                *(sys.executable, "-m", "vnpu", "operator", "--standalone", "--log-format", "text"),
                *("--kubeconfig", str(kubeconfig), "-n", namespace, "--metrics-port", str(free_port())),
                *("--runtime-image", "local.test/vnpu:dev", "--leader-elect"),
                *(f"--leader-election-namespace={lease_ns}", f"--leader-election-id={lease}"),
            ],
            tmp_path / f"operator-{lease}.log",
        )

    try:
        assert can("create", "leases") and can("get", f"leases/{lease_name}")
        assert can("update", f"leases/{lease_name}")
        for verb in ("get", "update", "patch", "delete"):
            assert not can(verb, "leases/someone-elses"), verb
        for verb in ("list", "watch", "patch", "delete", "deletecollection"):
            assert not can(verb, "leases"), verb

        leader = operator(lease_name)
        try:
            wait_until(lambda: "leading: Lease" in leader.log.read_text(), 90, "the operator to lead")
            held = leases.read_namespaced_lease(lease_name, lease_ns).spec
            assert held.holder_identity and held.holder_identity.startswith(socket.gethostname())
            renewed = held.renew_time
            wait_until(
                lambda: leases.read_namespaced_lease(lease_name, lease_ns).spec.renew_time != renewed,
                30,
                "a renewal",
            )
        finally:
            # What the kubelet sends; the operator releases the Lease as it shuts down (and exits:
            # tests/integration/test_operator_shutdown.py).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(leader.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: "released the Lease" in leader.log.read_text(), 30, "the release")
            leader.stop(timeout=1)
        log = leader.log.read_text()
        assert "released the Lease" in log, log[-3000:]
        assert leases.read_namespaced_lease(lease_name, lease_ns).spec.holder_identity is None
        refused = ("orbidden", "reading the Lease:", "creating the Lease:", "updating the Lease:")
        assert not [line for line in log.splitlines() if any(r in line for r in refused)], log[-3000:]

        # Another controller's Lease, expired long ago: a candidate that may read and update it takes
        # it over. The operator may not.
        long_ago = "2020-01-01T00:00:00.000000Z"
        someone_elses = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "someone-elses", "namespace": lease_ns},
            "spec": {
                "holderIdentity": "another-controller",
                "leaseDurationSeconds": 1,
                "acquireTime": long_ago,
                "renewTime": long_ago,
            },
        }
        control_plane.kubectl("create", "-f", "-", input=json.dumps(someone_elses))
        other = operator("someone-elses")
        try:
            said = ("reading the Lease: 403", "leading: Lease")
            wait_until(lambda: any(w in other.log.read_text() for w in said), 90, "a first try")
            time.sleep(3)  # more than a retry period (2 s) past the Lease's duration (1 s)
            log = other.log.read_text()
            assert "reading the Lease: 403 Forbidden" in log and "leading: Lease" not in log, log[-3000:]
        finally:
            other.stop(timeout=1)
        assert leases.read_namespaced_lease("someone-elses", lease_ns).spec.holder_identity == (
            "another-controller"
        )
    finally:
        control_plane.kubectl("delete", "-f", "-", "--ignore-not-found", input=listing, check=False)


@pytest.mark.parametrize("values", [[], NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_the_operator_may_read_and_update_only_its_own_network_policy(
    kube_bin_dir: Path, values: list[str]
) -> None:
    """get and update name the one policy the operator keeps; create cannot be named (RBAC does not
    know the name of an object not yet made), so it is a rule of its own."""
    assert not [
        r
        for role in rbac(render(kube_bin_dir, *values)).values()
        for r in role.get("rules", [])
        if "networkpolicies" in r["resources"]
    ]  # off by default
    docs = render(kube_bin_dir, *values, "--set", "operator.networkPolicy.enabled=true")
    roles = [
        role for (kind, _, name), role in rbac(docs).items() if kind.endswith("Role") and "operator" in name
    ]
    rules = [r for role in roles for r in role["rules"] if "networkpolicies" in r["resources"]]
    group = {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"]}
    expected = [
        {**group, "verbs": ["create"]},
        {**group, "resourceNames": [network_policy.NAME], "verbs": ["get", "update"]},
    ]
    assert rules == expected * (2 if values else 1)  # (namespaced: in each watched namespace's Role)


@pytest.mark.parametrize("values", [[], NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_the_operator_keeps_disruption_budgets_without_deleting_any(
    kube_bin_dir: Path, values: list[str]
) -> None:
    """One rule: watched (an informer, by the operator's label), listed by name when the name is taken,
    created, and patched to put a spec back. No get, update or delete: garbage collection removes a
    model's budget with it."""
    docs = render(kube_bin_dir, *values)
    roles = [
        role for (kind, _, name), role in rbac(docs).items() if kind.endswith("Role") and "operator" in name
    ]
    rules = [r for role in roles for r in role["rules"] if "poddisruptionbudgets" in r["resources"]]
    expected = {
        "apiGroups": ["policy"],
        "resources": ["poddisruptionbudgets"],
        "verbs": ["list", "watch", "create", "patch"],
    }
    assert rules == [expected] * (2 if values else 1)  # (namespaced: in each watched namespace's Role)
    if values:  # nothing about budgets cluster-wide
        assert "poddisruptionbudgets" not in resources(rbac(docs)[("ClusterRole", "", "vnpu-operator")])
