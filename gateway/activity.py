"""What the gateway tells the operator about demand, and how it wakes a model.

Every request is counted per model; every ``flush_s`` seconds the counts go onto the InferenceModel
as two annotations: ``vnpu.io/requests`` (a cumulative counter) and ``vnpu.io/last-request`` (the
latest request's time, RFC 3339). Several gateway replicas add to the same counter: each update is a
merge patch carrying the resourceVersion it read, so a concurrent update makes it read and add again
(optimistic concurrency; nothing is lost or counted twice). One write per active model per flush
keeps the API server's load proportional to activity, not to requests. The operator reads them to
scale idle models to zero and to forecast which to keep warm.

Waking patches the model's scale subresource to one replica, as ``kubectl scale`` would.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import Counter
from typing import Any

from vnpu import api

log = logging.getLogger(__name__)

#: Attempts at one model's update before its counts wait for the next flush.
MAX_ATTEMPTS = 4


def merged_activity(annotations: dict[str, str], added: int, last: dt.datetime) -> dict[str, str]:
    """The activity annotations after ``added`` more requests, the latest at ``last`` (pure)."""
    # A garbled counter restarts rather than blocking every update.
    total = api.parse_count(annotations.get(api.ANNOTATION_REQUESTS)) or 0
    seen = api.parse_time(annotations.get(api.ANNOTATION_LAST_REQUEST))
    latest = max(seen, last) if seen else last
    return {
        api.ANNOTATION_REQUESTS: str(total + added),
        api.ANNOTATION_LAST_REQUEST: api.format_time(latest),
    }


class ActivityRecorder:
    """Counts requests per model and flushes them to the models' annotations on a thread."""

    def __init__(self, api_client: Any, flush_s: float = 10.0) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.flush_s = flush_s
        self._pending: Counter[tuple[str, str]] = Counter()
        self._last: dict[tuple[str, str], dt.datetime] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-activity", daemon=True)

    def record(self, namespace: str, name: str) -> None:
        with self._lock:
            self._pending[(namespace, name)] += 1
            self._last[(namespace, name)] = dt.datetime.now(dt.UTC)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, Counter()
            last, self._last = self._last, {}
        for key, count in pending.items():
            if not self._write(key, count, last[key]):
                with self._lock:  # keep it for the next flush
                    self._pending[key] += count
                    self._last[key] = max(self._last.get(key, last[key]), last[key])

    def _write(self, key: tuple[str, str], count: int, last: dt.datetime) -> bool:
        from kubernetes.client.exceptions import ApiException

        namespace, name = key
        for _ in range(MAX_ATTEMPTS):
            try:
                obj = self.custom.get_namespaced_custom_object(
                    api.GROUP, api.VERSION, namespace, api.PLURAL, name
                )
                meta = obj["metadata"]
                annotations = merged_activity(dict(meta.get("annotations") or {}), count, last)
                patch = {"metadata": {"resourceVersion": meta["resourceVersion"], "annotations": annotations}}
                self.custom.patch_namespaced_custom_object(
                    api.GROUP,
                    api.VERSION,
                    namespace,
                    api.PLURAL,
                    name,
                    patch,
                    _content_type="application/merge-patch+json",
                )
                return True
            except ApiException as exc:
                if exc.status == 404:
                    return True  # the model is gone: nothing to record
                if exc.status != 409:  # 409: another gateway updated it first; read again and add
                    log.warning(
                        "cannot record activity", extra={"model": f"{namespace}/{name}", "status": exc.status}
                    )
                    return False
            except Exception:  # anything else is this model's alone: the thread flushes every other model
                log.exception("cannot record activity", extra={"model": f"{namespace}/{name}"})
                return False
        return False


def scale_from_zero(api_client: Any, namespace: str, name: str) -> None:
    """Scale a model to one replica through its scale subresource, unless it already has some."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api_client)
    try:
        scale = custom.get_namespaced_custom_object_scale(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
        if int((scale.get("spec") or {}).get("replicas") or 0) > 0:
            return
        custom.patch_namespaced_custom_object_scale(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"spec": {"replicas": 1}}
        )
    except ApiException as exc:
        log.warning("cannot wake the model", extra={"model": f"{namespace}/{name}", "status": exc.status})
