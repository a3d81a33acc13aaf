"""The gateway's HTTP server in-process: a route table the test sets (no API server) and replicas that are
small aiohttp apps on loopback, so what the gateway holds, forwards and answers is asserted exactly.

The end-to-end behaviour against a real API server is ``tests/integration/test_gateway.py``'s.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from vnpu import jsonbody, sse
from vnpu.gateway.activity import WakeError
from vnpu.gateway.discovery import Discovery
from vnpu.gateway.keys import KeyRing
from vnpu.gateway.routing import Endpoint, ModelKey, Route, RouteTable
from vnpu.gateway.server import MAX_METRICS_BYTES, Gateway, GatewayConfig, make_app
from vnpu.jsonbody import MAX_BODY_BYTES

KEY = ModelKey("team-a", "chat")


class StaticDiscovery(Discovery):
    """The route table as the test sets it."""

    def __init__(self, *routes: Route) -> None:
        super().__init__(api_client=None)
        self.table = RouteTable({r.key: r for r in routes})
        for synced in self.synced.values():
            synced.set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def stop(self) -> None:
        pass

    def set(self, *routes: Route) -> None:
        """Replace the routes (on the loop) and wake the requests waiting for a replica."""
        self.table = RouteTable({r.key: r for r in routes})
        self._pulse()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Replica:
    """A replica on loopback: remembers the raw bodies it received, answers with ``handler``."""

    def __init__(self, name: str, handler: Handler | None = None) -> None:
        self.name = name
        self.bodies: list[bytes] = []
        self.handler = handler
        app = web.Application(client_max_size=4 * MAX_BODY_BYTES)  # takes what the gateway sends
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        self.server = TestServer(app)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.read())
        if self.handler is not None:
            return await self.handler(request)
        return web.json_response({"answered_by": self.name})

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.server.port or 0, f"pod-{self.name}")


def ready(*replicas: Replica, model_name: str = "smollm2") -> Route:
    return Route(KEY, model_name, len(replicas), 1, tuple(r.endpoint for r in replicas))


AT_ZERO = Route(KEY, "smollm2", 0, 0)


@asynccontextmanager
async def serving(gw: Gateway, *replicas: Replica) -> AsyncIterator[TestClient]:
    """The gateway's app as ``vnpu gateway`` runs it (handler cancellation on, as TestServer's), the
    replicas started first (routes name their ports: set them inside)."""
    for replica in replicas:
        await replica.server.start_server()
    try:
        async with TestClient(TestServer(make_app(gw))) as client:
            yield client
    finally:
        for replica in replicas:
            await replica.server.close()


@asynccontextmanager
async def stoppable(gw: Gateway, drain_s: float) -> AsyncIterator[tuple[web.AppRunner, str]]:
    """The gateway's app with a drain of ``drain_s`` on a loopback port, for a test that stops it
    (``runner.cleanup()``, what SIGTERM comes to in ``vnpu gateway``); yields the runner and the
    completions URL."""
    from vnpu.cluster.controlplane import free_port

    runner = web.AppRunner(make_app(gw, drain_s=drain_s), shutdown_timeout=drain_s)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield runner, f"http://127.0.0.1:{port}/v1/completions"


async def until(condition: Callable[[], Any], within_s: float = 60.0) -> None:
    for _ in range(int(within_s * 100)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def gateway(discovery: Discovery, **config: Any) -> Gateway:
    return Gateway(discovery=discovery, keys=KeyRing(None), config=GatewayConfig(**config))


# --- memory: bodies and waiters ---------------------------------------------------------------------


def test_a_request_waiting_for_a_wake_holds_its_bytes_not_its_parsed_body(monkeypatch) -> None:
    """The parsed body is tens of times its bytes in Python objects (16 MiB of ``[{},...]`` made
    ~380 MiB): a request held while its model wakes (minutes) must not keep it."""
    parsed: list[weakref.ref[dict[str, Any]]] = []
    parse = jsonbody.parse_json

    class Body(dict):  # type: ignore[type-arg]  # a dict that can be weakly referenced
        pass

    def tracked(data: bytes) -> Any:
        body = Body(parse(data))
        parsed.append(weakref.ref(body))
        return body

    monkeypatch.setattr(jsonbody, "parse_json", tracked)
    woken: list[tuple[str, str]] = []
    discovery = StaticDiscovery(AT_ZERO)
    gw = gateway(discovery, wake_timeout_s=60)
    gw.wake = lambda ns, name: woken.append((ns, name))
    replica = Replica("a")
    sent = json.dumps({"model": "smollm2", "prompt": "hi", "metadata": {"k": ["v"] * 1000}}).encode()

    async def scenario() -> None:
        async with serving(gw, replica) as client:
            answer = asyncio.ensure_future(
                client.post("/v1/completions", data=sent, headers={"Content-Type": "application/json"})
            )
            await until(lambda: gw.waiting == 1)
            gc.collect()
            assert len(parsed) == 1 and parsed[0]() is None, "the waiting request keeps its parsed body"
            discovery.set(ready(replica))
            response = await answer
            assert response.status == 200 and await response.json() == {"answered_by": "a"}

    asyncio.run(scenario())
    assert woken == [("team-a", "chat")]
    assert replica.bodies == [sent]  # forwarded byte for byte
    assert gw.waiting == 0


def test_past_max_waiting_a_request_gets_a_503_with_retry_after_at_once() -> None:
    woken: list[tuple[str, str]] = []
    discovery = StaticDiscovery(AT_ZERO)
    gw = gateway(discovery, wake_timeout_s=60, max_waiting=1)
    gw.wake = lambda ns, name: woken.append((ns, name))
    replica = Replica("a")
    body = {"model": "team-a/smollm2", "prompt": "hi"}

    async def scenario() -> None:
        async with serving(gw, replica) as client:
            first = asyncio.ensure_future(client.post("/v1/completions", json=body))
            await until(lambda: gw.waiting == 1)
            refused = await client.post("/v1/completions", json=body)
            assert refused.status == 503 and refused.headers["Retry-After"] == "5"
            error = (await refused.json())["error"]
            # The runtime's 503 shape (type server_error, code service_unavailable): a client branches on one.
            assert (error["type"], error["code"]) == ("server_error", "service_unavailable")
            assert "--max-waiting" in error["message"]
            discovery.set(ready(replica))
            assert (await first).status == 200

    asyncio.run(scenario())
    assert len(replica.bodies) == 1 and gw.waiting == 0
    assert set(woken) == {("team-a", "chat")}  # (the refused request asks for the wake too)


def test_a_model_that_never_gets_ready_holds_only_its_own_waiting_slots() -> None:
    """64 requests for one never-ready model held every --max-waiting slot for --wake-timeout, so every
    other tenant's waking model got 503s. Now one model holds at most --max-waiting-per-model."""
    woken: list[tuple[str, str]] = []
    broken = Route(ModelKey("mallory", "m"), "never-ready", 1, 1)  # crash-looping: never a ready replica
    discovery = StaticDiscovery(broken, AT_ZERO)
    gw = gateway(discovery, wake_timeout_s=60)
    gw.wake = lambda ns, name: woken.append((ns, name))
    replica = Replica("a")
    cap = gw.config.max_waiting_per_model
    assert cap < gw.config.max_waiting

    async def scenario() -> None:
        async with serving(gw, replica) as client:
            body = {"model": "never-ready", "prompt": "x"}
            sent = [
                asyncio.ensure_future(client.post("/v1/completions", json=body))
                for _ in range(gw.config.max_waiting)
            ]
            await until(lambda: sum(r.done() for r in sent) == gw.config.max_waiting - cap)
            assert gw.waiting == cap
            refused = [r.result() for r in sent if r.done()]
            for response in refused:
                assert response.status == 503 and response.headers["Retry-After"] == "5"
                assert "--max-waiting-per-model" in (await response.json())["error"]["message"]
            # Another tenant's model at zero is still woken, and its request held until it is ready.
            waking = asyncio.ensure_future(
                client.post("/v1/completions", json={"model": "smollm2", "prompt": "hi"})
            )
            await until(lambda: gw.waiting == cap + 1)
            discovery.set(broken, ready(replica))
            assert (await waking).status == 200
            for request in sent:
                request.cancel()
            await asyncio.gather(*sent, return_exceptions=True)
            await until(lambda: gw.waiting == 0)

    asyncio.run(scenario())
    assert len(replica.bodies) == 1 and gw.waiting_by_model == {}
    assert woken == [("team-a", "chat")]


