"""The device ledger: which slices of which device are held, and by whom once that is known.

The kubelet decides which slices a container gets; the ledger remembers what the plugin handed out
so that metrics and placement know what is in use, and so a restarted plugin knows it too. It holds
devices and amounts, never pod wiring: an ``Allocate`` does not say which pod it is for, so a fresh
allocation has no owner until the kubelet's pod-resources API names it. A second front end over the
same devices — a DRA driver, whose claims carry a device and a consumed capacity — records its
allocations the same way (device, slices, owner = the claim), and :mod:`.allocation` gives both the
same container edits.


* every allocation is appended to a journal before Allocate returns (one small write: far cheaper
  than rewriting a file, which needs a new inode, a rename and a directory sync), and enters the
  ledger only once it is written: one the journal could not take (a full disk) raises
  :class:`JournalWriteError` naming the journal, leaves the ledger and the journal as they were and
  fails that Allocate. How it reaches the disk is the ``sync`` mode: ``sync`` fdatasyncs before
  returning; ``async`` (the default) fdatasyncs on a background thread right after — the write
  already survives a crash of the plugin (it is in the kernel's page cache), and the few
  milliseconds an OS crash could lose are rebuilt by the pod-resources reconcile below; ``off``
  never syncs (tmpfs, benchmarks). The journal is folded into a snapshot file (atomic replace) on
  restart, on rare changes (releases, reconcile) and every ``JOURNAL_COMPACT_AT`` records or
  ``JOURNAL_COMPACT_BYTES`` bytes. A compaction that fails after an allocation was journaled does
  not fail that allocation (it is safe in the journal): it is logged and tried again later, backing
  off from ``COMPACT_RETRY_MIN_S`` to ``COMPACT_RETRY_MAX_S``;
* after a restart the ledger is rebuilt from the checkpoint, then reconciled with the kubelet's
  pod-resources API (the authority on what live pods hold) when its socket exists: slices a live
  pod holds are (re)recorded, checkpointed slices no live pod holds are released after a grace
  period;
* slices no live pod holds any more (a pod finished or was deleted) are released by the same
  reconcile, which runs every few seconds.

A slice is released only once every List for a whole grace period has left it out, counted from
the first List that did (and never before its allocation is that old: an Allocate can precede the
kubelet's own bookkeeping by a moment). One List that leaves it out proves nothing: a kubelet that
has just restarted serves pod-resources before it has loaded its pods, and lists none of them for a
while (the kubelet's own device manager waits for all its pod sources before it cleans up). A
reconcile told not to release (the caller saw the kubelet restart) releases nothing and starts
every grace period again.

A slice is keyed once: recording an allocation for a slice that another allocation held replaces
the old holder (the kubelet never hands out a slice in use, so the old holder is gone). Nothing is
ever counted twice.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import math
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
SYNC_MODES = ("sync", "async", "off")
#: Journal records, or bytes, after which the journal is folded into the snapshot. (Records of
#: whole devices of thousands of slices made 1024 records a journal of 50 MiB.)
JOURNAL_COMPACT_AT = 1024
JOURNAL_COMPACT_BYTES = 4 * 1024 * 1024
#: After a failed compaction the next try waits this long, doubling after each failure up to the max.
COMPACT_RETRY_MIN_S = 1.0
COMPACT_RETRY_MAX_S = 60.0


@dataclass(frozen=True)
class PodRef:
    """A pod by namespace/name (and UID when known)."""

    namespace: str
    name: str
    uid: str = ""

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    def same_pod(self, other: PodRef | None) -> bool:
        if other is None:
            return False
        if self.uid and other.uid:
            return self.uid == other.uid
        return (self.namespace, self.name) == (other.namespace, other.name)


@dataclass(frozen=True)
class Allocation:
    """Slices handed to one container (``pod`` is None until pod-resources names the holder)."""

    slices: tuple[str, ...]
    devices: tuple[str, ...]
    pod: PodRef | None = None
    allocated_at: float = field(default_factory=time.time)
    source: str = "allocate"  #: "allocate" or "pod-resources"

    def to_json(self) -> dict[str, Any]:
        pod = self.pod
        return {
            "slices": list(self.slices),
            "devices": list(self.devices),
            "pod": None if pod is None else {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid},
            "allocated_at": self.allocated_at,
            "source": self.source,
        }

    @cached_property
    def json_text(self) -> str:
        """This allocation's checkpoint entry, serialised once (allocations are immutable)."""
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: Any) -> Allocation:
        """An allocation from its checkpoint entry; ValueError for an entry of any other shape."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"an allocation entry is a JSON object, not a {type(raw).__name__}")
        slices, devices, pod = raw.get("slices"), raw.get("devices"), raw.get("pod")
        if not isinstance(slices, list) or not isinstance(devices, list):
            raise ValueError("an allocation entry's 'slices' and 'devices' are lists")
        if pod is not None and not isinstance(pod, Mapping):
            raise ValueError(f"an allocation entry's 'pod' is an object or null, not a {type(pod).__name__}")
        return cls(
            slices=tuple(str(s) for s in slices),
            devices=tuple(str(d) for d in devices),
            pod=PodRef(str(pod["namespace"]), str(pod["name"]), str(pod.get("uid", ""))) if pod else None,
            allocated_at=float(raw.get("allocated_at", 0.0)),
            source=str(raw.get("source", "allocate")),
        )


#: What reading a checkpoint or journal line of the wrong shape can raise: it is then unreadable.
#: OverflowError: a JSON integer too large for a float (``"allocated_at": 999…9``, 400 digits).
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, RecursionError, OverflowError)


def _cut_torn_tail(fd: int) -> int:
    """Cut the journal open on ``fd`` back to its last whole line; returns its size. A crash mid-write
    leaves a torn last line, which load skips; a record appended to it would share its line and be
    lost with it at the next load (when the compaction at load failed and kept the journal)."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end != size:
        log.info("cut a torn line off the ledger journal", extra={"bytes": size - end})
        os.ftruncate(fd, end)
    return end


