"""The reconcile loop: one pass reads the cluster, plans, and converges.

Triggers (kopf handlers, a periodic resync) only set an event; bursts coalesce into one pass after a
short debounce. A pass is idempotent: pod names are deterministic and every decision is re-derived
from the API server, so killing the operator at any point and starting it again converges to the same
pods, never duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vnpu import api, sharing
from vnpu.operator import metrics
from vnpu.operator.config import PLACEHOLDER_PRIORITY_CLASS, OperatorConfig
from vnpu.operator.estimate_cache import EstimateCache
from vnpu.operator.kube import Kube
from vnpu.operator.planner import Plan, PodDeletion, SecretIntent, plan
from vnpu.operator.pods import share_key_secret

log = logging.getLogger(__name__)
#: Parallel API calls when applying a plan (the kubernetes client pool allows 4 per host by default).
API_CONCURRENCY = 4


class Reconciler:
    def __init__(self, config: OperatorConfig, kube: Kube | None = None) -> None:
        self.config = config
        self._kube = kube
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._passes = 0
        self._last_ok: float | None = None
        self._last_error = ""
        self._estimates = EstimateCache()
        self._lock = asyncio.Lock()

    @property
    def kube(self) -> Kube:
        if self._kube is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._kube = Kube(client.ApiClient(), self.config.namespaces)
        return self._kube

    async def start(self) -> None:
        kube = self.kube
        if self.config.placeholders and await asyncio.to_thread(kube.placeholder_priority_class_missing):
            log.error(
                "PriorityClass %s is missing: no placeholder pod can be created until it exists (the Helm "
                "chart ships it, placeholderPriorityClass.create=true), or run with --no-placeholders",
                PLACEHOLDER_PRIORITY_CLASS,
            )
        self._task = asyncio.create_task(self._loop(), name="vnpu-reconciler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def trigger(self, why: str) -> None:
        log.debug("reconcile requested: %s", why)
        self._wake.set()

    async def reconcile_now(self, why: str) -> Plan:
        """Run a pass right away (used by handlers that must see its effect, e.g. the finalizer)."""
        log.debug("reconcile now: %s", why)
        return await self._pass()

    async def has_pods(self, namespace: str, model: str) -> bool:
        pods = await asyncio.to_thread(self.kube.list_pods)
        return any(p.namespace == namespace and p.model == model for p in pods)

    def health(self) -> dict[str, Any]:
        return {
            "passes": self._passes,
            "last_ok_age_s": None if self._last_ok is None else round(time.monotonic() - self._last_ok, 1),
            "last_error": self._last_error,
        }

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.resync_seconds)
            await asyncio.sleep(self.config.debounce_seconds)  # coalesce a burst of events
            self._wake.clear()
            try:
                await self._pass()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the loop alive; the next trigger or resync retries
                metrics.RECONCILE_ERRORS.inc()
                self._last_error = repr(exc)
                log.exception("reconcile pass failed; retrying in 1s")
                await asyncio.sleep(1)
                self._wake.set()

    async def _pass(self) -> Plan:
        async with self._lock:  # one pass at a time: a pass acts on a consistent snapshot
            started = time.perf_counter()
            result = await asyncio.to_thread(self._pass_sync)
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
            self._passes += 1
            self._last_ok = time.monotonic()
            self._last_error = ""
            return result

    def _pass_sync(self) -> Plan:
        kube = self.kube
        models, nodes, pods = kube.list_models(), kube.list_nodes(), kube.list_pods()
        secrets = kube.list_secrets()
        estimates = {m.key: self._estimates.get(m) for m in models}
        result = plan(models, nodes, pods, estimates, self.config, secrets=secrets)
        self._apply(result)
        if result.create_secrets:  # the groups' pods are planned once their Secrets exist: go on now
            self._wake.set()
        return result

    def _apply(self, result: Plan) -> None:
        kube = self.kube

        def delete(d: PodDeletion) -> None:
            if kube.delete_pod(d.namespace, d.name, force=d.force):
                metrics.POD_ACTIONS.labels("delete", d.role).inc()
                log.info("deleted pod %s/%s (%s)", d.namespace, d.name, d.reason)

        def create(manifest: dict[str, Any]) -> None:
            role = manifest["metadata"]["labels"].get(api.LABEL_ROLE, "")
            if kube.create_pod(manifest):
                metrics.POD_ACTIONS.labels("create", role).inc()
                meta = manifest["metadata"]
                log.info("created %s pod %s/%s", role, meta["namespace"], meta["name"])

        def create_secret(intent: SecretIntent) -> None:
            # The key is drawn here, not in the (pure) plan; an existing Secret keeps its key.
            secret = share_key_secret(intent.namespace, intent.share_group, intent.owners, sharing.new_key())
            if kube.create_secret(secret):
                log.info("created the key Secret of share group %s/%s", intent.namespace, intent.share_group)

        def is_holder(manifest: dict[str, Any]) -> bool:
            return bool(manifest["metadata"]["labels"].get(api.LABEL_ROLE) == api.ROLE_WEIGHTS)

        holders = [m for m in result.create if is_holder(m)]
        others = [m for m in result.create if not is_holder(m)]
        for update in result.set_owners:  # before deletions: a holder must never be left to one owner
            if update.kind == "Secret":
                kube.set_secret_owners(update.namespace, update.name, update.owner_references)
            else:
                kube.set_pod_owners(update.namespace, update.name, update.owner_references)
            log.info(
                "%s %s/%s now owned by %s",
                update.kind,
                update.namespace,
                update.name,
                ", ".join(r["name"] for r in update.owner_references),
            )
        # Key Secrets first (a group's pods are planned only once its Secret exists), then deletions (a
        # moving replica frees its old slot), then weight-holders before the replicas that map them.
        # Each phase fans out over a few connections: hundreds of models applied at once mean
        # thousands of pods. The device each pod gets is in its own resource request, so pods of any
        # groups may be created together.
        phases: list[tuple[Any, list[Any]]] = [
            (create_secret, list(result.create_secrets)),
            (delete, list(result.delete)),
            (create, holders),
            (create, others),
        ]
        with ThreadPoolExecutor(max_workers=API_CONCURRENCY) as pool:
            for action, items in phases:
                for future in [pool.submit(action, item) for item in items]:
                    future.result()
        for gone in result.delete_secrets:
            if kube.delete_secret(gone.namespace, gone.name):
                log.info("deleted the key Secret of share group %s/%s", gone.namespace, gone.share_group)
        for update in result.statuses:
            if update.changed:
                kube.patch_model_status(update.model, update.status)
            for event in update.events:
                kube.post_event(update.model, event.type, event.reason, event.message)
        metrics.UNPLACED_SLICES.set(result.unplaced_slices)
        for update in result.statuses:
            labels = (update.model.namespace, update.model.name)
            metrics.PLACED_REPLICAS.labels(*labels).set(update.placed)
            metrics.UNPLACED_REPLICAS.labels(*labels).set(update.unplaced)
            metrics.SAVED_BY_SHARING_MIB.labels(*labels).set(update.saved_mib)
