"""Watch-fed caches of the objects a pass reads (client-go's informers, in a thread each).

A reconcile pass reads the cluster from these stores, not from the API server: the load a pass puts on
the server is its writes, which grow with what changed, never with the size of the cluster. Each
informer LISTs once, then WATCHes from the list's resourceVersion (with bookmarks). When the watch
ends, or its connection breaks, or the server answers it with a 5xx or 429, it resumes from the last
version seen; only on ``410 Gone`` (that version is compacted away), another 4xx or an error nobody
foresaw does it LIST again and replace its store, so an object deleted while no watch was open is
noticed too. A LIST is read in pages (:func:`list_pages`), so what a relist holds at once is one page,
not every pod of the cluster (unless its pages expire twice: then it is read whole, once).

Failures back off, as client-go's reflector does. A LIST that failed, and a watch that did not count
(it ended, however, within :data:`SHORT_WATCH_SECONDS` with no event: an API server shutting down, a
proxy cutting streams, a ``410`` right after each LIST), are followed by a pause of
:data:`BACKOFF_FIRST_SECONDS` doubling to :data:`BACKOFF_MOST_SECONDS` (``vnpu.backoff``), less up to
:data:`BACKOFF_JITTER` of it at random, so that informers and replicas that failed together do not
retry together. A watch that counted starts the count over: after it, the next watch (or, after its
``410``, the LIST) goes at once. Without this a watch answered ``200`` and closed at once was reopened
some 300,000 times a second, and a ``410`` right after each LIST made a loop of full LISTs. Each
failure is counted in ``vnpu_operator_informer_errors_total{verb,resource,reason}``.

While an informer fails it keeps serving its last store (and stays ``synced``): a pass plans from what
it last saw, which is better than from nothing, but must not go on for ever unnoticed. How long that
has been is :meth:`ClusterCache.stale_for` (for liveness) and
``vnpu_operator_informer_stale_seconds{resource}``.

Objects are parsed once, on arrival, into the frozen dataclasses of :mod:`vnpu.operator.state`; a
change that leaves the parsed object equal (a node's heartbeat, a pod's unrelated status field) wakes
nobody.

Pods are watched in every namespace, whatever namespaces the operator serves: a pod anyone created
that requests a ``vnpu.io/memory-<index>`` resource holds device memory the packer must not hand out
again. Of the pods outside the operator's own, only those are kept.

Services and PodDisruptionBudgets are watched by the operator's managed-by label, in the namespaces it
serves (or all): a model's Service or budget that someone deletes or edits is noticed at once and
created again or put back.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from vnpu import api
from vnpu.backoff import backoff_seconds
from vnpu.kubeclient import LIST_TIMEOUT, watch_timeout
from vnpu.operator import metrics
from vnpu.operator.kube import MANAGED_SELECTOR
from vnpu.operator.state import (
    ObservedBudget,
    ObservedModel,
    ObservedNode,
    ObservedPod,
    ObservedService,
    labelled_managed,
    parse_budget,
    parse_model,
    parse_node,
    parse_pod,
    parse_service,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Seconds a watch request stays open before the server ends it (and the informer resumes it).
WATCH_SECONDS = 300
#: The pause after the first failure in a row (a LIST that failed, a watch that did not count), doubling
#: with each further one up to :data:`BACKOFF_MOST_SECONDS` (client-go's reflector: 800 ms to 30 s).
BACKOFF_FIRST_SECONDS = 0.8
BACKOFF_MOST_SECONDS = 30.0
#: Up to this fraction of each pause is taken off at random (so the most is never exceeded).
BACKOFF_JITTER = 0.2
#: A watch that ends (however) sooner than this, having delivered no event, failed: the API server is
#: going away or something between cuts the stream (client-go: "very short watch", under 1 s).
SHORT_WATCH_SECONDS = 1.0
#: Objects per LIST request (client-go's reflector asks for 500 too).
LIST_PAGE_SIZE = 500
R = TypeVar("R")


class _Stopped(Exception):
    """The informer was stopped while it listed."""


def list_pages(
    list_call: Callable[..., Any],
    convert: Callable[[Mapping[str, Any]], R | None],
    name: str,
    stop: threading.Event,
) -> tuple[list[R], str]:
    """LIST a collection a page of :data:`LIST_PAGE_SIZE` objects at a time, following ``continue``:
    what ``convert`` made of each object (its Nones dropped), and the list's resourceVersion.

    Why pages: one unpaginated LIST of every pod of a shared cluster is its whole body, as bytes and
    then parsed, held at once (10,000 pods of ~15 KB with their managedFields: over 1 GiB, twice the
    chart's memory limit), so the operator was OOMKilled at its start and again at every relist after a
    watch expired. Here each page is converted to what the store keeps (small parsed objects) before
    the next is asked for, as client-go's reflector does.

    The pages are one consistent snapshot, and each carries its resourceVersion: a watch from the
    last page's misses nothing that changed while they were read. When the server compacted past the
    snapshot before the last page (``410`` for the continue token), the list starts again from its
    first page, and what was read of the old snapshot is dropped. If that list expires too, reading
    the pages takes longer than the server keeps a snapshot (it compacts every ~5 minutes; a big, slow
    cluster), and starting over again would loop for ever with the operator never synced. So then
    one LIST without ``limit`` reads the collection whole, as client-go's pager does
    (k8s.io/client-go/tools/pager, ``FullListIfExpired``; it does so at the first expiry, here paging
    is tried once more, since a list that merely straddled one compaction completes in pages). Its
    memory peak is that of an unpaginated list, but only then; it is logged as a warning and counted
    in ``vnpu_operator_unpaginated_lists_total``. Raises :class:`_Stopped` when ``stop`` is set
    before a request is made.
    """
    for attempt in range(2):
        kept: list[R] = []
        token: str | None = None
        try:
            while True:
                if stop.is_set():
                    raise _Stopped
                page = _list_page(list_call, name, token)
                kept.extend(_converted(page, convert))
                meta = page.get("metadata") or {}
                token = meta.get("continue") or None
                if token is None:
                    return kept, str(meta.get("resourceVersion", ""))
                del page  # the next page is read with this one gone
        except ApiException as exc:
            if exc.status != 410 or token is None:
                raise
            if attempt == 0:
                log.info("%s list: its snapshot expired before the last page; listing again", name)
    del kept
    log.warning(
        "%s list: its snapshot expired before the last page twice (reading the pages takes longer than "
        "the API server keeps a snapshot); listing it whole, without pages",
        name,
    )
    metrics.UNPAGINATED_LISTS.labels(name).inc()
    if stop.is_set():
        raise _Stopped
    page = _list_page(list_call, name, None, paged=False)
    return list(_converted(page, convert)), str((page.get("metadata") or {}).get("resourceVersion", ""))


def _converted(page: Mapping[str, Any], convert: Callable[[Mapping[str, Any]], R | None]) -> Iterator[R]:
    """What ``convert`` makes of each object of a page, its Nones dropped."""
    for obj in page.get("items") or []:
        value = convert(obj)
        if value is not None:
            yield value


def _list_page(
    list_call: Callable[..., Any], name: str, token: str | None, paged: bool = True
) -> dict[str, Any]:
    """One page of a LIST (or, not ``paged``, the whole list), parsed (the response, and its bytes, are
    freed on return)."""
    more: dict[str, Any] = {"limit": LIST_PAGE_SIZE} if paged else {}
    if token:
        more["_continue"] = token
    metrics.API_REQUESTS.labels("list", name).inc()  # sent, whatever its answer
    resp = list_call(_preload_content=False, _request_timeout=LIST_TIMEOUT, **more)
    page: dict[str, Any] = json.loads(resp.data)
    return page


class Informer(Generic[T]):
    """One resource's store, kept current by LIST + WATCH in a daemon thread.

    ``parse`` turns a raw object into ``(key, value)``, or None for objects the store does not keep.
    ``fingerprint`` is what about a value must change to call ``on_change`` (default: the value).
    ``clock`` (monotonic seconds), ``wait`` (pause for so many seconds; True when stopped meanwhile;
    default: until :meth:`stop`) and ``rand`` (in [0, 1), for the jitter) are for tests.
    """

    def __init__(
        self,
        name: str,
        list_call: Callable[..., Any],
        parse: Callable[[Mapping[str, Any]], tuple[str, T] | None],
        on_change: Callable[[str], None],
        fingerprint: Callable[[T], Hashable] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self._list = list_call
        self._parse = parse
        self._on_change = on_change
        self._fingerprint = fingerprint or (lambda v: v)  # type: ignore[assignment,return-value]
        self._store: dict[str, T] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.synced = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"informer-{name}", daemon=True)
        self._resp: Any = None
        self._clock = clock
        self._wait = wait or self._stop.wait
        self._random = rand
        # What :meth:`stale_for` reads (written by the loop's thread only; a float and a bool, no lock).
        self._current_at = clock()  # when the store was last known current (monotonic seconds)
        self._watching = False  # a watch is open

    def start(self) -> None:
        self._current_at = self._clock()
        self._thread.start()

    def stop(self) -> None:
        """End the loop and its open watch now. The socket is shut down first: that wakes the reader
        blocked on it, where closing the response alone leaves it waiting (with the connection held)
        for the server's next bytes, up to a bookmark interval later."""
        self._stop.set()
        resp = self._resp
        if resp is not None:
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            for close in (lambda: sock is not None and sock.shutdown(socket.SHUT_RDWR), resp.close):
                try:
                    close()
                except Exception:  # the stream may already be closed
                    log.debug("closing the %s watch", self.name, exc_info=True)

    def join(self, timeout: float) -> bool:
        """Wait for the loop to end after :meth:`stop`; whether it did within ``timeout`` seconds."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def stale_for(self) -> float:
        """Seconds for which this informer's store may have missed changes: 0 while a watch is open;
        else the seconds since the store was last known current: its last LIST completed, its watch
        last delivered a line (an event or a bookmark), or a watch that counted (an event, or open
        :data:`SHORT_WATCH_SECONDS`) ended; before the first of these, since :meth:`start`.

        A LIST in flight does not count until it completes (the store is the old one until then), nor
        do a failed request, a ``410`` or a watch that ended at once with nothing. A watch whose
        connection died silently counts as open until its read timeout ends it (``watch_timeout``: 330
        s). Cheap and safe from any thread; it keeps growing after :meth:`stop`."""
        if self._watching:
            return 0.0
        return max(0.0, self._clock() - self._current_at)

    def snapshot(self) -> list[T]:
        with self._lock:
            return list(self._store.values())

    def get(self, key: str) -> T | None:
        with self._lock:
            return self._store.get(key)

    # -- the loop ------------------------------------------------------------------------------------
    def _run(self) -> None:
        version: str | None = None  # to watch from; None: list first
        failures = 0  # in a row: LISTs that failed, watches that did not count
        while not self._stop.is_set():
            if failures and self._wait(self._pause(failures)):
                return
            if version is None:
                try:
                    version = self._relist()
                except _Stopped:
                    return
                except Exception as exc:
                    if self._stop.is_set():
                        return
                    failures += 1
                    self._failed("list", exc, failures, "listing again")
                    continue
            version, counted, error = self._watch(version)
            if self._stop.is_set():
                return
            failures = 0 if counted else failures + 1
            if error is not None and _relist_after(error):
                version = None
            if error is not None or not counted:
                then = "listing again" if version is None else f"watching again from {version}"
                self._failed("watch", error, failures, then)

    def _pause(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row: the backoff, less its jitter."""
        most = backoff_seconds(failures, BACKOFF_FIRST_SECONDS, BACKOFF_MOST_SECONDS)
        return most * (1.0 - BACKOFF_JITTER * self._random())

    def _failed(self, verb: str, error: Exception | None, failures: int, then: str) -> None:
        """Count and log a failed LIST or WATCH (``error`` None: a watch that did not count), and what
        comes next: at once after a watch that counted, else after a pause (failure ``failures`` in a
        row)."""
        reason = "short_watch" if error is None else _reason(error)
        metrics.INFORMER_ERRORS.labels(verb, self.name, reason).inc()
        if error is None:
            why = f"ended within {SHORT_WATCH_SECONDS:g}s with no event"
        elif isinstance(error, ApiException):
            why = f"{error.status} {error.reason}"
        else:
            why = f"{type(error).__name__}: {error}"
        when = " now"
        if failures:
            most = backoff_seconds(failures, BACKOFF_FIRST_SECONDS, BACKOFF_MOST_SECONDS)
            when = f" in up to {most:g}s (failure {failures} in a row)"
        # A 410 after a healthy watch is routine (its version was compacted away): not a warning.
        level = logging.INFO if reason == "expired" and not failures else logging.WARNING
        log.log(level, "%s %s: %s; %s%s", self.name, verb, why, then, when,
                exc_info=error if reason == "error" else None)  # fmt: skip

    def _relist(self) -> str:
        parsed, version = list_pages(self._list, self._parse_or_keep, self.name, self._stop)
        fresh: dict[str, T] = dict(parsed)
        with self._lock:
            old, self._store = self._store, fresh
        self._current_at = self._clock()
        changed = [k for k in old.keys() | fresh.keys() if self._changed(old.get(k), fresh.get(k))]
        self.synced.set()
        for key in changed:
            self._on_change(key)
        return version

    def _watch(self, version: str) -> tuple[str, bool, Exception | None]:
        """Watch from ``version`` until the stream ends: the version to go on from (the last one seen),
        whether the watch counted (it delivered an event, or lasted :data:`SHORT_WATCH_SECONDS`), and
        the error that ended it, if any."""
        opened = self._clock()
        events = 0
        metrics.API_REQUESTS.labels("watch", self.name).inc()  # sent, whatever its answer
        try:
            resp = self._list(
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _preload_content=False,
                _request_timeout=watch_timeout(WATCH_SECONDS),
            )
        except Exception as exc:
            return version, False, exc
        self._resp = resp
        self._watching = True
        error: Exception | None = None
        try:
            if self._stop.is_set():  # stopped before the response was ours to shut down
                return version, True, None
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    break
                if not line:
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                kind = event.get("type")
                if kind == "ERROR":
                    raise ApiException(status=obj.get("code", 500), reason=obj.get("message", ""))
                self._current_at = self._clock()  # the server says the store is current up to here
                version = obj.get("metadata", {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                events += 1
                self._apply(kind, obj)
        except Exception as exc:
            error = exc
        finally:
            ended = self._clock()
            counted = events > 0 or ended - opened >= SHORT_WATCH_SECONDS
            if counted:  # it was current while open (stale_for said 0): it is up to its end
                self._current_at = ended
            self._watching = False
            self._resp = None
            for close in (resp.close, resp.release_conn):
                try:
                    close()
                except Exception:  # a broken stream may fail to close too
                    log.debug("closing the %s watch", self.name, exc_info=True)
        return version, counted, error

    def _parse_or_keep(self, obj: Mapping[str, Any]) -> tuple[str, T] | None:
        """Parse one object; when the parser raises (input nobody foresaw, or a bug), keep what was
        known of it. One tenant's object must neither blind the informer to every other (the relist
        would fail the same way forever) nor look deleted (the operator would delete its pods)."""
        try:
            return self._parse(obj)
        except Exception:
            key = _key(obj.get("metadata", {}))
            log.exception("%s informer: cannot parse %s; keeping what was known of it", self.name, key)
            with self._lock:
                known = self._store.get(key)
            return None if known is None else (key, known)

    def _apply(self, kind: str | None, obj: Mapping[str, Any]) -> None:
        parsed = self._parse_or_keep(obj)
        meta = obj.get("metadata", {})
        key = parsed[0] if parsed else _key(meta)
        with self._lock:
            before = self._store.get(key)
            if kind == "DELETED" or parsed is None:
                self._store.pop(key, None)
                after = None
            else:
                after = self._store[key] = parsed[1]
        if self._changed(before, after):
            self._on_change(key)

    def _changed(self, before: T | None, after: T | None) -> bool:
        if before is None or after is None:
            return before is not after
        return bool(self._fingerprint(before) != self._fingerprint(after))


def _reason(error: Exception) -> str:
    """The ``reason`` label of a failed request: ``expired`` (410), ``http_<status>``, ``transport``
    (the connection failed or broke, or timed out) or ``error`` (anything else: a bug)."""
    if isinstance(error, ApiException):
        return "expired" if error.status == 410 else f"http_{error.status}"
    if isinstance(error, urllib3.exceptions.HTTPError | OSError):
        return "transport"
    return "error"


def _relist_after(error: Exception) -> bool:
    """Whether a watch ended by ``error`` is followed by a LIST, not resumed from its version: on ``410
    Gone`` (the version is compacted away), another 4xx but 429 (the request itself was refused: a
    LIST finds out whether it still may read) and an error nobody foresaw (the store may have missed
    an event). A broken connection, a timeout, a 5xx or a 429 says nothing of the version: the watch
    resumes from it (a LIST of every pod of the cluster for each broken connection is what client-go
    avoids too)."""
    if isinstance(error, ApiException):
        status = error.status or 0
        return 400 <= status < 500 and status != 429
    return _reason(error) != "transport"


def stalest(informers: Collection[Informer[Any]]) -> float:
    """The most :meth:`Informer.stale_for` of ``informers`` (0 for none)."""
    return max((i.stale_for() for i in informers), default=0.0)


def export_staleness(informers: Collection[Informer[Any]]) -> Callable[[], None]:
    """Serve ``vnpu_operator_informer_stale_seconds{resource}`` from ``informers``, read at each scrape:
    the most :meth:`Informer.stale_for` of those with that name (the InferenceModels, Services and
    budgets of several namespaces share one). Returns what takes the series away again (those another
    export took over since are left)."""
    by_name: dict[str, list[Informer[Any]]] = {}
    for informer in informers:
        by_name.setdefault(informer.name, []).append(informer)
    exported: dict[str, Callable[[], float]] = {}
    for name, same in by_name.items():
        exported[name] = functools.partial(stalest, tuple(same))
        metrics.INFORMER_STALE_SECONDS.labels(name).set_function(exported[name])
        _STALENESS_EXPORTED[name] = exported[name]

    def unexport() -> None:
        for name, function in exported.items():
            if _STALENESS_EXPORTED.get(name) is function:
                del _STALENESS_EXPORTED[name]
                metrics.INFORMER_STALE_SECONDS.remove(name)

    return unexport


#: resource -> the function its ``vnpu_operator_informer_stale_seconds`` series reads now.
_STALENESS_EXPORTED: dict[str, Callable[[], float]] = {}


def _key(meta: Mapping[str, Any]) -> str:
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def model_fingerprint(m: ObservedModel) -> Hashable:
    """What about a model wakes a pass: not its status (the operator's own writes)."""
    return (m.uid, m.generation, m.deleting, m.spec, m.spec_error)


class ClusterCache:
    """The informers of one operator: nodes, pods (all namespaces), and InferenceModels and the
    operator's Services and PodDisruptionBudgets (the namespaces it serves, or all)."""

    def __init__(
        self, api_client: client.ApiClient, namespaces: tuple[str, ...], on_change: Callable[[str], None]
    ) -> None:
        core = client.CoreV1Api(api_client)
        custom = client.CustomObjectsApi(api_client)
        policy = client.PolicyV1Api(api_client)
        served = set(namespaces)

        def pod(obj: Mapping[str, Any]) -> tuple[str, ObservedPod] | None:
            meta = obj.get("metadata", {})
            ours = labelled_managed(meta) and (not served or meta.get("namespace") in served)
            parsed = parse_pod(obj, managed=ours)
            if not ours and not (parsed.requests and parsed.node and not parsed.finished):
                return None
            return _key(meta), parsed

        def node(obj: Mapping[str, Any]) -> tuple[str, ObservedNode] | None:
            return obj["metadata"]["name"], parse_node(obj)

        def model(obj: Mapping[str, Any]) -> tuple[str, ObservedModel] | None:
            return _key(obj.get("metadata", {})), parse_model(obj)

        self.nodes = Informer("nodes", core.list_node, node, lambda k: on_change(f"node {k}"))
        self.pods = Informer("pods", core.list_pod_for_all_namespaces, pod, lambda k: on_change(f"pod {k}"))
        lists = (
            [functools.partial(custom.list_namespaced_custom_object, api.GROUP, api.VERSION, ns, api.PLURAL)
             for ns in namespaces]
            if namespaces
            else [functools.partial(custom.list_cluster_custom_object, api.GROUP, api.VERSION, api.PLURAL)]
        )  # fmt: skip
        self.models = [
            Informer(
                "inferencemodels",
                call,
                model,
                lambda k: on_change(f"InferenceModel {k}"),
                fingerprint=model_fingerprint,  # type: ignore[arg-type]
            )
            for call in lists
        ]
        service_lists = (
            [functools.partial(core.list_namespaced_service, ns, label_selector=MANAGED_SELECTOR)
             for ns in namespaces]
            if namespaces
            else [functools.partial(core.list_service_for_all_namespaces, label_selector=MANAGED_SELECTOR)]
        )  # fmt: skip

        def service(obj: Mapping[str, Any]) -> tuple[str, ObservedService] | None:
            return _key(obj.get("metadata", {})), parse_service(obj)

        self.services = [
            Informer("services", call, service, lambda k: on_change(f"Service {k}")) for call in service_lists
        ]
        list_budgets = policy.list_namespaced_pod_disruption_budget
        budget_lists = (
            [functools.partial(list_budgets, ns, label_selector=MANAGED_SELECTOR) for ns in namespaces]
            if namespaces
            else [functools.partial(policy.list_pod_disruption_budget_for_all_namespaces,
                                    label_selector=MANAGED_SELECTOR)]
        )  # fmt: skip

        def budget(obj: Mapping[str, Any]) -> tuple[str, ObservedBudget] | None:
            return _key(obj.get("metadata", {})), parse_budget(obj)

        # (Its status, which the disruption controller rewrites as replicas come and go, is not parsed:
        # it wakes no pass.)
        self.budgets = [
            Informer("poddisruptionbudgets", call, budget, lambda k: on_change(f"PodDisruptionBudget {k}"))
            for call in budget_lists
        ]
        #: Every informer of the cache.
        self.informers: list[Informer[Any]] = [
            self.nodes,
            self.pods,
            *self.models,
            *self.services,
            *self.budgets,
        ]
        self._unexport: Callable[[], None] = lambda: None  # takes the staleness series away

    def start(self) -> None:
        for informer in self.informers:
            informer.start()
        self._unexport = export_staleness(self.informers)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop every informer and wait up to ``timeout`` seconds for their threads to end (a list
        still in flight ends at its own request timeout); whether they all did."""
        self._unexport()
        for informer in self.informers:
            informer.stop()
        deadline = time.monotonic() + timeout
        return all(i.join(max(0.0, deadline - time.monotonic())) for i in self.informers)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(i.synced.wait(max(0.0, deadline - time.monotonic())) for i in self.informers)

    def stale_for(self) -> float:
        """Seconds for which what a pass reads from these caches may lag the cluster: the most any
        informer's :meth:`Informer.stale_for` says (which one: ``max(self.informers, key=lambda i:
        i.stale_for())``, its ``name``).

        0 while every informer has a watch open (a quiet cluster too: an open watch is current). It
        grows while one cannot LIST or WATCH (the API server down or refusing, the network cut): an
        informer keeps serving its last store, and ``synced`` stays set, so a pass would plan from
        it with nothing else saying so. Between a watch's end and the next, and while a LIST after a
        ``410`` is read, it is briefly above 0 (a LIST of a big cluster: its seconds); failures in a
        row are retried after up to 30 s, so a value past a minute or two means the informer has not
        heard from the API server for that long. Monotonic seconds; cheap and safe from any thread
        (no request, no lock); meaningful between :meth:`start` and :meth:`stop`. Exported per
        resource as ``vnpu_operator_informer_stale_seconds``."""
        return stalest(self.informers)

    def snapshot(self) -> tuple[list[ObservedModel], list[ObservedNode], list[ObservedPod]]:
        models = [m for informer in self.models for m in informer.snapshot()]
        return models, self.nodes.snapshot(), self.pods.snapshot()

    def services_snapshot(self) -> list[ObservedService]:
        return [s for informer in self.services for s in informer.snapshot()]

    def budgets_snapshot(self) -> list[ObservedBudget]:
        return [b for informer in self.budgets for b in informer.snapshot()]
