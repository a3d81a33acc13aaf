"""The InferenceModel spec, parsed once at the edge into frozen dataclasses.

Everything past :func:`parse_spec` reads typed fields; the defaults live here and nowhere else (the
CRD's OpenAPI defaults match them, so a spec the API server defaulted and one it did not mean the
same). The raw mapping is kept only for the two consumers that define their own view of it: the
memory estimate (:func:`vnpu.memory.estimate_from_spec`, which names spec fields in its errors) and
the pod-template hash, which must stay byte-for-byte what earlier operators computed so an upgrade
rolls nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.utils import parse_quantity

from vnpu.api import (
    DEFAULT_MIN_REPLICAS,
    DEFAULT_PRIORITY,
    KEEP_WARM_AUTO,
    KEEP_WARM_MODES,
    MAX_DRAIN_S,
    REPLICA_DRAIN_S,
    holder_serves,
)
from vnpu.operator.packing import Spread, Toleration

DEFAULT_REPLICAS = 1
DEFAULT_PORT = 8000
DEFAULT_PREFETCH_DEPTH = 2
#: Rolling-update defaults, as a Deployment's: a quarter more replicas while rolling, none unavailable.
DEFAULT_MAX_SURGE: int | str = "25%"
DEFAULT_MAX_UNAVAILABLE: int | str = 0
ROLLING_UPDATE = "RollingUpdate"
RECREATE = "Recreate"
#: Scale to zero: off unless minReplicas is 0; five idle minutes; holders kept by the forecast.
DEFAULT_IDLE_SECONDS = 300

#: Spec fields that shape a pod: a change to any of them rolls the model's pods.
POD_TEMPLATE_FIELDS = ("modelName", "source", "weights", "modelConfig", "memory", "offload", "runtime")


class SpecError(ValueError):
    """A spec the operator cannot use (the message names the field)."""


@dataclass(frozen=True)
class PodToleration:
    """A toleration as the pod carries it (``seconds`` is tolerationSeconds)."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""
    seconds: int | None = None

    def for_packer(self) -> Toleration:
        return Toleration(self.key, self.operator, self.value, self.effect)

    def manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"operator": self.operator}
        for name, value in (("key", self.key), ("value", self.value), ("effect", self.effect)):
            if value:
                out[name] = value
        if self.seconds is not None:
            out["tolerationSeconds"] = self.seconds
        return out


@dataclass(frozen=True)
class Source:
    uri: str
    format: str | None = None


@dataclass(frozen=True)
class Memory:
    kv_cache_mib: int | None = None
    max_context_tokens: int | None = None
    max_batch: int | None = None
    activation_mib: int | None = None
    overhead_mib: int | None = None


@dataclass(frozen=True)
class Offload:
    mode: str = "none"
    device_budget_mib: int | None = None
    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH


@dataclass(frozen=True)
class Runtime:
    image: str | None = None
    port: int = DEFAULT_PORT
    requests: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, str] = field(default_factory=dict)
    #: Seconds a stopping replica gives its requests in flight (``runtime.drainSeconds``).
    drain_seconds: int = REPLICA_DRAIN_S


@dataclass(frozen=True)
class Placement:
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[PodToleration, ...] = ()
    spread_across_nodes: bool = False

    @property
    def spread(self) -> Spread:
        return Spread.BEST_EFFORT if self.spread_across_nodes else Spread.NONE


@dataclass(frozen=True)
class Rollout:
    """How a spec change replaces running replicas (Deployment semantics: ``maxSurge`` rounds up,
    ``maxUnavailable`` rounds down, and both at 0 means a surge of 1)."""

    strategy: str = ROLLING_UPDATE
    max_surge: int | str = DEFAULT_MAX_SURGE
    max_unavailable: int | str = DEFAULT_MAX_UNAVAILABLE

    def surge(self, replicas: int) -> int:
        if self.strategy == RECREATE:
            return 0
        surge = _resolve(self.max_surge, replicas, round_up=True)
        if surge == 0 and self.unavailable(replicas) == 0:
            return 1
        return surge

    def unavailable(self, replicas: int) -> int:
        if self.strategy == RECREATE:
            return replicas
        return min(replicas, _resolve(self.max_unavailable, replicas, round_up=False))

    def describe(self, replicas: int) -> str:
        if self.strategy == RECREATE:
            return "Recreate"
        return f"maxSurge {self.surge(replicas)}, maxUnavailable {self.unavailable(replicas)}"


