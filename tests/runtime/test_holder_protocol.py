"""The holder protocol against hostile peers and broken holders: a peer that trickles its handshake,
odd frames from a squatter, failing accepts, the file descriptors of a failed attach, arenas and
manifests a replica must not trust."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from rt_helpers import attach_works, load_tiny_llama, wait_until

from vnpu import api, sharing
from vnpu.runtime import holder as holder_module
from vnpu.runtime import supervisor as supervisor_module
from vnpu.runtime.arena import ArenaError, CpuArena
from vnpu.runtime.attach import AttachRefusedError, Expected, HolderUnavailableError, attach
from vnpu.runtime.engine import ModelRuntime, ServeOptions
from vnpu.runtime.holder import WeightsHolder
from vnpu.runtime.ipc import recv_message, send_message
from vnpu.runtime.manifest import ALIGNMENT, WeightManifest, layout_problem, pack
from vnpu.runtime.supervisor import SharedWeightsSupervisor

ID = sharing.ShareIdentity("team-a", "group-a", "w1")
KEY = b"k" * 32


@pytest.fixture
def tiny(short_tmp: Path) -> Any:
    return load_tiny_llama(short_tmp / "model")


# --- the holder's handshake deadline ------------------------------------------------------------


@pytest.mark.parametrize("stage", ["hello", "answer"])
def test_peers_trickling_their_handshake_are_cut_at_its_deadline(
    stage: str, tiny: Any, short_tmp: Path, monkeypatch: Any
) -> None:
    """Peers without the key announce a big frame and send it a byte at a time, every byte well
    within one read's timeout: their hello (cut at HELLO_TIMEOUT_S), or, after a valid hello, their
    answer to the challenge (cut at HANDSHAKE_TIMEOUT_S). Each stage has one deadline: they are cut
    when it passes, not counted as refused, and a replica gets in."""
    # Short enough for a quick test, long enough for a real replica's handshake on a loaded machine.
    monkeypatch.setattr(holder_module, "HELLO_TIMEOUT_S", 1.0 if stage == "hello" else 60.0)
    monkeypatch.setattr(holder_module, "HANDSHAKE_TIMEOUT_S", 1.5 if stage == "answer" else 60.0)
    monkeypatch.setattr(holder_module, "MAX_HANDSHAKES", 3)  # room for the replica: nobody is cut for it
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
            peer.settimeout(10)
            peer.connect(str(path))
            if stage == "answer":
                send_message(peer, _hello())
                challenge, _ = recv_message(peer)
                assert challenge["op"] == "challenge"
            peer.sendall(struct.pack(">I", 60_000))  # a frame under MAX_REQUEST that never completes
        for t in threads:
            t.start()
        wait_until(lambda: len(cut) == 2, timeout=10)
        assert _attach(path)
        assert holder.refused == 0
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
        for peer in peers:
            peer.close()
        holder.stop()


def _hello() -> dict[str, Any]:
    identity = {"namespace": ID.namespace, "group": ID.group, "weights_id": ID.weights_id}
    return {"op": "hello", "protocol": 2, "identity": identity, "nonce": sharing.new_nonce(), "pid": 1}


# --- odd frames: nothing a peer sends may end a replica's retries ------------------------------


class FakeHolder:
    """Listens at ``path`` and hands every connection to ``serve``: a squatter, or a broken holder."""

    def __init__(self, path: Path, serve: Any) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._listener.settimeout(0.05)  # lets close() end the accept loop
        self._serve = serve
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self._serve(conn)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._listener.close()
        self.path.unlink()


@pytest.fixture
def fake_holder() -> Any:
    """Makes FakeHolders, and closes whichever a test left open (a failed assertion included)."""
    made: list[FakeHolder] = []

    def make(path: Path, serve: Any) -> FakeHolder:
        made.append(FakeHolder(path, serve))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def _send_raw(conn: socket.socket, body: bytes) -> None:
    recv_message(conn)  # the hello
    conn.sendall(struct.pack(">I", len(body)) + body)


def _challenge_with_key(conn: socket.socket) -> None:
    """The holder's side of the handshake, by someone who has the group's key."""
    hello, _ = recv_message(conn)
    nonce = sharing.new_nonce()
    challenge = {"ok": True, "op": "challenge", "nonce": nonce}
    send_message(conn, challenge | {"proof": sharing.proof(KEY, "holder", ID, hello["nonce"], nonce)})
    recv_message(conn)  # the replica's proof


def _nested_json(conn: socket.socket) -> None:
    _send_raw(conn, b"[" * 60_000)  # a frame json.loads cannot parse without RecursionError


def _surrogate_proof(conn: socket.socket) -> None:
    challenge = {"ok": True, "op": "challenge", "nonce": "0" * 32, "proof": "\ud800"}
    _send_raw(conn, json.dumps(challenge).encode())  # a lone surrogate: its str cannot be encoded


def _plain_file_arena(manifest: dict[str, Any], plain: Path) -> Any:
    """A holder with the key that passes a regular file as the arena (no memfd, no seals)."""

    def serve(conn: socket.socket) -> None:
        _challenge_with_key(conn)
        with open(plain, "rb") as f:
            reply = {"ok": True, "arena": {"backend": "cpu", "nbytes": 4096}, "holder": {}}
            send_message(conn, reply | {"manifest": manifest}, [f.fileno()])
        conn.recv(1)  # until the replica hangs up

    return serve


@pytest.mark.parametrize(
    ("odd", "error"),
    [
        ("nested-json", HolderUnavailableError),
        ("surrogate-proof", AttachRefusedError),  # not the proof: a squatter, refused
        ("plain-file-arena", HolderUnavailableError),
    ],
)
def test_an_odd_frame_does_not_end_the_replicas_retries(
    odd: str,
    error: type[Exception],
    tiny: Any,
    short_tmp: Path,
    monkeypatch: Any,
    fake_holder: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A squatter without the key (nested JSON, an unencodable proof) or a broken holder with it (a
    regular file for the arena): the replica stays unready, keeps trying, says so at once (no quiet
    start: something answers on the socket), and serves once its real holder is up."""
    caplog.set_level(logging.DEBUG, logger=SUPERVISOR_LOG)
    uncaught: list[str] = []
    monkeypatch.setattr(
        threading, "excepthook", lambda a: uncaught.append(f"{a.thread.name}: {a.exc_value!r}")
    )
    plain = short_tmp / "plain"
    plain.write_bytes(b"\0" * 4096)
    serve = {
        "nested-json": _nested_json,
        "surrogate-proof": _surrogate_proof,
        "plain-file-arena": _plain_file_arena(tiny.manifest.to_dict(), plain),
    }[odd]
    path = short_tmp / "s" / "weights.sock"
    fake = fake_holder(path, serve)
    with pytest.raises(error):  # one of attach's two errors, whatever the peer sent
        attach(path, ID, KEY, timeout=5)
    runtime = ModelRuntime(ServeOptions(max_context=64))
    supervisor = SharedWeightsSupervisor(runtime, path, ID, KEY, retry_initial=0.05, retry_max=0.1)
    supervisor.start()
    try:
        failures = runtime.metrics.attach_failures
        # It failed (a squatter is refused, a broken holder is unavailable), and came back for more.
        wait_until(lambda: sum(failures.labels(f)._value.get() for f in ("refused", "unavailable")) >= 2)
        assert not runtime.ready and runtime.unavailable_reason
        said = _levels(caplog)
        assert "waiting for the weights-holder" not in said
        assert min(said["attach failed"]) >= logging.WARNING
        fake.close()
        real = WeightsHolder(tiny, ID, KEY, path)
        real.start()
        try:
            wait_until(lambda: runtime.ready)
            assert runtime.complete("hello", 4, temperature=0).result.token_ids
        finally:
            real.stop()
    finally:
        supervisor.stop()
    assert uncaught == [] and not supervisor._thread.is_alive()


