"""Peers without the key against the holder and the replica: slots kept full by reconnecting, values
echoed into every refusal, a squatter trickling its challenge. Each passes ``SO_PEERCRED`` (a process
of the holder's uid, as a pod of the group's user would be)."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rt_helpers import attach_works, load_tiny_llama, wait_until

from vnpu import sharing
from vnpu.runtime import attach as attach_module
from vnpu.runtime import holder as holder_module
from vnpu.runtime.attach import HolderUnavailableError, attach, holder_status
from vnpu.runtime.holder import WeightsHolder
from vnpu.runtime.ipc import recv_message, send_message

ID = sharing.ShareIdentity("team-a", "group-a", "w1")
KEY = b"k" * 32
HOLDER_LOG = "vnpu.runtime.holder"


def _records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == HOLDER_LOG and r.getMessage().startswith(message)]


@pytest.fixture
def holder(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WeightsHolder]:
    # One log line per kind for the whole test: counting them is then exact.
    monkeypatch.setattr(holder_module, "LOG_INTERVAL_S", 3600.0)
    monkeypatch.setattr(holder_module, "MAX_HANDSHAKES", 4)
    served = WeightsHolder(load_tiny_llama(short_tmp / "model"), ID, KEY, short_tmp / "s" / "weights.sock")
    served.start()
    yield served
    served.stop()


class SlotFillers:
    """Peers that each connect, announce a hello that never comes and wait; cut, they reconnect at once."""

    def __init__(self, path: Path, count: int) -> None:
        self.path = path
        self.reconnects = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads = [threading.Thread(target=self._fill) for _ in range(count)]
        for t in self._threads:
            t.start()

    def _fill(self) -> None:
        while not self._stop.is_set():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._open.add(s)
                with contextlib.suppress(OSError):
                    s.connect(str(self.path))
                    s.sendall(struct.pack(">I", 1000))  # a hello under MAX_REQUEST that never completes
                    s.recv(1)  # b"" (or ECONNRESET) once the holder cuts it
                with self._lock:
                    self._open.discard(s)
                    self.reconnects += 1

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join()


def test_a_peer_refilling_every_handshake_slot_does_not_lock_out_replicas(
    holder: WeightsHolder, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More peers than slots, each stalling in its hello and reconnecting as soon as it is cut: the
    slots never empty by themselves (the deadlines are a minute here). A replica still gets in: the
    holder cuts an old connection for each new one instead of refusing the newest, and a replica's
    handshake completes long before the fillers have pushed it out. Cuts are counted and logged once."""
    monkeypatch.setattr(holder_module, "HANDSHAKE_TIMEOUT_S", 60.0)
    monkeypatch.setattr(holder_module, "HELLO_TIMEOUT_S", 60.0)
    caplog.set_level(logging.INFO, logger=HOLDER_LOG)
    fillers = SlotFillers(holder.socket_path, holder_module.MAX_HANDSHAKES + 1)
    try:
        wait_until(lambda: fillers.reconnects >= 20, timeout=10)  # the slots are full and refilled
        wait_until(lambda: _attach(holder.socket_path), timeout=10)
    finally:
        fillers.close()
    assert holder.refused >= 20
    assert len(_records(caplog, "cut an older client in its handshake")) == 1


def _stall_after_the_challenge(path: Path, ticket: bool) -> socket.socket:
    """A peer that sends a complete hello with the group's identity (no secret: it is in every pod's
    environment), with a valid ticket (a replay) or none (no key), reads the challenge and stalls."""
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.settimeout(10)
    peer.connect(str(path))
    nonce = sharing.new_nonce()
    identity = {"namespace": ID.namespace, "group": ID.group, "weights_id": ID.weights_id}
    hello = {"op": "hello", "protocol": 2, "identity": identity, "nonce": nonce, "pid": 1}
    if ticket:
        hello["ticket"] = holder_module.hello_ticket(KEY, ID, nonce)
    send_message(peer, hello)
    challenge, _ = recv_message(peer)
    assert challenge["op"] == "challenge"
    return peer


