"""What a request that cannot fit the context costs before it is refused.

Megabytes of JSON (hundreds of thousands of empty chat messages) cost over a second of pure-Python CPU
to parse and render, and the engine thread, in the same process, lost the GIL meanwhile: decode for
every other user fell ~35x while a few clients posted bodies that were all refused. So a body larger
than any request fitting the replica's context is a 413 before it is read, a chat with more messages
than the context has tokens a 400 before its messages are parsed or rendered, and a large body's parse
and render take turns with every other large body's.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from rt_helpers import load_tiny_llama

from vnpu import jsonbody
from vnpu.jsonbody import MAX_BODY_BYTES, OFF_LOOP_BYTES
from vnpu.runtime import server
from vnpu.runtime.engine import ModelRuntime, ServeOptions
from vnpu.runtime.openai_protocol import (
    MAX_STOP,
    MAX_STOP_CHARS,
    BadRequest,
    max_body_bytes,
    max_messages,
    parse_chat,
)
from vnpu.runtime.server import body_limit, make_app

CONTEXT = 64
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelRuntime]:
    tiny: Any = load_tiny_llama(tmp_path_factory.mktemp("tiny") / "m")
    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny", max_batch=4))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
    yield rt
    rt.close()


def serve(runtime: ModelRuntime, scenario: Callable[[TestClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(make_app(runtime))) as http:
            await scenario(http)

    asyncio.run(main())


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the bodies parsed as JSON."""
    seen: list[int] = []
    parse = jsonbody.parse_json

    def counted(data: bytes) -> Any:
        seen.append(len(data))
        return parse(data)

    monkeypatch.setattr(jsonbody, "parse_json", counted)
    return seen


def test_the_limit_follows_the_context_within_the_gateways(runtime: ModelRuntime) -> None:
    assert body_limit(runtime) == max_body_bytes(CONTEXT, runtime.tokenizer.max_token_bytes, MAX_BODY_BYTES)
    assert OFF_LOOP_BYTES < body_limit(runtime) < MAX_BODY_BYTES
    assert max_body_bytes(10**6, 81, MAX_BODY_BYTES) == MAX_BODY_BYTES


def test_the_largest_body_a_full_context_can_need_is_under_the_limit() -> None:
    """A context's worth of the longest tokens, every byte escaped as ``\\u0001``, one message per
    token with every field a message may carry, indented, and the longest stops: still a body the
    limit takes (a request that fits the context is never a 413)."""
    context, token_bytes = 64, 13
    message = {
        "role": "assistant",
        "content": "\x01" * token_bytes,
        "name": "n" * 64,
        "tool_call_id": "call_" + "x" * 24,
        "refusal": None,
        "tool_calls": [],
    }
    body = {
        "model": "m" * 253,
        "messages": [message] * max_messages(context),
        "stop": ["\U0001f600" * MAX_STOP_CHARS] * MAX_STOP,
        "max_completion_tokens": 1,
        "user": "u" * 1024,
        "metadata": {f"key{i}": "v" * 512 for i in range(16)},
    }
    size = len(json.dumps(body, indent=2, ensure_ascii=True).encode())
    assert size <= max_body_bytes(context, token_bytes, cap=2**40)


def test_a_body_over_the_limit_is_a_413_and_never_parsed(runtime: ModelRuntime, parses: list[int]) -> None:
    limit = body_limit(runtime)
    over = b'{"prompt": "' + b"x" * limit + b'"}'  # within the gateway's 8 MiB

    async def chunks() -> Any:  # no Content-Length: refused once read past the limit
        for start in range(0, len(over), 65536):
            yield over[start : start + 65536]

    async def scenario(http: TestClient) -> None:
        for path in ("/v1/completions", "/v1/chat/completions"):
            for data in (over, chunks()):
                response = await http.post(path, data=data, headers=JSON)
                assert response.status == 413
                error = (await response.json())["error"]
                assert error["type"] == "invalid_request_error"
                assert f"larger than {limit} bytes" in error["message"]
                assert f"its context holds {CONTEXT} tokens" in error["message"]
        assert (await http.get("/healthz")).status == 200

    serve(runtime, scenario)
    assert parses == []


