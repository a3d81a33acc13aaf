"""HTTP API of ``vnpu runtime serve`` (aiohttp), shaped as OpenAI's so its clients work unchanged.

* ``POST /v1/chat/completions`` — the conversation rendered with the model's own chat template
  (:mod:`vnpu.runtime.chat`), then generated like a completion. ``max_completion_tokens`` (or
  ``max_tokens``) defaults to what the context leaves.
* ``POST /v1/completions`` — text completion (``prompt``: a string, token ids, or a list holding one
  of those; ``max_tokens`` defaults to 16).
* Both: ``stream`` (server-sent events ending with ``data: [DONE]``; with
  ``stream_options.include_usage`` a last chunk carries ``usage``), ``temperature``, ``top_p``,
  ``seed``, ``stop``, ``logprobs`` (chat: ``logprobs`` + ``top_logprobs``), ``usage`` on every
  non-streamed response, and the extensions ``priority`` (higher first; default: the model's),
  ``ignore_eos`` and ``return_token_ids``. Fields are validated by :mod:`vnpu.runtime.openai_protocol`.
* ``GET /v1/models`` (and ``/v1/models/{id}``, an id that may hold '/') — the one model this process
  serves.
* ``GET /healthz`` — the process is alive, and 503 once its engine is out of service for good (its
  steps failed ``MAX_CONSECUTIVE_STEP_FAILURES`` times in a row, as on a device in a sticky error
  state: a replica's liveness probe then has the kubelet restart it). ``GET /readyz`` — 200 only while
  the model can serve (503 with the reason otherwise).
* ``GET /metrics`` — Prometheus text format.

Errors use OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input
(non-UTF-8 or invalid JSON bodies, unknown fields, out-of-range values, empty prompts, prompts beyond
the context with code ``context_length_exceeded`` and the prompt's field as ``param``, more messages
than the context has tokens), 413 for
a body larger than any request that fits the context needs (:func:`body_limit`), 404 for another
model, 429 when the engine's waiting queue is full, 503 while the weights are unavailable (a 429
carries ``Retry-After: 1``, a 503 ``Retry-After: 5``), 500 for a failure, which says only "internal
error": the exception is in the server's log, its traceback logged once (by the engine thread for a
failed step). A failure after a stream started is sent as an ``error`` event before ``[DONE]``; so is
the 503 of a request still running when the server's drain runs out (see :class:`HttpServerThread`).

Each request is parsed, rendered and tokenized in the handler — tokenization in a worker thread,
outside every lock, and the prompt's length is checked against the context before tokenizing when
the text alone proves it too long; for a large body (``vnpu.jsonbody.OFF_LOOP_BYTES``) the parse, and
then the render and tokenizing, each wait their turn with every other large body's, so that one big
CPU job at most takes the GIL from the engine thread — and then submitted to the engine
(:class:`~vnpu.runtime.engine.ModelRuntime`), whose one loop batches all requests. A client that
disconnects cancels its request: the handler notices (a failed write, or a closed transport, checked
before each output and while it waits) and aborts it, which frees its KV blocks. So does a client that
stops reading its stream: a write that cannot go out within ``WRITE_STALL_S`` (the client's buffers
and the transport's are full) closes the connection and cancels the request, which would otherwise be
generated to ``max_tokens`` for nobody, its output held in memory and its connection open for good
(the idle timeout only applies between requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vnpu import sse
from vnpu.accesslog import AccessLogger
from vnpu.api import (
    DRAIN_ERROR_SEND_S,
    MAX_MODEL_NAME_LEN,
    REPLICA_DRAIN_S,
    SHUTDOWN_DELAY_S,
    shutdown_delay_s,
)
from vnpu.jsonbody import (
    BODY_TIMEOUT_S,
    HANDLERS_KEY,
    IDLE_CONNECTION_TIMEOUT_S,
    MAX_BODY_BYTES,
    WRITE_STALL_S,
    BodyError,
    BodyTimeoutError,
    cancel_handlers,
    disconnected,
    in_turn,
    is_large,
    parse_body,
    quiet_answered_body_errors,
    read_body,
    shown,
    shutdown_timeout,
    track_handler,
)
from vnpu.openai_error import SERVER_ERROR, SERVICE_UNAVAILABLE, error_body
from vnpu.runtime.engine import GenerationRequest, ModelRuntime, RequestHandle, RequestOutput
from vnpu.runtime.errors import ContextLengthError, InvalidRequestError, RuntimeUnavailableError
from vnpu.runtime.generate import context_length_error
from vnpu.runtime.openai_protocol import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    max_body_bytes,
    parse_chat,
    parse_completion,
    usage,
)
from vnpu.runtime.sampling import TokenLogprob
from vnpu.runtime.scheduler import QueueFullError

log = logging.getLogger(__name__)
T = TypeVar("T")
RUNTIME_KEY = web.AppKey("runtime", ModelRuntime)
_STARTED_KEY = web.AppKey("started", int)
_BODY_TIMEOUT_KEY = web.AppKey("body_timeout_s", float)
_WRITE_STALL_KEY = web.AppKey("write_stall_s", float)
#: Set when the server begins to stop: ``/readyz`` answers 503 while the listener is still open.
STOPPING_KEY = web.AppKey("stopping", threading.Event)
#: How often a handler waiting for tokens checks that its client is still connected (seconds).
DISCONNECT_POLL_S = 0.1
#: ``Retry-After`` of a 429 (seconds): the queue drains at the pace of the engine's steps.
RETRY_AFTER_QUEUE_FULL_S = 1
#: ``Retry-After`` of a 503 (seconds): weights being loaded or re-attached, as the gateway's own 503.
RETRY_AFTER_UNAVAILABLE_S = 5
#: Most of the time large bodies' parses, renders and tokenizing may take, one job at a time (see
#: vnpu.jsonbody): the engine thread, which needs the GIL at every step, decodes in the gaps. Three
#: clients posting 8 MiB chat bodies to a 131,072-token replica (under its body limit, all refused)
#: left it 91 tok/s of ~1,500 with no gaps, 772 with these. Only large bodies wait: one for the rest
#: of the one before it (three times that one's own time).
LARGE_JOBS_SHARE = 0.25


class HTTPError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = error_body(str(self), self.kind, self.code, self.param)
        return web.json_response(body, status=self.status, headers=self.headers)


def _as_http(error: Exception) -> HTTPError:
    if isinstance(error, HTTPError):
        return error
    if isinstance(error, BadRequest):
        return HTTPError(400, str(error), "invalid_request_error", None, error.param)
    if isinstance(error, ContextLengthError):
        return HTTPError(400, str(error), "invalid_request_error", "context_length_exceeded", error.param)
    if isinstance(error, InvalidRequestError):
        return HTTPError(400, str(error), "invalid_request_error")
    if isinstance(error, QueueFullError):
        retry = {"Retry-After": str(RETRY_AFTER_QUEUE_FULL_S)}
        return HTTPError(429, str(error), "requests", "rate_limit_exceeded", headers=retry)
    if isinstance(error, RuntimeUnavailableError):
        retry = {"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)}
        message = f"model is not available: {error}"
        return HTTPError(503, message, SERVER_ERROR, SERVICE_UNAVAILABLE, headers=retry)
    return HTTPError(500, "internal error (the server's log has the details)", SERVER_ERROR)


class _Failed(Exception):
    """The engine ended the request with ``error`` (and logged it, with its traceback, if unexpected)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def body_limit(runtime: ModelRuntime) -> int:
    """Largest request body (bytes) this replica reads: what a prompt of its context can need
    (:func:`~vnpu.runtime.openai_protocol.max_body_bytes`), at most ``MAX_BODY_BYTES``, the
    gateway's limit. Before the weights are in (no tokenizer yet) that limit: such a request gets
    its 503 once parsed."""
    try:
        token_bytes = runtime.tokenizer.max_token_bytes
    except RuntimeUnavailableError:
        return MAX_BODY_BYTES
    return max_body_bytes(runtime.options.max_context, token_bytes, MAX_BODY_BYTES)


