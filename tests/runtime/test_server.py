"""The HTTP API of ``serve``: OpenAI-style completions, errors as 4xx/503, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st
from rt_helpers import load_tiny_llama, write_tiny_llama
from slow_clients import probe

from vnpu.runtime.engine import ModelRuntime, ServeOptions, StopMatcher
from vnpu.runtime.errors import InvalidRequestError, MemoryBudgetError
from vnpu.runtime.server import HttpServerThread, make_app

CONTEXT = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_tiny_llama(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture
def runtime(tiny: Any) -> ModelRuntime:
    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny", max_queue=4))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
    return rt


def run(runtime: ModelRuntime, scenario: Callable[[TestClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(make_app(runtime))) as client:
            await scenario(client)

    asyncio.run(main())


def test_completion_is_openai_shaped_and_deterministic(runtime: ModelRuntime) -> None:
    expected = runtime.complete("hello", 10, temperature=0)

    async def scenario(client: TestClient) -> None:
        body = {
            "model": "tiny",
            "prompt": "hello",
            "max_tokens": 10,
            "temperature": 0,
            "return_token_ids": True,
        }
        response = await client.post("/v1/completions", json=body)
        assert response.status == 200
        data = await response.json()
        assert data["object"] == "text_completion" and data["model"] == "tiny"
        choice = data["choices"][0]
        assert choice["text"] == expected.text and choice["token_ids"] == expected.result.token_ids
        assert choice["finish_reason"] in ("length", "stop")
        assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}

    run(runtime, scenario)


def test_streaming_sends_the_same_text_as_sse(runtime: ModelRuntime) -> None:
    expected = runtime.complete("stream me", 12, temperature=0).text

    async def scenario(client: TestClient) -> None:
        body = {"prompt": ["stream me"], "max_tokens": 12, "temperature": 0, "stream": True}
        response = await client.post("/v1/completions", json=body)
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        events = [line[6:] for line in (await response.text()).splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")

    run(runtime, scenario)


def test_sampling_with_a_seed_reproduces(runtime: ModelRuntime) -> None:
    async def scenario(client: TestClient) -> None:
        body = {"prompt": "abc", "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 7}
        first = await (await client.post("/v1/completions", json=body)).json()
        second = await (await client.post("/v1/completions", json=body)).json()
        assert first["choices"][0]["text"] == second["choices"][0]["text"]

    run(runtime, scenario)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"prompt": "x" * 60, "max_tokens": 10}, 400, "maximum context length is 64"),
        ({"prompt": "x" * 200, "max_tokens": 1}, 400, "maximum context length is 64"),
        ({"prompt": "", "max_tokens": 4}, 400, "empty"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
        ({"prompt": 5}, 400, "'prompt'"),
        ({"prompt": "x", "temperature": 9}, 400, "temperature"),
        ({"prompt": "x", "n": 2}, 400, "'n': 1"),
        ({"prompt": "x", "stop": [1]}, 400, "stop"),
        ({"prompt": [300, 1]}, 400, "vocabulary"),
        ({"prompt": "x", "model": "someone-else"}, 404, "does not exist"),
    ],
)
def test_bad_requests_get_4xx_never_a_crash(
    runtime: ModelRuntime, body: dict, status: int, needle: str
) -> None:
    async def scenario(client: TestClient) -> None:
        response = await client.post("/v1/completions", json=body)
        assert response.status == status
        error = (await response.json())["error"]
        assert needle in error["message"]
        stream = await client.post("/v1/completions", json={**body, "stream": True})
        assert stream.status == status
        assert (await client.get("/healthz")).status == 200  # still alive

    run(runtime, scenario)


def test_invalid_json_is_400(runtime: ModelRuntime) -> None:
    async def scenario(client: TestClient) -> None:
        response = await client.post("/v1/completions", data=b"{not json")
        assert response.status == 400

    run(runtime, scenario)


def test_context_limit_counts_prompt_plus_completion(runtime: ModelRuntime) -> None:
    async def scenario(client: TestClient) -> None:
        ok = await client.post(
            "/v1/completions", json={"prompt": "x" * 54, "max_tokens": 10, "temperature": 0}
        )
        assert ok.status == 200  # 54 + 10 == 64 fits exactly
        data = await ok.json()
        assert data["usage"]["total_tokens"] <= CONTEXT
        over = await client.post("/v1/completions", json={"prompt": "x" * 54, "max_tokens": 11})
        assert over.status == 400 and (await over.json())["error"]["code"] == "context_length_exceeded"

    run(runtime, scenario)


def test_stop_strings_cut_the_text() -> None:
    matcher = StopMatcher(["END", "##"])
    out = "".join(matcher.feed(p) for p in ["hello E", "N", "Dworld"]) + matcher.flush()
    assert out == "hello " and matcher.stopped
    matcher = StopMatcher(["END"])
    out = "".join(matcher.feed(p) for p in ["a E", "b"]) + matcher.flush()
    assert out == "a Eb" and not matcher.stopped


def cut_at_stops(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    """What a stop cut means, on the whole text: the text before the earliest-starting occurrence of
    any stop that has completed by the end of the piece it completes in."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [text.find(s) for s in stops if s and s in text]
        if hits:
            return text[: min(hits)], True
    return text, False


