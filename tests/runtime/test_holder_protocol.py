"""The holder protocol against hostile peers and broken holders: a peer that trickles its handshake,
odd frames from a squatter, failing accepts, the file descriptors of a failed attach, arenas and
manifests a replica must not trust."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rt_helpers import load_tiny_llama

from vnpu import sharing
from vnpu.runtime import holder as holder_module
from vnpu.runtime.attach import AttachRefusedError, HolderUnavailableError, attach
from vnpu.runtime.holder import WeightsHolder

ID = sharing.ShareIdentity("team-a", "group-a", "w1")
KEY = b"k" * 32


def wait_until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def _attach_works(path: Path) -> bool:
    try:
        attach(path, ID, KEY, timeout=1.0).close()
    except (HolderUnavailableError, AttachRefusedError, OSError):
        return False
    return True


@pytest.fixture
def tiny(short_tmp: Path) -> Any:
    return load_tiny_llama(short_tmp / "model")


# --- the holder's handshake deadline ------------------------------------------------------------


def test_peers_trickling_their_hello_are_cut_at_the_handshake_deadline(
    tiny: Any, short_tmp: Path, monkeypatch: Any
) -> None:
    """Peers without the key fill every handshake slot, each announcing a big hello and sending it a
    byte at a time, every byte well within one read's timeout. The handshake has one deadline: they
    are cut when it passes, and a replica gets in."""
    # Short enough for a quick test, long enough for a real replica's handshake on a loaded machine.
    monkeypatch.setattr(holder_module, "HANDSHAKE_TIMEOUT_S", 1.5)
    monkeypatch.setattr(holder_module, "MAX_HANDSHAKES", 2)
    path = short_tmp / "s" / "weights.sock"
    holder = WeightsHolder(tiny, ID, KEY, path)
    holder.start()
    stop = threading.Event()
    cut: list[str] = []

    def trickle(peer: socket.socket) -> None:
        try:
            while not stop.wait(0.05):
                peer.send(b" ")
        except OSError as e:  # EPIPE / ECONNRESET: the holder closed the connection
            cut.append(type(e).__name__)

    peers = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    threads = [threading.Thread(target=trickle, args=(peer,)) for peer in peers]
    try:
        for peer in peers:
            peer.connect(str(path))
            peer.sendall(struct.pack(">I", 60_000))  # a hello under MAX_REQUEST that never completes
        # The holder accepts in order: once it has closed the next connection (over the cap, at
        # once), both peers have had their slot.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as over:
            over.settimeout(10)
            over.connect(str(path))
            assert over.recv(1) == b""
        for t in threads:
            t.start()
        wait_until(lambda: _attach_works(path), timeout=15)
        wait_until(lambda: len(cut) == 2, timeout=5)
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
        for peer in peers:
            peer.close()
        holder.stop()
