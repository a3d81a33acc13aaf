"""One reconcile pass as a pure function: observed cluster state in, typed intents and statuses out.

    plan(models, nodes, pods, estimates, config, now, secrets, failures, services, budgets) -> Plan

Steps: turn observed state into the packer's input (devices with what is really free on them, demands
per model, the current placements for stability), pack, derive the desired pods as typed
:class:`~vnpu.operator.pods.PodIntent` values (weight-holders, then replicas, then placeholders: the
order they are created in), one key Secret per (namespace, share group), one Service per model
(:mod:`vnpu.operator.services`), one PodDisruptionBudget per model and one per weight-holder pod
(:mod:`vnpu.operator.disruption`), diff them against what exists, and compute each model's status and
the events worth posting. No API calls here: the reconciler applies the plan, and tests assert on it
directly.

What the plan never does, because each would be a needless outage:

* delete a running model's pods because its estimate failed (its pods are kept and counted as held
  until the estimate works again; status says ``Degraded``), nor while its new spec's files are read
  (:class:`~vnpu.memory.EstimatePending`: kept the same way, and rolled once the estimate is known);
* re-place the pods of a NotReady node before ``node_grace_seconds`` (default 300 s, as Kubernetes'
  taint-based eviction) have passed;
* replace all replicas at once on a spec change: replicas of an older pod template are rolled with
  ``maxSurge``/``maxUnavailable`` (default 25%/0), counting only Ready replicas as available;
* write for a model whose last write the API server refused before its backoff has passed (other
  models are planned and written as usual; a refused placeholder backs off the model's placeholders
  only, so a quota its placeholder exceeds never holds up its replicas).

A group's pods are created only once its Secret exists, and their names carry the Secret's uid: the
key is mounted from it, so a re-created Secret (a new key) rolls the group's holders and replicas
together instead of leaving replicas that cannot authenticate their holder.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vnpu import api, sharing
from vnpu.memory import EstimateError, EstimatePending, MemoryEstimate
from vnpu.operator import disruption, forecast, network_policy, packing, scaling
from vnpu.operator.config import PLACEHOLDER_PRIORITY_CLASS, OperatorConfig
from vnpu.operator.placeholders import plan_placeholders
from vnpu.operator.pods import (
    NODE_LOST_TAINTS,
    ModelRef,
    Owner,
    PodIntent,
    holder_pod_name,
    owner_references,
    replica_pod_name,
    short_hash,
    weights_label,
)
from vnpu.operator.reported import merge_patch, merge_patch_to
from vnpu.operator.services import SelectorUpdate, ServiceIntent, plan_service
from vnpu.operator.spec import RECREATE, ModelSpec, default_share_group
from vnpu.operator.state import (
    ObservedBudget,
    ObservedModel,
    ObservedNode,
    ObservedPod,
    ObservedSecret,
    ObservedService,
)
from vnpu.operator.status import Event, ModelOutcome, PodProblem, Rollout, build_status

__all__ = ["Event", "Failure", "Plan", "default_share_group", "plan"]


@dataclass(frozen=True)
class Failure:
    """A write for a model that the API server refused: the model is left alone until ``retry_at``
    (its backoff), and its status carries ``message`` (the server's own words)."""

    message: str
    retry_at: dt.datetime
    attempts: int = 1
    reason: str = "ApiError"  #: the condition's reason: Forbidden, Invalid, ... (from the HTTP status)
    uid: str = ""  #: the model's: a model deleted and created again under its name starts afresh


#: Suffix of a model's key in ``failures`` for its placeholders' writes: a refused placeholder (a quota
#: that the model's pods fit but its weights-sized placeholder does not, a restricted PriorityClass)
#: backs off the model's placeholders only, never the writes of the replicas and holders it serves with.
PLACEHOLDERS_FAILURE = "/placeholders"
#: Suffix of a model's key in ``failures`` for its PodDisruptionBudget's writes (a quota on budgets, a
#: policy engine, the name taken): they back off the budget only. A model without its budget serves as
#: before; one whose pods waited on a refused budget would be down longer than any drain takes it.
BUDGET_FAILURE = "/disruption-budget"


def placeholders_failure_key(model: str) -> str:
    """The ``failures`` key of the placeholders of ``model`` ("namespace/name")."""
    return model + PLACEHOLDERS_FAILURE


def budget_failure_key(model: str) -> str:
    """The ``failures`` key of the PodDisruptionBudget of ``model`` ("namespace/name")."""
    return model + BUDGET_FAILURE


def failure_model(key: str) -> str:
    """The model ("namespace/name") a ``failures`` key belongs to. Neither a namespace nor a name has a
    '/', so only a key with two is the key of a part of a model, its placeholders' or its budget's (a
    model may be named ``placeholders``)."""
    return key.rsplit("/", 1)[0] if key.count("/") == 2 else key


def model_failure(failures: Mapping[str, Failure], model: str) -> Failure | None:
    """What the model's status says was refused: its own writes first, then its placeholders', then its
    budget's."""
    return (
        failures.get(model)
        or failures.get(placeholders_failure_key(model))
        or failures.get(budget_failure_key(model))
    )


def _parts_in_backoff(failures: Mapping[str, Failure], now: dt.datetime, part: str) -> set[str]:
    """The models ("namespace/name") whose ``part`` (:data:`PLACEHOLDERS_FAILURE`,
    :data:`BUDGET_FAILURE`) waits out a backoff."""
    return {
        failure_model(k)
        for k, f in failures.items()
        if f.retry_at > now and failure_model(k) != k and k.endswith(part)
    }


@dataclass(frozen=True)
class PodDeletion:
    namespace: str
    name: str
    role: str
    reason: str
    force: bool = False  #: skip the grace period: the pod's node is gone or lost for good
    models: tuple[str, ...] = ()  #: whose deletion this is ("namespace/name")
    #: The uid of the pod seen: deleted only if it is still that one (not one made again since under
    #: its name, by a new leader or by a pass this cache has not seen yet).
    uid: str = ""


@dataclass(frozen=True)
class StatusUpdate:
    model: ObservedModel
    #: The merge patch to write: the new status, with None for each key the server holds and it lacks.
    status: Mapping[str, Any]
    events: tuple[Event, ...]
    placed: int
    unplaced: int
    saved_mib: int
    changed: bool


@dataclass(frozen=True)
class OwnersUpdate:
    """New ownerReferences for an existing weight-holder or key Secret: the models using it changed (a
    model of the group joined later, or one is being deleted). Without this, a holder first created for
    one model would be garbage-collected with it while other models' replicas still map its memory."""

    namespace: str
    name: str
    owner_references: list[dict[str, Any]]
    kind: str = "Pod"  #: Pod or Secret
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelsUpdate:
    """Labels to add to an existing pod: a weight-holder from before ``vnpu.io/weights`` gets it, or
    its model's warm Service (which selects it) would lose it until the holder is replaced; one from
    before ``vnpu.io/holder`` gets it, or its PodDisruptionBudget would select nothing."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class SecretIntent:
    """A share group's key Secret to create; the reconciler draws the key (the plan stays pure)."""

    namespace: str
    share_group: str
    owners: tuple[ModelRef, ...]

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(o.key for o in self.owners)


@dataclass(frozen=True)
class SecretDeletion:
    namespace: str
    name: str
    share_group: str
    #: The uid of the Secret seen: deleted only if it is still that one (not one made again since).
    uid: str = ""


@dataclass
class Plan:
    #: Pods to create, in creation order: weight-holders, then replicas, then placeholders.
    create: list[PodIntent] = field(default_factory=list)
    delete: list[PodDeletion] = field(default_factory=list)
    set_owners: list[OwnersUpdate] = field(default_factory=list)
    create_secrets: list[SecretIntent] = field(default_factory=list)
    delete_secrets: list[SecretDeletion] = field(default_factory=list)
    #: Services to create: one per served model that has none.
    create_services: list[ServiceIntent] = field(default_factory=list)
    #: The models' Services whose selector is not the one they want, and pods missing a label.
    update_services: list[SelectorUpdate] = field(default_factory=list)
    set_labels: list[LabelsUpdate] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    unplaced_slices: int = 0
    #: Seconds until something time-based changes the plan (a node's grace period, a backoff).
    requeue_after: float | None = None
    #: Idle models to scale to 0 (through their scale subresource).
    scale_down: list[scaling.ScaleDown] = field(default_factory=list)
    #: Node pool -> weight-holders kept warm for groups with no replicas.
    warm_holders: dict[str, int] = field(default_factory=dict)
    #: NetworkPolicies to keep (``--network-policy``): one per namespace with models, before its pods.
    network_policies: list[network_policy.NetworkPolicyIntent] = field(default_factory=list)
    #: PodDisruptionBudgets to create or put back: one per model (vnpu.operator.disruption).
    budgets: list[disruption.BudgetIntent] = field(default_factory=list)
    #: ... and one per weight-holder pod, set by whether a replica maps it.
    holder_budgets: list[disruption.HolderBudgetIntent] = field(default_factory=list)
    #: Per model ("namespace/name"): what :func:`restatus` needs to redo its status after the writes.
    outcomes: dict[str, tuple[ObservedModel, ModelOutcome]] = field(default_factory=dict)


def share_group(model: ObservedModel) -> str:
    return model.spec.share_group if model.spec else default_share_group(model.raw_spec)


def model_weights_id(model: ObservedModel, config: OperatorConfig) -> str:
    """What a holder of this model holds: source, dtype on the device, the runtime image, and under
    async offload how (models of equal weights that hold them otherwise never share a holder)."""
    assert model.spec is not None
    spec = model.spec
    held = ""
    if spec.offloaded:
        held = sharing.offload_holding(spec.offload.device_budget_mib or 0, spec.offload.prefetch_depth)
    return sharing.weights_id(
        spec.source.uri, spec.weights_dtype or "", spec.image(config.runtime_image), held
    )


def _holding_generation(spec: ModelSpec) -> str:
    """What an offloaded model's replica templates add (see ``templates`` in :func:`plan`)."""
    return "/offload-holding" if spec.offloaded else ""


def _model_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _group_key(namespace: str, group: str, weights_id: str) -> str:
    """What shares one weight copy: share groups are namespaced (replicas of different namespaces never
    map each other's memory), and only equal weights share even within an explicit group."""
    return f"{namespace}/{group}/{weights_id}"


@dataclass(frozen=True)
class _NodeView:
    """Where pods of a node stand: ``lost`` nodes lose their pods now (gone, or NotReady past the grace
    period); ``suspect`` ones keep them but take no new ones."""

    lost: frozenset[str]
    suspect: Mapping[str, float]  #: node -> seconds left of its grace period


def _node_view(nodes: Sequence[ObservedNode], config: OperatorConfig, now: dt.datetime) -> _NodeView:
    lost, suspect = set(), {}
    for n in nodes:
        if n.ready or n.not_ready_since is None:
            continue
        left = (n.not_ready_since - now).total_seconds() + config.node_grace_seconds
        if left <= 0:
            lost.add(n.name)
        else:
            suspect[n.name] = left
    return _NodeView(frozenset(lost), suspect)


def _packer_nodes(
    nodes: Sequence[ObservedNode],
    held: Mapping[tuple[str, str], int],
    view: _NodeView,
    loaded: Mapping[tuple[str, str], frozenset[str]],
) -> list[packing.Node]:
    out = []
    for n in nodes:
        if n.inventory is None or n.inventory_error:
            continue  # no usable inventory: nothing can be placed there (reported via status)
        devices = tuple(
            packing.Device(
                id=d.id,
                total_slices=d.slices,
                slice_mib=d.slice_mib,
                healthy=d.healthy,
                free_slices=d.slices - held.get((n.name, d.id), 0),
                loaded=loaded.get((n.name, d.id), frozenset()),
            )
            for d in n.inventory.devices
        )
        # Readiness is the grace period's business, not the lifecycle controller's NoExecute taints.
        taints = tuple(t for t in n.taints if t.key not in NODE_LOST_TAINTS)
        out.append(
            packing.Node(
                n.name,
                devices,
                n.labels,
                taints,
                ready=n.name not in view.lost,
                schedulable=n.schedulable and n.ready,
            )
        )
    return out


def _demand(
    model: ObservedModel, estimate: MemoryEstimate, weights_id: str, replicas: int, config: OperatorConfig
) -> packing.Demand:
    assert model.spec is not None
    spec = model.spec
    return packing.Demand(
        model=_model_key(model.namespace, model.name),
        share_group=_group_key(model.namespace, spec.share_group, weights_id),
        replicas=replicas,
        replica_mib=estimate.per_replica_mib,
        # A holder that answers requests needs memory for that beside the weights, on every device.
        weight_mib=_holder_mib(spec, estimate),
        priority=spec.priority,
        node_selector=dict(spec.placement.node_selector),
        tolerations=tuple(t.for_packer() for t in spec.placement.tolerations),
        spread=spec.placement.spread,
        # Whose replicas its priority may evict: its namespace's (--preemption=cluster: anyone's).
        tenant=model.namespace if config.preemption == "namespace" else "",
    )


def _holder_mib(spec: ModelSpec, estimate: MemoryEstimate) -> int:
    """Device MiB a weight-holder of this model takes: the weights it keeps there, and beside them what
    its process needs, as a replica's does (``memory.overheadMiB``: the framework and the device
    context, which every process on the device has), or, answering requests itself, that and memory
    to serve one sequence (:attr:`MemoryEstimate.holder_serving_mib`, which includes the overhead)."""
    extra = estimate.holder_serving_mib if spec.holder_serves else estimate.overhead_mib
    return estimate.device_weights_mib + extra


def _group_weights_mib(
    active: Mapping[str, tuple[ObservedModel, MemoryEstimate]], group_of: Mapping[str, str]
) -> dict[str, int]:
    """Group key -> MiB of the weights its holders keep on the device (the largest any of its models
    sizes): what views count as shared and, under async offload, the resident cap; the holder's
    slices hold this and its own needs (:func:`_holder_mib`)."""
    out: dict[str, int] = {}
    for key, (_, est) in active.items():
        out[group_of[key]] = max(out.get(group_of[key], 0), est.device_weights_mib)
    return out


def _device_of(nodes: Sequence[ObservedNode]) -> dict[tuple[str, str], str]:
    """(node, extended resource) -> device id, from the device plugins' inventories."""
    return {
        (n.name, d.resource): d.id
        for n in nodes
        if n.inventory is not None
        for d in n.inventory.devices
        if d.resource
    }


def _holds_memory(p: ObservedPod) -> bool:
    return bool(p.node) and not p.finished


def _requested(p: ObservedPod, device_of: Mapping[tuple[str, str], str]) -> dict[tuple[str, str], int]:
    """(node, device) -> the slices a bound pod's vnpu requests hold there: what the kubelet allocated
    it, whoever wrote the pod (requests of a resource no inventory names are nobody's to place)."""
    held: dict[tuple[str, str], int] = defaultdict(int)
    if _holds_memory(p):
        for resource, slices in p.requests:
            device = device_of.get((p.node or "", resource))
            if device:
                held[(p.node or "", device)] += slices
    return held


def plan(
    models: Sequence[ObservedModel],
    nodes: Sequence[ObservedNode],
    pods: Sequence[ObservedPod],
    estimates: Mapping[tuple[str, str], MemoryEstimate | EstimateError | EstimatePending],
    config: OperatorConfig,
    now: dt.datetime | None = None,
    secrets: Sequence[ObservedSecret] = (),
    failures: Mapping[str, Failure] | None = None,
    services: Sequence[ObservedService] = (),
    budgets: Sequence[ObservedBudget] = (),
) -> Plan:
    now = now or dt.datetime.now(dt.UTC)
    failures = failures or {}
    result = Plan()
    node_by_name = {n.name: n for n in nodes}
    view = _node_view(nodes, config, now)
    # (node, device id) -> the device's extended resource, from the device plugin's inventory
    resource_of = {
        (n.name, d.id): d.resource for n in nodes if n.inventory is not None for d in n.inventory.devices
    }
    device_of = _device_of(nodes)
    ours = [p for p in pods if p.managed]
    foreign = [p for p in pods if not p.managed]
    lost_nodes = {p.node for p in ours if p.node and (p.node not in node_by_name or p.node in view.lost)}
    backoff = {k for k, f in failures.items() if f.retry_at > now and failure_model(k) == k}
    # Models whose placeholders (or budget) were refused: those alone wait out their backoff.
    placeholders_backoff = _parts_in_backoff(failures, now, PLACEHOLDERS_FAILURE)
    budgets_backoff = _parts_in_backoff(failures, now, BUDGET_FAILURE)

    # Models: active (placed by the packer), frozen (running, but no estimate: pods kept as they are).
    active: dict[str, tuple[ObservedModel, MemoryEstimate]] = {}
    frozen: set[str] = set()
    replicas_of: dict[str, list[ObservedPod]] = defaultdict(list)  # model -> its live replica pods
    model_of = {_model_key(m.namespace, m.name): m for m in models}
    for p in ours:
        key = _model_key(p.namespace, p.model or "")
        if p.role == api.ROLE_REPLICA and key in model_of and not p.terminating and _owned(p, model_of[key]):
            replicas_of[key].append(p)
    for m in models:
        key = _model_key(m.namespace, m.name)
        est = estimates.get(m.key)
        if m.deleting:
            continue
        if m.spec is not None and isinstance(est, MemoryEstimate):
            active[key] = (m, est)
        elif replicas_of.get(key):
            frozen.add(key)
    refs = {key: _ref(m, config) for key, (m, _) in active.items()}
    # (namespace, group) -> its key Secret's uid, when the Secret exists and is not going away
    key_uid = {(x.namespace, x.share_group): x.uid for x in secrets if not x.terminating}
    group_of = {
        key: _group_key(m.namespace, m.spec.share_group, refs[key].weights_id)  # type: ignore[union-attr]
        for key, (m, _) in active.items()
    }
    # Groups whose holders answer requests (vnpu.api.holder_serves): such a holder is another pod, and
    # its replicas are of another template, so a change rolls them onto it instead of pulling the
    # holder they map from under them. From every model's spec, sized or not: a model still being sized
    # (after a restart) must not flip its group, rolling the others and loading a second holder.
    serving_groups = {
        _group_key(m.namespace, m.spec.share_group, model_weights_id(m, config))
        for m in models
        if m.spec is not None and not m.deleting and m.spec.holder_serves
    }
    # An offloaded model's holder identity also names how it holds the weights, which an older
    # operator's did not: its replicas, whose env carries the identity, are of another template, so an
    # upgrade rolls them onto the new holder instead of leaving them to look for the old one.
    templates = {
        key: m.spec.template_hash  # type: ignore[union-attr]
        + _key_generation(key_uid, refs[key])
        + ("/serving-holder" if group_of[key] in serving_groups else "")
        + _holding_generation(m.spec)  # type: ignore[arg-type]
        for key, (m, _) in active.items()
    }
    pods_by_name = {(p.namespace, p.name): p for p in ours}
    # Defragmentation's moves in flight: the new pod is the replica's placement; the pod it replaces
    # keeps serving, its memory held, until the new one is Ready (then it goes, below).
    moving_out = _moves_in_flight(ours, active, templates)

    # Current placements of live replica pods of the current template (stability input), and the
    # replicas of older templates (rolled out below).
    current: list[packing.Placement] = []
    current_pod: dict[tuple[str, int], ObservedPod] = {}
    old_of: dict[str, list[ObservedPod]] = defaultdict(list)
    for p in sorted(ours, key=lambda p: (not p.ready, p.name)):  # a ready pod wins a duplicate index
        if p.role != api.ROLE_REPLICA or p.terminating or p.replica is None:
            continue
        key = _model_key(p.namespace, p.model or "")
        if key not in active or (p.namespace, p.name) in moving_out:
            continue
        model, _ = active[key]
        assert model.spec is not None
        if not _is_current(p, model, templates[key]) or not _owned(p, model):
            if p.node not in lost_nodes:
                old_of[key].append(p)
            continue
        if (key, p.replica) in current_pod or not p.node or not p.device:
            continue  # (a scale-down is the packer's: it picks which replicas go)
        current.append(packing.Placement(key, p.replica, p.node, p.device, p.slices, p.bound))
        current_pod[(key, p.replica)] = p

    # Memory the packer may not use: pods it does not place (terminating ones, anyone else's pods with
    # vnpu resources, frozen models' pods, replicas of older templates and the holders they map).
    held: dict[tuple[str, str], int] = defaultdict(int)
    kept_pods: set[tuple[str, str]] = set()  # (namespace, name) of pods kept outside the plan
    for p in foreign:
        for where, slices in _requested(p, device_of).items():
            held[where] += slices
    # A pod with our label is charged below (or by the packer) at what its annotation says; what its
    # requests hold beyond that is held too. Only a pod we did not write differs (requests are immutable):
    # with the chart's pod admission policy off, a tenant could label a pod of its own as ours and
    # under-declare it, and the packer would give its memory to another tenant, whose pods then sit
    # Pending. Our placeholders are not charged: they keep room for the replicas that preempt them. A
    # pod labelled a placeholder that is not at the placeholder class is nobody's to preempt (a tenant's
    # own pod, bound by nodeName at its own priority): charged all it requests.
    for p in ours:
        placeholder = p.role == api.ROLE_PLACEHOLDER
        if placeholder and p.priority_class == PLACEHOLDER_PRIORITY_CLASS:
            continue
        declared = 0 if placeholder else p.slices
        for where, slices in _requested(p, device_of).items():
            held[where] += max(0, slices - (declared if where == (p.node, p.device) else 0))
    outside: list[ObservedPod] = []
    for p in ours:
        key = _model_key(p.namespace, p.model or "")
        if p.terminating or (p.role == api.ROLE_REPLICA and key in frozen):
            outside.append(p)
    outside += [p for key in sorted(old_of) for p in old_of[key]]
    outside += [pods_by_name[k] for k in sorted(moving_out)]
    # The holders these pods map stay, a terminating replica's too: it is finishing the requests it has
    # in flight, and deleted first its holder would wait for it anyway (weights-holder --drain-seconds),
    # keeping a successor of the same name out. It goes once the replica has.
    used_holders = {(p.namespace, p.weight_holder) for p in outside if p.weight_holder}
    outside += [pods_by_name[k] for k in sorted(used_holders) if k in pods_by_name]
    # A model with no estimate this pass (its files still being read after a restart, or a read that
    # failed) keeps the holders it owns, as it keeps its running replicas: uncertainty deletes no pod.
    # At zero replicas that is its warm holder, else gone as "no longer in the plan", its weights loaded
    # again at the next wake.
    unsized = {m.uid for m in models if not m.deleting and _model_key(m.namespace, m.name) not in active}
    outside += [
        p
        for p in ours
        if p.role == api.ROLE_WEIGHTS and not p.terminating and unsized.intersection(p.owner_uids)
    ]
    # Its placeholders stay too (the packer charges them nothing): the autoscaler goes on seeing what
    # the model asks for while its files are read.
    kept_pods |= {
        (p.namespace, p.name)
        for p in ours
        if p.role == api.ROLE_PLACEHOLDER and not p.terminating and unsized.intersection(p.owner_uids)
    }

    # Scale to zero, keep-warm and wake (vnpu.operator.scaling): a group with no replicas keeps one
    # holder when warm; a waking model is offered the device of its group's holder first.
    holders_of = _current_holders(ours, active, refs, group_of, key_uid, lost_nodes, serving_groups)
    activities = {key: scaling.activity(m, now) for key, (m, _) in active.items()}
    demand_of = {key: scaling.demand(m, now) for key, (m, _) in active.items()}
    warm_of, warm_holders = _warm(active, group_of, holders_of, demand_of, nodes, config, now)
    pinned = {(p.namespace, p.name) for p in outside}  # kept for a reason of their own, warm or not
    outside += warm_holders
    outside = list({(p.namespace, p.name): p for p in outside}.values())  # each pod's memory once
    live = {key for key, ps in replicas_of.items() if ps}  # models with a live replica, any template
    wake = _wake_placements(active, group_of, holders_of, current, live, node_by_name)
    for key, act in sorted(activities.items()):
        down = scaling.scale_down(active[key][0], act)
        if down is not None and key not in backoff:
            result.scale_down.append(down)
    for p in outside:
        if not p.terminating:
            kept_pods.add((p.namespace, p.name))
        if p.node and p.device and _holds_memory(p):
            held[(p.node, p.device)] += p.slices

    # Rollouts: how many replicas of the new template each model may have now.
    rollouts: dict[str, Rollout] = {}
    demands = []
    for key, (m, est) in active.items():
        assert m.spec is not None
        want = m.spec.replicas
        old = old_of.get(key, [])
        if old:
            limit = 0 if m.spec.rollout.strategy == RECREATE else want + m.spec.rollout.surge(want) - len(old)
            allowed = max(0, min(want, limit))
        else:
            allowed = want
        demands.append(_demand(m, est, refs[key].weights_id, allowed, config))
    group_mib = packing.group_weight_mib(demands)  # a holder's device MiB: its weights and its needs
    group_weights = _group_weights_mib(active, group_of)
    # A holder that live replicas map stays their device's holder when its group's size now says
    # another: see _resized_holders. Its memory is held at its own size.
    for p in _resized_holders(ours, holders_of, group_mib, nodes, outside):
        outside.append(p)
        kept_pods.add((p.namespace, p.name))
        held[(p.node or "", p.device or "")] += p.slices
    loaded = _loaded_weights(outside, holders_of)
    packer_nodes = _packer_nodes(nodes, held, view, loaded)
    preempt = config.preemption != "never"
    packed = packing.pack(packer_nodes, demands, current, offered=wake, preempt=preempt)
    # A warm holder is a speculative copy: replicas that would wait, or preempt running ones, take its
    # room (else a model at zero replicas held memory more firmly than a running one of any priority).
    reclaimable = [  # (those whose memory ``held`` counts: the ones a second packing can free)
        h for h in warm_holders if (h.namespace, h.name) not in pinned and h.device and _holds_memory(h)
    ]
    reclaimed: set[tuple[str, str]] = set()
    if reclaimable and _shortfall(packed):
        reclaimed, packed = _reclaim_warm(reclaimable, packed, held, outside, holders_of, nodes, view,
                                          lambda n: packing.pack(n, demands, current, offered=wake,
                                                                 preempt=preempt))  # fmt: skip
        if reclaimed:
            for h in reclaimable:
                if (h.namespace, h.name) in reclaimed:
                    held[(h.node or "", h.device or "")] -= h.slices
                    kept_pods.discard((h.namespace, h.name))
            outside = [p for p in outside if (p.namespace, p.name) not in reclaimed]
            warm_holders = [h for h in warm_holders if (h.namespace, h.name) not in reclaimed]
            kept_groups = {g for g, hs in holders_of.items() if hs and hs[0] in warm_holders}
            warm_of = {k: warm and group_of[k] in kept_groups for k, warm in warm_of.items()}
            loaded = _loaded_weights(outside, holders_of)
            packer_nodes = _packer_nodes(nodes, held, view, loaded)
    for h in warm_holders:
        node = node_by_name.get(h.node or "")
        pool = node.labels.get(config.pool_label, scaling.DEFAULT_POOL) if node else scaling.DEFAULT_POOL
        result.warm_holders[pool] = result.warm_holders.get(pool, 0) + 1
    # Defragmentation: a batch of moves only on a settled cluster (every pod of ours Ready, running
    # where the plan keeps it, nothing moving, rolling, lost or backing off), as Karpenter consolidates.
    moves: dict[tuple[str, int], ObservedPod] = {}  # (model, replica) -> the pod a move replaces
    busy = bool(moving_out or old_of or backoff or view.suspect or lost_nodes)
    if config.defragment and not busy and _settled(ours, current_pod, packed):
        drained = packing.drain(packer_nodes, demands, packed, max_moves=config.defragment_max_moves)
        for d in drained.dropped:
            old = current_pod[(d.placement.model, d.placement.replica)]
            moves[(d.placement.model, d.placement.replica)] = old
            kept_pods.add((old.namespace, old.name))  # it serves until its successor is Ready
            if old.weight_holder:
                kept_pods.add((old.namespace, old.weight_holder))
        packed = drained

    packed = _clear_of_namesakes(packed, ours, active, set(current_pod))

    intents: dict[tuple[str, str], PodIntent] = {}
    holder_of: dict[tuple[str, str, str], str] = {}
    kept_holder = _kept_holders(outside, holders_of)
    for h in packed.weight_holders:
        owners = tuple(refs[m] for m in sorted(h.models))
        first = owners[0]
        serves = h.share_group in serving_groups
        kept = kept_holder.get((h.node, h.device, h.share_group))
        if kept is not None:  # the group's weights are loaded there (see _loaded_weights): that holder
            name, slices = kept.name, kept.slices
        else:
            slices = h.slices
            salt = _holder_salt(slices, serves, key_uid, first)
            name = holder_pod_name(first.share_group, first.weights_id, h.node, h.device, salt)
        holder_of[(h.node, h.device, h.share_group)] = name
        if (first.namespace, first.share_group) in key_uid:  # pods that mount the key wait for it
            intents[(first.namespace, name)] = PodIntent(
                api.ROLE_WEIGHTS,
                first.namespace,
                name,
                owners,
                slices,
                resource_of[(h.node, h.device)],
                node=h.node,
                device=h.device,
                weights_mib=group_weights.get(h.share_group, 0),
                host_mib=_host_weights_mib(h.models, active),
                serves=serves,
            )

    placements_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    moved_of: dict[str, list[str]] = defaultdict(list)  # model -> its defragmentation moves this pass
    for a in packed.assignments:
        ref = refs[a.model]
        holder = holder_of.get((a.node, a.device, a.share_group))
        name = replica_pod_name(
            ref.name, a.replica, a.node, a.device, _pod_salt(a.slices, templates[a.model])
        )
        if holder is None or (ref.namespace, ref.share_group) in key_uid:
            intents[(ref.namespace, name)] = PodIntent(
                api.ROLE_REPLICA,
                ref.namespace,
                name,
                (ref,),
                a.slices,
                resource_of[(a.node, a.device)],
                node=a.node,
                device=a.device,
                replica=a.replica,
                holder=holder,
                weights_mib=group_weights.get(a.share_group, 0) if holder else 0,
                template=template_label(templates[a.model]),
                replaces=moves[(a.model, a.replica)].uid if (a.model, a.replica) in moves else None,
            )
        if (a.model, a.replica) in moves:
            old = moves[(a.model, a.replica)]
            moved_of[a.model].append(
                f"moving replica {a.replica} from {old.node}/{old.device} to {a.node}/{a.device} to free "
                f"devices: {old.name} serves until {name} is Ready"
            )
        placements_of[a.model].append(
            {
                "node": a.node,
                "device": a.device,
                "pod": name,
                "slices": a.slices,
                "weightHolder": holder or "",
            }
        )

    unplaced_of: dict[str, list[packing.Unplaced]] = defaultdict(list)
    for u in packed.unplaced:
        unplaced_of[u.model].append(u)
    for key, unplaced in sorted(unplaced_of.items()):
        placeholders = plan_placeholders(refs[key], unplaced, packer_nodes, config.pool_label)
        result.unplaced_slices += placeholders.slices
        # A model's new placeholders wait for the pods it is planned to run: created first, they would
        # take the namespace quota those pods then exceed.
        ns = refs[key].namespace
        planned = {(ns, n) for x in placements_of[key] for n in (x["pod"], x["weightHolder"]) if n}
        waits = not planned <= pods_by_name.keys()
        for i in placeholders.intents if config.placeholders else ():
            if not waits or (i.namespace, i.name) in pods_by_name:
                intents[(i.namespace, i.name)] = i

    # Rolling out: old replicas go as the new ones become Ready (never below replicas - maxUnavailable).
    retiring: dict[tuple[str, str], str] = {}
    for k, successor in sorted(moving_out.items()):
        if successor.ready:
            retiring[k] = f"moved by defragmentation: {successor.name} replaces it and is Ready"
    for key, old in sorted(old_of.items()):
        m, _ = active[key]
        assert m.spec is not None
        want = m.spec.replicas
        new_ready = sum(
            1
            for x in placements_of.get(key, [])
            if (p := pods_by_name.get((m.namespace, x["pod"]))) and p.ready and not p.terminating
        )
        budget = new_ready + sum(1 for p in old if p.ready) - (want - m.spec.rollout.unavailable(want))
        left = 0
        for p in sorted(old, key=lambda p: (p.ready, -(p.replica or 0), p.name)):
            why = "replaced by the new pod template" if _owned(p, m) else _NAMESAKE
            if not p.ready:
                retiring[(p.namespace, p.name)] = f"{why} (not ready)"
            elif budget > 0:
                budget -= 1
                retiring[(p.namespace, p.name)] = why
            else:
                left += 1
        rollouts[key] = Rollout(want, left, m.spec.rollout.describe(want), new_ready)

    # Diff: delete what is neither desired nor kept (force on lost nodes), create what is missing. The
    # pods of a group whose key Secret is missing (deleted by someone) stay until the new Secret exists
    # and their successors can start: a new key rolls the group, it does not take it down first.
    awaiting_key = {(r.namespace, r.share_group) for r in refs.values()} - set(key_uid)
    deletions: list[PodDeletion] = []
    for key_, p in sorted(pods_by_name.items()):
        if p.terminating:
            if p.node in lost_nodes:  # a terminating pod on a lost node never finishes by itself
                deletions.append(_deletion(p, "node lost", force=True))
            continue
        if p.node in lost_nodes:
            deletions.append(_deletion(p, "node lost", force=True))
            continue
        if p.finished:
            # Ended for good (e.g. the kubelet refused it at admission right after a restart, before the
            # device plugin registered again): delete it; the next pass creates it anew under the same
            # name, as a ReplicaSet replaces its failed pods.
            why = f"pod {p.phase.lower()}: {p.problem or 'ended'}"
            deletions.append(_deletion(p, why))
            continue
        if key_ in intents:
            continue
        if key_ in retiring:
            deletions.append(_deletion(p, retiring[key_]))
            continue
        if key_ in kept_pods and key_ not in retiring:
            continue
        if (p.namespace, p.share_group) in awaiting_key:
            continue
        why = WARM_RECLAIMED if key_ in reclaimed else "no longer in the plan"
        deletions.append(_deletion(p, why))
    creations = [i for k, i in sorted(intents.items()) if k not in pods_by_name]
    order = {api.ROLE_WEIGHTS: 0, api.ROLE_REPLICA: 1, api.ROLE_PLACEHOLDER: 2}
    creations.sort(key=lambda i: (order[i.role], i.namespace, i.name))
    # A holder is owned by the models it is planned for and by every other model whose live replicas
    # still map it (an older template's, a frozen model's): else deleting the one planned model would
    # have the garbage collector take it from under the others' running replicas.
    live_models = {_model_key(m.namespace, m.name): m for m in models if not m.deleting}
    mapped_by: dict[tuple[str, str], set[str]] = defaultdict(set)  # (namespace, holder) -> models
    for key, replicas in replicas_of.items():
        for p in replicas:
            if p.weight_holder and key in live_models:
                mapped_by[(p.namespace, p.weight_holder)].add(key)
    owner_updates = []
    for key_, intent in sorted(intents.items()):
        pod = pods_by_name.get(key_)
        if pod is None or pod.role != api.ROLE_WEIGHTS:
            continue
        owners: list[Owner] = [*intent.owners]
        owners += [live_models[k] for k in sorted(mapped_by[key_] - set(intent.models))]
        if set(pod.owner_uids) != {o.uid for o in owners}:
            owner_updates.append(
                OwnersUpdate(key_[0], key_[1], owner_references(owners), models=intent.models)
            )

    # The namespaces' NetworkPolicies, written before their pods (vnpu.operator.network_policy); a
    # model in backoff does not retry it until its backoff has passed.
    if config.network_policy:
        by_namespace: dict[str, list[str]] = defaultdict(list)
        for m in models:
            key = _model_key(m.namespace, m.name)
            if not m.deleting and key not in backoff:
                by_namespace[m.namespace].append(key)
        result.network_policies = network_policy.intents(by_namespace)

    # Models in backoff are left alone: none of their writes until it has passed.
    def waits(i: PodIntent) -> bool:
        # A weight-holder waits only while every model of it waits: one model's backoff (its own
        # replicas refused) must not leave the others' replicas without the holder they map.
        if i.role == api.ROLE_WEIGHTS:
            return backoff.issuperset(i.models)
        if i.role == api.ROLE_PLACEHOLDER and placeholders_backoff.intersection(i.models):
            return True
        return bool(backoff.intersection(i.models))

    result.create = [i for i in creations if not waits(i)]
    result.delete = [d for d in deletions if not backoff.intersection(d.models)]
    result.set_owners = [u for u in owner_updates if not backoff.intersection(u.models)]
    result.set_labels = [
        u
        for u in _holder_labels(holders_of, refs, group_of, pods_by_name, models)
        if not backoff.intersection(u.models)
    ]
    # A frozen model's running pods mount its group's key: it stays an owner of the Secret.
    frozen_of: dict[tuple[str, str], set[str]] = defaultdict(set)  # (namespace, group) -> models
    for key in frozen:
        for p in replicas_of[key]:
            if p.share_group and key in live_models:
                frozen_of[(p.namespace, p.share_group)].add(key)
    also = {group: [live_models[k] for k in sorted(keys)] for group, keys in frozen_of.items()}
    # A model still being sized (files re-read after a restart) names its group too: its Secret stays.
    named = {(m.namespace, m.spec.share_group) for m in models if m.spec is not None and not m.deleting}
    _plan_secrets(result, refs.values(), ours, secrets, backoff, also, named)
    services_by_key = {(s.namespace, s.name): s for s in services}  # (namespace, name) -> Service
    service_of = {
        _model_key(m.namespace, m.name): plan_service(
            m, services_by_key, model_weights_id(m, config) if m.spec else ""
        )
        for m in models
    }
    result.create_services = [
        i for key, v in sorted(service_of.items()) if key not in backoff for i in v.intents
    ]
    result.update_services = [
        u for key, v in sorted(service_of.items()) if key not in backoff for u in v.updates
    ]
    budgets_by_key = {(b.namespace, b.name): b for b in budgets}  # (namespace, name) -> budget
    not_now = backoff | budgets_backoff
    deleted = {(d.namespace, d.name) for d in result.delete}
    # A model's budget follows its replica pods as this pass leaves them, those it places included; a
    # model whose writes were refused (a quota) and have not gone through since counts those it has.
    # It waits for its own backoff only, not the model's: a budget left counting pods that a quota
    # refused, or that were evicted since, would hold every drain of the model's nodes meanwhile.
    refused = {k for k in failures if failure_model(k) == k}
    pods_planned = [i for i in intents.values() if not refused.intersection(i.models)]
    replicas_left = disruption.replica_pods(ours, pods_planned, deleted)
    result.budgets = [
        i
        for i in disruption.plan_budgets(models, budgets_by_key, replicas_left)
        if not budgets_backoff.intersection(i.models)
    ]
    # A holder's budget follows whether a replica maps it; one deleted this pass needs no write (its
    # budget goes with it). It waits only while every model of the holder waits: one model's budget
    # refused (its name taken) must not leave the others' replicas without their holder's.
    result.holder_budgets = [
        i
        for i in disruption.plan_holder_budgets(ours, models, budgets_by_key)
        if not not_now.issuperset(i.models) and (i.namespace, i.holder.name) not in deleted
    ]

    # Statuses and events.
    saved = packed.saved_by_sharing_mib(demands)
    waits = [left for node, left in view.suspect.items() if any(p.node == node for p in ours)]
    waits += [(f.retry_at - now).total_seconds() for f in failures.values() if f.retry_at > now]
    waits += [a.due_in for a in activities.values() if a.due_in]
    result.requeue_after = max(0.5, min(waits)) if waits else None
    pods_of_model: dict[tuple[str, str | None], list[ObservedPod]] = defaultdict(list)
    for p in ours:  # (once: a scan of every pod per model made this loop models x pods)
        pods_of_model[(p.namespace, p.model)].append(p)
    for m in models:
        key = _model_key(m.namespace, m.name)
        est = estimates.get(m.key)
        placed = sorted(placements_of.get(key, []), key=lambda x: x["pod"])
        mine = pods_of_model[(m.namespace, m.name)]
        unwritten = 0
        if key in backoff:  # none of its writes went out: its status says what exists, not the plan
            unwritten = sum(1 for x in placed if (m.namespace, x["pod"]) not in pods_by_name)
            placed = _existing_placements(mine, old_of.get(key, []), moving_out, lost_nodes)
        holders_used = {x["weightHolder"] for x in placed if x["weightHolder"]} | {
            p.weight_holder for p in mine if p.weight_holder and p.role == api.ROLE_REPLICA
        }
        ready = 0
        taken: list[PodProblem] = []  # its replicas' names held by another model's pods
        for x in placed:
            pp = pods_by_name.get((m.namespace, x["pod"]))
            if pp is not None and pp.model != m.name:
                taken.append(PodProblem(pp.name, api.ROLE_REPLICA, _name_taken(pp)))
                continue
            holder = pods_by_name.get((m.namespace, x["weightHolder"])) if x["weightHolder"] else None
            if pp and pp.ready and (not x["weightHolder"] or (holder and holder.ready)):
                ready += 1
        # A frozen model's replicas that stay: those on a lost node or ended are deleted, and none is
        # placed anew without an estimate. Ready as any replica is: with its holder Ready.
        kept = [p for p in replicas_of[key] if p.node not in lost_nodes and not p.finished]
        if key in frozen:
            ready = sum(1 for p in kept if p.ready and _holder_ready(p, pods_by_name, lost_nodes))
        rollout = rollouts.get(key)
        if rollout is not None:
            ready += sum(1 for p in old_of.get(key, []) if p.ready and (m.namespace, p.name) not in retiring)
        # A replica on the move counts as ready while the pod it replaces still serves.
        replaced = [pods_by_name[k] for k in moving_out if k not in retiring] + list(moves.values())
        ready += sum(1 for p in replaced if p.ready and _model_key(p.namespace, p.model or "") == key)
        problems = (
            taken
            + [
                PodProblem(p.name, p.role, p.problem)
                for p in sorted(mine, key=lambda p: p.name)
                if p.problem and not p.terminating and p.role in (api.ROLE_REPLICA, api.ROLE_WEIGHTS)
            ]
            + [
                PodProblem(h.name, h.role, h.problem)
                for name in sorted(holders_used)
                if (h := pods_by_name.get((m.namespace, name))) is not None
                and h.role == api.ROLE_WEIGHTS
                and h.problem
            ]
        )
        outcome = ModelOutcome(
            estimate=est if m.spec is not None else EstimateError(m.spec_error),
            placements=placed,
            unwritten=unwritten,
            unplaced=unplaced_of.get(key, []),
            ready_replicas=ready,
            saved_mib=saved.get(key, 0),
            lost_nodes=sorted({p.node for p in mine if p.node in lost_nodes and p.node}),
            suspect_nodes=sorted({p.node for p in mine if p.node in view.suspect and p.node}),
            frozen_replicas=len(kept) if key in frozen else 0,
            problems=tuple(problems),
            rollout=rollout,
            moves=tuple(moved_of.get(key, ())),
            failure=model_failure(failures, key),
            updated_replicas=len(placed) if rollout is not None else None,
            # A model with no estimate this pass keeps its idle clock and its request history as
            # written: an operator restart that re-reads its files must not erase a day of demand.
            scaling=scaling.scaling_status(activities[key], m.generation, warm_of.get(key))
            if key in activities
            else _as_written(m, "scaling"),
            demand=demand_of[key].to_dict() if key in demand_of else _as_written(m, "demand"),
            endpoint=service_of[key].endpoint,
            service_problem=service_of[key].problem,
        )
        result.outcomes[key] = (m, outcome)
        if _sized_before(m, est) and not outcome.lost_nodes and not outcome.problems:
            result.statuses.append(_as_written_status(m, outcome))
        else:
            result.statuses.append(_status_update(m, outcome, now))
    return result


def _sized_before(m: ObservedModel, est: object) -> bool:
    """Whether ``m``'s files are being read again for a generation its status was already written
    for: an operator that just started (estimates are kept in memory) sizing what the one before it
    had. Its status then stays as written, not Estimating and back (two writes and an Event for each
    such model at every restart), unless its pods say something new (a lost node, a problem)."""
    return isinstance(est, EstimatePending) and m.status.get("observedGeneration") == m.generation


def _as_written_status(m: ObservedModel, outcome: ModelOutcome) -> StatusUpdate:
    placements = m.status.get("placements")
    placed = len(placements) if isinstance(placements, list) else outcome.frozen_replicas
    return StatusUpdate(m, {}, (), placed, 0, outcome.saved_mib, changed=False)


def _as_written(m: ObservedModel, field_name: str) -> Mapping[str, Any] | None:
    """``m``'s status field as written, when it is an object (anything else is dropped: a status
    edited by hand must not fail the pass)."""
    value = m.status.get(field_name)
    return value if isinstance(value, Mapping) else None


def _status_update(m: ObservedModel, outcome: ModelOutcome, now: dt.datetime) -> StatusUpdate:
    wanted, events = build_status(m, outcome, now)
    patch = merge_patch_to(m.status, wanted, keep=_NOT_OURS)
    return StatusUpdate(
        model=m,
        status=patch,
        events=tuple(events),
        placed=len(outcome.placements),
        unplaced=len(outcome.unplaced),
        saved_mib=outcome.saved_mib,
        # What the server will hold once patched, against what it holds: one patch, then none while
        # nothing changes.
        changed=_comparable(merge_patch(m.status, patch)) != _comparable(m.status),
    )


def _holder_ready(
    replica: ObservedPod, pods_by_name: Mapping[tuple[str, str], ObservedPod], lost_nodes: set[str]
) -> bool:
    """Whether the weight-holder ``replica`` maps (if any) is Ready, and not on a lost node."""
    if not replica.weight_holder:
        return True
    holder = pods_by_name.get((replica.namespace, replica.weight_holder))
    return holder is not None and holder.ready and holder.node not in lost_nodes


def _existing_placements(
    mine: Sequence[ObservedPod],
    old: Sequence[ObservedPod],
    moving_out: Mapping[tuple[str, str], ObservedPod],
    lost_nodes: set[str],
) -> list[dict[str, Any]]:
    """The placements of a model's replica pods of the current template that exist (and stay: not on a
    lost node, not ended, not moving out): what its status reports while its writes back off."""
    skip = {(p.namespace, p.name) for p in old} | set(moving_out)
    return [
        {
            "node": p.node,
            "device": p.device,
            "pod": p.name,
            "slices": p.slices,
            "weightHolder": p.weight_holder or "",
        }
        for p in sorted(mine, key=lambda p: p.name)
        if p.role == api.ROLE_REPLICA
        and not p.terminating
        and not p.finished
        and p.node
        and p.device
        and p.node not in lost_nodes
        and (p.namespace, p.name) not in skip
    ]


def restatus(result: Plan, failures: Mapping[str, Failure], now: dt.datetime) -> None:
    """Redo the statuses of the models whose writes failed in this pass (their condition carries the
    server's message at once, not one pass later)."""
    for i, update in enumerate(result.statuses):
        key = _model_key(update.model.namespace, update.model.name)
        failure = model_failure(failures, key)
        if failure is not None and key in result.outcomes:
            m, outcome = result.outcomes[key]
            outcome = ModelOutcome(**{**outcome.__dict__, "failure": failure})
            result.outcomes[key] = (m, outcome)
            result.statuses[i] = _status_update(m, outcome, now)


def _current_holders(
    ours: Sequence[ObservedPod],
    active: Mapping[str, tuple[ObservedModel, MemoryEstimate]],
    refs: Mapping[str, ModelRef],
    group_of: Mapping[str, str],
    key_uid: Mapping[tuple[str, str], str],
    lost_nodes: set[str],
    serving_groups: set[str],
) -> dict[str, list[ObservedPod]]:
    """Group key -> its live weight-holders that hold the group's current weights under its current
    key (their names say so), the Ready ones first. One share group of a namespace may hold several
    weights (an explicit shareGroup named by models of different weights): one group key each."""
    # (namespace, share group) -> group key -> a ref of it
    expected: dict[tuple[str, str], dict[str, ModelRef]] = defaultdict(dict)
    for key in sorted(active):
        ref = refs[key]
        expected[(ref.namespace, ref.share_group)].setdefault(group_of[key], ref)
    out: dict[str, list[ObservedPod]] = defaultdict(list)
    for p in sorted(ours, key=lambda p: (not p.ready, p.name)):
        if p.role != api.ROLE_WEIGHTS or p.terminating or p.finished or not p.node or not p.device:
            continue
        if p.node in lost_nodes:
            continue
        for group, ref in expected.get((p.namespace, p.share_group or ""), {}).items():
            salt = _holder_salt(p.slices, group in serving_groups, key_uid, ref)
            if p.name == holder_pod_name(ref.share_group, ref.weights_id, p.node, p.device, salt):
                out[group].append(p)
                break
    return out


def _holder_labels(
    holders_of: Mapping[str, list[ObservedPod]],
    refs: Mapping[str, ModelRef],
    group_of: Mapping[str, str],
    pods_by_name: Mapping[tuple[str, str], ObservedPod],
    models: Sequence[ObservedModel],
) -> list[LabelsUpdate]:
    """The label updates of the current holders created without ``vnpu.io/weights`` (or with another
    value): the warm Services select by it; and of every live holder created without ``vnpu.io/holder``:
    its PodDisruptionBudget selects by it (:func:`vnpu.operator.disruption.holder_labels`). One update
    per pod."""
    models_of: dict[str, list[str]] = defaultdict(list)  # group key -> its models
    for key in sorted(group_of):
        models_of[group_of[key]].append(key)
    labels_of: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)  # (namespace, pod) -> labels
    models_by_pod: dict[tuple[str, str], tuple[str, ...]] = {}  # (namespace, pod) -> models it serves
    for group, holders in sorted(holders_of.items()):
        wanted = weights_label(refs[models_of[group][0]].weights_id)
        for p in holders:
            if p.weights != wanted:
                labels_of[(p.namespace, p.name)][api.LABEL_WEIGHTS] = wanted
                models_by_pod[(p.namespace, p.name)] = tuple(models_of[group])
    model_of_uid = disruption.model_keys_by_uid(models)
    for where, labels in disruption.holder_labels(list(pods_by_name.values())).items():
        labels_of[where].update(labels)
        models_by_pod.setdefault(where, disruption.owning_models(pods_by_name[where], model_of_uid))
    return [
        LabelsUpdate(ns, name, labels, models_by_pod[(ns, name)])
        for (ns, name), labels in sorted(labels_of.items())
    ]


