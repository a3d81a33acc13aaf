"""The weights-holder: one loaded arena per (device, share identity), served over a unix socket.

Protocol (JSON frames, see :mod:`vnpu.runtime.ipc`), client first, authenticated both ways with the
share group's key (see :mod:`vnpu.sharing`):

1. ``{"op": "hello", "protocol": 2, "identity": {namespace, group, weights_id}, "nonce": Nc, "pid": p,
   "ticket": HMAC(key, ticket, identity, Nc)}``
   -> ``{"ok": true, "op": "challenge", "nonce": Ns, "proof": HMAC(key, holder, identity, Nc, Ns)}``.
   The client checks the proof: a squatter without the key cannot make it. The ``ticket`` (optional:
   replicas of earlier versions send none) lets the holder tell a replica from peers without the key
   while the handshake runs (see the limits below); it authenticates nothing, the proof in step 2 does.
2. ``{"op": "attach" | "status", "proof": HMAC(key, replica, identity, Nc, Ns), "drain_s": d}``. The
   holder checks it: a pod of another namespace cannot make it. ``drain_s`` (optional) is how long the
   replica gives its requests in flight at SIGTERM: a stopping holder keeps the weights that long.
   ``attach`` -> ``{"ok": true, "manifest": ..., "arena": meta, "holder": {...}}`` (and under async
   offload on a device ``"resident": {"arena", "units", "fds"}``, see
   :class:`vnpu.runtime.offload_plan.ResidentPart`) plus the arenas' file descriptors, the host arena's
   first; the connection then stays open as the replica's lease (``{"op": "ping"}`` ->
   ``{"ok": true, "op": "pong"}``), and when the holder goes away the replica sees EOF at once.
   ``status`` -> ``{"ok": true, "holder": {...}}`` (``vnpu runtime probe``).

Access control, in layers: the socket's name is unguessable without the key (and pods cannot list the
device's socket directory, see ``vnpu.device_plugin.plugin.ensure_socket_dir``), the file is ``0600``
(or ``0660`` with ``socket_group``) and the pods of one group run as that group's user; the peer's
credentials (``SO_PEERCRED``) must match our uid, root, or that group; then the handshake above. A
refusal is answered with ``{"ok": false, "error": ...}`` and logged with the peer's pid and uid.

Limits a peer without the key runs into (it may pass ``SO_PEERCRED``: a pod of this group's uid):

- its hello must be in within ``HELLO_TIMEOUT_S`` (a replica sends it as it connects), and the whole
  handshake within ``HANDSHAKE_TIMEOUT_S``: one deadline each, however the peer spreads its bytes;
- at most ``MAX_HANDSHAKES`` connections are in their handshake at once. Past that an older one is
  cut to make room, not the newest refused: holding a slot needs no key, so a peer reconnecting as
  soon as it was refused kept every slot and locked every replica out. The first cut is one that has
  kept the holder waiting over ``STALL_GRACE_S`` (for its hello, or its answer to the challenge),
  then one whose hello came without a valid ticket, then one whose hello is not in yet, the oldest
  first in each. The group's identity is no secret (it is in every pod's environment), so a peer
  without the key can send a complete hello and stall after the challenge; a replica sends its hello
  with its ticket as it connects and answers in milliseconds, so from then on it is cut only for a
  newer connection when all ``MAX_HANDSHAKES`` hold tickets and have waited less than the grace;
- what it sent is echoed, in a refusal and in the log, cut to ``ipc.MAX_SHOWN_CHARS`` characters;
- refusals, cuts and failed handshakes are logged at most once per ``LOG_INTERVAL_S`` each, with the
  number left out since (``suppressed``); every refusal and cut counts in ``WeightsHolder.refused``,
  which :meth:`WeightsHolder.info` shows (``vnpu runtime probe``, the ready event).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from vnpu import api, sharing
from vnpu.runtime.handshakes import PendingHandshakes, ThrottledLog, hello_ticket
from vnpu.runtime.ipc import (
    ProtocolError,
    encode,
    recv_message,
    send_encoded,
    send_message,
    settimeout_until,
    shown,
)
from vnpu.runtime.loader import LoadedWeights

if TYPE_CHECKING:
    from vnpu.runtime.offload_plan import ResidentPart

PROTOCOL_VERSION = 2
#: Seconds a client has to complete the whole handshake (one deadline, not a timeout per read), and to
#: send its first frame (the hello, which a replica sends as it connects).
HANDSHAKE_TIMEOUT_S = 5.0
HELLO_TIMEOUT_S = 1.0
#: Connections in their handshake at once; a new one past this cuts an older one (see
#: vnpu.runtime.handshakes).
MAX_HANDSHAKES = 32
#: Seconds a connection in its handshake may keep the holder waiting (for its hello since it was
#: accepted, then for its answer since the challenge) before it is the first cut to make room. A replica
#: takes milliseconds: this leaves room for one that its pod's CPU limit stops for a whole CFS period
#: (100 ms by default). A hello with a ticket that goes no further (a replay) keeps its slot no longer.
STALL_GRACE_S = 0.25
#: Seconds between two log lines of one kind that any peer can cause at will (refusals, cuts, failed
#: handshakes); the lines left out are counted in the next one.
LOG_INTERVAL_S = 10.0
#: Pause after a failed accept (out of file descriptors, say) before the next.
ACCEPT_RETRY_S = 0.1
#: Seconds between two tries to bind a socket that another live holder serves (see start_when_free).
BUSY_RETRY_S = 1.0
#: Requests are tiny JSON objects; anything bigger is refused before it is parsed.
MAX_REQUEST = 64 * 1024
SOCKET_NAME = "weights.sock"
log = logging.getLogger("vnpu.runtime.holder")


class HolderError(RuntimeError):
    """The holder cannot start (socket in use, bad directory, ...)."""


class SocketBusyError(HolderError):
    """Another live weights-holder serves our socket: of this share identity and device (the socket's
    name says so), so most likely the holder this one replaces, still stopping."""


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end of a unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def announced_drain(value: object) -> float:
    """The request drain a replica announced at attach, in seconds: a number in [0, MAX_DRAIN_S], or
    the default drain for a replica that announced none (an older one) or an unusable value. Ints are
    compared as they are: JSON's have no bound, and ``10**400`` (past a float's range) is the longest."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return float(api.REPLICA_DRAIN_S)
    if isinstance(value, float) and not math.isfinite(value):
        return float(api.REPLICA_DRAIN_S)
    return float(min(max(value, 0), api.MAX_DRAIN_S))