def test_a_tenant_whose_models_never_get_ready_holds_only_its_namespaces_waiting_slots() -> None:
    """With the per-model bound alone, a tenant with four never-ready models (4 x 16) held every
    --max-waiting slot, and every other tenant's waking model got 503s. Now one namespace's models
    hold at most --max-waiting-per-namespace, and another namespace still wakes."""
    woken: list[tuple[str, str]] = []
    broken = [Route(ModelKey("mallory", f"m{i}"), f"never-ready-{i}", 1, 1) for i in range(4)]
    discovery = StaticDiscovery(*broken, AT_ZERO)
    gw = gateway(discovery, wake_timeout_s=60)
    gw.wake = lambda ns, name: woken.append((ns, name))
    replica = Replica("a")
    per_model, per_namespace = gw.config.max_waiting_per_model, gw.config.max_waiting_per_namespace
    assert per_model < per_namespace < gw.config.max_waiting <= 4 * per_model

    async def scenario() -> None:
        async with serving(gw, replica) as client:
            sent = [
                asyncio.ensure_future(
                    client.post("/v1/completions", json={"model": r.model_name, "prompt": "x"})
                )
                for r in broken
                for _ in range(per_model)
            ]
            await until(lambda: sum(r.done() for r in sent) == len(sent) - per_namespace)
            assert gw.waiting == per_namespace and gw.waiting_by_namespace == {"mallory": per_namespace}
            for response in [r.result() for r in sent if r.done()]:
                assert response.status == 503 and response.headers["Retry-After"] == "5"
                assert "--max-waiting-per-namespace" in (await response.json())["error"]["message"]
            # Another tenant's model at zero is still woken, and its request held until it is ready.
            waking = asyncio.ensure_future(
                client.post("/v1/completions", json={"model": "smollm2", "prompt": "hi"})
            )
            await until(lambda: gw.waiting == per_namespace + 1)
            discovery.set(*broken, ready(replica))
            assert (await waking).status == 200
            for request in sent:
                request.cancel()
            await asyncio.gather(*sent, return_exceptions=True)
            await until(lambda: gw.waiting == 0)

    asyncio.run(scenario())
    assert woken == [("team-a", "chat")]
    assert gw.waiting_by_model == {} and gw.waiting_by_namespace == {}


