"""The operator's service account writes only what the operator writes: the chart's RBAC and its
``<fullname>-operator-scope`` ValidatingAdmissionPolicy against the real API server, with a
service-account token the API server itself issues (``kubectl create token``).

With ``operator.watchNamespaces`` empty the operator's ClusterRole grants pods create/delete/patch,
secrets create/patch/delete and services create/patch in every namespace: on RBAC alone a stolen
operator token could run a privileged hostPID/hostNetwork pod with the host's ``/`` mounted in
kube-system, delete any pod there or patch any Service. The policy refuses every write of the operator's
identity but the ones the operator makes. Every object the operator really creates, changes and
deletes (rendered by its own code and written through its own :class:`vnpu.operator.kube.Kube` under
the token) passes; the rest is refused with the policy's message, and the same requests by the admin
are untouched.

A PodDisruptionBudget the operator writes must select only the operator's pods: a stolen token must
not hold another tenant's pods on a draining node with a budget that allows no disruption.

The chart is rendered for a release of this module's own (its names and service account) and the
binding is narrowed to this module's two namespaces, so nothing else in the session is affected.
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from test_chart import helm, render
from test_device_plugin_policy import token_kubeconfig

from vnpu import api, sharing
from vnpu.cluster.helm import CHART, placeholder_priority_class
from vnpu.cluster.kwok import npu_node_manifest
from vnpu.cluster.processes import wait_until
from vnpu.memory import MemoryEstimate
from vnpu.operator import disruption, network_policy
from vnpu.operator.config import OperatorConfig
from vnpu.operator.kube import MERGE_PATCH, Kube
from vnpu.operator.planner import plan
from vnpu.operator.pods import ModelRef, holder_selector, owner_references, share_key_secret
from vnpu.operator.pods import render as render_pod
from vnpu.operator.services import render_service
from vnpu.operator.state import ObservedSecret, parse_model, parse_node, parse_pod

pytestmark = pytest.mark.integration

MANAGED = {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE}
MODEL = "m"
GROUP = "g"
#: The beginnings of the policy's messages (after "the vnpu operator (<its username>) ").
LABELLED = f"only with the label {api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}: "
UNPRIVILEGED = "runs only unprivileged model pods: Pod {ns}/{name} has "
CLUSTER_IP = "keeps only ClusterIP Services without externalIPs: "
OPAQUE = "creates only Opaque Secrets (its share keys): Secret {ns}/{name} is of type "
ONE_POLICY = (
    f"keeps one NetworkPolicy, {network_policy.NAME}, selecting only the pods labelled "
    f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}: "
)
OWN_PODS = (
    "keeps PodDisruptionBudgets only over the pods it makes, its spec.selector.matchLabels holding "
    f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}: "
)
#: The kinds of the patch tests below: the Python client's name -> the API's.
KINDS = {
    "pod": "Pod",
    "service": "Service",
    "secret": "Secret",
    "pod_disruption_budget": "PodDisruptionBudget",
}
#: A model with every kind of object the operator makes: a serving weight-holder (it may scale to
#: zero and keeps its holders) mounting its group's key Secret and the claim its pvc:// source names,
#: replicas mapping it, placeholders where nothing fits, its Service and its warm Service.
SPEC = {
    "modelName": "m",
    "source": {"uri": "pvc://models/m.safetensors"},
    "weights": {"sizeMiB": 1024},
    "shareGroup": GROUP,
    "replicas": 2,
    "memory": {"kvCacheMiB": 512},
    "scaling": {"minReplicas": 0, "keepWarm": "Always"},
    "placement": {"tolerations": [{"key": "npu", "operator": "Exists", "effect": "NoSchedule"}]},
}


@dataclass(frozen=True)
class Setup:
    policy: str
    home: str  #: the release's namespace, and the tenant namespace of the operator's objects
    other: str  #: someone else's namespace (kube-system in the audit's finding)
    operator: str  #: the operator's username
    kubeconfig: Path  #: the operator's service-account token
    model: dict[str, Any]  #: the InferenceModel in ``home``, as created


def create_namespace(control_plane: Any) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    control_plane.kubectl("create", "namespace", name)
    return name


def victims(namespace: str) -> list[dict[str, Any]]:
    """Someone else's pod, Service, Secret and PodDisruptionBudget: none carries the operator's label."""
    meta = {"name": "victim", "namespace": namespace, "labels": {"app": "victim"}}
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {"containers": [{"name": "main", "image": "local.test/pause:1"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {"selector": {"app": "victim"}, "ports": [{"port": 80}]},
        },
        {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {"password": "x"}},
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta,
            "spec": {"selector": {"matchLabels": {"app": "victim"}}, "maxUnavailable": 1},
        },
    ]


@pytest.fixture(scope="module")
def setup(
    control_plane: Any, kube_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    """The chart's operator RBAC (cluster-wide: watchNamespaces empty, NetworkPolicies on) and scope
    policy for release ``vnpu-<random>`` in ``home``, its binding narrowed to ``home`` and ``other``;
    an InferenceModel in ``home``, someone else's objects in ``other``, and a kubeconfig with the
    operator's token."""
    home, other = create_namespace(control_plane), create_namespace(control_plane)
    release = f"vnpu-{uuid.uuid4().hex[:6]}"
    templates = ("templates/operator-rbac.yaml", "templates/operator-scope-policy.yaml")
    values = ("--set", "operator.networkPolicy.enabled=true")
    shown = [a for t in templates for a in ("--show-only", t)]
    out = helm(kube_bin_dir, "template", release, str(CHART), "-n", home, *values, *shown)
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(d["kind"] for d in rendered) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",  # leader election
        "RoleBinding",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    (binding,) = [d for d in rendered if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    binding["spec"]["matchResources"] = {
        "namespaceSelector": {
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [home, other]}
            ]
        }
    }
    items = {"apiVersion": "v1", "kind": "List", "items": rendered}
    try:
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(items))
        # The chart ships the placeholder PriorityClass (the API server refuses placeholders without it).
        control_plane.kubectl("apply", "-f", "-", input=placeholder_priority_class(kube_bin_dir))
        theirs = {"apiVersion": "v1", "kind": "List", "items": victims(other)}
        control_plane.kubectl("create", "-f", "-", input=json.dumps(theirs))
        model = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": MODEL}, "spec": SPEC}
        created = json.loads(
            control_plane.kubectl(
                "create", "-n", home, "-o", "json", "-f", "-", input=json.dumps(model)
            ).stdout
        )
        token = control_plane.kubectl(
            "create", "token", f"{release}-operator", "-n", home, "--duration=30m"
        ).stdout.strip()
        (policy,) = [d["metadata"]["name"] for d in rendered if d["kind"] == "ValidatingAdmissionPolicy"]
        kubeconfig = token_kubeconfig(
            control_plane, token, tmp_path_factory.mktemp("scope") / "operator.kubeconfig"
        )
        setup = Setup(
            policy, home, other, f"system:serviceaccount:{home}:{release}-operator", kubeconfig, created
        )

        def enforced() -> bool:  # the admission plugin loads policies asynchronously
            out = delete(control_plane, setup, "secret", "victim", dry_run=True)
            return f"ValidatingAdmissionPolicy '{policy}'" in out.stderr

        wait_until(enforced, 30, "the operator's scope policy enforced")
        yield setup
    finally:
        control_plane.kubectl(
            "delete", "-f", "-", "--ignore-not-found", "--wait=false", input=json.dumps(items)
        )
        if os.environ.get("VNPU_KEEP_NAMESPACES") != "1":
            control_plane.kubectl("delete", "namespace", home, other, "--wait=false", check=False)


