"""Races of the weights-holder and its supervisor, each forced deterministically: a hook injected at
the critical point waits on an Event while the other side runs, so no test depends on timing luck."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from rt_helpers import load_tiny_llama

from vnpu import sharing
from vnpu.runtime import holder as holder_module
from vnpu.runtime import supervisor as supervisor_module
from vnpu.runtime.attach import attach
from vnpu.runtime.engine import ModelRuntime, ServeOptions
from vnpu.runtime.holder import WeightsHolder
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
