"""Replica side of the weights-holder protocol: attach to the arena, hold a lease, notice its loss.

:func:`attach` connects, receives the manifest and the arena (file descriptors over SCM_RIGHTS on
CPU, an IPC handle on CUDA/NPU), maps it read-only and returns a :class:`Lease`. A watcher thread
blocks on the lease socket; EOF means the holder is gone, and the lease calls ``on_lost`` once.
What to do then (stop serving, re-attach) is the caller's business — see
:class:`vnpu.runtime.supervisor.SharedWeightsSupervisor`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vnpu import sharing
from vnpu.runtime.arena import Arena, ArenaError, import_arena
from vnpu.runtime.handshakes import hello_ticket
from vnpu.runtime.holder import PROTOCOL_VERSION
from vnpu.runtime.ipc import ProtocolError, recv_message, send_message, settimeout_until
from vnpu.runtime.manifest import WeightManifest, layout_problem
from vnpu.runtime.offload_plan import ResidentPart
from vnpu.shown import shown


class HolderUnavailableError(ConnectionError):
    """No weights-holder answers on the socket, or it went away."""


class NoHolderListeningError(HolderUnavailableError):
    """Nothing listens on the socket (yet): no socket file, or no process behind it."""


class AttachRefusedError(PermissionError):
    """No attach is possible with this holder: it refused this replica (identity, key, protocol), it
    could not prove it holds the group's key (a squatter), or it serves other weights."""


@dataclass(frozen=True)
class Expected:
    """What this replica must find in the holder's manifest: its own source, dtype and header digest
    (None where the replica does not constrain it)."""

    source: str
    dtype: str | None = None
    header_digest: str | None = None


def manifest_mismatch(manifest: WeightManifest, expected: Expected) -> str | None:
    """Why ``manifest`` is not the weights ``expected`` names, or None when it is (pure)."""
    problems = []
    if manifest.source != expected.source:
        problems.append(f"source {manifest.source!r}, this replica's is {expected.source!r}")
    if expected.dtype is not None and manifest.dtype != expected.dtype:
        problems.append(f"dtype {manifest.dtype}, this replica's is {expected.dtype}")
    if expected.header_digest is not None and manifest.header_digest != expected.header_digest:
        problems.append(
            f"weights whose headers digest to {manifest.header_digest or 'nothing'}, "
            f"this replica's to {expected.header_digest}"
        )
    return "; ".join(problems) or None