def kubectl(
    control_plane: Any, setup: Setup, *args: str, admin: bool = False, dry_run: bool = False, **kwargs: Any
) -> Any:
    """kubectl as the operator, or as the admin; ``dry_run`` (always for the admin): admission runs,
    nothing changes."""
    dry = ["--dry-run=server"] if admin or dry_run else []
    kubeconfig = None if admin else setup.kubeconfig
    return control_plane.kubectl(*args, *dry, check=False, kubeconfig=kubeconfig, **kwargs)


def delete(control_plane: Any, setup: Setup, kind: str, name: str, *, dry_run: bool = False) -> Any:
    args = ("delete", kind, name, "-n", setup.other, *(["--dry-run=server"] if dry_run else []))
    return control_plane.kubectl(*args, kubeconfig=setup.kubeconfig, check=False)


def the_operators_objects(model_obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the operator creates for ``model_obj`` (its own code: the planner's intents rendered by
    vnpu.operator.pods, .services and .disruption, the group's key Secret, the namespace's
    NetworkPolicy): on a node with room, and placeholders where there is none. Keyed
    "<kind>[:<vnpu.io/role>]/<name>"."""
    config = OperatorConfig()
    model = parse_model(model_obj)
    assert model.spec is not None and model.spec.holder_serves, model.spec_error
    secrets = [ObservedSecret(model.namespace, sharing.secret_name(GROUP), "uid-key", GROUP, (), False)]
    estimate = MemoryEstimate(
        weights_mib=1024,
        device_weights_mib=1024,
        kv_cache_mib=512,
        activation_mib=0,
        overhead_mib=0,
        staging_mib=0,
    )
    node = npu_node_manifest("npu-0", devices=1, device_mib=16 * 1024)
    node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    out: dict[str, dict[str, Any]] = {}
    for nodes in ([parse_node(node)], []):
        result = plan([model], nodes, [], {model.key: estimate}, config, secrets=secrets)
        for manifest in (
            [render_pod(i, config) for i in result.create]
            + [render_service(i) for i in result.create_services]
            + [disruption.manifest(i) for i in result.budgets]
        ):
            role = manifest["metadata"]["labels"].get(api.LABEL_ROLE, "")
            out[f"{manifest['kind']}:{role}/{manifest['metadata']['name']}"] = manifest
    ref = ModelRef(model.name, model.namespace, model.uid, model.spec)
    secret = share_key_secret(model.namespace, GROUP, [ref], os.urandom(32))
    out[f"Secret/{secret['metadata']['name']}"] = secret
    peers = [{"podSelector": {"matchLabels": {"app": "gateway"}}}]
    policy = network_policy.manifest(model.namespace, peers)
    out[f"NetworkPolicy/{network_policy.NAME}"] = policy
    roles = sorted({k.split("/")[0] for k in out})
    assert roles == [
        "NetworkPolicy",
        "Pod:placeholder",
        "Pod:replica",
        "Pod:weights",
        "PodDisruptionBudget:",
        "Secret",
        "Service:",
        "Service:weights",  # the warm one
    ], roles
    return out


def test_everything_the_operator_writes_passes(control_plane, setup) -> None:
    """Created, changed as the operator changes them (the upgrade path too), and deleted: through the
    operator's own API calls (vnpu.operator.kube), under its token."""
    kube = Kube(control_plane.api_client(setup.kubeconfig))
    admin = client.CoreV1Api(control_plane.api_client())
    home = setup.home
    objects = the_operators_objects(setup.model)
    model = parse_model(setup.model)
    assert model.spec is not None
    ref = ModelRef(model.name, model.namespace, model.uid, model.spec)

    # Created: the key Secret first, then the pods, the Services, the NetworkPolicy and the budget.
    (secret,) = [o for o in objects.values() if o["kind"] == "Secret"]
    made = kube.create_secret(secret)
    assert made is not None
    pods = [o for o in objects.values() if o["kind"] == "Pod"]
    for pod in pods:
        assert kube.create_pod(pod), pod["metadata"]["name"]
    services = [o for o in objects.values() if o["kind"] == "Service"]
    for service in services:
        assert kube.create_service(service), service["metadata"]["name"]
    policy = objects[f"NetworkPolicy/{network_policy.NAME}"]
    assert kube.keep_network_policy(policy) == "created"
    assert {p.metadata.name for p in admin.list_namespaced_pod(home).items} == {
        p["metadata"]["name"] for p in pods
    }
    # Put back when someone edits it, and taken over when someone else made it (labelled then).
    networking = client.NetworkingV1Api(control_plane.api_client())
    networking.patch_namespaced_network_policy(
        network_policy.NAME, home, {"spec": {"ingress": [{"from": [{"podSelector": {}}]}]}}
    )
    assert kube.keep_network_policy(policy) == "updated"
    assert kube.keep_network_policy(policy) == "kept"
    theirs = {**copy.deepcopy(policy), "metadata": {"name": network_policy.NAME, "namespace": setup.other}}
    theirs["spec"]["podSelector"] = {"matchLabels": {"app": "victim"}}
    networking.create_namespaced_network_policy(setup.other, theirs)
    assert kube.keep_network_policy(network_policy.manifest(setup.other, [])) == "updated"

    # The model's PodDisruptionBudget: created, found by its name when the create says AlreadyExists,
    # and its spec put back when someone edits it.
    (budget,) = [o for o in objects.values() if o["kind"] == "PodDisruptionBudget"]
    pdb_name = budget["metadata"]["name"]
    assert kube.create_budget(budget)
    assert not kube.create_budget(budget)
    found = kube.find_budget(home, pdb_name)
    assert found is not None and disruption.ours(found, model) and disruption.as_wanted(found, MODEL)
    budgets = client.PolicyV1Api(control_plane.api_client())
    budgets.patch_namespaced_pod_disruption_budget(pdb_name, home, {"spec": {"minAvailable": 5}})
    kube.set_budget_spec(home, pdb_name, disruption.spec(MODEL, 1))
    assert budgets.read_namespaced_pod_disruption_budget(pdb_name, home).spec.min_available == 1

    # The weight-holder's budget (owned by the holder pod, so made once the pod exists): created,
    # relaxed once no replica maps the holder, held again.
    (holder,) = [p for p in pods if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_WEIGHTS]
    seen = admin.read_namespaced_pod(holder["metadata"]["name"], home)
    holder_pod = parse_pod(admin.api_client.sanitize_for_serialization(seen))
    held = disruption.HolderBudgetIntent(holder_pod, True, (model.key,))
    assert kube.create_budget(held.manifest())
    assert not kube.create_budget(held.manifest())
    found = kube.find_budget(home, held.name)
    assert found is not None and held.owns(found)
    relaxed = disruption.HolderBudgetIntent(holder_pod, False, (model.key,), update=True)
    kube.set_budget_spec(home, held.name, relaxed.spec())
    assert budgets.read_namespaced_pod_disruption_budget(held.name, home).spec.min_available == 0
    kube.set_budget_spec(home, held.name, held.spec())
    assert budgets.read_namespaced_pod_disruption_budget(held.name, home).spec.min_available == 1

    # Events, and the model's status and scale (not matched by the policy).
    event = kube.post_event(model, "Normal", "Placed", "placed")
    assert event
    kube.count_event(home, event, 2)
    assert admin.read_namespaced_event(event, home).count == 2
    kube.patch_model_status(model, {"phase": "Pending"})
    custom = client.CustomObjectsApi(control_plane.api_client())
    read = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, home, api.PLURAL, MODEL)
    assert read["status"]["phase"] == "Pending"
    assert kube.scale_model(home, MODEL, 0, read["metadata"]["resourceVersion"])

    # Changed as the operator changes its own: a holder's ownerReferences and vnpu.io/weights and
    # vnpu.io/holder labels, a Service's selector, the Secret's ownerReferences.
    name = holder["metadata"]["name"]
    kube.set_pod_labels(home, name, {api.LABEL_WEIGHTS: "0123456789abcdef", api.LABEL_HOLDER: name})
    kube.set_pod_owners(home, name, owner_references([ref]))
    assert admin.read_namespaced_pod(name, home).metadata.labels[api.LABEL_WEIGHTS] == "0123456789abcdef"
    (warm,) = [s for s in services if s["metadata"]["labels"].get(api.LABEL_ROLE) == api.ROLE_WEIGHTS]
    selector = holder_selector(GROUP, "other-weights")
    kube.set_service_selector(home, warm["metadata"]["name"], selector)
    assert admin.read_namespaced_service(warm["metadata"]["name"], home).spec.selector == selector
    kube.set_secret_owners(home, secret["metadata"]["name"], owner_references([ref]))

    # The previous release's holder (vnpu.cluster.helm.PREVIOUS_COMMIT): no vnpu.io/weights label, and
    # no automountServiceAccountToken: false, so the ServiceAccount admission plugin gave it a token.
    # The upgraded operator labels it and rewrites its owners, then deletes it.
    older = copy.deepcopy(holder)
    older["metadata"]["name"] = "vnpu-w-g-older"
    del older["metadata"]["labels"][api.LABEL_WEIGHTS]
    del older["metadata"]["labels"][api.LABEL_HOLDER]
    del older["spec"]["automountServiceAccountToken"]
    older["spec"]["serviceAccountName"] = "default"
    older["spec"]["volumes"].append(
        {"name": "kube-api-access-x", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}
    )
    older["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}
    )
    admin.create_namespaced_pod(home, older)
    kube.set_pod_labels(
        home, "vnpu-w-g-older", {api.LABEL_WEIGHTS: "0123456789abcdef", api.LABEL_HOLDER: "vnpu-w-g-older"}
    )
    kube.set_pod_owners(home, "vnpu-w-g-older", owner_references([ref]))
    assert kube.delete_pod(home, "vnpu-w-g-older", force=True)

    # Deleted: every pod (one forced, as on a lost node) and the Secret.
    for i, pod in enumerate(pods):
        assert kube.delete_pod(home, pod["metadata"]["name"], force=i == 0)
    assert kube.delete_secret(home, secret["metadata"]["name"], made.uid)


