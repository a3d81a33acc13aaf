"""Length-prefixed JSON messages over a unix stream socket, with file descriptors (SCM_RIGHTS).

Frame: 4-byte big-endian payload length sent in one ``sendmsg`` together with any file descriptors,
then the UTF-8 JSON payload. JSON, not pickle: a replica must never execute what a socket sends it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from typing import Any

import vnpu.shown

_HEADER = struct.Struct(">I")
MAX_MESSAGE = 64 * 1024 * 1024
MAX_FDS = 8
#: Longest echo of a peer's value in an error or a log line (see :func:`shown`).
MAX_SHOWN_CHARS = 64


class ProtocolError(ConnectionError):
    """The peer closed the connection or sent something that is not a valid frame."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def send_message(
    sock: socket.socket,
    message: dict[str, Any],
    fds: list[int] | tuple[int, ...] = (),
    deadline: float | None = None,
) -> None:
    send_encoded(sock, encode(message), fds, deadline)


def send_encoded(
    sock: socket.socket,
    payload: bytes,
    fds: list[int] | tuple[int, ...] = (),
    deadline: float | None = None,
) -> None:
    """Send an already JSON-encoded object (lets a server encode a large constant part once). With a
    ``deadline`` (``time.monotonic()``) the whole frame must be sent by then, however slowly the peer
    reads."""
    if len(payload) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE}")
    header = _HEADER.pack(len(payload))
    settimeout_until(sock, deadline)
    if fds:
        socket.send_fds(sock, [header], list(fds))
    else:
        sock.sendall(header)
    settimeout_until(sock, deadline)
    sock.sendall(payload)


def shown(value: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """``repr(value)`` of a peer's value, cut to ``limit`` characters (saying so) before it goes into an
    error, a reply or a log line: a peer without the key may send a 64 KiB ``op``."""
    return vnpu.shown.shown(repr(value), limit)


def settimeout_until(sock: socket.socket, deadline: float | None) -> None:
    """Let the next socket call wait only until ``deadline`` (``time.monotonic()``; None: no change).
    A timeout per call is not a deadline: a peer that sends a byte just before each runs out would
    keep the exchange going forever."""
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise ProtocolError("the peer did not finish in time (deadline passed)")
    sock.settimeout(left)


def _recv_exact(sock: socket.socket, count: int, deadline: float | None = None) -> bytes:
    chunks = bytearray()
    while len(chunks) < count:
        settimeout_until(sock, deadline)
        chunk = sock.recv(count - len(chunks))
        if not chunk:
            raise ProtocolError("connection closed by peer")
        chunks += chunk
    return bytes(chunks)


def recv_message(
    sock: socket.socket, max_size: int = MAX_MESSAGE, deadline: float | None = None
) -> tuple[dict[str, Any], list[int]]:
    """One message and the file descriptors that came with it (the caller owns and closes them). With
    a ``deadline`` (``time.monotonic()``) the whole message must have arrived by then, however the
    peer spreads its bytes."""
    settimeout_until(sock, deadline)
    data, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, MAX_FDS)
    if not data:
        for fd in fds:
            _close_quietly(fd)
        raise ProtocolError("connection closed by peer")
    try:
        if len(data) < _HEADER.size:
            data += _recv_exact(sock, _HEADER.size - len(data), deadline)
        (length,) = _HEADER.unpack(data)
        if length > max_size:
            raise ProtocolError(f"peer announced a {length}-byte message (limit {max_size})")
        message = json.loads(_recv_exact(sock, length, deadline))
        if not isinstance(message, dict):
            raise ProtocolError("message is not a JSON object")
    except (ValueError, OSError, RecursionError) as e:  # RecursionError: JSON nested too deep to parse
        for fd in fds:
            _close_quietly(fd)
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError(f"bad message: {e}") from e
    return message, fds


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
