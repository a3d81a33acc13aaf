"""The operator's view of the cluster: typed, immutable snapshots parsed from API objects.

Parsing is pure (dict in, dataclass out) so the planner never touches raw API objects and every
malformed input is handled in one place.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vnpu import api
from vnpu.inventory import NodeInventory
from vnpu.operator.packing import Taint
from vnpu.operator.spec import ModelSpec, SpecError, parse_spec

#: When a NotReady node without a transition time stopped being Ready: long enough ago.
LONG_AGO = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

#: Container waiting reasons that mean the pod will not come up by itself (the kubelet's words).
STUCK_WAITING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "PreCreateHookError",
        "PostStartHookError",
    }
)


@dataclass(frozen=True)
class ObservedNode:
    name: str
    ready: bool
    schedulable: bool
    labels: Mapping[str, str]
    taints: tuple[Taint, ...]
    inventory: NodeInventory | None
    #: Why the inventory could not be used (missing or malformed annotation); empty when fine.
    inventory_error: str = ""
    #: When the node stopped being Ready (its Ready condition's lastTransitionTime), None while Ready.
    not_ready_since: dt.datetime | None = None


@dataclass(frozen=True)
class ObservedPod:
    namespace: str
    name: str
    role: str
    model: str | None
    share_group: str | None
    replica: int | None
    node: str | None
    device: str | None
    slices: int
    phase: str
    ready: bool
    terminating: bool
    owner_uids: tuple[str, ...] = ()
    #: Created by this operator for a namespace it serves (else another install's or anyone's pod, which
    #: only matters for the device memory it holds).
    managed: bool = True
    #: vnpu.io/template-hash: the pod template (and key generation) it was created from.
    template: str | None = None
    #: The weight-holder a replica maps (vnpu.io/weight-holder annotation).
    weight_holder: str | None = None
    #: vnpu resources requested: (extended resource, slices).
    requests: tuple[tuple[str, int], ...] = ()
    #: Why the pod is not coming up, in the scheduler's or kubelet's words; empty when nothing is wrong.
    problem: str = ""
    #: Finished (Succeeded or Failed): it holds no device memory any more.
    finished: bool = False
    #: The uid of the pod this replica replaces (vnpu.io/replaces): a defragmentation's move.
    replaces: str | None = None
    uid: str = ""
    #: A weight-holder's vnpu.io/weights label (which weights it holds); None on holders from before it.
    weights: str | None = None
    #: A weight-holder's vnpu.io/holder label (its own name; its budget selects by it); None on holders
    #: from before it.
    holder_label: str | None = None
    #: spec.priorityClassName: a placeholder of ours runs at the placeholder class (preemptible).
    priority_class: str = ""
    #: spec.nodeName is set: on its node. False while the scheduler has yet to bind it (Pending).
    bound: bool = True


@dataclass(frozen=True)
class ObservedSecret:
    """A share group's key Secret (its data is never read by the operator)."""

    namespace: str
    name: str
    uid: str
    share_group: str
    owner_uids: tuple[str, ...]
    terminating: bool


@dataclass(frozen=True)
class ObservedService:
    """A Service named like a model's (vnpu.api.service_name): ours when its controller
    is that model, else someone else's, left alone."""

    namespace: str
    name: str
    uid: str
    #: The uid of its controller ownerReference; None when nothing controls it.
    controller_uid: str | None
    terminating: bool
    #: Being created by this operator and not yet seen by its informer (no endpoint to give out yet).
    pending: bool = False
    #: Its spec.selector; None when not known (one being created).
    selector: Mapping[str, str] | None = None


@dataclass(frozen=True)
class ObservedBudget:
    """A PodDisruptionBudget named like a model's (:func:`vnpu.operator.disruption.budget_name`): ours
    when its controller is that model and it carries the operator's label, else someone else's, left
    alone. Its status (the disruption controller's) is not kept: nothing the operator decides needs it,
    and it changes with every replica's readiness."""

    namespace: str
    name: str
    uid: str
    #: The uid of its controller ownerReference; None when nothing controls it.
    controller_uid: str | None
    terminating: bool
    #: Labelled app.kubernetes.io/managed-by=vnpu-operator (the only ones the operator may change).
    managed: bool
    #: spec.selector.matchLabels, sorted; None when the selector has matchExpressions or is absent.
    selector: tuple[tuple[str, str], ...] | None
    #: spec.maxUnavailable and spec.minAvailable as written (an int or a percentage); "" when absent.
    max_unavailable: str
    min_available: str
    #: spec.unhealthyPodEvictionPolicy; "" when absent (the API server's IfHealthyBudget).
    unhealthy_pod_eviction_policy: str


