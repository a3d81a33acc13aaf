"""The keep-warm forecast: demand history from the gateway's counter, predicted request probability,
and the budgeted choice of holders to keep."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from vnpu.operator.forecast import (
    HOURS,
    DemandState,
    WarmCandidate,
    choose_warm,
    hour_of,
    observe,
    predicted_rate,
    request_probability,
)

DAY = 24 * 60


def test_the_first_observation_is_a_baseline_then_counts_become_a_rate() -> None:
    s = observe(DemandState(), 1000.0, 50)
    assert (s.total, s.rate, s.observed_min) == (50, 0.0, 0.0)
    s = observe(s, 1010.0, 70)  # 20 requests in 10 minutes
    assert s.total == 70 and 0 < s.rate < 2.0 and s.observed_min == 10.0
    quiet = s
    for minute in range(1020, 1200, 10):  # three quiet hours: the recent rate cools down
        quiet = observe(quiet, float(minute), 70)
    assert quiet.rate < s.rate / 40


def test_a_counter_reset_counts_from_zero() -> None:
    s = observe(observe(DemandState(), 100.0, 500), 110.0, 4)
    assert s.total == 4 and s.rate > 0


def test_a_history_written_under_a_clock_that_ran_ahead_goes_on_from_now() -> None:
    """One pass under a clock a year ahead wrote updatedMinute in the future: from the next pass on
    the counts are folded in again (the history would otherwise freeze until that minute came)."""
    busy = observe(observe(DemandState(), 1000.0, 0), 1010.0, 200)
    ahead = observe(busy, 1010.0 + 365 * DAY, 300)
    s = observe(ahead, 1020.0, 300)  # the clock is right again
    assert (s.updated_min, s.total) == (1020.0, 300)
    quiet = s
    for minute in range(1030, 1400, 10):  # six quiet hours: the rate cools down again
        quiet = observe(quiet, float(minute), 300)
    assert quiet.rate < busy.rate / 40


def test_a_daily_habit_is_learned_and_warms_before_the_hour() -> None:
    s = observe(DemandState(), 1.0, 0)
    total = 0
    for day in range(3):  # requests every minute from 09:00 to 10:00, nothing else
        for minute in range(day * DAY + 1, (day + 1) * DAY + 1, 5):
            if hour_of(minute) == 9:
                total += 5
            s = observe(s, float(minute + 5), total)
    morning_eve = 3 * DAY + 8 * 60 + 50  # 08:50 on the fourth day, after a quiet night
    assert s.rate < 0.01
    assert predicted_rate(s, morning_eve, 20) > 0.5  # the 09:00 bucket
    assert request_probability(s, morning_eve, 20) > 0.99
    assert request_probability(s, 3 * DAY + 20 * 60, 20) < 0.05  # 20:00: nothing expected


def test_status_round_trip_and_garbage_starts_fresh() -> None:
    s = observe(observe(DemandState(), 10.0, 0), 70.0, 30)
    assert DemandState.from_dict(s.to_dict()).total == 30
    again = DemandState.from_dict(s.to_dict())
    assert math.isclose(again.rate, s.rate, rel_tol=1e-4) and len(again.hourly) == HOURS
    for garbage in (None, {}, {"rate": "fast"}, {"hourly": [1, 2]}, {"total": []}):
        parsed = DemandState.from_dict(garbage)
        assert parsed.rate >= 0 and len(parsed.hourly) == HOURS


def test_choose_warm_fills_the_budget_by_probability_per_mib() -> None:
    c = [
        WarmCandidate("big-likely", 8000, 0.9),
        WarmCandidate("small-likely", 500, 0.8),
        WarmCandidate("small-unlikely", 500, 0.1),
        WarmCandidate("never", 100, 0.0),
    ]
    assert choose_warm(c, 1000) == {"small-likely", "small-unlikely"}
    assert choose_warm(c, 9000) == {"small-likely", "big-likely", "small-unlikely"}
    assert choose_warm(c, 0) == frozenset()


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=0, max_size=20),
    probabilities=st.lists(st.floats(0, 1), min_size=20, max_size=20),
    budget=st.integers(0, 30000),
)
def test_choose_warm_never_exceeds_the_budget_and_is_deterministic(sizes, probabilities, budget) -> None:
    candidates = [
        WarmCandidate(f"m{i}", s, p) for i, (s, p) in enumerate(zip(sizes, probabilities, strict=False))
    ]
    chosen = choose_warm(candidates, budget)
    assert sum(c.weights_mib for c in candidates if c.key in chosen) <= budget
    assert chosen == choose_warm(list(reversed(candidates)), budget)
    assert all(c.probability > 0 for c in candidates if c.key in chosen)
