"""Watch-fed caches of the objects a pass reads (client-go's informers, in a thread each).

A reconcile pass reads the cluster from these stores, not from the API server: the load a pass puts on
the server is its writes, which grow with what changed, never with the size of the cluster. Each
informer LISTs once, then WATCHes from the list's resourceVersion (with bookmarks); when the watch
ends it resumes from the last version seen, and on ``410 Gone`` or any error it LISTs again and
replaces its store, so an object deleted while no watch was open is noticed too. A LIST is read in
pages (:func:`list_pages`), so what a relist holds at once is one page, not every pod of the cluster
(unless its pages expire twice: then it is read whole, once).

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
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from vnpu import api
from vnpu.kubeclient import LIST_TIMEOUT, watch_timeout
from vnpu.operator import metrics
from vnpu.operator.kube import MANAGED_SELECTOR
from vnpu.operator.state import (
    ObservedBudget,
    ObservedModel,
    ObservedNode,
    ObservedPod,
    ObservedService,
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
#: Pause before listing again after an error, so a broken API server is not hammered.
RETRY_SECONDS = 2.0
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
    resp = list_call(_preload_content=False, _request_timeout=LIST_TIMEOUT, **more)
    metrics.API_REQUESTS.labels("list", name).inc()
    page: dict[str, Any] = json.loads(resp.data)
    return page


class Informer(Generic[T]):
    """One resource's store, kept current by LIST + WATCH in a daemon thread.

    ``parse`` turns a raw object into ``(key, value)``, or None for objects the store does not keep.
    ``fingerprint`` is what about a value must change to call ``on_change`` (default: the value).
    """

    def __init__(
        self,
        name: str,
        list_call: Callable[..., Any],
        parse: Callable[[Mapping[str, Any]], tuple[str, T] | None],
        on_change: Callable[[str], None],
        fingerprint: Callable[[T], Hashable] | None = None,
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

    def start(self) -> None:
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

    def snapshot(self) -> list[T]:
        with self._lock:
            return list(self._store.values())

    def get(self, key: str) -> T | None:
        with self._lock:
            return self._store.get(key)

    # -- the loop ------------------------------------------------------------------------------------
    def _run(self) -> None:
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._relist()
                version = self._watch(version)
            except ApiException as exc:
                if exc.status == 410:  # our resourceVersion is too old: start over from a list
                    log.info("%s watch expired; listing again", self.name)
                else:
                    log.warning("%s informer: %s %s; listing again", self.name, exc.status, exc.reason)
                    self._stop.wait(RETRY_SECONDS)
                version = None
            except Exception:
                if self._stop.is_set():
                    return
                log.warning("%s informer failed; listing again", self.name, exc_info=True)
                self._stop.wait(RETRY_SECONDS)
                version = None

    def _relist(self) -> str:
        parsed, version = list_pages(self._list, self._parse_or_keep, self.name, self._stop)
        fresh: dict[str, T] = dict(parsed)
        with self._lock:
            old, self._store = self._store, fresh
        changed = [k for k in old.keys() | fresh.keys() if self._changed(old.get(k), fresh.get(k))]
        self.synced.set()
        for key in changed:
            self._on_change(key)
        return version

    def _watch(self, version: str) -> str:
        resp = self._list(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=watch_timeout(WATCH_SECONDS),
        )
        metrics.API_REQUESTS.labels("watch", self.name).inc()
        self._resp = resp
        try:
            if self._stop.is_set():  # stopped before the response was ours to shut down
                return version
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
                version = obj.get("metadata", {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                self._apply(kind, obj)
        finally:
            self._resp = None
            resp.close()
            resp.release_conn()
        return version

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
            labels = meta.get("labels") or {}
            ours = labels.get(api.LABEL_MANAGED_BY) == api.MANAGED_BY_VALUE and (
                not served or meta.get("namespace") in served
            )
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

    def start(self) -> None:
        for informer in self.informers:
            informer.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop every informer and wait up to ``timeout`` seconds for their threads to end (a list
        still in flight ends at its own request timeout); whether they all did."""
        for informer in self.informers:
            informer.stop()
        deadline = time.monotonic() + timeout
        return all(i.join(max(0.0, deadline - time.monotonic())) for i in self.informers)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(i.synced.wait(max(0.0, deadline - time.monotonic())) for i in self.informers)

    def snapshot(self) -> tuple[list[ObservedModel], list[ObservedNode], list[ObservedPod]]:
        models = [m for informer in self.models for m in informer.snapshot()]
        return models, self.nodes.snapshot(), self.pods.snapshot()

    def services_snapshot(self) -> list[ObservedService]:
        return [s for informer in self.services for s in informer.snapshot()]

    def budgets_snapshot(self) -> list[ObservedBudget]:
        return [b for informer in self.budgets for b in informer.snapshot()]