@dataclass(frozen=True)
class ObservedModel:
    namespace: str
    name: str
    uid: str
    generation: int
    #: The parsed spec; None when it cannot be used (``spec_error`` says why).
    spec: ModelSpec | None
    deleting: bool
    status: Mapping[str, Any] = field(default_factory=dict)
    spec_error: str = ""
    #: The spec as the API server holds it (for the memory estimate, which names its fields).
    raw_spec: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    #: metadata.resourceVersion: the scale-down to zero is conditional on it (a wake in between wins).
    resource_version: str = ""
    #: The gateway's activity annotations: cumulative requests and the latest request's time.
    requests_total: int | None = None
    last_request: dt.datetime | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def parse_node(obj: Mapping[str, Any]) -> ObservedNode:
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}) or {}, obj.get("status", {}) or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    ready_since = next(
        (c.get("lastTransitionTime") for c in status.get("conditions") or [] if c.get("type") == "Ready"),
        None,
    )
    annotations = meta.get("annotations") or {}
    inventory, error = None, ""
    raw = annotations.get(api.ANNOTATION_DEVICES)
    if raw is None:
        error = f"no {api.ANNOTATION_DEVICES} annotation (device plugin not running?)"
    else:
        try:
            inventory = NodeInventory.from_json(raw)
        except ValueError as exc:
            error = f"malformed {api.ANNOTATION_DEVICES} annotation: {exc}"
        else:
            # (An unhealthy device may have none of its own: its index is out of range, or another
            # device's. It gets no placement either way.)
            unnamed = [
                d.id for d in inventory.devices if d.healthy and api.device_resource_index(d.resource) is None
            ]
            if unnamed:
                error = (
                    f"devices {', '.join(unnamed)} have no per-device resource (vnpu.io/memory-<index>) in "
                    f"{api.ANNOTATION_DEVICES}: the node's device plugin predates vnpu 0.2; upgrade it"
                )
            else:
                error = _inventory_problem(inventory)
    taints = tuple(
        Taint(t.get("key", ""), t.get("value", "") or "", t.get("effect", ""))
        for t in spec.get("taints") or []
    )
    ready = conditions.get("Ready") == "True"
    return ObservedNode(
        name=meta["name"],
        ready=ready,
        schedulable=not spec.get("unschedulable", False),
        labels=dict(meta.get("labels") or {}),
        taints=taints,
        inventory=inventory,
        inventory_error=error,
        not_ready_since=None if ready else (api.parse_time(ready_since) or LONG_AGO),
    )


def _inventory_problem(inventory: NodeInventory) -> str:
    """What makes a well-formed inventory unusable, or empty. The packer refuses such devices (sizes it
    cannot divide by, one id or resource twice) for the whole pass, so the node is left out instead."""
    ids: set[str] = set()
    resources: set[str] = set()
    for d in inventory.devices:
        if d.slice_mib <= 0 or d.slices < 0 or d.total_mib < 0:
            return (
                f"device {d.id} in {api.ANNOTATION_DEVICES} has slice_mib {d.slice_mib}, slices {d.slices}, "
                f"total_mib {d.total_mib}: need slice_mib > 0 and no negative sizes"
            )
        if d.id in ids:
            return f"device {d.id} appears twice in {api.ANNOTATION_DEVICES}"
        if d.resource in resources:
            return f"resource {d.resource} is advertised by two devices in {api.ANNOTATION_DEVICES}"
        ids.add(d.id)
        resources.add(d.resource)
    return ""


def _pinned_node(spec: Mapping[str, Any]) -> str | None:
    """The node a pod is bound to, or the one our required node affinity pins it to."""
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    terms = (
        spec.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms", [])
    )
    for term in terms or []:
        for field_ in term.get("matchFields", []):
            if (
                field_.get("key") == "metadata.name"
                and field_.get("operator") == "In"
                and field_.get("values")
            ):
                return str(field_["values"][0])
    return None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def vnpu_requests(spec: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """The vnpu resources a pod holds: per resource, the larger of its init containers' largest and
    its containers' sum (the scheduler's effective request)."""
    total: dict[str, int] = {}
    for c in spec.get("containers") or []:
        for name, value in ((c.get("resources") or {}).get("limits") or {}).items():
            if api.is_vnpu_resource(name) and (n := _int_or_none(value)):
                total[name] = total.get(name, 0) + n
    for c in spec.get("initContainers") or []:
        for name, value in ((c.get("resources") or {}).get("limits") or {}).items():
            if api.is_vnpu_resource(name) and (n := _int_or_none(value)):
                total[name] = max(total.get(name, 0), n)
    return tuple(sorted(total.items()))


def pod_problem(status: Mapping[str, Any]) -> str:
    """Why a pod is not coming up, in the words of whoever knows: the scheduler (Unschedulable), the
    kubelet (a container waiting in CrashLoopBackOff, ImagePullBackOff, ...), or a container that
    keeps restarting. Empty when nothing is wrong (a pod still starting is not a problem)."""
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason"):
            return f"{c['reason']}: {c.get('message', '')}".rstrip(": ")
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING_REASONS:
            restarts = cs.get("restartCount", 0)
            tail = f" (restarted {restarts} times)" if restarts else ""
            return f"{waiting['reason']}: container {cs.get('name')}: {waiting.get('message', '')}{tail}"
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if cs.get("restartCount", 0) and not cs.get("ready") and last:
            return (
                f"{last.get('reason') or 'Error'}: container {cs.get('name')} exited with "
                f"{last.get('exitCode')} and restarted {cs['restartCount']} times"
            )
    if status.get("phase") == "Failed":
        return f"{status.get('reason') or 'Failed'}: {status.get('message', '')}".rstrip(": ")
    return ""


def parse_pod(obj: Mapping[str, Any], managed: bool = True) -> ObservedPod:
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}) or {}, obj.get("status", {}) or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    phase = status.get("phase", "Pending")
    return ObservedPod(
        namespace=meta.get("namespace", ""),
        name=meta["name"],
        role=labels.get(api.LABEL_ROLE, ""),
        model=labels.get(api.LABEL_MODEL),
        share_group=labels.get(api.LABEL_SHARE_GROUP),
        replica=_int_or_none(labels.get(api.LABEL_REPLICA)),
        node=_pinned_node(spec),
        device=annotations.get(api.ANNOTATION_DEVICE),
        slices=api.parse_count(annotations.get(api.ANNOTATION_SLICES)) or 0,
        phase=phase,
        ready=conditions.get("Ready") == "True",
        terminating=meta.get("deletionTimestamp") is not None,
        owner_uids=tuple(o.get("uid", "") for o in meta.get("ownerReferences") or []),
        managed=managed,
        template=labels.get(api.LABEL_TEMPLATE_HASH),
        weight_holder=annotations.get(api.ANNOTATION_WEIGHT_HOLDER),
        requests=vnpu_requests(spec),
        problem=pod_problem(status),
        finished=phase in ("Succeeded", "Failed"),
        replaces=annotations.get(api.ANNOTATION_REPLACES),
        uid=meta.get("uid", ""),
        weights=labels.get(api.LABEL_WEIGHTS),
        holder_label=labels.get(api.LABEL_HOLDER),
        priority_class=str(spec.get("priorityClassName") or ""),
        bound=bool(spec.get("nodeName")),
    )