async def _read_request(request: web.Request, parse: Callable[[Any], T]) -> tuple[T, bool]:
    """The body read and parsed into a typed request (off the loop when large; see vnpu.jsonbody),
    and whether it was large (its render and tokenizing then take their turn too); a body over
    :func:`body_limit` is refused before it is read or parsed."""
    runtime = request.app[RUNTIME_KEY]
    limit = body_limit(runtime)
    try:
        data = await read_body(request, request.app[_BODY_TIMEOUT_KEY], limit)
        return await parse_body(data, parse, LARGE_JOBS_SHARE), is_large(data)
    except web.HTTPRequestEntityTooLarge as e:
        context = runtime.options.max_context
        raise HTTPError(
            413,
            f"the request body is larger than {limit} bytes, the most a request to this model can need "
            f"(its context holds {context} tokens)",
            "invalid_request_error",
        ) from e
    except BodyTimeoutError as e:
        raise HTTPError(408, str(e), "invalid_request_error", "request_timeout") from e
    except BodyError as e:
        raise BadRequest(str(e)) from e


def _check_model(runtime: ModelRuntime, model: str | None) -> str:
    """The name the answer carries: the one asked for where any is served, else the server's own. A
    name asked for is echoed in every chunk, so it may be no longer than a modelName can be (a 7 MiB
    one made 0.66 GiB of stream)."""
    if runtime.options.any_model_name and model is not None and len(model) > MAX_MODEL_NAME_LEN:
        raise HTTPError(
            400,
            f"'model' is {len(model)} characters long; a model name may have at most {MAX_MODEL_NAME_LEN}",
            "invalid_request_error",
            param="model",
        )
    if model not in (None, runtime.model_name) and not runtime.options.any_model_name:
        raise HTTPError(
            404,
            f"model {shown(repr(model))} does not exist here (this server serves {runtime.model_name!r})",
            "invalid_request_error",
            "model_not_found",
            "model",
        )
    if not runtime.ready:
        raise _as_http(RuntimeUnavailableError(runtime.unavailable_reason or "not ready"))
    return model if model and runtime.options.any_model_name else runtime.model_name


