"""Which idle models to keep warm: a small demand forecast per model, and a budgeted choice. Pure.

A model scaled to zero wakes in a fraction of a second when its weight-holder still holds the weights
(an attach) and in many seconds when they must be loaded again. Holding weights costs device memory,
so with ``keepWarm: Auto`` the operator keeps the holders of the models most likely to be asked for
soon, within a memory budget per node pool, and releases the rest.

The forecast is deliberately simple, two signals a person can check by looking at a model's traffic:

* **recent rate**: an exponentially weighted moving average of requests per minute (half-life
  ``HALF_LIFE_MIN``): a model in use stays warm, one forgotten for hours cools down;
* **time of day**: 24 hourly buckets, each the EWMA of the rate seen in that hour on past days
  (``DAY_WEIGHT`` per day): a model used every morning is warmed before the morning.

The predicted rate for the next ``horizon`` minutes is the larger of the recent rate and the rate of
the hour the horizon falls in (once a day of history exists): warming on either signal costs a little
memory, missing one costs a cold start. The probability of at least one request in the horizon is
``1 - exp(-rate * horizon)`` (Poisson arrivals). :func:`choose_warm` keeps models by that probability
per MiB of weights until the budget is spent (a cold start costs roughly in proportion to the weights
to load, so probability per MiB is cold-start time saved per MiB held).

Counts come from the gateway's cumulative ``vnpu.io/requests`` annotation; the state lives in the
model's status so an operator restart loses nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

HALF_LIFE_MIN = 30.0
DAY_WEIGHT = 0.5  #: weight of the newest day in an hourly bucket
MINUTES_PER_HOUR = 60
HOURS = 24


@dataclass(frozen=True)
class DemandState:
    """A model's demand history, as kept in its status (``status.demand``)."""

    updated_min: float = 0.0  #: minutes since the epoch of the last update
    total: int = 0  #: the gateway's cumulative request counter at that update
    rate: float = 0.0  #: EWMA of requests per minute
    hourly: tuple[float, ...] = field(default_factory=lambda: (0.0,) * HOURS)  #: requests/min by hour
    observed_min: float = 0.0  #: minutes of history behind the hourly buckets

    def to_dict(self) -> dict[str, Any]:
        return {
            "updatedMinute": round(self.updated_min, 3),
            "total": self.total,
            "rate": round(self.rate, 6),
            "hourly": [round(h, 6) for h in self.hourly],
            "observedMinutes": round(self.observed_min, 1),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DemandState:
        """Parse a status entry; anything malformed starts a fresh history (never an error)."""
        if not data:
            return cls()
        try:
            hourly = tuple(float(h) for h in data.get("hourly", ()))
            if len(hourly) != HOURS:
                hourly = (0.0,) * HOURS
            return cls(
                updated_min=float(data.get("updatedMinute", 0.0)),
                total=int(data.get("total", 0)),
                rate=max(0.0, float(data.get("rate", 0.0))),
                hourly=tuple(max(0.0, h) for h in hourly),
                observed_min=max(0.0, float(data.get("observedMinutes", 0.0))),
            )
        except (TypeError, ValueError):
            return cls()


def hour_of(minute: float) -> int:
    return int(minute // MINUTES_PER_HOUR) % HOURS


def observe(state: DemandState, now_min: float, total: int) -> DemandState:
    """Fold the requests counted since the last update (the counter went from ``state.total`` to
    ``total``) into the history. A counter that went backwards (reset) counts from zero."""
    if state.updated_min == 0.0:  # the first observation only sets the baseline
        return replace(state, updated_min=now_min, total=total)
    elapsed = now_min - state.updated_min
    if elapsed < 0:  # written under a clock that ran ahead: start counting again from now, or the
        return replace(state, updated_min=now_min, total=total)  # history would freeze until then
    if elapsed == 0:
        return state
    added = total - state.total if total >= state.total else total
    rate_now = added / elapsed
    decay = 0.5 ** (elapsed / HALF_LIFE_MIN)
    rate = decay * state.rate + (1 - decay) * rate_now
    # The hour this interval belongs to learns at DAY_WEIGHT per day of observation.
    hour = hour_of(now_min - elapsed / 2)
    alpha = 1 - (1 - DAY_WEIGHT) ** (elapsed / MINUTES_PER_HOUR)
    hourly = list(state.hourly)
    hourly[hour] = (1 - alpha) * hourly[hour] + alpha * rate_now
    return DemandState(now_min, total, rate, tuple(hourly), state.observed_min + elapsed)


def predicted_rate(state: DemandState, now_min: float, horizon_min: float) -> float:
    """Requests per minute expected over the next ``horizon_min`` minutes."""
    if state.observed_min < HOURS * MINUTES_PER_HOUR:
        return state.rate  # no full day yet: the hourly buckets would mislead
    hour = hour_of(now_min + horizon_min / 2)
    return max(state.rate, state.hourly[hour])


def request_probability(state: DemandState, now_min: float, horizon_min: float) -> float:
    """Probability of at least one request in the next ``horizon_min`` minutes (Poisson)."""
    return 1.0 - math.exp(-predicted_rate(state, now_min, horizon_min) * horizon_min)


@dataclass(frozen=True)
class WarmCandidate:
    key: str  #: the model (namespace/name)
    weights_mib: int  #: what keeping its holder(s) warm costs in device memory
    probability: float  #: of a request within the horizon


def choose_warm(candidates: Sequence[WarmCandidate], budget_mib: int) -> frozenset[str]:
    """The models to keep warm within ``budget_mib``: highest probability per MiB first (ties by the
    smaller model, then the key, so the choice is deterministic); a model that does not fit is
    skipped for smaller ones that do. Models with no chance of a request are never kept."""
    ranked = sorted(
        (c for c in candidates if c.probability > 0 and c.weights_mib >= 0),
        key=lambda c: (-c.probability / max(c.weights_mib, 1), c.weights_mib, c.key),
    )
    chosen, spent = [], 0
    for c in ranked:
        if spent + c.weights_mib <= budget_mib:
            chosen.append(c.key)
            spent += c.weights_mib
    return frozenset(chosen)
