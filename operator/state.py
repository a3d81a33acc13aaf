"""The operator's view of the cluster: typed, immutable snapshots parsed from API objects.

Parsing is pure (dict in, dataclass out) so the planner never touches raw API objects and every
malformed input is handled in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vnpu import api
from vnpu.inventory import NodeInventory
from vnpu.operator.packing import Taint


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
class ObservedModel:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: Mapping[str, Any]
    deleting: bool
    status: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def parse_node(obj: Mapping[str, Any]) -> ObservedNode:
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}) or {}, obj.get("status", {}) or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
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
            unnamed = [d.id for d in inventory.devices if api.device_resource_index(d.resource) is None]
            if unnamed:
                error = (
                    f"devices {', '.join(unnamed)} have no per-device resource (vnpu.io/memory-<index>) in "
                    f"{api.ANNOTATION_DEVICES}: the node's device plugin predates vnpu 0.2; upgrade it"
                )
    taints = tuple(
        Taint(t.get("key", ""), t.get("value", "") or "", t.get("effect", ""))
        for t in spec.get("taints") or []
    )
    return ObservedNode(
        name=meta["name"],
        ready=conditions.get("Ready") == "True",
        schedulable=not spec.get("unschedulable", False),
        labels=dict(meta.get("labels") or {}),
        taints=taints,
        inventory=inventory,
        inventory_error=error,
    )


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


def parse_pod(obj: Mapping[str, Any]) -> ObservedPod:
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}) or {}, obj.get("status", {}) or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return ObservedPod(
        namespace=meta.get("namespace", ""),
        name=meta["name"],
        role=labels.get(api.LABEL_ROLE, ""),
        model=labels.get(api.LABEL_MODEL),
        share_group=labels.get(api.LABEL_SHARE_GROUP),
        replica=_int_or_none(labels.get(api.LABEL_REPLICA)),
        node=_pinned_node(spec),
        device=annotations.get(api.ANNOTATION_DEVICE),
        slices=_int_or_none(annotations.get(api.ANNOTATION_SLICES)) or 0,
        phase=status.get("phase", "Pending"),
        ready=conditions.get("Ready") == "True",
        terminating=meta.get("deletionTimestamp") is not None,
        owner_uids=tuple(o.get("uid", "") for o in meta.get("ownerReferences") or []),
    )


def parse_model(obj: Mapping[str, Any]) -> ObservedModel:
    meta = obj.get("metadata", {})
    return ObservedModel(
        namespace=meta.get("namespace", ""),
        name=meta["name"],
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation", 0)),
        spec=obj.get("spec", {}) or {},
        deleting=meta.get("deletionTimestamp") is not None,
        status=obj.get("status", {}) or {},
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
