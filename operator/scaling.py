"""Scale to zero and keep-warm decisions (issue 13), pure: observed models in, intents and status out.

**Idle.** A model with ``scaling.minReplicas: 0`` and replicas is idle once ``idleSeconds`` have
passed since the later of its last request (the gateway's ``vnpu.io/last-request`` annotation) and
``status.scaling.activeSince``: the moment the operator first saw its current generation, or later saw
the gateway's request counter (``vnpu.io/requests``) move, by the operator's own clock. The first
matters at a wake: the gateway scales a model to 1 the moment a request arrives, but flushes its
request counts every few seconds; without it the operator would see a model at 1 replica whose last
request is hours old and put it straight back to 0. The second makes a gateway whose clock runs behind
harmless: its last-request times look old, but its counter moves, and when it moved is the operator's
observation (client-go's leader election reads a Lease the same way: when the record last changed, by
the reader's clock, not the time written in it). A last request more than
:data:`vnpu.api.LAST_REQUEST_MAX_AHEAD_S` ahead of the operator's clock counts as none: written by a
gateway whose clock was ahead (or by hand), it would keep the model awake, holding its device memory,
until the clock reached it, and the gateway's replicas with a right clock never write over a later
time (they do over that one: :mod:`vnpu.gateway.activity`). The scale-down is a ``Scale`` update
carrying the resourceVersion the operator read, so a wake that lands in between makes it fail (409)
instead of undoing the wake.

**Warm.** While a model has 0 replicas its share group's weight-holders may stay: ``keepWarm:
Always`` keeps them, ``Never`` releases them, ``Auto`` keeps those the demand forecast
(:mod:`vnpu.operator.forecast`) ranks most likely to be asked for within a budget per node pool (a
fraction of the pool's device memory). Only a holder that already exists is kept; nothing is loaded
for a model nobody asked for. A group is warm-kept only while none of its models has replicas (with
replicas its holders are in the plan anyway). A waking model is offered its warm holder's device first,
so the first replica attaches to the held weights instead of loading them.

**Demand history** (``status.demand``) folds in the gateway's cumulative counter when it moved, or
every ``DEMAND_REFRESH_MIN`` minutes, so an idle model's status is not rewritten on every pass.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vnpu import api
from vnpu.api import KEEP_WARM_ALWAYS, KEEP_WARM_AUTO
from vnpu.operator import forecast
from vnpu.operator.state import ObservedModel

#: Minutes between demand-history updates of a model whose counter did not move.
DEMAND_REFRESH_MIN = 10.0
#: The forecast's horizon: "will it be asked for within this many minutes?"
WARM_HORIZON_MIN = 30.0
#: The pool of a node without the pool label.
DEFAULT_POOL = "default"


def minutes(t: dt.datetime) -> float:
    """Minutes since the epoch: the forecast's clock."""
    return t.timestamp() / 60.0


@dataclass(frozen=True)
class ScaleDown:
    """Set an idle model's replicas to 0 through its scale subresource (only at ``resource_version``)."""

    namespace: str
    name: str
    resource_version: str
    idle_seconds: float

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Activity:
    """Where a model stands on the idle clock after this pass."""

    #: when the operator first saw the model's current generation, or last saw its request counter move
    active_since: dt.datetime
    idle_for: float  #: seconds since the later of that and the last request
    due_in: float | None  #: seconds until it is scaled to 0 (None: it never is now; 0: now)


def activity(model: ObservedModel, now: dt.datetime) -> Activity:
    """The idle clock of ``model``: see the module docstring."""
    assert model.spec is not None
    scaling = model.status.get("scaling") or {}
    same_generation = scaling.get("generation") == model.generation
    since = api.parse_time(scaling.get("activeSince")) if same_generation else None
    since = min(since, now) if since else now
    if counter_moved(model):  # a request since the last pass, whatever the gateway's clock says
        since = now
    last = api.credible_last_request(model.last_request, now)  # (one far in the future: a wrong clock)
    latest = max(since, last) if last else since
    idle_for = max(0.0, (now - latest).total_seconds())
    spec = model.spec
    due_in = None
    if spec.scaling.min_replicas == 0 and spec.replicas > 0:
        due_in = max(0.0, spec.scaling.idle_seconds - idle_for)
    return Activity(since, idle_for, due_in)