def _was_cut(peer: socket.socket) -> bool:
    peer.settimeout(0.2)
    try:
        return peer.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_peers_stalling_after_the_challenge_never_push_a_replica_out(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a replica computes its answer to the challenge, twice as many peers without the key as
    there are slots send a complete hello and stall after theirs: each new one cuts one of them, not the
    replica, whose hello carried its ticket (the holder cut the oldest of them all, the replica)."""
    monkeypatch.setattr(holder_module, "MAX_HANDSHAKES", 4)
    monkeypatch.setattr(holder_module, "HANDSHAKE_TIMEOUT_S", 60.0)
    monkeypatch.setattr(holder_module, "STALL_GRACE_S", 60.0)  # nobody overdue: the tickets decide
    holder = WeightsHolder(load_tiny_llama(short_tmp / "model"), ID, KEY, short_tmp / "s" / "weights.sock")
    holder.start()
    stallers: list[socket.socket] = []
    receive = attach_module.recv_message

    def crowd_after_the_challenge(sock: socket.socket, **kwargs: Any) -> Any:
        message, fds = receive(sock, **kwargs)
        if message.get("op") == "challenge" and not stallers:
            stallers.extend(_stall_after_the_challenge(holder.socket_path, ticket=False) for _ in range(8))
        return message, fds

    monkeypatch.setattr(attach_module, "recv_message", crowd_after_the_challenge)
    try:
        attach(holder.socket_path, ID, KEY, timeout=30).close()
        assert len(stallers) == 8
        assert holder.refused == 5  # 1 + 8 connections for 4 slots: 5 stallers cut
        assert [_was_cut(peer) for peer in stallers] == [True] * 5 + [False] * 3
    finally:
        for peer in stallers:
            peer.close()
        holder.stop()


def test_a_ticket_holds_its_slot_only_while_the_challenge_is_fresh(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection with a valid ticket that does not answer its challenge (a replayed hello, or a
    replica stopped for longer than a CPU throttle) is the first cut once its grace has passed."""
    monkeypatch.setattr(holder_module, "MAX_HANDSHAKES", 4)
    monkeypatch.setattr(holder_module, "HANDSHAKE_TIMEOUT_S", 60.0)
    monkeypatch.setattr(holder_module, "STALL_GRACE_S", 0.2)
    holder = WeightsHolder(load_tiny_llama(short_tmp / "model"), ID, KEY, short_tmp / "s" / "weights.sock")
    holder.start()
    peers: list[socket.socket] = []
    try:
        peers.append(_stall_after_the_challenge(holder.socket_path, ticket=True))
        time.sleep(0.3)
        peers.extend(_stall_after_the_challenge(holder.socket_path, ticket=False) for _ in range(4))
        assert [_was_cut(peer) for peer in peers] == [True, False, False, False, False]
        assert holder.refused == 1
    finally:
        for peer in peers:
            peer.close()
        holder.stop()


def test_a_replica_waits_out_a_full_listen_backlog(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peers that connect and never speak (no key needed) fill the holder's listen backlog while it
    does not accept. There a unix socket's connect fails at once (EAGAIN) however long its timeout: an
    attach waits for room until its deadline instead, says why once that has passed, and attaches as
    soon as the holder takes connections again."""
    accepting = threading.Event()
    accept_loop = WeightsHolder._accept_loop

    def accept_later(self: WeightsHolder) -> None:
        accepting.wait()
        accept_loop(self)

    monkeypatch.setattr(WeightsHolder, "_accept_loop", accept_later)
    holder = WeightsHolder(load_tiny_llama(short_tmp / "model"), ID, KEY, short_tmp / "s" / "weights.sock")
    holder.start()
    fillers: list[socket.socket] = []
    outcome: list[object] = []
    caller = threading.Thread(target=lambda: outcome.append(_attach(holder.socket_path, timeout=15.0)))
    try:
        while True:  # until the backlog is full
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.setblocking(False)
            try:
                filler.connect(str(holder.socket_path))
            except BlockingIOError:
                break
        started = time.monotonic()
        with pytest.raises(HolderUnavailableError, match="listen backlog stayed full"):
            attach(holder.socket_path, ID, KEY, timeout=0.5)
        assert time.monotonic() - started >= 0.45
        caller.start()
        caller.join(0.5)
        assert caller.is_alive(), outcome  # waiting for room, not failed
        accepting.set()
        caller.join(15)
        assert outcome == [True]
    finally:
        accepting.set()
        for filler in fillers:
            filler.close()
        if caller.ident is not None:
            caller.join(15)
        holder.stop()


def test_a_refusal_never_echoes_a_long_peer_value(
    holder: WeightsHolder, caplog: pytest.LogCaptureFixture
) -> None:
    """A keyless peer sends a 30 kB ``op`` and ``protocol``: the refusal it gets back and the one log
    line say what it sent, cut short; a stream of such peers makes one warning, not one each."""
    caplog.set_level(logging.INFO, logger=HOLDER_LOG)
    big_op, big_protocol = "A" * 30_000, "B" * 30_000  # the frame within the holder's 64 KiB
    errors = []
    for _ in range(20):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(holder.socket_path))
            send_message(s, {"op": big_op, "protocol": big_protocol})
            reply, _ = recv_message(s)
            assert reply["ok"] is False
            errors.append(reply["error"])
    error = errors[0]
    assert "AAAA" in error and "BBBB" in error and "30002 characters" in error  # repr: quotes included
    assert len(error) < 400, error
    (record,) = _records(caplog, "refused client")
    assert record.reason == error  # type: ignore[attr-defined]
    assert holder.refused == 20
    assert _attach(holder.socket_path)


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


def _attach(path: Path, timeout: float = 2.0) -> bool:
    return attach_works(path, ID, KEY, timeout=timeout)


def test_a_hello_ticket_is_no_proof() -> None:
    """The ticket is an HMAC of the identity and the replica's nonce under the key: under the replica's
    own role it would be that replica's proof for an exchange with an empty holder nonce. Its role of
    its own keeps it from ever standing in for a proof, whatever nonce a holder sent."""
    nonce = sharing.new_nonce()
    ticket = holder_module.hello_ticket(KEY, ID, nonce)
    for role in ("replica", "holder"):
        assert ticket != sharing.proof(KEY, role, ID, nonce, "")
    assert sharing.proof_matches(ticket, holder_module.hello_ticket(KEY, ID, nonce))
