"""The HTTP API as clients use it: the official ``openai`` package against ``vnpu runtime serve``'s app.

Chat and text completions (streamed and not), the model's own chat template, ``/v1/models``, usage,
stop, seed, logprobs, OpenAI error objects for bad input (each case a 400 with a message), 404, 429 and
503, and a client that goes away cancelling its request and freeing its KV blocks. Only what the
official client cannot send (bodies that are not UTF-8 or not JSON, ``NaN``, which it refuses to
serialise) goes through a plain HTTP client.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from aiohttp import ClientTimeout
from aiohttp.test_utils import TestClient, TestServer
from openai import AsyncOpenAI
from rt_helpers import load_tiny_llama

from vnpu.api import MAX_MODEL_NAME_LEN
from vnpu.jsonbody import OFF_LOOP_BYTES
from vnpu.runtime.engine import ModelRuntime, ServeOptions
from vnpu.runtime.server import HttpServerThread, make_app

CONTEXT = 64
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]

Scenario = Callable[[AsyncOpenAI, TestClient], Awaitable[None]]


def serve(runtime: ModelRuntime, scenario: Scenario) -> None:
    async def main() -> None:
        async with TestClient(TestServer(make_app(runtime))) as http:
            client = AsyncOpenAI(base_url=str(http.make_url("/v1")), api_key="unused", max_retries=0)
            try:
                await scenario(client, http)
            finally:
                await client.close()

    asyncio.run(main())


async def until(condition: Callable[[], Any], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_tiny_llama(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def runtime(tiny: Any) -> Iterator[ModelRuntime]:
    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny", max_batch=4))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
    yield rt
    rt.close()


@pytest.fixture
def slow(tiny: Any) -> Iterator[ModelRuntime]:
    """A runtime whose steps take long (offloaded weights over a slow emulated link): requests stay
    running and queued long enough to be observed."""
    rt = ModelRuntime(
        ServeOptions(
            max_context=CONTEXT,
            model_name="tiny",
            max_batch=1,
            max_queue=1,
            offload_budget_mib=0.25,
            link_bytes_per_s=2e6,
        )
    )
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
    yield rt
    rt.uninstall("done")
    rt.close()


def rendered(runtime: ModelRuntime, messages: list[dict[str, str]]) -> str:
    template = runtime.chat_template
    assert template is not None
    return template.render(messages)


# --- chat ---------------------------------------------------------------------------------------


def test_chat_completion_renders_the_models_template(runtime: ModelRuntime) -> None:
    prompt = rendered(runtime, MESSAGES)
    assert prompt == "<system>Be brief.\n<user>hello there\n<assistant>"
    expected = runtime.complete(prompt, 10, ignore_eos=True)

    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        reply = await client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_completion_tokens=10,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert (
            reply.object == "chat.completion" and reply.model == "tiny" and reply.id.startswith("chatcmpl-")
        )
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == expected.text
        assert choice.finish_reason == "length"
        assert reply.usage is not None
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
            len(runtime.tokenize(prompt)),
            10,
        )
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + 10

    serve(runtime, scenario)


def test_a_chat_template_that_writes_the_bos_token_gets_one_bos_not_two(tmp_path: Path) -> None:
    """Llama 3's, Mistral's and Gemma's templates start with ``{{ bos_token }}`` and their tokenizers add
    a BOS to what they encode: the rendered chat was encoded with a second BOS in front. A chat is
    tokenized as transformers' apply_chat_template and vLLM do, adding no special token; a text
    completion still gets the tokenizer's BOS."""
    from rt_helpers import write_tiny_llama

    from vnpu.runtime.loader import load_weights
    from vnpu.runtime.sources import resolve

    directory = write_tiny_llama(tmp_path / "bos")
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    tokenizer["post_processor"] = {  # as Llama 3's tokenizer.json adds its BOS
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [],
        "special_tokens": {
            "<|endoftext|>": {"id": "<|endoftext|>", "ids": [256], "tokens": ["<|endoftext|>"]}
        },
    }
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    template = (
        "{{ bos_token }}{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '\\n' }}{% endfor %}"
    )
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template + "<assistant>"}))
    weights = load_weights(resolve(str(directory)), progress=False)
    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny", max_batch=4))
    rt.install(weights.manifest, weights.arena, shared=False, seconds=0.01)
    text = "<user>hi\n<assistant>"
    assert rt.tokenize("x") == [256, ord("x")]  # the tokenizer adds its BOS

    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=1, temperature=0
        )
        assert chat.usage is not None and chat.usage.prompt_tokens == 1 + len(text)  # one BOS, then bytes
        completion = await client.completions.create(model="tiny", prompt=text, max_tokens=1, temperature=0)
        assert completion.usage is not None and completion.usage.prompt_tokens == 1 + len(text)

    try:
        serve(rt, scenario)
    finally:
        rt.close()


