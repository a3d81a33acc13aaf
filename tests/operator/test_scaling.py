"""Scale to zero, keep-warm and wake in the planner (pure; the API-server side is
tests/integration/test_scale_to_zero.py)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

import pytest
from test_planner import NOW, as_pods, estimate, model, node, run, step

from vnpu import api
from vnpu.memory import EstimateError, EstimatePending
from vnpu.operator import forecast, planner, scaling
from vnpu.operator.packing import Taint
from vnpu.operator.pods import SAFE_TO_EVICT
from vnpu.operator.state import ObservedModel, parse_model

MINUTE = dt.timedelta(minutes=1)


def idle_model(
    name: str = "a",
    replicas: int = 1,
    keep_warm: str = "Always",
    last_request: dt.datetime | None = None,
    active_since: dt.datetime | None = None,
    generation: int = 1,
    **spec: Any,
) -> ObservedModel:
    m = model(name, replicas, scaling={"minReplicas": 0, "idleSeconds": 300, "keepWarm": keep_warm}, **spec)
    status = {}
    if active_since is not None:
        status["scaling"] = {
            "generation": generation,
            "activeSince": active_since.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    return replace(m, generation=generation, status=status, resource_version="41", last_request=last_request)


def test_an_idle_model_is_scaled_to_zero_at_the_version_read() -> None:
    m = idle_model(last_request=NOW - 10 * MINUTE, active_since=NOW - 60 * MINUTE)
    result = run([m], [node("n1")])
    (down,) = result.scale_down
    assert (down.namespace, down.name, down.resource_version) == ("ns", "a", "41")
    assert down.idle_seconds == 600


def test_a_recent_request_keeps_it_and_the_pass_comes_back_when_it_is_due() -> None:
    m = idle_model(last_request=NOW - 2 * MINUTE, active_since=NOW - 60 * MINUTE)
    result = run([m], [node("n1")])
    assert result.scale_down == []
    assert result.requeue_after == 180


def test_a_model_just_woken_is_not_put_back_to_zero_before_the_gateway_reports_its_request() -> None:
    """The gateway scaled it to 1 (a new generation) but its request counts arrive seconds later: the
    old last-request must not send it straight back to 0."""
    m = idle_model(last_request=NOW - 60 * MINUTE, active_since=NOW - 60 * MINUTE, generation=2)
    woken = replace(m, status={"scaling": {"generation": 1, "activeSince": "2026-11-25T10:00:00Z"}})
    result = run([woken], [node("n1")])
    assert result.scale_down == []
    scaling = result.statuses[0].status["scaling"]
    assert scaling == {"generation": 2, "activeSince": "2026-11-25T12:00:00Z"}  # the clock restarts now


def test_min_replicas_one_never_scales_to_zero() -> None:
    m = replace(model("a", 1), last_request=NOW - 1000 * MINUTE, resource_version="3")
    assert run([m], [node("n1")]).scale_down == []


def test_a_last_request_far_in_the_future_counts_as_none() -> None:
    """A gateway replica whose clock ran a year ahead wrote vnpu.io/last-request once: the idle clock
    read it as the latest request (idle for 0 s, due in 300 s) on every pass until the wall clock
    reached it, and the model held its device memory for that year. Now a time further ahead than the
    allowed skew counts as no request at all: the model is idle since it was woken (activeSince)."""
    a_year_ahead = NOW + dt.timedelta(days=365)
    m = idle_model(last_request=a_year_ahead, active_since=NOW - 60 * MINUTE)
    (down,) = run([m], [node("n1")]).scale_down
    assert (down.name, down.idle_seconds) == ("a", 3600)
    # Within the skew (two nodes' clocks apart by seconds) it is a request just now: the model stays.
    skew = dt.timedelta(seconds=api.LAST_REQUEST_MAX_AHEAD_S)
    close = idle_model(last_request=NOW + skew, active_since=NOW - 60 * MINUTE)
    result = run([close], [node("n1")])
    assert result.scale_down == [] and result.requeue_after == 300


def test_garbled_activity_annotations_are_ignored() -> None:
    obj = {
        "metadata": {
            "name": "a",
            "namespace": "ns",
            "uid": "u",
            "resourceVersion": "9",
            "annotations": {api.ANNOTATION_REQUESTS: "-3", api.ANNOTATION_LAST_REQUEST: "yesterday"},
        },
        "spec": {"source": {"uri": "file:///m.gguf"}, "memory": {"kvCacheMiB": 1}},
    }
    m = parse_model(obj)
    assert (m.requests_total, m.last_request, m.resource_version) == (None, None, "9")


def _running(m: ObservedModel, nodes: list[Any], others: tuple[ObservedModel, ...] = ()) -> list[Any]:
    return as_pods(run([m, *others], nodes).create)


def test_keep_warm_always_keeps_the_holder_and_frees_only_the_replicas() -> None:
    nodes = [node("n1")]
    pods = _running(idle_model(replicas=2, keep_warm="Always"), nodes)
    at_zero = idle_model(replicas=0, keep_warm="Always")
    result = run([at_zero], nodes, pods)
    assert sorted(d.role for d in result.delete) == ["replica", "replica"]
    assert result.create == []
    status = result.statuses[0].status
    assert status["phase"] == "Idle" and status["scaling"]["warm"] is True
    assert result.warm_holders == {"default": 1}
    # The held weights are memory the packer hands to nobody, except replicas that would otherwise
    # wait (test_a_warm_holder_gives_its_room_to_replicas_that_would_wait).
    big = model("big", 1, shareGroup="big", source={"uri": "file:///big.gguf"})
    holder = [p for p in pods if p.role == "weights"]
    crowded = run([at_zero, big], [node("n1", devices=1)], holder, estimates={
        at_zero.key: estimate(), big.key: estimate(weights=12 * 1024, per_replica=1024),
    })  # fmt: skip
    assert crowded.statuses[1].status["phase"] == "Running"
    assert [d.reason for d in crowded.delete] == [planner.WARM_RECLAIMED]


def test_a_warm_holder_leaves_its_node_to_the_cluster_autoscaler_and_its_budget() -> None:
    """Every holder said safe-to-evict "false", fixed at creation: a warm holder of a model at zero
    (kept for good with Always) made its node one the autoscaler never removes. A holder says "true"
    (else its scratch emptyDir and its custom controller block scale-down alike) and its budget decides,
    as the autoscaler honours it: no eviction while a replica maps it, any once none does."""
    nodes = [node("n1")]
    created = run([idle_model(replicas=1)], nodes).create
    (holder,) = [p for p in created if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_WEIGHTS]
    assert holder["metadata"]["annotations"][SAFE_TO_EVICT] == "true"
    assert {"name": "scratch", "emptyDir": {}} in holder["spec"]["volumes"]  # local storage to the autoscaler
    (in_use,) = run([idle_model(replicas=1)], nodes, as_pods(created)).holder_budgets
    assert in_use.spec()["minAvailable"] == 1
    holders = [p for p in as_pods(created) if p.role == api.ROLE_WEIGHTS]
    at_zero = run([idle_model(replicas=0)], nodes, holders)
    (warm,) = at_zero.holder_budgets
    assert at_zero.warm_holders == {"default": 1} and warm.spec()["minAvailable"] == 0


def test_keep_warm_never_releases_the_holder_too() -> None:
    nodes = [node("n1")]
    pods = _running(model("a", 1), nodes)
    result = run([idle_model(replicas=0, keep_warm="Never")], nodes, pods)
    assert sorted(d.role for d in result.delete) == ["replica", "weights"]
    assert result.statuses[0].status["scaling"]["warm"] is False


def test_keep_warm_auto_keeps_the_likeliest_within_the_pool_budget() -> None:
    """Two groups at zero, room in the budget for one holder: the one with traffic stays."""
    nodes = [node("n1", devices=2)]  # 32 GiB; 20% = 6.4 GiB: one 4 GiB holder
    busy_spec = {"shareGroup": "busy", "source": {"uri": "file:///busy.gguf"}}
    quiet_spec = {"shareGroup": "quiet", "source": {"uri": "file:///quiet.gguf"}}
    running = [idle_model("busy", 1, "Auto", **busy_spec), idle_model("quiet", 1, "Auto", **quiet_spec)]
    pods = as_pods(run(running, nodes).create)
    history = forecast.DemandState(updated_min=NOW.timestamp() / 60 - 5, total=100, rate=2.0)
    busy = replace(idle_model("busy", 0, "Auto", **busy_spec), status={"demand": history.to_dict()})
    busy = replace(busy, requests_total=110)
    quiet = idle_model("quiet", 0, "Auto", **quiet_spec)
    result = run([busy, quiet], nodes, pods)
    group_of = {p.name: p.share_group for p in pods}
    deleted = {(d.role, group_of[d.name]) for d in result.delete}
    assert deleted == {("replica", "busy"), ("replica", "quiet"), ("weights", "quiet")}
    by_model = {s.model.name: s.status for s in result.statuses}
    assert by_model["busy"]["scaling"]["warm"] is True and by_model["quiet"]["scaling"]["warm"] is False
    assert by_model["busy"]["demand"]["total"] == 110  # the gateway's counter folded into the history


def test_a_waking_model_is_placed_on_its_warm_holders_device_and_attaches() -> None:
    """The holder sits on the node's second device; without the wake preference a fresh pack of one
    replica on an empty node would open the first device and load the weights again."""
    nodes = [node("n1", devices=2)]
    filler = model("filler", 1, shareGroup="filler", source={"uri": "file:///filler.gguf"})
    estimates = {("ns", "a"): estimate(), filler.key: estimate(weights=12 * 1024, per_replica=1024)}
    first = run([idle_model(replicas=1), filler], nodes, estimates=estimates)
    pods = as_pods(first.create)
    (holder,) = [p for p in pods if p.role == "weights" and p.model is None and p.share_group != "filler"]
    assert holder.device == "n1-npu1"
    # a goes to zero (warm), the filler goes away.
    pods = [p for p in pods if p.role == "weights" and p.name == holder.name]
    woken = idle_model(replicas=1, keep_warm="Always", generation=3)
    result = run([woken], nodes, pods)
    assert [p["metadata"]["labels"][api.LABEL_ROLE] for p in result.create] == ["replica"]
    replica = result.create[0]
    assert replica["metadata"]["annotations"][api.ANNOTATION_DEVICE] == "n1-npu1"
    assert replica["metadata"]["annotations"]["vnpu.io/weight-holder"] == holder.name
    assert result.delete == []


@pytest.mark.parametrize(
    "hold_off",
    [{"unschedulable": True}, {"taints": [{"key": "maint", "value": "1", "effect": "NoSchedule"}]}],
    ids=["cordoned", "NoSchedule"],
)
def test_a_wake_never_pins_its_replica_to_a_node_new_pods_may_not_use(hold_off: dict[str, Any]) -> None:
    """The warm holder sits on n1, which is then cordoned (a drain under way) or tainted NoSchedule.
    The woken replica is a new pod: offered n1, it would stay Pending there (the scheduler refuses the
    node) and its holder's budget would hold the drain for ever. It goes to n2, as a fresh placement
    would."""
    first = run([idle_model(replicas=1)], [node("n1", devices=1)])
    holders = [p for p in as_pods(first.create) if p.role == api.ROLE_WEIGHTS]
    assert [h.node for h in holders] == ["n1"]
    n1 = node("n1", devices=1)
    n1 = replace(n1, schedulable=not hold_off.get("unschedulable"), taints=tuple(
        Taint(t["key"], t["value"], t["effect"]) for t in hold_off.get("taints", ())
    ))  # fmt: skip
    woken = run([idle_model(replicas=1, generation=3)], [n1, node("n2", devices=1)], holders)
    replicas = [c for c in woken.create if c["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_REPLICA]
    assert [r["metadata"]["annotations"][api.ANNOTATION_DEVICE] for r in replicas] == ["n2-npu0"]
    assert [p["node"] for p in woken.statuses[0].status["placements"]] == ["n2"]


def test_a_wake_never_takes_the_room_of_a_running_replica() -> None:
    """``a`` wakes on a full device: its warm holder's device is offered to its first replica only
    after every running replica is kept, so ``b`` (the same priority, sorting after ``a``) keeps all
    of its Ready replicas, and ``a`` waits for capacity (a placeholder)."""
    nodes = [node("n1", devices=1)]  # 16 slices
    b = model("b", 8, shareGroup="gb")
    estimates = {("ns", "a"): estimate(), b.key: estimate()}
    pods = as_pods(
        run([idle_model(replicas=1), model("b", 7, shareGroup="gb")], nodes, estimates=estimates).create
    )
    asleep = run([idle_model(replicas=0), b], nodes, pods, estimates=estimates)  # a to zero, b grows
    assert [d.role for d in asleep.delete] == ["replica"]
    pods = [replace(p, ready=True) for p in step(pods, asleep)]
    assert sum(p.slices for p in pods) == 16  # a's warm holder 4, b's 4 + 8
    (holder,) = [p.name for p in pods if p.role == "weights" and p.share_group != "gb"]
    b_pods = sorted(p.name for p in pods if p.name != holder)
    woken = idle_model(replicas=1, generation=3)
    for i in range(3):
        result = run([woken, b], nodes, pods, estimates=estimates)
        created = [c["metadata"]["name"] for c in result.create]
        # The first pass: a placeholder for a, and a's holder goes (nothing of a fits on n1).
        assert [n.rsplit("-", 1)[0] for n in created] == (["a-pending-0"] if i == 0 else [])
        assert [d.name for d in result.delete] == ([holder] if i == 0 else [])
        by_model = {s.model.name: s.status for s in result.statuses}
        assert by_model["b"]["readyReplicas"] == 8 and by_model["a"]["phase"] == "CapacityPending"
        pods = step(pods, result)
    assert sorted(p.name for p in pods if p.role != "placeholder") == b_pods


def test_an_idle_models_history_written_under_a_clock_that_ran_ahead_cools_down() -> None:
    """No request since a pass under a clock a year ahead wrote its history: the rate still decays
    (the history was kept as fresh, unobserved, until that minute came)."""
    from vnpu.operator.scaling import demand, minutes

    m = replace(model("a", 0, scaling={"minReplicas": 0, "keepWarm": "Auto"}), requests_total=1000)
    ahead = forecast.DemandState(updated_min=minutes(NOW) + 365 * 24 * 60, total=1000, rate=50.0)
    status = {"demand": ahead.to_dict()}
    for hours in (0, 6):
        state = demand(replace(m, status=status), NOW + dt.timedelta(hours=hours))
        status = {"demand": state.to_dict()}
    assert state.rate < 1.0


@pytest.mark.parametrize(
    "unsized",
    [EstimatePending(reading=True), EstimateError("reading hf://org/m: [Errno 5] Input/output error")],
    ids=["pending", "error"],
)
def test_a_model_with_no_estimate_keeps_its_warm_holder_and_its_history(unsized: object) -> None:
    """A pass with no estimate for a model at zero replicas (its files re-read after an operator
    restart, or a read that failed for a moment) keeps what the model had: its warm holder (else
    deleted as "no longer in the plan", its weights loaded again at the next wake), its idle clock
    and a day of request history in status (else erased by the status patch). A status edited into
    something that is not an object is dropped, never a failed pass."""
    from vnpu.operator.scaling import minutes

    nodes = [node("n1")]
    (holder,) = [
        p for p in as_pods(run([idle_model(replicas=1)], nodes).create) if p.role == api.ROLE_WEIGHTS
    ]
    history = forecast.DemandState(updated_min=minutes(NOW) - 5, total=12345, rate=3.5).to_dict()
    clock = {"generation": 1, "activeSince": "2026-11-25T09:00:00Z", "warm": True}
    asleep = replace(idle_model(replicas=0), status={"scaling": clock, "demand": history})
    result = run([asleep], nodes, [holder], estimates={asleep.key: unsized})
    assert result.delete == [] and result.create == []
    status = result.statuses[0].status
    assert status["scaling"] == clock and status["demand"] == history
    garbled = replace(asleep, status={"scaling": "warm", "demand": [1, 2]})
    status = run([garbled], nodes, [holder], estimates={asleep.key: unsized}).statuses[0].status
    assert status.get("scaling") is None and status.get("demand") is None  # (removed)


def test_a_warm_holder_gives_its_room_to_replicas_that_would_wait() -> None:
    """A warm copy is speculative: another tenant's model that fits only in its room takes it (the
    holder is deleted, the replica placed on its device), where before it stayed CapacityPending
    behind a model at zero replicas that held memory more firmly than a running one. A warm holder
    whose room nobody needs stays."""
    nodes = [node("n1", devices=1)]  # one 16 GiB device
    est = {("ns", "a"): estimate(weights=12 * 1024), ("other", "b"): estimate(weights=8 * 1024)}
    b = model("b", 1, ns="other", shareGroup="gb")
    (holder,) = [p for p in as_pods(run([idle_model(replicas=1)], nodes, estimates=est).create)
                 if p.role == api.ROLE_WEIGHTS]  # fmt: skip
    asleep = idle_model(replicas=0)  # keepWarm Always: beyond any budget, yet not beyond real demand
    result = run([asleep, b], nodes, [holder], estimates=est)
    assert [(d.name, d.reason) for d in result.delete] == [(holder.name, planner.WARM_RECLAIMED)]
    created = [(c["metadata"]["namespace"], c["metadata"]["labels"][api.LABEL_ROLE]) for c in result.create]
    assert sorted(created) == [("other", "replica"), ("other", "weights")]
    status = {u.model.name: u.status for u in result.statuses}
    assert status["b"]["phase"] != "CapacityPending" and status["a"]["scaling"]["warm"] is False
    assert result.warm_holders == {}
    # Room for both: the warm holder stays.
    roomy = [node("n1", devices=2)]
    (holder,) = [p for p in as_pods(run([idle_model(replicas=1)], roomy, estimates=est).create)
                 if p.role == api.ROLE_WEIGHTS]  # fmt: skip
    result = run([asleep, b], roomy, [holder], estimates=est)
    assert result.delete == [] and result.warm_holders == {"default": 1}


def test_a_gateway_clock_running_behind_never_makes_a_busy_model_idle() -> None:
    """A gateway whose clock is an hour behind writes last-request times an hour old: the model looked
    idle and was scaled to 0 while it served. Its request counter moves all the same: the operator
    takes the move, seen by its own clock, as a request now (status.scaling.activeSince)."""
    an_hour_behind = NOW - 60 * MINUTE
    folded = forecast.DemandState(updated_min=scaling.minutes(NOW - 2 * MINUTE), total=5).to_dict()
    busy = replace(
        idle_model(last_request=an_hour_behind, active_since=NOW - 60 * MINUTE),
        requests_total=9,  # four requests since the last pass
    )
    busy = replace(busy, status={**busy.status, "demand": folded})
    result = run([busy], [node("n1")])
    assert result.scale_down == [] and result.requeue_after == 300
    status = result.statuses[0].status
    assert status["scaling"]["activeSince"] == "2026-11-25T12:00:00Z"  # NOW, by the operator's clock
    assert status["demand"]["total"] == 9  # folded: the next pass sees no move unless there is one

    # The next pass, the counter unchanged: idle since the move, not since the gateway's time.
    later = replace(
        busy,
        status={"scaling": {**status["scaling"], "generation": 1}, "demand": status["demand"]},
    )
    result = run([later], [node("n1")])
    assert result.scale_down == [] and result.requeue_after == 300
    # With no move at all, the hour-old time stands: idle, as before.
    still = replace(busy, status={**busy.status, "demand": {**folded, "total": 9}})
    (down,) = run([still], [node("n1")]).scale_down
    assert down.idle_seconds == 3600
