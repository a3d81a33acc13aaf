"""A model's backoff after a refused write belongs to that model (its uid), not to its name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from test_planner import as_pods, keys_for, model, node

from vnpu import api
from vnpu.operator import disruption, metrics
from vnpu.operator.config import OperatorConfig
from vnpu.operator.planner import failure_model, placeholders_failure_key
from vnpu.operator.pods import render
from vnpu.operator.reconciler import Reconciler
from vnpu.operator.state import ObservedBudget, parse_budget

QUOTA = "pods is forbidden: exceeded quota: compute"


@pytest.fixture(autouse=True)
def no_model_series_left() -> Iterator[None]:
    """The passes here set per-model series in the process-wide registry: gone with the test."""
    yield
    metrics.forget_models(set())


class QuotaKube:
    """In memory: refuses every pod while the namespace's quota is full."""

    api_client = None

    def __init__(self, models: list[Any]) -> None:
        self.models = models
        self.quota_full = True
        self.created: list[str] = []

    def list_secrets(self) -> list[Any]:
        return keys_for(self.models)

    def create_pod(self, manifest: dict[str, Any]) -> bool:
        if self.quota_full:
            exc = ApiException(status=403, reason="Forbidden")
            exc.body = json.dumps({"reason": "Forbidden", "message": QUOTA})
            raise exc
        self.created.append(manifest["metadata"]["name"])
        return True

    def set_secret_owners(self, namespace: str, name: str, owner_references: list[Any]) -> None:
        pass  # the key Secret changes hands to the new model

    def create_budget(self, manifest: dict[str, Any]) -> bool:
        return True  # the models' PodDisruptionBudgets are not what these tests are about


def degraded(update: Any) -> dict[str, Any]:
    return next(c for c in update.status["conditions"] if c["type"] == "Degraded")


def test_a_model_created_again_under_its_name_inherits_no_backoff() -> None:
    old = model("a", 1, weights={"sizeMiB": 4096})
    kube = QuotaKube([old])
    # 60 s stands for a model several refusals in (1 s doubling to 300 s).
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    first = rec.reconcile([old], [node("n1")], [])
    assert degraded(first.statuses[0])["reason"] == "Forbidden"
    # Within the minute: the same model stays backed off, no pod is tried.
    kube.quota_full = False
    again = rec.reconcile([old], [node("n1")], [])
    assert again.create == [] and kube.created == []
    assert QUOTA in degraded(again.statuses[0])["message"]
    # The user deletes it, frees the quota and creates it again: a new model, written at once.
    new = replace(old, uid="uid-a-2")
    result = rec.reconcile([new], [node("n1")], [])
    assert [i.name for i in result.create] == kube.created and len(kube.created) == 2
    # Nor the old model's message (the old model's Service, still being created, is another matter).
    assert degraded(result.statuses[0])["reason"] != "Forbidden"
    assert QUOTA not in degraded(result.statuses[0])["message"]