def test_chat_streaming_sends_the_same_text_and_usage_last(runtime: ModelRuntime) -> None:
    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        args: dict[str, Any] = {
            "model": "tiny",
            "messages": MESSAGES,
            "max_tokens": 12,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        whole = await client.chat.completions.create(**args)
        stream = await client.chat.completions.create(
            **args, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 12
        assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]
        assert all(c.usage is None for c in chunks[:-1])

    serve(runtime, scenario)


def test_the_sdks_own_reply_goes_back_as_history_and_its_stream_options_are_taken(
    runtime: ModelRuntime,
) -> None:
    """``reply.choices[0].message.model_dump()`` holds ``annotations: None`` (a 400 "unknown field"), and
    the SDK documents ``stream_options.include_obfuscation: false`` to save bandwidth (a 400 too)."""

    hi = [{"role": "user", "content": "hi"}]

    async def scenario(client: AsyncOpenAI, http: TestClient) -> None:
        args: dict[str, Any] = {"model": "tiny", "max_tokens": 2, "temperature": 0}
        first = await client.chat.completions.create(messages=hi, **args)  # type: ignore[arg-type]
        said = first.choices[0].message.model_dump()
        assert "annotations" in said
        history = [*hi, said, {"role": "user", "content": "ok"}]
        again = await client.chat.completions.create(messages=history, **args)  # type: ignore[arg-type]
        assert again.choices[0].finish_reason in ("length", "stop")
        options = {"include_usage": True, "include_obfuscation": False}
        stream = await client.chat.completions.create(
            messages=hi,
            stream=True,
            stream_options=options,
            **args,  # type: ignore[arg-type]
        )
        assert [c async for c in stream][-1].usage is not None
        cited = {**said, "annotations": [{"type": "url_citation", "url_citation": {"url": "https://x"}}]}
        resp = await http.post("/v1/chat/completions", json={**args, "messages": [*hi, cited]})
        assert (
            resp.status == 400 and "annotations are not supported" in (await resp.json())["error"]["message"]
        )

    serve(runtime, scenario)


def test_an_assistant_message_without_content_is_empty_and_tool_calls_are_refused(
    runtime: ModelRuntime,
) -> None:
    """OpenAI's API makes ``content`` optional in an assistant's message (one that carries tool calls
    instead, as agents send their history back), and vLLM renders a null one as empty; the tool calls
    themselves this server does not take, and the 400 names them."""

    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        args: dict[str, Any] = {"model": "tiny", "max_tokens": 1, "temperature": 0}
        empty = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
        empty.append({"role": "user", "content": "ok"})
        for said in ({"role": "assistant", "content": None}, {"role": "assistant"}):
            reply = await client.chat.completions.create(messages=[empty[0], said, empty[2]], **args)
            assert reply.usage is not None  # a byte per token: the prompt is the template's text
            assert reply.usage.prompt_tokens == len(rendered(runtime, empty))
        call = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        }
        answer = {"role": "tool", "tool_call_id": "c1", "content": "42"}
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(messages=[empty[0], call, answer], **args)
        assert "messages[1].tool_calls: tool calls are not supported" in caught.value.message
        assert caught.value.body["param"] == "messages"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as caught:  # required in every other message
            await client.chat.completions.create(messages=[{"role": "user", "content": None}], **args)
        assert "messages[0].content must be a string" in caught.value.message

    serve(runtime, scenario)


def test_chat_default_max_tokens_is_what_the_context_leaves(runtime: ModelRuntime) -> None:
    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        reply = await client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            temperature=0,
            extra_body={"ignore_eos": True},  # type: ignore[arg-type]
        )
        assert reply.usage is not None and reply.usage.total_tokens == CONTEXT
        assert reply.choices[0].finish_reason == "length"

    serve(runtime, scenario)


