"""The statuses a pass hands to the background reporter, as the next pass sees them."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from vnpu.operator.reported import ReportedStatuses, merge_patch
from vnpu.operator.state import ObservedModel

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
