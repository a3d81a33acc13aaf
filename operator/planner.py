"""One reconcile pass as a pure function: observed cluster state in, pod actions and statuses out.

    plan(models, nodes, pods, estimates, config, now) -> Plan

Steps: turn observed state into the packer's input (devices with their free slices, demands per model,
the current placements for stability), pack, derive the desired pods (replicas, one weight-holder per
(node, device, namespace, share group, weights), placeholders for what fits nowhere) and one key
Secret per (namespace, share group), diff them against what exists, and compute each model's status
and the events worth posting. No API calls here: the reconciler applies the plan, and tests assert on
it directly.

A group's pods are created only once its Secret exists, and their names carry the Secret's uid: the
key is mounted from it, so a re-created Secret (a new key) rolls the group's holders and replicas
together instead of leaving replicas that cannot authenticate their holder.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vnpu import api, sharing
from vnpu.memory import EstimateError, MemoryEstimate
from vnpu.operator import packing
from vnpu.operator.config import OperatorConfig
from vnpu.operator.pods import (
    ModelRef,
    holder_pod,
    owner_references,
    placeholder_pod,
    placeholder_pod_name,
    replica_pod,
    replica_pod_name,
)
from vnpu.operator.state import ObservedModel, ObservedNode, ObservedPod, ObservedSecret
from vnpu.operator.status import ModelOutcome, build_status

#: Spec fields that shape a pod: a change to any of them replaces the model's pods.
POD_TEMPLATE_FIELDS = ("modelName", "source", "weights", "modelConfig", "memory", "offload", "runtime")


@dataclass(frozen=True)
class PodDeletion:
    namespace: str
    name: str
    role: str
    reason: str
    force: bool = False  #: skip the grace period: the pod's node is gone or NotReady


@dataclass(frozen=True)
class Event:
    type: str  #: Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class StatusUpdate:
    model: ObservedModel
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


@dataclass(frozen=True)
class SecretIntent:
    """A share group's key Secret to create; the reconciler draws the key (the plan stays pure)."""

    namespace: str
    share_group: str
    owners: tuple[ModelRef, ...]


@dataclass(frozen=True)
class SecretDeletion:
    namespace: str
    name: str
    share_group: str


@dataclass
class Plan:
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[PodDeletion] = field(default_factory=list)
    set_owners: list[OwnersUpdate] = field(default_factory=list)
    create_secrets: list[SecretIntent] = field(default_factory=list)
    delete_secrets: list[SecretDeletion] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    unplaced_slices: int = 0


def default_share_group(spec: Mapping[str, Any]) -> str:
    """Digest of uri (which carries an hf revision) and dtype: equal weights share by default."""
    source = spec.get("source", {})
    dtype = spec.get("weights", {}).get("dtype", "")
    return "w-" + hashlib.sha256(f"{source.get('uri', '')}\x00{dtype}".encode()).hexdigest()[:16]


def share_group(spec: Mapping[str, Any]) -> str:
    return str(spec.get("shareGroup") or default_share_group(spec))


def model_weights_id(spec: Mapping[str, Any], config: OperatorConfig) -> str:
    """What a holder of this model holds: source, dtype on the device, and the runtime image."""
    image = spec.get("runtime", {}).get("image", config.runtime_image)
    return sharing.weights_id(
        str(spec["source"]["uri"]), str(spec.get("weights", {}).get("dtype", "")), image
    )


def template_hash(spec: Mapping[str, Any]) -> str:
    relevant = {k: spec.get(k) for k in POD_TEMPLATE_FIELDS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]


def _model_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _group_key(namespace: str, group: str, weights_id: str) -> str:
    """What shares one weight copy: share groups are namespaced (replicas of different namespaces never
    map each other's memory), and only equal weights share even within an explicit group."""
    return f"{namespace}/{group}/{weights_id}"


def _packer_nodes(nodes: Sequence[ObservedNode], held: Mapping[tuple[str, str], int]) -> list[packing.Node]:
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
            )
            for d in n.inventory.devices
        )
        out.append(
            packing.Node(n.name, devices, n.labels, n.taints, ready=n.ready, schedulable=n.schedulable)
        )
    return out


def _demand(model: ObservedModel, estimate: MemoryEstimate, weights_id: str) -> packing.Demand:
    placement = model.spec.get("placement", {})
    tolerations = tuple(
        packing.Toleration(
            t.get("key", ""), t.get("operator", "Equal"), t.get("value", ""), t.get("effect", "")
        )
        for t in placement.get("tolerations", [])
    )
    return packing.Demand(
        model=_model_key(model.namespace, model.name),
        share_group=_group_key(model.namespace, share_group(model.spec), weights_id),
        replicas=int(model.spec.get("replicas", 1)),
        replica_mib=estimate.per_replica_mib,
        weight_mib=estimate.device_weights_mib,
        priority=int(model.spec.get("priority", 0)),
        node_selector=dict(placement.get("nodeSelector", {})),
        tolerations=tolerations,
        spread=packing.Spread.BEST_EFFORT if placement.get("spreadAcrossNodes") else packing.Spread.NONE,
    )


