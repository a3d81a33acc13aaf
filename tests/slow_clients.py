"""What a hostile slow client does to an HTTP server of ours, seen from the wire (raw sockets): one
that trickles its request head, one that trickles its body, and a well-behaved client meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

#: A request head that never ends: one more header line every TRICKLE_S.
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: vnpu\r\n"
BODY_HEAD = (
    b"POST /v1/completions HTTP/1.1\r\nHost: vnpu\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n"
)
TRICKLE_S = 0.3


async def _trickle(writer: asyncio.StreamWriter, first: bytes, more: bytes) -> None:
    writer.write(first)
    with contextlib.suppress(ConnectionError):
        while not writer.is_closing():
            await writer.drain()
            await asyncio.sleep(TRICKLE_S)
            writer.write(more)


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    body = await reader.readexactly(int(headers["Content-Length"]))
    return int(lines[0].split()[1]), json.loads(body)


async def _hung_up(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection without answering (a reset counts: our trickle may
    write after the server's FIN)."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True


async def _healthz(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: vnpu\r\nConnection: close\r\n\r\n")
    status = await reader.readline()
    writer.close()
    return status


async def probe(port: int, limit_s: float) -> dict[str, Any]:
    """Open both slow clients, check a third client is served meanwhile, and return what each slow
    one got within ``limit_s``: ``head_closed`` (the server hung up on the trickled head) and
    ``body`` (the status and JSON answer to the trickled body)."""
    head_reader, head_writer = await asyncio.open_connection("127.0.0.1", port)
    body_reader, body_writer = await asyncio.open_connection("127.0.0.1", port)
    trickles = [
        asyncio.create_task(_trickle(head_writer, HEAD, b"X-Slow: 1\r\n")),
        asyncio.create_task(_trickle(body_writer, BODY_HEAD + b'{"prompt": "', b"a")),
    ]
    try:
        served = await asyncio.wait_for(_healthz(port), limit_s)
        head_closed = await asyncio.wait_for(_hung_up(head_reader), limit_s)
        status, answer = await asyncio.wait_for(_response(body_reader), limit_s)
    finally:
        for task in trickles:
            task.cancel()
        head_writer.close()
        body_writer.close()
    return {
        "served": served.startswith(b"HTTP/1.1 200"),
        "head_closed": head_closed,
        "status": status,
        "body": answer,
    }
