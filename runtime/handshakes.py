"""Who a weights-holder lets wait in its handshake, and how it logs what any peer can cause at will.

A peer without the share group's key may still connect (it can pass ``SO_PEERCRED``: a pod of the
group's uid) and hold a connection in its handshake. :class:`PendingHandshakes` bounds how many do at
once and chooses whom to cut for a newcomer, so that such peers never push a replica out;
:func:`hello_ticket` is how a replica's hello shows it holds the key before the challenge. See the
limits in :mod:`vnpu.runtime.holder`'s docstring.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vnpu import sharing


def hello_ticket(key: bytes, identity: sharing.ShareIdentity, client_nonce: str) -> str:
    """What a replica's hello carries to show the holder that it holds the key, before the challenge:
    an HMAC of the identity and its own nonce, under a role of its own (``ticket``), so it can stand in
    for no proof (a proof binds the holder's nonce too). It authenticates nothing; the holder only cuts
    a connection with a valid ticket last (see :class:`PendingHandshakes`)."""
    return sharing.proof(key, "ticket", identity, client_nonce, "")


@dataclass
class Handshake:
    """A connection in its handshake, as the pending table sees it."""

    conn: socket.socket
    waiting_since: float = field(default_factory=time.monotonic)  #: for its hello, then for its answer
    heard: bool = False  #: its hello is in
    ticket: bool = False  #: its hello carried a valid ticket


class PendingHandshakes:
    """The connections in their handshake, at most ``limit`` of them.

    Room for a new one is made by cutting one: its socket is shut down, so its thread's next read or
    write fails and the thread ends. Cut first, the oldest first in each: one that has kept the holder
    waiting over ``grace_s``, one whose hello came without a valid ticket, one whose hello is not in
    yet, and last one with a ticket (only replicas with the key make them). A connection leaves the
    table once its peer has proved it holds the key (an authenticated replica is never cut) or when its
    thread ends."""

    def __init__(self, limit: int, grace_s: float) -> None:
        self._limit = limit
        self._grace_s = grace_s
        self._lock = threading.Lock()
        self._pending: dict[int, Handshake] = {}  # token -> handshake; tokens grow: the oldest first
        self._tokens = itertools.count(1)

    def _cut_first(self, handshake: Handshake, now: float) -> int:
        """0 for the connections to cut first, up to 3 for those to cut last."""
        if now - handshake.waiting_since > self._grace_s:
            return 0
        if not handshake.heard:
            return 2
        return 3 if handshake.ticket else 1

    def admit(self, conn: socket.socket) -> tuple[int, bool]:
        """Add ``conn``; returns its token and whether another connection was cut to make room."""
        with self._lock:
            cut = len(self._pending) >= self._limit
            if cut:
                now = time.monotonic()
                victim = min(self._pending, key=lambda t: (self._cut_first(self._pending[t], now), t))
                # Shut while holding the lock: its thread closes it only after leave(), which waits for
                # the lock, so its descriptor cannot have been closed and re-used by another file yet.
                with contextlib.suppress(OSError):
                    self._pending.pop(victim).conn.shutdown(socket.SHUT_RDWR)
            token = next(self._tokens)
            self._pending[token] = Handshake(conn)
        return token, cut

    def heard(self, token: int, ticket: bool) -> None:
        """The connection's hello is in (with a valid ticket or not): its challenge goes out now."""
        with self._lock:
            handshake = self._pending.get(token)
            if handshake is not None:
                handshake.heard, handshake.ticket = True, ticket
                handshake.waiting_since = time.monotonic()

    def holds(self, token: int) -> bool:
        with self._lock:
            return token in self._pending

    def leave(self, token: int) -> bool:
        """Take the connection out; False if it was no longer in (cut to make room)."""
        with self._lock:
            return self._pending.pop(token, None) is not None


class ThrottledLog:
    """A log line any peer can cause at will, written at most once per ``interval_s``: each line carries
    ``suppressed``, how many of its kind were left out since the previous one."""

    def __init__(self, logger: logging.Logger, level: int, message: str, interval_s: float) -> None:
        self._log = logger
        self._level = level
        self._message = message
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._next_at: float | None = None
        self._suppressed = 0

    def __call__(self, exc_info: BaseException | None = None, **extra: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if self._next_at is not None and now < self._next_at:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next_at = now + self._interval_s
        self._log.log(self._level, self._message, exc_info=exc_info, extra=extra | {"suppressed": suppressed})