@given(
    st.lists(st.text("ab\u00e9", max_size=5), max_size=4),
    st.lists(st.text("ab\u00e9", min_size=1, max_size=8), max_size=12),
)
def test_stop_strings_cut_where_the_whole_text_says(stops: list[str], pieces: list[str]) -> None:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces) + matcher.flush()
    assert (out, matcher.stopped) == cut_at_stops(pieces, stops)


def test_long_stops_that_hold_back_all_the_text_release_it_whole_at_the_end() -> None:
    """Four 40,000-character stops, one matching all the text so far (so all of it is held back), over
    8,000 tokens: trying every prefix was O(L^2) per token (3 minutes); the automata take linear work."""
    out = "".join(f"w{i % 10}x " for i in range(8000))
    matcher = StopMatcher([out + "\u0001", "\u0002" * 40_000, "\u0003" * 40_000, "\u0004" * 40_000])
    sent = [matcher.feed(out[i : i + 4]) for i in range(0, len(out), 4)]
    assert "".join(sent) == "" and matcher.flush() == out and not matcher.stopped


def test_not_ready_is_503_and_readyz_says_why(tiny: Any) -> None:
    rt = ModelRuntime(ServeOptions(max_context=CONTEXT))

    async def scenario(client: TestClient) -> None:
        assert (await client.get("/healthz")).status == 200
        ready = await client.get("/readyz")
        assert ready.status == 503 and "not loaded" in (await ready.json())["reason"]
        response = await client.post("/v1/completions", json={"prompt": "x"})
        assert response.status == 503 and "not available" in (await response.json())["error"]["message"]
        rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
        assert (await client.get("/readyz")).status == 200
        rt.uninstall("weights-holder went away")
        response = await client.post("/v1/completions", json={"prompt": "x"})
        assert response.status == 503 and "weights-holder went away" in (await response.text())

    run(rt, scenario)


def test_metrics_report_tokens_ttft_kv_and_attach(runtime: ModelRuntime) -> None:
    async def scenario(client: TestClient) -> None:
        await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5, "temperature": 0})
        text = await (await client.get("/metrics")).text()
        for name in (
            "vnpu_runtime_generated_tokens_total 5.0",
            "vnpu_runtime_tokens_per_second",
            "vnpu_runtime_time_to_first_token_seconds_count 1.0",
            "vnpu_runtime_kv_cache_bytes",
            "vnpu_runtime_kv_cache_usage_ratio",
            "vnpu_runtime_offload_bytes_total",
            'vnpu_runtime_attach_seconds{mode="load"}',
            'vnpu_runtime_requests_total{status="200"} 1.0',
            "vnpu_runtime_ready 1.0",
            "vnpu_runtime_requests_in_flight 0.0",
        ):
            assert name in text, name

    run(runtime, scenario)


