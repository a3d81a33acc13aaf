"""The gateway against an API server that takes its connections and never answers: a half-open
connection (the API server's node died, a control-plane failover, a load balancer that drops packets).
Without client-side timeouts every one of these calls blocked its thread for good, without a word in
the log. Timeouts here are fractions of a second, injected, so each test takes seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vnpu.gateway.activity import ActivityRecorder, WakeError, scale_from_zero
from vnpu.gateway.discovery import Discovery

#: (connect, read) seconds of the gateway's calls in these tests
TIMEOUT = (2.0, 0.3)
#: Seconds a test waits for what the timeouts must bring: far more than urllib3's four tries of a GET
#: (three retries) at TIMEOUT, far less than for ever.
WITHIN_S = 20.0
EMPTY_LIST = b'{"kind": "List", "metadata": {"resourceVersion": "1"}, "items": []}'


class SilentApiServer:
    """A TCP server on 127.0.0.1 that reads every request and answers none. With ``answer_lists`` it
    answers a LIST with an empty list, and a watch with its response head and then nothing (a watch
    whose connection died after it began). Records each request's (time.time(), request line)."""

    def __init__(self, answer_lists: bool = False) -> None:
        self.answer_lists = answer_lists
        self.requests: list[tuple[float, str]] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, name="silent-apiserver", daemon=True).start()

    def api_client(self) -> Any:
        from kubernetes import client

        return client.ApiClient(client.Configuration(host=self.url))  # urllib3's default retries

    def requests_after(self, moment: float) -> list[str]:
        with self._lock:
            return [line for at, line in self.requests if at > moment]

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                line = head.split(b"\r\n", 1)[0].decode()
                with self._lock:
                    self.requests.append((time.time(), line))
                if not self.answer_lists or not line.startswith("GET "):
                    continue  # read, never answered
                if "watch=true" in line:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n"
                    )
                    continue  # and then nothing
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(EMPTY_LIST), EMPTY_LIST)
                )
        except OSError:
            return

    def close(self) -> None:
        """Stop, and hang up on every connection (a shutdown wakes the threads blocked on them)."""
        self._closed.set()
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in [self._sock, *conns]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def silent() -> Iterator[SilentApiServer]:
    server = SilentApiServer()
    yield server
    server.close()


def returns_within(seconds: float, fn: Callable[[], Any]) -> BaseException | None:
    """Run ``fn`` on a thread; what it raised (None if nothing). Fails the test if it is still running
    after ``seconds`` (the thread is left behind, a daemon: the fixture's close ends its call)."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            raised.append(None)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return raised[0]


@pytest.mark.parametrize("answer_lists", [False, True], ids=["list-unanswered", "watch-silent"])
def test_a_discovery_loop_on_a_silent_connection_warns_and_lists_again(answer_lists, caplog) -> None:
    """The route table froze for good: a list, or a watch whose connection died once it began, waited
    for ever. Now the call times out, the loop says so (a warning naming the timeout) and lists again."""
    server = SilentApiServer(answer_lists)
    discovery = Discovery(server.api_client(), list_timeout=TIMEOUT, watch_timeout=TIMEOUT)
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.WARNING, logger="vnpu.gateway.discovery"):
            discovery.start(loop)
            deadline = time.monotonic() + WITHIN_S
            warned: list[logging.LogRecord] = []
            again: list[str] = []
            while not again and time.monotonic() < deadline:
                time.sleep(0.05)
                warned = [r for r in caplog.records if r.name == "vnpu.gateway.discovery"]
                if models := [r for r in warned if r.what == "models"]:
                    after = server.requests_after(models[0].created)
                    again = [line for line in after if "inferencemodels" in line and "watch=" not in line]
            assert again, f"no list after the warnings {[r.getMessage() for r in warned]}"
            said = {(r.levelno, r.getMessage(), r.exc_info) for r in warned}
            assert said == {(logging.WARNING, "watch failed; listing again", None)}
            assert all("timed out" in r.error for r in warned), [r.error for r in warned]
            if answer_lists:  # the list was answered: what timed out was the watch
                assert discovery.synced["models"].is_set() and discovery.synced["slices"].is_set()
                assert any("watch=true" in line for _, line in server.requests)
    finally:
        discovery.stop()
        server.close()
        loop.close()


def test_a_wake_the_api_server_never_answers_raises_wake_error_in_time(silent) -> None:
    """A wake's thread blocked for good, and with it every later wake of the model (one at a time)."""
    started = time.monotonic()
    raised = returns_within(WITHIN_S, lambda: scale_from_zero(silent.api_client(), "team-a", "chat", TIMEOUT))
    assert isinstance(raised, WakeError), raised
    assert "the API server cannot be reached" in str(raised) and "timed out" in str(raised)
    assert time.monotonic() - started < 4 * sum(TIMEOUT) + 2  # four tries of the GET at most
    assert silent.requests and all("/scale" in line for _, line in silent.requests)


def test_an_activity_flush_the_api_server_never_answers_ends_with_one_warning(silent, caplog) -> None:
    """The flush thread blocked for good: the operator saw no request and scaled busy models to zero."""
    recorder = ActivityRecorder(silent.api_client(), flush_s=3600, timeout=TIMEOUT)
    for name in ("a", "b"):
        recorder.record("team-a", name)
    with caplog.at_level(logging.WARNING, logger="vnpu.gateway.activity"):
        assert returns_within(WITHIN_S, recorder.flush) is None
    ours = [r for r in caplog.records if r.name == "vnpu.gateway.activity"]
    assert [(r.levelno, r.exc_info) for r in ours] == [(logging.WARNING, None)]
    assert "timed out" in ours[0].error
    assert dict(recorder._pending) == {("team-a", "a"): 1, ("team-a", "b"): 1}  # kept for the next flush
