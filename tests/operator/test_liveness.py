"""The operator's liveness (Reconciler.health, kopf's probe) on an injected clock: a pass longer than the
limit that keeps getting answers from the API server is working and stays healthy; one that gets no
answer for the limit is stuck, and the message says for how long and on what. No sleeps: the fake API
moves the clock as its calls "take" time, and the probe is asked from inside the calls."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from vnpu.operator import metrics, reconciler
from vnpu.operator.config import OperatorConfig
from vnpu.operator.planner import LabelsUpdate, Plan
from vnpu.operator.reconciler import MIN_UNHEALTHY_SECONDS, UNHEALTHY_AFTER_RESYNCS, Reconciler, Unhealthy


@pytest.fixture(autouse=True)
def no_model_series_left() -> Iterator[None]:
    yield
    metrics.forget_models(set())


@pytest.fixture(autouse=True)
def one_call_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass's calls one after the other, so the clock each sees is the test's to say."""
    monkeypatch.setattr(reconciler, "API_CONCURRENCY", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class StaleInformer:
    def __init__(self, name: str, stale: float) -> None:
        self.name, self.stale = name, stale

    def stale_for(self) -> float:
        return self.stale


class EmptyCache:
    """The informers' caches of a cluster with nothing in it: the plan comes from the test."""

    def __init__(self, *informers: StaleInformer) -> None:
        self.informers = list(informers)

    def stale_for(self) -> float:
        return max((i.stale_for() for i in self.informers), default=0.0)

    def snapshot(self) -> tuple[list[Any], list[Any], list[Any]]:
        return [], [], []

    def services_snapshot(self) -> list[Any]:
        return []

    def budgets_snapshot(self) -> list[Any]:
        return []


class SlowKube:
    """Each label write takes ``seconds[i]`` on the clock before it is answered; ``refuse``: the names
    the server refuses (an answer too). The probe is asked while each call is in flight, after its time
    has passed and before its answer."""

    api_client = None

    def __init__(self, clock: Clock, seconds: list[float], refuse: frozenset[str] = frozenset()) -> None:
        self.clock = clock
        self.seconds = list(seconds)
        self.refuse = refuse
        self.rec: Reconciler | None = None
        self.probes: list[dict[str, Any] | Unhealthy] = []

    def list_secrets(self) -> list[Any]:
        return []

    def set_pod_labels(self, namespace: str, name: str, labels: Any) -> None:
        self.clock.advance(self.seconds.pop(0))
        assert self.rec is not None
        try:
            self.probes.append(self.rec.health())
        except Unhealthy as exc:
            self.probes.append(exc)
        if name in self.refuse:
            exc = ApiException(status=403, reason="Forbidden")
            exc.body = json.dumps({"reason": "Forbidden", "message": "labels are not yours"})
            raise exc


def labelling(count: int) -> Plan:
    return Plan(set_labels=[LabelsUpdate("ns", f"p{i}", {"x": "y"}, (f"ns/m{i}",)) for i in range(count)])


def reconciler_on(
    clock: Clock, kube: SlowKube, monkeypatch: pytest.MonkeyPatch, resync: float
) -> tuple[Reconciler, Callable[[Plan], None]]:
    """A reconciler whose loop started at the clock's now, and a function running one pass of a plan."""
    rec = Reconciler(OperatorConfig(placeholders=False, resync_seconds=resync), kube=kube, clock=clock)
    kube.rec = rec
    rec._cache = EmptyCache()
    rec._loop_started = clock()

    def run_pass(plan: Plan) -> None:
        monkeypatch.setattr(reconciler, "plan", lambda *args, **kwargs: plan)
        asyncio.run(rec._pass())

    return rec, run_pass


def test_the_limit_has_a_floor_whatever_the_resync_period() -> None:
    clock = Clock()
    kube = SlowKube(clock, [])
    short = Reconciler(OperatorConfig(resync_seconds=1), kube=kube, clock=clock)
    assert short.unhealthy_after == MIN_UNHEALTHY_SECONDS >= 60
    long = Reconciler(OperatorConfig(resync_seconds=100), kube=kube, clock=clock)
    assert long.unhealthy_after == UNHEALTHY_AFTER_RESYNCS * 100
    # resyncSeconds 1, idle between passes for longer than three periods: not a reason to restart.
    short._loop_started = clock()
    clock.advance(UNHEALTHY_AFTER_RESYNCS * 1 + 30)
    assert short.health()["passes"] == 0
    clock.advance(MIN_UNHEALTHY_SECONDS)
    with pytest.raises(Unhealthy) as caught:
        short.health()
    message = str(caught.value)
    assert message.startswith("no reconcile pass went through for 153s and none is running")
    assert f"limit {MIN_UNHEALTHY_SECONDS:g}s: 3 resync periods of 1s, at least 120s" in message


def test_a_pass_longer_than_the_limit_that_keeps_getting_answers_stays_healthy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    # Ten writes, each answered after 50 s (one of them refused: an answer all the same): a 500 s pass,
    # past the limit four times over, with the API server never silent for the limit.
    kube = SlowKube(clock, [50.0] * 10, refuse=frozenset({"p3"}))
    rec, run_pass = reconciler_on(clock, kube, monkeypatch, resync=1)
    run_pass(Plan())
    first_ok = clock()
    run_pass(labelling(10))
    assert clock() - first_ok == 500 > 4 * rec.unhealthy_after
    assert not [p for p in kube.probes if isinstance(p, Unhealthy)], kube.probes
    last = kube.probes[-1]
    assert isinstance(last, dict)
    assert last["pass_in_flight_s"] == 500 and last["pass_doing"] == "writing the plan"
    assert last["pass_calls_answered"] == 9 and last["last_ok_age_s"] == 500
    assert rec.health()["passes"] == 2 and rec.health()["pass_in_flight_s"] is None


def test_a_pass_without_an_answer_for_the_limit_is_unhealthy_and_says_on_what(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    limit = MIN_UNHEALTHY_SECONDS
    # Two writes answered quickly, then one that takes longer than the limit.
    kube = SlowKube(clock, [5.0, 5.0, limit + 30])
    rec, run_pass = reconciler_on(clock, kube, monkeypatch, resync=10)
    run_pass(Plan())
    run_pass(labelling(3))
    healthy, _, stuck = kube.probes
    assert isinstance(healthy, dict)
    assert isinstance(stuck, Unhealthy)
    message = str(stuck)
    assert message.startswith("no reconcile pass went through for 160s, and the pass in flight (started 160s")
    assert "writing the plan; 2 API calls answered, the last 150s ago: labelling pod p1" in message
    assert f"has made no progress for 150s (limit {limit:g}s: 3 resync periods of 10s, at least" in message
    assert "waiting 150s for the API server on: labelling pod p2; last error: none" in message
    # The call answered, the pass went through: healthy again.
    assert rec.health()["last_ok_age_s"] == 0


def test_a_failed_pass_leaves_no_progress_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The answers of a pass that failed do not keep the loop alive: the next pass starts over."""
    clock = Clock()
    kube = SlowKube(clock, [60.0, 60.0])
    rec, run_pass = reconciler_on(clock, kube, monkeypatch, resync=10)
    run_pass(Plan())
    monkeypatch.setattr(reconciler, "restatus", lambda *args: 1 / 0)  # fails after its writes
    with pytest.raises(ZeroDivisionError):
        run_pass(labelling(2))
    assert all(isinstance(p, dict) for p in kube.probes)
    assert clock() - 1000 == MIN_UNHEALTHY_SECONDS  # the last pass that went through ended at 1000
    clock.advance(1)
    with pytest.raises(Unhealthy, match="went through for 121s and none is running"):
        rec.health()


def test_passes_on_a_store_that_stopped_hearing_from_the_api_server_are_unhealthy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Passes go through, but the pods informer's LIST has been refused for longer than the limit: they
    plan from an old view of the cluster, and nothing said so. A restart starts every informer over."""
    clock = Clock()
    rec, run_pass = reconciler_on(clock, SlowKube(clock, []), monkeypatch, resync=10)
    run_pass(Plan())
    rec._cache = EmptyCache(StaleInformer("nodes", 0.0), StaleInformer("pods", MIN_UNHEALTHY_SECONDS - 1))
    assert isinstance(rec.health(), dict)  # a LIST failing for a while: its backoff, not a restart
    rec._cache.informers[1].stale = MIN_UNHEALTHY_SECONDS + 5
    with pytest.raises(Unhealthy, match=r"the pods informer has not heard from the API server for 125s"):
        rec.health()