def _loaded_weights(
    outside: Sequence[ObservedPod], holders_of: Mapping[str, list[ObservedPod]]
) -> dict[tuple[str, str], frozenset[str]]:
    """(node, device) -> the groups whose current holder there is kept outside the plan (its memory
    held: older replicas map it, it is kept warm, or resized: see :func:`_resized_holders`). New
    replicas of the group there attach to it (:func:`_kept_holders`), so the packer must not charge
    them the weights again: counted twice, a rolling update stalls on a full device or evicts another
    model."""
    group_of_holder = {(h.namespace, h.name): g for g, holders in holders_of.items() for h in holders}
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for p in outside:
        group = group_of_holder.get((p.namespace, p.name))
        if group is not None and not p.terminating:
            out[(p.node or "", p.device or "")].add(group)
    return {k: frozenset(v) for k, v in out.items()}


def _kept_holders(
    outside: Sequence[ObservedPod], holders_of: Mapping[str, list[ObservedPod]]
) -> dict[tuple[str, str, str], ObservedPod]:
    """(node, device, group key) -> the group's current holder there kept outside the plan (the Ready
    one first): the holder the plan's replicas of that group there map, whatever size the group's
    holders are planned at now. Another holder of the group on that device would bind the same socket
    (one per share identity and device, :func:`vnpu.sharing.socket_name`) and could not start."""
    kept = {(p.namespace, p.name) for p in outside if not p.terminating}
    out: dict[tuple[str, str, str], ObservedPod] = {}
    for group, holders in holders_of.items():
        for h in holders:  # Ready ones first
            if (h.namespace, h.name) in kept:
                out.setdefault((h.node or "", h.device or "", group), h)
    return out