def test_chat_on_the_real_model_answers_with_its_own_template(smollm2_weights: Any) -> None:
    rt = ModelRuntime(ServeOptions(max_context=256, model_name="smollm2"))
    rt.install(smollm2_weights.manifest, smollm2_weights.arena, shared=False, seconds=0)

    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        reply = await client.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=24,
            temperature=0,  # type: ignore[arg-type]
        )
        assert "Paris" in (reply.choices[0].message.content or "")
        assert reply.choices[0].finish_reason == "stop"  # the model ended its turn with <|im_end|>
        # The end token is counted, so it has its logprob too, shown as its special token's text
        # (as vLLM's chat and completions logprobs show it), though the text leaves it out.
        args: dict[str, Any] = {"model": "smollm2", "messages": messages, "max_tokens": 24, "temperature": 0}
        scored = await client.chat.completions.create(**args, logprobs=True, top_logprobs=2)
        content = scored.choices[0].logprobs.content  # type: ignore[union-attr]
        assert scored.usage is not None and content is not None
        assert len(content) == scored.usage.completion_tokens and content[-1].token == "<|im_end|>"
        assert bytes(content[-1].bytes or []) == b"<|im_end|>" and len(content[-1].top_logprobs) == 2
        assert "".join(e.token for e in content[:-1]) == scored.choices[0].message.content
        stream = await client.chat.completions.create(
            **args, logprobs=True, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        streamed = [
            e
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content or []
        ]
        assert [e.token for e in streamed] == [e.token for e in content]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(streamed)
        plain = await client.completions.create(
            model="smollm2", prompt=rendered(rt, messages), max_tokens=24, temperature=0, logprobs=1
        )
        lp = plain.choices[0].logprobs
        assert plain.choices[0].finish_reason == "stop" and lp is not None and plain.usage is not None
        assert len(lp.tokens or []) == plain.usage.completion_tokens and (lp.tokens or [])[-1] == "<|im_end|>"

    try:
        serve(rt, scenario)
    finally:
        rt.close()


# --- completions and models --------------------------------------------------------------------


def test_completions_streamed_and_not(runtime: ModelRuntime) -> None:
    expected = runtime.complete("stream me", 12, ignore_eos=True)

    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        args: dict[str, Any] = {"model": "tiny", "prompt": "stream me", "max_tokens": 12, "temperature": 0}
        extra = {"ignore_eos": True, "return_token_ids": True}
        whole = await client.completions.create(**args, extra_body=extra)
        assert whole.object == "text_completion" and whole.choices[0].text == expected.text
        assert whole.choices[0].model_extra["token_ids"] == expected.result.token_ids  # type: ignore[index]
        assert whole.usage is not None and whole.usage.completion_tokens == 12
        stream = await client.completions.create(
            **args, extra_body={"ignore_eos": True}, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens
        ids = await client.completions.create(model="tiny", prompt=[104, 105], max_tokens=3, temperature=0)
        assert ids.usage is not None and ids.usage.prompt_tokens == 2

    serve(runtime, scenario)


def test_models_lists_the_served_model(runtime: ModelRuntime) -> None:
    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        listed = [m async for m in client.models.list()]
        assert [m.id for m in listed] == ["tiny"] and listed[0].owned_by == "vnpu"
        assert (await client.models.retrieve("tiny")).id == "tiny"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("other")

    serve(runtime, scenario)


def test_a_model_whose_name_holds_a_slash_is_retrieved_by_it(tiny: Any) -> None:
    """A Hugging Face id (``org/name``) is a modelName the CRD allows: /v1/models/{id} takes the rest of
    the path, not one segment (it was a 404)."""
    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="org/tiny", max_batch=4))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)

    async def scenario(client: AsyncOpenAI, http: TestClient) -> None:
        assert (await client.models.retrieve("org/tiny")).id == "org/tiny"
        for path in ("/v1/models/org/tiny", "/v1/models/org%2Ftiny"):
            response = await http.get(path)
            assert response.status == 200 and (await response.json())["id"] == "org/tiny", path
        for path in ("/v1/models/org/other", "/v1/models/org/tiny/more", "/v1/models/tiny"):
            response = await http.get(path)
            assert response.status == 404 and (await response.json())["error"]["code"] == "model_not_found"

    try:
        serve(rt, scenario)
    finally:
        rt.close()


def test_stop_strings_and_seeds(runtime: ModelRuntime) -> None:
    full = runtime.complete("abc", 20, ignore_eos=True).text
    stop = full[5:7]
    assert stop and stop in full

    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        cut = await client.completions.create(
            model="tiny", prompt="abc", max_tokens=20, temperature=0, stop=[stop]
        )
        assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
        args: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 16, "temperature": 1.0}
        first = await client.chat.completions.create(**args, seed=2**62, top_p=0.9)
        second = await client.chat.completions.create(**args, seed=2**62, top_p=0.9)
        assert first.choices[0].message.content == second.choices[0].message.content

    serve(runtime, scenario)


