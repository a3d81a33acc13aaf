"""The operator's status writes against the real API server and the repo's CRD: what the server ends up
holding, and how many writes it took.

The reconciler runs in process here, its passes driven one by one from what the API server holds (as
its informers would see it), and its background reporter drained after each pass: so a test can count
the status patches and Events a pass sends. No scheduler: the pods it creates stay Pending, which is
all a status needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from vnpu import api
from vnpu.cluster.kwok import npu_node_manifest
from vnpu.cluster.processes import wait_until
from vnpu.memory import EstimateError
from vnpu.operator import metrics
from vnpu.operator.config import OperatorConfig
from vnpu.operator.kube import Kube
from vnpu.operator.reconciler import Reconciler
from vnpu.operator.state import parse_model, parse_node, parse_pod, parse_service


@pytest.fixture(autouse=True)
def no_model_series_left() -> Iterator[None]:
    """The passes here set per-model series in the process-wide registry: gone with the test."""
    yield
    metrics.forget_models(set())


class CountingKube(Kube):
    """The real client, counting the status patches it sends."""

    status_patches = 0

    def patch_model_status(self, model: Any, status: Any) -> None:
        self.status_patches += 1
        super().patch_model_status(model, status)


class Operator:
    """A Reconciler on the real API server, one pass at a time."""

    def __init__(self, cp: Any, namespace: str, **config: Any) -> None:
        self.cp, self.namespace = cp, namespace
        self.kube = CountingKube(cp.api_client(), (namespace,))
        self.rec = Reconciler(OperatorConfig(namespaces=(namespace,), **config), kube=self.kube)
        manifest = npu_node_manifest("n1", devices=2, device_mib=16 * 1024)
        manifest["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        self.nodes = [parse_node(manifest)]

    def model(self, name: str) -> dict[str, Any]:
        crd = self.kube.custom
        return crd.get_namespaced_custom_object(api.GROUP, api.VERSION, self.namespace, api.PLURAL, name)  # type: ignore[no-any-return]

    def apply(self, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec,
        }
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(body))

    def run(self, name: str) -> None:
        """One pass over the model as the server holds it, then its reports written."""
        sanitize = client.ApiClient().sanitize_for_serialization
        core = self.kube.core
        pods = [parse_pod(sanitize(p)) for p in core.list_namespaced_pod(self.namespace).items]
        services = [parse_service(sanitize(s)) for s in core.list_namespaced_service(self.namespace).items]
        self.rec.reconcile([parse_model(self.model(name))], self.nodes, pods, services)
        reports = self.rec._reports
        while reports.backlog:
            taken = reports.take()
            assert taken is not None
            self.rec._write_report(taken[1])
            reports.done(taken[0])

    def events(self, name: str) -> list[Any]:
        listed = self.kube.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return list(listed.items)


def spec(replicas: int, **extra: Any) -> dict[str, Any]:
    return {
        "modelName": "m",
        "source": {"uri": "file:///models/m.gguf"},
        "weights": {"sizeMiB": 4096},
        "replicas": replicas,
        "memory": {"kvCacheMiB": 1024},
        **extra,
    }


def test_keys_the_operator_stops_setting_leave_the_server_and_a_settled_model_gets_no_write(
    control_plane: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``scaling.warm`` (set at zero replicas only) goes once the model wakes; ``memory`` goes while its
    estimate fails (``scaling`` and ``demand``, the idle clock and the request history, stay as
    written). A JSON merge patch that does not name a key keeps it, so before the fix the server kept
    them, and the operator patched the model on every pass."""
    op = Operator(control_plane, namespace, placeholders=False)
    scaling = {"minReplicas": 0, "idleSeconds": 300, "keepWarm": "Never"}
    op.apply("a", spec(0, scaling=scaling))
    for _ in range(3):
        op.run("a")
    assert op.model("a")["status"]["scaling"]["warm"] is False  # at zero: no holder kept

    op.apply("a", spec(1, scaling=scaling))  # woken
    for _ in range(4):  # the key Secret, then the pods, then their status
        op.run("a")
    assert "warm" not in op.model("a")["status"]["scaling"]
    settled = op.kube.status_patches
    for _ in range(3):
        op.run("a")
    assert op.kube.status_patches == settled, "a status write on every pass"

    failing = EstimateError("source unreadable")
    kept = {k: op.model("a")["status"][k] for k in ("scaling", "demand")}
    monkeypatch.setattr(op.rec._estimates, "lookup", lambda models: {m.key: failing for m in models})
    op.run("a")
    status = op.model("a")["status"]
    assert status["phase"] == "Degraded"  # its running replica kept
    assert "memory" not in status and {k: status[k] for k in ("scaling", "demand")} == kept, status
    settled = op.kube.status_patches
    for _ in range(3):
        op.run("a")
    assert op.kube.status_patches == settled, "a status write on every pass"


@pytest.fixture
def refused_statuses(control_plane: Any, namespace: str) -> Iterator[None]:
    """A ValidatingAdmissionPolicy that refuses every InferenceModel status write in ``namespace``: a
    status the API server will not take, whatever the reason (a message past the CRD's limit was one)."""
    name = f"refuse-status-{namespace}"
    objects = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [api.GROUP],
                            "apiVersions": ["*"],
                            "operations": ["UPDATE"],
                            "resources": [f"{api.PLURAL}/status"],
                        }
                    ]
                },
                "validations": [{"expression": "false", "message": "status writes refused by the test"}],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
                },
            },
        },
    ]
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    yield
    control_plane.kubectl("delete", "-f", "-", "--ignore-not-found", input=manifest, check=False)


def test_a_status_the_server_refuses_posts_no_event_per_pass(
    control_plane: Any, namespace: str, refused_statuses: None
) -> None:
    """Each pass sees the model's flip to CapacityPending against the status the server holds, which
    the refused write never changed: before the fix it posted a new Warning Event on every pass. (No
    backoff here, so every pass retries the refused status: tests/operator/test_status_refused.py.)"""
    op = Operator(control_plane, namespace, placeholders=False, backoff_seconds=0)
    op.apply("a", spec(1, placement={"nodeSelector": {"zone": "none"}}))  # never placed
    probe = parse_model(op.model("a"))

    def refused() -> bool:  # the policy is in force (the API server loads it within a second or so)
        try:
            op.kube.patch_model_status(probe, {"phase": "Pending"})
        except client.ApiException as exc:
            return exc.status == 422 or exc.status == 403
        return False

    wait_until(refused, 30, "the admission policy refusing status writes")
    before = op.kube.status_patches
    for _ in range(4):
        op.run("a")
    assert op.kube.status_patches - before == 4  # a write on every pass, each refused
    # Every pass's write refused (the probe's may have gone through before the policy was in force).
    assert "conditions" not in op.model("a").get("status", {})
    reasons = [e.reason for e in op.events("a")]
    assert reasons.count("CapacityPending") == 1, reasons
    (pending,) = [e for e in op.events("a") if e.reason == "CapacityPending"]
    assert pending.count == 4  # seen on every pass: counted on the one Event, as client-go counts
