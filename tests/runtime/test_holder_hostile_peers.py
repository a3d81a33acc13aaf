"""Peers without the key against the holder and the replica: a squatter trickling its challenge."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from pathlib import Path

import pytest

from vnpu import sharing
from vnpu.runtime.attach import HolderUnavailableError, attach, holder_status
from vnpu.runtime.ipc import recv_message

ID = sharing.ShareIdentity("team-a", "group-a", "w1")
KEY = b"k" * 32


class TricklingSquatter:
    """Listens at ``path`` without the key: takes a hello, announces a 60 kB challenge, then sends it a
    byte every 50 ms, each well within any per-read timeout."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._listener.settimeout(0.05)  # lets close() end the accept loop
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._trickle, args=(conn,))
            self._threads.append(thread)
            thread.start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            recv_message(conn)
            conn.sendall(struct.pack(">I", 60_000))
            while not self._stop.wait(0.05):
                conn.sendall(b" ")

    def close(self) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join()
        self._listener.close()


@pytest.mark.parametrize("call", ["attach", "holder_status"])
def test_a_trickling_squatter_cannot_hold_an_attach_past_its_timeout(call: str, short_tmp: Path) -> None:
    """The replica's timeout is one deadline from connecting to the grant, not a timeout per read: a
    keyless squatter at the socket path trickling its challenge ends the attach (or the probe) with
    HolderUnavailableError once the timeout has passed, not hours later."""
    path = short_tmp / "s" / "weights.sock"
    squatter = TricklingSquatter(path)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            if call == "attach":
                attach(path, ID, KEY, timeout=1.0)
            else:
                holder_status(path, ID, KEY, timeout=1.0)
        except BaseException as e:
            outcome.append(e)

    caller = threading.Thread(target=run, daemon=True)
    try:
        caller.start()
        caller.join(15)
        assert not caller.is_alive(), f"{call}(timeout=1.0) still blocked after 15 s"
    finally:
        squatter.close()  # ends a blocked caller too (EOF), so a failing run leaves no thread behind
        caller.join(15)
    (error,) = outcome
    assert isinstance(error, HolderUnavailableError), repr(error)
    assert "within its 1 s timeout" in str(error)