def replica(setup: Setup) -> dict[str, Any]:
    """One of the operator's replica pods as it renders it, for ``other`` and without owners."""
    objects = the_operators_objects(setup.model)
    pod = copy.deepcopy(next(o for k, o in sorted(objects.items()) if k.startswith("Pod:replica/")))
    pod["metadata"] |= {"namespace": setup.other, "name": f"r-{uuid.uuid4().hex[:6]}", "ownerReferences": []}
    return pod


def host_everything(pod: dict[str, Any]) -> None:
    """The audit's pod: host namespaces, the host's / mounted, privileged."""
    pod["spec"] |= {"hostPID": True, "hostNetwork": True, "hostIPC": True}
    pod["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    container = pod["spec"]["containers"][0]
    container["volumeMounts"].append({"name": "host", "mountPath": "/host"})
    container["securityContext"] = {"privileged": True}


def init_with_capabilities(pod: dict[str, Any]) -> None:
    init = {k: v for k, v in pod["spec"]["containers"][0].items() if not k.endswith("Probe")}
    init |= {"name": "init", "securityContext": {"capabilities": {"add": ["SYS_ADMIN", "NET_RAW"]}}}
    pod["spec"]["initContainers"] = [init]


def host_port(pod: dict[str, Any]) -> None:
    pod["spec"]["containers"][0]["ports"][0]["hostPort"] = 8000


def token(pod: dict[str, Any]) -> None:
    # (serviceAccountName as the ServiceAccount admission plugin sets it, off in these tests)
    pod["spec"] |= {"automountServiceAccountToken": True, "serviceAccountName": "default"}
    pod["spec"]["volumes"].append(
        {"name": "sa", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}
    )


def unlabelled(obj: dict[str, Any]) -> None:
    del obj["metadata"]["labels"][api.LABEL_MANAGED_BY]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (host_everything, UNPRIVILEGED + "hostNetwork, hostPID, hostIPC, hostPath volume host (/), "),
        (host_everything, "privileged container runtime"),
        (init_with_capabilities, "has capabilities SYS_ADMIN, NET_RAW added to init container init"),
        (host_port, "has a hostPort in container runtime"),
        (token, "has a service-account token (volume sa)"),
        (unlabelled, "writes Pods " + LABELLED + "Pod {ns}/{name} would not have it"),
    ],
    ids=["host-namespaces-and-path", "privileged", "capabilities", "host-port", "token", "unlabelled"],
)
def test_a_pod_the_operator_never_makes_is_refused(control_plane, setup, change, message) -> None:
    """The operator's own replica, one thing changed, in someone else's namespace."""
    pod = replica(setup)
    out = kubectl(control_plane, setup, "create", "-f", "-", input=json.dumps(pod), dry_run=True)
    assert out.returncode == 0, out.stderr
    change(pod)
    out = kubectl(control_plane, setup, "create", "-f", "-", input=json.dumps(pod))
    assert out.returncode != 0
    assert f"ValidatingAdmissionPolicy '{setup.policy}'" in out.stderr, out.stderr
    expected = message.format(ns=setup.other, name=pod["metadata"]["name"])
    assert expected in out.stderr, out.stderr
    assert f"the vnpu operator ({setup.operator})" in out.stderr
    # The policy binds the operator's identity only: the admin passes.
    out = kubectl(control_plane, setup, "create", "-f", "-", input=json.dumps(pod), admin=True)
    assert out.returncode == 0, out.stderr