def test_memory_limit_is_a_checked_budget_on_cpu(tiny: Any) -> None:
    needs = ModelRuntime(ServeOptions(max_context=CONTEXT)).required_bytes(tiny.manifest, False, 0)
    assert needs["weights"] == tiny.manifest.total_bytes and needs["kv_cache"] > 0
    tight = ModelRuntime(ServeOptions(max_context=CONTEXT, memory_limit_mib=1))
    with pytest.raises(MemoryBudgetError, match="VNPU_MEMORY_LIMIT_MIB=1 is too small"):
        tight.install(tiny.manifest, tiny.arena, shared=False, seconds=0)
    # Attached replicas do not pay for the weights: the holder's slices do.
    assert tight.required_bytes(tiny.manifest, True, 0)["weights"] == 0
    roomy = ModelRuntime(ServeOptions(max_context=CONTEXT, memory_limit_mib=64))
    roomy.install(tiny.manifest, tiny.arena, shared=False, seconds=0)
    assert roomy.ready
    # Under offload only the resident part and the ring count against the device budget.
    offloaded = ModelRuntime(ServeOptions(max_context=CONTEXT, offload_budget_mib=0.2))
    offloaded.install(tiny.manifest, tiny.arena, shared=False, seconds=0)
    plan = offloaded.plan
    assert plan is not None
    needs = offloaded.required_bytes(tiny.manifest, False, plan.ring_bytes, plan)
    assert needs["weights"] == plan.resident_bytes < tiny.manifest.total_bytes
    offloaded.uninstall("done")
    # With the operator's cap (what the group's holder pays for), no more of it stays resident.
    whole = ModelRuntime(ServeOptions(max_context=CONTEXT, offload_budget_mib=64))
    whole.install(tiny.manifest, tiny.arena, shared=True, seconds=0)
    cap_mib = 0.5 * whole.plan.resident_bytes / 2**20 if whole.plan else 0
    capped = ModelRuntime(
        ServeOptions(max_context=CONTEXT, offload_budget_mib=64, offload_resident_mib=cap_mib)
    )
    capped.install(tiny.manifest, tiny.arena, shared=True, seconds=0)
    assert capped.plan is not None and capped.plan.streamed
    assert capped.plan.resident_bytes <= cap_mib * 2**20 < whole.plan.resident_bytes  # type: ignore[union-attr]
    assert (
        capped.complete("offload", 6, temperature=0).text == whole.complete("offload", 6, temperature=0).text
    )
    for rt in (whole, capped):
        rt.uninstall("done")


def test_offloaded_serving_reports_offload_bytes(tiny: Any) -> None:
    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, offload_budget_mib=0.2, prefetch_depth=2))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0)
    assert rt.plan is not None and rt.plan.streamed
    plain = ModelRuntime(ServeOptions(max_context=CONTEXT))
    plain.install(tiny.manifest, tiny.arena, shared=False, seconds=0)
    assert rt.complete("offload", 6, temperature=0).text == plain.complete("offload", 6, temperature=0).text
    assert rt.metrics.offload_bytes._value.get() > 0
    rt.uninstall("done")


def test_a_vocabulary_padded_past_the_tokenizer_is_never_sampled_nor_accepted(tmp_path: Any) -> None:
    """Checkpoints pad their embedding rows past the tokenizer (Qwen2.5: 151,936 against 151,665). A
    padded id the head favoured was sampled, had no text, and raised in the detokenizer on the engine
    thread: every request of that step lost its output, again at every step."""
    import torch
    from safetensors.torch import load_file, save_file

    from vnpu.runtime.loader import load_weights
    from vnpu.runtime.sources import resolve

    directory = write_tiny_llama(tmp_path / "padded")
    config = json.loads((directory / "config.json").read_text())
    config["vocab_size"] = 300  # the tokenizer has 257
    (directory / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(directory / "model.safetensors"))
    pad = torch.zeros(43, tensors["lm_head.weight"].shape[1])
    head = torch.cat([tensors["lm_head.weight"], pad])
    head[280] = tensors["model.norm.weight"] * 50  # aligned with every normed hidden state: the argmax
    tensors["lm_head.weight"] = head
    tensors["model.embed_tokens.weight"] = torch.cat([tensors["model.embed_tokens.weight"], pad])
    save_file(tensors, str(directory / "model.safetensors"))
    weights = load_weights(resolve(str(directory)), progress=False)
    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny"))
    rt.install(weights.manifest, weights.arena, shared=False, seconds=0.01)
    try:
        done = rt.complete("hello", 6, temperature=0)
        assert len(done.result.token_ids) == 6 and all(t < 257 for t in done.result.token_ids)
        assert done.result.finish_reason == "length"
        with pytest.raises(InvalidRequestError, match=r"vocabulary \[0, 257\)"):
            rt.complete([104, 290], 2)
    finally:
        rt.close()