def _resolve(value: int | str, replicas: int, *, round_up: bool) -> int:
    if isinstance(value, int):
        return value
    share = replicas * int(value.rstrip("%")) / 100
    return math.ceil(share) if round_up else math.floor(share)


@dataclass(frozen=True)
class Scaling:
    """``spec.scaling``: scale to zero after ``idle_seconds`` without a request when ``min_replicas``
    is 0, and whether the weight-holders stay meanwhile (:mod:`vnpu.operator.scaling`)."""

    min_replicas: int = DEFAULT_MIN_REPLICAS
    idle_seconds: int = DEFAULT_IDLE_SECONDS
    keep_warm: str = KEEP_WARM_AUTO

    @property
    def holder_serves(self) -> bool:
        """Its weight-holders answer requests while no replica is ready (:func:`vnpu.api.holder_serves`)."""
        return holder_serves(self.min_replicas, self.keep_warm)


@dataclass(frozen=True)
class ModelSpec:
    model_name: str
    source: Source
    share_group: str
    weights_dtype: str | None = None
    replicas: int = DEFAULT_REPLICAS
    memory: Memory = Memory()
    offload: Offload = Offload()
    runtime: Runtime = Runtime()
    placement: Placement = Placement()
    priority: int = DEFAULT_PRIORITY
    rollout: Rollout = Rollout()
    scaling: Scaling = Scaling()
    #: The spec as the API server holds it (for the estimate and the pod-template hash only).
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def image(self, default: str) -> str:
        return self.runtime.image or default

    @property
    def offloaded(self) -> bool:
        """Async offload: its holders keep the weights in host memory, a part of them resident."""
        return self.offload.mode == "async"

    @property
    def holder_serves(self) -> bool:
        """Its weight-holders answer requests while no replica is ready (:func:`vnpu.api.holder_serves`),
        holding every weight on the device: not under async offload, where they hold only a part."""
        return self.scaling.holder_serves and not self.offloaded

    @property
    def template_hash(self) -> str:
        """Hash of the pod-shaping fields as written (unchanged since 0.1: an upgrade rolls nothing)."""
        relevant = {k: self.raw.get(k) for k in POD_TEMPLATE_FIELDS}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]


def default_share_group(raw: Mapping[str, Any]) -> str:
    """Digest of uri (which carries an hf revision) and dtype: equal weights share by default."""
    source = raw.get("source") or {}
    dtype = (raw.get("weights") or {}).get("dtype", "")
    return "w-" + hashlib.sha256(f"{source.get('uri', '')}\x00{dtype}".encode()).hexdigest()[:16]


