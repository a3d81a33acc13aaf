"""Prometheus metrics of the operator (served by ``vnpu operator --metrics-port``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILE_SECONDS = Histogram(
    "vnpu_operator_reconcile_duration_seconds",
    "Wall time of one full reconcile pass (read state, pack, apply).",
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