def _resized_holders(
    ours: Sequence[ObservedPod],
    holders_of: Mapping[str, list[ObservedPod]],
    group_mib: Mapping[str, int],
    nodes: Sequence[ObservedNode],
    outside: Sequence[ObservedPod],
) -> list[ObservedPod]:
    """The current holders, not yet kept outside the plan, that live replicas map and whose size is no
    longer the one their group's holders are planned at (a model of another size joined or left the
    group; an upgrade sized holders anew). Replaced, the new holder (another name, the same socket)
    could not start beside the old one, and the old one, out of the plan, would be deleted from under
    every replica mapping it, whose names (their own size and template) do not change. So such a holder
    stays, at its own size, until nothing maps it; the new size comes with the next holder there."""
    slice_mib = {
        (n.name, d.id): d.slice_mib
        for n in nodes
        if n.inventory is not None and not n.inventory_error
        for d in n.inventory.devices
    }
    mapped = {
        (p.namespace, p.weight_holder)
        for p in ours
        if p.role == api.ROLE_REPLICA and p.weight_holder and not p.finished
    }
    kept = {(p.namespace, p.name) for p in outside}
    out = []
    for group, holders in sorted(holders_of.items()):
        for h in holders:
            where = (h.node or "", h.device or "")
            if (h.namespace, h.name) in kept or (h.namespace, h.name) not in mapped or where not in slice_mib:
                continue
            if h.slices != api.slices_for_mib(group_mib.get(group, 0), slice_mib[where]):
                out.append(h)
    return out