class JournalWriteError(OSError):
    """The journal could not take an allocation (``filename`` is the journal); nothing was recorded."""


class NotARegularFileError(OSError):
    """A ledger path that is a link, a directory, a FIFO or a device: never read through."""


def _open_regular_file(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file, without following a link or blocking on a
    FIFO (opened ``O_NOFOLLOW | O_NONBLOCK``, checked with ``fstat`` on what was opened, so no swap
    between a check and the read is followed); else :class:`NotARegularFileError`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link; a socket
            raise NotARegularFileError(exc.errno, f"not a regular file: {exc.strerror}", str(path)) from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFileError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_regular_file(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file (see :func:`_open_regular_file`)."""
    with _open_regular_file(path) as f:
        return f.read()


def _parse_snapshot(text: str) -> list[Allocation]:
    """The allocations of a snapshot file's text; ValueError for anything not of its shape."""
    data = json.loads(text)
    if not isinstance(data, Mapping):
        raise ValueError(f"the checkpoint is a JSON object, not a {type(data).__name__}")
    if data.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {data.get('version')!r} != {CHECKPOINT_VERSION}")
    entries = data.get("allocations")
    if not isinstance(entries, list):
        raise ValueError(f"the checkpoint's 'allocations' is a list, not a {type(entries).__name__}")
    return [Allocation.from_json(a) for a in entries]


def _sanitised(alloc: Allocation, now: float) -> Allocation | None:
    """A loaded allocation the ledger can hold: slice IDs that are not ``<device>-s<index>`` dropped
    (metrics group slices by device; one such ID broke every /metrics scrape), warned about, and
    None when none is left; an ``allocated_at`` that is not finite or is in the future taken as
    ``now`` (NaN compares false and +inf never ages: neither was ever released by the reconcile)."""
    from vnpu.api import parse_slice_id

    slices = []
    for sid in alloc.slices:
        try:
            parse_slice_id(sid)
        except ValueError:
            log.warning("dropping an unparsable slice ID from the checkpoint", extra={"slice": sid})
            continue
        slices.append(sid)
    if not slices:
        return None
    at = alloc.allocated_at
    if not (math.isfinite(at) and at <= now):
        at = now
    if len(slices) == len(alloc.slices) and at == alloc.allocated_at:
        return alloc
    return replace(alloc, slices=tuple(slices), allocated_at=at)


def _device_of(sid: str) -> str:
    from vnpu.api import parse_slice_id

    return parse_slice_id(sid)[0]


class Ledger:
    """Thread-safe slice -> allocation map with a checkpoint file."""

    def __init__(self, checkpoint: Path | None, *, sync: str = "async") -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"checkpoint sync mode must be one of {SYNC_MODES}, got {sync!r}")
        self.checkpoint = checkpoint
        self.sync = sync
        self._sync_wanted = threading.Event()
        self._closing = False
        self._syncer: threading.Thread | None = None
        self._by_slice: dict[str, Allocation] = {}
        #: slice -> the reconcile time of the first List that left it out (and all since have)
        self._missing_since: dict[str, float] = {}
        self._lock = threading.Lock()
        self._journal_fd: int | None = None
        self._journal_bytes = 0  #: the journal's length: a failed append is cut back to it
        self._journal_records = 0
        #: a compaction is owed (a reconcile changed the ledger, or one failed); tried once
        #: time.monotonic() reaches _compact_retry_at
        self._compact_wanted = False
        self._compact_retry_at = 0.0
        self._compact_backoff_s = 0.0

    # -- persistence ------------------------------------------------------------------------------
    @property
    def journal(self) -> Path | None:
        return (
            None if self.checkpoint is None else self.checkpoint.with_name(self.checkpoint.name + ".journal")
        )

    def load(self) -> int:
        """Restore from the snapshot and the journal; returns the number of slices restored. A corrupt
        snapshot or an unreadable journal is logged and ignored (the pod-resources reconcile then
        rebuilds what live pods hold); a torn journal line (a crash mid-write) or one that is not even
        UTF-8 (a bad sector) is skipped."""
        if self.checkpoint is None:
            return 0
        allocations: list[Allocation] = []
        if os.path.lexists(self.checkpoint):
            try:
                allocations = _parse_snapshot(_read_regular_file(self.checkpoint).decode())
            except _UNREADABLE as exc:
                log.error(
                    "ignoring unreadable checkpoint %s; starting empty (the pod-resources reconcile "
                    "rebuilds what live pods hold)",
                    self.checkpoint,
                    extra={"path": str(self.checkpoint), "error": repr(exc)},
                )
                self._move_aside_if_irreplaceable(self.checkpoint)
        now = time.time()
        with self._lock:
            self._by_slice = {}
            self._missing_since = {}
            # Journal records are applied as they are read: a long journal of large records (whole
            # devices of thousands of slices) never sits in memory at once.
            for raw in itertools.chain(allocations, self._read_journal()):
                if (alloc := _sanitised(raw, now)) is not None:
                    self._apply_locked(alloc)
            # Start from a clean snapshot and an empty journal. A state volume that cannot take the
            # snapshot now (full, read-only) is logged and retried later, as at any compaction: the
            # journal still holds every allocation. Raised, it made the plugin crash-loop at start.
            self._compact_wanted = True
            self._compact_when_due_locked()
            return len(self._by_slice)

    def _read_journal(self) -> Iterator[Allocation]:
        """The journal's allocations, one line at a time. An unreadable line is skipped: logged at
        ERROR, or at INFO when it is the last line (a crash mid-write leaves a torn one there)."""
        if self.journal is None:
            return
        try:
            f = _open_regular_file(self.journal)
        except FileNotFoundError:
            return
        except NotARegularFileError:
            # A link (its target would be truncated by the compaction), a FIFO (it would block the
            # start) or anything else: never followed; removed, and a fresh journal made in its place.
            log.error("replacing a journal that is not a regular file", extra={"path": str(self.journal)})
            if stat.S_ISDIR(os.lstat(self.journal).st_mode):
                self._move_aside_if_irreplaceable(self.journal)
            else:
                self.journal.unlink()
            return
        except OSError as exc:
            log.error("ignoring unreadable journal", extra={"path": str(self.journal), "error": repr(exc)})
            return
        # Read as bytes and decode line by line: one bad byte costs its line, not the whole journal.
        skipped: tuple[int, BaseException] | None = None  # logged once it is known whether it was last
        with f:
            try:
                for n, line in enumerate(f, 1):
                    if skipped is not None:
                        self._log_skipped(*skipped, last=False)
                        skipped = None
                    try:
                        record = json.loads(line.decode("utf-8"))
                        if not isinstance(record, Mapping):
                            raise ValueError(
                                f"a journal line is a JSON object, not a {type(record).__name__}"
                            )
                        allocation = Allocation.from_json(record["record"])
                    except _UNREADABLE as exc:
                        skipped = (n, exc)
                        continue
                    yield allocation
            except OSError as exc:  # a bad sector mid-journal: what was read stands
                log.error(
                    "ignoring the rest of an unreadable journal",
                    extra={"path": str(self.journal), "error": repr(exc)},
                )
        if skipped is not None:
            self._log_skipped(*skipped, last=True)

    @staticmethod
    def _log_skipped(line: int, exc: BaseException, *, last: bool) -> None:
        level = logging.INFO if last else logging.ERROR
        log.log(level, "skipping unreadable journal line", extra={"line": line, "error": repr(exc)})

    @staticmethod
    def _move_aside_if_irreplaceable(path: Path) -> None:
        """A snapshot or journal path that cannot be overwritten (a directory) is renamed to
        ``<name>.corrupt-<timestamp>``, kept for a look, so that the plugin still starts."""
        with contextlib.suppress(OSError):
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return  # a file or a link: os.replace overwrites it
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        os.rename(path, aside)
        log.error("moved an unreadable ledger file aside", extra={"path": str(path), "to": str(aside)})

    def _append_locked(self, allocations: Sequence[Allocation]) -> None:
        """Journal ``allocations`` in one write, all or none: on any error (a full disk, a journal path
        that cannot be opened) what was written of them is cut off again and :class:`JournalWriteError`
        is raised with the journal's path, so a later record never follows a torn line."""
        if self.journal is None:
            return
        data = "".join(f'{{"record":{a.json_text}}}\n' for a in allocations).encode()
        try:
            if self._journal_fd is None:
                self.journal.parent.mkdir(parents=True, exist_ok=True)
                self._journal_fd = os.open(
                    self.journal, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600
                )
                self._journal_bytes = _cut_torn_tail(self._journal_fd)
            fd = self._journal_fd
            try:
                written = 0
                while written < len(data):  # a short write is followed by one that says why (ENOSPC)
                    written += os.write(fd, data[written:])
                if self.sync == "sync":
                    os.fdatasync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, self._journal_bytes)
                raise
        except OSError as exc:
            raise JournalWriteError(exc.errno, exc.strerror, str(self.journal)) from exc
        self._journal_bytes += len(data)
        if self.sync == "async":
            if self._syncer is None:
                self._syncer = threading.Thread(target=self._sync_loop, name="vnpu-ledger-sync", daemon=True)
                self._syncer.start()
            self._sync_wanted.set()
        self._journal_records += len(allocations)

    def _compact_when_due_locked(self) -> None:
        """Compact when it is owed (a long journal, a reconcile's changes) and no failed compaction
        is backing off. A failure is logged and retried later, never raised: what asked for it is in
        the journal already, or comes back from pod-resources."""
        if self._journal_records >= JOURNAL_COMPACT_AT or self._journal_bytes >= JOURNAL_COMPACT_BYTES:
            self._compact_wanted = True
        if not self._compact_wanted or time.monotonic() < self._compact_retry_at:
            return
        try:
            self._compact_locked()
        except OSError as exc:
            self._compact_backoff_s = min(
                max(2 * self._compact_backoff_s, COMPACT_RETRY_MIN_S), COMPACT_RETRY_MAX_S
            )
            self._compact_retry_at = time.monotonic() + self._compact_backoff_s
            log.error(
                "cannot compact the ledger journal into %s; allocations are still journaled, will retry "
                "in %.0f s",
                self.checkpoint,
                self._compact_backoff_s,
                extra={
                    "path": str(self.checkpoint),
                    "error": repr(exc),
                    "retry_in_s": self._compact_backoff_s,
                },
            )
            return
        if self._compact_backoff_s:
            log.info("compacting the ledger journal works again", extra={"path": str(self.checkpoint)})
        self._compact_backoff_s = self._compact_retry_at = 0.0

    def _compact_locked(self) -> None:
        """Write the whole ledger as the snapshot, then empty the journal (a crash in between only
        leaves journal records the snapshot already holds: replaying them changes nothing)."""
        if self.checkpoint is None:
            return
        self._save_snapshot_locked()
        if self._journal_fd is not None:
            os.ftruncate(self._journal_fd, 0)
            self._journal_bytes = 0
            if self.sync != "off":
                os.fsync(self._journal_fd)
        elif self.journal is not None and self.journal.exists():
            os.close(os.open(self.journal, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW))
        self._journal_records = 0
        self._compact_wanted = False

    def _save_snapshot_locked(self) -> None:
        assert self.checkpoint is not None
        unique = list({id(a): a for a in self._by_slice.values()}.values())
        # Assembled from per-allocation fragments serialised once each.
        payload = (
            f'{{"allocations":[{",".join(a.json_text for a in unique)}],"version":{CHECKPOINT_VERSION}}}'
        )
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=self.checkpoint.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
                if self.sync != "off":
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.checkpoint)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.sync != "off":
            dir_fd = os.open(self.checkpoint.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _sync_loop(self) -> None:
        while True:
            self._sync_wanted.wait()
            self._sync_wanted.clear()
            fd = self._journal_fd
            if fd is not None:
                try:
                    os.fdatasync(fd)
                except OSError as exc:
                    if exc.errno != errno.EBADF and not self._closing:  # EBADF: closed under us at shutdown
                        self._journal_sync_failed(exc)
            if self._closing:
                return

    def _journal_sync_failed(self, exc: OSError) -> None:
        """A background fdatasync failed (EIO: the disk lost the write). The records are in memory,
        and Linux may have marked their pages clean, so a later sync would not write them again:
        write the whole ledger to a new snapshot at the next compaction chance (the next record or
        reconcile, a few seconds), which takes nothing from the journal's failed pages."""
        with self._lock:
            self._compact_wanted = True
            self._compact_retry_at = 0.0
        log.error(
            "syncing the ledger journal to disk failed; the ledger will be written whole to a new "
            "snapshot at the next record or reconcile",
            extra={"path": str(self.journal), "error": repr(exc)},
        )

    def close(self) -> None:
        """Sync and close the journal (idempotent)."""
        if self._syncer is not None:
            self._closing = True
            self._sync_wanted.set()
            self._syncer.join(timeout=5)
            self._syncer, self._closing = None, False
        with self._lock:
            if self._journal_fd is not None:
                if self.sync != "off":
                    os.fdatasync(self._journal_fd)
                os.close(self._journal_fd)
                self._journal_fd = None

    # -- changes ------------------------------------------------------------------------------------
    def record(self, allocation: Allocation) -> list[Allocation]:
        """Record an allocation (journaled before returning); returns the allocations it displaced."""
        return self.record_all([allocation])

    def record_all(self, allocations: Sequence[Allocation]) -> list[Allocation]:
        """Record the allocations of one Allocate, all or none: they are journaled in one write and
        only then enter the ledger. :class:`JournalWriteError` when the journal cannot take them;
        the ledger is then as it was. Returns the allocations they displaced."""
        with self._lock:
            self._append_locked(allocations)
            displaced = [old for allocation in allocations for old in self._apply_locked(allocation)]
            self._compact_when_due_locked()
            return displaced

    def _apply_locked(self, allocation: Allocation) -> list[Allocation]:
        displaced = {
            id(a): a
            for sid in allocation.slices
            if (a := self._by_slice.get(sid)) is not None and not self._same_holder(a, allocation)
        }
        for sid in allocation.slices:
            self._by_slice[sid] = allocation
        # A displaced allocation's other slices are released too: its container is gone.
        for old in displaced.values():
            for sid in old.slices:
                if self._by_slice.get(sid) is old:
                    del self._by_slice[sid]
        return list(displaced.values())

    @staticmethod
    def _same_holder(old: Allocation, new: Allocation) -> bool:
        return old.pod is not None and old.pod.same_pod(new.pod)

    def reconcile(
        self,
        live: Mapping[str, PodRef],
        *,
        grace_s: float,
        now: float | None = None,
        release: bool = True,
    ) -> tuple[int, int]:
        """Make the ledger agree with what live pods hold (slice -> pod, from the pod-resources API):
        add what it lists, release a slice once it has been left out of every List for ``grace_s``
        (see the module docstring). ``release=False`` (a List the kubelet may not have filled yet)
        releases nothing and forgets when slices went missing. Returns (slices added or
        re-attributed, slices released)."""
        now = time.time() if now is None else now
        with self._lock:
            added = 0
            per_pod: dict[PodRef, list[str]] = {}
            # id(allocation without a pod) -> the same allocation with its pod: one copy for all its
            # slices, so it stays one allocation (one snapshot entry, released whole when displaced).
            attached: dict[int, Allocation] = {}
            for sid, pod in live.items():
                current = self._by_slice.get(sid)
                if current is not None and pod.same_pod(current.pod):
                    continue
                if current is not None and current.pod is None and current.source == "allocate":
                    # Allocated before the pod was known: attach the pod.
                    with_pod = attached.get(id(current))
                    if with_pod is None:
                        with_pod = attached[id(current)] = replace(current, pod=pod)
                    if pod.same_pod(with_pod.pod):
                        self._by_slice[sid] = with_pod
                        added += 1
                        continue
                    # Another pod holds a slice of the same allocation: the kubelet's word wins below.
                per_pod.setdefault(pod, []).append(sid)
            for pod, sids in per_pod.items():
                alloc = Allocation(
                    slices=tuple(sorted(sids)),
                    devices=tuple(sorted({_device_of(s) for s in sids})),
                    pod=pod,
                    allocated_at=now,
                    source="pod-resources",
                )
                for sid in sids:
                    self._by_slice[sid] = alloc
                added += len(sids)
            missing_since: dict[str, float] = {}
            released = []
            for sid, a in self._by_slice.items():
                if sid in live or not release:
                    continue
                since = missing_since[sid] = self._missing_since.get(sid, now)
                if now - max(since, a.allocated_at) >= grace_s:
                    released.append(sid)
            for sid in released:
                del self._by_slice[sid]
                del missing_since[sid]
            self._missing_since = missing_since
            if added or released:
                self._compact_wanted = True
            self._compact_when_due_locked()  # also the periodic retry of a compaction that failed
            return added, len(released)

    # -- queries ------------------------------------------------------------------------------------
    def held(self) -> dict[str, Allocation]:
        with self._lock:
            return dict(self._by_slice)

    def held_slices(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._by_slice)

    def allocations(self) -> list[Allocation]:
        with self._lock:
            return list({id(a): a for a in self._by_slice.values()}.values())

    def count_by_device(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sid in self.held_slices():
            device = _device_of(sid)
            counts[device] = counts.get(device, 0) + 1
        return counts
