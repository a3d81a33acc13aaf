"""Statuses as the API server ends up holding them, pass after pass: what the planner compares is what
its merge patch leaves there, so a settled model gets no status write."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from test_planner import NOW, as_pods, keys_for, model, node, run, step
from test_scaling import idle_model

from vnpu.memory import EstimateError
from vnpu.operator import metrics
from vnpu.operator.config import OperatorConfig
from vnpu.operator.planner import Failure
from vnpu.operator.reconciler import Reconciler
from vnpu.operator.reported import merge_patch
from vnpu.operator.status import MAX_MESSAGE_CHARS


@pytest.fixture(autouse=True)
def no_model_series_left() -> Iterator[None]:
    """The reconciler's passes set per-model series in the process-wide registry: gone with the test."""
    yield
    metrics.forget_models(set())


def passes(
    m: Any, nodes: list[Any], pods: list[Any], server: dict[str, Any], count: int, **kwargs: Any
) -> tuple[list[bool], dict[str, Any], list[Any]]:
    """``count`` passes over ``m`` with the server's status, each changed status merge-patched there as
    the API server does: whether each pass wrote the status, the server's status, the pods."""
    changed = []
    for _ in range(count):
        result = run([replace(m, status=server)], nodes, pods, **kwargs)
        pods = step(pods, result)
        (update,) = result.statuses
        if update.changed:
            server = merge_patch(server, update.status)
        changed.append(update.changed)
    return changed, server, pods


def test_a_woken_model_loses_scaling_warm_and_then_gets_no_status_write() -> None:
    """``scaling.warm`` is set at zero replicas only: once the model wakes the patch removes it (null),
    so the server's status is the planned one and the following passes write nothing."""
    nodes = [node("n1")]
    pods = as_pods(run([idle_model(replicas=1)], nodes).create)
    at_zero = idle_model(replicas=0)
    _, server, pods = passes(at_zero, nodes, pods, {}, 3)
    assert server["scaling"]["warm"] is True  # its holder stays: keepWarm Always
    woken = replace(idle_model(replicas=1), generation=2)
    changed, server, pods = passes(woken, nodes, pods, server, 6)
    assert "warm" not in server["scaling"]
    assert changed[-3:] == [False, False, False], changed  # settled: no patch on every pass


def test_a_model_whose_estimate_fails_loses_its_memory_and_then_gets_no_status_write() -> None:
    """A frozen model (running replicas kept, no estimate) has no ``memory``: one patch removes it,
    then nothing changes on the server and nothing is written. Its idle clock (``scaling``) and request
    history (``demand``) stay as written: a failed read must not erase them."""
    m = model("a", 1)
    nodes = [node("n1")]
    _, server, pods = passes(m, nodes, [], {}, 4)
    assert {"memory", "scaling", "demand"} <= set(server)
    kept = {k: server[k] for k in ("scaling", "demand")}
    failing = {m.key: EstimateError("source unreadable")}
    changed, server, pods = passes(m, nodes, pods, server, 4, estimates=failing)
    assert "memory" not in server and {k: server[k] for k in ("scaling", "demand")} == kept
    assert server["phase"] == "Degraded"
    assert changed == [True, False, False, False]


def test_no_condition_or_event_outgrows_what_the_api_server_takes() -> None:
    """Words that come from outside can be any length: an API server's refusal, a kubelet's message, a
    tenant's nodeSelector the packer echoes. The CRD refuses a condition message past 32768 characters,
    and with it the whole status, on every pass; the messages are cut long before that, and a long
    Degraded message, compared as written, posts its Event once."""
    refusal = "admission webhook denied the request: " + "x" * 50_000
    failures = {"ns/a": Failure(refusal, NOW + dt.timedelta(seconds=30), 1, "Forbidden", "uid-a")}
    selector = {f"k{i:02d}.example.com/" + "x" * 1000: "v" for i in range(40)}  # matches no node
    m = model("a", 2, placement={"nodeSelector": selector})
    nodes = [node("n1")]
    pods: list[Any] = []
    _, server, _ = passes(m, nodes, pods, {}, 1, failures=failures)
    conditions = {c["type"]: c for c in server["conditions"]}
    assert (
        conditions["CapacityPending"]["status"] == "True" and conditions["Degraded"]["reason"] == "Forbidden"
    )
    for c in server["conditions"]:
        assert len(c["message"]) <= MAX_MESSAGE_CHARS + 30 and len(c["reason"]) <= 160, c["type"]
    assert all(len(u["reason"]) <= MAX_MESSAGE_CHARS + 30 for u in server["unplaced"])
    assert conditions["Degraded"]["message"].endswith(" characters)")  # says it was cut
    first = run([replace(m, status={})], nodes, pods, failures=failures).statuses[0]
    assert {e.reason for e in first.events} >= {"Forbidden", "CapacityPending"}
    assert all(len(e.message) <= 1024 for e in first.events)  # what an Event takes (kube.post_event)
    again = run([replace(m, status=server)], nodes, pods, failures=failures).statuses[0]
    assert again.events == () and not again.changed


