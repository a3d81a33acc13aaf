"""What a pass leaves for the background reporter, and the statuses as written, for the next pass.

A pass writes pods first and hands its models' Services, status patches and Events to a background
reporter (:class:`ReportQueue`), so the next pass can place newly created models while the previous
ones are still being reported (in a burst that is two thirds of the writes). The next pass must then
plan from the statuses as
written, not as the informer last saw them: conditions keep their transition times and a flip posts
its Event once, not once per pass until the watch catches up.

The operator is the only writer of an InferenceModel's status, so "the informer's status with our
pending merge patch applied" is what the API server holds or will hold. An entry goes when the
informer shows it, when its write is refused (the next pass recomputes from the server's view), and at
the latest ``stale_after`` seconds after it was handed over (a write lost to a broken connection, or
someone else editing the status meanwhile): then the informer is the authority again.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from vnpu.operator.services import ServiceIntent
from vnpu.operator.state import ObservedModel
from vnpu.operator.status import Event


def merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``target`` after the JSON merge patch ``patch`` (RFC 7386): objects merge key by key, ``None``
    removes a key, anything else (lists too) replaces."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = merge_patch({}, value) if isinstance(value, Mapping) else value
    return out


def merge_patch_to(
    current: Mapping[str, Any], wanted: Mapping[str, Any], keep: Iterable[str] = ()
) -> dict[str, Any]:
    """The merge patch that turns ``current`` into ``wanted`` (but for ``current``'s top-level keys named
    in ``keep``, someone else's): ``wanted`` itself, with ``None`` for every key ``current`` holds and
    ``wanted`` lacks, in nested objects too.

    A status is written as a merge patch, and a merge patch leaves every key it does not name as it
    is: without those ``None`` values a key the operator stopped setting (``scaling.warm`` once the model
    wakes, ``memory`` while its estimate fails) stayed on the server forever, and since the planner
    compares what it wants with what the server holds, it patched the model again on every pass.
    With them, ``merge_patch(current, merge_patch_to(current, wanted)) == wanted``: what the planner
    compares is what the server will hold."""
    skip = set(keep)
    out: dict[str, Any] = {k: None for k in current if k not in wanted and k not in skip}
    for key, value in wanted.items():
        now = current.get(key)
        if isinstance(value, Mapping) and isinstance(now, Mapping):
            out[key] = merge_patch_to(now, value)
        else:
            out[key] = value
    return out


def merge_patches(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """One merge patch that does ``first``, then ``second``. Exact but in one case: where ``first``
    removes an object and ``second`` sets it again, keys of the target's old object that ``second``
    does not name survive (the next pass, comparing with the server, removes them)."""
    out = dict(first)
    for key, value in second.items():
        before = out.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            out[key] = merge_patches(before, value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class _Written:
    token: int
    patch: Mapping[str, Any]
    since: float  #: monotonic seconds when it was handed to the reporter


class ReportedStatuses:
    """Model uid -> the status patch last handed to the reporter (thread-safe: the reporter's threads
    settle entries while a pass reads them)."""

    def __init__(self, stale_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._stale_after = stale_after
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Written] = {}
        self._tokens = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def submitted(self, uid: str, patch: Mapping[str, Any]) -> int:
        """Record ``patch`` as being written; returns the token that settles it."""
        as_sent = json.loads(json.dumps(patch, default=str))  # what the informer will show
        with self._lock:
            token = next(self._tokens)
            self._entries[uid] = _Written(token, as_sent, self._clock())
        return token

    def refused(self, uid: str, token: int) -> None:
        """The server refused submission ``token``: plan from its view again."""
        with self._lock:
            entry = self._entries.get(uid)
            if entry is not None and entry.token == token:
                del self._entries[uid]

    def overlay(self, models: Iterable[ObservedModel]) -> list[ObservedModel]:
        """``models`` with the statuses written or being written; forgets entries of models gone, entries
        the informer shows, and entries older than ``stale_after``."""
        now = self._clock()
        out: list[ObservedModel] = []
        with self._lock:
            entries, self._entries = self._entries, {}
            for m in models:
                entry = entries.get(m.uid)
                if entry is None:
                    out.append(m)
                    continue
                merged = merge_patch(m.status, entry.patch)
                seen = merged == dict(m.status)
                if seen or now - entry.since >= self._stale_after:
                    out.append(m)
                    continue
                self._entries[m.uid] = entry
                out.append(replace(m, status=merged))
        return out


@dataclass(frozen=True)
class Repeat:
    """An Event posted lately, seen again: its Event object (empty while its creation is under way or
    failed) and the count it now reaches."""

    name: str
    count: int


class PostedEvents:
    """The Events posted lately, so that one seen again is counted on its Event, not created again: the
    same Event (type, reason, message) on the same model (uid) within ``window`` seconds of its last
    sighting is a :class:`Repeat`, as client-go's EventCorrelator bumps an Event's count and
    lastTimestamp (thread-safe: the reporter's threads post).

    A pass posts an Event when it sees a condition flip against the status it plans from; when the API
    server refuses the status that records the flip (a message past the CRD's limit, a webhook), the
    next pass sees the same flip and would post it again: an Event per pass, forever. Whatever the
    refusal, this bounds the Event objects to one per ``window``; a flip that really recurs (a replica
    crash-looping again) shows as the Event's count."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        # (uid, type, reason, message) -> (last seen, Event name, count)
        self._posted: dict[tuple[str, str, str, str], tuple[float, str, int]] = {}
        self._pruned = clock()

    def repeat_of(self, uid: str, event: Event) -> Repeat | None:
        """None when ``event`` on model ``uid`` is to be posted as a new Event (then :meth:`posted`
        names it); else the Repeat to count on the Event posted lately."""
        now = self._clock()
        key = (uid, event.type, event.reason, event.message)
        with self._lock:
            if now - self._pruned >= self._window:  # forget what no longer holds anything back
                self._posted = {k: v for k, v in self._posted.items() if now - v[0] < self._window}
                self._pruned = now
            last = self._posted.get(key)
            if last is not None and now - last[0] < self._window:
                self._posted[key] = (now, last[1], last[2] + 1)
                return Repeat(last[1], last[2] + 1)
            self._posted[key] = (now, "", 1)
            return None

    def posted(self, uid: str, event: Event, name: str) -> None:
        """The new Event :meth:`repeat_of` let through was created as ``name``."""
        key = (uid, event.type, event.reason, event.message)
        with self._lock:
            if key in self._posted:
                when, _, count = self._posted[key]
                self._posted[key] = (when, name, count)


@dataclass(frozen=True)
class Report:
    """What is left to write for one model: its Services to create, its latest status, its Events."""

    model: ObservedModel
    services: tuple[ServiceIntent, ...] = ()
    status: Mapping[str, Any] | None = None
    token: int = 0  #: the ReportedStatuses token of ``status``
    events: tuple[Event, ...] = ()

    def then(self, later: Report) -> Report:
        """This report followed by ``later``: the later status wins (the two merge patches as one: the
        keys the earlier one removes stay removed), Events add up."""
        if later.status is None or self.status is None:
            status = later.status if later.status is not None else self.status
        else:
            status = merge_patches(self.status, later.status)
        return Report(
            model=later.model,
            services=self.services + tuple(s for s in later.services if s not in self.services),
            status=status,
            token=later.token if later.status is not None else self.token,
            events=self.events + later.events,
        )


class ReportQueue:
    """Reports by model key, as client-go's workqueue keeps keys: a model queued again before a worker
    took it is merged (its latest status is the one written; in a burst a model that became Ready
    before its first status went out gets one patch, not two), and no two workers hold one model at
    once (its writes keep their order). It also says how far the reporter trails the passes: the
    models waiting (:attr:`backlog`) and, when a worker is done with one, how long ago its oldest
    merged report was queued."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._cond = threading.Condition()
        self._clock = clock
        self._queued: dict[str, Report] = {}  # insertion-ordered: oldest first
        self._since: dict[str, float] = {}  # queued key -> when its oldest merged report was queued
        self._busy: dict[str, float] = {}  # key a worker holds -> when its report was queued
        self._closed = False

    @property
    def backlog(self) -> int:
        """Models with reports no worker has taken yet."""
        with self._cond:
            return len(self._queued)

    def put(self, key: str, report: Report) -> None:
        with self._cond:
            before = self._queued.pop(key, None)
            self._queued[key] = before.then(report) if before else report
            if before is None:
                self._since[key] = self._clock()
            self._cond.notify()

    def take(self) -> tuple[str, Report] | None:
        """The oldest report whose model no worker holds (blocks); None once closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                key = next((k for k in self._queued if k not in self._busy), None)
                if key is not None:
                    self._busy[key] = self._since.pop(key)
                    return key, self._queued.pop(key)
                self._cond.wait()

    def done(self, key: str) -> float | None:
        """A worker finished ``key``'s report: seconds since that report (its oldest merged part) was
        queued, None if the key was not taken."""
        with self._cond:
            since = self._busy.pop(key, None)
            self._cond.notify_all()
            return None if since is None else self._clock() - since

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