def plan(
    models: Sequence[ObservedModel],
    nodes: Sequence[ObservedNode],
    pods: Sequence[ObservedPod],
    estimates: Mapping[tuple[str, str], MemoryEstimate | EstimateError],
    config: OperatorConfig,
    now: dt.datetime | None = None,
    secrets: Sequence[ObservedSecret] = (),
) -> Plan:
    now = now or dt.datetime.now(dt.UTC)
    result = Plan()
    node_by_name = {n.name: n for n in nodes}
    # (node, device id) -> the device's extended resource, from the device plugin's inventory
    resource_of = {
        (n.name, d.id): d.resource for n in nodes if n.inventory is not None for d in n.inventory.devices
    }
    lost_nodes = {
        p.node for p in pods if p.node and (p.node not in node_by_name or not node_by_name[p.node].ready)
    }

    active: dict[str, tuple[ObservedModel, MemoryEstimate]] = {}
    for m in models:
        est = estimates.get(m.key)
        if not m.deleting and isinstance(est, MemoryEstimate):
            active[_model_key(m.namespace, m.name)] = (m, est)
    refs = {key: _ref(m, config) for key, (m, _) in active.items()}
    # (namespace, group) -> its key Secret's uid, when the Secret exists and is not going away
    key_uid = {(x.namespace, x.share_group): x.uid for x in secrets if not x.terminating}
    templates = {
        key: template_hash(m.spec) + _key_generation(key_uid, refs[key]) for key, (m, _) in active.items()
    }

    # Slices held by pods the packer does not manage: terminating pods still own their memory.
    held: dict[tuple[str, str], int] = defaultdict(int)
    for p in pods:
        if p.terminating and p.node and p.device:
            held[(p.node, p.device)] += p.slices

    # Current placements of live replica pods that still match their model (stability input).
    current: list[packing.Placement] = []
    current_pod: dict[tuple[str, int], ObservedPod] = {}
    for p in sorted(pods, key=lambda p: (not p.ready, p.name)):  # a ready pod wins a duplicate index
        if p.role != api.ROLE_REPLICA or p.terminating or p.replica is None or not p.node or not p.device:
            continue
        key = _model_key(p.namespace, p.model or "")
        if key not in active or (key, p.replica) in current_pod:
            continue
        model, est = active[key]
        if p.replica >= int(model.spec.get("replicas", 1)):
            continue
        if p.name != replica_pod_name(
            model.name, p.replica, p.node, p.device, _pod_salt(p.slices, templates[key])
        ):
            continue  # created for an older spec: replaced where it stands (stability keeps the device)
        current.append(packing.Placement(key, p.replica, p.node, p.device, p.slices))
        current_pod[(key, p.replica)] = p

    demands = [_demand(m, est, refs[key].weights_id) for key, (m, est) in active.items()]
    packed = packing.pack(_packer_nodes(nodes, held), demands, current, defragment=config.defragment)

    desired: dict[tuple[str, str], dict[str, Any]] = {}
    holder_of: dict[tuple[str, str, str], str] = {}
    group_mib: dict[str, int] = {}
    for d in demands:
        group_mib[d.share_group] = max(group_mib.get(d.share_group, 0), d.weight_mib)
    for h in packed.weight_holders:
        owners = [refs[m] for m in sorted(h.models)]
        first = owners[0]
        salt = f"{h.slices}{_key_generation(key_uid, first)}"
        manifest = holder_pod(
            owners, h.node, h.device, resource_of[(h.node, h.device)], h.slices, config, salt=salt,
            weights_mib=group_mib.get(h.share_group, 0),
        )  # fmt: skip
        holder_of[(h.node, h.device, h.share_group)] = manifest["metadata"]["name"]
        if (first.namespace, first.share_group) in key_uid:  # pods that mount the key wait for it
            desired[(first.namespace, manifest["metadata"]["name"])] = manifest

    placements_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in packed.assignments:
        ref = refs[a.model]
        holder = holder_of.get((a.node, a.device, a.share_group))
        salt = _pod_salt(a.slices, templates[a.model])
        resource = resource_of[(a.node, a.device)]
        manifest = replica_pod(ref, a.replica, a.node, a.device, resource, a.slices, holder, config, salt)
        name = manifest["metadata"]["name"]
        if holder is None or (ref.namespace, ref.share_group) in key_uid:
            desired[(ref.namespace, name)] = manifest
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
        slices = api.slices_for_mib(u.replica_mib + u.weight_mib)
        result.unplaced_slices += slices
        if config.placeholders:
            ref = refs[u.model]
            manifest = placeholder_pod(ref, u.replica, slices, sorted(node_by_name), config)
            desired[(ref.namespace, placeholder_pod_name(ref.name, u.replica))] = manifest

    # Diff: delete what is not desired (force on lost nodes), create what is missing. The pods of a group
    # whose key Secret is missing (deleted by someone) stay until the new Secret exists and their
    # successors can start: a new key rolls the group, it does not take it down first.
    awaiting_key = {(r.namespace, r.share_group) for r in refs.values()} - set(key_uid)
    existing = {(p.namespace, p.name): p for p in pods}
    for key, p in sorted(existing.items()):
        if key in desired or p.terminating:
            continue
        if (p.namespace, p.share_group) in awaiting_key and p.node not in lost_nodes:
            continue
        force = p.node in lost_nodes
        why = "node lost" if force else "no longer in the plan"
        result.delete.append(PodDeletion(p.namespace, p.name, p.role, why, force=force))
    for _, p in sorted(existing.items()):  # a terminating pod on a lost node never finishes by itself
        if p.terminating and p.node in lost_nodes:
            result.delete.append(PodDeletion(p.namespace, p.name, p.role, "node lost", force=True))
    result.create = [m for key, m in sorted(desired.items()) if key not in existing]
    for key, manifest in sorted(desired.items()):
        pod = existing.get(key)
        owners = manifest["metadata"]["ownerReferences"]
        if (
            pod is not None
            and pod.role == api.ROLE_WEIGHTS
            and set(pod.owner_uids) != {r["uid"] for r in owners}
        ):
            result.set_owners.append(OwnersUpdate(key[0], key[1], owners))
    _plan_secrets(result, refs.values(), pods, secrets)

    # Statuses and events.
    pods_by_name = {(p.namespace, p.name): p for p in pods}
    saved = packed.saved_by_sharing_mib(demands)
    for m in models:
        key = _model_key(m.namespace, m.name)
        est = estimates.get(m.key)
        placed = sorted(placements_of.get(key, []), key=lambda x: x["pod"])
        ready = sum(1 for x in placed if (pp := pods_by_name.get((m.namespace, x["pod"]))) and pp.ready)
        outcome = ModelOutcome(
            estimate=est,
            placements=placed,
            unplaced=unplaced_of.get(key, []),
            ready_replicas=ready,
            saved_mib=saved.get(key, 0),
            lost_nodes=sorted(
                {
                    p.node
                    for p in pods
                    if p.model == m.name and p.namespace == m.namespace and p.node in lost_nodes
                }
            ),
        )
        status, events = build_status(m, outcome, now)
        changed = _comparable(status) != _comparable(m.status)
        result.statuses.append(
            StatusUpdate(
                model=m,
                status=status,
                events=tuple(Event(*e) for e in events),
                placed=len(placed),
                unplaced=len(outcome.unplaced),
                saved_mib=outcome.saved_mib,
                changed=changed,
            )
        )
    return result