def _warm(
    active: Mapping[str, tuple[ObservedModel, MemoryEstimate]],
    group_of: Mapping[str, str],
    holders_of: Mapping[str, list[ObservedPod]],
    demand_of: Mapping[str, forecast.DemandState],
    nodes: Sequence[ObservedNode],
    config: OperatorConfig,
    now: dt.datetime,
) -> tuple[dict[str, bool], list[ObservedPod]]:
    """Which groups with no replicas keep a holder (per model at 0 replicas: warm or not), and the
    holders that stay outside the plan (their memory held, the pods kept)."""
    wanting = {group_of[k] for k, (m, _) in active.items() if m.spec and m.spec.replicas > 0}
    idle: dict[str, list[ObservedModel]] = defaultdict(list)
    for key, (m, _) in sorted(active.items()):
        if m.spec is not None and m.spec.replicas == 0 and group_of[key] not in wanting:
            idle[group_of[key]].append(m)
    pool_of = {n.name: n.labels.get(config.pool_label, scaling.DEFAULT_POOL) for n in nodes}
    slice_mib = {
        (n.name, d.id): d.slice_mib for n in nodes if n.inventory is not None for d in n.inventory.devices
    }
    device_mib = {
        n.name: sum(d.slices * d.slice_mib for d in n.inventory.devices) if n.inventory else 0 for n in nodes
    }
    groups = []
    for group, models in sorted(idle.items()):
        if holders_of.get(group):
            h = holders_of[group][0]
            mib = h.slices * slice_mib.get((h.node or "", h.device or ""), api.DEFAULT_SLICE_MIB)
            groups.append(scaling.WarmGroup(group, tuple(models), pool_of.get(h.node or "", ""), mib))
    budgets = scaling.pool_budgets(pool_of, device_mib, config.keep_warm_fraction)
    kept = scaling.keep_warm(groups, budgets, demand_of, now)
    warm = {_model_key(m.namespace, m.name): g in kept for g, models in idle.items() for m in models}
    return warm, [holders_of[g][0] for g in sorted(kept)]


