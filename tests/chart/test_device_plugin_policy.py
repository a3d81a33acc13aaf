"""The device plugin may patch only its own Node, and there only the vnpu.io/devices annotation: the
chart's RBAC and ValidatingAdmissionPolicy against the real API server, with service-account tokens
the API server itself issues (``kubectl create token``).

The plugin's ClusterRole grants ``nodes get, patch`` (RBAC cannot say "your own node"); the policy
narrows it on the node name bound into the token: a token bound to a pod carries the node the pod is
bound to (what the kubelet mounts into the plugin's pod), and Kubernetes 1.33+ also issues tokens
bound to a Node. A token bound to nothing names no node and is refused. The policy is rendered for a
release of this test's own (its names and service account), so nothing else in the session is
affected; tests/e2e/test_upgrade.py checks the same with the token the real kubelet gave the plugin.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_chart import show_only

from vnpu import api
from vnpu.cluster.processes import wait_until

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Setup:
    policy: str
    namespace: str
    service_account: str
    own: str  # the node the plugin's pod is bound to
    other: str


def token_kubeconfig(control_plane: Any, token: str, path: Path) -> Path:
    """The admin kubeconfig's cluster, authenticating with ``token`` only."""
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["users"] = [{"name": "token", "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = "token"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def node(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"team": "a"}, "annotations": {"note": "x"}},
    }


@pytest.fixture
def setup(control_plane: Any, kube_bin_dir: Path, namespace: str) -> Iterator[Setup]:
    """The chart's device-plugin ServiceAccount, ClusterRole(Binding) and own-node policy for release
    ``vnpu-<random>`` in ``namespace``; two Nodes (objects only, no kubelet) and the plugin's pod
    bound to the first."""
    release = f"vnpu-{uuid.uuid4().hex[:6]}"
    rendered = [
        d
        for d in show_only(
            kube_bin_dir,
            release,
            namespace,
            "templates/device-plugin.yaml",
            "templates/device-plugin-node-policy.yaml",
        )
        if d["kind"] != "DaemonSet"  # nothing runs here: only the identity and what binds it
    ]
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    own, other = f"{release}-own", f"{release}-other"
    service_account = f"{release}-device-plugin"
    plugin_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "device-plugin", "namespace": namespace},
        "spec": {
            "nodeName": own,
            "serviceAccountName": service_account,
            "containers": [{"name": "device-plugin", "image": "local.test/pause:1"}],
        },
    }
    items = [*rendered, node(own), node(other)]
    control_plane.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )
    control_plane.kubectl("create", "-f", "-", input=json.dumps(plugin_pod))
    (policy,) = [d["metadata"]["name"] for d in rendered if d["kind"] == "ValidatingAdmissionPolicy"]
    yield Setup(policy, namespace, service_account, own, other)
    control_plane.kubectl(
        "delete", "-f", "-", "--ignore-not-found", "--wait=false", check=False,
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
    )  # fmt: skip


def plugin_kubeconfig(control_plane: Any, setup: Setup, tmp_path: Path, *binding: str) -> Path:
    """A kubeconfig with a token of the plugin's service account, bound as ``binding`` says
    (``kubectl create token`` flags; none: a token bound to nothing)."""
    token = control_plane.kubectl(
        "create", "token", setup.service_account, "-n", setup.namespace, "--duration=10m", *binding
    ).stdout.strip()
    return token_kubeconfig(control_plane, token, tmp_path / f"token-{uuid.uuid4().hex[:6]}.kubeconfig")


def annotate(
    control_plane: Any, kubeconfig: Path, node_name: str, *change: str
) -> subprocess.CompletedProcess[str]:
    return control_plane.kubectl(
        "annotate", "node", node_name, "--overwrite", *change, kubeconfig=kubeconfig, check=False
    )


def inventory(n: int) -> str:
    return f'{api.ANNOTATION_DEVICES}={{"devices": [], "probe": {n}}}'


def wait_enforced(control_plane: Any, kubeconfig: Path, setup: Setup) -> None:
    """The admission plugin loads policies asynchronously: until then RBAC alone decides."""
    wait_until(
        lambda: annotate(control_plane, kubeconfig, setup.other, inventory(0)).returncode != 0,
        30,
        "the device plugin's own-node policy enforced",
    )


