"""The OpenAI front door for every model: route by ``model``, pick a replica, stream the answer back.

``POST /v1/completions`` and ``POST /v1/chat/completions`` are forwarded to one ready replica of the
model the body names (see :mod:`.routing` for names and picking), byte for byte, streaming included:
chunks go out as they arrive, and a client that leaves cancels the upstream request (the replica then
frees the sequence), as does one that stops reading: a write that cannot go out within
``write_stall_s`` (:data:`vnpu.jsonbody.WRITE_STALL_S`) closes both connections. A connection that
cannot be made to the picked replica is retried once on another. A replica whose answer breaks off
once begun (its pod died) ends a stream as a replica ends its own failures, with an ``error`` event
and ``data: [DONE]``, and cuts off any other answer (counted 502). ``GET /v1/models`` lists what the
caller may call and ``GET /v1/models/{id}`` shows one of those. Errors are OpenAI error objects; an
unknown model (or one the caller's key may not call) is a 404 that names nothing else.

A model scaled to zero (``spec.scaling.minReplicas: 0`` and no replica) is woken through its scale
subresource and the request is held until a replica is ready, or answered 503 with ``Retry-After``
once ``--wake-timeout`` passes (Knative's activator does the same), or at once when the wake itself
fails (the API server refused it or cannot be reached: a warning in the log); past ``--max-waiting``
requests held at once, ``--max-waiting-per-namespace`` for one namespace's models or
``--max-waiting-per-model`` for one model (so a model, or a tenant's models, that never get ready
cannot turn away the others' wakes), a 503 with ``Retry-After`` at once. A held request keeps only its
body's bytes, not the parsed body (many times larger). Every request is counted towards the model's activity
(:mod:`.activity`), which the operator reads to scale idle models to zero.

The gateway keeps no state that matters between requests: run as many replicas as you need.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vnpu import sse
from vnpu.api import DRAIN_ERROR_SEND_S
from vnpu.gateway.activity import WakeError
from vnpu.gateway.discovery import Discovery
from vnpu.gateway.keys import ApiKey, KeyFileError, KeyRing
from vnpu.gateway.routing import Endpoint, ModelKey, Route, pick
from vnpu.jsonbody import (
    BODY_TIMEOUT_S,
    HANDLERS_KEY,
    MAX_BODY_BYTES,
    WRITE_STALL_S,
    BodyError,
    BodyTimeoutError,
    cancel_handlers,
    disconnected,
    quiet_answered_body_errors,
    read_json,
    shown,
    track_handler,
)
from vnpu.openai_error import SERVER_ERROR, SERVICE_UNAVAILABLE, error_body

log = logging.getLogger(__name__)

#: Most requests one gateway holds while their model wakes or starts (each holds its body, up to
#: MAX_BODY_BYTES, for up to --wake-timeout): past it a 503 with Retry-After, so a burst against a model
#: at zero cannot grow the gateway until it is OOM-killed with every tenant's streams.
MAX_WAITING = 64
#: Most of those held for one model: a model that never gets ready (crash-looping, a bad image) would
#: otherwise hold every slot for --wake-timeout, and every other tenant's waking model would get 503s.
MAX_WAITING_PER_MODEL = 16
#: Most of those held for one namespace's models: a tenant with several never-ready models would
#: otherwise hold every slot (4 x 16 = 64) and turn away the other tenants' wakes; at half, two
#: tenants must both misbehave to fill the gateway.
MAX_WAITING_PER_NAMESPACE = 32
#: Replicas whose /metrics one KV-usage scrape reads at once (each up to MAX_METRICS_BYTES for at most
#: a second), so replicas that never answer delay the others' by one timeout, not one each.
MAX_CONCURRENT_SCRAPES = 32
#: Most bytes of a replica's /metrics the KV-usage scrape reads. Ours is about 10 KB (measured: 9.9 KB
#: after requests of every outcome; its label sets are bounded), so this leaves ample room; a tenant's
#: own runtime image (spec.runtime.image) may answer without end, and the shared gateway (512Mi in the
#: chart) buffered one scrape of it whole: 721 MiB. Past it the replica's usage is unknown.
MAX_METRICS_BYTES = 256 * 1024
#: Headers never forwarded upstream: hop-by-hop ones, the caller's key (it is for the gateway), and the
#: body's framing and encoding (the body forwarded is the one aiohttp read: already decompressed).
_DROP_REQUEST_HEADERS = {
    "host",
    "authorization",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "content-length",
    "content-encoding",
}
_DROP_RESPONSE_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}


def openai_error(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> web.Response:
    return web.json_response(error_body(message, kind, code, param), status=status, headers=headers)


def unavailable(message: str, retry_after_s: int) -> web.Response:
    """A 503 in the runtime's shape (type ``server_error``, code ``service_unavailable``)."""
    return openai_error(
        503, message, SERVER_ERROR, SERVICE_UNAVAILABLE, headers={"Retry-After": str(retry_after_s)}
    )