def test_a_wake_that_fails_answers_the_requests_waiting_on_it_at_once_and_says_so(caplog) -> None:
    """A wake that failed (the API server unreachable) left its exception in a task nobody read ("Task
    exception was never retrieved") and every request waiting on it ran out --wake-timeout, told only
    that no replica became ready. Now the failure is one warning, the requests waiting on that wake are
    answered 503 at once saying the wake failed, and the next request asks for a new wake."""
    release = threading.Event()
    asked: list[tuple[str, str]] = []

    def wake(namespace: str, name: str) -> None:
        asked.append((namespace, name))
        release.wait(10)  # (the first wake fails once both requests wait on it)
        raise WakeError("the API server cannot be reached: Connection refused")

    gw = gateway(StaticDiscovery(AT_ZERO), wake_timeout_s=60)
    gw.wake = wake
    body = {"model": "smollm2", "prompt": "x"}

    async def scenario() -> None:
        async with serving(gw) as client:
            sent = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(2)]
            await until(lambda: gw.waiting == 2)
            release.set()
            answered = await asyncio.wait_for(asyncio.gather(*sent), timeout=10)
            again = await asyncio.wait_for(client.post("/v1/completions", json=body), timeout=10)
            for response in [*answered, again]:
                assert response.status == 503 and response.headers["Retry-After"] == "5"
                error = (await response.json())["error"]
                assert error["message"] == "waking team-a/smollm2 from zero failed; retry later"
            assert gw._waking == {}  # a wake that ended is not kept (one per model ever woken was)
            gc.collect()
            await asyncio.sleep(0)

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert asked == [("team-a", "chat")] * 2  # one wake for both, a new one for the retry
    assert gw.waiting == 0
    failed = [r for r in caplog.records if r.getMessage() == "cannot wake the model"]
    assert [(r.levelno, r.exc_info) for r in failed] == [(logging.WARNING, None)] * 2
    assert "cannot be reached" in failed[0].error
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [(r.name, r.getMessage()) for r in errors]


def test_the_gateway_refuses_a_body_over_the_runtimes_limit_and_forwards_nothing() -> None:
    replica = Replica("a")
    discovery = StaticDiscovery()
    gw = gateway(discovery)
    prompt = "x" * MAX_BODY_BYTES  # over the limit once in a body

    async def scenario() -> None:
        async with serving(gw, replica) as client:
            discovery.set(ready(replica))
            response = await client.post("/v1/completions", json={"model": "smollm2", "prompt": prompt})
            assert response.status == 413 and "X-Vnpu-Replica" not in response.headers
            error = (await response.json())["error"]
            assert error["type"] == "invalid_request_error"
            assert (
                error["message"]
                == f"The request body is larger than {MAX_BODY_BYTES} bytes, this gateway's limit."
            )

    asyncio.run(scenario())
    assert replica.bodies == []


# --- names --------------------------------------------------------------------------------------------


