"""Prometheus metrics of the operator (served by ``vnpu operator --metrics-port``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

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
    ["namespace", "model"],
    registry=REGISTRY,
)
UNPLACED_REPLICAS = Gauge(
    "vnpu_operator_unplaced_replicas",
    "Replicas that fit nowhere, per model.",
    ["namespace", "model"],
    registry=REGISTRY,
)
UNPLACED_SLICES = Gauge(
    "vnpu_operator_unplaced_slices",
    "vnpu.io/memory slices of demand that could not be placed (what the autoscaler should add).",
    registry=REGISTRY,
)
SAVED_BY_SHARING_MIB = Gauge(
    "vnpu_operator_memory_saved_by_sharing_mib",
    "Device memory saved by mapping one weight copy per device instead of one per replica.",
    ["namespace", "model"],
    registry=REGISTRY,
)
POD_ACTIONS = Counter(
    "vnpu_operator_pod_actions_total",
    "Pods created or deleted by the operator.",
    ["action", "role"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "vnpu_operator_api_requests_total",
    "Requests the operator sent to the API server, by verb and resource (informers' lists and watches "
    "included): what one reconcile pass costs the server.",
    ["verb", "resource"],
    registry=REGISTRY,
)
API_ERRORS = Counter(
    "vnpu_operator_api_errors_total",
    "Writes the API server refused, per model and reason (Forbidden, Invalid, ...); the model backs off.",
    ["namespace", "model", "reason"],
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
IS_LEADER = Gauge(
    "vnpu_operator_leader",
    "1 while this replica holds the leader Lease (plans and writes), else 0.",
    registry=REGISTRY,
)
SCALED_TO_ZERO = Counter(
    "vnpu_operator_scaled_to_zero_total",
    "Idle models the operator scaled to 0 replicas (spec.scaling.minReplicas 0).",
    ["namespace", "model"],
    registry=REGISTRY,
)
WARM_HOLDERS = Gauge(
    "vnpu_operator_warm_holders",
    "Weight-holders kept for share groups with no replicas (keepWarm), per node pool.",
    ["pool"],
    registry=REGISTRY,
)
