"""The chart's ValidatingAdmissionPolicy against the real API server: only the operator's service
account may create pods that request a vnpu device resource or carry vnpu labels or annotations.

The policy is applied as the chart renders it; its binding is narrowed to this test's namespace so the
rest of the session's tests (which create vnpu pods as the admin) are untouched.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest
from test_chart import render

from vnpu import api
from vnpu.cluster.processes import wait_until

pytestmark = pytest.mark.integration

OPERATOR_SA = "vnpu-operator"  # the chart's operator ServiceAccount for release "vnpu"
RELEASE_NS = "vnpu-system"


def pod(name: str, *, resource: bool = False, annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None, init: bool = False) -> dict[str, Any]:  # fmt: skip
    container: dict[str, Any] = {"name": "init" if init else "main", "image": "local.test/pause:1"}
    if resource:
        container["resources"] = {
            "limits": {api.device_resource(0): "1"},
            "requests": {api.device_resource(0): "1"},
        }
    spec: dict[str, Any] = {"containers": [{"name": "main", "image": "local.test/pause:1"}]}
    if init:
        spec["initContainers"] = [container]
    else:
        spec["containers"] = [container]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}, "labels": labels or {}},
        "spec": spec,
    }


@pytest.fixture
def policy(control_plane, kube_bin_dir, namespace):
    """The chart's policy and binding, the binding limited to ``namespace``; identities that may create
    pods there: the chart's operator service account and a tenant's."""
    docs = render(kube_bin_dir, "--show-only", "templates/pod-admission-policy.yaml")
    kinds = {d["kind"]: d for d in docs}
    suffix = uuid.uuid4().hex[:6]
    vap, binding = kinds["ValidatingAdmissionPolicy"], kinds["ValidatingAdmissionPolicyBinding"]
    vap["metadata"]["name"] += f"-{suffix}"
    binding["metadata"]["name"] += f"-{suffix}"
    binding["spec"]["policyName"] = vap["metadata"]["name"]
    binding["spec"]["matchResources"] = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "pods", "namespace": namespace},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "patch", "get"]}],
    }
    bind = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "pods", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pods"},
        "subjects": [
            {"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": RELEASE_NS},
            {"kind": "ServiceAccount", "name": "tenant", "namespace": namespace},
        ],
    }
    items = [vap, binding, role, bind]
    control_plane.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )

    def enforced() -> bool:  # the admission plugin loads policies asynchronously
        probe = pod(f"probe-{uuid.uuid4().hex[:6]}", resource=True)
        return create(control_plane, namespace, "tenant", probe).returncode != 0

    wait_until(enforced, 30, "the policy enforced")
    yield vap["metadata"]["name"]
    control_plane.kubectl(
        "delete", "validatingadmissionpolicybinding", binding["metadata"]["name"], check=False
    )
    control_plane.kubectl("delete", "validatingadmissionpolicy", vap["metadata"]["name"], check=False)


def as_sa(namespace: str, name: str) -> list[str]:
    return [f"--as=system:serviceaccount:{namespace}:{name}", "--as-group=system:serviceaccounts"]


def create(
    control_plane, namespace: str, who: str, manifest: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    identity = as_sa(RELEASE_NS, OPERATOR_SA) if who == "operator" else as_sa(namespace, who)
    return control_plane.kubectl(
        "create", "-n", namespace, "-f", "-", *identity, input=json.dumps(manifest), check=False
    )


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (pod("wants-a-device", resource=True), "requests a vnpu.io device resource"),
        (pod("init-wants-a-device", resource=True, init=True), "requests a vnpu.io device resource"),
        (
            pod("copied-group", annotations={api.ANNOTATION_SHARE_GROUP: "victims"}),
            "vnpu.io/share-group=victims",
        ),
        (
            pod("poses-as-replica", labels={api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE}),
            "managed-by=vnpu-operator",
        ),
        (pod("poses-as-holder", labels={api.LABEL_ROLE: "weights"}), "label vnpu.io/role=weights"),
    ],
)
def test_another_identity_is_refused_with_a_message_naming_the_policy(
    control_plane, namespace, policy, manifest, message
) -> None:
    out = create(control_plane, namespace, "tenant", manifest)
    assert out.returncode != 0
    assert f"ValidatingAdmissionPolicy '{policy}'" in out.stderr and message in out.stderr, out.stderr
    assert "only the vnpu operator (system:serviceaccount:vnpu-system:vnpu-operator)" in out.stderr


def test_the_operator_may_and_plain_pods_pass(control_plane, namespace, policy) -> None:
    marked = pod("replica", resource=True, annotations={api.ANNOTATION_DEVICE: "npu0"},
                 labels={api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE})  # fmt: skip
    assert create(control_plane, namespace, "operator", marked).returncode == 0
    assert create(control_plane, namespace, "tenant", pod("plain", labels={"app": "x"})).returncode == 0


def test_nobody_else_may_add_or_change_vnpu_marks_on_an_existing_pod(
    control_plane, namespace, policy
) -> None:
    assert create(control_plane, namespace, "tenant", pod("mine")).returncode == 0
    assert (
        create(
            control_plane, namespace, "operator", pod("theirs", annotations={api.ANNOTATION_DEVICE: "npu0"})
        ).returncode
        == 0
    )

    def annotate(name: str, value: str, who: str) -> subprocess.CompletedProcess[str]:
        identity = as_sa(RELEASE_NS, OPERATOR_SA) if who == "operator" else as_sa(namespace, who)
        return control_plane.kubectl(
            "annotate", "pod", name, "-n", namespace, "--overwrite", value, *identity, check=False
        )

    refused = annotate("mine", f"{api.ANNOTATION_SHARE_GROUP}=victims", "tenant")
    assert refused.returncode != 0 and "vnpu.io/share-group=victims" in refused.stderr
    assert annotate("theirs", f"{api.ANNOTATION_DEVICE}=npu1", "tenant").returncode != 0
    assert annotate("theirs", f"{api.ANNOTATION_DEVICE}-", "tenant").returncode != 0  # removal too
    assert annotate("theirs", "team=x", "tenant").returncode == 0  # other annotations are the owner's
    assert annotate("theirs", f"{api.ANNOTATION_DEVICE}=npu1", "operator").returncode == 0