def not_found(model: str) -> web.Response:
    return openai_error(
        404,
        f"The model `{shown(model)}` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    )


class _RouteCollector(Collector):
    """Ready endpoints per model, read from the route table at scrape time."""

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "vnpu_gateway_ready_endpoints", "Ready replicas the gateway routes to, by model", labels=["model"]
        )
        for route in self.discovery.table.routes.values():
            family.add_metric([route.qualified_name], len(route.endpoints))
        yield family


class GatewayMetrics:
    def __init__(self, discovery: Discovery | None = None) -> None:
        r = self.registry = CollectorRegistry()
        if discovery is not None:
            r.register(_RouteCollector(discovery))
        self.requests = Counter(
            "vnpu_gateway_requests", "Requests by model and outcome", ["model", "code"], registry=r
        )
        self.outstanding = Gauge(
            "vnpu_gateway_outstanding", "Requests in flight by model", ["model"], registry=r
        )
        self.retries = Counter(
            "vnpu_gateway_retries", "Connect failures retried on another replica", registry=r
        )
        self.wakes = Counter("vnpu_gateway_wakes", "Scale-from-zero requests sent", ["model"], registry=r)
        self.warm_requests = Counter(
            "vnpu_gateway_warm_requests",
            "Requests answered by a serving weight-holder while the model had no ready replica",
            ["model"],
            registry=r,
        )
        self.wake_seconds = Histogram(
            "vnpu_gateway_wake_seconds",
            "Time a request waited for a model to wake",
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
        )

    def forget_models_except(self, models: set[str]) -> None:
        """Remove every series labelled with a model not in ``models`` (a deleted model's): they stayed
        until the gateway restarted, so a long-lived gateway's /metrics grew with every model ever
        created. Requests naming no model (label "") are kept."""
        labelled: list[tuple[Counter | Gauge, tuple[str, ...]]] = [
            (self.requests, ("model", "code")),
            (self.outstanding, ("model",)),
            (self.wakes, ("model",)),
            (self.warm_requests, ("model",)),
        ]
        for metric, names in labelled:
            gone = {
                tuple(sample.labels[name] for name in names)
                for family in metric.collect()
                for sample in family.samples
                if sample.labels.get("model") and sample.labels["model"] not in models
            }
            for labels in gone:
                metric.remove(*labels)


@dataclass
class GatewayConfig:
    wake_timeout_s: float = 120.0
    body_timeout_s: float = BODY_TIMEOUT_S
    connect_timeout_s: float = 5.0
    #: longest one write of an answer may wait for its client to read before the connection is closed
    write_stall_s: float = WRITE_STALL_S
    kv_scrape_interval_s: float = 2.0
    max_waiting: int = MAX_WAITING
    max_waiting_per_model: int = MAX_WAITING_PER_MODEL
    max_waiting_per_namespace: int = MAX_WAITING_PER_NAMESPACE