def _pod_salt(slices: int, template: str) -> str:
    return f"{slices}/{template}"


def _ref(model: ObservedModel, config: OperatorConfig) -> ModelRef:
    return ModelRef(
        model.name,
        model.namespace,
        model.uid,
        model.spec,
        share_group(model.spec),
        model_weights_id(model.spec, config),
    )


def _key_generation(key_uid: Mapping[tuple[str, str], str], ref: ModelRef) -> str:
    """Which key a group's pods mount, for their names: a new Secret is a new generation."""
    uid = key_uid.get((ref.namespace, ref.share_group))
    return f"/key:{uid}" if uid else ""


def _plan_secrets(
    result: Plan, refs: Iterable[ModelRef], pods: Sequence[ObservedPod], secrets: Sequence[ObservedSecret]
) -> None:
    """One key Secret per (namespace, group) with an active model, owned by those models; a Secret goes
    once no model of its group is active and no pod of the group is left to mount it."""
    owners: dict[tuple[str, str], list[ModelRef]] = defaultdict(list)
    for ref in sorted(refs, key=lambda r: r.name):
        owners[(ref.namespace, ref.share_group)].append(ref)
    existing = {(x.namespace, x.share_group): x for x in secrets}
    for key, group_owners in sorted(owners.items()):
        secret = existing.get(key)
        if secret is None:
            result.create_secrets.append(SecretIntent(key[0], key[1], tuple(group_owners)))
        elif not secret.terminating and set(secret.owner_uids) != {r.uid for r in group_owners}:
            refs_ = owner_references(group_owners)
            result.set_owners.append(OwnersUpdate(key[0], secret.name, refs_, kind="Secret"))
    in_use = {
        (p.namespace, p.share_group)
        for p in pods
        if p.share_group and p.role in (api.ROLE_REPLICA, api.ROLE_WEIGHTS)
    }
    for key, secret in sorted(existing.items()):
        if key not in owners and key not in in_use and not secret.terminating:
            result.delete_secrets.append(SecretDeletion(key[0], secret.name, key[1]))


def _comparable(status: Mapping[str, Any]) -> Any:
    """A status without timestamps, to tell whether a patch would change anything."""
    clean = {k: v for k, v in status.items() if k != "kopf"}
    clean["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions", [])
    ]
    return json.loads(json.dumps(clean, sort_keys=True, default=str))
