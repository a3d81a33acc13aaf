"""Prometheus metrics of the operator (served by ``vnpu operator --metrics-port``)."""

from __future__ import annotations

import threading
from collections.abc import Collection

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
#: Labels of the per-model series (see :func:`forget_models`).
MODEL_LABELS = ("namespace", "model")
API_ERROR_LABELS = (*MODEL_LABELS, "reason")

RECONCILE_SECONDS = Histogram(
    "vnpu_operator_reconcile_duration_seconds",
    "Wall time of one reconcile pass (plan from the watch-fed caches, apply the writes).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "vnpu_operator_reconcile_errors_total",
    "Reconcile passes that failed and will be retried.",
    registry=REGISTRY,
)
PLACED_REPLICAS = Gauge(
    "vnpu_operator_placed_replicas",
    "Replicas placed on a device, per model.",
    MODEL_LABELS,
    registry=REGISTRY,
)
UNPLACED_REPLICAS = Gauge(
    "vnpu_operator_unplaced_replicas",
    "Replicas that fit nowhere, per model.",
    MODEL_LABELS,
    registry=REGISTRY,
)
UNPLACED_SLICES = Gauge(
    "vnpu_operator_unplaced_slices",
    "vnpu.io/memory slices of demand that could not be placed, in the slices of the devices its "
    "placeholders stand for (what the autoscaler should add).",
    registry=REGISTRY,
)
SAVED_BY_SHARING_MIB = Gauge(
    "vnpu_operator_memory_saved_by_sharing_mib",
    "Device memory saved by mapping one weight copy per device instead of one per replica.",
    MODEL_LABELS,
    registry=REGISTRY,
)
POD_ACTIONS = Counter(
    "vnpu_operator_pod_actions_total",
    "Pods created or deleted by the operator.",
    ["action", "role"],
    registry=REGISTRY,
)
DEFRAGMENT_MOVES = Counter(
    "vnpu_operator_defragment_moves_total",
    "Replicas moved to free devices (--defragment): a new pod started beside the one it replaces.",
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "vnpu_operator_api_requests_total",
    "Requests the operator sent to the API server, by verb and resource (informers' lists and watches "
    "included): what one reconcile pass costs the server.",
    ["verb", "resource"],
    registry=REGISTRY,
)
UNPAGINATED_LISTS = Counter(
    "vnpu_operator_unpaginated_lists_total",
    "LISTs an informer read whole, without pages, by resource: its paged list expired twice (reading the "
    "pages took longer than the API server keeps a snapshot), so the memory peak of a full list was paid.",
    ["resource"],
    registry=REGISTRY,
)
INFORMER_ERRORS = Counter(
    "vnpu_operator_informer_errors_total",
    "LISTs and WATCHes of the informers that failed, by verb, resource and reason: expired (410 Gone), "
    "http_<status>, transport (the connection failed, broke or timed out), short_watch (a watch that "
    "ended within 1 s with no event), error (a bug). Failures in a row wait longer each (0.8 s doubling "
    "to 30 s).",
    ["verb", "resource", "reason"],
    registry=REGISTRY,
)
INFORMER_STALE_SECONDS = Gauge(
    "vnpu_operator_informer_stale_seconds",
    "Seconds for which an informer's store may have missed changes, by resource (the most of its "
    "namespaces'): 0 while its watch is open, else since its last LIST completed or its watch last "
    "heard from the API server. Passes plan from that store meanwhile.",
    ["resource"],
    registry=REGISTRY,
)
API_ERRORS = Counter(
    "vnpu_operator_api_errors_total",
    "Writes the API server refused, per model and reason (Forbidden, Invalid, ...); the model backs off.",
    API_ERROR_LABELS,
    registry=REGISTRY,
)
MODELS_IN_BACKOFF = Gauge(
    "vnpu_operator_models_in_backoff",
    "Models whose writes are paused after the API server refused one.",
    registry=REGISTRY,
)
REPORTS_QUEUED = Gauge(
    "vnpu_operator_reports_queued",
    "Models whose Service, status or Events wait for the background reporter (it trails the passes).",
    registry=REGISTRY,
)
REPORT_LAG_SECONDS = Histogram(
    "vnpu_operator_report_lag_seconds",
    "From a model's report being queued by a pass to the reporter having written it (Service, status "
    "and Events): how far statuses trail the pods.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
ESTIMATES_PENDING = Gauge(
    "vnpu_operator_estimates_pending",
    "Models whose memory estimate reads their files now or waits its turn (read away from the pass).",
    registry=REGISTRY,
)
ESTIMATE_READ_SECONDS = Histogram(
    "vnpu_operator_estimate_read_seconds",
    "Wall time of one estimate that reads a model's files, by outcome (ok, error, timeout).",
    ["outcome"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 60),
    registry=REGISTRY,
)
IS_LEADER = Gauge(
    "vnpu_operator_leader",
    "1 while this replica holds the leader Lease (plans and writes), else 0.",
    registry=REGISTRY,
)
SCALED_TO_ZERO = Counter(
    "vnpu_operator_scaled_to_zero_total",
    "Idle models the operator scaled to 0 replicas (spec.scaling.minReplicas 0).",
    MODEL_LABELS,
    registry=REGISTRY,
)
CRD_OUTDATED = Gauge(
    "vnpu_operator_crd_outdated",
    "1 while the served InferenceModel CRD is older than this operator's (status fields it writes are "
    "refused or dropped): apply deploy/helm/vnpu/crds/.",
    registry=REGISTRY,
)
WARM_HOLDERS = Gauge(
    "vnpu_operator_warm_holders",
    "Weight-holders kept for share groups with no replicas (keepWarm), per node pool.",
    ["pool"],
    registry=REGISTRY,
)

#: The series labelled by model, with their label names in order: a model's go when the model does.
PER_MODEL: tuple[tuple[Counter | Gauge, tuple[str, ...]], ...] = (
    (PLACED_REPLICAS, MODEL_LABELS),
    (UNPLACED_REPLICAS, MODEL_LABELS),
    (SAVED_BY_SHARING_MIB, MODEL_LABELS),
    (API_ERRORS, API_ERROR_LABELS),
    (SCALED_TO_ZERO, MODEL_LABELS),
)


def forget_models(live: Collection[tuple[str, str]]) -> int:
    """Remove the series of every model not in ``live`` (namespace, name); returns how many went.

    A labelled child lives until removed: without this a deleted model's gauges would report their
    last value forever (``sum(vnpu_operator_placed_replicas)`` counting replicas long gone), and a
    tenant creating and deleting models would grow the operator's memory and the scrape without end.
    It scans every series: the passes remove a gone model's by their labels instead (:class:`ModelSeries`).
    """
    removed = 0
    for metric, names in PER_MODEL:
        children = {tuple(s.labels[n] for n in names) for family in metric.collect() for s in family.samples}
        for values in children:
            if (values[0], values[1]) not in live:
                metric.remove(*values)
                removed += 1
    return removed


def forget_model(namespace: str, name: str, api_error_reasons: Collection[str] = ()) -> None:
    """Remove one model's series by their labels: no scan, whatever the number of models."""
    for metric, names in PER_MODEL:
        if names == MODEL_LABELS:
            metric.remove(namespace, name)
    for reason in api_error_reasons:
        API_ERRORS.remove(namespace, name, reason)


class ModelSeries:
    """Which models have series, so that a model's go with it, removed by their labels after the pass
    in which it went (a scan of every series cost 0.63 s per deletion at 50,000 models).

    A count from another thread (the reporter's, writing a status the pass planned) can land just
    after its model's series went and bring one back; the model is noted here so that the next pass
    removes it again instead of keeping it for ever.
    """

    def __init__(self) -> None:
        self._seen: frozenset[tuple[str, str]] = frozenset()
        self._late: set[tuple[str, str]] = set()
        self._error_reasons: dict[tuple[str, str], set[str]] = {}  #: the labels of its error series
        self._lock = threading.Lock()

    def count_api_error(self, namespace: str, name: str, reason: str) -> None:
        API_ERRORS.labels(namespace, name, reason).inc()
        with self._lock:  # after the count: a pass that takes this name finds the series to remove
            self._late.add((namespace, name))
            self._error_reasons.setdefault((namespace, name), set()).add(reason)

    def after_pass(self, live: Collection[tuple[str, str]]) -> int:
        """Remove the series of the models not in ``live``; returns how many models' went."""
        live = frozenset(live)
        with self._lock:
            late, self._late = self._late, set()
            gone = (self._seen | late) - live
            reasons = {model: self._error_reasons.pop(model, set()) for model in gone}
        for namespace, name in gone:
            forget_model(namespace, name, reasons[namespace, name])
        self._seen = live
        return len(gone)