def the_operators(setup: Setup, kind: str) -> dict[str, Any]:
    """The operator's own ``kind`` (Service or Secret) as it renders it, for ``other``, no owners."""
    objects = the_operators_objects(setup.model)
    obj = copy.deepcopy(next(o for k, o in sorted(objects.items()) if o["kind"] == kind))
    obj["metadata"] |= {"namespace": setup.other, "name": f"o-{uuid.uuid4().hex[:6]}", "ownerReferences": []}
    return obj


def node_port(service: dict[str, Any]) -> None:
    service["spec"]["type"] = "NodePort"


def external_ip(service: dict[str, Any]) -> None:
    service["spec"]["externalIPs"] = ["203.0.113.7"]


def service_account_token(secret: dict[str, Any]) -> None:
    secret |= {"type": "kubernetes.io/service-account-token", "data": {}}
    secret["metadata"]["annotations"] = {"kubernetes.io/service-account.name": "default"}


def other_name(policy: dict[str, Any]) -> None:
    policy["metadata"]["name"] = "deny-all"


def selects_every_pod(policy: dict[str, Any]) -> None:
    policy["spec"]["podSelector"] = {}


def holds_the_victims(budget: dict[str, Any]) -> None:
    """The attack: no disruption allowed for another tenant's pods, so their node never drains."""
    budget["spec"] = {"selector": {"matchLabels": {"app": "victim"}}, "maxUnavailable": 0}


