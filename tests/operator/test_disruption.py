"""A PodDisruptionBudget per InferenceModel, planned by the pure pass: over the model's replicas only,
one at a time, unhealthy ones always evictable; created once, put back when edited, never touched when
the name is someone else's, and never in the way of the model's pods."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

from test_planner import NOW, model, node, run

from vnpu import api
from vnpu.operator import disruption
from vnpu.operator.disruption import BudgetIntent, budget_name, manifest, plan_budgets
from vnpu.operator.planner import (
    Failure,
    budget_failure_key,
    failure_model,
    placeholders_failure_key,
)
from vnpu.operator.pods import replica_selector
from vnpu.operator.state import ObservedBudget, parse_budget

EXISTS = {"key": "x", "operator": "Exists"}


def observed(budget: dict[str, Any], **meta: Any) -> ObservedBudget:
    """``budget`` as the informer sees it once the API server holds it (``meta`` on its metadata)."""
    return parse_budget({**budget, "metadata": {**budget["metadata"], "uid": "pdb-uid", **meta}})


def selected(budget: dict[str, Any], pods: list[dict[str, Any]]) -> list[str]:
    """The names of ``pods`` the budget's selector selects."""
    match = budget["spec"]["selector"]["matchLabels"].items()
    return sorted(p["metadata"]["name"] for p in pods if match <= p["metadata"]["labels"].items())


