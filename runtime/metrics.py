"""Prometheus metrics of one serving process (its own registry, so tests can run several in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_PREFIX = "vnpu_runtime_"


class RuntimeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            _PREFIX + "requests", "Completion requests by outcome", ["status"], registry=r
        )
        self.prompt_tokens = Counter(_PREFIX + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter(_PREFIX + "generated_tokens", "Tokens generated", registry=r)
        self.tokens_per_second = Gauge(
            _PREFIX + "tokens_per_second", "Decode speed of the last completed request", registry=r
        )
        self.time_to_first_token = Histogram(
            _PREFIX + "time_to_first_token_seconds",
            "Time from request start to the first generated token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.request_seconds = Histogram(
            _PREFIX + "request_seconds",
            "Wall time of completion requests",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.kv_cache_bytes = Gauge(
            _PREFIX + "kv_cache_bytes", "KV cache allocated by this process", registry=r
        )
        self.kv_cache_usage = Gauge(
            _PREFIX + "kv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r
        )
        self.weights_bytes = Gauge(
            _PREFIX + "weights_bytes",
            "Weight bytes this process uses, by ownership",
            ["ownership"],
            registry=r,
        )
        self.offload_bytes = Counter(
            _PREFIX + "offload_bytes", "Bytes copied host-to-device by the offload engine", registry=r
        )
        self.offload_stall_seconds = Counter(
            _PREFIX + "offload_stall_seconds", "Compute time spent waiting for streamed weights", registry=r
        )
        self.attach_seconds = Gauge(
            _PREFIX + "attach_seconds",
            "Time the last weight attach (or load from disk) took",
            ["mode"],
            registry=r,
        )
        self.attaches = Counter(_PREFIX + "attaches", "Successful attaches to a weights-holder", registry=r)
        self.requests_in_flight = Gauge(
            _PREFIX + "requests_in_flight",
            "Completion requests running or queued (an autoscaling signal)",
            registry=r,
        )
        self.requests_waiting = Gauge(
            _PREFIX + "requests_waiting",
            "Requests queued for a batch slot (what the queue limit counts)",
            registry=r,
        )
        self.requests_running = Gauge(
            _PREFIX + "requests_running",
            "Sequences in the running batch (prefilling or decoding)",
            registry=r,
        )
        self.batch_size = Histogram(
            _PREFIX + "batch_size",
            "Sequences per forward step (continuous batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.step_tokens = Histogram(
            _PREFIX + "step_tokens",
            "Tokens per forward step (decode tokens plus prefill chunks)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.step_seconds = Histogram(
            _PREFIX + "step_seconds",
            "Wall time of one engine step (schedule, forward pass, sampling)",
            buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.kv_cache_blocks = Gauge(
            _PREFIX + "kv_cache_blocks", "Usable blocks of the paged KV cache", registry=r
        )
        self.step_failures = Counter(
            _PREFIX + "step_failures",
            "Engine steps whose forward pass failed (the requests in them failed)",
            registry=r,
        )
        self.preemptions = Counter(
            _PREFIX + "preemptions",
            "Sequences preempted (blocks freed, recomputed later) for higher-priority or longer ones",
            registry=r,
        )
        self.ready = Gauge(_PREFIX + "ready", "1 when the model can serve requests", registry=r)
        # Which weights this replica maps, so dashboards and alerts can join replicas to their share
        # identity (a group is scoped by its namespace: two namespaces' groups never share a series).
        self.share_info = Gauge(
            _PREFIX + "share_info",
            "1 for the share identity (namespace, group, weights id, device) this replica attaches to",
            ["namespace", "group", "weights_id", "device"],
            registry=r,
        )
        self.attach_failures = Counter(
            _PREFIX + "attach_failures",
            "Attach attempts that failed: refused (authentication, identity, other weights) or unavailable",
            ["reason"],
            registry=r,
        )
