"""A PodDisruptionBudget per InferenceModel, so that a node drain takes a model's replicas one at a time.

The packer places a model's replicas densely: several on one node, sharing one weight copy on one
device. ``kubectl drain`` and the Cluster Autoscaler's scale-down evict pods through the Eviction API,
which, with no budget, evicts every replica of a model on the node at once, and the model is down until
the operator has placed them again. With this budget the API server refuses (429) the eviction of a
second replica while one is missing; ``kubectl drain`` retries it every 5 s, the operator places the
evicted replica on another node meanwhile (a cordoned node takes no new replica:
:mod:`vnpu.operator.packing`), and once that one is Ready the next replica may go.

The budget of a model:

* is ``vnpu-<model>`` (:func:`budget_name`, the name of its Service too) in the model's namespace,
  labelled ``app.kubernetes.io/managed-by=vnpu-operator`` and ``vnpu.io/model``, and controlled by the
  model: garbage collection deletes it with the model, so the operator never deletes one;
* selects exactly the model's replica pods (:func:`vnpu.operator.pods.replica_selector`, its Service's
  selector), never its weight-holders or placeholders;
* allows ``maxUnavailable: 1``. The disruption controller counts the pods expected through the
  replicas' controller ownerReference, the InferenceModel's scale subresource (``spec.replicas``), so the
  budget follows every scale without a write. A model of one replica may still be evicted (it has
  nothing to fail over to; blocking the drain for ever would be worse);
* has ``unhealthyPodEvictionPolicy: AlwaysAllow``: a replica that is not Ready (crash-looping, stuck
  loading) may always be evicted, so a broken model never blocks a drain; only Ready replicas count
  against the budget.

A model at zero replicas keeps its budget: it then selects no pod and blocks nothing, and the model
woken from zero (by the gateway, possibly many times a day) is covered from its first replica on, with
no write in the way of the wake.

The operator keeps it as it wants it: created when missing, its spec put back when someone edits it
(an informer watches budgets by the operator's label, so an edit is noticed at once). A budget of that
name that the model does not control, or without the operator's label, is someone else's and never
touched: the model's ``Degraded`` condition says so (reason :data:`REASON_NAME_TAKEN`), and the name is
tried again after a backoff. A write of a budget the API server refuses backs off the budget alone: it
never holds up the model's pods (:func:`vnpu.operator.planner.budget_failure_key`).

Pure, like :mod:`vnpu.operator.services`: the planner decides, the reconciler writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vnpu import api
from vnpu.operator.pods import owner_references, replica_selector
from vnpu.operator.state import ObservedBudget, ObservedModel, parse_budget

#: Replicas of one model a drain may take at once (the rest keep serving).
MAX_UNAVAILABLE = 1
#: Replicas that are not Ready may always be evicted: a crash-looping model never blocks a drain.
UNHEALTHY_POD_EVICTION_POLICY = "AlwaysAllow"
#: Why a model has no budget: the name is someone else's PodDisruptionBudget.
REASON_NAME_TAKEN = "DisruptionBudgetNameTaken"


def budget_name(model: str) -> str:
    """``vnpu-<model>``, as its Service (:func:`vnpu.api.service_name`): ``kubectl get svc,pdb`` shows
    one name per model."""
    return api.service_name(model)


@dataclass(frozen=True)
class BudgetIntent:
    """The budget of ``owner`` to write: created, or (``update``) its spec put back."""

    owner: ObservedModel
    update: bool = False

    @property
    def namespace(self) -> str:
        return self.owner.namespace

    @property
    def name(self) -> str:
        return budget_name(self.owner.name)

    @property
    def models(self) -> tuple[str, ...]:
        return (f"{self.owner.namespace}/{self.owner.name}",)


def spec(model: str) -> dict[str, Any]:
    """The spec of ``model``'s budget."""
    return {
        "selector": {"matchLabels": replica_selector(model)},
        "maxUnavailable": MAX_UNAVAILABLE,
        "unhealthyPodEvictionPolicy": UNHEALTHY_POD_EVICTION_POLICY,
    }


def manifest(intent: BudgetIntent) -> dict[str, Any]:
    """The budget of ``intent``'s model."""
    model = intent.owner
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": intent.name,
            "namespace": model.namespace,
            "labels": {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE, api.LABEL_MODEL: model.name},
            "ownerReferences": owner_references([model]),
        },
        "spec": spec(model.name),
    }


def _spec_of(budget: ObservedBudget) -> tuple[Any, ...]:
    return (
        budget.selector,
        budget.max_unavailable,
        budget.min_available,
        budget.unhealthy_pod_eviction_policy,
    )


def as_wanted(budget: ObservedBudget, model: str) -> bool:
    """Whether ``budget``'s spec is the one ``model``'s budget has (compared as parsed, as the informer
    sees it)."""
    wanted = parse_budget({"metadata": {"name": budget.name}, "spec": spec(model)})
    return _spec_of(budget) == _spec_of(wanted)


def ours(budget: ObservedBudget, model: ObservedModel) -> bool:
    """Whether ``budget`` is ``model``'s own: controlled by it and labelled by the operator (the
    operator may change no other: the chart's operator-scope policy)."""
    return budget.managed and budget.controller_uid == model.uid


def plan_budgets(
    models: Sequence[ObservedModel], budgets: Mapping[tuple[str, str], ObservedBudget]
) -> list[BudgetIntent]:
    """The writes that give every model (not being deleted) its budget as wanted, from the budgets
    observed (keyed by (namespace, name)). One of that name that is not the model's is planned as a
    create: the API server's AlreadyExists, and a look at what holds the name, tell the model why."""
    intents = []
    for m in models:
        if m.deleting:
            continue
        found = budgets.get((m.namespace, budget_name(m.name)))
        if found is None or (not found.terminating and not ours(found, m)):
            intents.append(BudgetIntent(m))
        elif found.terminating:
            continue  # an earlier model's of that name, being collected: created again once gone
        elif not as_wanted(found, m.name):
            intents.append(BudgetIntent(m, update=True))
    return intents


def taken_message(intent: BudgetIntent, found: ObservedBudget) -> str:
    """Why the model has no budget: the name is held by ``found``, which is not its own."""
    whose = (
        f"is not labelled {api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}"
        if not found.managed
        else "is controlled by another object"
    )
    return (
        f"PodDisruptionBudget {intent.name} exists in {intent.namespace} and {whose}: it is left as it is, "
        "and a drain may evict all of this model's replicas on a node at once until it is renamed or "
        "deleted"
    )