def test_the_holder_answers_odd_frames_and_keeps_serving(
    tiny: Any, short_tmp: Path, monkeypatch: Any
) -> None:
    uncaught: list[str] = []
    monkeypatch.setattr(
        threading, "excepthook", lambda a: uncaught.append(f"{a.thread.name}: {a.exc_value!r}")
    )
    holder = WeightsHolder(tiny, ID, KEY, short_tmp / "s" / "weights.sock")
    holder.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(holder.socket_path))
            body = b"[" * 60_000
            s.sendall(struct.pack(">I", len(body)) + body)
            assert s.recv(1) == b""  # not a frame: the holder hangs up
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(holder.socket_path))
            identity = {"namespace": ID.namespace, "group": ID.group, "weights_id": ID.weights_id}
            send_message(s, {"op": "hello", "protocol": 2, "identity": identity, "nonce": "0" * 32})
            recv_message(s)
            send_message(s, {"op": "attach", "proof": "\ud800"})
            reply, fds = recv_message(s)
            assert not reply["ok"] and "authentication failed" in reply["error"] and not fds
        assert _attach(holder.socket_path)
    finally:
        holder.stop()
    assert uncaught == []


def test_the_supervisor_survives_an_error_nobody_foresaw(
    tiny: Any, short_tmp: Path, monkeypatch: Any
) -> None:
    """Whatever escapes attach (a bug), the supervisor logs it, stays unready and retries."""
    calls: list[int] = []

    def flaky_attach(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("a bug in attach")
        return attach(*args, **kwargs)

    monkeypatch.setattr(supervisor_module, "attach", flaky_attach)
    holder = WeightsHolder(tiny, ID, KEY, short_tmp / "s" / "weights.sock")
    holder.start()
    runtime = ModelRuntime(ServeOptions(max_context=64))
    supervisor = SharedWeightsSupervisor(runtime, holder.socket_path, ID, KEY, retry_initial=0.05)
    supervisor.start()
    try:
        wait_until(lambda: runtime.ready)
        assert len(calls) == 3 and runtime.metrics.attach_failures.labels("unavailable")._value.get() == 2
    finally:
        supervisor.stop()
        holder.stop()


def test_a_replica_waits_quietly_for_a_loading_holder_and_warns_once_it_lost_one(
    tiny: Any, short_tmp: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas start beside a holder still loading: no socket yet is said once at INFO (every pod of
    every start used to log a handful of warnings for it). Once the replica has lost a holder it had,
    each failed try is a warning again; so is one past the quiet start, and one whose holder answers
    badly."""
    caplog.set_level(logging.DEBUG, logger=SUPERVISOR_LOG)
    path = short_tmp / "s" / "weights.sock"
    runtime = ModelRuntime(ServeOptions(max_context=64))
    supervisor = SharedWeightsSupervisor(runtime, path, ID, KEY, retry_initial=0.02, retry_max=0.05)
    supervisor.start()
    failures = runtime.metrics.attach_failures.labels("unavailable")
    try:
        wait_until(lambda: failures._value.get() >= 3)
        said = _levels(caplog)
        assert list(said) == ["waiting for the weights-holder"]
        first, *then = said["waiting for the weights-holder"]
        assert first == logging.INFO and set(then) == {logging.DEBUG}
        assert "no weights-holder is listening" in (runtime.unavailable_reason or "")
        holder = WeightsHolder(tiny, ID, KEY, path)
        holder.start()
        wait_until(lambda: runtime.ready)
        holder.stop()
        before = failures._value.get()
        wait_until(lambda: failures._value.get() >= before + 2)
        assert logging.WARNING in _levels(caplog)["attach failed"]
    finally:
        supervisor.stop()

    # Past the quiet start: a warning from the first try.
    caplog.clear()
    monkeypatch.setattr(supervisor_module, "QUIET_START_S", 0.0)
    late = SharedWeightsSupervisor(runtime, short_tmp / "none.sock", ID, KEY, retry_initial=0.02)
    late.start()
    try:
        wait_until(lambda: "attach failed" in _levels(caplog))
        assert "waiting for the weights-holder" not in _levels(caplog)
        assert _levels(caplog)["attach failed"][0] == logging.WARNING
    finally:
        late.stop()


SUPERVISOR_LOG = "vnpu.runtime.supervisor"


def _levels(caplog: pytest.LogCaptureFixture) -> dict[str, list[int]]:
    """The supervisor's messages, each with the levels it was logged at, in order."""
    levels: dict[str, list[int]] = {}
    for record in caplog.records:
        if record.name == SUPERVISOR_LOG:
            levels.setdefault(record.getMessage(), []).append(record.levelno)
    return levels


# --- the accept loop ----------------------------------------------------------------------------


def test_the_holder_keeps_accepting_after_accept_fails_and_ends_when_stopped(
    tiny: Any, short_tmp: Path, monkeypatch: Any
) -> None:
    """EMFILE from accept (file descriptors run out for a moment) is passed over, not the end of the
    holder's service; stop() ends the loop."""
    monkeypatch.setattr(holder_module, "ACCEPT_RETRY_S", 0.01)
    real_accept = socket.socket.accept
    failures = []
    armed = threading.Event()

    def accept(sock: socket.socket) -> Any:
        armed.wait(10)  # until the test has found the loop's thread
        if len(failures) < 3:
            failures.append(1)
            raise OSError(errno.EMFILE, "Too many open files")
        return real_accept(sock)

    monkeypatch.setattr(socket.socket, "accept", accept)
    holder = WeightsHolder(tiny, ID, KEY, short_tmp / "s" / "weights.sock")
    before = set(threading.enumerate())
    holder.start()
    (loop,) = [t for t in threading.enumerate() if t not in before and t.name == "holder-accept"]
    armed.set()
    try:
        attach(holder.socket_path, ID, KEY, timeout=5).close()
        assert len(failures) == 3
    finally:
        holder.stop()
    loop.join(10)
    assert not loop.is_alive()


def test_a_connection_whose_thread_cannot_start_gives_its_slot_back(
    tiny: Any, short_tmp: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(holder_module, "MAX_HANDSHAKES", 2)
    real_start = threading.Thread.start
    failed = []

    def start(thread: threading.Thread) -> None:
        if thread.name == "holder-conn" and len(failed) < 3:
            failed.append(thread)
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    holder = WeightsHolder(tiny, ID, KEY, short_tmp / "s" / "weights.sock")
    holder.start()
    try:
        for _ in range(3):  # more than the cap: each is closed, its slot back
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(holder.socket_path))
                assert s.recv(1) == b""
        attach(holder.socket_path, ID, KEY, timeout=10).close()
        assert len(failed) == 3
    finally:
        holder.stop()


# --- file descriptors of a failed attach --------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _memfd(nbytes: int, seals: int) -> int:
    fd = os.memfd_create("fake-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


SEALED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


@pytest.mark.parametrize(
    "broken",
    [
        "unsealed",
        "size-mismatch",
        "two-fds",
        "manifest-unparsable",
        "arena-meta-not-an-object",
        "other-weights",
        "resident-claims-more-fds",
        "resident-units-not-names",
        "resident-unsealed",
        "resident-not-an-object",
        "resident-of-another-backend",
    ],
)
def test_a_failed_attach_keeps_no_file_descriptor(
    broken: str, tiny: Any, short_tmp: Path, fake_holder: Any
) -> None:
    """A holder with the key whose attach cannot be used: each try must close every fd it received,
    or a replica retrying pins another arena every time."""
    manifest = tiny.manifest.to_dict()
    nbytes = tiny.manifest.total_bytes
    served = []

    def serve(conn: socket.socket) -> None:
        _challenge_with_key(conn)
        fds = [_memfd(nbytes, 0 if broken == "unsealed" else SEALED)]
        arena: Any = {"backend": "cpu", "nbytes": nbytes}
        sent = manifest
        if broken == "size-mismatch":
            arena["nbytes"] = nbytes + 4096
        elif broken == "two-fds":
            fds.append(_memfd(4096, SEALED))
        elif broken == "manifest-unparsable":
            sent = {"tensors": []}
        elif broken == "arena-meta-not-an-object":
            arena = ["cpu"]
        elif broken == "other-weights":
            sent = manifest | {"source": "file:///other.gguf"}
        grant: dict[str, Any] = {"ok": True, "arena": arena, "holder": {}, "manifest": sent}
        if broken.startswith("resident-"):  # a sound host arena, and a resident part that is not
            fds.append(_memfd(4096, 0 if broken == "resident-unsealed" else SEALED))
            part: Any = {"arena": {"backend": "cpu", "nbytes": 4096}, "units": ["model.norm"], "fds": 1}
            if broken == "resident-claims-more-fds":
                part["fds"] = 3
            elif broken == "resident-units-not-names":
                part["units"] = [{"name": "model.norm"}]
            elif broken == "resident-not-an-object":
                part = "everything"
            elif broken == "resident-of-another-backend":
                part["arena"] = {"backend": "cuda", "nbytes": 4096, "rebuild_args": []}
            grant["resident"] = part
        try:
            send_message(conn, grant, fds)
        finally:
            for fd in fds:
                os.close(fd)
        conn.recv(1)  # until the replica hangs up
        served.append(1)

    path = short_tmp / "s" / "weights.sock"
    fake_holder(path, serve)
    before = _open_fds()
    for attempt in range(1, 4):
        with pytest.raises((HolderUnavailableError, AttachRefusedError)):
            attach(path, ID, KEY, timeout=5, expected=Expected(tiny.manifest.source))
        wait_until(lambda attempt=attempt: len(served) == attempt)  # the fake holder closed its side
    assert _open_fds() == before


# --- arenas and manifests a replica must not trust ----------------------------------------------

SEAL_NAMES = {
    "writes": fcntl.F_SEAL_WRITE,
    "shrinking": fcntl.F_SEAL_SHRINK,  # a holder could truncate it: every read here would SIGBUS
    "growth": fcntl.F_SEAL_GROW,
    "further sealing": fcntl.F_SEAL_SEAL,
}


@pytest.mark.parametrize("missing", list(SEAL_NAMES))
def test_an_arena_its_sender_could_still_change_is_refused(missing: str) -> None:
    fd = _memfd(4096, SEALED & ~SEAL_NAMES[missing])
    with pytest.raises(ArenaError, match=f"not sealed against {missing}: its sender could still change it"):
        CpuArena.import_({"backend": "cpu", "nbytes": 4096}, [fd])


def test_an_arena_that_is_not_a_memfd_is_refused(short_tmp: Path) -> None:
    plain = short_tmp / "plain"
    plain.write_bytes(b"\0" * 4096)
    fd = os.open(plain, os.O_RDONLY)
    with pytest.raises(ArenaError, match="not a sealable memfd"):
        CpuArena.import_({"backend": "cpu", "nbytes": 4096}, [fd])


def _relayout(manifest: dict[str, Any], broken: str) -> dict[str, Any]:
    """``manifest`` (as a holder sends it) with one thing wrong about its layout."""
    tensors = [list(t) for t in manifest["tensors"]]
    first, second, last = tensors[0], tensors[1], tensors[-1]
    total = manifest["total_bytes"]
    if broken == "total-bytes":
        total *= 10
    elif broken == "negative-offset":
        last[3] = -ALIGNMENT  # slicing would read the arena's last bytes
    elif broken == "overlap":
        second[3] = first[3]
    elif broken == "misaligned":
        second[3] += 4
    elif broken == "past-the-end":
        last[3] = total  # aligned, but its bytes lie beyond the arena
    elif broken == "unknown-dtype":
        first[1] = "int8"
    elif broken == "negative-dimension":
        first[2] = [-1, *first[2][1:]]
    elif broken == "offset-not-an-integer":
        first[3] = float(first[3])
    return manifest | {"tensors": tensors, "total_bytes": total}


@pytest.mark.parametrize(
    ("broken", "problem"),
    [
        ("total-bytes", "it says the arena holds"),
        ("negative-offset", "lie outside the arena"),
        ("overlap", "overlaps"),
        ("misaligned", f"is not a multiple of {ALIGNMENT}"),
        ("past-the-end", "lie outside the arena"),
        ("unknown-dtype", "unknown dtype 'int8'"),
        ("negative-dimension", "negative dimension"),
        ("offset-not-an-integer", "offset must be an integer"),
        ("nothing", None),  # the fake holder itself is faithful: the real manifest attaches
    ],
)
def test_a_manifest_that_does_not_fit_its_arena_is_refused(
    broken: str, problem: str | None, tiny: Any, short_tmp: Path, fake_holder: Any
) -> None:
    """A holder with the key, the real sealed arena, and a manifest whose tensors lie where they
    cannot: views would silently alias or share bytes, so the replica refuses it."""
    manifest = tiny.manifest.to_dict()
    if broken != "nothing":
        manifest = _relayout(manifest, broken)

    def serve(conn: socket.socket) -> None:
        _challenge_with_key(conn)
        reply = {"ok": True, "arena": {"backend": "cpu", "nbytes": tiny.arena.nbytes}, "holder": {}}
        send_message(conn, reply | {"manifest": manifest}, [tiny.arena.fd])
        conn.recv(1)  # until the replica hangs up

    path = short_tmp / "s" / "weights.sock"
    fake_holder(path, serve)
    if problem is None:
        lease = attach(path, ID, KEY, timeout=5)
        assert lease.manifest.tensors == tiny.manifest.tensors
        lease.close()
        return
    error = HolderUnavailableError if broken == "offset-not-an-integer" else AttachRefusedError
    with pytest.raises(error, match=problem):
        attach(path, ID, KEY, timeout=5)


def test_every_packed_layout_fits_its_arena(tiny: Any) -> None:
    assert layout_problem(tiny.manifest, tiny.arena.nbytes) is None
    entries, total = pack([("a", "float32", (3,)), ("empty", "float16", (0,)), ("b", "bfloat16", (5, 7))])
    assert layout_problem(WeightManifest(tiny.manifest.config, entries, total), total) is None


def _attach(path: Path) -> bool:
    return attach_works(path, ID, KEY, timeout=1.0)


# --- how long a stopping holder keeps the weights ------------------------------------------------


@pytest.mark.parametrize(
    ("announced", "seconds"),
    [
        (900, 900.0),
        (2.5, 2.5),
        (0, 0.0),
        (-30, 0.0),
        (10**9, float(api.MAX_DRAIN_S)),
        pytest.param(10**400, float(api.MAX_DRAIN_S), id="10**400"),  # a JSON int past a float's range
        pytest.param(-(10**400), 0.0, id="-10**400"),
        (float("inf"), float(api.REPLICA_DRAIN_S)),
        (float("nan"), float(api.REPLICA_DRAIN_S)),
        (None, float(api.REPLICA_DRAIN_S)),  # an older replica announces nothing
        ("forever", float(api.REPLICA_DRAIN_S)),
        (True, float(api.REPLICA_DRAIN_S)),
        ([60], float(api.REPLICA_DRAIN_S)),
    ],
)
def test_an_announced_drain_is_a_bounded_number_of_seconds(announced: object, seconds: float) -> None:
    assert holder_module.announced_drain(announced) == seconds


def test_an_unforeseen_error_in_a_connection_is_logged_with_its_traceback(
    tiny: Any, short_tmp: Path, monkeypatch: Any, caplog: Any
) -> None:
    """A bug met while serving one connection (here in reading the announced drain) ends that
    connection with an ERROR and its traceback in the holder's log, not a thread dying with a traceback
    on stderr alone; the holder serves the next replica."""
    died: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", died.append)
    real_announced_drain = holder_module.announced_drain
    calls = []

    def announced_drain(value: object) -> float:
        calls.append(value)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real_announced_drain(value)

    monkeypatch.setattr(holder_module, "announced_drain", announced_drain)
    caplog.set_level(logging.INFO, logger="vnpu.runtime.holder")
    holder = WeightsHolder(tiny, ID, KEY, short_tmp / "s" / "weights.sock")
    holder.start()
    try:
        with pytest.raises(HolderUnavailableError):
            attach(holder.socket_path, ID, KEY, timeout=10)
        attach(holder.socket_path, ID, KEY, timeout=10).close()
        wait_until(lambda: holder.clients == 0, timeout=10)
    finally:
        holder.stop()
    assert died == []
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == "connection closed on an unexpected error (a bug)"
    assert record.exc_info is not None and "RuntimeError: a bug" in caplog.text
    assert holder.refused == 0


def test_a_grant_the_holder_cannot_send_is_a_warning_not_a_detach(
    tiny: Any, short_tmp: Path, monkeypatch: Any, caplog: Any
) -> None:
    """The holder runs out of file descriptors for the grant's duplicates (EMFILE): the replica's
    attach fails, and the holder's log says the grant was not sent, at WARNING, not that a connection
    ended and a replica detached (INFO, what every replica's normal leaving looks like)."""
    real_dup = os.dup
    failed = []

    def dup(fd: int) -> int:
        if threading.current_thread().name == "holder-conn" and not failed:
            failed.append(fd)
            raise OSError(errno.EMFILE, "Too many open files")
        return real_dup(fd)

    monkeypatch.setattr(os, "dup", dup)
    caplog.set_level(logging.INFO, logger="vnpu.runtime.holder")
    holder = WeightsHolder(tiny, ID, KEY, short_tmp / "s" / "weights.sock")
    holder.start()
    try:
        with pytest.raises(HolderUnavailableError):
            attach(holder.socket_path, ID, KEY, timeout=10)
        wait_until(lambda: any(r.levelno == logging.WARNING for r in caplog.records), timeout=10)
        assert holder.clients == 0
        attach(holder.socket_path, ID, KEY, timeout=10).close()  # the next one gets its grant
        wait_until(lambda: holder.clients == 0, timeout=10)
        # (its lease goes a moment before the line saying so)
        wait_until(lambda: "replica detached" in [r.getMessage() for r in caplog.records], timeout=10)
    finally:
        holder.stop()
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.getMessage() == "attach failed: the grant was not sent"
    assert "Too many open files" in warning.reason  # type: ignore[attr-defined]
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("replica attached") == messages.count("replica detached") == 1
    assert messages.count("connection ended") == 1  # the second replica's lease


def test_a_stopping_holder_keeps_the_weights_as_long_as_its_replicas_drain(
    tiny: Any, short_tmp: Path, monkeypatch: Any
) -> None:
    """Each replica tells its holder at attach how long it gives its requests in flight at SIGTERM (its
    model's runtime.drainSeconds). A holder stopped with them waits for the longest of those attached,
    plus the rest of their grace: a model draining 15 minutes keeps its weights that long, and a holder
    stopped alone beside quick replicas exits after their drain, not after the longest any model may
    set (``--drain-seconds``, the cap). A replica of an older version announces nothing: the default."""
    holder = WeightsHolder(tiny, ID, KEY, short_tmp / "s" / "weights.sock")
    holder.start()
    slow = attach(holder.socket_path, ID, KEY, timeout=5, drain_s=900)
    older = attach(holder.socket_path, ID, KEY, timeout=5)
    try:
        wait_until(lambda: holder.clients == 2)
        assert holder.replica_wait_s() == 900 + api.HOLDER_WAIT_MARGIN_S
        slow.close()
        wait_until(lambda: holder.clients == 1)
        assert holder.replica_wait_s() == api.REPLICA_DRAIN_S + api.HOLDER_WAIT_MARGIN_S
    finally:
        older.close()
        holder.stop()
    # The wait itself, at a scale a test can sit out: a replica that announced 0.2 s, and a margin of
    # 0.2 s, against a cap of a minute. It does not detach: the holder ends its lease after 0.4 s.
    monkeypatch.setattr(api, "HOLDER_WAIT_MARGIN_S", 0.2)
    again = WeightsHolder(load_tiny_llama(short_tmp / "m2"), ID, KEY, short_tmp / "s" / "weights.sock")
    again.start()
    quick = attach(again.socket_path, ID, KEY, timeout=5, drain_s=0.2)
    stopper = threading.Thread(target=again.stop, kwargs={"drain_s": 60.0})
    try:
        wait_until(lambda: again.clients == 1)
        stopper.start()
        stopper.join(30)
        assert not stopper.is_alive(), "the holder waited past what its replica announced"
        assert quick.wait_lost(5)  # the replica sees its weights go, as when a holder dies
    finally:
        quick.close()
