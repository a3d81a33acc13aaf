"""The reconcile loop: one pass plans from the watch-fed caches and applies the writes.

Triggers (informer changes, kopf's finalizer handler, a periodic resync, a grace period or backoff
running out) only set an event; bursts coalesce into one pass after a short debounce. A pass is
idempotent: pod names are deterministic and every decision is re-derived from the observed state, so
killing the operator at any point and starting it again converges to the same pods, never duplicates.

Failures are the failing model's alone. Every write belongs to the models it serves; when the API
server refuses one (a PodSecurity 403, a namespace at its ResourceQuota, a LimitRange, a webhook), the
model gets a ``Degraded`` condition with the server's message, a Warning Event, a count in
``vnpu_operator_api_errors_total`` and a backoff (1 s doubling to 5 minutes) during which the planner
leaves its objects alone. Every other model in every namespace is written in the same pass. A refused
placeholder backs off the model's placeholders alone: it is reported the same way, but the replicas
and holders the model serves with are written as usual (a placeholder is optional, they are not). So
does a refused PodDisruptionBudget, written after the pods: it backs off the budget alone. A name the
operator creates that someone else's object holds (a pod's, a share group's key Secret's) fails the
models it is for the same way, with the reason (``PodNameTaken``, ``KeySecretNameTaken``): the other
object is left alone, and without this the name was planned, and its create refused, in every pass.
A refused status write (a webhook, a CRD rule) backs off the model's status and Events alone (the same
delays): it cannot say so in the status, so the log does, and the count in
``vnpu_operator_api_errors_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from kubernetes.client.exceptions import ApiException

from vnpu import api, sharing
from vnpu.backoff import backoff_seconds
from vnpu.kubeclient import api_client_from_env, unreachable_errors
from vnpu.operator import disruption, metrics, network_policy, scaling
from vnpu.operator.config import PLACEHOLDER_PRIORITY_CLASS, OperatorConfig
from vnpu.operator.crd import CrdRevisionCheck
from vnpu.operator.estimate_cache import EstimateCache
from vnpu.operator.kube import Kube, api_error
from vnpu.operator.planner import (
    Failure,
    LabelsUpdate,
    Plan,
    PodDeletion,
    SecretDeletion,
    SecretIntent,
    budget_failure_key,
    failure_model,
    placeholders_failure_key,
    plan,
    restatus,
)
from vnpu.operator.pods import ROLE_SHARE_KEY, PodIntent, render, share_key_secret
from vnpu.operator.reported import PostedEvents, Report, ReportedStatuses, ReportQueue
from vnpu.operator.services import SelectorUpdate, ServiceIntent, render_service
from vnpu.operator.state import (
    ObservedBudget,
    ObservedModel,
    ObservedNode,
    ObservedPod,
    ObservedSecret,
    ObservedService,
)

log = logging.getLogger(__name__)
#: Parallel API calls when applying a plan.
API_CONCURRENCY = 8
#: Threads writing Services, status patches and Events. They run behind the next pass's pod writes (see
#: :mod:`vnpu.operator.reported`), with fewer connections, so in a burst new models get pods first.
REPORT_CONCURRENCY = 3
#: A model's failure reason when one of its writes met a bug rather than a refusal (Kubernetes' own
#: word for a server-side error).
INTERNAL_ERROR = "InternalError"
#: A share group's models fail for this when their key Secret's name (computable from the group:
#: :func:`vnpu.sharing.secret_name`) is held by a Secret that is not the operator's.
KEY_SECRET_NAME_TAKEN = "KeySecretNameTaken"
#: A model fails for this when one of its pods' names is held by a pod that is not the operator's.
POD_NAME_TAKEN = "PodNameTaken"
#: Seconds to wait for the informers' first lists before the first pass.
SYNC_TIMEOUT = 120.0
#: :meth:`Reconciler.health` fails (and with it kopf's liveness probe, so the pod is restarted) once no
#: pass has gone through, and the pass in flight (if any) has got no answer from the API server, for this
#: many resync periods (at least :data:`MIN_UNHEALTHY_SECONDS`): a pass stuck on the API server, or
#: failing each time, is not fixed by waiting. A pass that is slow but getting answers is left to finish.
UNHEALTHY_AFTER_RESYNCS = 3
#: The liveness limit's floor, whatever ``resync_seconds`` is (the chart allows 1 s: a 3 s budget). One
#: try of an API call may take up to :data:`vnpu.kubeclient.REQUEST_TIMEOUT` (35 s) to be answered or to
#: fail, and an API server under load (priority-and-fairness queueing, the first pass over a big cluster)
#: answers slowly but answers; a short limit restarted such an operator, and the new one started the same
#: pass again. 120 s is more than three such tries in a row without an answer (urllib3 retries a GET that
#: timed out up to 3 times, so one GET to a server that never answers fails after about 140 s: that is
#: an API server gone, which a restart does not fix either); with the probe's period (20 s) and the
#: kubelet's three failures, a stuck operator is still restarted within about 3 minutes.
MIN_UNHEALTHY_SECONDS = 120.0
#: The same Event on the same model seen again within this many seconds of its last sighting is counted
#: on the Event posted (client-go's recorder counts repeats too): see
#: :class:`vnpu.operator.reported.PostedEvents`.
EVENT_REPEAT_SECONDS = 600.0


class Unhealthy(RuntimeError):
    """The reconcile loop has not completed a pass for too long (see :meth:`Reconciler.health`)."""


class PassProgress:
    """What the pass in flight is doing and when it last got anywhere, for :meth:`Reconciler.health`.

    Progress is an API call of the pass answered: done, or refused by the server (an answer too; a
    timeout or a broken connection is not). It counts for the pass in flight only: a pass that fails
    has got nowhere (the next one starts over), so a loop of failing passes stays unhealthy. Written
    from the pass's threads (one per call in flight), read by the probe: under a lock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.started: float | None = None  #: when the pass in flight began; None: no pass in flight
        self.doing = ""  #: its stage ("planning", "writing the plan", ...)
        self.answered = 0  #: its API calls answered so far
        self.last_answer: tuple[float, str] | None = None  #: (when, what) of its last answered call
        self.calls: dict[int, tuple[str, float]] = {}  #: its calls waiting for an answer: (what, since)

    def begin(self) -> None:
        with self._lock:
            self.started, self.doing, self.answered, self.last_answer = self._clock(), "starting", 0, None
            self.calls = {}

    def end(self) -> None:
        with self._lock:
            self.started, self.doing, self.last_answer, self.calls = None, "", None, {}

    def stage(self, doing: str) -> None:
        with self._lock:
            self.doing = doing

    @contextlib.contextmanager
    def call(self, what: str) -> Iterator[None]:
        """Around one API call of the pass: ``what`` it is waiting for until it is answered."""
        key = next(self._ids)
        with self._lock:
            self.calls[key] = (what, self._clock())
        answered = False
        try:
            yield
            answered = True
        except ApiException:
            answered = True
            raise
        finally:
            with self._lock:
                self.calls.pop(key, None)
                if answered and self.started is not None:
                    self.answered += 1
                    self.last_answer = (self._clock(), what)

    def snapshot(self) -> tuple[float | None, str, int, tuple[float, str] | None, list[tuple[str, float]]]:
        """(started, doing, answered, last_answer, calls waiting, the oldest first)."""
        with self._lock:
            waiting = sorted(self.calls.values(), key=lambda c: c[1])
            return self.started, self.doing, self.answered, self.last_answer, waiting


