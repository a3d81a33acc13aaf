"""``vnpu gateway`` against the real API server: it finds models by watching InferenceModels and the
EndpointSlices this test creates (as the EndpointSlice controller would for the operator's Services),
routes by model name, picks the least-loaded replica, streams unbuffered, retries a dead replica,
wakes a model from zero through its scale subresource, enforces API keys and records activity.

Replicas are small aiohttp servers in this process (they say who answered and can hold a stream open
on command), bound in a network namespace the test creates and reached over a veth pair: the API
server refuses loopback addresses in EndpointSlices, as it should. The client is the official
``openai`` package.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from kubernetes import client
from slow_clients import probe

from vnpu import api
from vnpu.cluster.controlplane import free_port
from vnpu.cluster.nodens import _setns
from vnpu.cluster.processes import ManagedProcess, wait_until

pytestmark = pytest.mark.integration


class ReplicaNetwork:
    """A network namespace the test creates, joined to the host by a veth pair: the host side is
    10.252.<n>.1, the replicas' side 10.252.<n>.2."""

    def __init__(self) -> None:
        n = os.getpid() % 200 + 20
        self.name = f"vnpu-gw-{os.getpid()}"
        self.address = f"10.252.{n}.2"
        host, inner = f"vgw{n}h", f"vgw{n}n"
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        for cmd in (
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", host, "type", "veth", "peer", "name", inner],
            ["ip", "link", "set", inner, "netns", self.name],
            ["ip", "addr", "add", f"10.252.{n}.1/30", "dev", host],
            ["ip", "link", "set", host, "up"],
            ["ip", "-n", self.name, "addr", "add", f"{self.address}/30", "dev", inner],
            ["ip", "-n", self.name, "link", "set", inner, "up"],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
        ):
            subprocess.run(cmd, capture_output=True, text=True, check=True)
        self.ports = iter(range(18000, 19000))

    def enter_in_this_thread(self) -> None:
        """setns(2) for the calling thread only (servers started here bind inside the namespace)."""
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


@pytest.fixture(scope="module")
def replica_net() -> Iterator[ReplicaNetwork]:
    if os.geteuid() != 0:
        pytest.fail("the gateway's integration test creates a network namespace: run it as root (CI does)")
    net = ReplicaNetwork()
    yield net
    net.close()


class FakeReplica:
    """An OpenAI-ish replica in the replica network: answers with its name, streams three chunks (the
    second only once ``release`` is set), reports a KV usage, and remembers requests and cancellations."""

    def __init__(self, net: ReplicaNetwork, name: str, kv_usage: float | None = 0.0) -> None:
        self.net, self.name, self.kv_usage = net, name, kv_usage
        self.address, self.port = net.address, next(net.ports)
        self.requests: list[dict[str, Any]] = []
        self.cancelled = 0
        self.release = threading.Event()
        self.release.set()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        self.net.enter_in_this_thread()
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, handler_cancellation=True)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, self.address, self.port).start())
        self._ready.set()
        self._loop.run_forever()

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.kv_usage is None:  # a runtime that exports no KV usage
            return web.Response(text="vnpu_runtime_ready 1.0\n")
        return web.Response(text=f"vnpu_runtime_kv_cache_usage_ratio {self.kv_usage}\n")

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(
            {"path": request.path, "body": body, "auth": request.headers.get("Authorization")}
        )
        chat = request.path.endswith("chat/completions")
        if not body.get("stream"):
            text = f"answered by {self.name}"
            choice = {"index": 0, "finish_reason": "stop"}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return web.json_response(
                {
                    "id": "x",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i, piece in enumerate([f"{self.name}:", " one", " two"]):
                if i == 1:
                    while not self.release.is_set():
                        await asyncio.sleep(0.01)
                delta = {"delta": {"content": piece}} if chat else {"text": piece}
                chunk = {
                    "id": "x",
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": None, **delta}],
                }
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return response

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture
def replicas(replica_net: ReplicaNetwork) -> Iterator[dict[str, FakeReplica]]:
    usage = (("a1", 0.5), ("a2", 0.1), ("b1", None), ("c1", None))
    made = {name: FakeReplica(replica_net, name, kv) for name, kv in usage}
    yield made
    for r in made.values():
        r.close()


def model(namespace: str, name: str, model_name: str, replicas: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "modelName": model_name,
            "source": {"uri": "file:///m.gguf"},
            "weights": {"sizeMiB": 100},
            "replicas": replicas,
            "memory": {"kvCacheMiB": 64},
            **spec,
        },
    }


def endpoint_slice(
    namespace: str, model_name: str, replicas: list[Any], warm: bool = False
) -> dict[str, Any]:
    """What the EndpointSlice controller writes for a model's Service (``warm``: its warm Service, the
    share group's serving weight-holders): ready endpoints on port http (the replicas here listen on
    ports of their own, so each gets a slice of its own)."""
    assert len({r.port for r in replicas}) == 1
    service = api.warm_service_name(model_name) if warm else api.service_name(model_name)
    labels = {
        api.LABEL_MODEL: model_name,
        api.LABEL_SLICE_SERVICE: service,
        api.LABEL_SLICE_MANAGED_BY: api.SLICE_CONTROLLER,
    }
    if warm:
        labels[api.LABEL_ROLE] = api.ROLE_WEIGHTS
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{model_name}-{uuid.uuid4().hex[:5]}",
            "namespace": namespace,
            "labels": labels,
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": replicas[0].port if replicas else 1, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [r.address],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": r.name, "namespace": namespace},
            }
            for r in replicas
        ],
    }


