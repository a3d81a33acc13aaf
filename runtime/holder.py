"""The weights-holder: one loaded arena per (device, share group), served over a unix socket.

Protocol (JSON frames, see :mod:`vnpu.runtime.ipc`), client first:

* ``{"op": "attach", "protocol": 1, "share_group": g, "pid": p}`` -> ``{"ok": true, "manifest": ...,
  "arena": meta, "holder": {...}}`` plus the arena's file descriptors. The connection then stays open:
  it is the replica's lease. When the holder goes away the replica sees EOF at once.
* ``{"op": "status"}`` -> ``{"ok": true, "holder": {...}}`` (used by ``vnpu runtime probe``).
* ``{"op": "ping"}`` on a lease -> ``{"ok": true, "op": "pong"}``.

Access control, three layers: the socket directory is mounted only into replicas of this share group
(device plugin); the socket file is ``0600`` (or ``0660`` with ``socket_group``); the peer's
credentials (``SO_PEERCRED``) must match our uid, root, or that group; and the client must name the
same share group. Refusals are answered with ``{"ok": false, "error": ...}`` and logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

from vnpu.runtime.ipc import ProtocolError, encode, recv_message, send_encoded, send_message
from vnpu.runtime.loader import LoadedWeights

PROTOCOL_VERSION = 1
#: Requests are tiny JSON objects; anything bigger is refused before it is parsed.
MAX_REQUEST = 64 * 1024
SOCKET_NAME = "weights.sock"
log = logging.getLogger("vnpu.runtime.holder")


class HolderError(RuntimeError):
    """The holder cannot start (socket in use, bad directory, ...)."""


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end of a unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class WeightsHolder:
    """Serves one sealed arena to any number of replicas of one share group."""

    def __init__(
        self,
        weights: LoadedWeights,
        share_group: str,
        socket_path: str | os.PathLike[str],
        socket_mode: int = 0o600,
        socket_group: int | None = None,
    ) -> None:
        self.weights = weights
        self.share_group = share_group
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self._arena_meta, self._arena_fds = weights.arena.export()
        # Encoded once: the tokenizer tables make it ~2 MB; the Python objects would cost far more.
        self._manifest_json = encode(weights.manifest.to_dict())
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._leases: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._lease_ids = iter(range(1, 1 << 62))
        self.started_at = time.time()

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._leases)

    def info(self) -> dict[str, Any]:
        m = self.weights.manifest
        return {
            "pid": os.getpid(),
            "share_group": self.share_group,
            "source": m.source,
            "backend": self._arena_meta["backend"],
            "device": self.weights.arena.device,
            "arena_bytes": m.total_bytes,
            "load_seconds": round(self.weights.seconds, 3),
            "clients": self.clients,
            "protocol": PROTOCOL_VERSION,
        }

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (refusing one a live holder still serves) and accept in the background."""
        directory = self.socket_path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o750 if self.socket_group is not None else 0o700)
        if self.socket_path.exists() or self.socket_path.is_symlink():
            if not stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                raise HolderError(f"{self.socket_path} exists and is not a socket")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(self.socket_path))
                raise HolderError(f"another weights-holder is already serving {self.socket_path}")
            self.socket_path.unlink()  # stale socket of a holder that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            listener.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        if self.socket_group is not None:
            os.chown(self.socket_path, -1, self.socket_group)
        os.chmod(self.socket_path, self.socket_mode)
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="holder-accept", daemon=True).start()
        log.info("weights-holder listening", extra=self.info() | {"socket": str(self.socket_path)})

    def serve_forever(self) -> None:
        self._stop.wait()

    def stop(self) -> None:
        """Close the socket and every lease (replicas see EOF), then release the arena."""
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
        with self._lock:
            leases, self._leases = list(self._leases.values()), {}
        for conn in leases:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.weights.arena.close()

    # --- connections ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), name="holder-conn", daemon=True).start()

    def _allowed(self, uid: int, gid: int) -> bool:
        return uid in (os.getuid(), 0) or (self.socket_group is not None and gid == self.socket_group)

    def _handle(self, conn: socket.socket) -> None:
        lease_id = None
        try:
            pid, uid, gid = peer_credentials(conn)
            request, fds = recv_message(conn, max_size=MAX_REQUEST)  # read first: refuse with an answer
            for fd in fds:
                os.close(fd)
            if not self._allowed(uid, gid):
                self._refuse(conn, f"peer pid {pid} uid {uid} gid {gid} may not use this weights-holder")
                return
            op = request.get("op")
            if op == "status":
                send_message(conn, {"ok": True, "holder": self.info()})
                return
            if op != "attach":
                self._refuse(conn, f"unknown op {op!r}")
                return
            if request.get("protocol") != PROTOCOL_VERSION:
                self._refuse(
                    conn,
                    f"protocol {request.get('protocol')!r} unsupported (holder speaks {PROTOCOL_VERSION})",
                )
                return
            if request.get("share_group") != self.share_group:
                self._refuse(
                    conn,
                    f"share group mismatch: this holder serves {self.share_group!r}, "
                    f"client pid {pid} asked for {request.get('share_group')!r}",
                )
                return
            head = encode({"ok": True, "arena": self._arena_meta, "holder": self.info()})
            send_encoded(conn, head[:-1] + b',"manifest":' + self._manifest_json + b"}", self._arena_fds)
            with self._lock:
                lease_id = next(self._lease_ids)
                self._leases[lease_id] = conn
            log.info("replica attached", extra={"peer_pid": pid, "peer_uid": uid, "clients": self.clients})
            self._serve_lease(conn)
        except (ProtocolError, OSError) as e:
            if not self._stop.is_set():
                log.info("connection ended", extra={"reason": str(e)})
        finally:
            if lease_id is not None:
                with self._lock:
                    self._leases.pop(lease_id, None)
                log.info("replica detached", extra={"clients": self.clients})
            conn.close()

    def _serve_lease(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            request, fds = recv_message(conn, max_size=MAX_REQUEST)  # ProtocolError at EOF: replica gone
            for fd in fds:
                os.close(fd)
            if request.get("op") == "ping":
                send_message(conn, {"ok": True, "op": "pong", "clients": self.clients})
            else:
                send_message(conn, {"ok": False, "error": f"unknown op {request.get('op')!r}"})

    @staticmethod
    def _refuse(conn: socket.socket, reason: str) -> None:
        log.warning("refused client", extra={"reason": reason})
        with contextlib.suppress(OSError):
            send_message(conn, {"ok": False, "error": reason})