class Reconciler:
    def __init__(
        self,
        config: OperatorConfig,
        kube: Kube | None = None,
        is_leader: Callable[[], bool] = lambda: True,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock  #: the liveness bookkeeping's clock (monotonic seconds)
        self._progress = PassProgress(clock)
        self._kube = kube
        self._is_leader = is_leader
        self._wake = asyncio.Event()
        self._loop_ref: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._cache: Any = None
        self._passes = 0
        self._loop_started: float | None = None
        self._last_ok: float | None = None
        self._last_error = ""
        self._estimates = EstimateCache(
            config.model_cache_dir,
            config.model_file_roots,
            workers=config.estimate_workers,
            timeout_s=config.estimate_timeout_seconds,
            on_ready=self._wake_soon,  # an estimate read after its pass: plan with it now
        )
        self._lock = asyncio.Lock()
        self._failures: dict[str, Failure] = {}
        self._secrets: dict[tuple[str, str], ObservedSecret] = {}
        self._secrets_listed = 0.0
        #: Services with a model's Service name that the model does not control and the informer does
        #: not see (it watches the operator's label only): learned from AlreadyExists, looked at again
        #: on every resync. (namespace, name) -> Service
        self._taken: dict[tuple[str, str], ObservedService] = {}
        self._taken_checked = 0.0
        #: Services handed to the reporter and not yet seen by the informer (nor refused), with when:
        #: the next pass must not plan them again. (namespace, name) -> (Service, monotonic seconds)
        self._creating: dict[tuple[str, str], tuple[ObservedService, float]] = {}
        #: Writes the reporter had refused since the last pass: model -> (reason, message).
        self._late_failures: dict[str, tuple[str, str]] = {}
        #: Models whose status write the API server refused, backing off: their statuses and Events go
        #: again once ``retry_at`` has passed (``_clock`` seconds), or at once when the spec changed.
        #: uid -> (refusals in a row, retry_at, generation refused)
        self._status_refused: dict[str, tuple[int, float, int]] = {}
        #: Namespaces whose NetworkPolicy was last found or made as wanted, and when (monotonic
        #: seconds): looked at again after a resync period (a deleted or edited one comes back).
        self._policies_kept: dict[str, float] = {}
        self._shared_lock = threading.Lock()  # the four above are shared with the reporter's threads
        self._requeue_after: float | None = None
        self._series = metrics.ModelSeries()  #: the per-model series of the models that went go
        #: Services, status patches and Events go out from here (REPORT_CONCURRENCY threads) while the
        #: next pass plans and writes its pods; ``_reported`` lets that pass see the statuses as written.
        self._reports = ReportQueue()
        self._reporters: list[threading.Thread] = []
        self._reported = ReportedStatuses(stale_after=config.resync_seconds)
        self._posted = PostedEvents(window=EVENT_REPEAT_SECONDS)
        self._crd_check: CrdRevisionCheck | None = None

    @property
    def kube(self) -> Kube:
        if self._kube is None:
            self._kube = Kube(api_client_from_env(), self.config.namespaces)
        return self._kube

    async def start(self) -> None:
        from vnpu.operator.cache import ClusterCache

        self._loop_ref = asyncio.get_running_loop()
        kube = self.kube
        if self.config.placeholders and await asyncio.to_thread(kube.placeholder_priority_class_missing):
            log.error(
                "PriorityClass %s is missing: no placeholder pod can be created until it exists (the Helm "
                "chart ships it, placeholderPriorityClass.create=true), or run with --no-placeholders",
                PLACEHOLDER_PRIORITY_CLASS,
            )
        self._crd_check = CrdRevisionCheck(kube.api_client)
        await asyncio.to_thread(self._crd_check.start)
        cache = self._cache = ClusterCache(kube.api_client, self.config.namespaces, self._changed)
        cache.start()
        try:
            if not await asyncio.to_thread(cache.wait_synced, SYNC_TIMEOUT):
                late = sorted({i.name for i in cache.informers if not i.synced.is_set()})
                raise RuntimeError(
                    f"the informers of {', '.join(late)} did not list in {SYNC_TIMEOUT:g}s (the log says "
                    "why: a 403 wants the chart's RBAC)"
                )
        except BaseException:
            # kopf retries a failed start with a new Reconciler: these informers must not keep listing.
            self._crd_check.stop()
            self._cache = None
            await asyncio.shield(asyncio.to_thread(cache.stop))
            raise
        self._reporters = [
            threading.Thread(target=self._report_worker, name=f"vnpu-report-{i}", daemon=True)
            for i in range(REPORT_CONCURRENCY)
        ]
        for worker in self._reporters:
            worker.start()
        self._task = asyncio.create_task(self._loop(), name="vnpu-reconciler")

    async def stop(self) -> None:
        self._estimates.close()
        if self._crd_check is not None:
            self._crd_check.stop()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._reports.close()
        for worker in self._reporters:
            await asyncio.to_thread(worker.join, 10)
        # In a thread: it waits for the informers' threads to end.
        if self._cache is not None and not await asyncio.to_thread(self._cache.stop):
            log.warning("some informers had not stopped within 10 s; leaving them (daemon threads)")

    def _changed(self, why: str) -> None:
        """Called from an informer's thread."""
        if self._loop_ref is not None:
            self._loop_ref.call_soon_threadsafe(self.trigger, why)

    def trigger(self, why: str) -> None:
        log.debug("reconcile requested: %s", why)
        self._wake.set()

    def has_pods(self, namespace: str, model: str) -> bool:
        """Whether the model still has pods (from the cache: the finalizer waits on it)."""
        _, _, pods = self._cache.snapshot()
        return any(p.managed and p.namespace == namespace and p.model == model for p in pods)

    @property
    def unhealthy_after(self) -> float:
        """Seconds without a pass gone through, or an answered call of the pass in flight, before
        :meth:`health` fails: ``UNHEALTHY_AFTER_RESYNCS`` resync periods, at least
        :data:`MIN_UNHEALTHY_SECONDS`."""
        return max(UNHEALTHY_AFTER_RESYNCS * self.config.resync_seconds, MIN_UNHEALTHY_SECONDS)

    def health(self) -> dict[str, Any]:
        """The loop's state for kopf's liveness probe; raises :class:`Unhealthy` when, for
        :attr:`unhealthy_after` seconds, no pass went through (counted from the loop's start before the
        first) and the pass in flight, if any, got no API call answered. A pass longer than the limit
        that keeps getting answers (a first pass writing thousands of pods) is working, not stuck: a
        restart would only start it over."""
        now = self._clock()
        done = self._last_ok if self._last_ok is not None else self._loop_started
        started, doing, answered, last_answer, waiting = self._progress.snapshot()
        since = done
        if done is not None and started is not None and last_answer is not None:
            since = max(done, last_answer[0])
        limit = self.unhealthy_after
        if done is not None and since is not None and now - since > limit:
            why = (
                f"limit {limit:g}s: {UNHEALTHY_AFTER_RESYNCS} resync periods of "
                f"{self.config.resync_seconds:g}s, at least {MIN_UNHEALTHY_SECONDS:g}s"
            )
            message = f"no reconcile pass went through for {now - done:.0f}s"
            if started is None:
                message += f" and none is running ({why})"
            else:
                last = (
                    f"the last {now - last_answer[0]:.0f}s ago: {last_answer[1]}"
                    if last_answer is not None
                    else "none yet"
                )
                message += (
                    f", and the pass in flight (started {now - started:.0f}s ago, {doing}; {answered} API "
                    f"calls answered, {last}) has made no progress for {now - since:.0f}s ({why})"
                )
                if waiting:
                    what, call_since = waiting[0]
                    more = f" (and {len(waiting) - 1} more)" if len(waiting) > 1 else ""
                    message += f"; waiting {now - call_since:.0f}s for the API server on: {what}{more}"
            raise Unhealthy(f"{message}; last error: {self._last_error or 'none'}")
        # Passes that go through on a store that stopped hearing from the API server (a LIST refused
        # for minutes: RBAC taken away, a broken aggregation layer) plan from an old view of the
        # cluster; a restart starts every informer over, and the restarts say so.
        stale = self._cache.stale_for() if self._cache is not None else 0.0
        if stale > limit:
            which = max(self._cache.informers, key=lambda i: i.stale_for()).name
            raise Unhealthy(
                f"the {which} informer has not heard from the API server for {stale:.0f}s "
                f"(limit {limit:g}s): passes plan from a store that may have missed changes; "
                f"last error: {self._last_error or 'none'}"
            )
        return {
            "passes": self._passes,
            "last_ok_age_s": None if self._last_ok is None else round(now - self._last_ok, 1),
            "last_error": self._last_error,
            "models_in_backoff": self._models_in_backoff(),
            "pass_in_flight_s": None if started is None else round(now - started, 1),
            "pass_doing": doing,
            "pass_calls_answered": answered,
        }

    async def _loop(self) -> None:
        self._loop_started = self._clock()
        while True:
            timeout = self.config.resync_seconds
            if self._requeue_after is not None:
                timeout = min(timeout, self._requeue_after)
            woken = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
                woken = True
            if woken:
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
            self._progress.begin()
            try:
                result = await asyncio.to_thread(self._pass_sync)
            finally:
                self._progress.end()
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
            self._passes += 1
            self._last_ok = self._clock()
            self._last_error = ""
            return result

    def _pass_sync(self) -> Plan:
        models, nodes, pods = self._cache.snapshot()
        cache = self._cache
        return self.reconcile(models, nodes, pods, cache.services_snapshot(), cache.budgets_snapshot())

    def _secret_snapshot(self) -> list[ObservedSecret]:
        """Key Secrets: listed at start and on every resync, else what this operator created and kept."""
        if time.monotonic() - self._secrets_listed >= self.config.resync_seconds or not self._secrets_listed:
            self._secrets = {(s.namespace, s.name): s for s in self.kube.list_secrets()}
            self._secrets_listed = time.monotonic()
        return list(self._secrets.values())

    def _service_snapshot(
        self, models: Sequence[ObservedModel], watched: Sequence[ObservedService]
    ) -> list[ObservedService]:
        """The informer's Services, plus the taken names, each looked at again once per resync (a taken
        name is the model's to use as soon as that Service is gone, or handed to the model), plus the
        Services being created (until the informer shows them, at most one resync)."""
        wanted = {(m.namespace, api.service_name(m.name)) for m in models} | {
            (m.namespace, api.warm_service_name(m.name))
            for m in models
            if m.spec is not None and m.spec.holder_serves
        }
        with self._shared_lock:
            taken = {k: v for k, v in self._taken.items() if k in wanted}
        if taken and time.monotonic() - self._taken_checked >= self.config.resync_seconds:
            for key in list(taken):
                try:
                    found = self.kube.find_service(*key)
                except ApiException as exc:
                    log.warning("looking at Service %s/%s: %s", *key, api_error(exc)[1])
                    continue
                if found is None:
                    del taken[key]
                else:
                    taken[key] = found
            self._taken_checked = time.monotonic()
        seen = {(s.namespace, s.name) for s in watched}
        now = time.monotonic()
        with self._shared_lock:
            self._taken = taken
            self._creating = {
                k: (svc, since)
                for k, (svc, since) in self._creating.items()
                if k not in seen and now - since < self.config.resync_seconds
            }
            creating = [svc for svc, _ in self._creating.values()]
        return [*watched, *(s for k, s in taken.items() if k not in seen), *creating]

    def reconcile(
        self,
        models: Sequence[ObservedModel],
        nodes: Sequence[ObservedNode],
        pods: Sequence[ObservedPod],
        services: Sequence[ObservedService] = (),
        budgets: Sequence[ObservedBudget] = (),
    ) -> Plan:
        """One pass over the given state: plan, write, report."""
        if not self._is_leader():
            raise RuntimeError("not the leader: refusing to write")
        now = dt.datetime.now(dt.UTC)
        models = self._reported.overlay(models)
        self._estimates.forget_except(models)
        estimates = self._estimates.lookup([m for m in models if m.spec is not None])
        live = {f"{m.namespace}/{m.name}": m.uid for m in models}  # "namespace/name" -> uid
        # A model deleted and created again (a new uid) inherits neither backoff nor message.
        self._failures = {k: f for k, f in self._failures.items() if live.get(failure_model(k)) == f.uid}
        uids = set(live.values())
        with self._shared_lock:
            self._status_refused = {u: r for u, r in self._status_refused.items() if u in uids}
        started = time.perf_counter()
        self._progress.stage("planning")
        result = plan(
            models,
            nodes,
            pods,
            estimates,
            self.config,
            now,
            self._secret_snapshot(),
            self._failures,
            self._service_snapshot(models, services),
            budgets,
        )
        planned = time.perf_counter()
        self._progress.stage("writing the plan")
        failed = self._apply(result)
        self._progress.stage("reporting")
        with self._shared_lock:
            late, self._late_failures = self._late_failures, {}
        failed.update({k: v for k, v in late.items() if k in live and k not in failed})
        self._settle_failures(result, failed, now, live)
        restatus(result, self._failures, now)
        self._submit_report(result)
        self._series.after_pass({(m.namespace, m.name) for m in models})
        log.debug(
            "pass over %d models: plan %.2fs, writes %.2fs",
            len(models),
            planned - started,
            time.perf_counter() - planned,
            extra={"creates": len(result.create), "deletes": len(result.delete), "failed": len(failed)},
        )
        retries = [r for m in models if (r := self._estimates.retry_in(m)) is not None]
        # A model refused in this pass had its budget planned counting the replicas it was to create:
        # the next pass counts those it has (its writes backing off) and puts the budget right, now.
        refused_now = next(
            (0.5 for i in result.create if i.role == api.ROLE_REPLICA and failed.keys() & set(i.models)), None
        )
        waits = [w for w in (result.requeue_after, min(retries, default=None), refused_now) if w is not None]
        self._requeue_after = max(0.5, min(waits)) if waits else None
        return result

    def _wake_soon(self) -> None:
        if self._loop_ref is not None:
            self._loop_ref.call_soon_threadsafe(self._wake.set)

    def _wake_in(self, seconds: float) -> None:
        """A pass in ``seconds`` (from any thread)."""
        loop = self._loop_ref
        if loop is not None:
            loop.call_soon_threadsafe(loop.call_later, seconds, self._wake.set)

    # -- writes ----------------------------------------------------------------------------------------
    def _apply(self, result: Plan) -> dict[str, tuple[str, str]]:
        """Apply the plan's writes; returns model -> (reason, message) of the writes the server refused.
        A model whose write failed gets none of its later writes in this pass."""
        kube = self.kube
        failed: dict[str, tuple[str, str]] = {}

        def fail(models: Sequence[str], reason: str, message: str) -> None:
            for model in models or ():
                failed.setdefault(model, (reason, message))
                ns, name = failure_model(model).split("/", 1)
                self._series.count_api_error(ns, name, reason)

        def guarded(models: Sequence[str], what: str, write: Callable[[], None]) -> None:
            if models and set(models) <= failed.keys():
                # Its models already failed in this pass: their later writes would too. A write of
                # several models (a shared weight-holder) still goes while one of them has not.
                return
            if not self._is_leader():
                raise RuntimeError("lost the leader Lease: refusing to write")
            try:
                with self._progress.call(what):  # an answer, even a refusal, is the pass's progress
                    write()
            except ApiException as exc:
                reason, message = api_error(exc)
                log.warning("%s refused: %s", what, message, extra={"models": list(models), "reason": reason})
                fail(models, reason, f"{what}: {message}")
            except unreachable_errors():
                raise  # no answer from the API server: the pass fails as a whole, and the next tries again
            except Exception as exc:
                # A bug met on one object's write (a manifest that cannot be rendered, say): that
                # model's failure, with its traceback in the log, not an abort of every model's pass.
                log.exception("%s failed", what, extra={"models": list(models)})
                fail(models, INTERNAL_ERROR, f"{what}: {type(exc).__name__}: {exc}")

        def delete(d: PodDeletion) -> None:
            def write() -> None:
                if kube.delete_pod(d.namespace, d.name, force=d.force, uid=d.uid):
                    metrics.POD_ACTIONS.labels("delete", d.role).inc()
                    log.info("deleted pod %s/%s (%s)", d.namespace, d.name, d.reason)

            guarded(d.models, f"deleting pod {d.namespace}/{d.name}", write)

        def create(intent: PodIntent) -> None:
            models = intent.models
            if intent.role == api.ROLE_PLACEHOLDER:  # a refused placeholder backs off placeholders only
                models = tuple(placeholders_failure_key(m) for m in models)

            def write() -> None:
                if kube.create_pod(render(intent, self.config)):
                    metrics.POD_ACTIONS.labels("create", intent.role).inc()
                    if intent.replaces:
                        metrics.DEFRAGMENT_MOVES.inc()
                    log.info("created %s pod %s/%s", intent.role, intent.namespace, intent.name)
                    return
                # AlreadyExists: ours (a crash, an informer behind) or someone else's, which the pods
                # informer does not keep: planned again every pass, it must say why it never comes.
                found = kube.find_pod(intent.namespace, intent.name)
                if found is None or found.managed:
                    return  # gone again (the next pass creates it), or ours
                message = (
                    f"pod {intent.name} exists in {intent.namespace} and is not labelled "
                    f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}: it is left as it is, and this "
                    f"{intent.role} pod is not created until that pod is deleted or renamed"
                )
                log.warning("%s", message, extra={"models": list(intent.models)})
                fail(models, POD_NAME_TAKEN, message)  # a refused write (409) as any other, and counted

            guarded(models, f"creating {intent.role} pod {intent.name}", write)

        def create_secret(intent: SecretIntent) -> None:
            def write() -> None:
                # The key is drawn here, not in the (pure) plan; an existing Secret keeps its key.
                key = sharing.new_key()
                made = kube.create_secret(
                    share_key_secret(intent.namespace, intent.share_group, intent.owners, key)
                )
                if made is not None:
                    self._secrets[(made.namespace, made.name)] = made
                    log.info(
                        "created the key Secret of share group %s/%s", intent.namespace, intent.share_group
                    )
                    self._wake_soon()  # the group's pods are planned once its Secret exists: go on now
                    return
                # AlreadyExists: ours (not listed yet) or someone else's, which the list by label
                # never shows: planned again every pass, it must say why the group's pods never come.
                name = sharing.secret_name(intent.share_group)
                found = kube.find_secret(intent.namespace, name)
                if found is None:
                    return  # gone again: the next pass creates it
                if found.share_group == intent.share_group:  # ours: plan with it
                    self._secrets[(found.namespace, found.name)] = found
                    if not found.terminating:
                        self._wake_soon()
                    return
                message = (
                    f"Secret {name} exists in {intent.namespace} and is not the key Secret of share group "
                    f"{intent.share_group} (labelled {api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}, "
                    f"{api.LABEL_ROLE}={ROLE_SHARE_KEY}, {api.LABEL_SHARE_GROUP}={intent.share_group}): it "
                    "is left as it is, and the group's pods are not created until it is deleted or "
                    "renamed, or the models get another spec.shareGroup"
                )
                log.warning("%s", message, extra={"models": list(intent.models)})
                fail(intent.models, KEY_SECRET_NAME_TAKEN, message)

            guarded(intent.models, f"creating the key Secret of share group {intent.share_group}", write)

        def set_labels(u: LabelsUpdate) -> None:
            def write() -> None:
                kube.set_pod_labels(u.namespace, u.name, u.labels)
                log.info("labelled pod %s/%s %s", u.namespace, u.name, dict(u.labels))

            guarded(u.models, f"labelling pod {u.name}", write)

        def set_selector(u: SelectorUpdate) -> None:
            def write() -> None:
                kube.set_service_selector(u.namespace, u.name, u.selector)
                log.info("set the selector of Service %s/%s to %s", u.namespace, u.name, dict(u.selector))

            guarded(u.models, f"setting the selector of Service {u.name}", write)

        for update in result.set_owners:  # before deletions: a holder must never be left to one owner

            def set_owners(u: Any = update) -> None:
                if u.kind == "Secret":
                    kube.set_secret_owners(u.namespace, u.name, u.owner_references)
                    known = self._secrets.get((u.namespace, u.name))
                    if known is not None:  # the cache of Secrets is ours to keep current
                        uids = tuple(r["uid"] for r in u.owner_references)
                        self._secrets[(u.namespace, u.name)] = replace(known, owner_uids=uids)
                else:
                    kube.set_pod_owners(u.namespace, u.name, u.owner_references)

            guarded(update.models, f"setting the owners of {update.kind} {update.name}", set_owners)

        # Key Secrets first (a group's pods are planned only once its Secret exists), then deletions (a
        # moving replica frees its old slot), then pods in the plan's order: weight-holders before the
        # replicas that map them. Each phase fans out over a few connections. The models' Services go
        # to the reporter with the statuses: a Service never holds back anyone's pods.
        def keep_policy(intent: network_policy.NetworkPolicyIntent) -> None:
            def write() -> None:
                manifest = network_policy.manifest(intent.namespace, self.config.network_policy_peers)
                done = kube.keep_network_policy(manifest)
                self._policies_kept[intent.namespace] = time.monotonic()
                if done != "kept":
                    log.info("%s NetworkPolicy %s/%s", done, intent.namespace, network_policy.NAME)

            # Refused, the namespace's models fail: none of their pods is created unprotected.
            guarded(intent.models, f"keeping NetworkPolicy {network_policy.NAME}", write)

        def keep_budget(intent: disruption.BudgetIntent | disruption.HolderBudgetIntent) -> None:
            # Its own failure key: a refused budget never holds back the model's pods.
            keys = tuple(budget_failure_key(m) for m in intent.models)

            def write() -> None:
                if intent.update:
                    kube.set_budget_spec(intent.namespace, intent.name, intent.spec())
                    log.info(
                        "set the spec of PodDisruptionBudget %s/%s",
                        intent.namespace,
                        intent.name,
                        extra={"spec": intent.spec()},
                    )
                    return
                if kube.create_budget(intent.manifest()):
                    log.info("created PodDisruptionBudget %s/%s", intent.namespace, intent.name)
                    return
                # AlreadyExists: ours, not yet seen by the informer, or someone else's (never touched).
                found = kube.find_budget(intent.namespace, intent.name)
                if found is None or intent.owns(found):
                    return  # gone again (the next pass creates it), or ours
                message = disruption.taken_message(intent, found)
                log.warning("%s", message, extra={"models": list(intent.models)})
                for key in keys:
                    failed.setdefault(key, (disruption.REASON_NAME_TAKEN, message))

            verb = "setting the spec of" if intent.update else "creating"
            guarded(keys, f"{verb} PodDisruptionBudget {intent.name}", write)

        due = time.monotonic() - self.config.resync_seconds
        # Only the namespaces with a policy in this plan are remembered: a namespace deleted (its
        # policy with it) and created again within a resync would otherwise have its new pods created
        # before its new policy, unprotected; and the table grew with every namespace ever seen.
        planned = {i.namespace for i in result.network_policies}
        self._policies_kept = {ns: at for ns, at in self._policies_kept.items() if ns in planned}
        policies = [i for i in result.network_policies if self._policies_kept.get(i.namespace, -1e18) < due]
        holders = [i for i in result.create if i.role == api.ROLE_WEIGHTS]
        others = [i for i in result.create if i.role != api.ROLE_WEIGHTS]
        phases: list[tuple[Callable[[Any], None], list[Any]]] = [
            (keep_policy, policies),  # before any pod of theirs
            (create_secret, list(result.create_secrets)),
            # Holders labelled before the Services select by the label: a warm route never selects none.
            (set_labels, list(result.set_labels)),
            (set_selector, list(result.update_services)),
            (delete, list(result.delete)),
            (create, holders),
            (create, others),
            # After the pods: a budget never holds one back.
            (keep_budget, [*result.budgets, *result.holder_budgets]),
        ]
        with ThreadPoolExecutor(max_workers=API_CONCURRENCY) as pool:
            for action, items in phases:
                for future in [pool.submit(action, item) for item in items]:
                    future.result()
        for down in result.scale_down:

            def scale(d: scaling.ScaleDown = down) -> None:
                if kube.scale_model(d.namespace, d.name, 0, d.resource_version):
                    metrics.SCALED_TO_ZERO.labels(d.namespace, d.name).inc()
                    log.info("scaled %s to 0 replicas (idle for %.0fs)", d.key, d.idle_seconds)
                    if d.key in result.outcomes and self._is_leader():
                        message = f"no request for {d.idle_seconds:.0f}s: scaled to 0 replicas"
                        kube.post_event(result.outcomes[d.key][0], "Normal", "ScaledToZero", message)
                else:  # changed meanwhile (a wake won the race) or gone: look again with fresh state
                    self._wake_soon()

            guarded((down.key,), f"scaling {down.key} to 0", scale)
        for gone in result.delete_secrets:

            def delete_secret(x: SecretDeletion = gone) -> None:
                deleted = kube.delete_secret(x.namespace, x.name, x.uid)
                self._secrets.pop((x.namespace, x.name), None)  # gone, or another one: listed again
                if deleted:
                    log.info("deleted the key Secret of share group %s/%s", x.namespace, x.share_group)
                else:
                    self._secrets_listed = 0.0

            # No model's write: a refusal is logged, and the next pass plans the deletion again.
            guarded((), f"deleting the key Secret of share group {gone.share_group}", delete_secret)
        return failed

    def _settle_failures(
        self, result: Plan, failed: dict[str, tuple[str, str]], now: dt.datetime, uids: dict[str, str]
    ) -> None:
        """Back off the models that failed now; forget those whose retry went through. ``uids``:
        "namespace/name" -> uid of the models of the pass."""
        for key, (reason, message) in failed.items():
            before = self._failures.get(key)
            attempts = before.attempts + 1 if before else 1
            delay = backoff_seconds(attempts, self.config.backoff_seconds, self.config.max_backoff_seconds)
            retry_at = now + dt.timedelta(seconds=delay)
            self._failures[key] = Failure(
                f"{message} (retrying in {delay:g}s)",
                retry_at,
                attempts,
                reason,
                uids.get(failure_model(key), ""),
            )
        for key in list(self._failures):
            if key not in failed and self._failures[key].retry_at <= now:
                del self._failures[key]  # retried in this pass (its writes were planned) and went through
        metrics.MODELS_IN_BACKOFF.set(self._models_in_backoff())

    def _models_in_backoff(self) -> int:
        """Models whose writes wait out a backoff (a model whose placeholders alone do is not one)."""
        return sum(1 for key in self._failures if failure_model(key) == key)

    def _submit_report(self, result: Plan) -> None:
        """Queue the pass's Services, statuses and Events for the reporter; set its gauges now."""
        # The queue merges what one model gets twice (its Service, then its status): no merging here.
        now = time.monotonic()
        for intent in result.create_services:
            if intent.owner.key not in result.outcomes:
                continue  # not a model this pass looked at (cannot happen): the next pass plans it again
            pending = ObservedService(
                intent.namespace, intent.name, "", intent.owner.uid, False, pending=True
            )
            with self._shared_lock:
                self._creating[(intent.namespace, intent.name)] = (pending, now)
            self._reports.put(
                intent.owner.key, Report(result.outcomes[intent.owner.key][0], services=(intent,))
            )
        for u in result.statuses:
            if not (u.changed or u.events) or self._status_waits(u.model):
                continue
            status, token = (
                (u.status, self._reported.submitted(u.model.uid, u.status)) if u.changed else (None, 0)
            )
            report = Report(u.model, status=status, token=token, events=u.events)
            self._reports.put(f"{u.model.namespace}/{u.model.name}", report)
        metrics.REPORTS_QUEUED.set(self._reports.backlog)
        metrics.UNPLACED_SLICES.set(result.unplaced_slices)
        metrics.WARM_HOLDERS.clear()
        for pool, count in result.warm_holders.items():
            metrics.WARM_HOLDERS.labels(pool).set(count)
        for update in result.statuses:
            labels = (update.model.namespace, update.model.name)
            metrics.PLACED_REPLICAS.labels(*labels).set(update.placed)
            metrics.UNPLACED_REPLICAS.labels(*labels).set(update.unplaced)
            metrics.SAVED_BY_SHARING_MIB.labels(*labels).set(update.saved_mib)

    def _status_waits(self, model: ObservedModel) -> bool:
        """Whether the model's status (and with it its Events) waits out the backoff of a refused
        write: the same refusal, and its Warning Event counted, once a pass, would be writes per pass
        for as long as it lasts. A changed spec is tried at once."""
        with self._shared_lock:
            refused = self._status_refused.get(model.uid)
            if refused is None:
                return False
            if refused[2] != model.generation:
                del self._status_refused[model.uid]
                return False
            return self._clock() < refused[1]

    def _status_refused_now(self, model: ObservedModel) -> float:
        """Back the model's status writes off after a refusal; the seconds until they go again (a
        pass is woken then)."""
        with self._shared_lock:
            before = self._status_refused.get(model.uid)
            attempts = before[0] + 1 if before is not None and before[2] == model.generation else 1
            delay = backoff_seconds(attempts, self.config.backoff_seconds, self.config.max_backoff_seconds)
            self._status_refused[model.uid] = (attempts, self._clock() + delay, model.generation)
        self._wake_in(delay)
        return delay

    def _report_worker(self) -> None:
        """One of the reporter's threads: write each model's report in turn, until stopped."""
        while (taken := self._reports.take()) is not None:
            key, report = taken
            try:
                self._write_report(report)
            except Exception:
                log.exception("writing the status of %s failed", key)
                # Never mistaken for a status being written: the next pass plans from the server's view.
                self._reported.refused(report.model.uid, report.token)
            finally:
                lag = self._reports.done(key)
                if lag is not None:
                    metrics.REPORT_LAG_SECONDS.observe(lag)
                metrics.REPORTS_QUEUED.set(self._reports.backlog)

    def _write_report(self, report: Report) -> None:
        """Create the model's Service, then post its Events and write its status. Leadership is asked
        before each write (each may wait up to a request timeout): a Lease lost meanwhile stops the
        rest, which the new leader reports from its own passes."""
        kube, model = self.kube, report.model

        def lost() -> bool:
            if self._is_leader():
                return False
            self._reported.refused(model.uid, report.token)
            with self._shared_lock:
                for service in report.services:
                    self._creating.pop((service.namespace, service.name), None)
            return True

        for service in report.services:
            if lost():
                return
            self._create_service(service)
        # The Events first: whoever sees the status (a user, a controller, a test) finds the Events that
        # explain it already there. Best effort, never in the way of the status.
        for event in report.events:
            if lost():
                return
            try:
                repeat = self._posted.repeat_of(model.uid, event)
                if repeat is None:
                    self._posted.posted(
                        model.uid, event, kube.post_event(model, event.type, event.reason, event.message)
                    )
                elif repeat.name:  # seen lately: a recurrence, or a flip whose status write was refused
                    kube.count_event(model.namespace, repeat.name, repeat.count)
            except Exception:
                log.exception("could not post event %s on %s/%s", event.reason, model.namespace, model.name)
        if report.status is not None:
            if lost():
                return
            try:
                kube.patch_model_status(model, report.status)
            except Exception as exc:
                self._reported.refused(model.uid, report.token)
                if not isinstance(exc, ApiException):
                    raise  # unanswered: no refusal, the next pass writes it again
                reason, message = api_error(exc)
                self._series.count_api_error(model.namespace, model.name, reason)
                delay = self._status_refused_now(model)
                log.warning(
                    "status of %s/%s refused: %s (retrying in %gs)",
                    model.namespace,
                    model.name,
                    message,
                    delay,
                    extra={"reason": reason},
                )
                return
            with self._shared_lock:
                self._status_refused.pop(model.uid, None)

    def _create_service(self, intent: ServiceIntent) -> None:
        key = (intent.namespace, intent.name)
        try:
            if self.kube.create_service(render_service(intent)):
                log.info("created Service %s/%s", intent.namespace, intent.name)
                return
            # AlreadyExists: ours, not yet seen by the informer, or someone else's (never touched).
            found = self.kube.find_service(intent.namespace, intent.name)
        except Exception as exc:
            # Refused, or unanswered (a timeout, a broken connection): this Service alone failed, the
            # model's Events and status still go.
            with self._shared_lock:
                self._creating.pop(key, None)
            if isinstance(exc, ApiException):
                reason, message = api_error(exc)
            else:
                reason, message = type(exc).__name__, str(exc)
            log.warning("creating Service %s/%s failed: %s", *key, message, extra={"reason": reason})
            self._series.count_api_error(intent.namespace, intent.owner.name, reason)
            with self._shared_lock:
                self._late_failures[intent.owner.key] = (reason, f"creating Service {intent.name}: {message}")
            self._wake_soon()  # the next pass backs the model off and says why in its status
            return
        if found is not None and found.controller_uid != intent.owner.uid:
            with self._shared_lock:
                self._creating.pop(key, None)
                self._taken[key] = found
            log.warning("Service %s/%s exists and is not %s's: leaving it alone", *key, intent.owner.key)
            self._wake_soon()  # the next pass says so in the model's status