def test_a_model_gets_a_budget_over_its_replicas_only() -> None:
    m, other = model("llama", replicas=3), model("llama-2", replicas=1)
    placed = run([m, other], [node("n1", devices=1)])
    waiting = run([m, other], [])  # no node: placeholders
    pods = placed.create + waiting.create
    assert {p["metadata"]["labels"][api.LABEL_ROLE] for p in pods} == {"replica", "weights", "placeholder"}
    (intent,) = [i for i in placed.budgets if i.owner.name == "llama"]
    pdb = manifest(intent)
    assert pdb["apiVersion"] == "policy/v1" and pdb["kind"] == "PodDisruptionBudget"
    assert pdb["metadata"]["name"] == "vnpu-llama" == budget_name("llama") == api.service_name("llama")
    assert pdb["metadata"]["namespace"] == "ns"
    assert pdb["metadata"]["labels"] == {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE, api.LABEL_MODEL: "llama"}
    (owner,) = pdb["metadata"]["ownerReferences"]
    assert (owner["apiVersion"], owner["kind"], owner["name"]) == (api.API_VERSION, api.KIND, "llama")
    assert owner["uid"] == "uid-llama" and owner["controller"] is True and owner["blockOwnerDeletion"]
    assert pdb["spec"] == {
        "selector": {"matchLabels": replica_selector("llama")},
        "maxUnavailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    # Exactly the model's three replicas: not its weight-holder or placeholders, nor the other model's.
    replicas = [
        p
        for p in placed.create
        if p["metadata"]["labels"][api.LABEL_ROLE] == "replica"
        and p["metadata"]["labels"][api.LABEL_MODEL] == "llama"
    ]
    assert len(replicas) == 3
    assert selected(pdb, pods) == sorted(p["metadata"]["name"] for p in replicas)
    # The selector the scale subresource reports (status.selector) selects no fewer.
    status = next(u.status for u in placed.statuses if u.model.name == "llama")
    assert (
        dict(kv.split("=") for kv in status["selector"].split(",")).items()
        <= replica_selector("llama").items()
    )


def test_the_budget_is_created_once_and_put_back_when_edited() -> None:
    m = model("llama", replicas=2)
    nodes = [node("n1", devices=1)]
    first = run([m], nodes)
    (intent,) = first.budgets
    assert not intent.update
    mine = observed(manifest(intent))
    assert disruption.ours(mine, m) and disruption.as_wanted(mine, "llama")
    assert run([m], nodes, budgets=[mine]).budgets == []  # as wanted: no write at all
    # Someone sets maxUnavailable 0 (no drain would ever pass), widens the selector, adds minAvailable
    # or drops the unhealthy-pod policy: the spec is put back, in place.
    edits: list[dict[str, Any]] = [
        {"maxUnavailable": 0},
        {"selector": {"matchLabels": {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE}}},
        {"selector": {"matchLabels": replica_selector("llama"), "matchExpressions": [EXISTS]}},
        {"unhealthyPodEvictionPolicy": "IfHealthyBudget"},
        {"maxUnavailable": None, "minAvailable": 1},
        {"maxUnavailable": "50%"},
    ]  # fmt: skip
    for edit in edits:
        pdb = manifest(intent)
        pdb["spec"] = {k: v for k, v in {**pdb["spec"], **edit}.items() if v is not None}
        (put_back,) = run([m], nodes, budgets=[observed(pdb)]).budgets
        assert put_back == BudgetIntent(m, update=True), edit
    # Its labels are the operator's own: the informer (by label) sees it, so only its spec can differ.


def test_a_budget_that_is_not_the_models_is_never_changed() -> None:
    m = model("llama", replicas=2)
    nodes = [node("n1", devices=1)]
    pdb = manifest(BudgetIntent(m))
    someone_elses = {**pdb, "metadata": {**pdb["metadata"], "ownerReferences": [], "labels": {"team": "a"}}}
    (owner,) = pdb["metadata"]["ownerReferences"]
    another_controller = {**pdb, "metadata": {**pdb["metadata"], "ownerReferences": [{**owner, "uid": "x"}]}}
    for theirs in (someone_elses, another_controller):
        found = observed(theirs)
        assert not disruption.ours(found, m)
        # A create, never an update: the API server's AlreadyExists, and a look, tell the model why.
        assert run([m], nodes, budgets=[found]).budgets == [BudgetIntent(m)]
        message = disruption.taken_message(BudgetIntent(m), found)
        assert "PodDisruptionBudget vnpu-llama exists in ns and" in message and "left as it is" in message
    # An earlier model's of that name, being collected: nothing until it is gone.
    going = observed(another_controller, deletionTimestamp="2026-01-01T00:00:00Z")
    assert run([m], nodes, budgets=[going]).budgets == []


def test_a_model_at_zero_replicas_keeps_its_budget_and_a_deleted_one_gets_none() -> None:
    idle = model("idle", replicas=0)
    kept = observed(manifest(BudgetIntent(idle)))
    assert plan_budgets([idle], {}) == [BudgetIntent(idle)]
    assert plan_budgets([idle], {("ns", kept.name): kept}) == []  # kept: it selects no pod, blocks nothing
    going = replace(model("going"), deleting=True)
    assert plan_budgets([going], {}) == []  # garbage collection deletes its budget with it
    # A model whose spec the operator cannot read still gets one: its running replicas may stay.
    broken = replace(model("broken"), spec=None, spec_error="bad")
    assert plan_budgets([broken], {}) == [BudgetIntent(broken)]


def test_a_refused_budget_backs_off_the_budget_alone() -> None:
    m = model("llama", replicas=2)
    key = "ns/llama"
    later = NOW + dt.timedelta(seconds=60)
    refused = Failure("creating PodDisruptionBudget vnpu-llama: exceeded quota", later, reason="Forbidden")
    result = run([m], [node("n1", devices=1)], failures={budget_failure_key(key): refused})
    assert result.budgets == []
    assert len(result.create) == 3  # its holder and replicas are written as usual
    degraded = next(c for c in result.statuses[0].status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "Forbidden"
    assert "PodDisruptionBudget vnpu-llama" in degraded["message"]
    # Nor the other way round: refused placeholders hold back neither the budget nor the replicas.
    waiting = run([m], [], failures={placeholders_failure_key(key): refused})
    assert waiting.create == [] and waiting.budgets == [BudgetIntent(m)]
    # The model's own backoff holds its budget too (none of its writes until it has passed).
    held = run([m], [node("n1", devices=1)], failures={key: replace(refused, message="pods: quota")})
    assert held.budgets == [] and held.create == []


def test_the_budgets_failure_key_is_the_models() -> None:
    assert failure_model(budget_failure_key("team-a/m")) == "team-a/m"
    assert failure_model(placeholders_failure_key("team-a/m")) == "team-a/m"
    # A model named like a part's suffix is a model like any other.
    assert failure_model("team-a/disruption-budget") == "team-a/disruption-budget"
    assert failure_model(budget_failure_key("team-a/placeholders")) == "team-a/placeholders"
