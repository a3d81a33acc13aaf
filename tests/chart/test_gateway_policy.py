"""The gateway may change only its activity annotations on an InferenceModel, and scale a model only
from 0 replicas to 1: the chart's RBAC and ValidatingAdmissionPolicy against the real API server, with
a service-account token the API server itself issues (``kubectl create token``).

The gateway's role grants ``inferencemodels patch`` (RBAC cannot say "these two annotations"), so on
RBAC alone a compromised gateway could rewrite any tenant's ``spec.runtime.image``; the policy refuses
every change but the ones gateway/activity.py makes. It is rendered for a release of this test's own
(its names and service account), so nothing else in the session is affected.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from test_chart import render, show_only
from test_device_plugin_policy import token_kubeconfig

from vnpu import api
from vnpu.cluster.helm import CHART
from vnpu.cluster.processes import wait_until
from vnpu.gateway.activity import ActivityRecorder, scale_from_zero

pytestmark = pytest.mark.integration

MODEL = "m"
WRITTEN = f"{api.ANNOTATION_REQUESTS} and {api.ANNOTATION_LAST_REQUEST}"
OWNER_REFERENCE_CHANGE = {
    "metadata": {
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": str(uuid.uuid4())}]
    }
}


@dataclass(frozen=True)
class Setup:
    policy: str
    namespace: str
    kubeconfig: Path  # the gateway's service-account token
    service_account: str

    @property
    def model(self) -> str:
        return f"{self.namespace}/{MODEL}"


def model(replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": MODEL, "labels": {"team": "a"}, "annotations": {"note": "x"}},
        "spec": {
            "modelName": "m",
            "source": {"uri": "hf://org/model"},
            "replicas": replicas,
            "memory": {"kvCacheMiB": 256},
        },
    }


@pytest.fixture
def setup(control_plane: Any, kube_bin_dir: Path, namespace: str, tmp_path: Path) -> Iterator[Setup]:
    """The chart's gateway ServiceAccount, ClusterRole(Binding) and activity-only policy for release
    ``vnpu-<random>`` in ``namespace``, a model there, and a kubeconfig with the gateway's token."""
    release = f"vnpu-{uuid.uuid4().hex[:6]}"
    rendered = [
        d
        for d in show_only(
            kube_bin_dir, release, namespace, "templates/gateway.yaml", "templates/gateway-model-policy.yaml"
        )
        if d["kind"] not in ("Deployment", "Service")  # nothing runs: the identity and its rules
    ]
    assert sorted(d["kind"] for d in rendered) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    items = {"apiVersion": "v1", "kind": "List", "items": rendered}
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(items))
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(model()))
    token = control_plane.kubectl(
        "create", "token", f"{release}-gateway", "-n", namespace, "--duration=10m"
    ).stdout.strip()
    (policy,) = [d["metadata"]["name"] for d in rendered if d["kind"] == "ValidatingAdmissionPolicy"]
    kubeconfig = token_kubeconfig(control_plane, token, tmp_path / "gateway.kubeconfig")
    setup = Setup(policy, namespace, kubeconfig, f"{release}-gateway")
    probes = itertools.count()  # a new value each time: an unchanged one changes nothing, and passes
    wait_until(
        lambda: (
            patch(
                control_plane, setup, {"metadata": {"annotations": {"probe": str(next(probes))}}}
            ).returncode
        ),
        30,
        "the gateway's activity-only policy enforced",
    )
    yield setup
    control_plane.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false", input=json.dumps(items))


def patch(control_plane: Any, setup: Setup, body: dict[str, Any], kubeconfig: Path | None = None) -> Any:
    return control_plane.kubectl(
        "patch", "infm", MODEL, "-n", setup.namespace, "--type=merge", "-p", json.dumps(body),
        kubeconfig=kubeconfig or setup.kubeconfig, check=False,
    )  # fmt: skip


def read(control_plane: Any, setup: Setup) -> dict[str, Any]:
    return json.loads(control_plane.kubectl("get", "infm", MODEL, "-n", setup.namespace, "-o", "json").stdout)


def test_the_gateway_records_activity_and_wakes_models(control_plane, setup) -> None:
    # What the gateway itself sends (gateway/activity.py), under its own token.
    gateway = control_plane.api_client(setup.kubeconfig)
    recorder = ActivityRecorder(gateway, flush_s=3600)
    for _ in range(3):
        recorder.record(setup.namespace, MODEL)
    recorder.flush()
    annotations = read(control_plane, setup)["metadata"]["annotations"]
    assert annotations[api.ANNOTATION_REQUESTS] == "3" and api.ANNOTATION_LAST_REQUEST in annotations
    assert annotations["note"] == "x"

    control_plane.kubectl("scale", "infm", MODEL, "-n", setup.namespace, "--replicas=0")
    scale_from_zero(gateway, setup.namespace, MODEL)
    custom = client.CustomObjectsApi(control_plane.api_client())
    scale = custom.get_namespaced_custom_object_scale(
        api.GROUP, api.VERSION, setup.namespace, api.PLURAL, MODEL
    )
    assert scale["spec"]["replicas"] == 1