def selects_by_expression(budget: dict[str, Any]) -> None:
    """The operator's label in matchExpressions only: the policy reads matchLabels, nothing else."""
    budget["spec"]["selector"] = {
        "matchExpressions": [
            {"key": api.LABEL_MANAGED_BY, "operator": "In", "values": [api.MANAGED_BY_VALUE, "helm"]}
        ]
    }


def managed_by_someone_else(budget: dict[str, Any]) -> None:
    budget["spec"]["selector"]["matchLabels"][api.LABEL_MANAGED_BY] = "helm"


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("Service", unlabelled, "writes Services " + LABELLED + "Service {ns}/{name} would not have it"),
        ("Service", node_port, CLUSTER_IP + "Service {ns}/{name} has type NodePort"),
        ("Service", external_ip, CLUSTER_IP + "Service {ns}/{name} has externalIPs 203.0.113.7"),
        ("Secret", unlabelled, "writes Secrets " + LABELLED + "Secret {ns}/{name} would not have it"),
        ("Secret", service_account_token, OPAQUE + "kubernetes.io/service-account-token"),
        ("NetworkPolicy", other_name, ONE_POLICY + "NetworkPolicy {ns}/{name} is not that"),
        ("NetworkPolicy", selects_every_pod, ONE_POLICY + "NetworkPolicy {ns}/{name} is not that"),
        (
            "PodDisruptionBudget",
            unlabelled,
            "writes PodDisruptionBudgets " + LABELLED + "PodDisruptionBudget {ns}/{name} would not have it",
        ),
        (
            "PodDisruptionBudget",
            holds_the_victims,
            OWN_PODS + "PodDisruptionBudget {ns}/{name} would select pods without that label",
        ),
        (
            "PodDisruptionBudget",
            selects_by_expression,
            OWN_PODS + "PodDisruptionBudget {ns}/{name} would select pods without that label",
        ),
        (
            "PodDisruptionBudget",
            managed_by_someone_else,
            OWN_PODS + "PodDisruptionBudget {ns}/{name} would select pods without that label",
        ),
    ],
    ids=[
        "unlabelled-service",
        "node-port",
        "external-ip",
        "unlabelled-secret",
        "token-secret",
        "policy-name",
        "policy-selects-all",
        "unlabelled-budget",
        "budget-over-the-victims",
        "budget-by-expression",
        "budget-over-someone-elses",
    ],
)
def test_a_service_secret_network_policy_or_budget_the_operator_never_makes_is_refused(
    control_plane, setup, kind, change, message
) -> None:
    obj = the_operators(setup, kind)
    if kind == "NetworkPolicy":
        obj["metadata"]["name"] = network_policy.NAME
    out = kubectl(control_plane, setup, "create", "-f", "-", input=json.dumps(obj), dry_run=True)
    assert out.returncode == 0 or "AlreadyExists" in out.stderr, out.stderr  # as the operator makes it
    change(obj)
    out = kubectl(control_plane, setup, "create", "-f", "-", input=json.dumps(obj))
    assert out.returncode != 0
    assert f"ValidatingAdmissionPolicy '{setup.policy}'" in out.stderr, out.stderr
    assert message.format(ns=setup.other, name=obj["metadata"]["name"]) in out.stderr, out.stderr
    # The admin passes (server-side apply: vnpu-model-pods may exist there already).
    apply = ("apply", "--server-side", "--force-conflicts", "-f", "-")
    applied = kubectl(control_plane, setup, *apply, input=json.dumps(obj), admin=True)
    assert applied.returncode == 0, applied.stderr


