"""Every write of the operator's asks for leadership first: a replica whose Lease lapsed mid-pass (or
mid-report) writes nothing more, so it never undoes what the new leader just did."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_planner import keys_for, model, node, run

from vnpu.operator import metrics
from vnpu.operator.config import OperatorConfig
from vnpu.operator.planner import Plan, SecretDeletion
from vnpu.operator.reconciler import Reconciler
from vnpu.operator.reported import Report
from vnpu.operator.scaling import ScaleDown
from vnpu.operator.status import Event


@pytest.fixture(autouse=True)
def no_model_series_left() -> Iterator[None]:
    yield
    metrics.forget_models(set())


class RecordingKube:
    """Records every write; ``after`` maps a call's name to what happens once it is made (the Lease
    lost while it was in flight)."""

    api_client = None

    def __init__(self, leader: dict[str, bool], lose_after: str = "") -> None:
        self.leader = leader
        self.lose_after = lose_after
        self.calls: list[tuple[Any, ...]] = []

    def _did(self, *call: Any) -> None:
        self.calls.append(call)
        if call[0] == self.lose_after:
            self.leader["v"] = False

    def delete_secret(self, namespace: str, name: str, uid: str = "") -> bool:
        self._did("delete_secret", name, uid)
        return True

    def scale_model(self, namespace: str, name: str, replicas: int, resource_version: str) -> bool:
        self._did("scale_model", name)
        return True

    def post_event(self, m: Any, event_type: str, reason: str, message: str) -> str:
        self._did("post_event", reason)
        return "ev-1"

    def count_event(self, namespace: str, name: str, count: int) -> None:
        self._did("count_event", name)

    def patch_model_status(self, m: Any, status: Any) -> None:
        self._did("patch_model_status", m.name)


def reconciler(kube: RecordingKube) -> Reconciler:
    rec = Reconciler(OperatorConfig(), kube=kube, is_leader=lambda: kube.leader["v"])  # type: ignore[arg-type]
    rec._estimates.close()
    return rec


def test_a_replica_that_lost_its_lease_deletes_no_key_secret() -> None:
    """The key Secrets' deletions were the one write of a pass that did not ask, and had no
    precondition: the old leader could delete the Secret the new one had just made again."""
    kube = RecordingKube({"v": False})
    rec = reconciler(kube)
    plan = Plan(delete_secrets=[SecretDeletion("team", "vnpu-share-1", "g1", "uid-1")])
    with pytest.raises(RuntimeError, match="lost the leader Lease"):
        rec._apply(plan)
    assert kube.calls == []
    # Leading: deleted only if still the Secret seen (its uid).
    kube.leader["v"] = True
    rec._apply(plan)
    assert kube.calls == [("delete_secret", "vnpu-share-1", "uid-1")]


def test_the_plan_deletes_the_key_secret_it_saw() -> None:
    seen = keys_for([model("a", 1, shareGroup="g1")], uid="seen")
    (gone,) = run([], [node("n1")], secrets=seen).delete_secrets
    assert (gone.name, gone.uid) == (seen[0].name, seen[0].uid)


def test_a_key_secret_made_again_meanwhile_is_left_and_listed_again() -> None:
    kube = RecordingKube({"v": True})
    kube.delete_secret = lambda namespace, name, uid="": False  # type: ignore[method-assign]
    rec = reconciler(kube)
    rec._secrets_listed = 1.0
    rec._apply(Plan(delete_secrets=[SecretDeletion("team", "vnpu-share-1", "g1", "uid-1")]))
    assert rec._secrets_listed == 0.0  # the next pass lists the Secrets: the new one's uid


def test_a_lease_lost_while_scaling_to_zero_posts_no_event() -> None:
    kube = RecordingKube({"v": True}, lose_after="scale_model")
    rec = reconciler(kube)
    m = model("a", 1)
    plan = Plan(scale_down=[ScaleDown(m.namespace, m.name, "7", 600.0)], outcomes={"ns/a": (m, None)})  # type: ignore[dict-item]
    rec._apply(plan)
    assert kube.calls == [("scale_model", "a")]
    kube.leader["v"], kube.lose_after = True, ""
    rec._apply(plan)
    assert kube.calls[1:] == [("scale_model", "a"), ("post_event", "ScaledToZero")]


@pytest.mark.parametrize("lose_after", ["post_event", "count_event"])
def test_a_report_stops_at_the_write_after_the_lease_was_lost(lose_after: str) -> None:
    """A report's writes (Services, Events, the status) each wait up to a request timeout: leadership
    is asked before each, not once before them all."""
    kube = RecordingKube({"v": True}, lose_after=lose_after)
    rec = reconciler(kube)
    m = model("a", 1)
    events = (Event("Warning", "First", "one"), Event("Warning", "Second", "two"))
    if lose_after == "count_event":
        assert rec._posted.repeat_of(m.uid, events[0]) is None  # the first seen lately: counted again
        rec._posted.posted(m.uid, events[0], "a.1")
    rec._write_report(Report(m, status={"phase": "Pending"}, token=1, events=events))
    assert kube.calls == [(lose_after, "First" if lose_after == "post_event" else "a.1")]
    kube.leader["v"] = True
    kube.lose_after = ""
    rec._write_report(Report(m, status={"phase": "Pending"}, token=2, events=()))
    assert kube.calls[-1] == ("patch_model_status", "a")