def test_a_namespace_named_like_a_models_prefix_never_receives_that_models_prompts(tmp_path) -> None:
    """team-a serves meta-llama/Llama-3.1-8B (a modelName with '/'); namespace meta-llama serves
    Llama-3.1-8B, whose qualified name is the same. Without keys the name is ambiguous (a 404); with keys
    scoped per namespace each tenant reaches its own model by it, and meta-llama's key never team-a's.
    The squatter never gets team-a's prompts."""
    hf = "meta-llama/Llama-3.1-8B"
    victim, squatter = Replica("victim"), Replica("squatter")
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        "keys:\n"
        "  - {name: a, key: team-a-secret, models: ['team-a/*']}\n"
        "  - {name: m, key: meta-llama-secret, models: ['meta-llama/*']}\n"
    )
    unscoped, scoped = StaticDiscovery(), StaticDiscovery()
    team_a, meta_llama = (
        {"Authorization": "Bearer team-a-secret"},
        {"Authorization": "Bearer meta-llama-secret"},
    )

    async def names(client: TestClient, headers: dict[str, str]) -> list[str]:
        return [m["id"] for m in (await (await client.get("/v1/models", headers=headers)).json())["data"]]

    async def ask(client: TestClient, model: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        answer = await client.post(
            "/v1/completions", json={"model": model, "prompt": "secret"}, headers=headers
        )
        return answer.status, await answer.json()

    async def scenario() -> None:
        gw = Gateway(discovery=scoped, keys=KeyRing(keys), config=GatewayConfig())
        async with (
            serving(gateway(unscoped), victim, squatter) as client,
            TestClient(TestServer(make_app(gw))) as keyed,
        ):
            routes = (
                Route(ModelKey("team-a", "llama"), hf, 1, 1, (victim.endpoint,)),
                Route(ModelKey("meta-llama", "x"), "Llama-3.1-8B", 1, 1, (squatter.endpoint,)),
            )
            unscoped.set(*routes)
            scoped.set(*routes)
            assert hf not in await names(client, {})
            status, error = await ask(client, hf, {})
            assert status == 404 and error["error"]["code"] == "model_not_found"
            assert await ask(client, f"team-a/{hf}", {}) == (200, {"answered_by": "victim"})
            assert await names(keyed, team_a) == [hf, f"team-a/{hf}"]
            assert await ask(keyed, hf, team_a) == (200, {"answered_by": "victim"})
            assert await names(keyed, meta_llama) == ["Llama-3.1-8B", hf]
            assert await ask(keyed, hf, meta_llama) == (200, {"answered_by": "squatter"})
            status, error = await ask(keyed, f"team-a/{hf}", meta_llama)
            assert status == 404 and error["error"]["code"] == "model_not_found"

    asyncio.run(scenario())
    assert [json.loads(b) for b in victim.bodies] == [{"model": hf, "prompt": "secret"}] * 2
    assert [json.loads(b) for b in squatter.bodies] == [{"model": "Llama-3.1-8B", "prompt": "secret"}]


def test_a_model_is_shown_by_any_name_that_resolves_for_the_caller_and_no_other(tmp_path) -> None:
    """GET /v1/models/{id}: the rest of the path (an id may hold '/'), resolved as a request's ``model``
    is: another tenant's model is the same 404 as one that does not exist."""
    hf = "meta-llama/Llama-3.1-8B"
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {name: a, key: team-a-secret, models: ['team-a/*']}\n")
    routes = (
        Route(ModelKey("team-a", "llama"), hf, 1, 1),
        Route(ModelKey("meta-llama", "x"), "Llama-3.1-8B", 1, 1),
    )
    unscoped, scoped = StaticDiscovery(*routes), StaticDiscovery(*routes)
    gw = Gateway(discovery=scoped, keys=KeyRing(keys), config=GatewayConfig())
    team_a = {"Authorization": "Bearer team-a-secret"}

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "vnpu"}

    async def shown(client: TestClient, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        response = await client.get(path, headers=headers)
        return response.status, await response.json()

    async def scenario() -> None:
        async with serving(gateway(unscoped)) as client, TestClient(TestServer(make_app(gw))) as keyed:
            for path in (f"/v1/models/{hf}", "/v1/models/meta-llama%2FLlama-3.1-8B"):
                assert await shown(keyed, path, team_a) == (200, card(hf))
            assert await shown(keyed, f"/v1/models/team-a/{hf}", team_a) == (200, card(f"team-a/{hf}"))
            for name in ("nothing", "Llama-3.1-8B"):  # another tenant's: the same 404 as none at all
                status, body = await shown(keyed, f"/v1/models/{name}", team_a)
                assert status == 404 and body["error"]["code"] == "model_not_found"
                assert (
                    body["error"]["message"]
                    == f"The model `{name}` does not exist or you do not have access to it."
                )
            assert (await shown(keyed, f"/v1/models/{hf}", {}))[0] == 401
            # Without keys the name both models answer to is ambiguous: a 404, as for a request.
            assert (await shown(client, f"/v1/models/{hf}", {}))[0] == 404
            assert (await shown(client, "/v1/models/Llama-3.1-8B", {}))[0] == 200

    asyncio.run(scenario())


def test_a_keys_file_that_turns_bad_or_goes_is_reported_once_per_change_and_the_last_good_keys_serve(
    tmp_path, monkeypatch, caplog
) -> None:
    """A keys file that turned bad (or a Secret deleted) was re-read, re-parsed and logged at ERROR on
    every request, a flood any client without a key could make. Now each change is read and reported
    once; the last good keys serve meanwhile, and a file made good again is read at its change."""
    from vnpu.gateway import keys as keys_module

    path = tmp_path / "keys.yaml"
    reads: list[str] = []
    load = keys_module.yaml.safe_load

    def counted(text: str) -> Any:
        reads.append(text)
        return load(text)

    def rewrite(text: str) -> None:
        """Replace the file, as a Secret's update does (a new inode: the change is seen at once)."""
        fresh = tmp_path / "keys.yaml.new"
        fresh.write_text(text)
        fresh.replace(path)

    rewrite("keys:\n  - {name: a, key: old-secret, models: ['*']}\n")
    monkeypatch.setattr(keys_module.yaml, "safe_load", counted)
    gw = Gateway(discovery=StaticDiscovery(), keys=KeyRing(path), config=GatewayConfig())

    async def statuses(client: TestClient, key: str, times: int = 3) -> list[int]:
        headers = {"Authorization": f"Bearer {key}"}
        return [(await client.get("/v1/models", headers=headers)).status for _ in range(times)]

    async def scenario() -> None:
        async with serving(gw) as client:
            assert await statuses(client, "old-secret") == [200] * 3
            rewrite("keys: [\n")  # bad YAML
            assert await statuses(client, "old-secret") == [200] * 3
            assert await statuses(client, "no-such-key") == [401] * 3
            path.unlink()
            assert await statuses(client, "old-secret") == [200] * 3
            rewrite("keys:\n  - {name: b, key: new-secret, models: ['*']}\n")
            assert await statuses(client, "new-secret") == [200] * 3
            assert await statuses(client, "old-secret") == [401] * 3

    with caplog.at_level(logging.ERROR, logger="vnpu.gateway.server"):
        asyncio.run(scenario())
    assert len(reads) == 3  # the first file, the bad one and the new one: once each
    reports = [r for r in caplog.records if r.getMessage().startswith("cannot reload the API keys file")]
    assert len(reports) == 2, [r.error for r in reports]
    assert "is not YAML" in reports[0].error and "No such file" in reports[1].error


# --- what is forwarded --------------------------------------------------------------------------------


def test_a_renamed_body_is_forwarded_as_utf8_not_ascii_escapes() -> None:
    """A body naming the gateway's qualified name is re-encoded with the replica's name: its text stays
    UTF-8 (ASCII escapes made CJK text three times its size, past the replica's limit)."""
    replica = Replica("a")
    discovery = StaticDiscovery()
    gw = gateway(discovery)
    prompt = "héllo 世界 🙂 " * 1000
    sent = json.dumps({"model": "team-a/smollm2", "prompt": prompt}, ensure_ascii=False).encode()
    lone = b'{"model": "team-a/smollm2", "prompt": "a \\ud800 b"}'

    async def scenario() -> None:
        async with serving(gw, replica) as client:
            discovery.set(ready(replica))
            for data in (sent, lone):
                response = await client.post(
                    "/v1/completions", data=data, headers={"Content-Type": "application/json"}
                )
                assert response.status == 200

    asyncio.run(scenario())
    renamed, escaped = replica.bodies
    expected = {"model": "smollm2", "prompt": prompt}
    assert json.loads(renamed) == expected
    assert len(renamed) == len(json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode())
    assert len(renamed) < len(sent)  # the shorter name, no padding: never larger than what came in
    # A lone surrogate has no UTF-8: it goes escaped, for the replica to refuse in its own words.
    assert json.loads(escaped) == {"model": "smollm2", "prompt": "a \ud800 b"}


def test_a_body_nested_as_deep_as_the_parser_takes_is_a_400_when_it_is_renamed(caplog) -> None:
    """A body nested just under the depth json.loads refuses was parsed, then its re-encoding for the
    rename (the encoder runs a few frames deeper) raised RecursionError: aiohttp's plain-text 500 and
    an ERROR traceback. Every depth around the parser's limit is now forwarded or a 400 in words. The
    depths are scanned, not fixed: where the window lies depends on the stack at the call."""
    replica = Replica("a")
    discovery = StaticDiscovery()
    gw = gateway(discovery)
    limit = sys.getrecursionlimit()
    statuses: dict[int, list[int]] = {}

    async def scenario() -> None:
        async with serving(gw, replica) as client:
            discovery.set(ready(replica))
            for depth in range(limit - 200, limit + 1):
                nested = "[" * depth + "]" * depth
                body = f'{{"model":"team-a/smollm2","prompt":"x","user":{nested}}}'
                response = await client.post(
                    "/v1/completions", data=body, headers={"Content-Type": "application/json"}
                )
                statuses.setdefault(response.status, []).append(depth)
                if response.status == 400:
                    error = (await response.json())["error"]
                    assert error["message"] == "The request body is not valid JSON: nested too deeply."

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert set(statuses) == {200, 400}, {status: (min(d), max(d)) for status, d in statuses.items()}
    assert max(statuses[200]) < min(statuses[400])
    assert not caplog.records, [(r.name, r.getMessage()) for r in caplog.records]


def test_large_bodies_are_parsed_one_at_a_time(monkeypatch) -> None:
    """json.loads holds the GIL: parses on several threads at once would take the loop's turns."""
    import threading

    parse = jsonbody.parse_json
    lock = threading.Lock()
    parsing, most = 0, 0
    partner = threading.Event()

    def tracked(data: bytes) -> Any:
        nonlocal parsing, most
        with lock:
            parsing += 1
            most = max(most, parsing)
            if parsing > 1:
                partner.set()
        partner.wait(0.5)  # a parse running beside this one would come in meanwhile
        with lock:
            parsing -= 1
        return parse(data)

    monkeypatch.setattr(jsonbody, "parse_json", tracked)
    replica = Replica("a")
    discovery = StaticDiscovery()
    gw = gateway(discovery)
    large = json.dumps({"model": "smollm2", "prompt": "x" * jsonbody.OFF_LOOP_BYTES}).encode()

    async def scenario() -> None:
        async with serving(gw, replica) as client:
            discovery.set(ready(replica))
            headers = {"Content-Type": "application/json"}
            responses = await asyncio.gather(
                *(client.post("/v1/completions", data=large, headers=headers) for _ in range(3))
            )
            assert [r.status for r in responses] == [200, 200, 200]

    asyncio.run(scenario())
    assert most == 1 and len(replica.bodies) == 3


# --- replicas that fail ---------------------------------------------------------------------------------


def test_a_refused_connection_is_retried_on_another_replica() -> None:
    from vnpu.cluster.controlplane import free_port

    dead = Endpoint("127.0.0.1", free_port(), "pod-dead")  # nothing listens there
    live = Replica("b")
    discovery = StaticDiscovery()
    gw = gateway(discovery)
    sent = json.dumps({"model": "smollm2", "prompt": "hi"}).encode()

    async def scenario() -> None:
        async with serving(gw, live) as client:
            discovery.set(Route(KEY, "smollm2", 2, 1, (dead, live.endpoint)))
            gw.kv_usage.update({dead: 0.0, live.endpoint: 0.9})  # the dead one is picked first
            response = await client.post(
                "/v1/completions", data=sent, headers={"Content-Type": "application/json"}
            )
            assert response.status == 200 and await response.json() == {"answered_by": "b"}
            assert response.headers["X-Vnpu-Replica"] == "pod-b"

    asyncio.run(scenario())
    assert live.bodies == [sent] and gw.metrics.retries._value.get() == 1


def test_a_replica_that_resets_is_retried_once_so_a_request_that_kills_replicas_reaches_two() -> None:
    """A reset before the status line is a stale pooled connection or a replica that crashed working on
    the request (the runtime's status comes when a non-streamed answer is done): retried once, on
    another replica, so a user meets no error when a replica dies, and a request that kills every
    replica it reaches is tried on two, never more."""

    async def crash(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()  # the process dies mid-generation
        raise ConnectionResetError

    first, second, healthy = Replica("a", crash), Replica("c", crash), Replica("b")
    discovery = StaticDiscovery()
    gw = gateway(discovery)

    async def scenario() -> None:
        async with serving(gw, first, second, healthy) as client:
            # One crashing replica: the request is replayed on the healthy one and answered.
            discovery.set(ready(first, healthy))
            gw.kv_usage.update({first.endpoint: 0.0, second.endpoint: 0.1, healthy.endpoint: 0.9})
            body = json.dumps({"model": "smollm2", "prompt": "hi"}).encode()
            response = await client.post(
                "/v1/completions", data=body, headers={"Content-Type": "application/json"}
            )
            assert response.status == 200 and await response.json() == {"answered_by": "b"}
            # Two crashing replicas picked first: both tried, then a 503; the third never sees it.
            discovery.set(ready(first, second, healthy))
            for stream in (False, True):
                body = json.dumps({"model": "smollm2", "prompt": "hi", "stream": stream}).encode()
                response = await client.post(
                    "/v1/completions", data=body, headers={"Content-Type": "application/json"}
                )
                assert response.status == 503
                error = (await response.json())["error"]
                assert (error["type"], error["code"]) == ("server_error", "service_unavailable")

    asyncio.run(scenario())
    assert (len(first.bodies), len(second.bodies), len(healthy.bodies)) == (3, 2, 1)
    assert gw.metrics.retries._value.get() == 5  # every attempt that met a reset: 1, then 2 and 2


def test_a_client_that_stops_reading_its_stream_is_cut_off_and_the_replicas_request_closed(caplog) -> None:
    """A client that sends a streamed request and never reads: once the buffers on the way were full,
    the gateway's write waited for it for good, holding the handler, its socket and buffers, the
    replica's ``outstanding`` count and the replica's request (generated to max_tokens for nobody). A
    write stalled for ``write_stall_s`` now closes the client's connection and the replica's request,
    counted 499, with one warning."""
    ended: list[bool] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b"data: " + b"x" * 16000 + b"\n\n")
        finally:
            ended.append(True)  # its write failed or its handler was cancelled: its client went

    async def small_send_buffer(request: web.Request, _: web.StreamResponse) -> None:
        # (the kernel grows a send buffer up to 4 MiB: pinned small, the gateway's write waits sooner)
        assert request.transport is not None
        request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    replica = Replica("a", endless)
    discovery = StaticDiscovery()
    gw = gateway(discovery, write_stall_s=0.5)
    app = make_app(gw)
    app.on_response_prepare.append(small_send_buffer)
    body = json.dumps({"model": "smollm2", "prompt": "x", "stream": True}).encode()

    async def scenario() -> None:
        await replica.server.start_server()
        try:
            async with TestClient(TestServer(app)) as client:
                discovery.set(ready(replica))
                reader = socket.socket()  # a client that sends its request and never reads
                reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                reader.connect(("127.0.0.1", client.port))
                head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                reader.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                try:
                    await until(lambda: gw.outstanding)
                    await until(lambda: ended and not gw.outstanding, within_s=10)
                finally:
                    reader.close()
        finally:
            await replica.server.close()

    with caplog.at_level(logging.WARNING, logger="vnpu.gateway.server"):
        asyncio.run(scenario())
    assert gw.metrics.requests.labels("team-a/smollm2", "499")._value.get() == 1
    stalls = [r for r in caplog.records if "stopped reading" in r.getMessage()]
    assert [r.levelno for r in stalls] == [logging.WARNING] and stalls[0].exc_info is None
    assert stalls[0].model == "team-a/smollm2" and stalls[0].stalled_s == 0.5


def test_a_replica_that_dies_mid_answer_ends_a_stream_with_an_error_event_and_cuts_off_other_answers(
    caplog,
) -> None:
    """A replica that died mid-answer raised out of the gateway's copy loop: an aiohttp ERROR traceback,
    no sample in the metrics, and a stream cut off with no ``error`` event and no ``[DONE]``, which the
    runtime's own streams promise. Now a stream ends as the runtime ends its own failures, any other
    answer is cut off (a short body with a clean end would look complete), the request is counted
    502 and a warning without traceback says which replica. The event cut in half is not passed on:
    the error event came right after its half, inside it, and the client could not parse either."""
    first = b'data: {"choices":[{"text":"a"}]}\n\n'
    half = b'data: {"choices":[{"te'

    async def dies(request: web.Request) -> web.StreamResponse:
        stream = json.loads(await request.read()).get("stream", False)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream" if stream else "application/json"}
        )
        if not stream:
            response.content_length = 1000
        await response.prepare(request)
        await response.write(first + half if stream else b'{"choices": [')
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.abort()  # the pod goes away mid-answer, mid-event
        await asyncio.sleep(1)
        return response

    replica = Replica("a", dies)
    discovery = StaticDiscovery()
    gw = gateway(discovery)

    async def scenario() -> None:
        async with serving(gw, replica) as client:
            discovery.set(ready(replica))
            streamed = await client.post(
                "/v1/completions", json={"model": "smollm2", "prompt": "x", "stream": True}
            )
            assert streamed.status == 200
            body = await streamed.read()  # ends cleanly
            assert body.startswith(first) and body.endswith(b"data: [DONE]\n\n"), body
            events = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e]
            assert len(events) == 3
            error = json.loads(events[1])["error"]
            assert error["type"] == "server_error" and error["code"] == "upstream_error"
            assert "team-a/smollm2" in error["message"]
            whole = await client.post("/v1/completions", json={"model": "smollm2", "prompt": "x"})
            with pytest.raises(aiohttp.ClientPayloadError):
                await whole.read()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert gw.metrics.requests.labels("team-a/smollm2", "502")._value.get() == 2
    assert not gw.outstanding
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [(r.name, r.getMessage()) for r in errors]
    broke = [r for r in caplog.records if r.getMessage() == "the replica's answer broke off"]
    assert [r.levelno for r in broke] == [logging.WARNING] * 2 and broke[0].exc_info is None
    assert broke[0].model == "team-a/smollm2" and "ClientPayloadError" in broke[0].error