class Lease:
    """An attached arena. Keep it alive as long as any tensor view of it is in use."""

    def __init__(
        self,
        sock: socket.socket,
        manifest: WeightManifest,
        arena: Arena,
        holder: dict[str, Any],
        seconds: float,
        resident: ResidentPart | None = None,
    ) -> None:
        self._sock = sock
        self.manifest = manifest
        self.arena = arena
        #: under async offload on a device, the holder's arena of the units its plan keeps resident
        self.resident = resident
        self.holder = holder
        self.attach_seconds = seconds
        self.lost_reason: str | None = None
        self._lost = threading.Event()
        self._closed = False
        self._on_lost: list[Callable[[str], None]] = []
        self._watcher = threading.Thread(target=self._watch, name="lease-watch", daemon=True)
        self._watcher.start()

    @property
    def alive(self) -> bool:
        return not self._lost.is_set()

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` when the holder goes away (immediately if it already has)."""
        self._on_lost.append(callback)
        if self._lost.is_set() and self.lost_reason is not None:
            callback(self.lost_reason)

    def wait_lost(self, timeout: float | None = None) -> bool:
        return self._lost.wait(timeout)

    def tensors(self) -> dict[str, Any]:
        """Every weight as a zero-copy view into the arena, by HF name."""
        return {name: self.arena.view(entry) for name, entry in self.manifest.tensors.items()}

    def _watch(self) -> None:
        reason = "weights-holder closed the connection"
        try:
            while True:
                message, fds = recv_message(self._sock)
                for fd in fds:
                    os.close(fd)
                if message.get("op") == "shutdown":
                    reason = f"weights-holder is shutting down: {message.get('reason', '')}"
                    break
        except (ProtocolError, OSError) as e:
            if not self._closed:
                reason = f"lost the weights-holder ({e})"
        if self._closed:
            return
        self.lost_reason = reason
        self._lost.set()
        for callback in list(self._on_lost):
            callback(reason)

    def close(self) -> None:
        """End the lease (the holder sees EOF) and unmap the arena once no view is left."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self.arena.close()
        if self.resident is not None:
            self.resident.arena.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


#: Pauses between two connects to a holder whose listen backlog is full: the first, doubled each try
#: up to the last, until the caller's deadline.
BACKLOG_RETRY_S = (0.001, 0.025)


def _connect(socket_path: Path, deadline: float) -> socket.socket:
    """A socket connected to the holder at ``socket_path`` by ``deadline``. A full listen backlog is
    waited out: there a unix socket's connect with a timeout fails at once with EAGAIN instead of
    waiting, and peers that only connect (which needs no key) can keep the backlog full for a while."""
    pause = BACKLOG_RETRY_S[0]
    while True:
        try:
            return _connect_once(socket_path, deadline)
        except BlockingIOError as e:
            if time.monotonic() + pause >= deadline:
                raise HolderUnavailableError(
                    f"the weights-holder at {socket_path} took no connection before the deadline: its "
                    f"listen backlog stayed full ({e.strerror}; too many clients connecting at once)"
                ) from e
            time.sleep(pause)
            pause = min(pause * 2, BACKLOG_RETRY_S[1])


def _connect_once(socket_path: Path, deadline: float) -> socket.socket:
    """One connect; BlockingIOError when the holder's listen backlog is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        settimeout_until(sock, deadline)
        sock.connect(str(socket_path))
    except BlockingIOError:
        sock.close()
        raise
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise NoHolderListeningError(
            f"no weights-holder is listening at {socket_path} ({e.strerror}); "
            "is the weights-holder of this share group running on this node?"
        ) from e
    except PermissionError as e:
        sock.close()
        raise AttachRefusedError(f"not allowed to connect to {socket_path}: {e.strerror}") from e
    except (OSError, ProtocolError) as e:
        sock.close()
        raise HolderUnavailableError(f"cannot connect to the weights-holder at {socket_path}: {e}") from e
    return sock


def _went_away(
    path: Path, during: str, timeout: float, deadline: float, e: Exception
) -> HolderUnavailableError:
    """The error for a connection that failed or ran out of time (``deadline``) before the grant."""
    if isinstance(e, TimeoutError) or time.monotonic() >= deadline:
        return HolderUnavailableError(
            f"weights-holder at {path} did not complete the {during} within its {timeout:g} s timeout ({e})"
        )
    return HolderUnavailableError(f"weights-holder at {path} went away during the {during}: {e}")


def _handshake(
    sock: socket.socket,
    path: Path,
    identity: sharing.ShareIdentity,
    key: bytes,
    op: str,
    deadline: float,
    drain_s: float | None = None,
) -> None:
    """Authenticate the holder, then this client, for ``op`` (see vnpu.runtime.holder), all of it by
    ``deadline`` (``time.monotonic()``): a peer without the key trickling its challenge a byte at a time
    must not hold the caller past its timeout. ``drain_s``: the request drain an attaching replica
    announces (sent only once the holder has proved it holds the key)."""
    client_nonce = sharing.new_nonce()
    send_message(
        sock,
        {
            "op": "hello",
            "protocol": PROTOCOL_VERSION,
            "identity": {
                "namespace": identity.namespace,
                "group": identity.group,
                "weights_id": identity.weights_id,
            },
            "nonce": client_nonce,
            "pid": os.getpid(),
            "ticket": hello_ticket(key, identity, client_nonce),
        },
        deadline=deadline,
    )
    challenge, fds = recv_message(sock, max_size=64 * 1024, deadline=deadline)
    for fd in fds:
        os.close(fd)
    if not challenge.get("ok"):
        raise AttachRefusedError(
            f"weights-holder at {path} refused {identity}: {_peer_text(challenge.get('error'))}"
        )
    server_nonce = challenge.get("nonce")
    if not sharing.valid_nonce(server_nonce):
        raise AttachRefusedError(f"weights-holder at {path} sent a malformed challenge")
    expected = sharing.proof(key, "holder", identity, client_nonce, str(server_nonce))
    if not sharing.proof_matches(expected, challenge.get("proof")):
        raise AttachRefusedError(
            f"whatever listens at {path} failed authentication: it does not hold the key of {identity} "
            "(a socket squatted by another pod?); not attaching to it"
        )
    request: dict[str, object] = {
        "op": op,
        "proof": sharing.proof(key, "replica", identity, client_nonce, server_nonce),
    }
    if drain_s is not None:
        request["drain_s"] = drain_s
    send_message(sock, request, deadline=deadline)


def attach(
    socket_path: str | os.PathLike[str],
    identity: sharing.ShareIdentity,
    key: bytes,
    device: str = "cpu",
    timeout: float = 30.0,
    expected: Expected | None = None,
    drain_s: float | None = None,
) -> Lease:
    """Attach to the holder of ``identity`` at ``socket_path``; raises HolderUnavailableError (nothing
    there, it went away, it sent something unusable, or the grant was not in within ``timeout`` seconds,
    one deadline from connecting to the grant) or AttachRefusedError (authentication, identity or
    weights mismatch), and nothing else: a caller retrying in a loop must not die of a peer's bytes.
    ``drain_s``: how long this replica gives its requests in flight at SIGTERM; a holder stopped with it
    keeps the weights that long (see :meth:`vnpu.runtime.holder.WeightsHolder.stop`)."""
    path = Path(socket_path)
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    sock = _connect(path, deadline)
    try:
        _handshake(sock, path, identity, key, "attach", deadline, drain_s)
        reply, fds = recv_message(sock, deadline=deadline)
    except AttachRefusedError:
        sock.close()
        raise
    except (ProtocolError, OSError) as e:
        sock.close()
        raise _went_away(path, "attach", timeout, deadline, e) from e
    except Exception as e:  # whatever a peer sends must end as one of this function's two errors
        sock.close()
        raise HolderUnavailableError(f"weights-holder at {path} sent an unusable handshake: {e!r}") from e
    # Every received fd is closed on any failure until import_arena takes them over: a replica that
    # retries would otherwise keep one arena's memory pinned per try.
    try:
        if not reply.get("ok"):
            raise AttachRefusedError(f"weights-holder at {path} refused to attach: {reply.get('error')}")
        manifest = WeightManifest.from_dict(reply["manifest"])
        mismatch = None if expected is None else manifest_mismatch(manifest, expected)
        if mismatch is not None:
            raise AttachRefusedError(f"the weights-holder of {identity} at {path} serves {mismatch}")
        meta = reply["arena"]
        resident_grant = reply.get("resident")
        resident_fds = _resident_fd_count(resident_grant, len(fds))
        host_fds, resident_received = fds[: len(fds) - resident_fds], fds[len(fds) - resident_fds :]
        fds = []
        try:
            arena = import_arena(meta, host_fds, device)  # closes them, imported or not
        except BaseException:
            _close_all(resident_received)
            raise
        problem = layout_problem(manifest, arena.nbytes)
        if problem is not None:
            arena.close()
            _close_all(resident_received)
            raise AttachRefusedError(
                f"the weights-holder of {identity} at {path} sent a manifest that does not fit its arena: "
                f"{problem}; not attaching to it"
            )
        resident = None
        if resident_grant is not None:
            try:
                part = import_arena(resident_grant["arena"], resident_received, device)
            except BaseException:
                arena.close()
                raise
            resident = ResidentPart(part, tuple(resident_grant["units"]))
    except AttachRefusedError:
        _close_all(fds)
        sock.close()
        raise
    except (ArenaError, KeyError, ValueError) as e:
        _close_all(fds)
        sock.close()
        raise HolderUnavailableError(f"cannot import the arena from {path}: {e}") from e
    except Exception as e:
        _close_all(fds)
        sock.close()
        raise HolderUnavailableError(f"cannot import the arena from {path}: {e!r}") from e
    sock.settimeout(None)
    return Lease(sock, manifest, arena, reply.get("holder", {}), time.perf_counter() - start, resident)


def _resident_fd_count(grant: object, received: int) -> int:
    """How many of the ``received`` file descriptors are the resident part's (the last ones), after
    checking the grant's shape: ValueError for one that is not a resident part's."""
    if grant is None:
        return 0
    if not isinstance(grant, dict) or not isinstance(grant.get("arena"), dict):
        raise ValueError("its resident part is not an object with an arena")
    units, count = grant.get("units"), grant.get("fds")
    if not isinstance(units, list) or not all(isinstance(u, str) for u in units):
        raise ValueError("its resident part's units are not a list of names")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= received:
        raise ValueError(f"its resident part claims {shown(count)} of the {received} descriptors sent")
    return count


def holder_status(
    socket_path: str | os.PathLike[str], identity: sharing.ShareIdentity, key: bytes, timeout: float = 5.0
) -> dict[str, Any]:
    """The holder's self-description (``vnpu runtime probe``), after the same mutual authentication;
    all of it within ``timeout`` seconds (one deadline), else HolderUnavailableError."""
    path = Path(socket_path)
    deadline = time.monotonic() + timeout
    sock = _connect(path, deadline)
    with sock:
        try:
            _handshake(sock, path, identity, key, "status", deadline)
            reply, fds = recv_message(sock, deadline=deadline)
        except AttachRefusedError:
            raise
        except (ProtocolError, OSError) as e:
            raise _went_away(path, "status request", timeout, deadline, e) from e
        except Exception as e:
            raise HolderUnavailableError(f"weights-holder at {path} sent an unusable handshake: {e!r}") from e
    for fd in fds:
        os.close(fd)
    if not reply.get("ok"):
        raise AttachRefusedError(_peer_text(reply.get("error")))
    return dict(reply["holder"])


#: Longest refusal text a replica takes from what answers at the holder's socket: the holder's own
#: refusals are a line or two, but a squatter without the key could send 64 KiB per retry into the log.
MAX_REFUSAL_CHARS = 512


def _peer_text(value: object) -> str:
    """The refusal a peer sent, as text, cut to MAX_REFUSAL_CHARS."""
    return shown(str(value), MAX_REFUSAL_CHARS)