class Gateway:
    def __init__(self, control_plane: Any, tmp: Path, *namespaces: str, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        argv = [
            sys.executable,
            "-m",
            "vnpu",
            "gateway",
            "--kubeconfig",
            str(control_plane.kubeconfig),
            "--port",
            str(self.port),
            "--log-format",
            "text",
            "--activity-flush",
            "1",
            *("--shutdown-delay-seconds", "0"),  # stops at once; the tests of the delay set theirs
            *extra,
        ]
        for ns in namespaces:
            argv += ["-n", ns]
        self.proc = ManagedProcess("gateway", argv, tmp / f"gateway-{self.port}.log")
        wait_until(self._ready, 60, "the gateway synced")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        if not self.proc.alive():
            raise RuntimeError(self.proc.tail(30))
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        self.proc.stop()


def apply(control_plane: Any, *objects: dict[str, Any]) -> None:
    control_plane.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
    )


def answered_by(completion: Any) -> str:
    return str(
        completion.choices[0].text
        if hasattr(completion.choices[0], "text")
        else completion.choices[0].message.content
    )


def test_routes_by_name_picks_the_least_loaded_streams_and_survives_a_dead_replica(
    control_plane, namespace, replicas, tmp_path
) -> None:
    a1, a2, b1 = replicas["a1"], replicas["a2"], replicas["b1"]
    apply(control_plane, model(namespace, "chat", "smollm2"), model(namespace, "coder", "qwen"))
    apply(
        control_plane,
        endpoint_slice(namespace, "chat", [a1]),
        endpoint_slice(namespace, "chat", [a2]),
        endpoint_slice(namespace, "coder", [b1]),
    )
    gw = Gateway(control_plane, tmp_path, namespace)
    try:
        oa = gw.client()
        assert sorted(m.id for m in oa.models.list()) == sorted(
            ["smollm2", "qwen", f"{namespace}/smollm2", f"{namespace}/qwen"]
        )

        def always_a2() -> bool:  # once KV usage is scraped, the idle replica with less in use wins
            return all(
                answered_by(oa.completions.create(model="smollm2", prompt="hi")) == "answered by a2"
                for _ in range(5)
            )

        wait_until(always_a2, 30, "KV usage known: the idle replica with less KV in use is picked")
        assert answered_by(oa.completions.create(model="qwen", prompt="hi")) == "answered by b1"
        chat = oa.chat.completions.create(
            model=f"{namespace}/qwen", messages=[{"role": "user", "content": "x"}]
        )
        assert chat.choices[0].message.content == "answered by b1"
        assert b1.requests[-1]["auth"] is None  # the caller's Authorization never reaches a replica

        # Streaming passes through unbuffered: the first chunk arrives while the replica holds the rest.
        a1.release.clear()
        a2.release.clear()
        stream = oa.completions.create(model="smollm2", prompt="hi", stream=True)
        first = next(iter(stream))
        holder = a1 if first.choices[0].text == f"{a1.name}:" else a2  # the first chunk names its replica
        assert first.choices[0].text == f"{holder.name}:"
        # While that request is outstanding, the next goes to the other replica (fewest outstanding).
        other = a2 if holder is a1 else a1
        other.release.set()
        assert answered_by(oa.completions.create(model="smollm2", prompt="hi")) == f"answered by {other.name}"
        holder.release.set()
        assert "".join(c.choices[0].text for c in stream) == " one two"

        # A client that leaves mid-stream cancels the upstream request.
        a1.release.clear()
        a2.release.clear()
        stream = oa.completions.create(model="smollm2", prompt="hi", stream=True)
        first = next(iter(stream))
        holder = a1 if first.choices[0].text == f"{a1.name}:" else a2
        stream.close()
        wait_until(lambda: holder.cancelled == 1, 30, "the replica's stream cancelled")
        a1.release.set()
        a2.release.set()

        # Unknown and ambiguous names: an OpenAI 404 that names nothing else.
        with pytest.raises(openai.NotFoundError) as err:
            oa.completions.create(model="llama", prompt="hi")
        assert err.value.body["code"] == "model_not_found" and "llama" in err.value.body["message"]
        assert "smollm2" not in err.value.body["message"]

        # A replica that died (its endpoint still listed for a moment): retried once on another, never seen.
        dead = FakeReplicaStub(replicas["c1"].address, next(replicas["c1"].net.ports))
        dead_slice = endpoint_slice(namespace, "coder", [dead])
        apply(control_plane, endpoint_slice(namespace, "coder", [replicas["c1"]]), dead_slice)
        wait_until(lambda: ready_endpoints(gw, f"{namespace}/qwen") == 3, 30, "coder's three endpoints")
        answers = [answered_by(oa.completions.create(model="qwen", prompt="hi")) for _ in range(6)]
        assert set(answers) == {"answered by b1", "answered by c1"}
        retries = metric(gw, "vnpu_gateway_retries_total")
        assert retries >= 1

        # A replica that takes the connection and resets it before any answer (it died mid-request, or
        # the gateway's pooled connection outlived it): retried on another too, never a 5xx.
        reset = ResettingReplica(replicas["c1"].net)
        control_plane.kubectl("delete", "endpointslice", dead_slice["metadata"]["name"], "-n", namespace)
        apply(control_plane, endpoint_slice(namespace, "coder", [reset]))
        wait_until(
            lambda: ready_endpoints(gw, f"{namespace}/qwen") == 3 and reset.connections == 0,
            30,
            "coder's endpoints: b1, c1 and the resetting one",
        )
        answers = [answered_by(oa.completions.create(model="qwen", prompt="hi")) for _ in range(8)]
        assert set(answers) <= {"answered by b1", "answered by c1"}
        assert reset.connections >= 1 and metric(gw, "vnpu_gateway_retries_total") > retries
    finally:
        gw.stop()