# --- load ------------------------------------------------------------------------------------------------


class MetricsStub:
    """A replica whose /metrics is ``body``, or never ends (``body`` None), with or without a
    Content-Length; counts the bytes of body each connection got sent (all the kernel took)."""

    def __init__(self, body: bytes | None, content_length: int | None = None) -> None:
        self.body, self.content_length = body, content_length
        self.sent: list[int] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = Endpoint("127.0.0.1", self.sock.getsockname()[1], "pod-metrics")
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # the kernel holds little
                conn.recv(65536)
                length = self.content_length if self.body is None else len(self.body)
                framing = b"Connection: close" if length is None else b"Content-Length: %d" % length
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + framing + b"\r\n\r\n")
                sent, chunk = 0, b"# " + b"x" * 65533 + b"\n"
                try:
                    if self.body is not None:
                        conn.sendall(self.body)
                        sent = len(self.body)
                    else:
                        while True:
                            sent += conn.send(chunk)
                except OSError:
                    pass
                self.sent.append(sent)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("content_length", [None, 1 << 40], ids=["endless", "huge-content-length"])
def test_a_replica_whose_metrics_never_end_is_read_no_further_than_the_bound(content_length, caplog) -> None:
    """A tenant's own runtime image serving an endless /metrics made the shared gateway buffer it for the
    scrape's whole second (hundreds of MiB). Now the scrape stops at MAX_METRICS_BYTES, the replica's
    usage is unknown, and the gateway warns once, not every scrape."""
    endless, small = (
        MetricsStub(None, content_length),
        MetricsStub(b"vnpu_runtime_kv_cache_usage_ratio 0.25\n"),
    )
    gw = gateway(StaticDiscovery(Route(KEY, "smollm2", 2, 1, (endless.endpoint, small.endpoint))))
    gw.kv_usage[endless.endpoint] = 0.1

    async def scenario() -> None:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for _ in range(3):
                await gw.scrape_kv_usage_once(session)
        await until(lambda: len(endless.sent) == 3)

    with caplog.at_level(logging.WARNING, logger="vnpu.gateway.server"):
        asyncio.run(scenario())
    endless.close()
    small.close()
    assert gw.kv_usage == {small.endpoint: 0.25}
    # Past what the gateway read, only socket buffers: the whole second's read was 200-560 MiB.
    assert max(endless.sent) <= MAX_METRICS_BYTES + 4 * 2**20, endless.sent
    assert [r.getMessage() for r in caplog.records].count(
        "a replica's /metrics is too large to read; its KV-cache usage counts as unknown"
    ) == 1