class PlaceholderQuotaKube(QuotaKube):
    """A quota that the model's pods fit in and its weights-sized placeholder does not."""

    def __init__(self, models: list[Any]) -> None:
        super().__init__(models)
        self.quota_full = False
        self.deleted: list[str] = []

    def create_pod(self, manifest: dict[str, Any]) -> bool:
        if manifest["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_PLACEHOLDER:
            exc = ApiException(status=403, reason="Forbidden")
            exc.body = json.dumps({"reason": "Forbidden", "message": QUOTA})
            raise exc
        return super().create_pod(manifest)

    def delete_pod(self, namespace: str, name: str, force: bool = False, uid: str = "") -> bool:
        self.deleted.append(name)
        return True


def test_a_refused_placeholder_never_holds_up_the_models_pods() -> None:
    """The placeholder is optional, the replicas are not: its refusal is reported and backs off the
    placeholders alone, so a failed replica is replaced in the next pass, not after the backoff."""
    m = model("a", 7, weights={"sizeMiB": 4096})  # the weights and 6 replicas fill the device
    kube = PlaceholderQuotaKube([m])
    rec = Reconciler(OperatorConfig(backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    nodes = [node("n1", devices=1)]
    placed = rec.reconcile([m], nodes, [])
    assert len(kube.created) == 7  # the holder and 6 replicas, before the placeholder
    pods = as_pods([render(i, rec.config) for i in placed.create])
    first = rec.reconcile([m], nodes, pods)
    assert [i.role for i in first.create] == ["placeholder"] and len(kube.created) == 7
    assert degraded(first.statuses[0])["reason"] == "Forbidden"
    assert QUOTA in degraded(first.statuses[0])["message"]
    victim = next(p for p in pods if p.role == "replica")
    pods = [replace(p, phase="Failed", finished=True, ready=False) if p is victim else p for p in pods]
    second = rec.reconcile([m], nodes, pods)
    assert kube.deleted == [victim.name]  # within the placeholder's backoff
    assert [i.role for i in second.create] == []  # the same name once the deletion shows; no placeholder
    assert QUOTA in degraded(second.statuses[0])["message"]  # still reported
    third = rec.reconcile([m], nodes, [p for p in pods if p.name != victim.name])
    assert [i.name for i in third.create] == [victim.name] and kube.created[-1] == victim.name
    assert rec.health()["models_in_backoff"] == 0


def test_a_model_named_placeholders_is_a_model_like_any_other() -> None:
    """Its key, "team-a/placeholders", is no other model's placeholders' key: its refused write
    backs it off (and only it), and the pass goes on for every other tenant."""
    assert failure_model("team-a/placeholders") == "team-a/placeholders"
    assert failure_model(placeholders_failure_key("team-a/placeholders")) == "team-a/placeholders"
    named = model("placeholders", 2, ns="team-a", weights={"sizeMiB": 1024})
    other = model("b", 2, ns="team-b", weights={"sizeMiB": 1024})
    kube = OneNamespaceQuotaKube([named, other], "team-a")
    rec = Reconciler(OperatorConfig(backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    nodes = [node("n1", devices=2)]
    rec.reconcile([named, other], nodes, [])  # team-a's pods are refused; no error escapes
    assert sorted(n for n in kube.created if n.startswith("b-")) and not [
        n for n in kube.created if "placeholders" in n
    ]
    assert rec.health()["models_in_backoff"] == 1
    again = rec.reconcile([named, other], nodes, [])
    assert not [i for i in again.create if i.namespace == "team-a"]  # backing off


class OneNamespaceQuotaKube(QuotaKube):
    """Refuses every pod of one namespace (its quota is full); the others are created."""

    def __init__(self, models: list[Any], full: str) -> None:
        super().__init__(models)
        self.full = full

    def create_pod(self, manifest: dict[str, Any]) -> bool:
        self.quota_full = manifest["metadata"]["namespace"] == self.full
        return super().create_pod(manifest)

    def delete_secret(self, namespace: str, name: str, uid: str = "") -> bool:
        return False


class BudgetKube(QuotaKube):
    """Pods fit; the models' PodDisruptionBudgets are refused (a quota on them), or their name is held
    by ``holding`` (what a look at the name finds after AlreadyExists)."""

    def __init__(self, models: list[Any], holding: ObservedBudget | None = None) -> None:
        super().__init__(models)
        self.quota_full = False
        self.holding = holding
        self.budget_calls: list[str] = []

    def create_budget(self, manifest: dict[str, Any]) -> bool:
        self.budget_calls.append(f"create {manifest['metadata']['name']}")
        if self.holding is not None:
            return False
        exc = ApiException(status=403, reason="Forbidden")
        exc.body = json.dumps({"reason": "Forbidden", "message": BUDGET_QUOTA})
        raise exc

    def find_budget(self, namespace: str, name: str) -> ObservedBudget | None:
        self.budget_calls.append(f"find {name}")
        return self.holding

    def delete_pod(self, namespace: str, name: str, force: bool = False, uid: str = "") -> bool:
        return True


BUDGET_QUOTA = "poddisruptionbudgets.policy is forbidden: exceeded quota: pdbs"


def test_a_refused_budget_never_holds_up_the_models_pods() -> None:
    """Its own backoff: reported on the model, but a failed replica is replaced in the next pass."""
    m = model("a", 3, weights={"sizeMiB": 4096})
    kube = BudgetKube([m])
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    nodes = [node("n1", devices=1)]
    placed = rec.reconcile([m], nodes, [])
    assert len(kube.created) == 4 and kube.budget_calls == ["create vnpu-a"]  # the pods first
    assert degraded(placed.statuses[0])["reason"] == "Forbidden"
    assert BUDGET_QUOTA in degraded(placed.statuses[0])["message"]
    assert "PodDisruptionBudget vnpu-a" in degraded(placed.statuses[0])["message"]
    assert rec.health()["models_in_backoff"] == 0  # the model is not backing off, its budget is
    pods = as_pods([render(i, rec.config) for i in placed.create])
    victim = next(p for p in pods if p.role == "replica")
    again = rec.reconcile([m], nodes, [p for p in pods if p is not victim])
    assert [i.name for i in again.create] == [victim.name] and kube.created[-1] == victim.name
    assert again.budgets == [] and kube.budget_calls == ["create vnpu-a"]  # within its backoff
    assert BUDGET_QUOTA in degraded(again.statuses[0])["message"]


def test_a_budget_name_held_by_someone_else_is_left_alone_and_said() -> None:
    m = model("a", 1, weights={"sizeMiB": 1024})
    theirs = ObservedBudget("ns", "vnpu-a", "theirs", None, False, False, (("app", "x"),), "0", "", "")
    kube = BudgetKube([m], holding=theirs)
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    result = rec.reconcile([m], [node("n1", devices=1)], [])
    assert kube.budget_calls == ["create vnpu-a", "find vnpu-a"]  # never an update of theirs
    assert len(kube.created) == 2
    condition = degraded(result.statuses[0])
    assert condition["reason"] == disruption.REASON_NAME_TAKEN
    assert "PodDisruptionBudget vnpu-a exists in ns and is not labelled" in condition["message"]
    # AlreadyExists for the model's own (created by the previous pass, not yet seen by the informer):
    # no failure.
    made = disruption.manifest(disruption.BudgetIntent(m))
    mine = parse_budget({**made, "metadata": {**made["metadata"], "uid": "mine"}})
    kube = BudgetKube([m], holding=mine)
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    result = rec.reconcile([m], [node("n1", devices=1)], [])
    assert kube.budget_calls == ["create vnpu-a", "find vnpu-a"]
    assert degraded(result.statuses[0])["status"] == "False"


class HolderBudgetKube(BudgetKube):
    """Budgets are created (or, with ``refuse``, refused by a quota) and their specs set, in memory."""

    def __init__(self, models: list[Any], refuse: bool = False) -> None:
        super().__init__(models)
        self.refuse = refuse

    def create_budget(self, manifest: dict[str, Any]) -> bool:
        if self.refuse:
            return super().create_budget(manifest)
        self.budget_calls.append(f"create {manifest['metadata']['name']}")
        return True

    def set_budget_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.budget_calls.append(f"set {name} minAvailable {spec['minAvailable']}")


def test_a_holders_budget_comes_once_the_holder_is_seen_relaxes_in_place_and_backs_off_alone() -> None:
    warm = {"minReplicas": 0, "idleSeconds": 300, "keepWarm": "Always"}
    m = model("a", 1, weights={"sizeMiB": 1024}, scaling=warm)
    kube = HolderBudgetKube([m])
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    nodes = [node("n1", devices=1)]
    placed = rec.reconcile([m], nodes, [])
    assert kube.budget_calls == ["create vnpu-a"]  # the holder not seen yet: no uid to be owned by
    pods = as_pods([render(i, rec.config) for i in placed.create])
    (holder,) = [p for p in pods if p.role == api.ROLE_WEIGHTS]
    model_budget = parse_budget(disruption.manifest(disruption.BudgetIntent(m)))
    seen = rec.reconcile([m], nodes, pods, budgets=[model_budget])
    assert kube.budget_calls[1:] == [f"create {holder.name}"]
    (held,) = seen.holder_budgets
    assert held.in_use
    # At zero (kept warm): nothing maps it, its budget is patched to let it go.
    kept = [model_budget, parse_budget(held.manifest())]
    rec.reconcile([replace(m, spec=replace(m.spec, replicas=0))], nodes, [holder], budgets=kept)
    assert kube.budget_calls[2:] == [f"set {holder.name} minAvailable 0"]

    # Refused (a quota on budgets): the model says so, its pods are not held back.
    kube = HolderBudgetKube([m], refuse=True)
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    victim = next(p for p in pods if p.role == api.ROLE_REPLICA)
    result = rec.reconcile([m], nodes, [p for p in pods if p is not victim], budgets=[model_budget])
    assert kube.budget_calls == [f"create {holder.name}"] and kube.created == [victim.name]
    condition = degraded(result.statuses[0])
    assert condition["reason"] == "Forbidden"
    assert f"creating PodDisruptionBudget {holder.name}" in condition["message"]


class QuotaBudgetKube(QuotaKube):
    """Pods refused while ``quota_full``; budgets created and their specs set, in memory."""

    def __init__(self, models: list[Any]) -> None:
        super().__init__(models)
        self.budget_calls: list[str] = []

    def create_budget(self, manifest: dict[str, Any]) -> bool:
        self.budget_calls.append(f"create {manifest['metadata']['name']} {manifest['spec']['minAvailable']}")
        return True

    def set_budget_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.budget_calls.append(f"set {name} minAvailable {spec['minAvailable']}")

    def delete_pod(self, namespace: str, name: str, force: bool = False, uid: str = "") -> bool:
        return True


def test_a_model_refused_by_a_quota_has_its_budget_follow_the_pods_it_has_at_once() -> None:
    """A replica evicted, its replacement refused by a full quota: the pass counted the replacement,
    and the model's backoff then held its budget at 2 of 2 pods (no drain of its nodes) for the whole
    backoff, up to 5 minutes. Now the next pass, half a second later, counts the 2 it has."""
    m = model("a", 3, weights={"sizeMiB": 4096})
    kube = QuotaBudgetKube([m])
    kube.quota_full = False
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    nodes = [node("n1", devices=1)]
    placed = rec.reconcile([m], nodes, [])
    pods = as_pods([render(i, rec.config) for i in placed.create])

    def model_budget_calls() -> list[str]:
        return [c for c in kube.budget_calls if " vnpu-a " in c]  # (not its holder's)

    assert model_budget_calls() == ["create vnpu-a 2"]
    budget = parse_budget(disruption.manifest(placed.budgets[0]))

    kube.quota_full = True
    victim = next(p for p in pods if p.role == api.ROLE_REPLICA)
    left = [p for p in pods if p is not victim]
    refused = rec.reconcile([m], nodes, left, budgets=[budget])
    assert degraded(refused.statuses[0])["reason"] == "Forbidden"
    assert model_budget_calls() == ["create vnpu-a 2"]  # the replacement counted: nothing to change yet
    assert rec._requeue_after == 0.5  # the next pass at once, not after the model's backoff
    rec.reconcile([m], nodes, left, budgets=[budget])  # within the model's backoff
    assert model_budget_calls()[1:] == ["set vnpu-a minAvailable 1"]  # one of its 2 may go


class PerModelKube:
    """In memory: create_pod of a model named in ``refused`` raises ``error`` (an API refusal or a bug);
    every other write works and is logged."""

    api_client = None

    def __init__(self, models: list[Any], refused: dict[str, Exception]) -> None:
        self.models = models
        self.refused = refused
        self.created: list[tuple[str, str]] = []  # (role, name)
        self.policies: list[str] = []

    def list_secrets(self) -> list[Any]:
        return keys_for(self.models)

    def create_pod(self, manifest: dict[str, Any]) -> bool:
        labels = manifest["metadata"]["labels"]
        error = self.refused.get(labels.get(api.LABEL_MODEL, ""))
        if error is not None and labels[api.LABEL_ROLE] == api.ROLE_REPLICA:
            raise error
        self.created.append((labels[api.LABEL_ROLE], manifest["metadata"]["name"]))
        return True

    def delete_pod(self, namespace: str, name: str, force: bool = False, uid: str = "") -> bool:
        return True

    def set_secret_owners(self, namespace: str, name: str, owner_references: list[Any]) -> None:
        pass

    def set_pod_owners(self, *args: Any) -> None:
        pass

    def create_budget(self, manifest: dict[str, Any]) -> bool:
        return True

    def keep_network_policy(self, manifest: dict[str, Any]) -> str:
        self.policies.append(manifest["metadata"]["namespace"])
        return "created"

    def create_secret(self, manifest: dict[str, Any]) -> None:
        return None

    def delete_secret(self, namespace: str, name: str, uid: str = "") -> bool:
        return True


def test_a_write_that_meets_a_bug_is_its_models_failure_and_every_other_model_converges() -> None:
    """A write that raised anything but the API server's refusal (a manifest no code path could render,
    a bug) escaped the pass: every model of every namespace stopped converging, none was backed off,
    and the pass was retried every second with a traceback. Now it is that model's failure."""
    sized = {"weights": {"sizeMiB": 2048}}
    bad, good = model("bad", 1, ns="team-a", **sized), model("good", 1, ns="team-b", **sized)
    kube = PerModelKube([bad, good], {"bad": ValueError("Exceeds the limit (4300 digits)")})
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    result = rec.reconcile([bad, good], [node("n1", devices=2)], [])
    assert ("replica", next(i.name for i in result.create if "good" in i.name)) in kube.created
    statuses = {u.model.name: u for u in result.statuses}
    assert degraded(statuses["bad"]) == {
        **degraded(statuses["bad"]),
        "status": "True",
        "reason": "InternalError",
    }
    assert "ValueError: Exceeds the limit" in degraded(statuses["bad"])["message"]
    assert degraded(statuses["good"])["status"] == "False"
    assert rec.health()["models_in_backoff"] == 1


def test_a_shared_holder_is_written_while_one_of_its_models_backs_off() -> None:
    """Two models share a weight-holder; only one's replicas are refused (a LimitRange on its own
    resources). The holder went away (evicted, deleted by hand) and was not created again while that
    model backed off, so the other model's replica had no holder for up to five minutes at a time."""
    a = model("a", 1, weights={"sizeMiB": 4096}, shareGroup="g")
    b = model("b", 1, weights={"sizeMiB": 4096}, shareGroup="g")
    limit = ApiException(status=403, reason="Forbidden")
    limit.body = json.dumps({"reason": "Forbidden", "message": "maximum memory usage per Container is 1Gi"})
    kube = PerModelKube([a, b], {"a": limit})
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    nodes = [node("n1", devices=1)]
    first = rec.reconcile([a, b], nodes, [])
    assert [role for role, _ in kube.created] == ["weights", "replica"]  # the holder, b's replica
    holder = next(name for role, name in kube.created if role == "weights")
    written = as_pods([render(i, rec.config) for i in first.create if "a-0" not in i.name])
    without_holder = [p for p in written if p.role != "weights"]
    kube.created.clear()
    rec.reconcile([a, b], nodes, without_holder)  # a is backing off
    assert kube.created == [("weights", holder)]


def test_a_namespace_created_again_gets_its_network_policy_before_its_pods() -> None:
    """The operator remembered each namespace's policy for a resync period, and every namespace it
    ever saw. A namespace deleted (its policy with it) and created again within that period had its
    new model's pods created with no NetworkPolicy, against the rule that none is created unprotected."""
    old = model("m", 1, weights={"sizeMiB": 2048})
    kube = PerModelKube([old], {})
    rec = Reconciler(OperatorConfig(placeholders=False, network_policy=True), kube=kube)  # type: ignore[arg-type]
    nodes = [node("n1")]
    rec.reconcile([old], nodes, [])
    assert kube.policies == ["ns"]
    kube.models = []
    rec.reconcile([], nodes, [])  # the namespace is deleted: its model, pods and policy go
    new = replace(model("m2", 1, weights={"sizeMiB": 2048}), uid="uid-new")
    kube.models = [new]
    rec.reconcile([new], nodes, [])
    assert kube.policies == ["ns", "ns"]


def test_a_model_refused_for_days_never_fails_everyones_pass() -> None:
    """Its 1,025th refusal in a row (5 minutes apart: 3.5 days at a full quota) made ``1.0 * 2 ** 1024``,
    which no float holds: OverflowError in every pass, whose statuses then never went out for anyone."""
    m = model("a", 1, weights={"sizeMiB": 4096})
    kube = QuotaKube([m])
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=0.0), kube=kube)  # type: ignore[arg-type]
    first = rec.reconcile([m], [node("n1")], [])
    assert degraded(first.statuses[0])["reason"] == "Forbidden"
    (key,) = rec._failures
    rec._failures[key] = replace(rec._failures[key], attempts=1024)
    again = rec.reconcile([m], [node("n1")], [])  # no wait: retried at once, and refused
    assert rec._failures[key].attempts == 1025 and "retrying in 0s" in degraded(again.statuses[0])["message"]


@pytest.mark.parametrize("attempts", [1, 2, 9, 10, 1024, 1025, 10**6])
def test_backoff_doubles_from_its_first_wait_up_to_its_cap(attempts: int) -> None:
    from vnpu.backoff import backoff_seconds

    assert backoff_seconds(attempts, 1.0, 300.0) == min(300.0, 2.0 ** min(attempts - 1, 60))
