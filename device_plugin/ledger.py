"""The allocation ledger: which slices are held, by which pod, for which share group.

The kubelet decides which slices a container gets; the ledger remembers what the plugin handed out
so that metrics and placement know what is in use, and so a restarted plugin knows it too:

* every change is written to a checkpoint file (atomic replace, fsync) before Allocate returns;
* after a restart the ledger is rebuilt from the checkpoint, then reconciled with the kubelet's
  pod-resources API (the authority on what live pods hold) when its socket exists: slices a live
  pod holds are (re)recorded, checkpointed slices no live pod holds are released after a grace
  period (an Allocate can precede the kubelet's own bookkeeping by a moment);
* pods that the API server reports deleted or finished release their slices.

A slice is keyed once: recording an allocation for a slice that another allocation held replaces
the old holder (the kubelet never hands out a slice in use, so the old holder is gone). Nothing is
ever counted twice.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


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
    """Slices handed to one container."""

    slices: tuple[str, ...]
    devices: tuple[str, ...]
    pod: PodRef | None = None
    share_group: str = ""
    allocated_at: float = field(default_factory=time.time)
    source: str = "allocate"  #: "allocate" or "pod-resources"

    def to_json(self) -> dict[str, Any]:
        pod = self.pod
        return {
            "slices": list(self.slices),
            "devices": list(self.devices),
            "pod": None if pod is None else {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid},
            "share_group": self.share_group,
            "allocated_at": self.allocated_at,
            "source": self.source,
        }

    @cached_property
    def json_text(self) -> str:
        """This allocation's checkpoint entry, serialised once (allocations are immutable)."""
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Allocation:
        pod = raw.get("pod")
        return cls(
            slices=tuple(str(s) for s in raw["slices"]),
            devices=tuple(str(d) for d in raw["devices"]),
            pod=PodRef(str(pod["namespace"]), str(pod["name"]), str(pod.get("uid", ""))) if pod else None,
            share_group=str(raw.get("share_group", "")),
            allocated_at=float(raw.get("allocated_at", 0.0)),
            source=str(raw.get("source", "allocate")),
        )


def _device_of(sid: str) -> str:
    from vnpu.api import parse_slice_id

    return parse_slice_id(sid)[0]


class Ledger:
    """Thread-safe slice -> allocation map with a checkpoint file."""

    def __init__(self, checkpoint: Path | None, *, durable: bool = True) -> None:
        self.checkpoint = checkpoint
        self.durable = durable
        self._by_slice: dict[str, Allocation] = {}
        self._lock = threading.Lock()

    # -- persistence --------------------------------------------------------------------------------
    def load(self) -> int:
        """Restore from the checkpoint; returns the number of slices restored. A corrupt checkpoint is
        logged and ignored (the pod-resources reconcile then rebuilds what live pods hold)."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return 0
        try:
            data = json.loads(self.checkpoint.read_text())
            if data.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"checkpoint version {data.get('version')!r} != {CHECKPOINT_VERSION}")
            allocations = [Allocation.from_json(a) for a in data["allocations"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error(
                "ignoring unreadable checkpoint", extra={"path": str(self.checkpoint), "error": repr(exc)}
            )
            return 0
        with self._lock:
            self._by_slice = {}
            for alloc in allocations:
                for sid in alloc.slices:
                    self._by_slice[sid] = alloc
            return len(self._by_slice)

    def _save_locked(self) -> None:
        if self.checkpoint is None:
            return
        unique = list({id(a): a for a in self._by_slice.values()}.values())
        # Assembled from per-allocation fragments: re-serialising every allocation on every Allocate
        # would dominate Allocate's latency on a full node.
        payload = (
            f'{{"allocations":[{",".join(a.json_text for a in unique)}],"version":{CHECKPOINT_VERSION}}}'
        )
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=self.checkpoint.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.checkpoint)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.durable:
            dir_fd = os.open(self.checkpoint.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    # -- changes ------------------------------------------------------------------------------------
    def record(self, allocation: Allocation) -> list[Allocation]:
        """Record an allocation; returns the previous allocations it displaced (logged by the caller)."""
        with self._lock:
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
            self._save_locked()
            return list(displaced.values())

    @staticmethod
    def _same_holder(old: Allocation, new: Allocation) -> bool:
        return old.pod is not None and old.pod.same_pod(new.pod)

    def release_pods(self, gone: Iterable[PodRef]) -> int:
        """Release every slice held by the given pods; returns the number of slices released."""
        gone = list(gone)
        with self._lock:
            doomed = [
                sid
                for sid, a in self._by_slice.items()
                if a.pod is not None and any(a.pod.same_pod(p) for p in gone)
            ]
            for sid in doomed:
                del self._by_slice[sid]
            if doomed:
                self._save_locked()
            return len(doomed)

    def reconcile(
        self, live: Mapping[str, PodRef], *, grace_s: float, now: float | None = None
    ) -> tuple[int, int]:
        """Make the ledger agree with what live pods hold (slice -> pod, from the pod-resources API).
        Returns (slices added or re-attributed, slices released)."""
        now = time.time() if now is None else now
        with self._lock:
            added = 0
            per_pod: dict[PodRef, list[str]] = {}
            for sid, pod in live.items():
                current = self._by_slice.get(sid)
                if current is not None and pod.same_pod(current.pod):
                    continue
                if current is not None and current.pod is None and current.source == "allocate":
                    # Allocated before the pod was known: attach the pod, keep the share group.
                    self._by_slice[sid] = replace(current, pod=pod)
                    added += 1
                    continue
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
            released = [
                sid
                for sid, a in self._by_slice.items()
                if sid not in live and now - a.allocated_at >= grace_s
            ]
            for sid in released:
                del self._by_slice[sid]
            if added or released:
                self._save_locked()
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

    def claimed_pods(self) -> list[PodRef]:
        return [a.pod for a in self.allocations() if a.pod is not None]