@dataclass
class Gateway:
    """Everything a request handler needs; one per process."""

    discovery: Discovery
    keys: KeyRing
    config: GatewayConfig = field(default_factory=GatewayConfig)
    #: scales a model (namespace, name) to at least one replica, raising WakeError when it cannot (runs on
    #: a thread); None disables waking
    wake: Callable[[str, str], None] | None = None
    #: counts one request to a model (namespace, name) for its activity record; returns what to call
    #: when its answer ends (a request is activity until then: a long stream keeps its model awake)
    record: Callable[[str, str], Callable[[], None] | None] | None = None
    metrics: GatewayMetrics = field(default=None)  # type: ignore[assignment]
    outstanding: dict[Endpoint, int] = field(default_factory=dict)
    kv_usage: dict[Endpoint, float] = field(default_factory=dict)
    turn: int = 0
    #: requests now waiting in endpoints_of for a replica (bounded by config.max_waiting)
    waiting: int = 0
    #: of those, by model (each bounded by config.max_waiting_per_model; absent: none)
    waiting_by_model: dict[ModelKey, int] = field(default_factory=dict)
    #: and by namespace (each bounded by config.max_waiting_per_namespace; absent: none)
    waiting_by_namespace: dict[str, int] = field(default_factory=dict)
    #: wakes under way, by (namespace, name): each task's result is why it failed, or None (a task that
    #: ends is dropped: every model ever woken kept one for the gateway's lifetime)
    _waking: dict[tuple[str, str], asyncio.Task[str | None]] = field(default_factory=dict)
    #: replicas whose /metrics was over MAX_METRICS_BYTES, already warned about
    _metrics_too_large: set[Endpoint] = field(default_factory=set)
    #: the models' names at the last KV-usage pass (their metric series are dropped once they go)
    _named: set[str] = field(default_factory=set)
    #: set at SIGTERM: /readyz answers 503, so that Kubernetes takes this gateway out of its Service,
    #: while it still takes connections for the shutdown delay (vnpu.api.SHUTDOWN_DELAY_S)
    leaving: bool = False
    #: set when the gateway stops: a request waiting for a replica is answered 503 (retry elsewhere)
    #: at once, not cut off with its connection when the drain runs out
    stopping: bool = False

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = GatewayMetrics(self.discovery)

    # -- access ---------------------------------------------------------------------------------------
    def caller(self, request: web.Request) -> ApiKey | web.Response | None:
        """The caller's key; None when keys are off; an error response when it may not call at all."""
        if not self.keys.enabled:
            return None
        try:
            self.keys.reload()
        except (OSError, KeyFileError) as exc:  # once per change of the file; the last good keys serve
            log.error(
                "cannot reload the API keys file; serving with the last good keys", extra={"error": str(exc)}
            )
        key = self.keys.authenticate(request.headers.get("Authorization"))
        if key is None:
            return openai_error(
                401,
                "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                "invalid_request_error",
                "invalid_api_key",
            )
        return key

    def visible(self, key: ApiKey | None) -> list[Route]:
        """The routes a caller may call: every one with keys off, else those its key's patterns match."""
        routes = list(self.discovery.table.routes.values())
        if key is None:
            return routes
        return [r for r in routes if key.allows(r)]

    # -- endpoints ------------------------------------------------------------------------------------
    async def endpoints_of(self, route: Route, warm: bool = True) -> tuple[Route, str | None]:
        """The route with somewhere to send the request, waking the model when it may; else the reason
        there is nowhere. With no ready replica, its serving weight-holders answer meanwhile (``warm``:
        unless they just failed), so a wake from warm weights costs no pod start."""
        if route.endpoints:
            return route, None
        if route.replicas == 0 and route.min_replicas > 0:
            return route, f"model {route.qualified_name} is scaled to 0 replicas and does not scale from zero"
        started = time.monotonic()
        wake = None
        if route.replicas == 0 and self.wake is not None:
            wake = self._start_wake(route)  # even for a request refused below: its retry finds it waking
        namespace = route.key.namespace
        refused = waiting_refused(
            self.waiting,
            self.waiting_by_model.get(route.key, 0),
            self.waiting_by_namespace.get(namespace, 0),
            self.config,
            route.qualified_name,
        )
        if refused is not None:
            return route, refused
        self.waiting += 1
        _count(self.waiting_by_model, route.key, +1)
        _count(self.waiting_by_namespace, namespace, +1)
        try:
            return await self._wait_for_endpoints(route, warm, started, wake)
        finally:
            self.waiting -= 1
            _count(self.waiting_by_model, route.key, -1)
            _count(self.waiting_by_namespace, namespace, -1)

    async def _wait_for_endpoints(
        self, route: Route, warm: bool, started: float, wake: asyncio.Task[str | None] | None
    ) -> tuple[Route, str | None]:
        """Wait for the route to have somewhere to send the request, until ``--wake-timeout`` or until
        ``wake``, the wake this request waits on, fails: a wake that failed answers at once."""
        deadline = started + self.config.wake_timeout_s
        while True:
            current = self.discovery.table.routes.get(route.key)
            if current is None:
                return route, "the model was deleted"
            if current.endpoints or (warm and current.targets):
                self.metrics.wake_seconds.observe(time.monotonic() - started)
                return current, None
            if self.stopping:
                return current, "this gateway replica is shutting down; retry"
            if wake is not None and wake.done() and wake.result() is not None:
                return current, f"waking {route.qualified_name} from zero failed; retry later"
            left = deadline - time.monotonic()
            if left <= 0:
                what = "waking from zero" if route.replicas == 0 else "starting"
                bound = f"{self.config.wake_timeout_s:.0f} s"
                return current, f"no replica of {route.qualified_name} became ready within {bound} ({what})"
            await self._next_change(wake, timeout=min(left, 1.0))

    async def _next_change(self, wake: asyncio.Task[str | None] | None, timeout: float) -> None:
        """Return once the route table changes, ``wake`` ends, or ``timeout`` passes."""
        changed = asyncio.ensure_future(self.discovery.changed.wait())
        waits: set[asyncio.Future[Any]] = {changed} if wake is None or wake.done() else {changed, wake}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()  # (asyncio.wait cancels nothing: the wake goes on for the other requests)

    def _start_wake(self, route: Route) -> asyncio.Task[str | None]:
        """The model's wake: the one under way, else a new one."""
        key = (route.key.namespace, route.key.name)
        task = self._waking.get(key)
        if task is not None and not task.done():
            return task
        self.metrics.wakes.labels(route.qualified_name).inc()
        log.info("waking a model scaled to zero", extra={"model": route.qualified_name})
        task = self._waking[key] = asyncio.ensure_future(self._wake(route))
        task.add_done_callback(lambda done: self._forget_wake(key, done))
        return task

    def _forget_wake(self, key: tuple[str, str], task: asyncio.Task[str | None]) -> None:
        """Drop a wake that ended (the requests waiting on it hold it), unless a newer one replaced it."""
        if self._waking.get(key) is task:
            del self._waking[key]

    async def _wake(self, route: Route) -> str | None:
        """Ask for the model's wake (on a thread: the API client blocks); why it failed, else None.

        A failure is logged once, here, and answers the requests waiting on it (503, see
        :meth:`_wait_for_endpoints`). It was an exception left in a task nobody read ("Task exception
        was never retrieved", at garbage collection), while every waiting request ran out
        --wake-timeout and was told only that no replica became ready."""
        wake = self.wake
        assert wake is not None
        try:
            await asyncio.to_thread(wake, route.key.namespace, route.key.name)
        except WakeError as exc:  # refused, or the API server cannot be reached: no traceback
            log.warning("cannot wake the model", extra={"model": route.qualified_name, "error": str(exc)})
            return str(exc)
        except Exception as exc:  # a bug: its traceback
            log.exception("cannot wake the model", extra={"model": route.qualified_name})
            return repr(exc)
        return None

    def _admit(self, caller: ApiKey | None, body: Any) -> _Admission:
        """What a parsed body decides: its route, whether its key may ask for its priority, and the body
        to forward. Runs where read_json parses (a worker thread for a large body)."""
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            return _Admission(None)
        # Resolved among the routes the caller may call, so another tenant's model can neither capture
        # nor shadow the name; the key is checked again on the route found, as a second line.
        route = self.discovery.table.resolve(model, self.visible(caller))
        if route is None or (caller is not None and not caller.allows(route)):
            return _Admission(model)
        if caller is not None:
            priority, limit = body.get("priority"), caller.priority_limit(route.priority)
            if isinstance(priority, int | float) and not isinstance(priority, bool) and priority > limit:
                return _Admission(model, route, priority_limit=limit)
        if model == route.model_name:
            return _Admission(model, route)
        # A replica knows only its own modelName: the namespace-qualified name is the gateway's. Text as
        # UTF-8 and no padding: ASCII escapes made a body of CJK text three times its size.
        body["model"] = route.model_name
        try:
            rewritten = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:  # a lone surrogate ("\ud800"): escaped, the replica refuses it itself
            rewritten = json.dumps(body, separators=(",", ":")).encode()
        except RecursionError as e:  # nesting json.loads just took: the encoder runs a few frames deeper
            raise BodyError("the request body is not valid JSON: nested too deeply") from e
        return _Admission(model, route, rewritten=rewritten)

    def choose(self, route: Route, exclude: set[Endpoint]) -> Endpoint | None:
        self.turn += 1
        return pick(route.targets, self.outstanding, self.kv_usage, turn=self.turn, exclude=exclude)

    # -- forwarding -----------------------------------------------------------------------------------
    async def forward(self, request: web.Request) -> web.StreamResponse:
        caller = self.caller(request)
        if isinstance(caller, web.Response):
            return caller
        try:
            # The parsed body never reaches this frame: it is tens of times its bytes in Python objects
            # and the request may wait minutes below (a wake, a generation). What it decides comes back.
            admission = await read_json(
                request, lambda body: self._admit(caller, body), timeout_s=self.config.body_timeout_s
            )
        except BodyError as e:
            message, status = str(e), 408 if isinstance(e, BodyTimeoutError) else 400
            return openai_error(status, f"{message[0].upper()}{message[1:]}.", "invalid_request_error")
        if admission.model is None:
            return openai_error(400, "You must provide a model parameter.", "invalid_request_error")
        route = admission.route
        if route is None:
            self.metrics.requests.labels("", "404").inc()
            return not_found(admission.model)
        if admission.priority_limit is not None:
            limit = admission.priority_limit
            self.metrics.requests.labels(route.qualified_name, "403").inc()
            return openai_error(
                403,
                f"This API key may not ask for a priority above {limit} for {route.qualified_name}.",
                "invalid_request_error",
                "priority_not_allowed",
                param="priority",
            )
        # The bytes read_json parsed (aiohttp keeps them) are forwarded as they are, unless renamed.
        raw = admission.rewritten if admission.rewritten is not None else await request.read()
        try:
            return await self._dispatch(request, route, raw)
        except asyncio.CancelledError:
            # aiohttp cancels the handler of a client that hung up (waiting for a replica to wake, or
            # mid-answer): counted, as a client that stops reading is. (At the gateway's own stop the
            # connection is still there: not the client's doing.)
            if disconnected(request):
                self.metrics.requests.labels(route.qualified_name, "499").inc()
            raise

    async def _dispatch(self, request: web.Request, route: Route, raw: bytes) -> web.StreamResponse:
        """Count the request for its model's activity, from its arrival to its answer's end."""
        finished = self.record(route.key.namespace, route.key.name) if self.record is not None else None
        try:
            return await self._answer(request, route, raw)
        finally:
            if finished is not None:
                finished()

    async def _answer(self, request: web.Request, route: Route, raw: bytes) -> web.StreamResponse:
        """Wake the model if it must, then forward to a replica (one retry on another)."""
        route, reason = await self.endpoints_of(route)
        if reason is not None:
            self.metrics.requests.labels(route.qualified_name, "503").inc()
            return unavailable(reason, retry_after_s=5)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST_HEADERS}
        tried: set[Endpoint] = set()
        for _attempt in range(2):  # a replica that gave no answer is retried once, on another
            endpoint = self.choose(route, tried)
            if endpoint is None and tried and not route.endpoints:
                # Only serving holders were there and they failed: wait for a replica instead.
                route, reason = await self.endpoints_of(route, warm=False)
                endpoint = self.choose(route, tried) if reason is None else None
            if endpoint is None:
                break
            tried.add(endpoint)
            try:
                response = await self._proxy(request, route, endpoint, raw, headers)
                if endpoint not in route.endpoints:
                    self.metrics.warm_requests.labels(route.qualified_name).inc()
                return response
            except _Unreachable as exc:
                log.warning(
                    "replica unreachable; trying another",
                    extra={"model": route.qualified_name, "endpoint": endpoint.url, "error": repr(exc)},
                )
                self.metrics.retries.inc()
                current = self.discovery.table.routes.get(route.key)
                route = current or route
        self.metrics.requests.labels(route.qualified_name, "503").inc()
        return unavailable(f"no replica of {route.qualified_name} could be reached", retry_after_s=1)

    async def _proxy(
        self, request: web.Request, route: Route, endpoint: Endpoint, raw: bytes, headers: dict[str, str]
    ) -> web.StreamResponse:
        session: aiohttp.ClientSession = request.app[SESSION_KEY]
        self.outstanding[endpoint] = self.outstanding.get(endpoint, 0) + 1
        gauge = self.metrics.outstanding.labels(route.qualified_name)
        gauge.inc()
        try:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s)
            try:
                upstream = await session.post(
                    f"{endpoint.url}{request.path}", data=raw, headers=headers, timeout=timeout
                )
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                # Nothing came back yet (refused, reset, a pooled connection to a replica that died):
                # the replica never answered, so another one may. A reset may also be a replica that
                # crashed working on it (a non-streamed answer's status line comes when it is done):
                # a completion has no side effect but its cost, and with one retry a request that
                # kills replicas kills at most two, where a 502 would fail every request that met a
                # stale pooled connection during a rollout.
                raise _Unreachable(exc) from exc
            async with upstream:
                response = web.StreamResponse(status=upstream.status)
                for name, value in upstream.headers.items():
                    if name.lower() not in _DROP_RESPONSE_HEADERS:
                        response.headers[name] = value
                response.headers["X-Vnpu-Replica"] = endpoint.pod or endpoint.address
                code = await self._relay(request, response, upstream, route, endpoint)
                self.metrics.requests.labels(route.qualified_name, code).inc()
                return response
        finally:
            self.outstanding[endpoint] -= 1
            if not self.outstanding[endpoint]:
                del self.outstanding[endpoint]
            gauge.dec()

    async def _relay(
        self,
        request: web.Request,
        response: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        route: Route,
        endpoint: Endpoint,
    ) -> str:
        """Send the replica's answer to the client, chunks as they come (server-sent events reach it
        token by token); the code the request is counted under.

        A client that stops reading (a write stalled for ``write_stall_s``) has its connection closed
        and the replica's request with it, so the replica frees the sequence: waiting for it would hold
        the handler, its socket and buffers and the replica's ``outstanding`` count for good. Counted
        "499" (nginx's client-closed-request): the answer never reached the client, through its fault.
        The replica's request is closed explicitly: releasing it would too, as its answer is unread,
        but that is the client library's choice, not a promise. A replica whose answer breaks off is
        :meth:`_end_broken_answer`'s, and a stream still running when the gateway's drain runs out gets
        an ``error`` event too (:meth:`_end_cut_stream`). Streams go out whole event by whole event
        (:class:`vnpu.sse.EventFramer`), so such an ending never lands inside a cut event."""
        stall_s = self.config.write_stall_s
        framer = sse.EventFramer() if upstream.content_type == "text/event-stream" else None
        try:
            async with asyncio.timeout(stall_s):
                await response.prepare(request)
            while True:
                try:
                    chunk = await upstream.content.readany()  # b"" at the end
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                    return await self._end_broken_answer(request, response, upstream, route, endpoint, exc)
                async with asyncio.timeout(stall_s):
                    if not chunk:
                        if framer is not None and framer.held:
                            await response.write(framer.held)  # an unended last event, as it came
                        await response.write_eof()
                        return str(upstream.status)
                    if framer is not None:
                        chunk = framer.feed(chunk)
                    if chunk:
                        await response.write(chunk)
        except asyncio.CancelledError:
            if self.stopping and framer is not None and response.prepared:
                await self._end_cut_stream(response, route)
            raise
        except TimeoutError:
            log.warning(
                "client stopped reading its answer: connection closed, request to the replica closed",
                extra={"model": route.qualified_name, "endpoint": endpoint.url, "stalled_s": stall_s},
            )
            upstream.close()
            if request.transport is not None:
                request.transport.abort()  # close() would wait for the unread bytes to go out
            return "499"

    async def _end_broken_answer(
        self,
        request: web.Request,
        response: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        route: Route,
        endpoint: Endpoint,
        error: aiohttp.ClientError,
    ) -> str:
        """End the client's answer when the replica's broke off (the pod died or was cut off mid-answer);
        counted "502". A stream gets what the runtime sends for its own failure mid-stream, an ``error``
        event and ``[DONE]``, so a client sees why it ended; any other answer has its connection
        aborted, since a short body with a clean end would look complete. The error went up as an
        aiohttp traceback, with no sample in the metrics and a stream cut off without a word."""
        log.warning(
            "the replica's answer broke off",
            extra={"model": route.qualified_name, "endpoint": endpoint.url, "error": repr(error)},
        )
        if upstream.content_type == "text/event-stream":
            message = f"The replica serving {route.qualified_name} failed mid-answer; retry the request."
            # (a stall: _relay cuts off)
            await _end_with_error(response, message, "upstream_error", self.config.write_stall_s)
        elif request.transport is not None:
            request.transport.abort()
        return "502"

    async def _end_cut_stream(self, response: web.StreamResponse, route: Route) -> None:
        """End a stream the gateway's drain cut off (its handler cancelled) with an ``error`` event and
        ``[DONE]``, as the runtime ends its own at the end of its drain, within ``DRAIN_ERROR_SEND_S``:
        a client that does not read is not waited for. The stream just stopped before, which a client
        library reads as an answer that ended normally."""
        message = f"This gateway replica shut down before {route.qualified_name} finished; retry the request."
        with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError, aiohttp.ClientError):
            await _end_with_error(response, message, SERVICE_UNAVAILABLE, DRAIN_ERROR_SEND_S)

    # -- load -------------------------------------------------------------------------------------------
    async def scrape_kv_usage(self, session: aiohttp.ClientSession) -> None:
        """Refresh each replica's KV-cache usage (the runtime's metric) for tie-breaking, for ever."""
        while True:
            await self.scrape_kv_usage_once(session)
            await asyncio.sleep(self.config.kv_scrape_interval_s)

    async def scrape_kv_usage_once(self, session: aiohttp.ClientSession) -> None:
        """One pass over the ready replicas (and the metric series of models gone since the last), up to
        MAX_CONCURRENT_SCRAPES at once: one at a time, each replica that never answers (a tenant's own
        image, a hung pod) held every other replica's usage back by its timeout. A replica that cannot
        be read, or whose /metrics is over MAX_METRICS_BYTES, has unknown usage (it counts as full in
        :func:`.routing.pick`)."""
        routes = self.discovery.table.routes.values()
        named = {r.qualified_name for r in routes}
        if self._named - named:
            self.metrics.forget_models_except(named)
        self._named = named
        endpoints = {e for r in routes for e in r.endpoints}
        for stale in set(self.kv_usage) - endpoints:
            del self.kv_usage[stale]
        self._metrics_too_large &= endpoints
        slots = asyncio.Semaphore(MAX_CONCURRENT_SCRAPES)

        async def scrape(endpoint: Endpoint) -> None:
            async with slots:
                text = await self._read_replica_metrics(session, endpoint)
            if text is None:
                self.kv_usage.pop(endpoint, None)
            elif (usage := kv_usage_of(text)) is not None:
                self.kv_usage[endpoint] = usage

        await asyncio.gather(*(scrape(e) for e in endpoints))

    async def _read_replica_metrics(self, session: aiohttp.ClientSession, endpoint: Endpoint) -> str | None:
        """The replica's /metrics text; None when it cannot be read (a too-large one warned once)."""
        try:
            return await read_metrics(session, endpoint)
        except (TimeoutError, aiohttp.ClientError):
            return None
        except MetricsTooLargeError as exc:
            if endpoint not in self._metrics_too_large:  # once: it would repeat every scrape
                self._metrics_too_large.add(endpoint)
                log.warning(
                    "a replica's /metrics is too large to read; its KV-cache usage counts as unknown",
                    extra={"endpoint": endpoint.url, "pod": endpoint.pod, "error": str(exc)},
                )
            return None