class ResettingReplica:
    """Accepts a connection, reads the request and resets the connection without a status line."""

    def __init__(self, net: ReplicaNetwork) -> None:
        self.address, self.port, self.name = net.address, next(net.ports), "reset"
        self.connections = 0
        ready = threading.Event()

        def serve() -> None:
            net.enter_in_this_thread()
            with socket.socket() as server:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                server.bind((self.address, self.port))
                server.listen(16)
                ready.set()
                while True:
                    conn, _ = server.accept()
                    self.connections += 1
                    conn.recv(65536)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                    conn.close()

        threading.Thread(target=serve, daemon=True).start()
        ready.wait(10)


class FakeReplicaStub:
    """An endpoint where nothing listens (a replica that just died)."""

    def __init__(self, address: str, port: int) -> None:
        self.address, self.port, self.name = address, port, "dead"


def metric(gw: Gateway, name: str) -> float:
    for line in gw.metrics().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def ready_endpoints(gw: Gateway, model_name: str) -> int:
    return int(metric(gw, f'vnpu_gateway_ready_endpoints{{model="{model_name}"}}'))


def test_two_namespaces_one_name_api_keys_and_activity(control_plane, replicas, tmp_path) -> None:
    ns_a, ns_b = f"ga-{uuid.uuid4().hex[:6]}", f"gb-{uuid.uuid4().hex[:6]}"
    for ns in (ns_a, ns_b):
        control_plane.kubectl("create", "namespace", ns)
    apply(
        control_plane,
        model(ns_a, "chat", "smollm2"),
        model(ns_b, "chat", "smollm2"),
        endpoint_slice(ns_a, "chat", [replicas["a1"]]),
        endpoint_slice(ns_b, "chat", [replicas["b1"]]),
    )
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        "keys:\n"
        f"  - {{name: team-a, sha256: {hashlib.sha256(b'team-a-key-1').hexdigest()}, models: ['{ns_a}/*']}}\n"
        "  - {name: ops, key: ops-key-12345, models: ['*']}\n"
    )
    gw = Gateway(control_plane, tmp_path, ns_a, ns_b, extra=("--api-keys", str(keys)))
    try:
        with pytest.raises(openai.AuthenticationError):
            gw.client("wrong").models.list()
        # A key that is not UTF-8 is just a wrong key: 401, not a 500.
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
            raw.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                        b"Connection: close\r\n\r\n")  # fmt: skip
            assert raw.recv(64).startswith(b"HTTP/1.1 401")
        team_a, ops = gw.client("team-a-key-1"), gw.client("ops-key-12345")
        # The metrics name every tenant's models: a key that may call them all, or nothing.
        for key, code in ((None, 401), ("team-a-key-1", 403)):
            scrape = urllib.request.Request(
                f"{gw.url}/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(scrape, timeout=10)
            assert refused.value.code == code and ns_b not in refused.value.read().decode()
        ops_scrape = {"Authorization": "Bearer ops-key-12345"}
        with urllib.request.urlopen(urllib.request.Request(f"{gw.url}/metrics", headers=ops_scrape)) as resp:
            assert f'model="{ns_b}/smollm2"' in resp.read().decode()
        # Names are looked up among the models a key may call: team-a's key has one smollm2, ops' two.
        assert sorted(m.id for m in team_a.models.list()) == sorted([f"{ns_a}/smollm2", "smollm2"])
        assert answered_by(team_a.completions.create(model="smollm2", prompt="x")) == "answered by a1"
        assert sorted(m.id for m in ops.models.list()) == sorted([f"{ns_a}/smollm2", f"{ns_b}/smollm2"])
        assert answered_by(team_a.completions.create(model=f"{ns_a}/smollm2", prompt="x")) == "answered by a1"
        # The runtime serves only its own modelName: the gateway forwards the bare one.
        assert replicas["a1"].requests[-1]["body"]["model"] == "smollm2"
        with pytest.raises(openai.NotFoundError):  # another tenant's model: the same 404 as none at all
            team_a.completions.create(model=f"{ns_b}/smollm2", prompt="x")
        with pytest.raises(openai.NotFoundError):  # ambiguous: never a guess between tenants
            ops.completions.create(model="smollm2", prompt="x")
        assert answered_by(ops.completions.create(model=f"{ns_b}/smollm2", prompt="x")) == "answered by b1"
        # A body nested too deeply for the JSON decoder is a 400 like any invalid JSON, never a 500.
        deep = urllib.request.Request(
            f"{gw.url}/v1/completions",
            data=b'{"model": ' + b"[" * 200_000,
            headers={"Content-Type": "application/json", "Authorization": "Bearer ops-key-12345"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(deep, timeout=30)
        assert refused.value.code == 400
        # A gzip-encoded body is read decompressed, so it is forwarded without its Content-Encoding.
        gzipped = urllib.request.Request(
            f"{gw.url}/v1/completions",
            data=gzip.compress(json.dumps({"model": f"{ns_b}/smollm2", "prompt": "x"}).encode()),
            headers={
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "Authorization": "Bearer ops-key-12345",
            },
        )
        with urllib.request.urlopen(gzipped, timeout=30) as resp:
            assert json.load(resp)["choices"][0]["text"] == "answered by b1"
        assert replicas["b1"].requests[-1]["body"] == {"model": "smollm2", "prompt": "x"}
        # A gzip bomb (128 MiB of zeros in 128 KiB) is refused once past the body limit, not inflated.
        bomb = urllib.request.Request(
            f"{gw.url}/v1/completions",
            data=gzip.compress(b'{"model": "' + b"0" * (128 << 20), compresslevel=9),
            headers={"Content-Encoding": "gzip", "Authorization": "Bearer ops-key-12345"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bomb, timeout=30)
        assert refused.value.code == 413
        # "gzip" that is not gzip, and an integer past int()'s 4,300 digits, were 500s: now 400s.
        for data, encoding in ((b'{"model": "x"}', "gzip"), (b'{"model": ' + b"9" * 5000 + b"}", "identity")):
            hostile = urllib.request.Request(
                f"{gw.url}/v1/completions",
                data=data,
                headers={"Content-Encoding": encoding, "Authorization": "Bearer ops-key-12345"},
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(hostile, timeout=30)
            assert refused.value.code == 400
            assert json.load(refused.value)["error"]["type"] == "invalid_request_error"

        custom = client.CustomObjectsApi(control_plane.api_client())

        def requests_recorded(ns: str) -> int:
            notes = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL, "chat")[
                "metadata"
            ]
            return int((notes.get("annotations") or {}).get(api.ANNOTATION_REQUESTS, "0"))

        wait_until(
            lambda: requests_recorded(ns_a) == 2 and requests_recorded(ns_b) == 2, 30, "activity recorded"
        )
        for _ in range(3):
            ops.completions.create(model=f"{ns_b}/smollm2", prompt="x")
        wait_until(lambda: requests_recorded(ns_b) == 5, 30, "activity added")
        # Tenant b writes a last-request time that is the year 10000 in UTC on its own model. Formatting
        # it raised in the flush thread, which died: no activity was recorded again for any model.
        control_plane.kubectl(
            "annotate", "--overwrite", "infm", "chat", "-n", ns_b,
            f"{api.ANNOTATION_LAST_REQUEST}=9999-12-31T23:59:59-23:59",
        )  # fmt: skip
        ops.completions.create(model=f"{ns_b}/smollm2", prompt="x")
        wait_until(lambda: requests_recorded(ns_b) == 6, 30, "activity recorded over the hostile time")
        team_a.completions.create(model=f"{ns_a}/smollm2", prompt="x")
        wait_until(lambda: requests_recorded(ns_a) == 3, 30, "the other tenant's activity still recorded")
    finally:
        gw.stop()


def test_a_model_at_zero_is_woken_and_the_request_waits_for_it(
    control_plane, namespace, replicas, tmp_path
) -> None:
    apply(
        control_plane,
        model(namespace, "idle", "sleepy", replicas=0, scaling={"minReplicas": 0}),
        model(namespace, "off", "off", replicas=0),
    )
    gw = Gateway(control_plane, tmp_path, namespace, extra=("--wake-timeout", "60"))
    custom = client.CustomObjectsApi(control_plane.api_client())
    try:
        oa = gw.client()
        result: dict[str, Any] = {}

        def call() -> None:
            started = time.monotonic()
            result["answer"] = answered_by(oa.completions.create(model="sleepy", prompt="x"))
            result["waited"] = time.monotonic() - started

        caller = threading.Thread(target=call)
        caller.start()

        def scaled_up() -> bool:
            obj = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, "idle")
            return obj["spec"]["replicas"] == 1

        wait_until(scaled_up, 30, "the gateway scaling the model to 1 through its scale subresource")
        assert caller.is_alive(), "the request is held while the model wakes"
        apply(control_plane, endpoint_slice(namespace, "idle", [replicas["c1"]]))  # the replica is Ready
        caller.join(60)
        assert result["answer"] == "answered by c1"
        # A model at zero that may not scale from zero is answered at once, and says why.
        with pytest.raises(openai.InternalServerError) as err:
            oa.completions.create(model="off", prompt="x")
        assert err.value.status_code == 503 and "does not scale from zero" in err.value.body["message"]
        assert err.value.response.headers["Retry-After"]
    finally:
        gw.stop()


def test_a_wake_that_takes_too_long_is_a_503_with_retry_after(control_plane, namespace, tmp_path) -> None:
    apply(control_plane, model(namespace, "slow", "slow", replicas=0, scaling={"minReplicas": 0}))
    gw = Gateway(control_plane, tmp_path, namespace, extra=("--wake-timeout", "2"))
    try:
        with pytest.raises(openai.InternalServerError) as err:
            gw.client().completions.create(model="slow", prompt="x")
        assert (
            err.value.status_code == 503
            and "became ready within 2 s (waking from zero)" in err.value.body["message"]
        )
        assert err.value.response.headers["Retry-After"] == "5"
    finally:
        gw.stop()


def test_an_api_key_may_not_ask_for_more_priority_than_it_was_given(
    control_plane, namespace, replicas, tmp_path
) -> None:
    """Priority decides whose sequences a replica preempts: with keys, a request may ask for no more
    than its model's own spec.priority, or its key's maxPriority; more is a 403 that never reaches the
    replica, so one client cannot push every other client of the model out."""
    apply(
        control_plane,
        model(namespace, "chat", "smollm2", priority=5),
        endpoint_slice(namespace, "chat", [replicas["a1"]]),
    )
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        "keys:\n"
        "  - {name: app, key: app-key-12345, models: ['*']}\n"
        "  - {name: pager, key: pager-key-1234, models: ['*'], maxPriority: 100}\n"
    )
    gw = Gateway(control_plane, tmp_path, namespace, extra=("--api-keys", str(keys)))
    try:
        wait_until(lambda: gw.client("app-key-12345").models.list().data, 30, "the model listed")
        app, pager = gw.client("app-key-12345"), gw.client("pager-key-1234")
        for client, priority in ((app, None), (app, 5), (app, -3), (pager, 100)):
            extra = {} if priority is None else {"priority": priority}
            assert answered_by(client.completions.create(model="smollm2", prompt="x", extra_body=extra))
            assert replicas["a1"].requests[-1]["body"].get("priority") == priority  # forwarded as asked
        forwarded = len(replicas["a1"].requests)
        for client, priority, limit in ((app, 6, 5), (app, 5.5, 5), (pager, 101, 100)):
            with pytest.raises(openai.PermissionDeniedError) as refused:
                client.completions.create(model="smollm2", prompt="x", extra_body={"priority": priority})
            error = refused.value.body
            assert error["code"] == "priority_not_allowed" and error["param"] == "priority"
            assert f"above {limit} for {namespace}/smollm2" in error["message"]
        assert len(replicas["a1"].requests) == forwarded
    finally:
        gw.stop()


def test_the_access_log_keeps_the_requests_and_only_status_changes_of_the_probes(
    control_plane, namespace, replicas, tmp_path
) -> None:
    """The kubelet probes the gateway's /readyz and /healthz every few seconds and Prometheus scrapes
    /metrics: each is logged only when its status changes, every request is logged."""
    apply(
        control_plane,
        model(namespace, "chat", "smollm2"),
        endpoint_slice(namespace, "chat", [replicas["a1"]]),
    )
    gw = Gateway(control_plane, tmp_path, namespace)
    try:
        wait_until(lambda: gw.client().models.list().data, 30, "the model listed")
        for path in ("/readyz", "/readyz", "/readyz", "/healthz", "/healthz", "/metrics", "/metrics"):
            with urllib.request.urlopen(f"{gw.url}{path}", timeout=5) as resp:  # a connection each
                assert resp.status == 200
        for _ in range(2):
            assert answered_by(gw.client().completions.create(model="smollm2", prompt="x"))
    finally:
        gw.stop()
    log = gw.proc.log.read_text()
    assert log.count('"GET /readyz HTTP/1.1" 200') == 1  # the test's own wait for it included
    assert log.count('"GET /readyz HTTP/1.1" 503') <= 1
    assert log.count('"GET /healthz HTTP/1.1" 200') == 1
    assert log.count('"GET /metrics HTTP/1.1" 200') == 1
    assert log.count('"GET /v1/models HTTP/1.1" 200') >= 1
    assert log.count('"POST /v1/completions HTTP/1.1" 200') == 2


def test_slow_clients_are_cut_off_while_others_are_served(control_plane, namespace, tmp_path) -> None:
    """The gateway faces the clients: one that trickles its request head is hung up on after
    --idle-timeout, one that trickles its body gets a 408 after --body-timeout, and another client is
    served meanwhile."""
    gw = Gateway(control_plane, tmp_path, namespace, extra=("--body-timeout", "1", "--idle-timeout", "1"))
    try:
        got = asyncio.run(probe(gw.port, limit_s=30))
    finally:
        gw.stop()
    assert got["served"] and got["head_closed"]
    assert got["status"] == 408
    assert "did not arrive within 1 s" in got["body"]["error"]["message"]


def test_a_model_at_zero_is_answered_by_its_warm_holder_while_it_wakes(
    control_plane, namespace, replicas, tmp_path
) -> None:
    """keepWarm with minReplicas 0: while no replica is ready, the share group's serving holder (the
    warm Service's slice) answers at once and the model is woken; once a replica is ready it takes the
    traffic. A model whose holders may not serve (keepWarm Never) never reaches them, and a holder that
    fails to answer makes the request wait for a replica instead."""
    warm_spec = {"scaling": {"minReplicas": 0, "keepWarm": "Always"}}
    apply(
        control_plane,
        model(namespace, "warm", "warm", replicas=0, **warm_spec),
        model(namespace, "cold", "cold", replicas=1, scaling={"minReplicas": 0, "keepWarm": "Never"}),
        model(namespace, "flaky", "flaky", replicas=0, **warm_spec),
        endpoint_slice(namespace, "warm", [replicas["a1"]], warm=True),
        endpoint_slice(namespace, "cold", [replicas["a2"]], warm=True),
    )
    dead = FakeReplicaStub(replicas["c1"].address, next(replicas["c1"].net.ports))
    apply(control_plane, endpoint_slice(namespace, "flaky", [dead], warm=True))
    gw = Gateway(control_plane, tmp_path, namespace, extra=("--wake-timeout", "30"))
    custom = client.CustomObjectsApi(control_plane.api_client())

    def replicas_of(name: str) -> int:
        obj = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
        return int(obj["spec"]["replicas"])

    try:
        oa = gw.client()
        assert answered_by(oa.completions.create(model="warm", prompt="x")) == "answered by a1"
        wait_until(lambda: replicas_of("warm") == 1, 30, "the warm model woken all the same")
        apply(control_plane, endpoint_slice(namespace, "warm", [replicas["b1"]]))
        wait_until(lambda: ready_endpoints(gw, f"{namespace}/warm") == 1, 30, "its replica ready")
        assert answered_by(oa.completions.create(model="warm", prompt="x")) == "answered by b1"

        # keepWarm Never: its group's holder is not a place to send it, whatever serves there.
        result: dict[str, Any] = {}
        caller = threading.Thread(
            target=lambda: result.update(answer=answered_by(oa.completions.create(model="cold", prompt="x")))
        )
        caller.start()
        time.sleep(2)
        assert caller.is_alive() and not replicas["a2"].requests, "held for a replica, not sent to a holder"
        apply(control_plane, endpoint_slice(namespace, "cold", [replicas["c1"]]))
        caller.join(30)
        assert result["answer"] == "answered by c1"

        # A serving holder that does not answer: the request waits for the replica the wake brings.
        caller = threading.Thread(
            target=lambda: result.update(flaky=answered_by(oa.completions.create(model="flaky", prompt="x")))
        )
        caller.start()
        wait_until(lambda: replicas_of("flaky") == 1, 30, "the flaky model woken")
        time.sleep(1)
        assert caller.is_alive()
        apply(control_plane, endpoint_slice(namespace, "flaky", [replicas["a2"]]))
        caller.join(30)
        assert result["flaky"] == "answered by a2"
        assert metric(gw, "vnpu_gateway_warm_requests_total") == 1
    finally:
        gw.stop()


@pytest.mark.parametrize("to_another_thread", [False, True], ids=["to-the-process", "to-another-thread"])
def test_sigterm_stops_the_gateway(control_plane, namespace, tmp_path, to_another_thread: bool) -> None:
    """SIGTERM ends the gateway at once, wherever the kernel delivers it (vnpu.signals): aiohttp's
    asyncio loop hears of a signal another thread caught through its wakeup fd."""
    from thread_signals import signal_another_thread

    gw = Gateway(control_plane, tmp_path, namespace)
    proc = gw.proc.proc
    try:
        if to_another_thread:
            signal_another_thread(proc.pid)
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, gw.proc.tail(30)
    finally:
        gw.stop()


def test_a_stopping_gateway_is_unready_but_answers_new_connections_for_its_shutdown_delay(
    control_plane, namespace, replicas, tmp_path
) -> None:
    """kube-proxy takes a stopping gateway out of its Service a moment after the kubelet's SIGTERM: for
    the shutdown delay /readyz is 503 while new connections are still answered, then the gateway
    stops. A second signal stops it at once."""
    apply(
        control_plane,
        model(namespace, "chat", "smollm2"),
        endpoint_slice(namespace, "chat", [replicas["a1"]]),
    )
    gw = Gateway(control_plane, tmp_path, namespace, extra=("--shutdown-delay-seconds", "3"))
    proc = gw.proc.proc

    def readyz() -> int:
        try:
            with urllib.request.urlopen(f"{gw.url}/readyz", timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: readyz() == 503, 2, "/readyz at 503")
        assert answered_by(gw.client().completions.create(model="smollm2", prompt="x")) == "answered by a1"
        assert time.monotonic() - began < 3, "the calls above must fall inside the delay"
        assert proc.wait(15) == 0, gw.proc.tail(30)
        assert time.monotonic() - began >= 3
    finally:
        gw.stop()

    gw = Gateway(control_plane, tmp_path, namespace, extra=("--shutdown-delay-seconds", "60"))
    proc = gw.proc.proc
    try:
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: readyz() == 503, 2, "/readyz at 503")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, gw.proc.tail(30)
    finally:
        gw.stop()


def test_sigterm_lets_the_streams_in_flight_finish(control_plane, namespace, replicas, tmp_path) -> None:
    """A gateway rolled out (or its node drained) takes no new connection at SIGTERM and lets the
    streams it is relaying finish, within its pod's grace period (the chart's 65 s)."""
    a1 = replicas["a1"]
    apply(control_plane, model(namespace, "chat", "smollm2"), endpoint_slice(namespace, "chat", [a1]))
    gw = Gateway(control_plane, tmp_path, namespace)
    proc = gw.proc.proc
    try:
        a1.release.clear()
        stream = gw.client().completions.create(model="smollm2", prompt="hi", stream=True)
        first = next(iter(stream))
        assert first.choices[0].text == f"{a1.name}:"
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)  # the gateway is stopping, the stream still open
        assert proc.poll() is None, gw.proc.tail(30)
        a1.release.set()
        assert "".join(c.choices[0].text for c in stream) == " one two"
        assert proc.wait(15) == 0, gw.proc.tail(30)
    finally:
        a1.release.set()
        gw.stop()
