"""Reading a JSON request body: the one place for what a hostile body can do to the runtime's and the
gateway's OpenAI endpoints.

- a ``Content-Encoding`` that does not decode (a gzip body that is not gzip) raised out of
  ``request.read()`` as a 500 and a traceback per request;
- bytes that are not UTF-8, nesting past the decoder's recursion limit;
- an integer of more than 4,300 digits: ``json.loads`` raises a plain ``ValueError`` (``int()``'s own
  limit), which was a 500;
- megabytes of JSON (hundreds of thousands of chat messages) held the event loop for a second or more
  per body, and with it every stream and the liveness probe. Such bodies are parsed on a worker thread,
  one at a time: ``json.loads`` holds the GIL while it runs, so the thread does not free the loop, it
  only makes the parse take turns with it (the interpreter switches threads every 5 ms). The loop
  still slows while a large body parses; with one parse at a time it keeps about half the GIL, where
  several parsing threads would leave it a share each. Other CPU work a large body brings (the
  runtime's rendering of its chat template and tokenizing) takes the same turns, through
  :func:`in_turn`, so at most one such job competes with the loop and the runtime's engine thread.
  One is still too many for a thread that needs the GIL at every step: ``json.loads`` of 8 MiB holds
  it for 80 ms in one C call, which the switch interval cannot cut, and the runtime's engine decoded at
  ~5% of its rate while large jobs followed one another. So a caller may give large jobs a ``share``
  of the time (the runtime gives them a quarter): the gaps between them are the engine's.

A value from a body echoed in an error is cut by :func:`shown` (a 7 MiB ``model`` made a 7 MiB 404).

A body over the application's ``client_max_size``, or over the caller's own ``max_bytes`` (the
runtime's limit for its context), raises aiohttp's ``HTTPRequestEntityTooLarge`` (a 413), which each
caller answers as its API does; a ``Content-Length`` over ``max_bytes`` is refused before a byte of
the body is read.

Slow clients: a body that does not arrive within ``BODY_TIMEOUT_S`` raises :class:`BodyTimeoutError`
(a 408), so a client trickling bytes cannot hold a handler and its buffers for good; and both servers
close a connection that has not sent a whole request head within ``IDLE_CONNECTION_TIMEOUT_S`` (aiohttp's
keep-alive timeout, which covers a connection that sent nothing or trickles its headers; an
``AppRunner``'s default is 3,630 s). A client that stops reading its answer is the same threat the
other way: a write of a streamed answer that cannot go out within ``WRITE_STALL_S`` (the client's
buffers and the transport's are full) closes the connection. The idle timeout only applies between
requests, so without it such a client held its handler, socket and buffers for good (and, on a
replica, a sequence generated for nobody).
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from vnpu.shown import MAX_SHOWN_CHARS as MAX_SHOWN_CHARS  # (re-exported for the servers)
from vnpu.shown import shown as shown

T = TypeVar("T")

#: Largest request body (bytes) the runtime and the gateway accept: one limit, so the gateway never
#: forwards what every replica refuses (a prompt of a few hundred thousand tokens fits).
MAX_BODY_BYTES = 8 * 1024 * 1024
#: Bodies from this size on are decoded and parsed on a worker thread, one at a time (JSON parses at
#: ~50 MB/s here: 256 KiB holds the loop ~5 ms; the 8 MiB limit, with the parse of its messages, over a
#: second).
OFF_LOOP_BYTES = 256 * 1024
#: One large job (a parse, a render) at a time per event loop (see the module's docstring). Keyed by
#: loop: an asyncio semaphore belongs to the loop it first waits on, and the runtime serves from its own.
_LARGE_JOBS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


#: Seconds a client has to send a whole request body once its head is in (nginx's client_body_timeout).
BODY_TIMEOUT_S = 60.0
#: Seconds a connection may stay open without a whole request head (nginx's keepalive_timeout).
IDLE_CONNECTION_TIMEOUT_S = 75.0
#: Seconds one write of an answer may wait for its client to read (nginx's send_timeout) before the
#: connection is closed (and the work for it stopped: the runtime cancels the request, the gateway
#: closes its request to the replica).
WRITE_STALL_S = 30.0


def disconnected(request: web.Request) -> bool:
    """Has the request's client gone (its connection closed or closing)?"""
    transport = request.transport
    return transport is None or transport.is_closing()


def shutdown_timeout(drain_s: float) -> float:
    """aiohttp's ``shutdown_timeout`` for a drain of ``drain_s`` seconds: aiohttp reads 0 as no bound
    at all (it would wait for every request in flight, until the kubelet's SIGKILL), so a drain of 0
    is the shortest wait it does bound."""
    return max(drain_s, 0.01)


#: The request handlers of an app that a drain that runs out cancels (the runtime's completions, the
#: gateway's): left to aiohttp, one still running at the end of ``shutdown_timeout`` took a second one
#: (aiohttp first cancels only the request's body, which a handler streaming an answer never reads).
HANDLERS_KEY = web.AppKey("handlers", set)


def track_handler(request: web.Request) -> Callable[[], None]:
    """Note the task running ``request``'s handler for :func:`cancel_handlers` (the app holds
    ``HANDLERS_KEY``); returns what forgets it, to call as the handler ends."""
    handlers: set[asyncio.Task[Any]] = request.app[HANDLERS_KEY]
    task = asyncio.current_task()
    assert task is not None
    handlers.add(task)
    return lambda: handlers.discard(task)