def _section(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise SpecError(f"spec.{key} must be an object")
    return value


#: The largest resource quantity a pod may ask for: Kubernetes holds a quantity's value in an int64
#: (``Quantity.Value()`` saturates there), and no node has more of anything.
MAX_QUANTITY = 2**63 - 1


def _quantities(resources: Mapping[str, Any], key: str) -> dict[str, str]:
    """``runtime.resources.<key>`` as quantity strings, each one Kubernetes can hold. The API server
    takes ``1e5000`` (an exponent of up to int32), which the operator then added MiB to and wrote out:
    an integer of 5,000 digits, past Python's limit on converting one to text."""
    out = {}
    for name, value in _section(resources, key).items():
        where = f"spec.runtime.resources.{key}.{name}"
        try:
            amount = parse_quantity(str(value))
        except ValueError as exc:
            raise SpecError(f"{where} must be a quantity such as 512Mi or 2, got {value!r}") from exc
        if not amount.is_finite() or abs(amount) > MAX_QUANTITY:
            raise SpecError(f"{where} is more than any node has (at most 2^63-1), got {value!r}")
        out[str(name)] = str(value)
    return out


def _int(section: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int | None:
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"spec.{where}{key} must be an integer, got {value!r}")
    return value


def _drain_seconds(runtime: Mapping[str, Any]) -> int:
    value = _int(runtime, "drainSeconds", "runtime.", REPLICA_DRAIN_S)
    assert value is not None
    if not 0 <= value <= MAX_DRAIN_S:
        raise SpecError(f"spec.runtime.drainSeconds must be between 0 and {MAX_DRAIN_S}, got {value}")
    return value


def _int_or_percent(value: Any, where: str) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.endswith("%") and value[:-1].isascii() and value[:-1].isdigit():
        return value
    raise SpecError(f"spec.{where} must be a non-negative integer or a percentage like '25%', got {value!r}")


def parse_spec(raw: Mapping[str, Any]) -> ModelSpec:
    """The typed spec; raises :class:`SpecError` naming the field when ``raw`` cannot be used (the
    CRD's validation refuses such specs, so this guards objects written before it existed)."""
    source = _section(raw, "source")
    if not source.get("uri"):
        raise SpecError("spec.source.uri is required")
    memory = _section(raw, "memory")
    offload = _section(raw, "offload")
    runtime = _section(raw, "runtime")
    resources = _section(runtime, "resources")
    placement = _section(raw, "placement")
    rollout = _section(raw, "rollout")
    tolerations = tuple(
        PodToleration(
            key=str(t.get("key", "")),
            operator=str(t.get("operator", "Equal")),
            value=str(t.get("value", "") or ""),
            effect=str(t.get("effect", "")),
            seconds=_int(t, "tolerationSeconds", "placement.tolerations[]."),
        )
        for t in placement.get("tolerations") or []
    )
    scaling = _section(raw, "scaling")
    keep_warm = str(scaling.get("keepWarm", KEEP_WARM_AUTO))
    if keep_warm not in KEEP_WARM_MODES:
        modes = ", ".join(KEEP_WARM_MODES)
        raise SpecError(f"spec.scaling.keepWarm must be one of {modes}, got {keep_warm!r}")
    strategy = str(rollout.get("strategy", ROLLING_UPDATE))
    if strategy not in (ROLLING_UPDATE, RECREATE):
        raise SpecError(f"spec.rollout.strategy must be {ROLLING_UPDATE} or {RECREATE}, got {strategy!r}")
    return ModelSpec(
        model_name=str(raw.get("modelName", "")),
        source=Source(str(source["uri"]), source.get("format")),
        share_group=str(raw.get("shareGroup") or default_share_group(raw)),
        weights_dtype=_section(raw, "weights").get("dtype"),
        replicas=_int(raw, "replicas", "", DEFAULT_REPLICAS) or 0,
        memory=Memory(
            kv_cache_mib=_int(memory, "kvCacheMiB", "memory."),
            max_context_tokens=_int(memory, "maxContextTokens", "memory."),
            max_batch=_int(memory, "maxBatch", "memory."),
            activation_mib=_int(memory, "activationMiB", "memory."),
            overhead_mib=_int(memory, "overheadMiB", "memory."),
        ),
        offload=Offload(
            mode=str(offload.get("mode", "none")),
            device_budget_mib=_int(offload, "deviceBudgetMiB", "offload."),
            prefetch_depth=_int(offload, "prefetchDepth", "offload.", DEFAULT_PREFETCH_DEPTH)
            or DEFAULT_PREFETCH_DEPTH,
        ),
        runtime=Runtime(
            image=runtime.get("image"),
            port=_int(runtime, "port", "runtime.", DEFAULT_PORT) or DEFAULT_PORT,
            requests=_quantities(resources, "requests"),
            limits=_quantities(resources, "limits"),
            drain_seconds=_drain_seconds(runtime),
        ),
        placement=Placement(
            node_selector={str(k): str(v) for k, v in _section(placement, "nodeSelector").items()},
            tolerations=tolerations,
            spread_across_nodes=bool(placement.get("spreadAcrossNodes", False)),
        ),
        priority=_int(raw, "priority", "", DEFAULT_PRIORITY) or 0,
        rollout=Rollout(
            strategy=strategy,
            max_surge=_int_or_percent(rollout.get("maxSurge", DEFAULT_MAX_SURGE), "rollout.maxSurge"),
            max_unavailable=_int_or_percent(
                rollout.get("maxUnavailable", DEFAULT_MAX_UNAVAILABLE), "rollout.maxUnavailable"
            ),
        ),
        scaling=Scaling(
            min_replicas=_int(scaling, "minReplicas", "scaling.", DEFAULT_MIN_REPLICAS) or 0,
            idle_seconds=_int(scaling, "idleSeconds", "scaling.", DEFAULT_IDLE_SECONDS)
            or DEFAULT_IDLE_SECONDS,
            keep_warm=keep_warm,
        ),
        raw=raw,
    )
