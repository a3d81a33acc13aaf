"""Shared weights in one process tree: arena sealing, the holder protocol with mutual authentication,
access control, squatters, weights that are not the replica's, leases."""

from __future__ import annotations

import logging
import mmap
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from other_user import OTHER_TENANT_UID, TENANT_UID, needs_root, run_as
from rt_helpers import load_tiny_llama

from vnpu import sharing
from vnpu.runtime import holder as holder_module
from vnpu.runtime.arena import ArenaError, CpuArena, import_arena
from vnpu.runtime.attach import (
    AttachRefusedError,
    Expected,
    HolderUnavailableError,
    attach,
    holder_status,
    manifest_mismatch,
)
from vnpu.runtime.engine import ModelRuntime, ServeOptions
from vnpu.runtime.errors import RuntimeUnavailableError
from vnpu.runtime.holder import HolderError, WeightsHolder
from vnpu.runtime.manifest import ALIGNMENT, WeightManifest, pack
from vnpu.runtime.supervisor import SharedWeightsSupervisor


def wait_until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


@pytest.fixture
def tiny(short_tmp: Path) -> Any:
    return load_tiny_llama(short_tmp / "model")


ID = sharing.ShareIdentity("team-a", "group-a", "w1")
KEY = b"k" * 32


@pytest.fixture
def holder(tiny: Any, short_tmp: Path) -> Any:
    h = WeightsHolder(tiny, ID, KEY, short_tmp / "s" / "weights.sock")
    h.start()
    yield h
    h.stop()


# --- layout and arena ---------------------------------------------------------------------------


def test_pack_aligns_every_tensor() -> None:
    entries, total = pack([("a", "float32", (3,)), ("b", "bfloat16", (5, 7)), ("c", "float16", (1,))])
    assert [e.offset % ALIGNMENT for e in entries.values()] == [0, 0, 0]
    assert entries["b"].offset >= entries["a"].offset + 12 and total % ALIGNMENT == 0
    with pytest.raises(ValueError, match="duplicate"):
        pack([("a", "float32", (1,)), ("a", "float32", (1,))])


def test_manifest_round_trips(tiny: Any) -> None:
    again = WeightManifest.from_dict(tiny.manifest.to_dict())
    assert again.tensors == tiny.manifest.tensors and again.config == tiny.manifest.config


