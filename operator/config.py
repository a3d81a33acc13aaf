"""Operator settings: one frozen object built from the command line, passed to every part that needs
it (no module-level globals that tests would have to patch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_RUNTIME_IMAGE = "ghcr.io/vnpu/vnpu:0.2.0"
DEFAULT_PLACEHOLDER_IMAGE = "registry.k8s.io/pause:3.10"
PLACEHOLDER_PRIORITY_CLASS = "vnpu-placeholder"
# Negative so real work always wins, but at or above the Cluster Autoscaler's default
# --expendable-pods-priority-cutoff (-10): below it the autoscaler ignores the pod and never scales up.
PLACEHOLDER_PRIORITY = -5
#: ``--preemption``: whose running replicas a model's higher priority may evict. ``namespace`` (the
#: default) keeps a tenant's priority its own business, as Kueue's default preempts only within a
#: ClusterQueue; ``cluster`` is for clusters where whoever may write an InferenceModel is trusted.
PREEMPTION_SCOPES = ("namespace", "cluster", "never")


@dataclass(frozen=True)
class OperatorConfig:
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    placeholder_image: str = DEFAULT_PLACEHOLDER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    #: Secrets the kubelet pulls model pods' images with (``--image-pull-secret``): by name, so each
    #: must exist in every namespace with models (a pod names Secrets of its own namespace only).
    image_pull_secrets: tuple[str, ...] = ()
    #: Create placeholder pods for demand that cannot be placed (for the Cluster Autoscaler).
    placeholders: bool = True
    #: Seconds to coalesce bursts of events into one reconcile pass.
    debounce_seconds: float = 0.2
    #: Re-plan at least this often even without events (safety net for missed watch events).
    resync_seconds: float = 60.0
    #: Namespaces to watch; empty means all.
    namespaces: tuple[str, ...] = field(default_factory=tuple)
    #: Move running replicas to free devices when that saves devices (off: placements are sticky):
    #: a batch at a time, only on a settled cluster, each move make-before-break.
    defragment: bool = False
    #: The most running replicas one defragmentation batch moves.
    defragment_max_moves: int = 10
    #: Seconds a NotReady (or unreachable) node keeps its pods before they are re-placed: the
    #: default of Kubernetes' taint-based eviction (DefaultTolerationSeconds).
    node_grace_seconds: int = 300
    #: Where hf:// sources are looked up to size them (an HF hub cache or mirror); None: not sizable.
    model_cache_dir: str | None = None
    #: The only directories whose file:// sources are read to size them (none: a tenant's spec must
    #: not make the operator read its own files; such models declare their sizes instead).
    model_file_roots: tuple[str, ...] = field(default_factory=tuple)
    #: Threads (each with a child process it kills at ``estimate_timeout_seconds``) that read models'
    #: files to size them, away from the reconcile pass (:mod:`vnpu.operator.estimate_cache`).
    estimate_workers: int = 2
    estimate_timeout_seconds: float = 20.0
    #: Node label naming a node's pool: keep-warm budgets are per pool (nodes without it: "default").
    pool_label: str = "vnpu.io/pool"
    #: Fraction of a pool's device memory that holders of models at 0 replicas may keep (keepWarm Auto).
    keep_warm_fraction: float = 0.2
    #: Whose running replicas a higher-priority model may evict (see :data:`PREEMPTION_SCOPES`).
    preemption: str = "namespace"
    #: Keep a NetworkPolicy in each namespace with models (:mod:`vnpu.operator.network_policy`): model
    #: pods take traffic only from their namespace's pods and from ``network_policy_peers``.
    network_policy: bool = False
    network_policy_peers: tuple[dict[str, Any], ...] = ()
    #: Retry a failing model's writes after this many seconds, doubling up to ``max_backoff_seconds``.
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 300.0