class _Lease(NamedTuple):
    """An attached replica: its connection, and the request drain it announced at attach."""

    conn: socket.socket
    drain_s: float


class WeightsHolder:
    """Serves one sealed arena to any number of replicas of one share identity."""

    def __init__(
        self,
        weights: LoadedWeights,
        identity: sharing.ShareIdentity,
        key: bytes,
        socket_path: str | os.PathLike[str],
        socket_mode: int = 0o600,
        socket_group: int | None = None,
        resident: ResidentPart | None = None,
    ) -> None:
        """``resident``: under async offload on a device, the units the replicas' plan keeps resident,
        in a device arena granted beside the host one (see
        :class:`vnpu.runtime.offload_plan.ResidentPart`)."""
        self.weights = weights
        self.identity = identity
        self._key = key
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self._arena_meta, self._arena_fds = weights.arena.export()
        self.resident = resident
        self._resident_grant: dict[str, Any] | None = None
        self._resident_fds: list[int] = []
        if resident is not None:
            meta, self._resident_fds = resident.arena.export()
            self._resident_grant = {
                "arena": meta,
                "units": list(resident.units),
                "fds": len(self._resident_fds),
            }
        # Encoded once: the tokenizer tables make it ~2 MB; the Python objects would cost far more.
        self._manifest_json = encode(weights.manifest.to_dict())
        self._listener: socket.socket | None = None
        self._bound: tuple[int, int] | None = None  #: (device, inode) of the socket file we bound
        self._closing = threading.Event()  #: no new lease: the listener is closed
        self._closed_at = 0.0  #: when (monotonic) it was closed
        self._stop = threading.Event()  #: every lease ends
        self._leases: dict[int, _Lease] = {}
        self._lock = threading.Lock()
        self._lease_ids = iter(range(1, 1 << 62))
        self._pending = PendingHandshakes(MAX_HANDSHAKES, STALL_GRACE_S)
        #: connections refused (authentication, identity, protocol, credentials) or cut in their
        #: handshake to make room for a newer one
        self.refused = 0
        self._log_refused = ThrottledLog(log, logging.WARNING, "refused client", LOG_INTERVAL_S)
        self._log_cut = ThrottledLog(
            log,
            logging.WARNING,
            "cut an older client in its handshake: too many connections in their handshake",
            LOG_INTERVAL_S,
        )
        self._log_handshake_ended = ThrottledLog(
            log, logging.INFO, "connection ended in its handshake", LOG_INTERVAL_S
        )
        self._log_bug = ThrottledLog(
            log, logging.ERROR, "connection closed on an unexpected error (a bug)", LOG_INTERVAL_S
        )
        self.started_at = time.time()

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._leases)

    def info(self) -> dict[str, Any]:
        """What the holder says of itself: in ``vnpu runtime probe``, its ready event and every grant."""
        m = self.weights.manifest
        return {
            "pid": os.getpid(),
            "namespace": self.identity.namespace,
            "share_group": self.identity.group,
            "weights_id": self.identity.weights_id,
            "source": m.source,
            "backend": self._arena_meta["backend"],
            "device": self.weights.arena.device,
            "arena_bytes": m.total_bytes,
            "resident_bytes": self.resident.arena.nbytes if self.resident is not None else 0,
            "load_seconds": round(self.weights.seconds, 3),
            "clients": self.clients,
            "refused": self.refused,
            "protocol": PROTOCOL_VERSION,
        }

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (refusing one a live holder still serves) and accept in the background."""
        directory = self.socket_path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o750 if self.socket_group is not None else 0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Check, remove, bind and listen as one step: a holder starting beside us would otherwise
            # find the same stale socket and unlink ours once we had bound it (or a bound socket not
            # yet listening would look stale to it).
            with self._holding_name():
                if self.socket_path.exists() or self.socket_path.is_symlink():
                    self._remove_stale_socket()
                old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
                try:
                    listener.bind(str(self.socket_path))
                finally:
                    os.umask(old_umask)
                st = self.socket_path.lstat()
                self._bound = (st.st_dev, st.st_ino)
                if self.socket_group is not None:
                    os.chown(self.socket_path, -1, self.socket_group)
                os.chmod(self.socket_path, self.socket_mode)
                listener.listen(64)
                with self._lock:  # close_listener takes the listener from here, or finds us stopping
                    stopping = self._closing.is_set()
                    if not stopping:
                        self._listener = listener
                if stopping:  # stopped while binding (start_when_free on another thread)
                    self.socket_path.unlink()
                    raise HolderError("the weights-holder is stopping")
        except BaseException:
            listener.close()
            raise
        threading.Thread(target=self._accept_loop, name="holder-accept", daemon=True).start()
        log.info("weights-holder listening", extra=self.info() | {"socket": str(self.socket_path)})

    def start_when_free(self, stop: threading.Event) -> bool:
        """:meth:`start`, waiting while another live holder serves the socket; True once bound, False
        when ``stop`` is set (or the holder stops) first.

        Holders of one share identity on one device share the socket's name, so a holder that replaces
        another (a serving holder for a plain one when its group scales to zero, a holder renamed by an
        upgrade) is created while the old one still serves its replicas. Refused, it exited and
        restarted in a crash loop, loading the weights anew each time, and the replicas the old one
        left had no holder until its next restart. Waiting, it binds as soon as the old one closes its
        socket (at its SIGTERM), loaded, and their next attach finds it."""
        waiting_since: float | None = None
        while not (stop.is_set() or self._closing.is_set()):
            try:
                self.start()
            except SocketBusyError as e:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    log.warning(
                        "another weights-holder serves this socket; waiting for it to stop",
                        extra={"reason": str(e), "share": str(self.identity)},
                    )
                stop.wait(BUSY_RETRY_S)
                continue
            except HolderError:
                if self._closing.is_set():
                    return False
                raise
            if waiting_since is not None:
                waited_s = round(time.monotonic() - waiting_since, 1)
                log.info("socket free: bound it", extra={"waited_s": waited_s, "share": str(self.identity)})
            return True
        return False

    @contextlib.contextmanager
    def _holding_name(self) -> Iterator[None]:
        """Hold the lock on our socket's name (``flock`` on a sibling file, see
        :func:`vnpu.sharing.lock_name`) while we change what the name points to. The file is ours
        (0600, our uid: no other user can open it, let alone hold it) and exists only while held: it is
        removed before it is released, so a holder that opened it meanwhile finds it gone and opens
        the next one."""
        path = self.socket_path.parent / sharing.lock_name(self._key, self.socket_path.name)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise HolderError(self._lock_refused(path, e.strerror or str(e))) from e
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    raise HolderError(self._lock_refused(path, "not a file of this holder's uid"))
                fcntl.flock(fd, fcntl.LOCK_EX)
                with contextlib.suppress(FileNotFoundError):
                    now = os.lstat(path)
                    if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                        break  # still the file at the path: the lock is ours
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # its holder removed it before releasing it: lock the one at the path now
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)

    @staticmethod
    def _lock_refused(path: Path, reason: str) -> str:
        """Why the lock file cannot be used, naming its owner: only this group's key names it, so a file
        of another uid there is this group's holder under an earlier uid, left by a crash."""
        try:
            uid, me = path.lstat().st_uid, os.geteuid()
        except OSError:
            return f"cannot lock {path}: {reason}"
        if uid == me:
            return f"cannot lock {path}: {reason}"
        return (
            f"cannot lock {path} (it belongs to uid {uid}, this holder runs as uid {me}): {reason}. The "
            "socket directory is sticky, so only the file's owner or root may remove it; remove it on "
            "the node as root, then restart this holder"
        )

    def _remove_stale_socket(self) -> None:
        """Remove the socket a holder that died left at our path; refuse one that is live, or that
        another user owns (the socket directory is sticky: only its owner, or root, may remove it)."""
        path, me = self.socket_path, os.geteuid()
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise HolderError(f"{path} exists and is not a socket")
        owner = (
            ""
            if st.st_uid == me
            else f" (its socket belongs to uid {st.st_uid}, not to this holder's uid {me})"
        )
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))
            raise SocketBusyError(f"another weights-holder is already serving {path}{owner}")
        try:
            path.unlink()
        except PermissionError as e:
            if not owner:
                raise HolderError(f"cannot remove the stale socket {path}: {e.strerror}") from e
            raise HolderError(
                f"cannot remove the stale socket {path}{owner}: the socket directory is sticky, so only "
                "its owner or root may remove it. A process of another user left it under this share "
                "group's name (this group's holder under an earlier uid, or another pod that learnt the "
                "name); remove it on the node as root, then restart this holder"
            ) from e

    def replica_wait_s(self) -> float:
        """How long a stopping holder waits for the replicas attached now: the longest request drain
        they announced, plus the rest of their pods' grace and a margin (``vnpu.api``'s chain)."""
        with self._lock:
            drains = [lease.drain_s for lease in self._leases.values()]
        return max(drains, default=0.0) + api.HOLDER_WAIT_MARGIN_S

    def stop(self, drain_s: float = 0.0) -> None:
        """Close the socket, wait for the replicas attached to detach (:meth:`replica_wait_s`, at most
        ``drain_s``), then end every lease left (those replicas see EOF) and release the arena.

        The wait is what lets a replica stopping beside its holder finish the requests it has in flight:
        a scale-down, a node drain or a model's deletion stops both at once, and a replica that loses
        its weights mid-request fails that request. Bounded by what the replicas announced, a holder
        stopped alone (its replicas keep running) does not sit out the longest drain any model may set.
        No new replica attaches meanwhile (its attach retries, and finds the holder that replaces this
        one once it has bound the socket)."""
        self.close_listener()
        if drain_s > 0 and self.clients:
            wait_s = min(drain_s, self.replica_wait_s())
            log.info(
                "waiting for the replicas attached to detach",
                extra={
                    "clients": self.clients,
                    "wait_s": wait_s,
                    "drain_s": drain_s,
                    "share": str(self.identity),
                },
            )
            deadline = self._closed_at + wait_s  # (from the close: a serving holder closes at SIGTERM)
            while self.clients and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.clients:
                log.warning(
                    "replicas still attached at the end of the drain; they lose the weights now",
                    extra={"clients": self.clients, "wait_s": wait_s, "share": str(self.identity)},
                )
        self._stop.set()
        with self._lock:  # after _closing is set: no lease is added past this point (see _handle)
            leases, self._leases = [lease.conn for lease in self._leases.values()], {}
        # Shut, not closed: each lease's own thread closes its socket. Closed here, its number could be
        # re-used while that thread is still inside a send on it.
        for conn in leases:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.weights.arena.close()
        if self.resident is not None:
            self.resident.arena.close()

    def close_listener(self) -> None:
        """Grant no new lease: close the socket, and remove its file if it is still ours (a holder
        replacing this one, a restarted pod, may already have bound the path, and must keep it). The
        leases granted stay. Idempotent. A serving holder calls it at SIGTERM, so that its replicas' drain
        and its own HTTP server's run together, both inside its pod's grace period."""
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
            self._closed_at = time.monotonic()
        if self._listener is None:
            return
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop, which then ends
        with contextlib.suppress(OSError):
            self._listener.close()
        # Under the name's lock: a holder starting now finds our socket stale (its listener is closed)
        # and may replace it; checked and removed in one step, we never remove its socket. Without the
        # lock the file stays: the next holder of this uid removes it as stale.
        try:
            with self._holding_name():
                st = self.socket_path.lstat()
                if (st.st_dev, st.st_ino) == self._bound:
                    self.socket_path.unlink()
        except FileNotFoundError:
            pass
        except (OSError, HolderError) as e:
            log.warning("socket file left behind", extra={"reason": str(e), "socket": str(self.socket_path)})

    # --- connections ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        """Accept until stopped. A failing accept (EMFILE, ENFILE, ENOBUFS under pressure) passes: were
        this loop to end, the socket would still listen, serve no one, and keep a restarted holder out
        ("already serving")."""
        listener = self._listener
        assert listener is not None
        failing = False
        while not self._closing.is_set():
            try:
                conn, _ = listener.accept()
            except OSError as e:
                if self._closing.is_set() or listener.fileno() < 0:
                    return
                if not failing:
                    log.error(
                        "accept failed; retrying", extra={"reason": str(e), "share": str(self.identity)}
                    )
                failing = True
                self._closing.wait(ACCEPT_RETRY_S)
                continue
            failing = False
            token, cut = self._pending.admit(conn)
            if cut:
                self._count_refused()
                self._log_cut(limit=MAX_HANDSHAKES, share=str(self.identity))
            try:
                threading.Thread(
                    target=self._handle, args=(conn, token), name="holder-conn", daemon=True
                ).start()
            except RuntimeError as e:  # "can't start new thread": the slot and the connection go back
                self._pending.leave(token)
                conn.close()
                log.error("refused client: cannot start its thread", extra={"reason": str(e)})

    def _allowed(self, uid: int, gid: int) -> bool:
        return uid in (os.getuid(), 0) or (self.socket_group is not None and gid == self.socket_group)

    def _count_refused(self) -> None:
        with self._lock:
            self.refused += 1

    def _handshake(
        self, conn: socket.socket, peer: str, hello: dict[str, Any], deadline: float
    ) -> tuple[str, float] | None:
        """Run the mutual authentication after ``hello`` by ``deadline``; returns the authenticated op
        ("attach" or "status") and the request drain the client announced (see :func:`announced_drain`),
        or None after refusing the client."""
        if hello.get("op") != "hello" or hello.get("protocol") != PROTOCOL_VERSION:
            self._refuse(
                conn,
                f"{peer}: expected a protocol {PROTOCOL_VERSION} hello, got op {shown(hello.get('op'))} "
                f"protocol {shown(hello.get('protocol'))} (replica and holder run different vnpu versions?)",
                deadline,
            )
            return None
        raw = hello.get("identity")
        theirs = raw if isinstance(raw, dict) else {}
        ours = self.identity
        if (theirs.get("namespace"), theirs.get("group"), theirs.get("weights_id")) != (
            ours.namespace,
            ours.group,
            ours.weights_id,
        ):
            # Said without naming ours: an unauthenticated peer learns nothing about this group.
            self._refuse(conn, f"{peer}: asked for another share identity than this holder serves", deadline)
            return None
        client_nonce = hello.get("nonce")
        if not sharing.valid_nonce(client_nonce):
            self._refuse(conn, f"{peer}: malformed nonce", deadline)
            return None
        server_nonce = sharing.new_nonce()
        send_message(
            conn,
            {
                "ok": True,
                "op": "challenge",
                "nonce": server_nonce,
                "proof": sharing.proof(self._key, "holder", ours, client_nonce, server_nonce),
            },
            deadline=deadline,
        )
        answer = self._recv(conn, deadline)
        expected = sharing.proof(self._key, "replica", ours, client_nonce, server_nonce)
        if not sharing.proof_matches(expected, answer.get("proof")):
            self._refuse(
                conn, f"{peer}: authentication failed (it does not hold this share group's key)", deadline
            )
            return None
        op = answer.get("op")
        if op not in ("attach", "status"):
            self._refuse(conn, f"{peer}: unknown op {shown(op)}", deadline)
            return None
        return str(op), announced_drain(answer.get("drain_s"))

    def _has_ticket(self, hello: dict[str, Any]) -> bool:
        """Whether ``hello`` carries a valid ticket for this holder's identity (see hello_ticket)."""
        nonce = hello.get("nonce")
        return sharing.valid_nonce(nonce) and sharing.proof_matches(
            hello_ticket(self._key, self.identity, str(nonce)), hello.get("ticket")
        )

    @staticmethod
    def _recv(conn: socket.socket, deadline: float) -> dict[str, Any]:
        request, fds = recv_message(conn, max_size=MAX_REQUEST, deadline=deadline)  # bounded before parsing
        for fd in fds:
            os.close(fd)
        return request

    def _handle(self, conn: socket.socket, token: int) -> None:
        """Serve one connection: its handshake (in the pending table under ``token`` until its peer has
        proved it holds the key), then its status or its lease."""
        lease_id = None
        in_handshake = True
        granted = False
        try:
            # One deadline for the whole handshake: a peer trickling its bytes must not keep its slot.
            started = time.monotonic()
            deadline = started + HANDSHAKE_TIMEOUT_S
            pid, uid, gid = peer_credentials(conn)
            peer = f"peer pid {pid} uid {uid}"
            settimeout_until(conn, deadline)
            if not self._allowed(uid, gid):
                self._refuse(conn, f"{peer} gid {gid} may not use this weights-holder", deadline)
                return
            hello = self._recv(conn, min(deadline, started + HELLO_TIMEOUT_S))
            self._pending.heard(token, self._has_ticket(hello))
            authenticated = self._handshake(conn, peer, hello, deadline)
            if authenticated is None:
                return
            op, drain_s = authenticated
            in_handshake = False
            if not self._pending.leave(token):
                return  # cut to make room just before it authenticated: its socket is shut
            if op == "status":
                send_message(conn, {"ok": True, "holder": self.info()}, deadline=deadline)
                return
            # The lease is counted before the grant goes out: a replica whose attach has returned is
            # always among `clients` (and in any status asked after it), never counted a moment late.
            # Under the lock close_listener() takes to set _closing: either stop() later sees this lease
            # (waits for it, then shuts it), or this thread sees the closing and grants nothing. The
            # grant carries duplicates this thread owns: stop() closes the arena's own fds, and a closed
            # number is re-used by the next file the process opens, which SCM_RIGHTS would then hand to
            # the replica.
            grant_fds: list[int] = []
            try:
                with self._lock:
                    if self._closing.is_set():
                        return
                    lease_id = next(self._lease_ids)
                    self._leases[lease_id] = _Lease(conn, drain_s)
                    for fd in (*self._arena_fds, *self._resident_fds):  # the host arena's first
                        grant_fds.append(os.dup(fd))
                grant: dict[str, Any] = {"ok": True, "arena": self._arena_meta, "holder": self.info()}
                if self._resident_grant is not None:
                    grant["resident"] = self._resident_grant
                head = encode(grant)
                settimeout_until(conn, deadline)
                send_encoded(conn, head[:-1] + b',"manifest":' + self._manifest_json + b"}", grant_fds)
                granted = True
            finally:
                for fd in grant_fds:
                    os.close(fd)
            conn.settimeout(None)
            log.info(
                "replica attached",
                extra={
                    "peer_pid": pid,
                    "peer_uid": uid,
                    "clients": self.clients,
                    "share": str(self.identity),
                },
            )
            self._serve_lease(conn)
        except (ProtocolError, OSError) as e:
            if self._stop.is_set():
                pass
            elif lease_id is not None and not granted:  # out of fds for its dup, its send past the deadline
                log.warning(
                    "attach failed: the grant was not sent",
                    extra={"reason": str(e), "peer_pid": pid, "peer_uid": uid, "share": str(self.identity)},
                )
            elif not in_handshake:  # the lease's end (the replica detached or died), or a status answer's
                log.info("connection ended", extra={"reason": str(e), "share": str(self.identity)})
            elif self._pending.holds(token):  # not cut: that was counted and logged when it was
                self._log_handshake_ended(reason=str(e), share=str(self.identity))
        except Exception as e:  # with its traceback in the log: never a thread dying on stderr alone
            self._log_bug(exc_info=e, reason=repr(e), share=str(self.identity))
        finally:
            if in_handshake:
                self._pending.leave(token)  # before the close: see PendingHandshakes.admit
            if lease_id is not None:
                with self._lock:
                    self._leases.pop(lease_id, None)
                if granted:
                    log.info("replica detached", extra={"clients": self.clients, "share": str(self.identity)})
            conn.close()

    def _serve_lease(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            request, fds = recv_message(conn, max_size=MAX_REQUEST)  # ProtocolError at EOF: replica gone
            for fd in fds:
                os.close(fd)
            if request.get("op") == "ping":
                send_message(conn, {"ok": True, "op": "pong", "clients": self.clients})
            else:
                send_message(conn, {"ok": False, "error": f"unknown op {shown(request.get('op'))}"})

    def _refuse(self, conn: socket.socket, reason: str, deadline: float) -> None:
        """Count, log (throttled) and answer a refusal; ``reason`` holds no peer's value longer than
        ``shown`` leaves it."""
        self._count_refused()
        self._log_refused(reason=reason, share=str(self.identity))
        with contextlib.suppress(OSError):  # ProtocolError too: past the deadline, no answer
            send_message(conn, {"ok": False, "error": reason}, deadline=deadline)