def test_sealed_arena_cannot_be_written_by_anyone() -> None:
    arena = CpuArena.allocate(4096)
    arena.write(0, np.arange(16, dtype=np.uint8))
    arena.seal()
    with pytest.raises(ArenaError):
        arena.write(0, np.zeros(4, dtype=np.uint8))
    meta, fds = arena.export()
    dup = os.dup(fds[0])
    with pytest.raises(PermissionError):  # F_SEAL_WRITE: no writable shared mapping, not even for root
        mmap.mmap(dup, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    imported = import_arena(meta, [dup])
    assert imported.numpy()[:16].tolist() == list(range(16))
    arena.close()


def test_unsealed_memfd_is_refused() -> None:
    fd = os.memfd_create("not-sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    with pytest.raises(ArenaError, match="not sealed against writes, shrinking, growth, further sealing"):
        CpuArena.import_({"backend": "cpu", "nbytes": 4096}, [fd])  # closes fd, refused or not


# --- the holder protocol ------------------------------------------------------------------------


def test_attach_maps_the_same_bytes_zero_copy(holder: Any, tiny: Any) -> None:
    lease = attach(holder.socket_path, ID, KEY)
    try:
        assert holder.clients == 1
        a, b = tiny.arena.numpy(), lease.arena.numpy()
        assert a.ctypes.data != b.ctypes.data and np.array_equal(a, b)  # two mappings, the same bytes
        assert lease.manifest.tensors == tiny.manifest.tensors
        status = holder_status(holder.socket_path, ID, KEY)
        assert (status["clients"], status["namespace"], status["share_group"]) == (1, "team-a", "group-a")
    finally:
        lease.close()
    wait_until(lambda: holder.clients == 0)


def test_socket_and_directory_are_private(holder: Any) -> None:
    assert stat.S_IMODE(holder.socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(holder.socket_path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("identity", "key", "message"),
    [
        # Another namespace deploying the same group and weights: its own key, so its proof fails.
        (sharing.ShareIdentity("team-b", "group-a", "w1"), b"b" * 32, "another share identity"),
        # A foreign pod that copied this group's identity (annotation, env) but cannot mount the Secret:
        # with another key the holder's proof does not check out, so it never even sends its own.
        (ID, b"x" * 32, "failed authentication"),
        # The right key for other weights (an old replica during a roll): not this holder's identity.
        (sharing.ShareIdentity("team-a", "group-a", "w2"), KEY, "another share identity"),
    ],
)
def test_a_client_without_the_groups_key_or_identity_is_refused(
    holder: Any, identity: sharing.ShareIdentity, key: bytes, message: str
) -> None:
    with pytest.raises(AttachRefusedError, match=message):
        attach(holder.socket_path, identity, key)
    with pytest.raises(AttachRefusedError):
        holder_status(holder.socket_path, identity, key)  # status is behind the handshake too
    assert holder.clients == 0


def test_a_client_that_skips_the_handshake_gets_nothing(holder: Any) -> None:
    """A hand-made client: a protocol-1 attach (no proof) and a hello followed by a forged proof."""
    from vnpu.runtime.ipc import recv_message, send_message

    for first in ({"op": "attach", "protocol": 1, "share_group": "group-a"}, {"op": "status"}):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(holder.socket_path))
            send_message(s, first)
            reply, fds = recv_message(s)
            assert not reply["ok"] and "protocol 2 hello" in reply["error"] and not fds
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(holder.socket_path))
        identity = {"namespace": ID.namespace, "group": ID.group, "weights_id": ID.weights_id}
        send_message(s, {"op": "hello", "protocol": 2, "identity": identity, "nonce": "0" * 32})
        challenge, _ = recv_message(s)
        assert challenge["ok"] and challenge["op"] == "challenge"
        send_message(s, {"op": "attach", "proof": challenge["proof"]})  # replaying the holder's own proof
        reply, fds = recv_message(s)
        assert not reply["ok"] and "authentication failed" in reply["error"] and not fds
    assert holder.clients == 0


def test_the_holders_status_counts_the_clients_it_refused(holder: Any) -> None:
    """What `vnpu runtime probe` prints (and the holder's ready event) carries the count of refused and
    cut connections: the one place on-call can see peers hammering a holder."""
    from vnpu.runtime.ipc import recv_message, send_message

    assert holder_status(holder.socket_path, ID, KEY)["refused"] == 0
    for _ in range(2):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(holder.socket_path))
            send_message(s, {"op": "status"})  # no handshake
            reply, _ = recv_message(s)
            assert not reply["ok"]
    assert holder_status(holder.socket_path, ID, KEY)["refused"] == 2


def test_a_squatting_socket_is_refused_by_the_replica(tiny: Any, short_tmp: Path) -> None:
    """Something listening where the holder should be, without the group's key (it answers the hello
    with a challenge of its own making): the replica refuses it and never sends its proof."""
    squatter = WeightsHolder(tiny, ID, b"s" * 32, short_tmp / "squat.sock")
    squatter.start()
    try:
        with pytest.raises(AttachRefusedError, match="failed authentication: it does not hold the key"):
            attach(squatter.socket_path, ID, KEY)
        assert squatter.clients == 0
    finally:
        squatter._listener.close()  # not stop(): the arena belongs to the fixture's weights


def test_a_holder_serving_other_weights_is_refused_by_the_replica(holder: Any, tiny: Any) -> None:
    manifest = tiny.manifest
    assert (
        manifest_mismatch(manifest, Expected(manifest.source, manifest.dtype, manifest.header_digest)) is None
    )
    for expected, message in [
        (Expected("file:///other.gguf"), "source"),
        (Expected(manifest.source, "bfloat16"), "dtype float32, this replica's is bfloat16"),
        (Expected(manifest.source, None, "0" * 32), "headers digest to"),
    ]:
        with pytest.raises(AttachRefusedError, match=message):
            attach(holder.socket_path, ID, KEY, expected=expected)
    wait_until(lambda: holder.clients == 0)  # each refusing replica hung up (the holder sees it soon)