@pytest.mark.parametrize(
    ("body", "part"),
    [
        ({"spec": {"runtime": {"image": "attacker.example/runtime:1"}}}, "spec"),
        ({"spec": {"replicas": 7}}, "spec"),
        ({"metadata": {"labels": {"team": "b"}}}, "labels"),
        ({"metadata": {"finalizers": ["example.com/hold"]}}, "finalizers"),
        (OWNER_REFERENCE_CHANGE, "ownerReferences"),
        ({"metadata": {"annotations": {"note": "y"}}}, "annotation note"),
        ({"metadata": {"annotations": {"note": None}}}, "annotation note"),
        ({"metadata": {"annotations": {"vnpu.io/other": "1"}}}, "annotation vnpu.io/other"),
    ],
    ids=[
        "runtime-image",
        "replicas",
        "label",
        "finalizer",
        "owner-reference",
        "other-annotation",
        "remove-other-annotation",
        "another-vnpu-annotation",
    ],
)
def test_the_gateway_may_change_nothing_else_on_a_model(control_plane, setup, body, part) -> None:
    # RBAC alone would let it: the refusal below is the policy's.
    can_i = control_plane.kubectl(
        "auth",
        "can-i",
        "patch",
        "inferencemodels.vnpu.io",
        "-n",
        setup.namespace,
        kubeconfig=setup.kubeconfig,
    )
    assert can_i.stdout.strip() == "yes"
    if part == "ownerReferences":
        allow_deleting_models(control_plane, setup)
    before = read(control_plane, setup)
    # Along with its own annotations, as a compromised gateway would send it.
    body = {**body, "metadata": {**body.get("metadata", {}), "annotations": {
        **body.get("metadata", {}).get("annotations", {}), api.ANNOTATION_REQUESTS: "9"}}}  # fmt: skip
    out = patch(control_plane, setup, body)
    assert out.returncode != 0
    assert f"ValidatingAdmissionPolicy '{setup.policy}'" in out.stderr, out.stderr
    assert (
        f"may change only the {WRITTEN} annotations of InferenceModel {setup.model}, not its {part}"
    ) in out.stderr, out.stderr
    after = read(control_plane, setup)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    # The policy binds the gateway's identity only: the admin passes.
    assert patch(control_plane, setup, body, kubeconfig=control_plane.kubeconfig).returncode == 0


def allow_deleting_models(control_plane: Any, setup: Setup) -> None:
    """The API server here runs OwnerReferencesPermissionEnforcement (as OpenShift does), which refuses
    an ownerReferences change from an identity that may not delete the object, as the gateway may not:
    it is refused before the policy is asked. Without the plugin (upstream's default) the policy is the
    guard, so the test grants the gateway ``delete`` on models to reach it."""
    assert patch(control_plane, setup, OWNER_REFERENCE_CHANGE).returncode != 0  # the plugin's refusal
    name = f"{setup.service_account}-may-delete-models"
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": setup.namespace},
        "rules": [{"apiGroups": [api.GROUP], "resources": [api.PLURAL], "verbs": ["delete"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": setup.namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": setup.service_account, "namespace": setup.namespace}],
    }
    items = {"apiVersion": "v1", "kind": "List", "items": [role, binding]}
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(items))
    wait_until(
        lambda: control_plane.kubectl(
            "auth", "can-i", "delete", f"{api.PLURAL}.{api.GROUP}", "-n", setup.namespace,
            kubeconfig=setup.kubeconfig, check=False,
        ).stdout.strip() == "yes",
        30,
        "the gateway may delete models",
    )  # fmt: skip


@pytest.mark.parametrize(("start", "to"), [(1, 5), (1, 0), (0, 2)])
def test_the_gateway_may_scale_a_model_only_from_zero_to_one(control_plane, setup, start, to) -> None:
    control_plane.kubectl("scale", "infm", MODEL, "-n", setup.namespace, f"--replicas={start}")
    out = control_plane.kubectl(
        "scale",
        "infm",
        MODEL,
        "-n",
        setup.namespace,
        f"--replicas={to}",
        kubeconfig=setup.kubeconfig,
        check=False,
    )
    assert out.returncode != 0
    assert f"ValidatingAdmissionPolicy '{setup.policy}'" in out.stderr, out.stderr
    assert (
        f"may only wake InferenceModel {setup.model} (0 replicas to 1), not scale it from {start} to {to}"
        in (out.stderr)
    )
    assert read(control_plane, setup)["spec"]["replicas"] == start


def test_the_policy_allows_the_annotations_the_gateway_writes() -> None:
    """The keys the chart lets through are the ones the gateway writes (vnpu.api)."""
    template = (CHART / "templates" / "gateway-model-policy.yaml").read_text()
    assert f'list "{api.ANNOTATION_REQUESTS}" "{api.ANNOTATION_LAST_REQUEST}"' in template


def test_the_policy_is_on_by_default_and_binds_the_gateway_only(kube_bin_dir) -> None:
    policies = {
        d["metadata"]["name"]: d for d in render(kube_bin_dir) if d["kind"] == "ValidatingAdmissionPolicy"
    }
    (condition,) = policies["vnpu-gateway-activity-only"]["spec"]["matchConditions"]
    assert (
        condition["expression"]
        == "request.userInfo.username == 'system:serviceaccount:vnpu-system:vnpu-gateway'"
    )
    off = render(kube_bin_dir, "--set", "gateway.modelRestriction.enabled=false")
    assert "gateway-activity-only" not in json.dumps(off)
    assert "gateway-activity-only" not in json.dumps(render(kube_bin_dir, "--set", "gateway.enabled=false"))