def test_a_pod_problem_of_any_length_is_cut_in_the_degraded_condition() -> None:
    m = model("a", 1)
    nodes = [node("n1")]
    pods = as_pods(run([m], nodes).create)
    problem = "CrashLoopBackOff: " + "y" * 50_000
    pods = [replace(p, problem=problem, ready=False) if p.role == "replica" else p for p in pods]
    _, server, _ = passes(m, nodes, pods, {}, 1)
    degraded = next(c for c in server["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "CrashLoopBackOff" and len(degraded["message"]) <= MAX_MESSAGE_CHARS + 30


class RefusingKube:
    """In memory: takes every write but the model's status, which it refuses as the API server does a
    status it finds invalid (422); counts the Events posted."""

    api_client = None

    def __init__(self, models: list[Any]) -> None:
        self.models = models
        self.events: list[str] = []
        self.counts: list[tuple[str, int]] = []
        self.refused = 0

    def list_secrets(self) -> list[Any]:
        return keys_for(self.models)

    def post_event(self, model: Any, event_type: str, reason: str, message: str) -> str:
        self.events.append(reason)
        return f"{model.name}.{len(self.events)}"

    def count_event(self, namespace: str, name: str, count: int) -> None:
        self.counts.append((name, count))

    def patch_model_status(self, model: Any, status: Any) -> None:
        self.refused += 1
        exc = ApiException(status=422, reason="Unprocessable Entity")
        exc.body = json.dumps({"reason": "Invalid", "message": "InferenceModel.vnpu.io is invalid"})
        raise exc

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: True  # pods, Services, Secrets: created


def test_a_refused_status_write_posts_no_event_per_pass() -> None:
    """The pass's Events come from the flips it sees against the status it plans from; with that status
    never written, every pass sees the same flip again. The reporter posts the same Event once. (No
    backoff here: every pass retries the status, test_status_refused.py has the backoff.)"""
    m = model("a", 1, weights={"sizeMiB": 4096}, placement={"nodeSelector": {"zone": "none"}})  # never placed
    kube = RefusingKube([m])
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=0), kube=kube)  # type: ignore[arg-type]
    for _ in range(4):
        rec.reconcile([m], [node("n1")], [])  # the model as the server holds it: no status
        while rec._reports.backlog:
            key, report = rec._reports.take() or ("", None)
            rec._write_report(report)  # type: ignore[arg-type]
            rec._reports.done(key)
    assert kube.refused == 4
    assert kube.events == ["CapacityPending"]
    assert kube.counts == [("a.1", 2), ("a.1", 3), ("a.1", 4)]  # seen again: counted on that Event


def test_a_model_without_an_estimate_still_says_what_else_degrades_it() -> None:
    """While the estimate fails, a lost node, a crash-looping replica and a refused write are still in
    the Degraded condition; the replica on the lost node, deleted in this pass and not placed anew, is
    neither kept nor Ready."""
    m = model("a", 2, placement={"spreadAcrossNodes": True})
    nodes = [node("n1"), node("n2")]
    pods = as_pods(run([m], nodes).create)
    lost = replace(nodes[1], ready=False, not_ready_since=NOW - dt.timedelta(hours=1))
    crash = "CrashLoopBackOff: back-off 5m0s restarting failed container"
    pods = [
        replace(p, problem=crash, ready=False) if p.role == "replica" and p.node == "n1" else p for p in pods
    ]
    refused = {
        "ns/a": Failure("secrets is forbidden", NOW + dt.timedelta(seconds=30), 1, "Forbidden", "uid-a")
    }
    failing = {m.key: EstimateError("hf cache unreadable")}
    alone = run([m], [nodes[0], lost], pods, estimates=failing)
    assert {d.name for d in alone.delete if d.force} == {p.name for p in pods if p.node == "n2"}
    (degraded,) = [c for c in alone.statuses[0].status["conditions"] if c["type"] == "Degraded"]
    assert "lost node(s) n2 are gone: none re-placed" in degraded["message"]
    result = run([m], [nodes[0], lost], pods, estimates=failing, failures=refused)
    status = result.statuses[0].status
    conditions = {c["type"]: c for c in status["conditions"]}
    degraded = conditions["Degraded"]
    assert degraded["reason"] == "EstimateFailed" and status["phase"] == "Degraded"
    assert "hf cache unreadable; keeping the 1 running replica(s) as they are" in degraded["message"]
    assert "secrets is forbidden" in degraded["message"]
    assert "lost node(s) n2 are gone: none re-placed" in degraded["message"]
    assert "CrashLoopBackOff" in degraded["message"]
    assert conditions["Ready"]["message"] == "0/2 replicas ready" and status["readyReplicas"] == 0
    assert status["replicas"] == 1


def test_a_model_whose_writes_back_off_reports_the_pods_that_exist() -> None:
    """Its planned pods are not created until the backoff is past: its placements, status.replicas (the
    scale subresource's, what an HPA or KEDA reads) and Placed say what exists, not that plan."""
    quota = Failure(
        "pods is forbidden: exceeded quota", NOW + dt.timedelta(seconds=300), 4, "Forbidden", "uid-a"
    )
    nodes = [node("n1")]
    nothing = run([model("a", 3)], nodes, [], failures={"ns/a": quota})
    assert nothing.create == []
    status = nothing.statuses[0].status
    placed = {c["type"]: c for c in status["conditions"]}["Placed"]
    assert status["replicas"] == 0 and status["placements"] == [] and status["phase"] == "Degraded"
    assert (placed["status"], placed["reason"]) == ("False", "WritesBackingOff")
    assert "0/3 replicas" in placed["message"] and "3 more not created" in placed["message"]
    # Scaled up from 1 while backing off: the one replica that runs, not the three planned.
    pods = as_pods(run([model("a", 1)], nodes).create)
    (replica,) = [p for p in pods if p.role == "replica"]
    one = run([model("a", 3)], nodes, pods, failures={"ns/a": quota}).statuses[0].status
    assert [x["pod"] for x in one["placements"]] == [replica.name]
    assert (one["replicas"], one["readyReplicas"]) == (1, 1)
    assert "1/3 replicas" in {c["type"]: c for c in one["conditions"]}["Placed"]["message"]