def _tokenize(
    runtime: ModelRuntime, text: str, max_tokens: int | None, param: str, *, add_bos: bool | None = None
) -> list[int]:
    """Token ids of ``text`` (the request's field ``param``), refusing a prompt the text alone proves
    too long before tokenizing it (its characters more than the tokens the context leaves can hold, as
    vLLM's check of characters does). ``add_bos`` None: as the tokenizer's files say."""
    tokenizer = runtime.tokenizer
    if not text:
        raise InvalidRequestError("the prompt is empty")
    context, output = runtime.options.max_context, max_tokens or 1
    room = context - output  #: input tokens the context leaves
    if tokenizer.min_tokens(text) > room:
        most, widest = room * tokenizer.max_token_bytes, tokenizer.max_token_bytes
        raise context_length_error(
            context,
            output,
            f"{len(text)} characters (more than {most} characters, the most that {room} input tokens hold: "
            f"no token of this model holds more than {widest} bytes)",
            param,
        )
    return tokenizer.encode(text, add_bos=add_bos)


def _prepare(runtime: ModelRuntime, req: CompletionRequest | ChatRequest) -> tuple[list[int], int]:
    """Render and tokenize (in a worker thread: no lock held); returns the ids and max_tokens."""
    max_tokens = req.sampling.max_tokens
    param = "messages" if isinstance(req, ChatRequest) else "prompt"  # the field a context error names
    if isinstance(req, ChatRequest):
        template = runtime.chat_template
        if template is None:
            raise InvalidRequestError(
                f"model {runtime.model_name!r} has no chat template in its files; use /v1/completions"
            )
        text = template.render([m.to_template() for m in req.messages], add_generation_prompt=True)
        # The template writes the special tokens itself (``{{ bos_token }}`` in Llama 3's, Mistral's,
        # Gemma's): a BOS added on top made two. transformers' apply_chat_template and vLLM tokenize a
        # rendered chat without adding special tokens.
        ids = _tokenize(runtime, text, max_tokens, param, add_bos=False)
    elif isinstance(req.prompt, str):
        ids = _tokenize(runtime, req.prompt, max_tokens, param)
    else:
        ids = list(req.prompt)
    if max_tokens is None:  # chat: as many as the context leaves (at least one)
        max_tokens = max(runtime.options.max_context - len(ids), 1)
    runtime.validate_prompt(ids, max_tokens, param)
    return ids, max_tokens