def parse_model(obj: Mapping[str, Any]) -> ObservedModel:
    meta = obj.get("metadata", {})
    annotations = meta.get("annotations") or {}
    raw = obj.get("spec", {}) or {}
    spec, error = None, ""
    try:
        spec = parse_spec(raw)
    except SpecError as exc:
        error = str(exc)
    return ObservedModel(
        namespace=meta.get("namespace", ""),
        name=meta["name"],
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation", 0)),
        spec=spec,
        deleting=meta.get("deletionTimestamp") is not None,
        status=obj.get("status", {}) or {},
        spec_error=error,
        raw_spec=raw,
        resource_version=str(meta.get("resourceVersion", "")),
        requests_total=api.parse_count(annotations.get(api.ANNOTATION_REQUESTS)),
        last_request=api.parse_time(annotations.get(api.ANNOTATION_LAST_REQUEST)),
    )


def parse_secret(obj: Mapping[str, Any]) -> ObservedSecret:
    meta = obj.get("metadata", {})
    return ObservedSecret(
        namespace=meta.get("namespace", ""),
        name=meta["name"],
        uid=meta.get("uid", ""),
        share_group=(meta.get("labels") or {}).get(api.LABEL_SHARE_GROUP, ""),
        owner_uids=tuple(o.get("uid", "") for o in meta.get("ownerReferences") or []),
        terminating=meta.get("deletionTimestamp") is not None,
    )


def labelled_managed(meta: Mapping[str, Any]) -> bool:
    """Whether an object's labels mark it as this operator's (``vnpu.io/managed-by``). The one test
    for it: the informers, the parsers and the reads by name all ask here."""
    return (meta.get("labels") or {}).get(api.LABEL_MANAGED_BY) == api.MANAGED_BY_VALUE


def _controller_uid(meta: Mapping[str, Any]) -> str | None:
    """The uid of the object's controller (its ownerReference with ``controller: true``), if any."""
    controller = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    return controller.get("uid") if controller else None


def parse_service(obj: Mapping[str, Any]) -> ObservedService:
    meta = obj.get("metadata", {})
    return ObservedService(
        namespace=meta.get("namespace", ""),
        name=meta["name"],
        uid=meta.get("uid", ""),
        controller_uid=_controller_uid(meta),
        terminating=meta.get("deletionTimestamp") is not None,
        selector=dict((obj.get("spec") or {}).get("selector") or {}),
    )


def parse_budget(obj: Mapping[str, Any]) -> ObservedBudget:
    meta, spec = obj.get("metadata", {}), obj.get("spec") or {}
    selector = spec.get("selector") or {}
    labels = selector.get("matchLabels") or {}
    only_labels = bool(selector) and not selector.get("matchExpressions")
    return ObservedBudget(
        namespace=meta.get("namespace", ""),
        name=meta["name"],
        uid=meta.get("uid", ""),
        controller_uid=_controller_uid(meta),
        terminating=meta.get("deletionTimestamp") is not None,
        managed=labelled_managed(meta),
        selector=tuple(sorted((str(k), str(v)) for k, v in labels.items())) if only_labels else None,
        max_unavailable="" if spec.get("maxUnavailable") is None else str(spec["maxUnavailable"]),
        min_available="" if spec.get("minAvailable") is None else str(spec["minAvailable"]),
        unhealthy_pod_eviction_policy=str(spec.get("unhealthyPodEvictionPolicy") or ""),
    )