#: Why a warm holder is deleted for replicas that need its room (:func:`_reclaim_warm`).
WARM_RECLAIMED = "warm copy reclaimed: replicas that would wait need its device's room"


def _shortfall(packed: packing.PackResult) -> int:
    """Replicas a plan leaves waiting or takes from running: what room freed elsewhere could save."""
    return len(packed.unplaced) + sum(1 for d in packed.dropped if d.reason.startswith("preempted by"))


def _reclaim_warm(
    reclaimable: Sequence[ObservedPod],
    packed: packing.PackResult,
    held: Mapping[tuple[str, str], int],
    outside: Sequence[ObservedPod],
    holders_of: Mapping[str, list[ObservedPod]],
    nodes: Sequence[ObservedNode],
    view: _NodeView,
    pack: Callable[[list[packing.Node]], packing.PackResult],
) -> tuple[set[tuple[str, str]], packing.PackResult]:
    """The warm holders to delete, and the plan, when ``packed`` leaves replicas waiting or preempts:
    packed again as if every reclaimable holder were gone, a plan that saves more takes the room of
    those whose device it needs (the rest stay where it leaves room for them). Else none, and
    ``packed`` as it was."""
    gone = {(h.namespace, h.name) for h in reclaimable}
    cold = dict(held)
    for h in reclaimable:
        cold[(h.node or "", h.device or "")] -= h.slices
    rest = [p for p in outside if (p.namespace, p.name) not in gone]
    retry = pack(_packer_nodes(nodes, cold, view, _loaded_weights(rest, holders_of)))
    if _shortfall(retry) >= _shortfall(packed):
        return set(), packed
    used = retry.slices_by_device()
    free = {
        (n.name, d.id): d.slices - cold.get((n.name, d.id), 0)
        for n in nodes
        if n.inventory is not None
        for d in n.inventory.devices
    }
    reclaimed = set()
    for h in sorted(reclaimable, key=lambda h: (h.node or "", h.device or "", h.name)):
        where = (h.node or "", h.device or "")
        if used.get(where, 0) + h.slices <= free.get(where, 0):
            used[where] = used.get(where, 0) + h.slices  # room for it beside the plan: it stays
        else:
            reclaimed.add((h.namespace, h.name))
    return reclaimed, retry