def test_slow_clients_are_cut_off_while_others_are_served(runtime: ModelRuntime) -> None:
    """A client that trickles its request head is hung up on after the idle timeout, one that trickles
    its body gets a 408 after the body timeout (neither holds a handler for good), and a third client
    is served meanwhile. The server is the one ``serve`` runs, with its timeouts shortened."""
    from vnpu.cluster.controlplane import free_port

    port = free_port()
    server = HttpServerThread(make_app(runtime, body_timeout_s=1.0), "127.0.0.1", port, idle_timeout_s=1.0)
    server.start()
    try:
        got = asyncio.run(probe(port, limit_s=30))
    finally:
        server.stop_then(lambda: None)
        server.join(30)
    assert got["served"] and got["head_closed"]
    assert got["status"] == 408
    assert got["body"]["error"]["code"] == "request_timeout"
    assert "did not arrive within 1 s" in got["body"]["error"]["message"]


def test_the_access_log_keeps_the_requests_and_only_status_changes_of_the_probes(
    tiny: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The kubelet probes /readyz every second and /healthz every 5 s, each on a new connection, and
    the gateway scrapes /metrics: logged only when their status changes (a replica going ready shows
    once), while every request is logged. The server is the one ``serve`` runs."""
    import urllib.error
    import urllib.request

    from vnpu.cluster.controlplane import free_port

    caplog.set_level(logging.INFO, logger="aiohttp.access")
    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny"))
    port = free_port()
    server = HttpServerThread(make_app(rt), "127.0.0.1", port)
    server.start()

    def get(path: str, body: dict[str, Any] | None = None) -> int:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        assert [get("/readyz") for _ in range(3)] == [503] * 3  # no weights yet
        rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
        assert [get("/readyz") for _ in range(3)] == [200] * 3
        assert [get("/healthz") for _ in range(3)] == [200] * 3
        assert [get("/metrics") for _ in range(2)] == [200] * 2
        completion = {"prompt": "hello", "max_tokens": 2}
        assert [get("/v1/completions", completion) for _ in range(2)] == [200] * 2
        assert get("/readyz") == 200
    finally:
        server.stop_then(rt.close)
        server.join(30)
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    logged = [(line.split('"')[1].split()[1], int(line.split('"')[2].split()[0])) for line in lines]
    assert logged == [
        ("/readyz", 503),
        ("/readyz", 200),
        ("/healthz", 200),
        ("/metrics", 200),
        ("/v1/completions", 200),
        ("/v1/completions", 200),
    ]


def test_429_and_503_carry_retry_after(tiny: Any) -> None:
    """A client (or a proxy) told when to retry backs off instead of hammering a full or unready replica."""
    from vnpu.runtime.engine import GenerationRequest
    from vnpu.runtime.sampling import SamplingParams

    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny", max_batch=1, max_queue=0))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)

    async def scenario(client: TestClient) -> None:
        with rt._lock:  # the engine holds off between steps: the batch's one slot stays taken
            hog = rt.submit(GenerationRequest((5, 6), SamplingParams(8)), lambda _: None)
            full = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        hog.abort()
        assert full.status == 429 and full.headers["Retry-After"] == "1"
        assert (await full.json())["error"]["code"] == "rate_limit_exceeded"
        rt.uninstall("weights-holder went away")
        gone = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert gone.status == 503 and gone.headers["Retry-After"] == "5"
        assert "weights-holder went away" in (await gone.json())["error"]["message"]

    try:
        run(rt, scenario)
    finally:
        rt.close()


def test_a_full_queue_refuses_its_worst_waiting_request_for_a_higher_priority_one(tiny: Any) -> None:
    """Low-priority work fills the batch and the queue; a high-priority request is queued all the same
    and the latest low-priority one, which had streamed nothing, gets the 429 in its place. Its blocks
    (none yet) and its place are given back: everything else runs to its end."""
    from vnpu.runtime.engine import GenerationRequest
    from vnpu.runtime.sampling import SamplingParams

    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny", max_batch=1, max_queue=1))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
    body = {"prompt": "x", "max_tokens": 4, "ignore_eos": True}

    async def scenario(client: TestClient) -> None:
        hog = []
        with rt._lock:  # no step in between: the hog and the low one both wait, the queue is full
            rt.submit(GenerationRequest((5, 6), SamplingParams(4), priority=0), hog.append)
            low = asyncio.ensure_future(client.post("/v1/completions", json=body | {"stream": True}))
            while rt.stats()["waiting"] < 2:
                await asyncio.sleep(0.01)
            high = asyncio.ensure_future(client.post("/v1/completions", json=body | {"priority": 5}))
            # The low one is answered while the engine still holds off, before the high one.
            done, _ = await asyncio.wait({low, high}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            assert done == {low}, [(await t).status for t in done]
            refused = await low
        assert refused.status == 429 and refused.headers["Retry-After"] == "1"
        assert "higher priority" in (await refused.json())["error"]["message"]
        assert (await high).status == 200
        assert (await _idle(rt))["blocks_used"] == 0
        assert [out.finish_reason for out in hog if out.finish_reason] == ["length"]
        assert _requests_by_status(rt) == {"200": 1.0, "429": 1.0}

    try:
        run(rt, scenario)
    finally:
        rt.close()


def _requests_by_status(runtime: ModelRuntime) -> dict[str, float]:
    return {
        s.labels["status"]: s.value
        for m in runtime.metrics.requests.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }


async def _idle(runtime: ModelRuntime, timeout: float = 30.0) -> dict[str, int]:
    """The runtime's stats once nothing runs, waits or holds a block (bounded by ``timeout``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = runtime.stats()
        if stats["running"] == stats["waiting"] == stats["blocks_used"] == 0:
            return stats
        assert asyncio.get_running_loop().time() < deadline, f"still busy: {stats}"
        await asyncio.sleep(0.02)


def test_a_disconnect_during_a_write_logs_no_error(
    runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client gone while its stream is written: aiohttp raises ClientConnectionResetError from the
    write to the closed transport. That is the client leaving (counted as cancelled, its blocks freed),
    not an aiohttp "Error handling request" with a traceback. The transport is closed under the n-th
    write of each request, deterministically (a real early close hits a write only now and then)."""
    import aiohttp
    from aiohttp import web

    prepare, write = web.StreamResponse.prepare, web.StreamResponse.write
    state = {"cut_at": 0, "writes": 0}
    requests: list[Any] = []

    async def recording_prepare(self: web.StreamResponse, request: Any) -> Any:
        requests.append(request)
        if state["cut_at"] == 0 and self.content_type == "text/event-stream":
            request.transport.abort()  # gone before the headers
        return await prepare(self, request)

    async def cutting_write(self: web.StreamResponse, data: bytes) -> None:
        state["writes"] += 1
        if state["writes"] == state["cut_at"]:
            requests[-1].transport.abort()  # the client is gone: this write meets a closed transport
        await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "prepare", recording_prepare)
    monkeypatch.setattr(web.StreamResponse, "write", cutting_write)
    cuts = [0, 1, 2, 3, 1, 2]

    async def scenario(client: TestClient) -> None:
        for kind, cut_at in enumerate(cuts):
            state.update(cut_at=cut_at, writes=0)
            path = "/v1/chat/completions" if kind % 2 else "/v1/completions"
            body: dict[str, Any] = {"max_tokens": 12, "temperature": 0, "stream": True, "ignore_eos": True}
            if kind % 2:
                body["messages"] = [{"role": "user", "content": "hi"}]
            else:
                body["prompt"] = "hello"
            with contextlib.suppress(aiohttp.ClientError):
                response = await client.post(path, json=body)
                await response.read()
        await _idle(runtime)

    with caplog.at_level(logging.INFO):
        run(runtime, scenario)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [(r.name, r.getMessage()) for r in errors]
    assert _requests_by_status(runtime) == {"cancelled": len(cuts)}


def test_a_stream_that_is_never_read_is_aborted_and_closed(
    tiny: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends a streamed request and never reads: once the socket's and the transport's
    buffers are full a write waits for it for good (the idle timeout only runs between requests), while
    the engine generated to max_tokens for nobody and its output piled up. A write stalled for the
    app's ``write_stall_s`` closes the connection and cancels the request, as a disconnect does."""
    import socket
    import time

    from vnpu.cluster.controlplane import free_port

    rt = ModelRuntime(ServeOptions(max_context=1024, model_name="tiny"))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
    app = make_app(rt, write_stall_s=0.5)

    async def small_send_buffer(request: Any, _: Any) -> None:
        # The kernel grows a socket's send buffer up to tcp_wmem's maximum (4 MiB here), so that a
        # stream shorter than that is taken whole and the handler never waits. Under TCP memory
        # pressure (60 such streams) it does not grow: this pins the server's end small, as then.
        request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    app.on_response_prepare.append(small_send_buffer)
    port = free_port()
    server = HttpServerThread(app, "127.0.0.1", port)
    server.start()
    body = json.dumps(  # about 1.5 KiB of stream per token: far beyond every buffer on the way
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 900,
            "ignore_eos": True,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 20,
            "return_token_ids": True,
        }
    ).encode()
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        with caplog.at_level(logging.WARNING, logger="vnpu.runtime.server"):
            deadline = time.monotonic() + 60
            while _requests_by_status(rt).get("cancelled") != 1:  # the handler gave up on the client
                assert time.monotonic() < deadline, f"the stream is still held: {_requests_by_status(rt)}"
                time.sleep(0.05)
            stats = asyncio.run(_idle(rt))
        assert stats["running"] == stats["waiting"] == stats["blocks_used"] == 0
        stalls = [r for r in caplog.records if "stopped reading" in r.getMessage()]
        assert [r.levelno for r in stalls] == [logging.WARNING] and stalls[0].exc_info is None
        # The client reads at last: what was buffered, then the end of a connection the server closed.
        client.settimeout(30)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := client.recv(1 << 16):
                received += chunk
        assert b"[DONE]" not in received
    finally:
        client.close()
        server.stop_then(lambda: None)
        server.join(30)
        rt.close()


def _slowed(rt: ModelRuntime, monkeypatch: pytest.MonkeyPatch, step_s: float) -> None:
    """Each engine step of ``rt`` takes ``step_s`` longer: a generation outlasts a short drain."""
    import time

    assert rt._installed is not None
    model = rt._installed.model
    works = model.forward_batch

    def slow(layout: Any, cache: Any) -> Any:
        time.sleep(step_s)
        return works(layout, cache)

    monkeypatch.setattr(model, "forward_batch", slow)


def test_requests_still_running_when_the_drain_runs_out_end_with_an_error(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM gives the requests in flight the model's drain. Those still running at its end fail
    with "the server is shutting down", as any failure: a stream sends an ``error`` event and
    ``[DONE]``, a non-streamed request gets a 503, and their KV blocks are free before the runtime is
    closed. Before, aiohttp cut the stream off after a normal chunk (the client saw a truncated
    transfer, not why), and the engine kept generating for nobody until the runtime was closed."""
    import threading
    import time

    import aiohttp

    from vnpu.api import DRAIN_ERROR_SEND_S
    from vnpu.cluster.controlplane import free_port

    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny"))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
    _slowed(rt, monkeypatch, 0.2)  # 40 tokens: 8 s, far past the drain
    drain_s = 1.0
    port = free_port()
    server = HttpServerThread(make_app(rt), "127.0.0.1", port, drain_s=drain_s)
    server.start()
    stopped = threading.Event()
    body = {"prompt": "hello", "max_tokens": 40, "ignore_eos": True}

    async def scenario() -> tuple[bytes, int, dict[str, Any]]:
        url = f"http://127.0.0.1:{port}/v1/completions"
        async with aiohttp.ClientSession() as session:
            collected = asyncio.ensure_future(session.post(url, json=body))
            async with session.post(url, json={**body, "stream": True}) as stream:
                first = await stream.content.readuntil(b"\n\n")  # a token went out
                while rt.stats()["running"] < 2:  # the non-streamed request runs too
                    await asyncio.sleep(0.02)
                server.stop_then(stopped.set)
                rest = await stream.content.read()
            async with await collected as response:
                return first + rest, response.status, await response.json()

    try:
        began = time.monotonic()
        streamed, status, answer = asyncio.run(scenario())
        assert stopped.wait(drain_s + DRAIN_ERROR_SEND_S + 5)
        assert time.monotonic() - began < drain_s + DRAIN_ERROR_SEND_S + 5
        stats = asyncio.run(_idle(rt, timeout=5))  # the step in flight ends, then its blocks are free
        assert stats["blocks_used"] == 0
    finally:
        server.stop_then(lambda: None)
        server.join(30)
        rt.close()
    events = [e.removeprefix(b"data: ") for e in streamed.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "service_unavailable" and "shutting down" in error["message"]
    assert all("error" not in json.loads(e) for e in events[:-2])
    assert status == 503 and "shutting down" in answer["error"]["message"]


def test_a_stopping_server_is_unready_but_takes_new_connections_for_its_shutdown_delay(tiny: Any) -> None:
    """At SIGTERM Kubernetes takes the pod out of its Services only a moment later (kube-proxy, the
    gateway's EndpointSlice watch): for the shutdown delay /readyz is 503 while a new connection is
    still served, and only then is the listener closed. Before, it closed at once, and a client the
    Service sent there in that moment had its connection refused."""
    import threading
    import time
    import urllib.error
    import urllib.request

    from vnpu.cluster.controlplane import free_port

    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny"))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
    port, delay_s = free_port(), 3.0
    server = HttpServerThread(make_app(rt), "127.0.0.1", port, drain_s=30.0, shutdown_delay=delay_s)
    server.start()
    stopped = threading.Event()

    def call(path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
        request.add_header("Content-Type", "application/json")
        request.add_header("Connection", "close")  # each call a new connection, as from a Service
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        assert call("/readyz")[0] == 200
        began = time.monotonic()
        server.stop_then(stopped.set)
        assert call("/readyz") == (503, {"status": "unavailable", "reason": "shutting down"})
        status, answer = call("/v1/completions", {"prompt": "hello", "max_tokens": 2, "ignore_eos": True})
        assert status == 200 and answer["usage"]["completion_tokens"] == 2
        assert time.monotonic() - began < delay_s, "the calls above must fall inside the delay"
        assert stopped.wait(30)  # nothing in flight: the stop ends with the delay, not the drain
        assert time.monotonic() - began >= delay_s
        with pytest.raises(urllib.error.URLError, match="refused"):
            call("/readyz")
    finally:
        server.stop_then(lambda: None)
        server.join(30)
        rt.close()


def test_the_shutdown_delay_is_part_of_the_drain_and_never_longer() -> None:
    """The delay is part of the drain: a model that asks for no drain gets no delay either, and the
    pod's grace period (drain + margin) always covers the stop."""
    from vnpu.api import SHUTDOWN_DELAY_S, shutdown_delay_s

    assert shutdown_delay_s(SHUTDOWN_DELAY_S, 0) == 0
    assert shutdown_delay_s(SHUTDOWN_DELAY_S, 2) == 2
    assert shutdown_delay_s(SHUTDOWN_DELAY_S, 60) == SHUTDOWN_DELAY_S
    assert shutdown_delay_s(0, 60) == 0


def test_a_drain_that_runs_out_ends_a_second_later_even_for_a_client_that_does_not_read(
    tiny: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream whose client stopped reading cannot take its error event: ``DRAIN_ERROR_SEND_S`` after
    the drain its handler is cancelled and its connection closed, so the stop ends inside the pod's
    grace period (``vnpu.api.replica_grace_s``) however long the write stall allows. Before, aiohttp
    waited for such a handler a second drain (it first cancels the request's body, which a handler
    waiting on its client never reads): 120 s for the default drain, past the grace of 65 s."""
    import socket
    import threading
    import time

    from vnpu.api import DRAIN_ERROR_SEND_S
    from vnpu.cluster.controlplane import free_port

    rt = ModelRuntime(ServeOptions(max_context=1024, model_name="tiny"))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
    _slowed(rt, monkeypatch, 0.01)  # 900 tokens: 9 s at least, past the drain
    app = make_app(rt)  # the write stall of 30 s: longer than the drain and its second

    async def small_send_buffer(request: Any, _: Any) -> None:  # see the test above
        request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    app.on_response_prepare.append(small_send_buffer)
    drain_s = 3.0
    port = free_port()
    server = HttpServerThread(app, "127.0.0.1", port, drain_s=drain_s)
    server.start()
    body = json.dumps(  # about 1.5 KiB of stream per token
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 900,
            "ignore_eos": True,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 20,
        }
    ).encode()
    client = socket.socket()
    stopped = threading.Event()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 60
        while _generated(rt) < 150:  # over 200 KiB: far beyond every buffer on the way
            assert time.monotonic() < deadline, f"{_generated(rt)} tokens generated"
            time.sleep(0.05)
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="vnpu.runtime.server"):
            server.stop_then(stopped.set)
            assert stopped.wait(30)
        took = time.monotonic() - began
        # One drain, not two (the bug: a second full drain); 3 s of room for a loaded event loop.
        assert drain_s <= took < drain_s + DRAIN_ERROR_SEND_S + 3, took
        assert any("drain over" in r.getMessage() for r in caplog.records)
        stats = asyncio.run(_idle(rt, timeout=5))
        assert stats["blocks_used"] == 0
    finally:
        client.close()
        server.stop_then(lambda: None)
        server.join(30)
        rt.close()


def _generated(runtime: ModelRuntime) -> float:
    return next(
        s.value
        for m in runtime.metrics.generated_tokens.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )


def test_readiness_drops_after_repeated_step_failures(
    tiny: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A device in a sticky error state fails every step. Each failed step fails its requests (500,
    whose body keeps the exception to the log), and a step that succeeds starts the count again; the
    ``MAX_CONSECUTIVE_STEP_FAILURES``-th failure in a row takes the replica out of service until it
    restarts: /readyz (out of its Service) and /healthz (restarted by its liveness probe) answer 503
    with the reason, new requests 503, vnpu_runtime_ready 0. Each step's traceback is logged once."""
    from vnpu.runtime.engine import MAX_CONSECUTIVE_STEP_FAILURES

    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny"))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
    assert rt._installed is not None
    model = rt._installed.model
    works = model.forward_batch

    def broken(layout: Any, cache: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    request = {"prompt": "hello", "max_tokens": 4}

    async def fails(client: TestClient) -> None:
        response = await client.post("/v1/completions", json=request)
        assert response.status == 500
        message = (await response.json())["error"]["message"]
        assert message.startswith("internal error") and "illegal memory access" not in message

    async def scenario(client: TestClient) -> None:
        for _ in range(2):  # short of the limit, then a step that works: the count starts again
            monkeypatch.setattr(model, "forward_batch", broken)
            for _ in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
                await fails(client)
                assert (await client.get("/readyz")).status == 200
                assert (await client.get("/healthz")).status == 200
            monkeypatch.setattr(model, "forward_batch", works)
            assert (await client.post("/v1/completions", json=request)).status == 200
        monkeypatch.setattr(model, "forward_batch", broken)
        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):
            await fails(client)
        ready = await client.get("/readyz")
        assert ready.status == 503
        reason = (await ready.json())["reason"]
        assert f"failed {MAX_CONSECUTIVE_STEP_FAILURES} steps in a row (RuntimeError" in reason
        health = await client.get("/healthz")
        assert health.status == 503 and (await health.json())["reason"] == reason
        monkeypatch.setattr(model, "forward_batch", works)  # out of service even if the device recovers
        refused = await client.post("/v1/completions", json=request)
        assert refused.status == 503 and reason in (await refused.json())["error"]["message"]
        text = await (await client.get("/metrics")).text()
        assert "vnpu_runtime_ready 0.0" in text
        failures = 3 * MAX_CONSECUTIVE_STEP_FAILURES - 2
        assert f"vnpu_runtime_step_failures_total {failures}.0" in text

    with caplog.at_level(logging.INFO):
        try:
            run(rt, scenario)
        finally:
            rt.close()
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert tracebacks == ["forward step failed"] * (3 * MAX_CONSECUTIVE_STEP_FAILURES - 2)