BINDINGS = {
    # What the kubelet mounts into the plugin's pod: a token bound to the pod, which names its node.
    "pod-bound": ("--bound-object-kind", "Pod", "--bound-object-name", "device-plugin"),
    # Bound to the Node itself (ServiceAccountTokenNodeBinding, GA in 1.33): the same node name.
    "node-bound": ("--bound-object-kind", "Node", "--bound-object-name", "{own}"),
}


@pytest.mark.parametrize("binding", BINDINGS.values(), ids=BINDINGS.keys())
def test_the_plugin_may_patch_its_own_node_and_no_other(control_plane, setup, tmp_path, binding) -> None:
    kubeconfig = plugin_kubeconfig(
        control_plane, setup, tmp_path, *(b.format(own=setup.own) for b in binding)
    )
    who = control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout
    assert json.loads(who)["status"]["userInfo"]["extra"]["authentication.kubernetes.io/node-name"] == [
        setup.own
    ]
    # RBAC alone would let it patch any node: the refusal below is the policy's.
    can_i = control_plane.kubectl("auth", "can-i", "patch", f"nodes/{setup.other}", kubeconfig=kubeconfig)
    assert can_i.stdout.strip() == "yes"
    wait_enforced(control_plane, kubeconfig, setup)

    refused = annotate(control_plane, kubeconfig, setup.other, inventory(1))
    assert refused.returncode != 0
    assert f"ValidatingAdmissionPolicy '{setup.policy}'" in refused.stderr, refused.stderr
    assert f"the vnpu device plugin on node {setup.own} may not change node {setup.other}" in refused.stderr
    mine = annotate(control_plane, kubeconfig, setup.own, inventory(2))
    assert mine.returncode == 0, mine.stderr
    # What the plugin itself sends (device_plugin/annotator.py): a merge patch of the annotation.
    patch = {"metadata": {"annotations": {api.ANNOTATION_DEVICES: '{"devices": []}'}}}
    patched = control_plane.kubectl(
        "patch", "node", setup.own, "-p", json.dumps(patch), kubeconfig=kubeconfig, check=False
    )
    assert patched.returncode == 0, patched.stderr
    # The policy binds the plugin's identity only: the admin (and the kubelet, the scheduler...) pass.
    assert annotate(control_plane, control_plane.kubeconfig, setup.other, inventory(3)).returncode == 0


@pytest.mark.parametrize(
    "change",
    [
        ("label", "team=b"),
        ("annotate", "note=y"),
        ("annotate", "note-"),
        ("taint", "vnpu.io/npu=x:NoSchedule"),
        ("annotate", f"{api.ANNOTATION_DEVICES}-", "unrelated=added"),
    ],
    ids=["label", "other-annotation", "remove-other-annotation", "taint", "add-another-annotation"],
)
def test_on_its_own_node_it_may_change_only_the_inventory_annotation(
    control_plane, setup, tmp_path, change
) -> None:
    kubeconfig = plugin_kubeconfig(control_plane, setup, tmp_path, *BINDINGS["pod-bound"])
    wait_enforced(control_plane, kubeconfig, setup)
    verb, *args = change
    extra = ["--overwrite"] if verb in ("label", "annotate") else []
    out = control_plane.kubectl(verb, "node", setup.own, *extra, *args, kubeconfig=kubeconfig, check=False)
    assert out.returncode != 0
    assert f"ValidatingAdmissionPolicy '{setup.policy}'" in out.stderr, out.stderr
    assert (
        f"the vnpu device plugin may change only the {api.ANNOTATION_DEVICES} annotation of its node "
        f"{setup.own}"
    ) in out.stderr


def test_a_token_bound_to_no_node_is_refused_everywhere(control_plane, setup, tmp_path) -> None:
    bound = plugin_kubeconfig(control_plane, setup, tmp_path, *BINDINGS["pod-bound"])
    wait_enforced(control_plane, bound, setup)
    unbound = plugin_kubeconfig(control_plane, setup, tmp_path)
    for name in (setup.own, setup.other):
        out = annotate(control_plane, unbound, name, inventory(4))
        assert out.returncode != 0
        assert f"ValidatingAdmissionPolicy '{setup.policy}'" in out.stderr
        assert "its credential names no node" in out.stderr, out.stderr
