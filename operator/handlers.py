"""kopf handlers: thin triggers for the level-based reconciler.

Placement is global (every model competes for the same devices), so handlers do not place anything
themselves: they wake the single reconcile loop (:mod:`vnpu.operator.reconciler`), which reads the
whole state from the API server, packs, and converges pods and statuses. That makes every restart
safe: nothing lives only in the operator's memory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import kopf

from vnpu import api
from vnpu.operator.config import OperatorConfig
from vnpu.operator.reconciler import Reconciler

log = logging.getLogger(__name__)


def node_fingerprint(body: Any) -> tuple[Any, ...]:
    """What about a node matters to placement; kubelet heartbeats change nothing here."""
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {})
    ready = [c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    allocatable = status.get("allocatable") or {}
    return (
        (meta.get("annotations") or {}).get(api.ANNOTATION_DEVICES),
        tuple(sorted((meta.get("labels") or {}).items())),
        str(spec.get("taints")),
        bool(spec.get("unschedulable")),
        tuple(sorted((k, v) for k, v in allocatable.items() if api.is_vnpu_resource(k))),
        tuple(ready),
        meta.get("deletionTimestamp") is not None,
    )


def pod_fingerprint(body: Any) -> tuple[Any, ...]:
    status = body.get("status", {})
    ready = [c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return (
        status.get("phase"),
        tuple(ready),
        body.get("spec", {}).get("nodeName"),
        body.get("metadata", {}).get("deletionTimestamp") is not None,
    )


SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def in_cluster_login() -> kopf.ConnectionInfo | None:
    """The pod's service account, addressed like client-go's in-cluster config does
    ($KUBERNETES_SERVICE_HOST/PORT): kopf's own helper assumes kubernetes.default.svc, which needs
    cluster DNS the operator should not depend on."""
    token = SERVICE_ACCOUNT_DIR / "token"
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not token.exists() or not host:
        return None
    namespace = SERVICE_ACCOUNT_DIR / "namespace"
    return kopf.ConnectionInfo(
        server=f"https://{f'[{host}]' if ':' in host else host}:{port}",
        ca_path=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
        token=token.read_text().strip(),
        default_namespace=namespace.read_text().strip() if namespace.exists() else None,
    )


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Register every handler on ``registry`` (no import-time side effects on kopf's default registry)."""
    seen_nodes: dict[str, tuple[Any, ...]] = {}
    seen_pods: dict[str, tuple[Any, ...]] = {}

    def reconciler(memo: kopf.Memo) -> Reconciler:
        return memo["reconciler"]  # type: ignore[no-any-return]

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In a pod: the service account; elsewhere: $KUBECONFIG / ~/.kube/config (client certs included).
        return in_cluster_login() or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def start(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
        rec = Reconciler(config)
        memo["reconciler"] = rec
        await rec.start()

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        if "reconciler" in memo:
            await reconciler(memo).stop()

    @kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    @kopf.on.create(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    @kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    async def model_changed(memo: kopf.Memo, namespace: str, name: str, **_: Any) -> None:
        # Only a trigger: a burst of creates (hundreds of models applied at once) becomes one pass.
        reconciler(memo).trigger(f"InferenceModel {namespace}/{name} changed")

    @kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    async def model_deleted(memo: kopf.Memo, namespace: str, name: str, **_: Any) -> None:
        # The finalizer holds the object until its pods are gone, so a re-created model of the same
        # name never races the old pods.
        rec = reconciler(memo)
        await rec.reconcile_now(f"InferenceModel {namespace}/{name} deleted")
        if await rec.has_pods(namespace, name):
            raise kopf.TemporaryError("waiting for the model's pods to terminate", delay=1)

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_event(memo: kopf.Memo, body: Any, type: str | None, name: str, **_: Any) -> None:
        fp = node_fingerprint(body) if type != "DELETED" else None
        if type == "DELETED":
            seen_nodes.pop(name, None)
        elif seen_nodes.get(name) == fp:
            return
        else:
            seen_nodes[name] = fp  # type: ignore[assignment]
        reconciler(memo).trigger(f"node {name} {type or 'listed'}")

    @kopf.on.event("", "v1", "pods", labels={api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE}, registry=registry)
    async def pod_event(
        memo: kopf.Memo, body: Any, type: str | None, namespace: str, name: str, **_: Any
    ) -> None:
        key = f"{namespace}/{name}"
        if type == "DELETED":
            seen_pods.pop(key, None)
        else:
            fp = pod_fingerprint(body)
            if seen_pods.get(key) == fp:
                return
            seen_pods[key] = fp
        reconciler(memo).trigger(f"pod {key} {type or 'listed'}")

    @kopf.on.probe(id="reconciler", registry=registry)
    async def probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
        return reconciler(memo).health() if "reconciler" in memo else {"started": False}
