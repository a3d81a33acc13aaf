"""What the gateway tells the operator about demand, and how it wakes a model.

Every request is counted per model; every ``flush_s`` seconds the counts go onto the InferenceModel
as two annotations: ``vnpu.io/requests`` (a cumulative counter) and ``vnpu.io/last-request`` (the
latest request's time, RFC 3339). Several gateway replicas add to the same counter: each update is a
merge patch carrying the resourceVersion it read, so a concurrent update makes it read and add again
(optimistic concurrency; nothing is lost or counted twice). One write per active model per flush
keeps the API server's load proportional to activity, not to requests. The operator reads them to
scale idle models to zero and to forecast which to keep warm.

The time written is never further ahead of this replica's clock than
:data:`vnpu.api.LAST_REQUEST_MAX_AHEAD_S`: a stored one further ahead (a replica whose node's clock ran
ahead, a clock stepped back, a hand edit) is written over, with a warning naming the model, instead of
kept as "the latest" until the clocks reach it (kept, it held the model awake, and its device memory,
until then). The operator ignores such a time too (:mod:`vnpu.operator.scaling`).

Waking patches the model's scale subresource to one replica, as ``kubectl scale`` would; a wake that
fails raises :class:`WakeError`, for the gateway to answer the requests waiting on it at once.

An API server that cannot be reached (restarting, a network partition) is a warning without traceback,
once per flush or wake: it is the cluster's state, not a bug, and it fails every model's write alike.
One that takes the connection and never answers (a half-open connection) is the same: every call
passes :data:`vnpu.kubeclient.REQUEST_TIMEOUT`. Without it a wake's thread blocked for good, and with
it every later wake of that model (one at a time), and the flush thread too: the operator then saw no
new request and scaled busy models to zero once their ``idleSeconds`` passed.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from vnpu import api
from vnpu.kubeclient import REQUEST_TIMEOUT, unreachable_errors

log = logging.getLogger(__name__)

#: Attempts at one model's update before its counts wait for the next flush.
MAX_ATTEMPTS = 4


class WakeError(Exception):
    """A wake the API server refused, or could not be asked for (the message says which)."""


def merged_activity(
    annotations: dict[str, str], added: int, last: dt.datetime, now: dt.datetime
) -> dict[str, str]:
    """The activity annotations after ``added`` more requests, the latest at ``last``, as of ``now``
    (pure). The time written is the later of the two, but never past ``now`` plus
    :data:`vnpu.api.LAST_REQUEST_MAX_AHEAD_S`: a stored one further ahead is written over (see
    :func:`ahead_of`), and ``last`` is never later than ``now`` (this clock stepped back since)."""
    # A garbled counter restarts rather than blocking every update.
    total = api.parse_count(annotations.get(api.ANNOTATION_REQUESTS)) or 0
    seen = api.credible_last_request(api.parse_time(annotations.get(api.ANNOTATION_LAST_REQUEST)), now)
    last = min(last, now)
    latest = max(seen, last) if seen else last
    return {
        api.ANNOTATION_REQUESTS: str(total + added),
        api.ANNOTATION_LAST_REQUEST: api.format_time(latest),
    }


def ahead_of(annotations: dict[str, str], now: dt.datetime) -> float | None:
    """Seconds the stored last request is ahead of ``now``, when that is further than
    :data:`vnpu.api.LAST_REQUEST_MAX_AHEAD_S` (:func:`merged_activity` writes over it); else None."""
    seen = api.parse_time(annotations.get(api.ANNOTATION_LAST_REQUEST))
    if seen is None or api.credible_last_request(seen, now) is not None:
        return None
    return (seen - now).total_seconds()


#: What became of one model's write (:meth:`ActivityRecorder._write`).
WRITTEN, NOT_WRITTEN, UNSURE = "written", "not written", "unsure"


class ActivityRecorder:
    """Counts requests per model and flushes them to the models' annotations on a thread.

    A request is activity from its arrival to its end: a model with a request still being answered (a
    long stream) gets its last-request time written as "now" at each flush, and once more when it
    ends, so the operator never takes it for idle mid-answer. A count whose write was sent but not
    answered (a read timeout, a 5xx) may have landed: only its time is written again, never the count
    (re-adding it counted every such batch again at each flush while answers kept failing)."""

    def __init__(
        self, api_client: Any, flush_s: float = 10.0, timeout: tuple[float, float] = REQUEST_TIMEOUT
    ) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.flush_s = flush_s
        self.timeout = timeout  #: (connect, read) seconds of each API call
        self._pending: Counter[tuple[str, str]] = Counter()
        self._last: dict[tuple[str, str], dt.datetime] = {}
        self._in_flight: Counter[tuple[str, str]] = Counter()  #: requests being answered now
        self._flushing: dict[tuple[str, str], dt.datetime] = {}  #: the last times a flush is writing
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-activity", daemon=True)

    def record(self, namespace: str, name: str) -> Callable[[], None]:
        """Count one request to the model; call what it returns when the request's answer ends."""
        key = (namespace, name)
        with self._lock:
            self._pending[key] += 1
            self._last[key] = dt.datetime.now(dt.UTC)
            self._in_flight[key] += 1
        return functools.partial(self._finished, key)

    def _finished(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]
            self._touch_locked(key, dt.datetime.now(dt.UTC))

    def _touch_locked(self, key: tuple[str, str], at: dt.datetime) -> None:
        """Have the next flush write ``at`` as the model's last request, adding nothing to its count."""
        self._pending[key] += 0
        self._last[key] = max(self._last.get(key, at), at)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait_s: float = 5.0) -> None:
        """Stop the thread (waiting ``wait_s`` for a flush under way) and flush what is left."""
        self._stop.set()
        self._thread.join(timeout=wait_s)
        if self._thread.is_alive():
            # A flush stuck on the API server holds its batch: its times go again (its counts may
            # still land with it, so they are not added twice).
            with self._lock:
                for key, at in self._flushing.items():
                    self._touch_locked(key, at)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def flush(self) -> None:
        """Write every model's pending counts; what cannot be written waits for the next flush. Once the
        API server cannot be reached the other models are not tried (each would fail alike) and one
        warning says so: every model's ERROR and traceback, every flush, flooded the log."""
        with self._lock:
            now = dt.datetime.now(dt.UTC)
            for key in self._in_flight:  # a request still being answered is activity now
                self._touch_locked(key, now)
            pending, self._pending = self._pending, Counter()
            last, self._last = self._last, {}
            self._flushing = dict(last)
        unreachable: Exception | None = None
        for key, count in pending.items():
            outcome = NOT_WRITTEN
            if unreachable is None:
                try:
                    outcome = self._write(key, count, last[key])
                except unreachable_errors() as exc:
                    unreachable = exc
            if outcome != WRITTEN:
                with self._lock:  # kept for the next flush: an unsure write, its time alone
                    self._touch_locked(key, last[key])
                    self._pending[key] += count if outcome == NOT_WRITTEN else 0
        with self._lock:
            self._flushing = {}
        if unreachable is not None:
            log.warning(
                "cannot record activity: the API server cannot be reached; counts kept for the next flush",
                extra={"models": len(pending), "error": str(unreachable)},
            )

    def _write(self, key: tuple[str, str], count: int, last: dt.datetime) -> str:
        """Add ``count`` to one model's annotations: :data:`WRITTEN`, :data:`NOT_WRITTEN` (to wait for
        the next flush) or :data:`UNSURE` (the patch was sent and not answered: it may have landed).
        Raises what :func:`vnpu.kubeclient.unreachable_errors` names before a patch was sent (for
        :meth:`flush` to say once)."""
        from kubernetes.client.exceptions import ApiException

        namespace, name = key
        model = f"{namespace}/{name}"
        for _ in range(MAX_ATTEMPTS):
            try:
                obj = self.custom.get_namespaced_custom_object(
                    api.GROUP, api.VERSION, namespace, api.PLURAL, name, _request_timeout=self.timeout
                )
                meta = obj["metadata"]
                stored, now = dict(meta.get("annotations") or {}), dt.datetime.now(dt.UTC)
                patch = {
                    "metadata": {
                        "resourceVersion": meta["resourceVersion"],
                        "annotations": merged_activity(stored, count, last, now),
                    }
                }
            except ApiException as exc:
                if exc.status == 404:
                    return WRITTEN  # the model is gone: nothing to record
                log.warning("cannot record activity", extra={"model": model, "status": exc.status})
                return NOT_WRITTEN
            except unreachable_errors():
                raise
            except Exception:  # anything else is this model's alone: the thread flushes every other model
                log.exception("cannot record activity", extra={"model": model})
                return NOT_WRITTEN
            ahead = ahead_of(stored, now)
            if ahead is not None:
                log.warning(
                    "the model's last request is ahead of this gateway's clock: writing over it (a "
                    "node's clock was, or is, wrong; the operator ignores it meanwhile)",
                    extra={
                        "model": model,
                        "last_request": stored.get(api.ANNOTATION_LAST_REQUEST),
                        "ahead_s": round(ahead),
                    },
                )
            try:
                self.custom.patch_namespaced_custom_object(
                    api.GROUP,
                    api.VERSION,
                    namespace,
                    api.PLURAL,
                    name,
                    patch,
                    _content_type="application/merge-patch+json",
                    _request_timeout=self.timeout,
                )
                return WRITTEN
            except ApiException as exc:
                if exc.status == 404:
                    return WRITTEN
                if exc.status == 409:  # another gateway updated it first: read again and add
                    continue
                log.warning("cannot record activity", extra={"model": model, "status": exc.status})
                return UNSURE if exc.status >= 500 else NOT_WRITTEN
            except unreachable_errors() as exc:
                if _not_sent(exc):
                    raise  # refused before it was sent: its counts wait, and the flush says so once
                log.warning(
                    "the API server did not answer an activity write: its time is written again, not "
                    "its count (it may have landed)",
                    extra={"model": model, "error": str(exc)[:300]},
                )
                return UNSURE
            except Exception:
                log.exception("cannot record activity", extra={"model": model})
                return NOT_WRITTEN
        return NOT_WRITTEN