def test_a_content_length_over_the_limit_is_answered_before_the_body_is_sent(runtime: ModelRuntime) -> None:
    """The head alone decides: a 413 comes back though not one byte of the body was sent (were the
    body read first, the answer would be the body timeout's 408)."""

    async def scenario(http: TestClient) -> None:
        reader, writer = await asyncio.open_connection(http.host, http.port)
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_limit(runtime) + 1}\r\n\r\n"
        )
        writer.write(head.encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 30)
        writer.close()
        assert status.split()[1] == b"413"

    serve(runtime, scenario)


def test_a_chat_with_more_messages_than_the_context_has_tokens_is_a_400_before_its_messages_are_read(
    runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered: list[Any] = []
    monkeypatch.setattr(server, "_prepare", lambda *args: rendered.append(args))
    too_many = [{"role": "user", "content": ""}] * CONTEXT + [{"not a message": 1}]

    async def scenario(http: TestClient) -> None:
        response = await http.post("/v1/chat/completions", json={"messages": too_many, "max_tokens": 1})
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "messages"
        assert error["message"] == (
            f"'messages' holds {CONTEXT + 1} messages; this model's context of {CONTEXT} tokens holds at "
            f"most {CONTEXT} (every message takes at least one token)"
        )

    serve(runtime, scenario)
    assert rendered == []


def test_a_chat_at_the_message_bound_is_not_refused_by_it() -> None:
    messages = [{"role": "user", "content": ""}] * max_messages(CONTEXT)
    assert len(parse_chat({"messages": messages}, context=CONTEXT).messages) == CONTEXT
    with pytest.raises(BadRequest, match="holds 65 messages"):
        parse_chat({"messages": [*messages, messages[0]]}, context=CONTEXT)


def test_each_message_takes_a_token_in_the_test_models_template(runtime: ModelRuntime) -> None:
    """What max_messages assumes, checked on the template the tests serve."""
    template = runtime.chat_template
    assert template is not None
    empty = {"role": "user", "content": ""}
    lengths = [len(runtime.tokenizer.encode(template.render([empty] * n))) for n in (1, 2, 3)]
    assert lengths[1] - lengths[0] >= 1 and lengths[2] - lengths[1] >= 1


def test_large_valid_requests_are_served_their_parses_and_renders_one_at_a_time(
    runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large body's parse and its render (with tokenizing) are each one CPU job, and such jobs run
    one at a time: three such requests never had two jobs running together."""
    lock = threading.Lock()
    running = most = jobs = 0
    partner = threading.Event()

    def tracked(job: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            nonlocal running, most, jobs
            with lock:
                running += 1
                jobs += 1
                most = max(most, running)
                if running > 1:
                    partner.set()
            partner.wait(0.1)  # a job running beside this one would come in meanwhile
            with lock:
                running -= 1
            return job(*args)

        return run

    monkeypatch.setattr(jsonbody, "parse_json", tracked(jsonbody.parse_json))
    monkeypatch.setattr(server, "_prepare", tracked(server._prepare))
    # ignore_eos: at the default temperature (1.0) the tiny model may sample its end token first
    large = {"messages": MESSAGES, "max_tokens": 2, "ignore_eos": True, "user": "u" * OFF_LOOP_BYTES}
    assert OFF_LOOP_BYTES <= len(json.dumps(large)) <= body_limit(runtime)

    async def scenario(http: TestClient) -> None:
        responses = await asyncio.gather(*(http.post("/v1/chat/completions", json=large) for _ in range(3)))
        assert [r.status for r in responses] == [200, 200, 200]
        for response in responses:
            assert (await response.json())["usage"]["completion_tokens"] == 2

    serve(runtime, scenario)
    assert jobs == 6 and most == 1