@pytest.mark.parametrize("kind", ["pod", "secret"])
def test_the_operator_may_not_delete_what_it_did_not_make(control_plane, setup, kind) -> None:
    assert can_i(control_plane, setup, "delete", kind)  # RBAC alone would let it
    out = delete(control_plane, setup, kind, "victim")
    assert out.returncode != 0
    assert f"ValidatingAdmissionPolicy '{setup.policy}'" in out.stderr, out.stderr
    assert (
        f"the vnpu operator ({setup.operator}) may delete only objects it made, labelled "
        f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}: {KINDS[kind]} {setup.other}/victim is not"
    ) in out.stderr, out.stderr
    assert (
        kubectl(control_plane, setup, "delete", kind, "victim", "-n", setup.other, admin=True).returncode == 0
    )
    # (Services and budgets: no delete in its RBAC at all; garbage collection removes a model's.)
    assert not can_i(control_plane, setup, "delete", "service")
    assert not can_i(control_plane, setup, "delete", "poddisruptionbudget")


def test_the_operator_may_not_delete_a_budget_it_did_not_make_even_where_rbac_lets_it(
    control_plane, setup
) -> None:
    """The chart's RBAC has no delete of budgets; where a cluster admin grants one anyway (an aggregated
    role, a hand-written Role), the policy still lets the operator delete only its own."""
    rbac = "rbac.authorization.k8s.io"
    grant = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": f"{rbac}/v1",
                "kind": "Role",
                "metadata": {"name": "delete-budgets", "namespace": setup.other},
                "rules": [
                    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": ["delete"]}
                ],
            },
            {
                "apiVersion": f"{rbac}/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "delete-budgets", "namespace": setup.other},
                "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "delete-budgets"},
                "subjects": [{"kind": "User", "name": setup.operator}],
            },
        ],
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(grant))
    try:
        wait_until(lambda: can_i(control_plane, setup, "delete", "poddisruptionbudget"), 30, "the grant")
        out = delete(control_plane, setup, "poddisruptionbudget", "victim")
        assert out.returncode != 0
        assert f"ValidatingAdmissionPolicy '{setup.policy}'" in out.stderr, out.stderr
        assert (
            f"the vnpu operator ({setup.operator}) may delete only objects it made, labelled "
            f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}: PodDisruptionBudget {setup.other}/victim is not"
        ) in out.stderr, out.stderr
        # Its own (labelled) may go.
        own = the_operators(setup, "PodDisruptionBudget")
        control_plane.kubectl("create", "-f", "-", input=json.dumps(own))
        out = delete(control_plane, setup, "poddisruptionbudget", own["metadata"]["name"])
        assert out.returncode == 0, out.stderr
    finally:
        control_plane.kubectl("delete", "-f", "-", "--ignore-not-found", input=json.dumps(grant), check=False)
    assert (
        kubectl(
            control_plane, setup, "delete", "poddisruptionbudget", "victim", "-n", setup.other, admin=True
        ).returncode
        == 0
    )