@dataclass(frozen=True)
class _Admission:
    """What the gateway takes from a request body; the parsed body itself is not kept."""

    model: str | None  #: the model asked for; None: the body names none
    route: Route | None = None  #: None: no such model, or the caller's key may not call it
    priority_limit: int | None = None  #: set when the body asks for more priority than the key allows
    rewritten: bytes | None = None  #: the body to forward when it is not the one received


class _Unreachable(Exception):
    """The picked replica gave no response at all (connect refused or timed out, connection reset
    before the status line): safe to try another, as Envoy's ``reset,connect-failure`` retry policy."""


class MetricsTooLargeError(Exception):
    """A replica's /metrics is larger than MAX_METRICS_BYTES (it was not read past it)."""


async def read_metrics(session: aiohttp.ClientSession, endpoint: Endpoint) -> str:
    """A replica's /metrics text, read no further than MAX_METRICS_BYTES: a Content-Length over it is
    refused unread, a body that runs past it is cut off (its connection closed, never pooled)."""
    timeout = aiohttp.ClientTimeout(total=1)
    async with session.get(f"{endpoint.url}/metrics", timeout=timeout) as resp:
        if resp.content_length is not None and resp.content_length > MAX_METRICS_BYTES:
            resp.close()
            raise MetricsTooLargeError(f"Content-Length {resp.content_length} > {MAX_METRICS_BYTES} bytes")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > MAX_METRICS_BYTES:
                resp.close()
                raise MetricsTooLargeError(f"more than {MAX_METRICS_BYTES} bytes")
    return body.decode("utf-8", "replace")


