"""The gateway's view of the cluster, kept by watching (never polling) the API server.

Two list+watch loops, each on a thread: InferenceModels (what clients may ask for: ``modelName``,
``replicas``, ``scaling.minReplicas``) and EndpointSlices carrying the ``vnpu.io/model`` label (the
operator's Service of each model has it, and the EndpointSlice controller copies a Service's labels to
its slices): only the controller's slices of the model's own Services count (:func:`parse_slice`).
Every change rebuilds the :class:`~vnpu.gateway.routing.RouteTable` and wakes whoever waits for a
model's first ready endpoint. A watch that ends or fails re-lists: nothing is missed.

No call waits for ever (:mod:`vnpu.kubeclient`): a list gets :data:`~vnpu.kubeclient.LIST_TIMEOUT`, a
watch its ``timeout_seconds`` plus a margin. On a half-open connection (the API server's node died, a
control-plane failover, a load balancer that drops packets) a watch without one blocked for good, and
the route table froze without a word in the log: it kept routing to replicas that were gone and never
saw new ones. Now such a watch, or list, fails after its timeout: one warning, and the loop lists again.

Parsing is pure (:func:`parse_model`, :func:`parse_slice`); the threads only feed it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from vnpu import api, kubeclient
from vnpu.gateway.routing import Endpoint, ModelKey, Route, RouteTable

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The port name of a replica's HTTP server (the operator's pods and Services use it).
PORT_NAME = "http"
#: Seconds a watch request stays open before the API server ends it (and the loop lists again).
WATCH_SECONDS = 300


@dataclass(frozen=True)
class ModelInfo:
    key: ModelKey
    model_name: str
    replicas: int
    min_replicas: int
    holder_serves: bool = False
    priority: int = api.DEFAULT_PRIORITY


@dataclass(frozen=True)
class SliceInfo:
    """One EndpointSlice of a model's Service: its ready endpoints, and whether it is the warm Service's
    (the share group's serving weight-holders, labelled ``vnpu.io/role: weights``)."""

    key: ModelKey
    endpoints: tuple[Endpoint, ...]
    warm: bool = False


def parse_model(obj: Mapping[str, Any]) -> ModelInfo | None:
    """An InferenceModel as the gateway needs it; None while it is being deleted."""
    meta, spec = obj.get("metadata", {}), obj.get("spec", {}) or {}
    if meta.get("deletionTimestamp"):
        return None
    scaling = spec.get("scaling", {}) or {}
    replicas = int(spec.get("replicas", 1))
    min_replicas = int(scaling.get("minReplicas", api.DEFAULT_MIN_REPLICAS))
    return ModelInfo(
        key=ModelKey(str(meta.get("namespace", "")), str(meta["name"])),
        model_name=str(spec.get("modelName") or meta["name"]),
        replicas=replicas,
        min_replicas=min_replicas,
        holder_serves=api.holder_serves(min_replicas, str(scaling.get("keepWarm", api.DEFAULT_KEEP_WARM))),
        priority=int(spec.get("priority", api.DEFAULT_PRIORITY)),
    )


def parse_slice(obj: Mapping[str, Any]) -> SliceInfo | None:
    """A model's EndpointSlice: its model and ready endpoints on the ``http`` port; None unless the
    EndpointSlice controller made it for the model's own Service or its warm one. The gateway passes
    every NetworkPolicy the operator writes: a slice someone wrote by hand (a grant of EndpointSlice
    writes, which the default roles do not give), or one of any Service labelled with a model, could
    otherwise point it at any address, another namespace's pods included. The controller's slices
    list only pods the Service's selector picks in its own namespace."""
    meta = obj.get("metadata", {})
    labels = meta.get("labels") or {}
    model = labels.get(api.LABEL_MODEL)
    if not model or labels.get(api.LABEL_SLICE_MANAGED_BY) != api.SLICE_CONTROLLER:
        return None
    service = labels.get(api.LABEL_SLICE_SERVICE)
    warm = service == api.warm_service_name(model)
    if not warm and service != api.service_name(model):
        return None
    key = ModelKey(str(meta.get("namespace", "")), model)
    ports = [p.get("port") for p in obj.get("ports") or [] if p.get("name") == PORT_NAME and p.get("port")]
    if not ports:
        return SliceInfo(key, (), warm)
    endpoints = []
    for e in obj.get("endpoints") or []:
        conditions = e.get("conditions") or {}
        # Unset "ready" means ready (the API's convention); a terminating endpoint takes no new work.
        if conditions.get("ready") is False or conditions.get("terminating") is True:
            continue
        pod = (e.get("targetRef") or {}).get("name", "")
        for address in e.get("addresses") or []:
            endpoints.append(Endpoint(str(address), int(ports[0]), pod))
    return SliceInfo(key, tuple(sorted(set(endpoints), key=str)), warm)


def _parse_or_keep(
    parse: Callable[[Mapping[str, Any]], T | None], obj: Mapping[str, Any], known: T | None
) -> T | None:
    """``parse(obj)``; when it raises (an object stored under an older, looser CRD schema is not
    validated again until it is written, or a bug), log it and keep ``known``, what was known of the
    object. One object must neither keep the gateway from syncing (a relist would fail the same way
    forever) nor drop a route that serves."""
    try:
        return parse(obj)
    except Exception:
        log.exception("cannot parse %s/%s; keeping what was known of it", *_object_name(obj))
        return known


def _object_name(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of any object, read without failing: the key its parsed form is kept under."""
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _why(exc: Exception) -> str:
    """Why a call failed, in short. urllib3's MaxRetryError (the calls that ran out of tries, timed-out
    ones among them) says its URL first, which can be long; its cause is what matters."""
    import urllib3

    cause = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason else exc
    return repr(cause)[:300]


class Discovery:
    """The route table, kept current by watches; ``changed`` fires (on the loop) after every change."""

    def __init__(
        self,
        api_client: Any,
        namespaces: tuple[str, ...] = (),
        *,
        watch_seconds: int = WATCH_SECONDS,
        list_timeout: tuple[float, float] = kubeclient.LIST_TIMEOUT,
        watch_timeout: tuple[float, float] | None = None,
    ) -> None:
        self.api_client = api_client
        self.namespaces = namespaces
        self.watch_seconds = watch_seconds
        #: (connect, read) seconds of a list, and of a watch (default: ``watch_seconds`` and a margin)
        self.list_timeout = list_timeout
        self.watch_timeout = watch_timeout or kubeclient.watch_timeout(watch_seconds)
        self.table = RouteTable()
        self._models: dict[ModelKey, ModelInfo] = {}
        self._slices: dict[tuple[str, str], SliceInfo] = {}  # (namespace, slice name)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.changed = asyncio.Event()
        self.synced = {"models": threading.Event(), "slices": threading.Event()}
        self._listed: dict[str, set[str | None]] = {"models": set(), "slices": set()}  # namespaces listed
        #: the watch each loop streams now, keyed by (what, namespace): stop() ends them
        self._watches: dict[tuple[str, str | None], Any] = {}

    # -- state --------------------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        endpoints: dict[tuple[ModelKey, bool], set[Endpoint]] = {}
        for s in self._slices.values():
            endpoints.setdefault((s.key, s.warm), set()).update(s.endpoints)

        def of(key: ModelKey, warm: bool) -> tuple[Endpoint, ...]:
            return tuple(sorted(endpoints.get((key, warm), ()), key=lambda e: (e.address, e.port)))

        routes = {
            key: Route(
                key,
                m.model_name,
                m.replicas,
                m.min_replicas,
                of(key, False),
                warm=of(key, True),
                holder_serves=m.holder_serves,
                priority=m.priority,
            )
            for key, m in self._models.items()
        }
        self.table = RouteTable(routes)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._pulse)

    def _pulse(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()  # waiters hold the old event; the next change sets a new one

    def apply_model(self, kind: str, obj: Mapping[str, Any]) -> None:
        key = ModelKey(*_object_name(obj))
        with self._lock:
            info = _parse_or_keep(parse_model, obj, self._models.get(key)) if kind != "DELETED" else None
            if info is None:
                self._models.pop(key, None)
            else:
                self._models[key] = info
            self._rebuild()

    def apply_slice(self, kind: str, obj: Mapping[str, Any]) -> None:
        name = _object_name(obj)
        with self._lock:
            parsed = _parse_or_keep(parse_slice, obj, self._slices.get(name)) if kind != "DELETED" else None
            if parsed is None:
                self._slices.pop(name, None)
            else:
                self._slices[name] = parsed
            self._rebuild()

    def replace_all(self, what: str, items: list[Mapping[str, Any]], namespace: str | None = None) -> None:
        """Replace what is known of ``what`` ("models" or "slices") with a fresh list: of ``namespace``
        when the gateway lists namespace by namespace, else of all. Whatever the list lacks went while
        no watch ran, and goes. ``synced[what]`` is set once every namespace has been listed: a gateway
        ready after its first namespace would answer 404 for the models of the others."""
        with self._lock:
            if what == "models":
                models = {
                    k: v
                    for k, v in self._models.items()
                    if namespace is not None and k.namespace != namespace
                }
                for obj in items:
                    key = ModelKey(*_object_name(obj))
                    if (info := _parse_or_keep(parse_model, obj, self._models.get(key))) is not None:
                        models[key] = info
                self._models = models
            else:
                slices = {
                    k: v for k, v in self._slices.items() if namespace is not None and k[0] != namespace
                }
                for obj in items:
                    name = _object_name(obj)
                    if (parsed := _parse_or_keep(parse_slice, obj, self._slices.get(name))) is not None:
                        slices[name] = parsed
                self._slices = slices
            self._rebuild()
            self._listed[what].add(namespace)
            synced = len(self._listed[what]) >= max(1, len(self.namespaces))
        if synced:
            self.synced[what].set()

    # -- watching ---------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        from kubernetes import client

        self._loop = loop
        custom = client.CustomObjectsApi(self.api_client)
        discovery = client.DiscoveryV1Api(self.api_client)
        selector = f"{api.LABEL_MODEL},{api.LABEL_SLICE_MANAGED_BY}={api.SLICE_CONTROLLER}"
        if self.namespaces:
            model_lists: list[tuple[str | None, Callable[..., Any]]] = [
                (
                    ns,
                    lambda ns=ns, **kw: custom.list_namespaced_custom_object(
                        api.GROUP, api.VERSION, ns, api.PLURAL, **kw
                    ),
                )
                for ns in self.namespaces
            ]
            slice_lists: list[tuple[str | None, Callable[..., Any]]] = [
                (
                    ns,
                    lambda ns=ns, **kw: discovery.list_namespaced_endpoint_slice(
                        ns, label_selector=selector, **kw
                    ),
                )
                for ns in self.namespaces
            ]
        else:
            model_lists = [
                (
                    None,
                    lambda **kw: custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL, **kw),
                )
            ]
            slice_lists = [
                (
                    None,
                    lambda **kw: discovery.list_endpoint_slice_for_all_namespaces(
                        label_selector=selector, **kw
                    ),
                )
            ]
        self._start_watch("models", model_lists, self.apply_model)
        self._start_watch("slices", slice_lists, self.apply_slice)

    def _start_watch(
        self, what: str, lists: list[tuple[str | None, Callable[..., Any]]], apply: Callable[[str, Any], None]
    ) -> None:
        """One thread per list (per namespace, or one for all), sharing the table."""
        for namespace, list_fn in lists:
            threading.Thread(
                target=self._watch,
                args=(what, namespace, list_fn, apply),
                daemon=True,
                name=f"gateway-watch-{what}-{namespace or 'all'}",
            ).start()

    def _watch(
        self, what: str, namespace: str | None, list_fn: Callable[..., Any], apply: Callable[[str, Any], None]
    ) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        backoff = 0.5
        while not self._stop.is_set():
            try:
                body = json.loads(list_fn(_preload_content=False, _request_timeout=self.list_timeout).data)
                items = body.get("items") or []
                self.replace_all(what, items, namespace)
                w = watch.Watch()
                # The loop's previous watch has ended: replaced, not kept (a list of every watch since
                # the start grew by one at every relist, every 5 minutes per loop).
                self._watches[(what, namespace)] = w
                for event in w.stream(
                    list_fn,
                    resource_version=body["metadata"]["resourceVersion"],
                    timeout_seconds=self.watch_seconds,
                    allow_watch_bookmarks=True,
                    _request_timeout=self.watch_timeout,
                ):
                    if self._stop.is_set():
                        return
                    kind = event["type"]  # (an ERROR event is raised by the client as an ApiException)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        apply(kind, event["raw_object"])
                backoff = 0.5
            except Exception as exc:  # the API server restarting, a call timed out: list and watch again
                if self._stop.is_set():
                    return
                if isinstance(exc, ApiException) and exc.status == 410:
                    # The version watched from was compacted away: routine, every few minutes.
                    log.info("watch expired; listing again", extra={"what": what})
                    continue
                log.warning("watch failed; listing again", extra={"what": what, "error": _why(exc)})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def stop(self) -> None:
        self._stop.set()
        for w in list(self._watches.values()):  # (a copy: the loops' threads may replace one meanwhile)
            w.stop()