def _wake_placements(
    active: Mapping[str, tuple[ObservedModel, MemoryEstimate]],
    group_of: Mapping[str, str],
    holders_of: Mapping[str, list[ObservedPod]],
    current: Sequence[packing.Placement],
    live: set[str],
    node_by_name: Mapping[str, ObservedNode],
) -> list[packing.Placement]:
    """A waking model (replicas wanted, none running of any template, no replica of its group anywhere)
    is offered its group's existing holder's device for its first replica: the packer takes the offer
    if it still fits once every running replica is kept, and the replica attaches to the held weights
    instead of loading them. (A model in a rolling update is not waking: its old replicas run.)"""
    running = {p.model for p in current} | live
    groups_running = {group_of[k] for k in running if k in group_of}
    out = []
    for key, (m, est) in sorted(active.items()):
        group = group_of[key]
        if not m.spec or m.spec.replicas == 0 or key in running or group in groups_running:
            continue
        holders = holders_of.get(group)
        node = node_by_name.get(holders[0].node or "") if holders else None
        if not holders or node is None or node.inventory is None or node.inventory_error:
            continue  # (an unusable inventory: nothing goes there, see _packer_nodes)
        h = holders[0]
        device = next((d for d in node.inventory.devices if d.id == h.device), None)
        if device is None:
            continue
        slices = api.slices_for_mib(est.per_replica_mib, device.slice_mib)
        out.append(packing.Placement(key, 0, h.node or "", h.device or "", slices))
        groups_running.add(group)
    return out