@dataclass
class _Call:
    """One request in flight: what the response needs to be formatted."""

    kind: str  #: "chat" or "completion"
    id: str
    created: int
    model: str
    prompt_tokens: int
    include_usage: bool
    return_token_ids: bool
    logprobs: bool
    tokenizer_text: Callable[[int], str]
    token_bytes: Callable[[int], bytes]


def _logprobs_json(call: _Call, entries: list[TokenLogprob], offset: int) -> dict[str, Any] | None:
    if not call.logprobs:
        return None
    text = call.tokenizer_text
    if call.kind == "chat":

        def item(token: int, lp: float) -> dict[str, Any]:
            return {"token": text(token), "logprob": lp, "bytes": list(call.token_bytes(token))}

        content = [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
        ]
        return {"content": content, "refusal": None}
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(text(e.token_id))
    return {
        "tokens": [text(e.token_id) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        # "The API will always return the logprob of the sampled token, so there may be up to
        # logprobs+1 elements" (OpenAI's legacy completions; vLLM too): a sampled token outside the
        # top k is added, and ``logprobs: 0`` gives it alone.
        "top_logprobs": [
            {text(t): lp for t, lp in e.top} | {text(e.token_id): e.logprob}
            if text(e.token_id) not in {text(t) for t, _ in e.top}
            else {text(t): lp for t, lp in e.top}
            for e in entries
        ],
        "text_offset": offsets,
    }


def _choice(
    call: _Call,
    text: str,
    ids: list[int],
    probs: list[TokenLogprob],
    finish: str | None,
    stream: bool,
    offset: int = 0,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0}
    if call.kind == "chat":
        if stream:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    choice["logprobs"] = _logprobs_json(call, probs, offset)
    choice["finish_reason"] = finish
    if call.return_token_ids:
        choice["token_ids"] = ids
    return choice


def _envelope(call: _Call, choices: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
    obj = {"chat": "chat.completion", "completion": "text_completion"}[call.kind]
    if stream and call.kind == "chat":
        obj = "chat.completion.chunk"
    data: dict[str, Any] = {"id": call.id, "object": obj, "created": call.created, "model": call.model}
    if call.kind == "chat":
        data["system_fingerprint"] = None
    data["choices"] = choices
    return data


async def _next_output(outputs: asyncio.Queue[RequestOutput], request: web.Request) -> RequestOutput | None:
    """The request's next output, or None once its client has gone.

    The client is checked before every output, not only after a quiet poll: tokens come faster than
    ``DISCONNECT_POLL_S``, so a non-streamed request (or a stream whose steps write nothing) would
    otherwise run to ``max_tokens`` for nobody, holding its batch slot and KV blocks."""
    while True:
        if disconnected(request):
            return None
        if not outputs.empty():
            return outputs.get_nowait()
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(outputs.get(), DISCONNECT_POLL_S)


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    runtime = request.app[RUNTIME_KEY]
    metrics = runtime.metrics
    start = time.perf_counter()
    handle: RequestHandle | None = None
    finished = False
    untrack = track_handler(request)
    try:
        parse: Callable[[Any], CompletionRequest | ChatRequest] = functools.partial(
            parse_chat if kind == "chat" else parse_completion, context=runtime.options.max_context
        )
        try:
            req, large = await _read_request(request, parse)
        except ConnectionError:  # the client went away while its body was read
            metrics.requests.labels("cancelled").inc()
            log.info("client went away before its request arrived")
            return web.Response(status=499)
        served_name = _check_model(runtime, req.model)
        prepare = functools.partial(_prepare, runtime, req)
        if large:
            ids, max_tokens = await in_turn(prepare, LARGE_JOBS_SHARE)
        else:
            ids, max_tokens = await asyncio.to_thread(prepare)
        tokenizer = runtime.tokenizer
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(output: RequestOutput) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, output)

        handle = runtime.submit(
            GenerationRequest(tuple(ids), req.sampling.params(max_tokens), req.priority), sink
        )
        call = _Call(
            kind=kind,
            id=("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24],
            created=int(time.time()),
            model=served_name,
            prompt_tokens=len(ids),
            include_usage=req.include_usage,
            return_token_ids=req.return_token_ids,
            logprobs=req.sampling.logprobs is not None,
            tokenizer_text=tokenizer.token_text,
            token_bytes=tokenizer.token_bytes.__getitem__,
        )
        if req.stream:
            response = await _stream(request, call, outputs)
        else:
            response = await _collect(request, call, outputs)
        finished = response is not None
        if response is None:
            metrics.requests.labels("cancelled").inc()
            log.info("client went away", extra={"request": handle.id})
            return web.Response(status=499)
        metrics.requests.labels(str(response.status)).inc()
        metrics.request_seconds.observe(time.perf_counter() - start)
        return response
    except asyncio.CancelledError:
        metrics.requests.labels("cancelled").inc()
        raise
    except Exception as e:
        failure = e.error if isinstance(e, _Failed) else e
        error = _as_http(failure)
        if error.status == 500 and isinstance(e, _Failed):  # the engine logged its traceback
            log.info("request failed in the engine", extra={"error": repr(failure)})
        elif error.status == 500:
            log.exception("request failed")
        metrics.requests.labels(str(error.status)).inc()
        finished = True
        return error.response()
    finally:
        untrack()
        if handle is not None and not finished:
            handle.abort()


async def _collect(
    request: web.Request, call: _Call, outputs: asyncio.Queue[RequestOutput]
) -> web.Response | None:
    pieces: list[str] = []
    ids: list[int] = []
    probs: list[TokenLogprob] = []
    while True:
        out = await _next_output(outputs, request)
        if out is None:
            return None
        pieces.append(out.text)
        ids += out.token_ids
        probs += out.logprobs
        if out.finish_reason is not None:
            break
    if out.error is not None:
        raise _Failed(out.error)
    choice = _choice(call, "".join(pieces), ids, probs, out.finish_reason, stream=False)
    body = _envelope(call, [choice], stream=False)
    body["usage"] = usage(call.prompt_tokens, out.completion_tokens)
    return web.json_response(body)


async def _stream(
    request: web.Request, call: _Call, outputs: asyncio.Queue[RequestOutput]
) -> web.StreamResponse | None:
    """The request's outputs as server-sent events; None once its client has gone (a write to a closed
    transport raises aiohttp's ClientConnectionResetError: that is the client leaving, not a failure)
    or stopped reading (a write stalled for the app's ``write_stall_s``: the connection is closed)."""
    stall_s = request.app[_WRITE_STALL_KEY]
    response: web.StreamResponse | None = None
    offset = 0
    while True:
        out = await _next_output(outputs, request)
        if out is None:
            return None
        if out.error is not None and response is None:
            raise _Failed(out.error)  # nothing sent yet: an error response
        events: list[bytes] = []
        if response is None:
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            if call.kind == "chat":  # the first chunk announces the role, as OpenAI's does
                role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
                first = _envelope(call, [{**role, "logprobs": None, "finish_reason": None}], True)
                events.append(sse.event(_with_usage(call, first)))
        if out.error is not None:
            error = _as_http(out.error)
            events += [sse.event(error_body(str(error), error.kind, error.code)), sse.DONE]
        else:
            if out.text or out.logprobs or (call.return_token_ids and out.token_ids):
                choice = _choice(call, out.text, list(out.token_ids), list(out.logprobs), None, True, offset)
                events.append(sse.event(_with_usage(call, _envelope(call, [choice], True))))
                offset += len(out.text)
            if out.finish_reason is not None:
                last = _choice(call, "", [], [], out.finish_reason, True, offset)
                events.append(sse.event(_with_usage(call, _envelope(call, [last], True))))
                if call.include_usage:
                    final = _envelope(call, [], True)
                    final["usage"] = usage(call.prompt_tokens, out.completion_tokens)
                    events.append(sse.event(final))
                events.append(sse.DONE)
        try:
            async with asyncio.timeout(stall_s):
                if not response.prepared:
                    await response.prepare(request)
                if events:
                    await response.write(b"".join(events))
        except ConnectionError:  # the client went away during the write
            return None
        except TimeoutError:  # the client does not read: nothing more goes out on this connection
            log.warning(
                "client stopped reading its stream: connection closed, request cancelled",
                extra={"response": call.id, "stalled_s": stall_s},
            )
            if request.transport is not None:
                request.transport.abort()  # close() would wait for the unread bytes to go out
            return None
        if out.error is not None or out.finish_reason is not None:
            return response


def _with_usage(call: _Call, chunk: dict[str, Any]) -> dict[str, Any]:
    if call.include_usage:
        chunk["usage"] = None  # every chunk but the last, as OpenAI's
    return chunk


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


def _model_card(request: web.Request) -> dict[str, Any] | None:
    runtime = request.app[RUNTIME_KEY]
    if not runtime.model_name:
        return None
    return {
        "id": runtime.model_name,
        "object": "model",
        "created": request.app[_STARTED_KEY],
        "owned_by": "vnpu",
        "max_model_len": runtime.options.max_context,
    }


async def models(request: web.Request) -> web.Response:
    card = _model_card(request)
    return web.json_response({"object": "list", "data": [card] if card else []})


async def model(request: web.Request) -> web.Response:
    card = _model_card(request)
    name = request.match_info["model"]
    if card is None or card["id"] != name:
        return HTTPError(
            404, f"model {shown(repr(name))} does not exist here", "invalid_request_error", "model_not_found"
        ).response()
    return web.json_response(card)


async def healthz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME_KEY]
    if not runtime.healthy:
        return web.json_response({"status": "failed", "reason": runtime.unavailable_reason}, status=503)
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME_KEY]
    if request.app[STOPPING_KEY].is_set():  # still serving, but to be taken out of its Services
        return web.json_response({"status": "unavailable", "reason": "shutting down"}, status=503)
    if runtime.ready:
        return web.json_response({"status": "ready", "model": runtime.model_name})
    return web.json_response({"status": "unavailable", "reason": runtime.unavailable_reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME_KEY]
    body = generate_latest(runtime.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def openai_errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Unknown paths and wrong methods under /v1 answer with OpenAI's error object too."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if not request.path.startswith("/v1/") or e.status < 400:
            raise
        return web.json_response(error_body(e.reason, "invalid_request_error"), status=e.status)


def make_app(
    runtime: ModelRuntime, body_timeout_s: float = BODY_TIMEOUT_S, write_stall_s: float = WRITE_STALL_S
) -> web.Application:
    """The server's application; the waiting-queue limit is ``runtime.options.max_queue``, a request's
    body must arrive within ``body_timeout_s`` and each write of a stream go out within
    ``write_stall_s``."""
    quiet_answered_body_errors()
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[openai_errors])
    app[RUNTIME_KEY] = runtime
    app[_STARTED_KEY] = int(time.time())
    app[_BODY_TIMEOUT_KEY] = body_timeout_s
    app[_WRITE_STALL_KEY] = write_stall_s
    app[HANDLERS_KEY] = set()
    app[STOPPING_KEY] = threading.Event()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)  # the rest of the path: a name may hold '/'
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