def _not_sent(exc: BaseException) -> bool:
    """Whether a call failed before its request could reach the API server (no connection made)."""
    import urllib3

    reason = getattr(exc, "reason", None) or exc  # urllib3's MaxRetryError wraps the last error
    return isinstance(reason, (urllib3.exceptions.ConnectTimeoutError, ConnectionRefusedError))


def scale_from_zero(
    api_client: Any, namespace: str, name: str, timeout: tuple[float, float] = REQUEST_TIMEOUT
) -> None:
    """Scale a model to one replica through its scale subresource, unless it already has some; raises
    WakeError when the API server refuses, cannot be reached or does not answer within ``timeout``
    ((connect, read) seconds of each call)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api_client)
    try:
        scale = custom.get_namespaced_custom_object_scale(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, _request_timeout=timeout
        )
        if int((scale.get("spec") or {}).get("replicas") or 0) > 0:
            return
        custom.patch_namespaced_custom_object_scale(
            api.GROUP,
            api.VERSION,
            namespace,
            api.PLURAL,
            name,
            {"spec": {"replicas": 1}},
            _request_timeout=timeout,
        )
    except ApiException as exc:
        raise WakeError(f"the API server refused to scale it: {exc.status} {exc.reason}") from exc
    except unreachable_errors() as exc:
        raise WakeError(f"the API server cannot be reached: {exc}") from exc