def test_the_kv_usage_scrape_reads_replicas_at_once_so_a_hung_one_holds_back_no_other() -> None:
    """One replica at a time, each that never answered (a tenant's own image, a hung pod) held every
    other replica's usage back by its timeout: 100 of them, by 100 s. Now a pass reads them at once
    (bounded by MAX_CONCURRENT_SCRAPES): every request is in flight together, and a replica that
    answers has its usage while the hung ones have none."""
    in_flight, most = 0, 0
    hung = asyncio.Event()  # never set: these replicas never answer within the scrape's timeout

    def replica_app(usage: float | None) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            try:
                await asyncio.sleep(0.3)  # (so that requests in flight together are seen together)
                if usage is None:
                    await hung.wait()
                return web.Response(text=f"vnpu_runtime_kv_cache_usage_ratio {usage}\n")
            finally:
                in_flight -= 1

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app

    usages: list[float | None] = [None, None, None, None, 0.25, 0.5]
    servers = [TestServer(replica_app(u)) for u in usages]

    async def scenario() -> None:
        for server in servers:
            await server.start_server()
        endpoints = tuple(Endpoint("127.0.0.1", s.port or 0, f"pod-{i}") for i, s in enumerate(servers))
        gw = gateway(StaticDiscovery(Route(KEY, "smollm2", len(servers), 1, endpoints)))
        try:
            async with aiohttp.ClientSession() as session:
                await gw.scrape_kv_usage_once(session)
        finally:
            for server in servers:
                await server.close()
        assert most == len(servers)
        assert gw.kv_usage == {endpoints[4]: 0.25, endpoints[5]: 0.5}

    asyncio.run(scenario())