def test_no_holder_is_a_clear_error(short_tmp: Path) -> None:
    with pytest.raises(HolderUnavailableError, match="no weights-holder is listening"):
        attach(short_tmp / "missing.sock", ID, KEY)


def test_a_stalled_handshake_times_out_and_connections_are_capped(holder: Any, monkeypatch: Any) -> None:
    from vnpu.runtime import holder as holder_module

    idle = []
    for _ in range(holder_module.MAX_HANDSHAKES + 4):  # connect and say nothing
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(holder.socket_path))
        idle.append(s)
    try:
        # The holder keeps serving: beyond the cap it cuts the oldest at once, and the others time out.
        wait_until(
            lambda: holder.clients == 0 and _attach_works(holder),
            timeout=holder_module.HANDSHAKE_TIMEOUT_S * 3,
        )
    finally:
        for s in idle:
            s.close()


def _attach_works(holder: Any) -> bool:
    try:
        attach(holder.socket_path, ID, KEY, timeout=1.0).close()
    except (HolderUnavailableError, AttachRefusedError, OSError):
        return False
    return True


def test_second_holder_on_a_live_socket_is_refused_and_stale_sockets_are_replaced(
    holder: Any, tiny: Any, short_tmp: Path
) -> None:
    with pytest.raises(HolderError, match="already serving"):
        WeightsHolder(tiny, ID, KEY, holder.socket_path).start()
    stale = short_tmp / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on, as a crashed holder leaves behind
    replacement = WeightsHolder(tiny, ID, KEY, stale)
    replacement.start()
    try:
        assert holder_status(stale, ID, KEY)["share_group"] == "group-a"
    finally:
        replacement._listener.close()  # not stop(): the arena belongs to the fixture's holder