def waiting_refused(
    waiting: int, for_model: int, for_namespace: int, config: GatewayConfig, model: str
) -> str | None:
    """Why one more request for ``model`` may not wait for a replica (``waiting`` wait on the gateway,
    ``for_namespace`` of them for its namespace's models and ``for_model`` for it), naming the limit it
    met; None when it may."""
    if for_model >= config.max_waiting_per_model:
        return (
            f"{for_model} requests already wait for a replica of {model} on this gateway "
            f"(its limit per model, --max-waiting-per-model); retry later"
        )
    if for_namespace >= config.max_waiting_per_namespace:
        return (
            f"{for_namespace} requests already wait for replicas of this namespace's models on this "
            f"gateway (its limit per namespace, --max-waiting-per-namespace); retry {model} later"
        )
    if waiting >= config.max_waiting:
        return (
            f"{waiting} requests already wait for a replica on this gateway "
            f"(its limit, --max-waiting); retry {model} later"
        )
    return None


def _count(counts: dict[Any, int], key: object, delta: int) -> None:
    """Add ``delta`` to ``counts[key]``, dropping the key at zero (so the maps hold only what waits)."""
    n = counts.get(key, 0) + delta
    if n:
        counts[key] = n
    else:
        counts.pop(key, None)


def kv_usage_of(metrics_text: str) -> float | None:
    """The runtime's KV-cache usage ratio from its Prometheus text, if it exports one."""
    for line in metrics_text.splitlines():
        if line.startswith("vnpu_runtime_kv_cache_usage_ratio") and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                return float(line.rsplit(" ", 1)[1])
    return None


