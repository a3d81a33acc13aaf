"""kopf handlers: start the level-based reconciler and hold InferenceModels' finalizer.

Placement is global (every model competes for the same devices), so handlers do not place anything
themselves. The reconcile loop (:mod:`vnpu.operator.reconciler`) is woken by its own watch-fed caches
(nodes, pods, models); kopf keeps the finalizer, so a deleted model's object stays until its pods are
gone and a re-created model of the same name never races the old pods. Every restart is safe: nothing
lives only in the operator's memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kopf

from vnpu import api
from vnpu.backoff import backoff_seconds
from vnpu.operator.config import OperatorConfig
from vnpu.operator.reconciler import Reconciler, Unhealthy

log = logging.getLogger(__name__)


SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

#: How long the delete handler waits in memory for a deleted model's pods to go before it hands the wait
#: to kopf's retry: this long first, doubling with each retry, at most that long. Each retry of kopf's is
#: an ERROR line and two writes to the model (its progress annotations, then a touch).
POD_WAIT_FIRST_S, POD_WAIT_MOST_S = 60.0, 600.0
#: How often it looks meanwhile: at the informers' cache, no API call.
POD_POLL_S = 1.0


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


def register(
    registry: kopf.OperatorRegistry, config: OperatorConfig, is_leader: Callable[[], bool] = lambda: True
) -> None:
    """Register every handler on ``registry`` (no import-time side effects on kopf's default registry)."""

    def reconciler(memo: kopf.Memo) -> Reconciler:
        return memo["reconciler"]  # type: ignore[no-any-return]

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In a pod: the service account; elsewhere: $KUBECONFIG / ~/.kube/config (client certs included).
        return in_cluster_login() or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def start(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf retries a failed start: whatever an earlier attempt left running goes first.
        if "reconciler" in memo:
            await memo.pop("reconciler").stop()
        rec = Reconciler(config, is_leader=is_leader)
        memo["reconciler"] = rec
        await rec.start()

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        if "reconciler" in memo:
            await reconciler(memo).stop()

    @kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    async def model_deleted(memo: kopf.Memo, namespace: str, name: str, retry: int, **_: Any) -> None:
        # The finalizer holds the object until its pods are gone, so a re-created model of the same
        # name never races the old pods. The informer already woke the reconciler, which deletes them.
        # The wait is here, on the watch-fed cache, not in kopf's retries: a retry a second was 2
        # writes to the model and an ERROR line a second for as long as a pod stayed Terminating (a
        # finalizer of its owner's, a lost node). A shutdown cancels the wait; the next operator resumes it.
        reconciler(memo).trigger(f"InferenceModel {namespace}/{name} deleted")
        loop = asyncio.get_running_loop()
        wait = backoff_seconds(retry + 1, POD_WAIT_FIRST_S, POD_WAIT_MOST_S)
        deadline = loop.time() + wait
        while reconciler(memo).has_pods(namespace, name):  # memo's: a retried start replaces it
            if loop.time() >= deadline:
                raise kopf.TemporaryError(
                    f"its pods are still there after {wait:.0f}s (one held by a finalizer, or on a lost "
                    f"node?): kubectl get pods -n {namespace} -l {api.LABEL_MODEL}={name}",
                    delay=1,
                )
            await asyncio.sleep(POD_POLL_S)

    @kopf.on.probe(id="reconciler", registry=registry)
    async def probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
        if "reconciler" not in memo:
            return {"started": False}
        try:
            return reconciler(memo).health()
        except Unhealthy as exc:
            # Permanent: kopf answers the probe with an error now (a temporary error would retry the
            # handler for a minute while the probe times out).
            raise kopf.PermanentError(str(exc)) from exc