def test_a_holder_waits_for_the_holder_it_replaces_then_binds_its_socket(
    tiny: Any, short_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Holders of one share identity on one device share the socket's name. A holder created while the
    one it replaces still serves (a serving holder for a plain one, a holder renamed by an upgrade)
    was refused and exited, to crash-loop, reloading its weights each time; it now waits, says so once,
    and binds as soon as the old one closes its socket, where the next attach finds it."""
    monkeypatch.setattr(holder_module, "BUSY_RETRY_S", 0.05)
    path = short_tmp / "s" / "weights.sock"
    old = WeightsHolder(tiny, ID, KEY, path)
    old.start()
    new = WeightsHolder(load_tiny_llama(short_tmp / "model2"), ID, KEY, path)
    stop, bound = threading.Event(), []
    waiting = threading.Thread(target=lambda: bound.append(new.start_when_free(stop)))
    with caplog.at_level(logging.INFO, logger="vnpu.runtime.holder"):
        waiting.start()
        try:
            time.sleep(0.5)  # ten tries
            assert not bound and _attach_works(old)  # the old one still serves
            old.stop()
            waiting.join(5)
            assert bound == [True]
            lease = attach(path, ID, KEY, timeout=1.0)
            assert new.clients == 1
            lease.close()
        finally:
            stop.set()
            new.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "vnpu.runtime.holder"]
    assert said.count("another weights-holder serves this socket; waiting for it to stop") == 1
    assert "socket free: bound it" in said


def test_a_holder_waiting_for_its_socket_stops_when_told(tiny: Any, short_tmp: Path) -> None:
    path = short_tmp / "s" / "weights.sock"
    old = WeightsHolder(tiny, ID, KEY, path)
    old.start()
    new = WeightsHolder(load_tiny_llama(short_tmp / "model2"), ID, KEY, path)
    stop = threading.Event()
    stop.set()
    try:
        assert new.start_when_free(stop) is False
        new.close_listener()  # a stopping holder: a late bind gives up and leaves the socket alone
        assert new.start_when_free(threading.Event()) is False
        assert _attach_works(old)
    finally:
        new.stop()
        old.stop()


@needs_root
def test_a_holder_says_why_another_users_socket_blocks_its_name(tiny: Any, short_tmp: Path) -> None:
    """A device's socket directory is sticky (see vnpu.device_plugin.plugin.ensure_socket_dir): a
    socket another user left under the group's name can be removed by neither this group's holder nor
    its pods, so the holder names the owner and what to do instead of failing with a bare EPERM."""
    short_tmp.chmod(0o755)
    directory = short_tmp / "npu0"
    directory.mkdir()
    directory.chmod(0o1733)
    path = directory / "w.sock"
    holder = WeightsHolder(tiny, ID, KEY, path)
    owner = f"belongs to uid {OTHER_TENANT_UID}, not to this holder's uid {TENANT_UID}"

    def start() -> str:
        holder.start()
        return "started"

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # closed unlistened: as a process of another user leaves it
    os.chown(path, OTHER_TENANT_UID, OTHER_TENANT_UID)
    refused = run_as(TENANT_UID, start)
    assert refused["error"].startswith("HolderError: cannot remove the stale socket"), refused
    assert owner in refused["error"] and "remove it on the node as root" in refused["error"], refused
    assert path.exists()
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as squatter:  # live, and open to all
        squatter.bind(str(path))
        path.chmod(0o666)
        os.chown(path, OTHER_TENANT_UID, OTHER_TENANT_UID)
        squatter.listen(1)
        refused = run_as(TENANT_UID, start)
    assert refused["error"].startswith("SocketBusyError: another weights-holder is already serving"), refused
    assert owner in refused["error"], refused


# The child imports only the standard library before dropping privileges (nobody cannot read the
# venv) and speaks the holder's framing by hand: 4-byte big-endian length + JSON.
_OTHER_USER_CLIENT = """
import json, os, socket, struct, sys
path = sys.argv[1]
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(path)
except PermissionError as e:
    print("connect refused:", e.strerror); sys.exit(0)
body = json.dumps({"op": "hello", "protocol": 2, "identity": {}, "nonce": "0" * 32}).encode()
try:
    s.sendall(struct.pack(">I", len(body)) + body)
except BrokenPipeError:
    pass  # the holder refuses by peer credentials on accept, without reading: its reply is waiting
n = struct.unpack(">I", s.recv(4))[0]
data = b""
while len(data) < n:
    data += s.recv(n - len(data))
print("reply:", json.loads(data))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to impersonate another uid")
def test_other_users_are_refused_by_mode_and_by_peer_credentials(holder: Any, short_tmp: Path) -> None:
    def attempt() -> str:
        cmd = [sys.executable, "-c", _OTHER_USER_CLIENT, str(holder.socket_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return proc.stdout + proc.stderr

    for directory in (short_tmp, holder.socket_path.parent):
        os.chmod(directory, 0o755)  # let the other user reach the socket file itself
    out = attempt()
    assert "connect refused: Permission denied" in out, out  # the 0600 socket file
    os.chmod(holder.socket_path, 0o666)  # even with the file open to all, SO_PEERCRED refuses
    out = attempt()
    assert "'ok': False" in out and "uid 65534" in out, out
    assert holder.clients == 0


def test_lease_notices_holder_death(holder: Any) -> None:
    lease = attach(holder.socket_path, ID, KEY)
    seen: list[str] = []
    lease.on_lost(seen.append)
    holder.stop()
    assert lease.wait_lost(10)
    assert not lease.alive and seen and "holder" in seen[0]
    lease.close()


# --- a replica runtime over a lease -------------------------------------------------------------


def test_runtime_fails_clearly_while_the_holder_is_gone_and_recovers(tiny: Any, short_tmp: Path) -> None:
    path = short_tmp / "s" / "weights.sock"
    runtime = ModelRuntime(ServeOptions(max_context=64))
    supervisor = SharedWeightsSupervisor(runtime, path, ID, KEY, retry_initial=0.05, retry_max=0.2)
    supervisor.start()
    try:
        wait_until(lambda: runtime.unavailable_reason and "no weights-holder" in runtime.unavailable_reason)
        with pytest.raises(RuntimeUnavailableError, match="no weights-holder is listening"):
            runtime.complete("hi", 4, temperature=0)
        first = WeightsHolder(tiny, ID, KEY, path)
        first.start()
        wait_until(lambda: runtime.ready)
        expected = runtime.complete("hello", 8, temperature=0).result.token_ids
        cache = runtime._cache
        first.stop()  # the holder dies
        wait_until(lambda: not runtime.ready)
        # "went away" when it notices; the supervisor's next retry (50 ms later) may already say that
        # none is listening (a loaded machine lets it run before this line).
        reason = runtime.unavailable_reason or ""
        assert "went away" in reason or "no weights-holder is listening" in reason, reason
        with pytest.raises(RuntimeUnavailableError, match="weights-holder"):
            runtime.complete("hello", 8, temperature=0)
        second_weights = load_tiny_llama(short_tmp / "model2")  # a new holder process: a new arena
        second = WeightsHolder(second_weights, ID, KEY, path)
        second.start()
        try:
            wait_until(lambda: runtime.ready)
            assert runtime.complete("hello", 8, temperature=0).result.token_ids == expected
            assert runtime._cache is cache  # the replica's own KV cache survived the re-attach
            assert runtime.metrics.attaches._value.get() == 2
            info = runtime.metrics.share_info.labels(ID.namespace, ID.group, ID.weights_id, "cpu")
            assert info._value.get() == 1  # the replica's series name its namespaced share identity
            assert runtime.metrics.attach_failures.labels("unavailable")._value.get() >= 1
        finally:
            second.stop()
    finally:
        supervisor.stop()


def test_a_replica_stays_unready_with_the_reason_while_only_an_untrusted_holder_answers(
    tiny: Any, short_tmp: Path
) -> None:
    """A squatter on the replica's socket path: the replica never serves (no fallback), says why on
    its readiness, and attaches as soon as its real holder is there."""
    path = short_tmp / "s2" / "weights.sock"
    runtime = ModelRuntime(ServeOptions(max_context=64))
    squatter = WeightsHolder(tiny, ID, b"s" * 32, path)
    squatter.start()
    supervisor = SharedWeightsSupervisor(runtime, path, ID, KEY, retry_initial=0.05, retry_max=0.2)
    supervisor.start()
    try:
        wait_until(lambda: "failed authentication" in (runtime.unavailable_reason or ""))
        assert not runtime.ready and supervisor.refused
        assert runtime.metrics.attach_failures.labels("refused")._value.get() >= 1
        squatter._listener.close()
        path.unlink()
        real = WeightsHolder(tiny, ID, KEY, path)
        real.start()
        try:
            wait_until(lambda: runtime.ready)
            assert runtime.complete("hello", 4, temperature=0).result.token_ids
        finally:
            real._listener.close()
    finally:
        supervisor.stop()


def test_a_stopping_holder_leaves_its_replacements_socket_alone(tiny: Any, short_tmp: Path) -> None:
    """A restarted holder pod can bind the path while the old one is still shutting down (the old
    socket file was gone already): the old one's exit must not remove the new one's socket."""
    path = short_tmp / "s3" / "weights.sock"
    old = WeightsHolder(load_tiny_llama(short_tmp / "old-model"), ID, KEY, path)
    old.start()
    path.unlink()
    new = WeightsHolder(tiny, ID, KEY, path)
    new.start()
    try:
        old.stop()
        assert path.exists() and holder_status(path, ID, KEY)["pid"] == os.getpid()
    finally:
        new._listener.close()  # not stop(): the arena belongs to the fixture
    # And a holder that still owns its path removes it when it stops.
    alone = WeightsHolder(load_tiny_llama(short_tmp / "alone-model"), ID, KEY, short_tmp / "s4" / "w.sock")
    alone.start()
    alone.stop()
    assert not alone.socket_path.exists()


def test_a_key_is_read_byte_for_byte(short_tmp: Path) -> None:
    """Random keys may start or end with whitespace-like bytes: nothing may be stripped."""
    key = b"\n\t " + b"k" * 29 + b"\r\x0b"
    path = short_tmp / "key"
    path.write_bytes(key)
    assert sharing.load_key(path) == key
    path.write_bytes(b"short")
    with pytest.raises(sharing.ShareKeyError, match="at least 16"):
        sharing.load_key(path)