async def _end_with_error(response: web.StreamResponse, message: str, code: str, within_s: float) -> None:
    """End a stream as the runtime ends its own failures mid-stream: an ``error`` event, ``[DONE]``,
    the end; raises TimeoutError when the client does not take it within ``within_s``."""
    event = sse.event(error_body(message, SERVER_ERROR, code))
    async with asyncio.timeout(within_s):
        await response.write(event + sse.DONE)
        await response.write_eof()


GATEWAY_KEY = web.AppKey("gateway", Gateway)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "vnpu"}


async def models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    caller = gw.caller(request)
    if isinstance(caller, web.Response):
        return caller
    names = gw.discovery.table.listed(gw.visible(caller))
    return web.json_response({"object": "list", "data": [_model_card(n) for n in names]})


async def model(request: web.Request) -> web.Response:
    """One model by a name the caller may use (one that /v1/models lists for it); any other, the same
    404 as a model that does not exist."""
    gw = request.app[GATEWAY_KEY]
    caller = gw.caller(request)
    if isinstance(caller, web.Response):
        return caller
    name = request.match_info["model"]
    if gw.discovery.table.resolve(name, gw.visible(caller)) is None:
        return not_found(name)
    return web.json_response(_model_card(name))


async def completions(request: web.Request) -> web.StreamResponse:
    untrack = track_handler(request)
    try:
        return await request.app[GATEWAY_KEY].forward(request)
    finally:
        untrack()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    if gateway.leaving:
        return web.json_response({"status": "stopping"}, status=503)
    synced = all(e.is_set() for e in gateway.discovery.synced.values())
    return web.json_response({"status": "ready" if synced else "syncing"}, status=200 if synced else 503)