def test_a_deleted_models_metric_series_go_with_it() -> None:
    """Every model ever routed kept its request, wake and in-flight series until the gateway restarted,
    so a long-lived gateway's /metrics grew with model churn. A model's series now go when its route
    does; the others', and requests that named no model, stay."""
    from prometheus_client import generate_latest

    replica = Replica("a")
    other = Route(ModelKey("team-b", "gone"), "gone", 1, 1)
    discovery = StaticDiscovery(AT_ZERO, other)
    gw = gateway(discovery)

    async def scenario() -> None:
        async with serving(gw, replica) as client:
            discovery.set(ready(replica), replace(other, endpoints=(replica.endpoint,)))
            for model in ("smollm2", "gone", "nothing-by-this-name"):
                await client.post("/v1/completions", json={"model": model, "prompt": "x"})
            async with aiohttp.ClientSession() as session:
                await gw.scrape_kv_usage_once(session)
                assert 'model="team-b/gone"' in generate_latest(gw.metrics.registry).decode()
                discovery.set(ready(replica))
                await gw.scrape_kv_usage_once(session)

    asyncio.run(scenario())
    text = generate_latest(gw.metrics.registry).decode()
    assert "team-b/gone" not in text, text
    assert 'vnpu_gateway_requests_total{code="200",model="team-a/smollm2"} 1.0' in text
    assert 'vnpu_gateway_requests_total{code="404",model=""} 1.0' in text


def test_a_client_that_hangs_up_mid_stream_is_counted_and_the_replicas_request_ends() -> None:
    """aiohttp cancels the handler of a client that closes its connection (the gateway runs with
    handler_cancellation, as main() starts it): the replica's request was closed, but nothing counted
    the request, so a wave of clients giving up on a slow model left no trace in the metrics."""
    ended: list[bool] = []

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b'data: {"x": 1}\n\n')
                await asyncio.sleep(0.05)
        finally:
            ended.append(True)  # its client (the gateway) went

    replica = Replica("a", slow_stream)
    discovery = StaticDiscovery()
    gw = gateway(discovery)
    body = json.dumps({"model": "smollm2", "prompt": "x", "stream": True}).encode()

    async def scenario() -> None:
        await replica.server.start_server()
        try:
            async with TestClient(TestServer(make_app(gw), handler_cancellation=True)) as client:
                discovery.set(ready(replica))
                reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
                head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                assert b"200" in await reader.readline()
                await reader.readuntil(b"data: ")  # the stream is under way
                writer.close()  # the client gives up
                await until(lambda: ended and not gw.outstanding, within_s=10)
        finally:
            await replica.server.close()

    asyncio.run(scenario())
    assert gw.metrics.requests.labels("team-a/smollm2", "499")._value.get() == 1