def test_logprobs_for_chat_and_completions(runtime: ModelRuntime) -> None:
    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        reply = await client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            extra_body={"ignore_eos": True},
        )
        content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
        assert content is not None and len(content) == 6
        for entry in content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
            assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
            values = [t.logprob for t in entry.top_logprobs]
            assert values == sorted(values, reverse=True)
            assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
        # Tokens may be parts of a UTF-8 character (this model's tokens are single bytes): their bytes
        # put together are the text.
        whole = b"".join(bytes(e.bytes or []) for e in content)
        assert whole.decode("utf-8", "replace") == reply.choices[0].message.content
        plain = await client.completions.create(
            model="tiny",
            prompt="abc",
            max_tokens=4,
            temperature=0,
            logprobs=2,
            extra_body={"ignore_eos": True},
        )
        lp = plain.choices[0].logprobs
        assert lp is not None and len(lp.tokens or []) == 4 and len(lp.token_logprobs or []) == 4
        for token, top in zip(lp.tokens or [], lp.top_logprobs or [], strict=True):
            # Keyed by token text, as OpenAI's format is: two byte tokens that are each part of a
            # character both read U+FFFD and share a key.
            assert 1 <= len(top) <= 2 and token in top
        assert lp.text_offset == [sum(len(t) for t in (lp.tokens or [])[:i]) for i in range(4)]
        # Sampled: the chosen token's logprob is always there, outside the top k too (up to k + 1).
        for k in (0, 1):
            sampled = await client.completions.create(
                model="tiny",
                prompt="abc",
                max_tokens=8,
                temperature=2.0,
                seed=7,
                logprobs=k,
                extra_body={"ignore_eos": True},
            )
            lp = sampled.choices[0].logprobs
            assert lp is not None
            for token, logprob, top in zip(
                lp.tokens or [], lp.token_logprobs or [], lp.top_logprobs or [], strict=True
            ):
                assert token in top and len(top) <= k + 1
                if token != "\ufffd":  # (part of a character: shares its key with other such tokens)
                    assert top[token] == pytest.approx(logprob)
            if k == 0:
                assert all(len(top) == 1 for top in lp.top_logprobs or [])

    serve(runtime, scenario)


# --- bad input ----------------------------------------------------------------------------------


def chat(**kwargs: Any) -> tuple[str, dict[str, Any]]:
    return "chat", {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **kwargs}


def text(**kwargs: Any) -> tuple[str, dict[str, Any]]:
    return "completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4, **kwargs}