def patch(
    control_plane: Any, setup: Setup, kind: str, namespace: str, name: str, body: Any, admin: bool = False
) -> str:
    """A merge patch as the operator sends one (vnpu.operator.kube: no read first; its RBAC has no get),
    or by the admin (dry run); the API server's refusal message, or "" when admitted."""
    api_client = control_plane.api_client(None if admin else setup.kubeconfig)
    group = client.PolicyV1Api if kind == "pod_disruption_budget" else client.CoreV1Api
    call = getattr(group(api_client), f"patch_namespaced_{kind}")
    try:
        call(name, namespace, body, _content_type=MERGE_PATCH, **({"dry_run": "All"} if admin else {}))
    except ApiException as exc:
        return str(json.loads(exc.body)["message"])
    return ""


#: An ownerReference to something else: garbage collection would delete the object with it.
FOREIGN_OWNER = {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": str(uuid.uuid4())}


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("pod", {"metadata": {"labels": MANAGED}}),  # taking it over
        ("pod", {"metadata": {"ownerReferences": [FOREIGN_OWNER]}}),
        ("service", {"spec": {"selector": {"app": "attacker"}}}),
        ("service", {"metadata": {"labels": MANAGED}}),
        ("secret", {"metadata": {"ownerReferences": [FOREIGN_OWNER]}}),
        ("pod_disruption_budget", {"spec": {"maxUnavailable": 0}}),
        ("pod_disruption_budget", {"metadata": {"labels": MANAGED}}),
    ],
    ids=[
        "pod-label",
        "pod-owners",
        "service-selector",
        "service-label",
        "secret-owners",
        "budget-spec",
        "budget-label",
    ],
)
def test_the_operator_may_not_change_what_it_did_not_make(control_plane, setup, kind, body) -> None:
    assert can_i(control_plane, setup, "patch", kind.replace("_", ""))  # RBAC alone would let it
    refused = patch(control_plane, setup, kind, setup.other, "victim", body)
    assert f"ValidatingAdmissionPolicy '{setup.policy}'" in refused, refused
    assert (
        f"the vnpu operator ({setup.operator}) may change only objects it made, labelled "
        f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}: {KINDS[kind]} {setup.other}/victim is not"
    ) in refused, refused
    assert patch(control_plane, setup, kind, setup.other, "victim", body, admin=True) == ""


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        ("pod", {"metadata": {"labels": {api.LABEL_MANAGED_BY: None}}}, "writes Pods " + LABELLED),
        (
            "service",
            {"spec": {"type": "NodePort"}},
            CLUSTER_IP + "Service {ns}/{name} has a type changed to NodePort",
        ),
        (
            "service",
            {"spec": {"externalIPs": ["203.0.113.7"]}},
            CLUSTER_IP + "Service {ns}/{name} has externalIPs changed",
        ),
        (
            "pod_disruption_budget",
            {"metadata": {"labels": {api.LABEL_MANAGED_BY: None}}},
            "writes PodDisruptionBudgets " + LABELLED,
        ),
        (
            "pod_disruption_budget",
            {"spec": {"selector": {"matchLabels": {api.LABEL_MANAGED_BY: None, "app": "victim"}}}},
            OWN_PODS + "PodDisruptionBudget {ns}/{name} would select pods without that label",
        ),
    ],
    ids=[
        "pod-unlabelled",
        "service-node-port",
        "service-external-ip",
        "budget-unlabelled",
        "budget-over-the-victims",
    ],
)
def test_the_operator_keeps_its_own_objects_as_it_made_them(
    control_plane, setup, kind, body, message
) -> None:
    """Its own label stays on, its Services stay ClusterIP without externalIPs, and its budgets over
    its own pods."""
    made = {
        "service": lambda: the_operators(setup, "Service"),
        "pod_disruption_budget": lambda: the_operators(setup, "PodDisruptionBudget"),
    }.get(kind, lambda: replica(setup))()
    control_plane.kubectl("create", "-f", "-", input=json.dumps(made))  # as the admin
    name = made["metadata"]["name"]
    # What it does change passes: a holder's ownerReferences, a Service's selector, a budget's spec.
    changes = {
        "service": {"spec": {"selector": {**MANAGED, "x": "y"}}},
        "pod_disruption_budget": {"spec": {"minAvailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow"}},
    }.get(kind, {"metadata": {"ownerReferences": []}})
    assert patch(control_plane, setup, kind, setup.other, name, changes) == ""
    refused = patch(control_plane, setup, kind, setup.other, name, body)
    assert f"ValidatingAdmissionPolicy '{setup.policy}'" in refused, refused
    assert message.format(ns=setup.other, name=name) in refused, refused
    assert patch(control_plane, setup, kind, setup.other, name, body, admin=True) == ""