def test_a_request_is_activity_until_its_answer_ends() -> None:
    """Counted when it arrived and not after, a long stream let its model look idle mid-answer: the
    gateway now tells the recorder when the answer ends."""
    release = asyncio.Event()
    events: list[str] = []

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await release.wait()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def record(namespace: str, name: str) -> Callable[[], None]:
        events.append(f"arrived {namespace}/{name}")
        return lambda: events.append("ended")

    live = Replica("b", slow_stream)
    discovery = StaticDiscovery()
    gw = gateway(discovery)
    gw.record = record
    sent = json.dumps({"model": "smollm2", "prompt": "hi", "stream": True}).encode()

    async def scenario() -> None:
        async with serving(gw, live) as client:
            discovery.set(ready(live))
            response = await client.post(
                "/v1/completions", data=sent, headers={"Content-Type": "application/json"}
            )
            assert await response.content.readline() == b"data: first\n"
            assert events == [f"arrived {KEY.namespace}/{KEY.name}"]  # mid-answer: not ended
            release.set()
            await response.read()
            await until(lambda: events[-1] == "ended", within_s=10)

    asyncio.run(scenario())
    assert events.count("ended") == 1


def test_a_stop_cuts_the_streams_still_running_when_the_drain_runs_out_not_a_drain_later() -> None:
    """aiohttp's shutdown_timeout alone took two of them for a stream still running (it first cancels
    only the request's body): past the pod's grace period, the kubelet's SIGKILL then lost the activity
    counts the gateway writes as it exits."""
    drain_s = 3.0

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while True:
            await response.write(b"data: more\n\n")
            await asyncio.sleep(0.05)

    live = Replica("b", endless)
    discovery = StaticDiscovery()
    gw = gateway(discovery)
    sent = json.dumps({"model": "smollm2", "prompt": "hi", "stream": True}).encode()

    async def scenario() -> float:
        await live.server.start_server()
        discovery.set(ready(live))
        headers = {"Content-Type": "application/json"}
        async with (
            stoppable(gw, drain_s) as (runner, url),
            aiohttp.ClientSession() as session,
            session.post(url, data=sent, headers=headers) as resp,
        ):
            assert await resp.content.readline() == b"data: more\n"
            began = asyncio.get_running_loop().time()
            await runner.cleanup()
            took = asyncio.get_running_loop().time() - began
        await live.server.close()
        return took

    took = asyncio.run(scenario())
    assert drain_s <= took < drain_s + 2.5, took  # (aiohttp alone: two drains, 6 s; room for a loaded loop)


def test_a_stream_still_running_when_the_drain_runs_out_ends_with_an_error_event_after_whole_events() -> None:
    """It just stopped, which a client library reads as an answer that ended normally (the OpenAI
    SDK's stream simply ends): now it ends as the runtime ends its own at its drain's end, an
    ``error`` event and ``[DONE]``, after the last whole event (never inside one half sent)."""
    whole = b'data: {"choices":[{"text":"a"}]}\n\n'

    async def stalls_mid_event(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(whole + whole[:10])  # the next token's event, half of it
        await asyncio.sleep(3600)
        return response

    live = Replica("b", stalls_mid_event)
    discovery = StaticDiscovery()
    gw = gateway(discovery)

    async def scenario() -> bytes:
        await live.server.start_server()
        discovery.set(ready(live))
        async with stoppable(gw, 1.0) as (runner, url), aiohttp.ClientSession() as session:
            body = {"model": "smollm2", "prompt": "hi", "stream": True}
            async with session.post(url, json=body) as resp:
                assert await resp.content.readuntil(b"\n\n") == whole
                stop = asyncio.ensure_future(runner.cleanup())
                received = whole + await resp.content.read()
                await stop
        await live.server.close()
        return received

    received = asyncio.run(scenario())
    events = [e.removeprefix(b"data: ") for e in received.split(b"\n\n") if e]
    assert received.startswith(whole) and received.endswith(sse.DONE), received
    assert len(events) == 3, events
    error = json.loads(events[1])["error"]
    assert error["code"] == "service_unavailable" and "team-a/smollm2" in error["message"]


def test_a_request_waiting_for_a_wake_when_the_gateway_stops_gets_a_503_to_retry_elsewhere() -> None:
    """It waited on (up to --wake-timeout, longer than the drain) and was cut off without an answer."""
    discovery = StaticDiscovery(AT_ZERO)
    gw = gateway(discovery, wake_timeout_s=120)
    gw.wake = lambda ns, name: None  # asked; no replica comes in time
    body = {"model": "team-a/smollm2", "prompt": "hi"}

    async def scenario() -> tuple[int, str, float]:
        async with stoppable(gw, 30.0) as (runner, url), aiohttp.ClientSession() as session:
            waiting = asyncio.ensure_future(session.post(url, json=body))
            await until(lambda: gw.waiting == 1)
            began = asyncio.get_running_loop().time()
            await runner.cleanup()
            took = asyncio.get_running_loop().time() - began
            answer = await waiting
            return answer.status, answer.headers.get("Retry-After", ""), took

    status, retry_after, took = asyncio.run(scenario())
    assert status == 503 and retry_after == "5"
    assert took < 10  # within a second or so of the stop, not at the drain's end (30 s)
