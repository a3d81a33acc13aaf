"""Races of the weights-holder and its supervisor, each forced deterministically: a hook injected at
the critical point waits on an Event while the other side runs, so no test depends on timing luck."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from other_user import OTHER_TENANT_UID, TENANT_UID, needs_root, run_as
from rt_helpers import load_tiny_llama

from vnpu import sharing
from vnpu.runtime import holder as holder_module
from vnpu.runtime import supervisor as supervisor_module
from vnpu.runtime.attach import attach
from vnpu.runtime.engine import ModelRuntime, ServeOptions
from vnpu.runtime.holder import HolderError, WeightsHolder
from vnpu.runtime.supervisor import SharedWeightsSupervisor

ID = sharing.ShareIdentity("team-a", "group-a", "w1")
KEY = b"k" * 32


@pytest.fixture
def tiny(short_tmp: Path) -> Any:
    return load_tiny_llama(short_tmp / "model")


def _run(target: Any, name: str) -> tuple[threading.Thread, list[Any]]:
    """``target()`` on a thread named ``name``; the list gets its result or the exception it raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(target())
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, outcome


# --- stop() while an attach's grant is on its way -------------------------------------------------


@pytest.mark.parametrize("point", ["before the lease is counted", "with the grant on its way"])
def test_a_stopping_holder_never_hands_a_replica_a_closed_or_reused_fd(
    tiny: Any, short_tmp: Path, monkeypatch: Any, point: str
) -> None:
    """stop() closes the arena's fd while a connection's thread is about to send it over SCM_RIGHTS.
    The freed number is taken by the next file the process opens (here, forced: ``dup2``), and the
    grant must not carry that unrelated file to the replica: what goes out is the arena or nothing."""
    holder = WeightsHolder(tiny, ID, KEY, short_tmp / "s" / "w.sock")
    (arena_fd,) = holder._arena_fds
    arena_inode = os.fstat(arena_fd).st_ino
    paused, go = threading.Event(), threading.Event()
    sent: list[int] = []  # the inode of each fd a grant carries

    def pause(here: str) -> None:
        if here == point:
            paused.set()
            go.wait(20)

    real_handshake, real_send = holder._handshake, holder_module.send_encoded

    def handshake(*args: Any) -> str | None:
        op = real_handshake(*args)
        pause("before the lease is counted")
        return op

    def send(conn: Any, payload: bytes, fds: Any = ()) -> None:
        if fds:
            pause("with the grant on its way")
            sent.extend(os.fstat(fd).st_ino for fd in fds)
        real_send(conn, payload, fds)

    monkeypatch.setattr(holder, "_handshake", handshake)
    monkeypatch.setattr(holder_module, "send_encoded", send)
    holder.start()
    replica, got = _run(lambda: attach(holder.socket_path, ID, KEY, timeout=20), "replica")
    assert paused.wait(20)
    (connection,) = [t for t in threading.enumerate() if t.name == "holder-conn"]
    unrelated = os.open(short_tmp / "unrelated", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        holder.stop()
        os.dup2(unrelated, arena_fd)  # the freed number, taken by the next file the process opens
        go.set()
        connection.join(20)
        assert not connection.is_alive()
    finally:
        for fd in {unrelated, arena_fd}:
            os.close(fd)
    assert sent in ([], [arena_inode]), "the grant carried a file that is not the arena"
    replica.join(20)
    if not isinstance(got[0], Exception):
        got[0].close()


# --- two holders and one socket name ------------------------------------------------------------


def _pause_unlinking(monkeypatch: Any, path: Path, thread: str) -> tuple[threading.Event, threading.Event]:
    """The thread named ``thread`` stops right before it unlinks ``path`` (set: the first Event) until
    the second Event is set."""
    at, go = threading.Event(), threading.Event()
    real_unlink = Path.unlink

    def unlink(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == path and threading.current_thread().name == thread and not at.is_set():
            at.set()
            go.wait(20)
        real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    return at, go


def _start_settled(monkeypatch: Any, holder: WeightsHolder, thread: str) -> tuple[Any, list[Any], Any]:
    """Start ``holder`` on a thread named ``thread``; the Event is set once that start is over, or is
    about to wait for another holder's lock on the name (then it can only end after that one)."""
    settled = threading.Event()
    real_flock = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        if threading.current_thread().name == thread:
            settled.set()
        real_flock(fd, operation)

    def start() -> None:
        try:
            holder.start()
        finally:
            settled.set()

    monkeypatch.setattr(fcntl, "flock", flock)
    started, outcome = _run(start, thread)
    return started, outcome, settled


def _holders(short_tmp: Path, path: Path, count: int) -> list[WeightsHolder]:
    """Holders of one share identity and one socket path, each with its own arena (as processes)."""
    return [WeightsHolder(load_tiny_llama(short_tmp / f"model{i}"), ID, KEY, path) for i in range(count)]


def test_two_holders_starting_at_once_never_unlink_each_others_live_socket(
    short_tmp: Path, monkeypatch: Any
) -> None:
    """Both find a crashed holder's stale socket. One pauses after its check, right before unlinking;
    the other starts then. It must not be that both say they serve and the name reaches only one."""
    path = short_tmp / "s" / "w.sock"
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # closed, never listened: as a crashed holder leaves it
    first, second = holders = _holders(short_tmp, path, 2)
    at_unlink, go = _pause_unlinking(monkeypatch, path, "first")
    starting, first_out = _run(first.start, "first")
    try:
        assert at_unlink.wait(20)  # first found the socket stale and is about to remove it
        other, second_out, settled = _start_settled(monkeypatch, second, "second")
        assert settled.wait(20)
        go.set()
        starting.join(20)
        other.join(20)
        serving = [h for h, out in ((first, first_out), (second, second_out)) if out == [None]]
        st = path.lstat()
        for h in serving:
            assert h._bound == (st.st_dev, st.st_ino), "a holder says it serves, but its name is another's"
        (refused,) = [out[0] for out in (first_out, second_out) if out != [None]]
        assert isinstance(refused, HolderError) and "already serving" in str(refused), refused
    finally:
        go.set()
        for h in holders:
            h.stop()


def test_a_stopping_holder_never_unlinks_a_socket_bound_after_it_looked(
    short_tmp: Path, monkeypatch: Any
) -> None:
    """stop() checks that the socket file is still its own, then unlinks it. A new holder that finds
    it stale (the listener is closed already) and binds in between must keep its socket."""
    path = short_tmp / "s" / "w.sock"
    old, new = _holders(short_tmp, path, 2)
    old.start()
    at_unlink, go = _pause_unlinking(monkeypatch, path, "stop")
    stopping, _ = _run(old.stop, "stop")
    try:
        assert at_unlink.wait(20)  # old found the file its own and is about to remove it
        starting, new_out, settled = _start_settled(monkeypatch, new, "new")
        assert settled.wait(20)
        go.set()
        stopping.join(20)
        starting.join(20)
        assert new_out == [None], new_out
        assert path.exists(), "the stopping holder removed its replacement's socket"
        st = path.lstat()
        assert new._bound == (st.st_dev, st.st_ino)
    finally:
        go.set()
        new.stop()


@needs_root
def test_the_name_lock_is_the_holders_own_in_a_sticky_directory(tiny: Any, short_tmp: Path) -> None:
    """As deployed: a 1733 socket directory, the holder as its group's uid. The lock file is the
    holder's own and gone once it is done. Its name comes from the key: a file another user plants
    beside the socket's name is not it. One of another uid at the lock's name (a crashed holder of this
    group under an earlier uid) is never waited on, even held: the holder says what to do instead."""
    short_tmp.chmod(0o755)
    directory = short_tmp / "npu0"
    directory.mkdir()
    directory.chmod(0o1733)
    path = directory / "w.sock"
    lock = directory / sharing.lock_name(KEY, path.name)
    holder = WeightsHolder(tiny, ID, KEY, path)
    planted = directory / f"{path.name}.lock"
    planted.touch(0o666)
    os.chown(planted, OTHER_TENANT_UID, OTHER_TENANT_UID)

    def start_and_stop() -> list[bool]:
        signal.alarm(20)  # waiting on a lock it must not wait on ends the child, and fails the test
        holder.start()
        during = [path.exists(), lock.exists()]
        holder.stop()
        return [*during, path.exists(), lock.exists()]

    for _ in range(2):
        assert run_as(TENANT_UID, start_and_stop) == [True, False, False, False]
    with open(lock, "w") as stranger:  # 0644 once: opened read-write by none but its owner
        os.chown(lock, OTHER_TENANT_UID, OTHER_TENANT_UID)
        fcntl.flock(stranger, fcntl.LOCK_EX)
        refused = run_as(TENANT_UID, start_and_stop)
        assert refused["error"].startswith(f"HolderError: cannot lock {lock}"), refused
        assert f"belongs to uid {OTHER_TENANT_UID}" in refused["error"], refused
        assert "remove it on the node as root" in refused["error"], refused
        lock.chmod(0o666)  # open to all: refused by owner, not waited on
        refused = run_as(TENANT_UID, start_and_stop)
        assert "not a file of this holder's uid" in refused["error"], refused
    assert not path.exists()


# --- SharedWeightsSupervisor.stop() while an attach is in progress ---------------------------------


@pytest.mark.parametrize("point", ["attach returning", "install starting"])
def test_a_supervisor_stopped_during_an_attach_keeps_no_lease(
    tiny: Any, short_tmp: Path, monkeypatch: Any, point: str
) -> None:
    """stop() may come while the supervisor's thread holds a lease stop() cannot see yet (attach is
    returning it) or is about to install it. Either way stop() ends with the lease closed (the holder
    sees EOF), the thread gone, and no error blamed on the weights (``fatal``)."""
    holder = WeightsHolder(tiny, ID, KEY, short_tmp / "s" / "w.sock")
    holder.start()
    runtime = ModelRuntime(ServeOptions(max_context=64))
    supervisor = SharedWeightsSupervisor(runtime, holder.socket_path, ID, KEY)
    paused, joining, go = threading.Event(), threading.Event(), threading.Event()
    leases: list[Any] = []

    def pause(here: str) -> None:
        if here == point:
            paused.set()
            go.wait(20)

    def slow_attach(*args: Any, **kwargs: Any) -> Any:
        leases.append(attach(*args, **kwargs))
        pause("attach returning")
        return leases[-1]

    real_install, real_join = runtime.install, supervisor._thread.join

    def install(*args: Any, **kwargs: Any) -> None:
        pause("install starting")
        real_install(*args, **kwargs)

    def join(timeout: float | None = None) -> None:
        joining.set()  # stop() has done what it does before waiting for the thread
        real_join(timeout)

    monkeypatch.setattr(supervisor_module, "attach", slow_attach)
    monkeypatch.setattr(runtime, "install", install)
    monkeypatch.setattr(supervisor._thread, "join", join)
    supervisor.start()
    try:
        assert paused.wait(20)
        stopping, _ = _run(supervisor.stop, "stop")
        assert joining.wait(20)
        go.set()
        stopping.join(20)
        assert not stopping.is_alive() and not supervisor._thread.is_alive()
        (lease,) = leases
        assert lease._closed, "stop() returned with the lease still open"
        assert supervisor.fatal is None, supervisor.fatal
        if point == "attach returning":
            assert not runtime.ready, "the weights were installed after stop()"
    finally:
        go.set()
        for lease in leases:
            lease.close()
        holder.stop()