def can_i(control_plane: Any, setup: Setup, verb: str, resource: str) -> bool:
    out = control_plane.kubectl(
        "auth", "can-i", verb, resource, "-n", setup.other, kubeconfig=setup.kubeconfig, check=False
    )
    return out.stdout.strip() == "yes"


def policies(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs if d["kind"] in kinds}


def test_the_policy_is_on_by_default_and_binds_the_operator_only(kube_bin_dir) -> None:
    found = policies(render(kube_bin_dir))
    policy = found["ValidatingAdmissionPolicy/vnpu-operator-scope"]
    (condition,) = policy["spec"]["matchConditions"]
    assert (
        condition["expression"]
        == "request.userInfo.username == 'system:serviceaccount:vnpu-system:vnpu-operator'"
    )
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert found["ValidatingAdmissionPolicyBinding/vnpu-operator-scope"]["spec"] == {
        "policyName": "vnpu-operator-scope",
        "validationActions": ["Deny"],
    }
    # Whatever namespaces the operator serves (with watchNamespaces its RBAC is already confined).
    assert "ValidatingAdmissionPolicy/vnpu-operator-scope" in policies(
        render(kube_bin_dir, "--set", "operator.watchNamespaces={a,b}")
    )
    assert "operator-scope" not in json.dumps(
        render(kube_bin_dir, "--set", "operator.scopePolicy.enabled=false")
    )
    assert "operator-scope" not in json.dumps(render(kube_bin_dir, "--set", "operator.enabled=false"))
    renamed = policies(render(kube_bin_dir, "--set", "fullnameOverride=acme"))
    (condition,) = renamed["ValidatingAdmissionPolicy/acme-operator-scope"]["spec"]["matchConditions"]
    assert "'system:serviceaccount:vnpu-system:acme-operator'" in condition["expression"]


@pytest.mark.parametrize(
    "values",
    [["--set", "operator.scopePolicy.enabled=yes"], ["--set", "operator.scopePolicy.namespaces={a}"]],
    ids=["not-a-boolean", "unknown-key"],
)
def test_the_schema_checks_the_switch(kube_bin_dir, values) -> None:
    out = helm(kube_bin_dir, "template", "vnpu", str(CHART), *values, check=False)
    assert out.returncode != 0 and "scopePolicy" in out.stderr, out.stderr


def test_the_policy_names_the_operators_label_and_network_policy(kube_bin_dir) -> None:
    """The label, its value and the NetworkPolicy the policy allows are the operator's own (vnpu.api,
    vnpu.operator.network_policy): changed there, this fails rather than the operator in a cluster."""
    policy = policies(render(kube_bin_dir))["ValidatingAdmissionPolicy/vnpu-operator-scope"]
    text = json.dumps(policy)
    assert f"object.metadata.labels['{api.LABEL_MANAGED_BY}'] == '{api.MANAGED_BY_VALUE}'" in text
    assert f"object.metadata.name == '{network_policy.NAME}'" in text
    selector = network_policy.manifest("ns", [])["spec"]["podSelector"]
    assert selector == {"matchLabels": MANAGED}
    assert (
        f"object.spec.podSelector.matchLabels == {{'{api.LABEL_MANAGED_BY}': '{api.MANAGED_BY_VALUE}'}}"
        in text
    )
    # A budget's selector holds the operator's label in matchLabels, as the operator writes it.
    assert f"object.spec.selector.matchLabels['{api.LABEL_MANAGED_BY}'] == '{api.MANAGED_BY_VALUE}'" in text
    assert disruption.spec("m")["selector"]["matchLabels"].items() >= MANAGED.items()