def counter_moved(model: ObservedModel) -> bool:
    """Whether the gateway's request counter differs from the one :func:`demand` last folded into the
    status (which it does whenever it moved): requests came since the operator last looked."""
    if model.requests_total is None:
        return False
    return model.requests_total != forecast.DemandState.from_dict(model.status.get("demand")).total


def scale_down(model: ObservedModel, act: Activity) -> ScaleDown | None:
    if act.due_in != 0.0 or not model.resource_version:
        return None
    return ScaleDown(model.namespace, model.name, model.resource_version, act.idle_for)


def demand(model: ObservedModel, now: dt.datetime) -> forecast.DemandState:
    """The model's demand history with the gateway's counter folded in (when it moved, or when the
    last update is older than :data:`DEMAND_REFRESH_MIN`)."""
    state = forecast.DemandState.from_dict(model.status.get("demand"))
    total = model.requests_total or 0
    now_min = minutes(now)
    fresh = 0 <= now_min - state.updated_min < DEMAND_REFRESH_MIN  # (one in the future is not)
    if state.updated_min and total == state.total and fresh:
        return state
    return forecast.observe(state, now_min, total)


def scaling_status(act: Activity, generation: int, warm: bool | None) -> dict[str, Any]:
    out: dict[str, Any] = {"generation": generation, "activeSince": api.format_time(act.active_since)}
    if warm is not None:
        out["warm"] = warm
    return out


@dataclass(frozen=True)
class WarmGroup:
    """A share group whose models all have 0 replicas, and the one holder that would stay: a single
    copy of the weights is all a wake to one replica needs."""

    key: str  #: the planner's group key (namespace/group/weights id)
    models: tuple[ObservedModel, ...]
    pool: str  #: the node pool of that holder
    mib: int  #: the device memory it holds


def keep_warm(
    groups: Sequence[WarmGroup],
    budgets_mib: Mapping[str, int],
    demands: Mapping[str, forecast.DemandState],
    now: dt.datetime,
) -> frozenset[str]:
    """The groups whose holder stays. ``Always`` if any model of the group says so, never if all say
    ``Never``; otherwise (``Auto``) the forecast chooses within each pool's budget, after the
    ``Always`` groups' holders are counted against it."""
    kept: set[str] = set()
    auto: list[WarmGroup] = []
    spent: dict[str, int] = {}
    for g in groups:
        modes = {m.spec.scaling.keep_warm for m in g.models if m.spec is not None}
        if KEEP_WARM_ALWAYS in modes:
            kept.add(g.key)
            spent[g.pool] = spent.get(g.pool, 0) + g.mib
        elif KEEP_WARM_AUTO in modes:
            auto.append(g)
    now_min = minutes(now)
    for pool in sorted({g.pool for g in auto}):
        candidates = [
            forecast.WarmCandidate(
                g.key,
                g.mib,
                max(
                    forecast.request_probability(demands[model_key(m)], now_min, WARM_HORIZON_MIN)
                    for m in g.models
                    if m.spec is not None and m.spec.scaling.keep_warm == KEEP_WARM_AUTO
                ),
            )
            for g in auto
            if g.pool == pool
        ]
        kept |= forecast.choose_warm(candidates, max(0, budgets_mib.get(pool, 0) - spent.get(pool, 0)))
    return frozenset(kept)


def pool_budgets(
    pools_of_nodes: Mapping[str, str], device_mib_of_nodes: Mapping[str, int], fraction: float
) -> dict[str, int]:
    """Each pool's warm budget: ``fraction`` of the device memory of its nodes."""
    totals: dict[str, int] = {}
    for node, pool in pools_of_nodes.items():
        totals[pool] = totals.get(pool, 0) + device_mib_of_nodes.get(node, 0)
    return {pool: int(total * fraction) for pool, total in totals.items()}


def model_key(m: ObservedModel) -> str:
    return f"{m.namespace}/{m.name}"
