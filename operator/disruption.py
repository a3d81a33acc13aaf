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
* has an integer ``minAvailable``: the model's replica pods less one, counted as the pass leaves them
  (:func:`replica_pods`: the live ones it keeps, and those it places, a rollout's surge included), and
  no more than ``spec.replicas`` less one (:func:`min_available`). With an integer ``minAvailable``
  the disruption controller counts the pods the budget selects and reads no scale subresource, so a
  drain takes one at a time of the pods that exist. Not ``maxUnavailable: 1``: against it the
  controller expects ``spec.replicas`` pods (the scale subresource), so a replica never placed (no
  room, refused by a quota) counted as one already disrupted, and a model of ``replicas: 1000`` (the
  right to edit an InferenceModel is all it takes) made every node holding one of its Ready replicas
  undrainable, and those replicas' weight-holders with them. A missing replica blocks nothing; a model
  of one pod may still be evicted (it has nothing to fail over to; blocking the drain for ever would be
  worse); and the cap keeps a surge pod that never gets Ready (a rollout to a broken template) from
  holding the old replicas for ever;
* has ``unhealthyPodEvictionPolicy: AlwaysAllow``: a replica that is not Ready (crash-looping, stuck
  loading) may always be evicted, so a broken model never blocks a drain; only Ready replicas count
  against the budget.

An evicted replica is terminating and no longer counts, but the replacement the same pass places on
another node does (a planned pod counts before it exists, as does one waiting for a terminating pod of
its name to go): the count stays, and the next eviction waits until the replacement is Ready. Only
when the evicted replica fits nowhere does the count drop, and the drain goes on. A model whose writes
were refused (a quota on pods), until they go through, and a frozen model (no estimate) count the pods
they have: a pod refused is a replica missing.

So the budget's spec is written when that count changes (a scale, a replica placed or given up), never
on readiness. A model at zero replicas keeps its budget: it then selects no pod and blocks nothing,
and the model woken from zero (by the gateway, possibly many times a day) is covered from its first
replica on with ``minAvailable: 0`` as at zero: no write in the way of the wake.

The operator keeps it as it wants it: created when missing, its spec put back when someone edits it or
the count changes (an informer watches budgets by the operator's label, so an edit is noticed at once;
a budget of an older operator, ``maxUnavailable: 1``, is put back once in this shape). A budget of that
name that the model does not control, or without the operator's label, is someone else's and never
touched: the model's ``Degraded`` condition says so (reason :data:`REASON_NAME_TAKEN`), and the name is
tried again after a backoff. A write of a budget the API server refuses backs off the budget alone: it
never holds up the model's pods (:func:`vnpu.operator.planner.budget_failure_key`).

A budget per weight-holder pod too. The replicas of a share group on one device map the weights its
holder holds; evicted with them still there, the holder takes every one of them out of service at once
(the replica's supervisor loses its lease and stops serving, :mod:`vnpu.runtime.supervisor`), and the
operator would start it again on the node being drained, where it stays Pending. The budget of a
holder:

* is named as the holder pod (:func:`holder_budget_name`), in its namespace, labelled as the operator's
  and with the holder's role, share group and ``vnpu.io/holder``, and controlled by the holder pod (no
  ``blockOwnerDeletion``): garbage collection deletes it with the pod;
* selects that pod alone, by its ``vnpu.io/holder`` label (:func:`vnpu.operator.pods.holder_pod_selector`;
  a holder from before that label gets it, :func:`holder_labels`);
* allows no disruption (``minAvailable: 1``) while a replica maps the holder (:func:`holders_in_use`: a
  replica that is neither terminating nor finished names it), and any once none does
  (``minAvailable: 0``, patched: no delete). An integer ``minAvailable`` needs no scale subresource: the
  disruption controller counts the pods the budget selects. So a drain takes the replicas first, one at
  a time under the model's budget, the operator places each again elsewhere, and the holder goes last
  (the operator usually deletes it itself once the last replica is placed elsewhere);
* has ``unhealthyPodEvictionPolicy: AlwaysAllow``: a holder that is not Ready serves nobody.

Its writes back off under the budget failure keys of the models that own the holder, and wait only
while every one of them waits: one model's budget refused (its name taken) never leaves the other
models' replicas without their holder's.

Pure, like :mod:`vnpu.operator.services`: the planner decides, the reconciler writes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from vnpu import api
from vnpu.operator.pods import PodIntent, holder_pod_selector, owner_references, replica_selector
from vnpu.operator.state import ObservedBudget, ObservedModel, ObservedPod, parse_budget

#: Replicas of one model a drain may take at once (the rest keep serving).
DISRUPTIONS = 1
#: Replicas that are not Ready may always be evicted: a crash-looping model never blocks a drain.
UNHEALTHY_POD_EVICTION_POLICY = "AlwaysAllow"
#: Why a model has no budget: the name is someone else's PodDisruptionBudget.
REASON_NAME_TAKEN = "DisruptionBudgetNameTaken"
#: A model's budget or a weight-holder's (:func:`_write` decides both alike).
Intent = TypeVar("Intent", "BudgetIntent", "HolderBudgetIntent")


def budget_name(model: str) -> str:
    """``vnpu-<model>``, as its Service (:func:`vnpu.api.service_name`): ``kubectl get svc,pdb`` shows
    one name per model."""
    return api.service_name(model)


@dataclass(frozen=True)
class BudgetIntent:
    """The budget of ``owner`` to write, at ``min_available`` (:func:`min_available`): created, or
    (``update``) its spec put back."""

    owner: ObservedModel
    min_available: int = 0
    update: bool = False

    def spec(self) -> dict[str, Any]:
        return spec(self.owner.name, self.min_available)

    def manifest(self) -> dict[str, Any]:
        return manifest(self)

    def owns(self, found: ObservedBudget) -> bool:
        return ours(found, self.owner)

    @property
    def namespace(self) -> str:
        return self.owner.namespace

    @property
    def name(self) -> str:
        return budget_name(self.owner.name)

    @property
    def models(self) -> tuple[str, ...]:
        return (f"{self.owner.namespace}/{self.owner.name}",)


def spec(model: str, min_available: int = 0) -> dict[str, Any]:
    """The spec of ``model``'s budget at ``min_available`` (:func:`min_available`; 0: no pod, or one)."""
    return {
        "selector": {"matchLabels": replica_selector(model)},
        "minAvailable": min_available,
        "unhealthyPodEvictionPolicy": UNHEALTHY_POD_EVICTION_POLICY,
    }


def min_available(pods: int, replicas: int | None) -> int:
    """The ``minAvailable`` of the budget of a model of ``pods`` replica pods (:func:`replica_pods`) and
    ``spec.replicas`` ``replicas`` (None when its spec cannot be read): all of them but one, never more
    than ``replicas`` less one (a rollout's surge pods are not owed to anyone), never below 0."""
    counted = pods if replicas is None else min(pods, replicas)
    return max(0, counted - DISRUPTIONS)


def replica_pods(
    pods: Iterable[ObservedPod], planned: Iterable[PodIntent], deleted: Collection[tuple[str, str]]
) -> Counter[tuple[str, str]]:
    """(namespace, model) -> the model's replica pods once the pass's writes are done: those of ``pods``
    that are neither terminating nor finished nor ``deleted`` ((namespace, name)), and the replicas
    ``planned`` (the pods the pass wants, created now or kept; one that waits for a terminating pod
    of its name to go counts already). Each pod once, by (namespace, name)."""
    names: dict[tuple[str, str], str] = {}  # (namespace, pod) -> its model
    for p in pods:
        gone = p.terminating or p.finished or (p.namespace, p.name) in deleted
        if p.role == api.ROLE_REPLICA and p.model and not gone:
            names[(p.namespace, p.name)] = p.model
    for i in planned:
        if i.role == api.ROLE_REPLICA:
            names[(i.namespace, i.name)] = i.owners[0].name
    return Counter((namespace, model) for (namespace, _), model in names.items())


def _budget(
    name: str, namespace: str, labels: Mapping[str, str], owners: list[dict[str, Any]], spec: dict[str, Any]
) -> dict[str, Any]:
    """A PodDisruptionBudget of the operator's (its managed-by label beside ``labels``)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE, **labels},
            "ownerReferences": owners,
        },
        "spec": spec,
    }


def manifest(intent: BudgetIntent) -> dict[str, Any]:
    """The budget of ``intent``'s model."""
    model = intent.owner
    labels = {api.LABEL_MODEL: model.name}
    return _budget(intent.name, model.namespace, labels, owner_references([model]), intent.spec())


def _spec_of(budget: ObservedBudget) -> tuple[Any, ...]:
    return (
        budget.selector,
        budget.max_unavailable,
        budget.min_available,
        budget.unhealthy_pod_eviction_policy,
    )


def _has_spec(budget: ObservedBudget, wanted: Mapping[str, Any]) -> bool:
    """Whether ``budget``'s spec is ``wanted`` (compared as parsed, as the informer sees it)."""
    return _spec_of(budget) == _spec_of(parse_budget({"metadata": {"name": budget.name}, "spec": wanted}))


def as_wanted(budget: ObservedBudget, model: str, min_available: int = 0) -> bool:
    """Whether ``budget``'s spec is the one ``model``'s budget has at ``min_available``."""
    return _has_spec(budget, spec(model, min_available))


def ours(budget: ObservedBudget, model: ObservedModel) -> bool:
    """Whether ``budget`` is ``model``'s own: controlled by it and labelled by the operator (the
    operator may change no other: the chart's operator-scope policy)."""
    return budget.managed and budget.controller_uid == model.uid


def plan_budgets(
    models: Sequence[ObservedModel],
    budgets: Mapping[tuple[str, str], ObservedBudget],
    pods: Mapping[tuple[str, str], int],
) -> list[BudgetIntent]:
    """The writes that give every model (not being deleted) its budget as wanted, from the budgets
    observed (keyed by (namespace, name)) and the models' replica pods as the pass leaves them (keyed by
    (namespace, model): :func:`replica_pods`). One of that name that is not the model's is planned as a
    create: the API server's AlreadyExists, and a look at what holds the name, tell the model why."""
    writes = (
        _write(BudgetIntent(m, min_available(pods.get((m.namespace, m.name), 0), _replicas(m))), budgets)
        for m in models
        if not m.deleting
    )
    return [w for w in writes if w is not None]


def _replicas(model: ObservedModel) -> int | None:
    return model.spec.replicas if model.spec is not None else None


def _write(intent: Intent, budgets: Mapping[tuple[str, str], ObservedBudget]) -> Intent | None:
    """What makes the budget of ``intent``'s name as ``intent`` wants it, from the budgets observed: a
    create when there is none, or when someone else's holds the name (the API server's AlreadyExists
    then tells why); none while an earlier one of that name is being collected (created again once
    gone) or when it is already as wanted; else its spec put back (``update``)."""
    found = budgets.get((intent.namespace, intent.name))
    if found is None or (not found.terminating and not intent.owns(found)):
        return intent
    if found.terminating or _has_spec(found, intent.spec()):
        return None
    return replace(intent, update=True)


def taken_message(intent: BudgetIntent | HolderBudgetIntent, found: ObservedBudget) -> str:
    """Why the model (or weight-holder) has no budget: the name is held by ``found``, which is not its
    own."""
    whose = (
        f"is not labelled {api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}"
        if not found.managed
        else "is controlled by another object"
    )
    risk = (
        "all of this model's replicas on a node at once"
        if isinstance(intent, BudgetIntent)
        else f"weight-holder {intent.holder.name}, and with it every replica that maps it,"
    )
    return (
        f"PodDisruptionBudget {intent.name} exists in {intent.namespace} and {whose}: it is left as it is, "
        f"and a drain may evict {risk} until it is renamed or deleted"
    )


# -- weight-holders ----------------------------------------------------------------------------------


def holder_budget_name(holder: str) -> str:
    """The holder pod's own name: ``kubectl get pod,pdb`` shows one name per holder."""
    return holder


def holders_in_use(pods: Sequence[ObservedPod]) -> set[tuple[str, str]]:
    """(namespace, holder pod name) of the weight-holders a replica maps: one of ``pods`` that is a
    replica, not terminating (a replica being evicted or deleted no longer counts: its successor maps
    the holder of its own device) and not finished, and names that holder (vnpu.io/weight-holder)."""
    return {
        (p.namespace, p.weight_holder)
        for p in pods
        if p.role == api.ROLE_REPLICA and p.weight_holder and not p.terminating and not p.finished
    }


def holder_spec(holder: str, in_use: bool) -> dict[str, Any]:
    """The spec of the budget of the holder pod ``holder``: no disruption while ``in_use``, any once not."""
    return {
        "selector": {"matchLabels": holder_pod_selector(holder)},
        "minAvailable": 1 if in_use else 0,
        "unhealthyPodEvictionPolicy": UNHEALTHY_POD_EVICTION_POLICY,
    }


@dataclass(frozen=True)
class HolderBudgetIntent:
    """The budget of the weight-holder pod ``holder`` to write: created, or (``update``) its spec set to
    the one ``in_use`` calls for. ``models`` ("namespace/name") own the holder: its writes back off
    under their budget failure keys."""

    holder: ObservedPod
    in_use: bool
    models: tuple[str, ...]
    update: bool = False

    @property
    def namespace(self) -> str:
        return self.holder.namespace

    @property
    def name(self) -> str:
        return holder_budget_name(self.holder.name)

    def spec(self) -> dict[str, Any]:
        return holder_spec(self.holder.name, self.in_use)

    def manifest(self) -> dict[str, Any]:
        h = self.holder
        labels = {
            api.LABEL_ROLE: api.ROLE_WEIGHTS,
            api.LABEL_SHARE_GROUP: h.share_group or "",
            api.LABEL_HOLDER: h.name,
        }
        # No blockOwnerDeletion: it would need the update of pods/finalizers, and nothing waits on the
        # budget.
        owner = {"apiVersion": "v1", "kind": "Pod", "name": h.name, "uid": h.uid, "controller": True}
        return _budget(self.name, h.namespace, labels, [owner], self.spec())

    def owns(self, found: ObservedBudget) -> bool:
        """Whether ``found`` is this holder's own: controlled by the pod and labelled by the operator."""
        return found.managed and found.controller_uid == self.holder.uid


def plan_holder_budgets(
    pods: Sequence[ObservedPod],
    models: Sequence[ObservedModel],
    budgets: Mapping[tuple[str, str], ObservedBudget],
) -> list[HolderBudgetIntent]:
    """The writes that give every live weight-holder of ``pods`` (ours) its budget as wanted, from the
    budgets observed (keyed by (namespace, name)). A holder that no live model owns is on its way out
    (garbage collection, or the operator's delete): it gets none. One of that name that is not the
    holder's is planned as a create, as for a model (:func:`plan_budgets`)."""
    used = holders_in_use(pods)
    model_of_uid = model_keys_by_uid(m for m in models if not m.deleting)
    intents = []
    for h in sorted(pods, key=lambda p: (p.namespace, p.name)):
        if h.role != api.ROLE_WEIGHTS or h.terminating or h.finished or not h.uid:
            continue
        owners = owning_models(h, model_of_uid)
        if not owners:
            continue
        write = _write(HolderBudgetIntent(h, (h.namespace, h.name) in used, owners), budgets)
        if write is not None:
            intents.append(write)
    return intents


def model_keys_by_uid(models: Iterable[ObservedModel]) -> dict[str, str]:
    """uid -> "namespace/name" of ``models``."""
    return {m.uid: f"{m.namespace}/{m.name}" for m in models}


def owning_models(pod: ObservedPod, model_of_uid: Mapping[str, str]) -> tuple[str, ...]:
    """The models ("namespace/name", sorted) among ``model_of_uid`` that own ``pod``."""
    return tuple(sorted({model_of_uid[u] for u in pod.owner_uids if u in model_of_uid}))


def holder_labels(pods: Sequence[ObservedPod]) -> dict[tuple[str, str], dict[str, str]]:
    """(namespace, name) -> the label to add to a live weight-holder created before ``vnpu.io/holder``:
    its budget selects it by that label."""
    return {
        (h.namespace, h.name): {api.LABEL_HOLDER: h.name}
        for h in pods
        if h.role == api.ROLE_WEIGHTS and not h.terminating and not h.finished and h.holder_label != h.name
    }