BAD_REQUESTS = {
    "temperature above 2": (chat(temperature=2.5), "temperature", "'temperature' must be 0 (greedy) or in"),
    "negative temperature": (chat(temperature=-0.5), "temperature", "'temperature' must be 0"),
    "tiny temperature": (chat(temperature=1e-9), "temperature", "got 1e-09"),
    "huge seed": (chat(seed=2**70), "seed", "'seed' must be in"),
    "top_p 0": (chat(top_p=0), "top_p", "'top_p' must be in (0, 1]"),
    "top_p above 1": (text(top_p=1.5), "top_p", "'top_p' must be in (0, 1]"),
    "empty prompt": (text(prompt=""), None, "the prompt is empty"),
    "empty messages": (chat(messages=[]), "messages", "'messages' must be a non-empty list"),
    "oversize prompt": (text(prompt="word " * 500), "prompt", "maximum context length is 64"),
    "oversize chat": (
        chat(messages=[{"role": "user", "content": "x" * 300}]),
        "messages",
        "maximum context length",
    ),
    "max_tokens beyond the context": (text(max_tokens=64), "max_tokens", "'max_tokens' must be less than 64"),
    "max_completion_tokens beyond the context": (
        chat(max_completion_tokens=70),
        "max_completion_tokens",
        "'max_completion_tokens' must be less than 64: this model's maximum context length is 64 tokens",
    ),
    "zero max_tokens": (text(max_tokens=0), "max_tokens", "'max_tokens' must be in [1,"),
    "unknown field": (chat(extra_body={"max_token": 5}), "max_token", "unknown field 'max_token'"),
    "unsupported penalty": (chat(frequency_penalty=0.5), "frequency_penalty", "is not supported"),
    "unsupported tools": (
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        "tools",
        "is not supported",
    ),
    "n above 1": (chat(n=2), "n", "only 'n': 1"),
    # Values of the wrong JSON type, as OpenAI's API refuses them (Python's True == 1 == 1.0 let
    # them through).
    "n as a decimal": (chat(n=1.0), "n", "only 'n': 1 is supported, got 1.0"),
    "best_of true": (text(best_of=True), "best_of", "'best_of' = True is not supported"),
    "frequency_penalty false": (chat(frequency_penalty=False), "frequency_penalty", "is not supported"),
    "echo 0": (text(echo=0), "echo", "'echo' = 0 is not supported"),
    "include_usage not a boolean": (
        chat(stream_options={"include_usage": "yes"}),
        "stream_options",
        "'stream_options.include_usage' must be true or false, got 'yes'",
    ),
    "too many stops": (chat(stop=["a", "b", "c", "d", "e"]), "stop", "up to 4 strings"),
    "a stop too long": (chat(stop=["x" * 4097]), "stop", "up to 4096 characters, got 4097"),
    # A 128 KiB value (under the body limit of a 64-token context) is not echoed whole: 80 characters.
    "a huge unknown field": (chat(extra_body={"k" * 2**17: 1}), "k" * 80, "... (131074 characters)"),
    "a huge value": (text(max_tokens="9" * 2**17), "max_tokens", "... (131074 characters)"),
    "completion logprobs above 5": (text(logprobs=9), "logprobs", "'logprobs' must be in [0, 5]"),
    "top_logprobs without logprobs": (chat(top_logprobs=2), "top_logprobs", "needs 'logprobs': true"),
    "priority not an integer": (
        chat(extra_body={"priority": "high"}),
        "priority",
        "'priority' must be an integer",
    ),
    "unknown role": (chat(messages=[{"role": "robot", "content": "x"}]), "messages", "role must be one of"),
    "image content": (
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        "messages",
        "only text parts",
    ),
    "token ids outside the vocabulary": (text(prompt=[300, 1]), None, "vocabulary"),
    "two prompts": (text(prompt=["a", "b"]), "prompt", "one prompt per request"),
    "stream_options without stream": (chat(stream_options={"include_usage": True}), "stream_options", "only"),
    "template refuses": (
        chat(messages=[{"role": "assistant", "content": "x"}]),
        None,
        "chat template refused the messages: the last message must not be the assistant's",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_input_is_a_400_with_a_message(runtime: ModelRuntime, case: str) -> None:
    (endpoint, kwargs), param, needle = BAD_REQUESTS[case]

    async def scenario(client: AsyncOpenAI, http: TestClient) -> None:
        create = client.chat.completions.create if endpoint == "chat" else client.completions.create
        streams = {"stream_options without stream": (False,), "include_usage not a boolean": (True,)}
        for stream in streams.get(case, (False, True)):
            with pytest.raises(openai.BadRequestError) as caught:
                await create(**kwargs, **({"stream": True} if stream else {}))  # type: ignore[call-overload]
            error = caught.value
            assert error.status_code == 400 and needle in error.message, error.message
            body = error.body
            assert isinstance(body, dict) and body["type"] == "invalid_request_error"
            assert body["param"] == param
        assert (await http.get("/healthz")).status == 200  # still alive

    serve(runtime, scenario)


def test_context_length_errors_count_what_they_refuse(runtime: ModelRuntime) -> None:
    """In OpenAI's and vLLM's words, which clients parse ("maximum context length is N tokens", vLLM's
    "you requested N output tokens and your prompt contains M input tokens"), with OpenAI's code and
    the field holding the prompt as ``param``: the token count once tokenized; before, where the text
    alone proves the prompt too long, its characters and the most the context leaves room for (as
    vLLM's own check of characters), not a lower bound of tokens far below the real count."""

    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        cases = [
            (
                text(prompt="x" * 54, max_tokens=11),
                "prompt",
                "This model's maximum context length is 64 tokens. However, you requested 11 output "
                "tokens and your prompt contains 54 input tokens, for a total of 65 tokens. Please reduce "
                "the length of the prompt or the number of requested output tokens.",
            ),
            (  # rendered "<user>" + 40 x + "\n<assistant>": 58 tokens
                chat(messages=[{"role": "user", "content": "x" * 40}], max_tokens=10),
                "messages",
                "your prompt contains 58 input tokens, for a total of 68 tokens.",
            ),
            (  # no max_tokens: what the context leaves, here nothing
                chat(messages=[{"role": "user", "content": "x" * 46}], max_tokens=None),
                "messages",
                "you requested 1 output tokens and your prompt contains 64 input tokens, for a total of 65",
            ),
            (  # no token of the tiny model holds more than 13 bytes ("<|endoftext|>")
                text(prompt="word " * 500, max_tokens=4),
                "prompt",
                "This model's maximum context length is 64 tokens. However, you requested 4 output tokens "
                "and your prompt contains 2500 characters (more than 780 characters, the most that 60 input "
                "tokens hold: no token of this model holds more than 13 bytes). Please reduce the length of "
                "the prompt or the number of requested output tokens.",
            ),
        ]
        for (endpoint, kwargs), param, needle in cases:
            create = client.chat.completions.create if endpoint == "chat" else client.completions.create
            with pytest.raises(openai.BadRequestError) as caught:
                await create(**{k: v for k, v in kwargs.items() if v is not None})  # type: ignore[call-overload]
            assert needle in caught.value.message, caught.value.message
            assert caught.value.body == {
                "message": caught.value.body["message"],  # type: ignore[index]
                "type": "invalid_request_error",
                "param": param,
                "code": "context_length_exceeded",
            }

    serve(runtime, scenario)


def test_unimplemented_fields_at_their_neutral_values_are_accepted(runtime: ModelRuntime) -> None:
    """Clients that send a field's default get an answer: in its own JSON type, and a number field's
    0 also as an integer, as OpenAI's API takes it."""
    neutral = [
        chat(frequency_penalty=0, presence_penalty=0.0, n=1, tools=[], tool_choice="none"),
        chat(frequency_penalty=0.0, presence_penalty=0, response_format={"type": "text"}, logit_bias={}),
        text(best_of=1, echo=False, suffix="", frequency_penalty=0, presence_penalty=0.0, n=1),
    ]

    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        for endpoint, kwargs in neutral:
            create = client.chat.completions.create if endpoint == "chat" else client.completions.create
            answer = await create(**{**kwargs, "max_tokens": 1})  # type: ignore[call-overload]
            assert answer.usage is not None and answer.usage.completion_tokens == 1

    serve(runtime, scenario)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b'{"model": "tiny", "prompt": "caf\xe9", "max_tokens": 2}', "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"prompt": "hi", "temperature": NaN}', "'temperature' must be a finite number"),
        (b'{"prompt": "hi", "top_p": Infinity}', "'top_p' must be a finite number"),
        (b'{"prompt": ' + b"[" * 200_000, "nested too deeply"),
        (b'{"prompt": "\\ud800x", "max_tokens": 2}', "'prompt' is not valid Unicode: a lone surrogate"),
        # json.loads raises a plain ValueError past int()'s 4,300 digits: it was a 500.
        (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON: Exceeds the limit"),
        # Large enough to be parsed on a worker thread (and under a 64-token context's body limit): its
        # errors are the same 400s.
        (b'{"prompt": "' + b"x" * OFF_LOOP_BYTES + b'", "temperature": NaN}', "'temperature' must be"),
    ],
    ids=[
        "latin-1 body",
        "invalid JSON",
        "not an object",
        "NaN temperature",
        "infinite top_p",
        "deep nesting",
        "lone surrogate",
        "5000-digit integer",
        "256 KiB body parsed off the loop",
    ],
)
def test_bodies_the_client_cannot_send_are_400_too(runtime: ModelRuntime, data: bytes, needle: str) -> None:
    async def scenario(_: AsyncOpenAI, http: TestClient) -> None:
        for path in ("/v1/completions", "/v1/chat/completions"):
            response = await http.post(path, data=data, headers={"Content-Type": "application/json"})
            assert response.status == 400
            error = (await response.json())["error"]
            assert needle in error["message"] or path.endswith("chat/completions"), error
            assert error["type"] == "invalid_request_error"

    serve(runtime, scenario)


def test_a_body_its_content_encoding_does_not_decode_is_a_400(
    runtime: ModelRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    """ "gzip" that is not gzip made request.read() raise out of the handler: a 500 and a traceback.
    Answered with a 400, it must not log aiohttp's "Unhandled exception" either (one traceback per
    hostile request, when aiohttp drains the rest of the body)."""

    async def scenario(_: AsyncOpenAI, http: TestClient) -> None:
        for encoding in ("gzip", "deflate"):
            # (aiohttp closes a connection whose body it could not read: one connection per try.)
            headers = {"Content-Encoding": encoding, "Connection": "close"}
            response = await http.post("/v1/completions", data=b'{"prompt": "hi"}', headers=headers)
            assert response.status == 400
            error = (await response.json())["error"]
            assert "cannot be decoded" in error["message"] and error["type"] == "invalid_request_error"
        assert (await http.get("/healthz")).status == 200

    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    serve(runtime, scenario)
    assert not [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.WARNING]


def test_a_gzip_bomb_is_refused_at_the_body_limit(runtime: ModelRuntime) -> None:
    """128 MiB of one letter in 128 KiB of gzip: inflated only up to the body limit, then a 413."""
    bomb = gzip.compress(b'{"prompt": "' + b"x" * (128 << 20), compresslevel=9)

    async def scenario(_: AsyncOpenAI, http: TestClient) -> None:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        response = await http.post("/v1/completions", data=bomb, headers=headers)
        assert response.status == 413
        assert "larger than" in (await response.json())["error"]["message"]
        assert (await http.get("/healthz")).status == 200

    serve(runtime, scenario)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (
            '"messages": [{"role": "user", "content": "a\\udfffb"}]',
            "messages[0].content is not valid Unicode",
        ),
        (
            '"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]',
            "messages[0].content",
        ),
        ('"messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]', "messages[0].name"),
        ('"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]', "'stop' is not valid"),
        ('"messages": [{"role": "user", "content": "hi"}], "model": "\\ud800"', "'model' is not valid"),
    ],
    ids=["content", "content part", "name", "stop", "model"],
)
def test_a_lone_surrogate_anywhere_in_a_chat_is_a_400(
    runtime: ModelRuntime, fields: str, needle: str
) -> None:
    """JSON escapes can carry what UTF-8 cannot: the tokenizer used to fail on it with a 500."""

    async def scenario(_: AsyncOpenAI, http: TestClient) -> None:
        data = ('{"max_tokens": 2, ' + fields + "}").encode()
        response = await http.post(
            "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
        )
        assert response.status == 400
        error = (await response.json())["error"]
        assert needle in error["message"] and "lone surrogate" in error["message"], error

    serve(runtime, scenario)