class HttpServerThread:
    """An aiohttp app served from its own thread and event loop; :meth:`stop_then` closes it gracefully
    and then calls ``after``: ``/readyz`` turns 503 at once, the listener stays open for the first
    ``shutdown_delay`` of the drain (:data:`vnpu.api.SHUTDOWN_DELAY_S`: until Kubernetes has taken the
    pod out of its Services), then no new connections, and requests in flight get up to ``drain_s`` (the
    model's drain, counted from the stop) to finish. Those still running then fail with "the server is
    shutting down" (a 503, or an ``error`` event and ``[DONE]`` on a stream, as any failure mid-stream)
    and get ``DRAIN_ERROR_SEND_S`` to send it; the handlers left then (a client that does not read) are
    cancelled. The stop thus ends by ``drain_s + DRAIN_ERROR_SEND_S``, inside the replica pod's grace
    period (``vnpu.api.replica_grace_s``). Left to aiohttp alone, a request still running at the end of
    its ``shutdown_timeout`` was cut off without a word, and only after a second ``shutdown_timeout``
    (aiohttp first cancels the request's body, which a handler waiting for tokens never reads)."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        idle_timeout_s: float = IDLE_CONNECTION_TIMEOUT_S,
        drain_s: float = float(REPLICA_DRAIN_S),
        shutdown_delay: float = float(SHUTDOWN_DELAY_S),
    ) -> None:
        self._app, self._host, self._port = app, host, port
        self._idle_timeout_s = idle_timeout_s
        self._drain_s = drain_s
        self._listen_s = shutdown_delay_s(shutdown_delay, drain_s)
        # aiohttp's own bound, which the drain's end comes before (see _end_drain).
        self._shutdown_timeout_s = shutdown_timeout(drain_s + DRAIN_ERROR_SEND_S)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._stopping = False

    def start(self) -> None:
        """Serve; raises what kept the server from listening (a port in use, say)."""
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._runner = web.AppRunner(
                self._app,
                shutdown_timeout=self._shutdown_timeout_s,
                keepalive_timeout=self._idle_timeout_s,
                access_log_class=AccessLogger,  # probes and scrapes only when their status changes
            )
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self._host, self._port)
            self._loop.run_until_complete(site.start())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    def stop_then(self, after: Callable[[], object]) -> None:
        if self._stopping or not self._thread.is_alive():
            after()
            return
        self._stopping = True

        async def shutdown() -> None:
            drain = self._loop.create_task(self._end_drain())
            try:
                self._app[STOPPING_KEY].set()
                if self._listen_s:
                    log.info("stopping: not ready, still accepting", extra={"seconds": self._listen_s})
                    await asyncio.sleep(self._listen_s)
                if self._runner is not None:
                    await self._runner.cleanup()
            finally:
                drain.cancel()
                after()
                self._loop.stop()

        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(shutdown()))

    async def _end_drain(self) -> None:
        """At the end of the drain, fail the requests still running (the runtime takes no new one) so
        that their handlers answer with the error; ``DRAIN_ERROR_SEND_S`` later, cancel the handlers
        still there (a write stalled on a client that does not read, a body still arriving)."""
        await asyncio.sleep(self._drain_s)
        running = len(self._app[HANDLERS_KEY])
        if not running:
            return
        log.warning(
            "drain over: the requests still running fail",
            extra={"requests": running, "drain_s": self._drain_s},
        )
        self._app[RUNTIME_KEY].stop()
        await asyncio.sleep(DRAIN_ERROR_SEND_S)
        cancel_handlers(self._app)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
