"""The pods bound to this node, from the API server, and the matching of allocations to them.

The kubelet never tells a device plugin which pod an Allocate is for. The operator annotates the
pods it places (``vnpu.io/device``, ``vnpu.io/share-group``); the plugin watches the pods bound to
its node and matches a request to the *oldest* pending pod that asks for that many slices and is not
yet holding any: the kubelet admits pods in creation order, so oldest-first follows it. The match is
advisory for GetPreferredAllocation (which device to prefer) and decides the share-group mount in
Allocate; the pod-resources API confirms the true holder afterwards (see :mod:`.ledger`).

Matching is pure (:func:`summarize`, :func:`match_pod`, :func:`preferred_device`); :class:`PodWatcher`
does the list+watch on a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vnpu.api import ANNOTATION_DEVICE, ANNOTATION_SHARE_GROUP, RESOURCE_MEMORY
from vnpu.device_plugin.ledger import PodRef

log = logging.getLogger(__name__)

FINISHED_PHASES = ("Succeeded", "Failed")
#: Minimum time between two direct pod listings (see PodWatcher.refresh).
REFRESH_MIN_INTERVAL_S = 1.0


@dataclass(frozen=True)
class PodSummary:
    """What the plugin needs to know about one pod on its node."""

    ref: PodRef
    phase: str
    created: float
    device: str | None
    share_group: str | None
    #: Slices of ``vnpu.io/memory`` each container (init containers included) asks for; 0 when none.
    requests: tuple[int, ...]
    deleting: bool = False

    @property
    def pending(self) -> bool:
        return self.phase == "Pending" and not self.deleting

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES


def _get(obj: Any, *path: str) -> Any:
    """Read a field from a kubernetes client model or a plain dict (camelCase or snake_case)."""
    for key in path:
        if obj is None:
            return None
        if isinstance(obj, Mapping):
            camel = key.split("_")[0] + "".join(p.title() for p in key.split("_")[1:])
            obj = obj.get(camel, obj.get(key))
        else:
            obj = getattr(obj, key, None)
    return obj


def _quantity(value: Any) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def _timestamp(value: Any) -> float:
    if value is None:
        return 0.0
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    from datetime import datetime

    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def summarize(pod: Any, resource: str = RESOURCE_MEMORY) -> PodSummary:
    """A PodSummary from a V1Pod or a pod dict."""
    annotations = _get(pod, "metadata", "annotations") or {}
    containers = list(_get(pod, "spec", "init_containers") or []) + list(
        _get(pod, "spec", "containers") or []
    )
    requests = []
    for c in containers:
        limits = _get(c, "resources", "limits") or {}
        wanted = _get(c, "resources", "requests") or {}
        requests.append(_quantity(limits.get(resource, wanted.get(resource, 0))))
    return PodSummary(
        ref=PodRef(
            str(_get(pod, "metadata", "namespace")),
            str(_get(pod, "metadata", "name")),
            str(_get(pod, "metadata", "uid") or ""),
        ),
        phase=str(_get(pod, "status", "phase") or "Pending"),
        created=_timestamp(_get(pod, "metadata", "creation_timestamp")),
        device=annotations.get(ANNOTATION_DEVICE) or None,
        share_group=annotations.get(ANNOTATION_SHARE_GROUP) or None,
        requests=tuple(requests),
        deleting=_get(pod, "metadata", "deletion_timestamp") is not None,
    )


def _unclaimed_pending(
    pods: Iterable[PodSummary], claimed: Collection[PodRef], size: int
) -> list[PodSummary]:
    out = [
        p for p in pods if p.pending and size in p.requests and not any(p.ref.same_pod(c) for c in claimed)
    ]
    return sorted(out, key=lambda p: (p.created, p.ref.namespace, p.ref.name))


def match_pod(
    pods: Iterable[PodSummary], devices: Collection[str], size: int, claimed: Collection[PodRef]
) -> PodSummary | None:
    """The pod an Allocate of ``size`` slices on ``devices`` is most likely for: the oldest unclaimed
    pending pod asking for ``size`` slices whose ``vnpu.io/device`` is one of ``devices``; failing that,
    the oldest such pod without the annotation."""
    candidates = _unclaimed_pending(pods, claimed, size)
    annotated = [p for p in candidates if p.device in devices]
    if annotated:
        return annotated[0]
    free = [p for p in candidates if p.device is None]
    return free[0] if free else None


def preferred_device(
    pods: Iterable[PodSummary], size: int, available: Mapping[str, int], claimed: Collection[PodRef]
) -> str | None:
    """The device named by the oldest unclaimed pending pod asking for ``size`` slices, if that device
    has ``size`` slices available."""
    for pod in _unclaimed_pending(pods, claimed, size):
        if pod.device is not None and available.get(pod.device, 0) >= size:
            return pod.device
    return None


class PodWatcher:
    """List+watch of the pods bound to ``node_name``, kept in memory.

    ``on_gone`` is called with the pods that were deleted or finished, so their slices are released.
    """

    def __init__(
        self,
        core_api: Any,
        node_name: str,
        *,
        resource: str = RESOURCE_MEMORY,
        on_gone: Callable[[list[PodRef]], None] | None = None,
        watch_timeout_s: int = 30,
    ) -> None:
        self.api = core_api
        self.node_name = node_name
        self.resource = resource
        self.on_gone = on_gone
        self.watch_timeout_s = watch_timeout_s
        self.synced = threading.Event()
        self._pods: dict[str, PodSummary] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None
        self._last_refresh = -REFRESH_MIN_INTERVAL_S

    @property
    def field_selector(self) -> str:
        return f"spec.nodeName={self.node_name}"

    def pods(self) -> list[PodSummary]:
        with self._lock:
            return list(self._pods.values())

    def refresh(self) -> list[PodSummary]:
        """List pods now (used when a request finds no match: our watch may lag the kubelet's).
        At most once per ``REFRESH_MIN_INTERVAL_S`` so an unreachable API server cannot slow every call."""
        now = time.monotonic()
        if now - self._last_refresh >= REFRESH_MIN_INTERVAL_S:
            self._last_refresh = now
            result = self.api.list_pod_for_all_namespaces(
                field_selector=self.field_selector, _request_timeout=2
            )
            self._replace_all([summarize(p, self.resource) for p in result.items])
        return self.pods()

    def _key(self, s: PodSummary) -> str:
        return s.ref.uid or str(s.ref)

    def _replace_all(self, summaries: list[PodSummary]) -> None:
        with self._lock:
            new = {self._key(s): s for s in summaries}
            gone = [s.ref for k, s in self._pods.items() if k not in new]
            gone += [s.ref for s in summaries if s.finished]
            self._pods = new
        self._report_gone(gone)

    def _apply(self, kind: str, pod: Any) -> None:
        summary = summarize(pod, self.resource)
        with self._lock:
            if kind == "DELETED":
                self._pods.pop(self._key(summary), None)
            else:
                self._pods[self._key(summary)] = summary
        if kind == "DELETED" or summary.finished:
            self._report_gone([summary.ref])

    def _report_gone(self, gone: list[PodRef]) -> None:
        if gone and self.on_gone is not None:
            try:
                self.on_gone(gone)
            except Exception:
                log.exception("releasing slices of finished pods failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vnpu-pod-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        backoff = 0.5
        while not self._stop.is_set():
            try:
                listed = self.api.list_pod_for_all_namespaces(
                    field_selector=self.field_selector, _request_timeout=10
                )
                self._replace_all([summarize(p, self.resource) for p in listed.items])
                self.synced.set()
                version = listed.metadata.resource_version
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    self.api.list_pod_for_all_namespaces,
                    field_selector=self.field_selector,
                    resource_version=version,
                    timeout_seconds=self.watch_timeout_s,
                    allow_watch_bookmarks=True,
                ):
                    if self._stop.is_set():
                        return
                    kind = event["type"]
                    if kind == "ERROR":
                        break  # usually 410 Gone: relist
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self._apply(kind, event["object"])
                backoff = 0.5
            except (ApiException, OSError, ValueError) as exc:
                if self._stop.is_set():
                    return
                log.warning(
                    "pod watch failed; retrying",
                    extra={"node": self.node_name, "error": str(exc)[:300], "retry_s": backoff},
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception as exc:  # urllib3 errors and the like: never let the thread die
                if self._stop.is_set():
                    return
                log.warning(
                    "pod watch error; retrying", extra={"node": self.node_name, "error": repr(exc)[:300]}
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