def template_label(template: str) -> str:
    """The vnpu.io/template-hash label value of a pod template (and key generation): a valid label."""
    return short_hash(template, length=10)


def _is_current(p: ObservedPod, model: ObservedModel, template: str) -> bool:
    """Whether a replica pod is of the model's current pod template (and key generation), under the
    name the plan gives it: one named otherwise (a long model name, cut before names were kept
    distinct) is rolled like an older template, make-before-break."""
    named = p.name == replica_pod_name(
        model.name, p.replica or 0, p.node or "", p.device or "", _pod_salt(p.slices, template)
    )
    if p.template:
        return p.template == template_label(template) and (named or not (p.node and p.device))
    # Pods from before the template label: the name says it (it hashes the template).
    return bool(p.node and p.device) and named


def _name_taken(pod: ObservedPod) -> str:
    """Why a replica of a model is not created: its name is another model's pod's. A model name too
    long for a pod name is cut and tagged with a hash of it, and a model of the same namespace may be
    named exactly that cut name: their replicas' names then meet, and the API server keeps one."""
    owner = f"model {pod.model}'s" if pod.model else "a pod that is no model's"
    return (
        f"PodNameTaken: the pod name is {owner} (a model name too long for pod names is cut and hashed, "
        "and this model's name is that cut name); rename one of the two models"
    )


