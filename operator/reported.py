"""The statuses this operator has written, or is writing, until its informer shows them.

A pass writes pods first and hands its status patches and Events to a background reporter, so the next
pass can place newly created models while the previous statuses are still being written (on a busy
API server they are half of a burst's writes). The next pass must then plan from the statuses as
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

from vnpu.operator.state import ObservedModel


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