def test_other_model_is_404_and_unknown_paths_are_openai_errors(runtime: ModelRuntime) -> None:
    async def scenario(client: AsyncOpenAI, http: TestClient) -> None:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        assert caught.value.code == "model_not_found" and "does not exist here" in caught.value.message
        response = await http.post("/v1/embeddings", json={})
        assert response.status == 404 and "error" in await response.json()

    serve(runtime, scenario)


def test_a_404_echoes_a_huge_model_name_cut(runtime: ModelRuntime) -> None:
    """The name is the client's: a 1 MiB one made a 1 MiB error body (128 KiB here, under the body limit
    of a 64-token context)."""
    name = "m" * 2**17

    async def scenario(_: AsyncOpenAI, http: TestClient) -> None:
        response = await http.post("/v1/completions", json={"model": name, "prompt": "hi"})
        assert response.status == 404
        error = (await response.json())["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert error["message"] == (
            f"model '{'m' * 79}... ({2**17 + 2} characters) does not exist here (this server serves 'tiny')"
        )

    serve(runtime, scenario)


def test_a_serving_holder_refuses_a_model_name_longer_than_a_model_name_can_be(tiny: Any) -> None:
    """``weights-holder --serve`` answers to any name and echoes it in every chunk: a 7 MiB name made
    0.66 GiB of stream. A name over the CRD's modelName maxLength is a 400; one at it is served."""
    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny", max_batch=4, any_model_name=True))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)

    async def scenario(client: AsyncOpenAI, http: TestClient) -> None:
        for path, body in (
            ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}),
            ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}),
        ):
            response = await http.post(path, json={**body, "model": "m" * (MAX_MODEL_NAME_LEN + 1)})
            assert response.status == 400
            error = (await response.json())["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == "model"
            assert f"at most {MAX_MODEL_NAME_LEN}" in error["message"]
        longest = "team-a/" + "m" * (MAX_MODEL_NAME_LEN - 7)
        answer = await client.completions.create(model=longest, prompt="hi", max_tokens=2)
        assert answer.model == longest

    try:
        serve(rt, scenario)
    finally:
        rt.close()


def test_the_model_name_limit_is_the_crds() -> None:
    crd = yaml.safe_load((Path(__file__).parents[2] / "crds" / "inferencemodel.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["modelName"]["maxLength"] == MAX_MODEL_NAME_LEN


def test_unavailable_weights_are_503(tiny: Any) -> None:
    rt = ModelRuntime(ServeOptions(max_context=CONTEXT, model_name="tiny"))

    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="tiny", messages=MESSAGES)  # type: ignore[arg-type]
        assert caught.value.status_code == 503 and "not loaded" in caught.value.message

    serve(rt, scenario)


# --- load and departures ---------------------------------------------------------------------------


def test_a_full_queue_is_429_and_counts_only_what_waits(slow: ModelRuntime) -> None:
    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        args: dict[str, Any] = {"model": "tiny", "prompt": "abc", "max_tokens": 20, "temperature": 0}
        running = asyncio.ensure_future(client.completions.create(**args, extra_body={"ignore_eos": True}))
        await until(lambda: slow.stats()["running"] == 1)
        queued = asyncio.ensure_future(client.completions.create(**args))
        await until(lambda: slow.stats()["waiting"] == 1)  # max_batch 1: it waits for the slot
        with pytest.raises(openai.RateLimitError) as caught:
            await client.completions.create(**args)
        assert caught.value.status_code == 429 and "limit 1" in caught.value.message
        assert caught.value.code == "rate_limit_exceeded"
        first = await running
        assert first.usage is not None and first.usage.completion_tokens == 20
        await queued  # the slot freed: the queued one ran
        assert slow.stats()["waiting"] == 0

    serve(slow, scenario)


def test_a_streaming_client_that_disconnects_frees_its_blocks(slow: ModelRuntime) -> None:
    async def scenario(client: AsyncOpenAI, _: TestClient) -> None:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=15,
            stream=True,
            extra_body={"ignore_eos": True},  # type: ignore[arg-type]
        )
        async for _chunk in stream:
            break  # the first chunk came: the sequence is running and holds blocks
        assert slow.stats()["blocks_used"] > 0
        await stream.close()  # the client goes away
        # Blocks freed and the request counted as cancelled: two moments, so wait for both.
        await until(
            lambda: (
                slow.stats()["blocks_used"] == 0
                and slow.stats()["running"] == 0
                and slow.metrics.requests.labels("cancelled")._value.get() >= 1
            )
        )
        assert slow.metrics.generated_tokens._value.get() < 15  # stopped early, not run to the end

    serve(slow, scenario)


def test_a_waiting_client_that_disconnects_is_cancelled_too(slow: ModelRuntime) -> None:
    async def scenario(client: AsyncOpenAI, http: TestClient) -> None:
        body = {"model": "tiny", "prompt": "abc", "max_tokens": 40, "ignore_eos": True}
        with pytest.raises(asyncio.TimeoutError):  # a non-streamed request abandoned mid-generation
            await http.post("/v1/completions", json=body, timeout=ClientTimeout(total=0.5))
        # Blocks freed and the request counted as cancelled: two moments, so wait for both.
        await until(
            lambda: (
                slow.stats()["blocks_used"] == 0
                and slow.stats()["running"] == 0
                and slow.metrics.requests.labels("cancelled")._value.get() >= 1
            )
        )
        assert slow.metrics.generated_tokens._value.get() < 40

    serve(slow, scenario)


def test_a_client_that_leaves_a_fast_non_streamed_request_cancels_it(tiny: Any) -> None:
    """Tokens come faster than the disconnect poll here (a step takes a few ms): the client's departure
    must still be seen at the next token, not only after a quiet poll that never comes. Served as
    ``serve`` serves it (HttpServerThread: aiohttp does not cancel the handler when its client leaves,
    unlike the TestServer the other tests use)."""
    from vnpu.cluster.controlplane import free_port

    max_tokens = 1000
    rt = ModelRuntime(ServeOptions(max_context=1024, model_name="tiny", max_batch=4))
    rt.install(tiny.manifest, tiny.arena, shared=False, seconds=0.01)
    port = free_port()
    server = HttpServerThread(make_app(rt), "127.0.0.1", port)
    server.start()
    answered = rt.metrics.requests.labels

    async def scenario() -> None:
        body = json.dumps({"model": "tiny", "prompt": "abc", "max_tokens": max_tokens, "ignore_eos": True})
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        await writer.drain()
        await until(lambda: rt.metrics.generated_tokens._value.get() > 0)  # generating
        writer.close()  # the client goes away mid-generation
        await writer.wait_closed()
        await until(lambda: answered("cancelled")._value.get() + answered("200")._value.get() == 1)
        await until(lambda: rt.stats()["running"] == 0 and rt.stats()["blocks_used"] == 0)

    try:
        asyncio.run(scenario())
    finally:
        server.stop_then(lambda: None)
        server.join(30)
        rt.close()
    assert (answered("cancelled")._value.get(), answered("200")._value.get()) == (1, 0)
    assert rt.metrics.generated_tokens._value.get() < max_tokens


def test_priority_extension_and_metrics(runtime: ModelRuntime) -> None:
    async def scenario(client: AsyncOpenAI, http: TestClient) -> None:
        reply = await client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=3,
            extra_body={"priority": 7},  # type: ignore[arg-type]
        )
        assert reply.usage is not None
        text = await (await http.get("/metrics")).text()
        for name in (
            "vnpu_runtime_batch_size_bucket",
            "vnpu_runtime_kv_cache_blocks",
            "vnpu_runtime_requests_waiting 0.0",
            "vnpu_runtime_requests_running 0.0",
            "vnpu_runtime_preemptions_total",
            "vnpu_runtime_step_tokens_bucket",
        ):
            assert name in text, name
        assert json.loads(json.dumps(reply.model_dump()))["usage"]["total_tokens"] == reply.usage.total_tokens

    serve(runtime, scenario)
