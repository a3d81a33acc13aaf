"""HTTP API of ``vnpu runtime serve`` (aiohttp).

* ``POST /v1/completions`` — OpenAI-style text completion (``prompt``, ``max_tokens`` (16),
  ``temperature`` (1.0; 0 = greedy), ``top_p``, ``seed``, ``stop``, ``stream``). Streaming answers are
  server-sent events ending with ``data: [DONE]``. Errors use OpenAI's ``{"error": {...}}`` shape:
  400 for bad input and requests beyond the context, 404 for an unknown model, 429 when the queue is
  full, 503 while the weights are unavailable (e.g. the weights-holder is gone).
* ``GET /healthz`` — the process is alive. ``GET /readyz`` — 200 only while the model can serve.
* ``GET /metrics`` — Prometheus text format.

Generation runs in a worker thread, one request at a time (requests queue up to ``max_queue``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vnpu.runtime.engine import ModelRuntime
from vnpu.runtime.errors import ContextLengthError, InvalidRequestError, RuntimeUnavailableError

log = logging.getLogger("vnpu.runtime.server")
RUNTIME_KEY = web.AppKey("runtime", ModelRuntime)
_QUEUE_KEY = web.AppKey("queue", dict)


class BadRequest(ValueError):
    pass


def _error(status: int, message: str, kind: str, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)


def _code(error: Exception) -> str | None:
    return "context_length_exceeded" if isinstance(error, ContextLengthError) else None


def parse_completion_request(body: Any) -> dict[str, Any]:
    """Validate an OpenAI completion body into keyword arguments for :meth:`ModelRuntime.complete`."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)
    ):
        pass
    elif not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string, a list with one string, or a list of token ids")

    def number(key: str, default: float, low: float, high: float) -> float:
        value = body.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise BadRequest(f"'{key}' must be a number in [{low}, {high}]")
        return float(value)

    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("'max_tokens' must be a positive integer")
    if body.get("n", 1) not in (1, None):
        raise BadRequest("only n=1 is supported")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or a list of up to 4 strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer")
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": number("temperature", 1.0, 0.0, 2.0),
        "top_p": number("top_p", 1.0, 0.0, 1.0) or 1.0,
        "seed": seed,
        "stop": stop,
    }


async def completions(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME_KEY]
    queue = request.app[_QUEUE_KEY]
    try:
        body = await request.json()
        kwargs = parse_completion_request(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        runtime.metrics.requests.labels("400").inc()
        return _error(400, "request body is not valid JSON", "invalid_request_error")
    except BadRequest as e:
        runtime.metrics.requests.labels("400").inc()
        return _error(400, str(e), "invalid_request_error")
    model = body.get("model")
    if model not in (None, "", runtime.model_name):
        runtime.metrics.requests.labels("404").inc()
        return _error(
            404,
            f"model {model!r} does not exist here (this server serves {runtime.model_name!r})",
            "invalid_request_error",
            "model_not_found",
        )
    if not runtime.ready:
        runtime.metrics.requests.labels("503").inc()
        return _error(503, f"model is not available: {runtime.unavailable_reason}", "service_unavailable")
    if queue["waiting"] >= queue["max"]:
        runtime.metrics.requests.labels("429").inc()
        return _error(429, f"too many queued requests (limit {queue['max']})", "rate_limit_exceeded")
    completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    name = runtime.model_name
    start = time.perf_counter()
    if body.get("stream"):
        return await _stream(request, runtime, queue, kwargs, completion_id, created, name, start)
    queue["waiting"] += 1
    runtime.metrics.requests_in_flight.set(queue["waiting"])
    try:
        completion = await asyncio.to_thread(
            runtime.complete, kwargs.pop("prompt"), kwargs.pop("max_tokens"), **kwargs
        )
    except InvalidRequestError as e:
        runtime.metrics.requests.labels("400").inc()
        return _error(400, str(e), "invalid_request_error", _code(e))
    except RuntimeUnavailableError as e:
        runtime.metrics.requests.labels("503").inc()
        return _error(503, f"model is not available: {e}", "service_unavailable")
    finally:
        queue["waiting"] -= 1
        runtime.metrics.requests_in_flight.set(queue["waiting"])
    runtime.metrics.requests.labels("200").inc()
    runtime.metrics.request_seconds.observe(time.perf_counter() - start)
    result = completion.result
    choice: dict[str, Any] = {
        "index": 0,
        "text": completion.text,
        "logprobs": None,
        "finish_reason": completion.finish_reason,
    }
    if body.get("return_token_ids"):  # vLLM's extension: the generated ids, for exact comparisons
        choice["token_ids"] = result.token_ids
    return web.json_response(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": len(result.token_ids),
                "total_tokens": completion.prompt_tokens + len(result.token_ids),
            },
        }
    )


async def _stream(
    request: web.Request,
    runtime: ModelRuntime,
    queue: dict[str, int],
    kwargs: dict[str, Any],
    completion_id: str,
    created: int,
    name: str,
    start: float,
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    state = {"cancelled": False}

    def on_text(text: str) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, text)

    def chunk(text: str, finish: str | None) -> bytes:
        data = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": name,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }
        return f"data: {json.dumps(data)}\n\n".encode()

    queue["waiting"] += 1
    runtime.metrics.requests_in_flight.set(queue["waiting"])
    task = asyncio.ensure_future(
        asyncio.to_thread(
            runtime.complete,
            kwargs.pop("prompt"),
            kwargs.pop("max_tokens"),
            on_text=on_text,
            cancelled=lambda: state["cancelled"],
            **kwargs,
        )
    )
    task.add_done_callback(lambda _: pieces.put_nowait(None))
    response: web.StreamResponse | None = None
    try:
        while True:
            text = await pieces.get()
            if text is None:
                break
            if response is None:
                response = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await response.prepare(request)
            await response.write(chunk(text, None))
        try:
            completion = task.result()
        except (InvalidRequestError, RuntimeUnavailableError) as e:
            status, kind = (
                (400, "invalid_request_error")
                if isinstance(e, InvalidRequestError)
                else (503, "service_unavailable")
            )
            runtime.metrics.requests.labels(str(status)).inc()
            if response is None:
                return _error(status, str(e), kind, _code(e))
            await response.write(
                f"data: {json.dumps({'error': {'message': str(e), 'type': kind}})}\n\n".encode()
            )
            await response.write(b"data: [DONE]\n\n")
            return response
        if response is None:
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
        await response.write(chunk("", completion.finish_reason))
        await response.write(b"data: [DONE]\n\n")
        runtime.metrics.requests.labels("200").inc()
        runtime.metrics.request_seconds.observe(time.perf_counter() - start)
        return response
    except (ConnectionResetError, asyncio.CancelledError):
        state["cancelled"] = True  # the client went away: stop generating at the next token
        raise
    finally:
        queue["waiting"] -= 1
        runtime.metrics.requests_in_flight.set(queue["waiting"])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME_KEY]
    if runtime.ready:
        return web.json_response({"status": "ready", "model": runtime.model_name})
    return web.json_response({"status": "unavailable", "reason": runtime.unavailable_reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME_KEY]
    body = generate_latest(runtime.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(runtime: ModelRuntime, max_queue: int = 64) -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[RUNTIME_KEY] = runtime
    app[_QUEUE_KEY] = {"waiting": 0, "max": max_queue}
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
