"""The statuses a pass hands to the background reporter, as the next pass sees them."""

from __future__ import annotations

import threading
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from vnpu.operator.reported import (
    PostedEvents,
    Repeat,
    Report,
    ReportedStatuses,
    ReportQueue,
    merge_patch,
    merge_patch_to,
)
from vnpu.operator.state import ObservedModel
from vnpu.operator.status import Event

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=3), json_values, max_size=4)


def test_merge_patch_follows_rfc_7386() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}, "keep": [1, 2]}
    patch = {"a": "z", "c": {"f": None}, "keep": [3], "new": {"x": None, "y": 1}}
    assert merge_patch(target, patch) == {"a": "z", "c": {"d": "e"}, "keep": [3], "new": {"y": 1}}
    assert target == {"a": "b", "c": {"d": "e", "f": "g"}, "keep": [1, 2]}  # not mutated


@given(json_objects, json_objects)
def test_merging_a_patch_twice_changes_nothing_more(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Why the overlay is safe to apply to a status the server already patched: merging is idempotent."""
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


json_statuses = st.dictionaries(  # what a status holds: no nulls (a null in a patch removes a key)
    st.text(max_size=3),
    st.recursive(
        st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=10,
    ),
    max_size=4,
)


@given(json_objects, json_statuses)
def test_the_patch_to_a_status_leaves_the_server_holding_that_status(
    current: dict[str, Any], wanted: dict[str, Any]
) -> None:
    """Keys the operator no longer sets (``scaling.warm`` once awake, ``memory`` without an estimate) go:
    a merge patch of the new status alone would leave them there."""
    assert merge_patch(current, merge_patch_to(current, wanted)) == wanted


def test_the_patch_to_a_status_leaves_someone_elses_keys_alone() -> None:
    current = {"kopf": {"progress": {}}, "memory": {"weightsMiB": 1}, "scaling": {"warm": True, "g": 1}}
    patch = merge_patch_to(current, {"scaling": {"g": 2}}, keep=["kopf"])
    assert patch == {"memory": None, "scaling": {"warm": None, "g": 2}}


def test_two_reports_merged_in_the_queue_keep_the_first_ones_removals() -> None:
    """Written as one patch, the later status (computed over the earlier one) does not name the key the
    earlier one removed: the merged patch still removes it."""
    queue = ReportQueue()
    queue.put("ns/a", Report(model(), status={"phase": "Ready", "scaling": {"warm": None, "g": 2}}, token=1))
    queue.put("ns/a", Report(model(), status={"phase": "Running", "scaling": {"g": 2}}, token=2))
    _, report = queue.take() or ("", None)
    assert report is not None and report.status == {"phase": "Running", "scaling": {"warm": None, "g": 2}}
    assert merge_patch({"scaling": {"warm": True, "g": 1}}, report.status) == {
        "phase": "Running",
        "scaling": {"g": 2},
    }


def model(status: dict[str, Any] | None = None, uid: str = "u1") -> ObservedModel:
    return ObservedModel("ns", "m", uid, 1, None, deleting=False, status=status or {})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_pass_sees_the_status_being_written_until_the_informer_shows_it() -> None:
    clock = Clock()
    reported = ReportedStatuses(stale_after=60, clock=clock)
    ready = {"readyReplicas": 2, "conditions": [{"type": "Ready", "status": "True"}], "endpoint": None}
    reported.submitted("u1", ready)
    lagging = model({"readyReplicas": 0, "endpoint": "http://x"})
    (seen,) = reported.overlay([lagging])
    assert seen.status == {"readyReplicas": 2, "conditions": [{"type": "Ready", "status": "True"}]}
    assert len(reported) == 1
    caught_up = model({"readyReplicas": 2, "conditions": [{"type": "Ready", "status": "True"}]})
    (seen,) = reported.overlay([caught_up])
    assert seen is caught_up and len(reported) == 0


def test_a_refused_write_and_an_old_one_give_the_informer_back_its_authority() -> None:
    clock = Clock()
    reported = ReportedStatuses(stale_after=60, clock=clock)
    token = reported.submitted("u1", {"readyReplicas": 2})
    reported.refused("u1", token - 1)  # an older submission's answer settles nothing
    assert reported.overlay([model()])[0].status == {"readyReplicas": 2}
    reported.refused("u1", token)
    assert reported.overlay([model()])[0].status == {}

    reported.submitted("u1", {"readyReplicas": 3})  # e.g. lost with its connection
    clock.now = 59.0
    assert reported.overlay([model()])[0].status == {"readyReplicas": 3}
    clock.now = 60.0
    assert reported.overlay([model()])[0].status == {}
    assert len(reported) == 0


def test_entries_of_deleted_models_are_forgotten() -> None:
    reported = ReportedStatuses(stale_after=60, clock=Clock())
    reported.submitted("gone", {"readyReplicas": 1})
    reported.submitted("u1", {"readyReplicas": 1})
    reported.overlay([model()])
    assert len(reported) == 1


def test_a_model_queued_again_before_a_worker_took_it_gets_one_write_of_its_latest_status() -> None:
    placed, ready = Event("Normal", "Placed", "on n1"), Event("Normal", "Ready", "2/2")
    queue = ReportQueue()
    queue.put("ns/a", Report(model(), status={"phase": "Pending"}, token=1, events=(placed,)))
    queue.put("ns/b", Report(model(uid="u2"), status={"phase": "Pending"}, token=2))
    queue.put("ns/a", Report(model(), status={"phase": "Ready"}, token=3, events=(ready,)))
    queue.put("ns/a", Report(model(), events=()))  # an events-only report keeps the status it follows
    key, report = queue.take() or ("", None)
    assert key == "ns/b"  # ns/a moved behind it when queued again, as a workqueue re-adds a key
    key, report = queue.take() or ("", None)
    assert key == "ns/a" and report is not None
    assert (report.status, report.token, report.events) == ({"phase": "Ready"}, 3, (placed, ready))


def test_no_two_workers_hold_one_model_so_its_writes_keep_their_order() -> None:
    queue = ReportQueue()
    queue.put("ns/a", Report(model(), status={"n": 1}, token=1))
    assert queue.take() is not None  # a worker is writing ns/a's first status
    queue.put("ns/a", Report(model(), status={"n": 2}, token=2))
    taken: list[Any] = []
    other = threading.Thread(target=lambda: taken.append(queue.take()))
    other.start()
    other.join(0.2)
    assert other.is_alive() and not taken  # the second write waits for the first
    queue.done("ns/a")
    other.join(5)
    assert taken[0][1].status == {"n": 2}
    queue.close()
    assert queue.take() is None


def test_the_queue_says_how_far_the_reporter_trails() -> None:
    now = [100.0]
    queue = ReportQueue(clock=lambda: now[0])
    queue.put("ns/a", Report(model(), status={"n": 1}, token=1))
    now[0] = 101.0
    queue.put("ns/b", Report(model(uid="u2"), status={"n": 1}, token=2))
    now[0] = 102.0
    queue.put("ns/a", Report(model(), status={"n": 2}, token=3))  # merged: its lag counts from 100
    assert queue.backlog == 2
    assert queue.take() is not None and queue.backlog == 1
    now[0] = 105.0
    assert queue.done("ns/b") == 4.0  # queued at 101 (ns/a went behind it when queued again)
    key, _ = queue.take() or ("", None)
    assert key == "ns/a" and queue.backlog == 0
    queue.put("ns/a", Report(model(), status={"n": 3}, token=4))  # queued again while being written
    now[0] = 106.0
    assert queue.done("ns/a") == 6.0 and queue.done("ns/a") is None
    assert queue.backlog == 1
    now[0] = 110.0
    assert queue.take() is not None and queue.done("ns/a") == 5.0  # the later report, queued at 105


def test_an_event_seen_again_within_the_window_is_counted_on_the_one_posted() -> None:
    """A pass that sees the same flip again (its status write refused, so never recorded; or the flip
    recurred) creates no Event: it counts on the one posted, as client-go does."""
    clock = Clock()
    posted = PostedEvents(window=600, clock=clock)
    pending = Event("Warning", "CapacityPending", "1 replica(s) unplaced")
    assert posted.repeat_of("u1", pending) is None
    assert posted.repeat_of("u1", pending) == Repeat("", 2)  # its creation is under way (or failed)
    posted.posted("u1", pending, "a.17c3")
    clock.now = 599.0
    assert posted.repeat_of("u1", pending) == Repeat("a.17c3", 3)
    assert posted.repeat_of("u2", pending) is None  # another model (or the same name created again)
    assert posted.repeat_of("u1", Event("Warning", "CapacityPending", "2 replica(s) unplaced")) is None
    clock.now = 1198.0
    assert posted.repeat_of("u1", pending) == Repeat("a.17c3", 4)  # within 600 s of the last sighting
    clock.now = 1800.0
    assert posted.repeat_of("u1", pending) is None  # the window is past: a new Event