#: Why a replica left by an earlier model of the same name goes (see :func:`_owned`).
_NAMESAKE = "left by an earlier model of the same name (its owner is gone): replaced"


def _owned(p: ObservedPod, model: ObservedModel) -> bool:
    """Whether a replica pod is this model's. A model deleted and created again under its name (a new
    uid) may find its predecessor's pods still running: the garbage collector deletes them (their
    owner is gone) whenever it gets to them, so they are not counted as this model's; they are
    replaced like an older template's, make-before-break, while they serve. (Adopting them instead
    would race the collector, which may already have them in hand: ReplicaSets adopt only orphans.)"""
    return model.uid in p.owner_uids


def _clear_of_namesakes(
    packed: packing.PackResult,
    ours: Sequence[ObservedPod],
    active: Mapping[str, tuple[ObservedModel, MemoryEstimate]],
    running: set[tuple[str, int]],
) -> packing.PackResult:
    """The plan with each replica that has no pod yet (not in ``running``: (model, index) of the
    model's own current pods) numbered clear of the indices the pods of an earlier model of the same
    name hold (terminating ones too): a replica's name is its index and placement, so it could
    otherwise be that pod's very name, and never start beside it."""
    namesake: dict[str, set[int]] = defaultdict(set)  # model -> indices its namesake's pods hold
    for p in ours:
        key = _model_key(p.namespace, p.model or "")
        if (
            p.role == api.ROLE_REPLICA
            and p.replica is not None
            and key in active
            and not _owned(p, active[key][0])
        ):
            namesake[key].add(p.replica)
    if not namesake:
        return packed
    used: dict[str, set[int]] = defaultdict(set)  # model -> indices its planned replicas keep
    for a in packed.assignments:
        if (a.model, a.replica) in running or a.replica not in namesake.get(a.model, ()):
            used[a.model].add(a.replica)
    assignments = []
    for a in packed.assignments:
        if (a.model, a.replica) not in running and a.replica in namesake.get(a.model, ()):
            blocked = namesake[a.model] | used[a.model]
            index = next(i for i in range(len(blocked) + 1) if i not in blocked)
            used[a.model].add(index)
            a = replace(a, replica=index)
        assignments.append(a)
    return replace(packed, assignments=tuple(assignments))


def _moves_in_flight(
    ours: Sequence[ObservedPod],
    active: Mapping[str, tuple[ObservedModel, MemoryEstimate]],
    templates: Mapping[str, str],
) -> dict[tuple[str, str], ObservedPod]:
    """(namespace, name) of each replica pod a defragmentation is replacing -> the pod replacing it.

    A claim (vnpu.io/replaces, the uid of the pod replaced) counts only between two live replica pods of
    the same namespace, model and index, both of the current template, from a pod that nothing claims
    in turn, and only as the sole claim on its target: anything else (a chain, a cycle, an annotation
    written by hand) is ignored, and the duplicate index resolves as any other (the Ready pod is the
    placement, the other goes). A claim outlives its move on the pod that made it; the uid keeps it
    from ever reaching a later pod that takes the old name."""
    live = {
        p.uid: p
        for p in ours
        if p.role == api.ROLE_REPLICA and not p.terminating and p.replica is not None and p.uid
    }

    def current(p: ObservedPod) -> bool:
        key = _model_key(p.namespace, p.model or "")
        return key in active and _is_current(p, active[key][0], templates[key]) and _owned(p, active[key][0])

    claims: dict[str, list[ObservedPod]] = defaultdict(list)  # uid -> the pods claiming to replace it
    for p in live.values():
        if p.replaces and p.replaces != p.uid:
            claims[p.replaces].append(p)
    out: dict[tuple[str, str], ObservedPod] = {}
    for target, successors in claims.items():
        old = live.get(target)
        if old is None or len(successors) != 1:
            continue
        (new,) = successors
        same = (old.namespace, old.model, old.replica) == (new.namespace, new.model, new.replica)
        if new.uid not in claims and same and current(old) and current(new):
            out[(old.namespace, old.name)] = new
    return out


def _settled(
    ours: Sequence[ObservedPod],
    current_pod: Mapping[tuple[str, int], ObservedPod],
    stable: packing.PackResult,
) -> bool:
    """Whether a defragmentation batch may start: the stable plan is steady and keeps exactly the
    current placements, and every replica and weight-holder pod of ours is Ready."""
    if not stable.steady() or {(a.model, a.replica) for a in stable.assignments} != set(current_pod):
        return False
    placements = {(p.namespace, p.name) for p in current_pod.values()}
    for p in ours:
        placed = (p.namespace, p.name) in placements
        if p.role == api.ROLE_REPLICA and (p.terminating or not placed or not p.ready):
            return False
        if p.role == api.ROLE_WEIGHTS and (p.terminating or not p.ready):
            return False
    return True


def _owners_of(p: ObservedPod) -> tuple[str, ...]:
    return (_model_key(p.namespace, p.model),) if p.model else ()


def _deletion(p: ObservedPod, reason: str, *, force: bool = False) -> PodDeletion:
    return PodDeletion(p.namespace, p.name, p.role, reason, force, _owners_of(p), p.uid)


def _pod_salt(slices: int, template: str) -> str:
    return f"{slices}/{template}"


def _host_weights_mib(keys: Iterable[str], active: Mapping[str, tuple[ObservedModel, MemoryEstimate]]) -> int:
    """MiB of weights a holder of these models keeps in host memory: an offloaded group's holder keeps
    every weight there for its replicas to stream from (0 otherwise: its arena is on the device)."""
    offloaded = (est.weights_mib for m, est in (active[k] for k in keys) if m.spec and m.spec.offloaded)
    return max(offloaded, default=0)


def _ref(model: ObservedModel, config: OperatorConfig) -> ModelRef:
    assert model.spec is not None
    return ModelRef(model.name, model.namespace, model.uid, model.spec, model_weights_id(model, config))


def _holder_salt(slices: int, serves: bool, key_uid: Mapping[tuple[str, str], str], ref: ModelRef) -> str:
    """What a weight-holder's name hashes besides its place: its size, whether it answers requests
    (such a holder is another pod; none before that existed, so older names are unchanged), its key."""
    return f"{slices}{'s' if serves else ''}{_key_generation(key_uid, ref)}"


def _key_generation(key_uid: Mapping[tuple[str, str], str], ref: ModelRef) -> str:
    """Which key a group's pods mount, for their names: a new Secret is a new generation."""
    uid = key_uid.get((ref.namespace, ref.share_group))
    return f"/key:{uid}" if uid else ""


def _plan_secrets(
    result: Plan,
    refs: Iterable[ModelRef],
    pods: Sequence[ObservedPod],
    secrets: Sequence[ObservedSecret],
    backoff: set[str],
    also: Mapping[tuple[str, str], Sequence[ObservedModel]],
    named: Collection[tuple[str, str]],
) -> None:
    """One key Secret per (namespace, group) with an active model, owned by those models and by the
    models in ``also`` (frozen ones whose running pods mount it); a Secret goes once no model names
    its group (``named``: (namespace, group) of every model not being deleted, sized or not) and no
    pod of the group is left to mount it."""
    owners: dict[tuple[str, str], list[ModelRef]] = defaultdict(list)
    for ref in sorted(refs, key=lambda r: r.name):
        owners[(ref.namespace, ref.share_group)].append(ref)
    existing = {(x.namespace, x.share_group): x for x in secrets}
    for key, group_owners in sorted(owners.items()):
        secret = existing.get(key)
        models = tuple(r.key for r in group_owners)
        if backoff.issuperset(models):
            continue
        if secret is None:
            result.create_secrets.append(SecretIntent(key[0], key[1], tuple(group_owners)))
        else:
            owners_: list[Owner] = [*group_owners, *also.get(key, ())]
            if not secret.terminating and set(secret.owner_uids) != {o.uid for o in owners_}:
                refs_ = owner_references(owners_)
                result.set_owners.append(
                    OwnersUpdate(key[0], secret.name, refs_, kind="Secret", models=models)
                )
    in_use = {
        (p.namespace, p.share_group)
        for p in pods
        if p.share_group and p.role in (api.ROLE_REPLICA, api.ROLE_WEIGHTS)
    }
    for key, secret in sorted(existing.items()):
        if key not in owners and key not in in_use and key not in named and not secret.terminating:
            result.delete_secrets.append(SecretDeletion(key[0], secret.name, key[1], secret.uid))


#: Status keys that are not the operator's to remove: kopf's bookkeeping, were it ever kept there (this
#: operator keeps it in annotations).
_NOT_OURS = ("kopf",)


def _comparable(status: Mapping[str, Any]) -> Any:
    """A status without timestamps, to tell whether a patch would change anything."""
    clean = {k: v for k, v in status.items() if k not in _NOT_OURS}
    clean["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions", [])
    ]
    return json.loads(json.dumps(clean, sort_keys=True, default=str))