async def metrics(request: web.Request) -> web.Response:
    """The gateway's metrics. They name every model of every tenant, so with API keys on they need a key
    that may call every model (a tenant's key would learn what the others serve)."""
    gw = request.app[GATEWAY_KEY]
    caller = gw.caller(request)
    if isinstance(caller, web.Response):
        return caller
    if caller is not None and not caller.sees_every_model:
        return openai_error(
            403,
            "The metrics name every tenant's models: read them with a key whose models hold '*'.",
            "invalid_request_error",
            "insufficient_permissions",
        )
    body = generate_latest(gw.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def openai_errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """aiohttp's own refusals (a body over MAX_BODY_BYTES, an unknown path, a wrong method) as OpenAI
    error objects too, not text/plain: clients read every error of the gateway one way."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        message = f"The request body is larger than {MAX_BODY_BYTES} bytes, this gateway's limit."
        return openai_error(413, message, "invalid_request_error")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        message = f"{e.reason}: {request.method} {shown(request.path)}."
        return openai_error(e.status, message, "invalid_request_error", headers=headers)


def make_app(gateway: Gateway, drain_s: float | None = None) -> web.Application:
    """The gateway's app. With ``drain_s``, a stop gives the requests in flight that long, then cancels
    the handlers still running: left to aiohttp (``shutdown_timeout``), a stream still running took a
    second ``shutdown_timeout`` (aiohttp first cancels only the request's body), past the pod's grace
    period, and the kubelet's SIGKILL lost the activity counts the gateway writes as it exits."""
    quiet_answered_body_errors()
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[openai_errors])
    app[GATEWAY_KEY] = gateway
    app[HANDLERS_KEY] = set()

    if drain_s is not None:

        async def end_drain(app: web.Application) -> None:
            gateway.stopping = True  # requests waiting for a replica: a 503 within a second

            async def cancel_the_rest() -> None:
                await asyncio.sleep(drain_s)
                if cut := cancel_handlers(app):
                    log.warning(
                        "drain over: the requests still running are cut off",
                        extra={"requests": cut, "drain_s": drain_s},
                    )

            asyncio.get_running_loop().create_task(cancel_the_rest())

        app.on_shutdown.append(end_drain)

    async def lifecycle(app: web.Application) -> Any:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        app[SESSION_KEY] = session
        gateway.discovery.start(asyncio.get_running_loop())
        scraper = asyncio.ensure_future(gateway.scrape_kv_usage(session))
        yield
        scraper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scraper
        gateway.discovery.stop()
        await session.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)  # the rest of the path: a name may hold '/'
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