def cancel_handlers(app: web.Application) -> int:
    """Cancel the handlers still running (a drain ran out); returns how many."""
    handlers: set[asyncio.Task[Any]] = app[HANDLERS_KEY]
    for task in list(handlers):
        task.cancel()
    return len(handlers)


class _AnsweredBodyErrors(logging.Filter):
    """Drops aiohttp's "Unhandled exception" for a body that does not decode.

    After a handler answers, aiohttp drains the unread rest of the body, and a body that does not
    decode raises again there. aiohttp logs that with a traceback, once per hostile request, which
    floods the logs. :func:`read_json` has already answered such a body with a 400, so the record
    adds nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, web.RequestPayloadError)


_ANSWERED = _AnsweredBodyErrors()


def quiet_answered_body_errors() -> None:
    """Install the filter on aiohttp's server logger (once per process; each app calls this)."""
    server_log = logging.getLogger("aiohttp.server")
    if _ANSWERED not in server_log.filters:
        server_log.addFilter(_ANSWERED)


class BodyError(ValueError):
    """Why a request body cannot be used: the client's mistake (a 400), said in words."""


class BodyTimeoutError(BodyError):
    """The body did not arrive within ``BODY_TIMEOUT_S``: a 408."""


def parse_json(data: bytes) -> Any:
    """``data`` as JSON, or BodyError saying why not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BodyError(f"the request body is not valid JSON: {e}") from e
    except RecursionError as e:  # the decoder's own limit on nesting ('[[[[...')
        raise BodyError("the request body is not valid JSON: nested too deeply") from e
    except ValueError as e:  # an integer of more than 4,300 digits (int()'s limit on conversions)
        raise BodyError(f"the request body is not valid JSON: {e}") from e


async def read_body(
    request: web.Request, timeout_s: float = BODY_TIMEOUT_S, max_bytes: int | None = None
) -> bytes:
    """The body's bytes (decoded per its ``Content-Encoding``). Raises aiohttp's
    ``HTTPRequestEntityTooLarge`` past ``max_bytes`` (or the app's ``client_max_size``), before reading
    when ``Content-Length`` says so; BodyError for a body that does not decode, BodyTimeoutError when it
    is not all in within ``timeout_s``."""
    declared = request.content_length
    if max_bytes is not None and declared is not None and declared > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=declared)
    try:
        async with asyncio.timeout(timeout_s):
            data = await request.read()
    except TimeoutError as e:
        raise BodyTimeoutError(f"the request body did not arrive within {timeout_s:g} s") from e
    except (BadHttpMessage, web.RequestPayloadError) as e:  # e.g. a Content-Encoding that does not decode
        detail = str(e).strip().splitlines()[-1].strip()  # aiohttp's "400, message:\n  <why>": the why
        raise BodyError(f"the request body cannot be decoded: {detail}") from e
    if max_bytes is not None and len(data) > max_bytes:  # chunked, or inflated past it
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=len(data))
    return data


def is_large(data: bytes) -> bool:
    """Is the work on this body (its parse, and what the caller derives from it) done in turns?"""
    return len(data) >= OFF_LOOP_BYTES


async def parse_body(data: bytes, then: Callable[[Any], T] = lambda body: body, share: float = 1.0) -> T:
    """``data`` parsed as JSON and passed through ``then`` (the caller's own parse into a typed
    request): on the loop when small, else in turn (:func:`in_turn`, with ``share``). Raises BodyError
    for a body that is not JSON, and whatever ``then`` raises."""
    if not is_large(data):
        return then(parse_json(data))
    return await in_turn(lambda: then(parse_json(data)), share)


async def read_json(
    request: web.Request, then: Callable[[Any], T] = lambda body: body, timeout_s: float = BODY_TIMEOUT_S
) -> T:
    """:func:`read_body`, then :func:`parse_body`."""
    return await parse_body(await read_body(request, timeout_s), then)


async def in_turn(job: Callable[[], T], share: float = 1.0) -> T:
    """``job()`` on a worker thread, one such job at a time per event loop (see the module's
    docstring), and busy at most ``share`` of the time: after this job's t seconds the next one waits
    another t * (1 / share - 1). A caller cancelled meanwhile does not stop the thread: the turn ends
    with the job (and its rest)."""
    loop = asyncio.get_running_loop()
    gate = _LARGE_JOBS.get(loop)
    if gate is None:
        gate = _LARGE_JOBS[loop] = asyncio.Semaphore(1)
    await gate.acquire()
    started = loop.time()
    running = asyncio.ensure_future(asyncio.to_thread(job))
    running.add_done_callback(lambda done: _ended(gate, done, (loop.time() - started) * (1 / share - 1)))
    # A client that leaves cancels its handler, not the thread: the gate stays shut until the job ends.
    return await asyncio.shield(running)


def _ended(gate: asyncio.Semaphore, job: asyncio.Future[Any], rest_s: float) -> None:
    if rest_s > 0:
        asyncio.get_running_loop().call_later(rest_s, gate.release)
    else:
        gate.release()
    if not job.cancelled():
        job.exception()  # retrieved: a job whose caller was cancelled logs no "never retrieved"
