"""Pod manifests the operator creates: replicas, weight-holders and autoscaler placeholders.

Pure functions from (model, placement) to a manifest dict: no API calls here, so the exact pods are
unit-testable and names are deterministic (a re-run after a crash creates the same names, and the API
server's AlreadyExists makes creation idempotent).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vnpu import api
from vnpu.operator.config import PLACEHOLDER_PRIORITY_CLASS, OperatorConfig

SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"
RUNTIME_PORT_NAME = "http"
MAX_NAME = 63  # pod names end up as hostnames


@dataclass(frozen=True)
class ModelRef:
    """What every pod of one InferenceModel needs to know about it."""

    name: str
    namespace: str
    uid: str
    spec: Mapping[str, Any]
    share_group: str


def short_hash(*parts: str, length: int = 6) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:length]


def _name(prefix: str, suffix: str) -> str:
    """``<prefix>-<suffix>`` cut to a valid length, keeping the (unique) suffix intact."""
    room = MAX_NAME - len(suffix) - 1
    return f"{prefix[:room].rstrip('-.')}-{suffix}"


def replica_pod_name(model: str, index: int, node: str, device: str, salt: str = "") -> str:
    """Deterministic per (replica index, placement, ``salt``: size and pod-template hash): moving or
    re-sizing a replica yields a new name, so the old pod can still be terminating while the new one
    starts, and a retry after a crash creates the very same name instead of a duplicate."""
    return _name(model, f"{index}-{short_hash(node, device, salt)}")


def holder_pod_name(share_group: str, node: str, device: str, salt: str = "") -> str:
    return _name(f"vnpu-w-{share_group}", short_hash(node, device, salt))


def placeholder_pod_name(model: str, index: int) -> str:
    return _name(f"{model}-pending", str(index))


def _labels(
    model: ModelRef | None, role: str, share_group: str, extra: Mapping[str, str] = {}
) -> dict[str, str]:
    labels = {
        api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE,
        api.LABEL_ROLE: role,
        api.LABEL_SHARE_GROUP: share_group,
    }
    if model is not None:
        labels[api.LABEL_MODEL] = model.name
    labels.update(extra)
    return labels


def _owner(model: ModelRef) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": model.name,
        "uid": model.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _pin_to_node(node: str) -> dict[str, Any]:
    """Required node affinity on the node's name (what DaemonSets use): the scheduler still checks
    resources, taints and the vnpu.io/memory capacity, unlike setting spec.nodeName directly."""
    term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def _tolerations(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(t) for t in spec.get("placement", {}).get("tolerations", [])]


def _resources(spec: Mapping[str, Any], slices: int) -> dict[str, Any]:
    user = spec.get("runtime", {}).get("resources", {})
    requests = {k: str(v) for k, v in user.get("requests", {}).items()}
    limits = {k: str(v) for k, v in user.get("limits", {}).items()}
    # Extended resources must have requests == limits.
    requests[api.RESOURCE_MEMORY] = limits[api.RESOURCE_MEMORY] = str(slices)
    return {"requests": requests, "limits": limits}


#: dtypes the runtime can hold weights in (its --dtype); the CRD also names file quantisations.
#: Where a pvc:// source's claim is mounted in model pods (the runtime's VNPU_PVC_ROOT default).
PVC_ROOT = "/mnt/pvc"


def _model_volumes(spec: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A pvc://<claim>/<path> source: the claim, read-only, at /mnt/pvc/<claim> in every model pod."""
    uri = str(spec["source"]["uri"])
    if not uri.startswith("pvc://"):
        return [], []
    claim = uri.removeprefix("pvc://").split("/", 1)[0]
    volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    return [volume], [{"name": "model", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True}]


def _runtime_env(model: ModelRef, config: OperatorConfig) -> list[dict[str, Any]]:
    source = model.spec["source"]
    env = [
        {"name": "VNPU_MODEL_NAME", "value": model.spec["modelName"]},
        {"name": "VNPU_MODEL_URI", "value": source["uri"]},
        {"name": "VNPU_SHARE_GROUP_NAME", "value": model.share_group},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if "format" in source:
        env.append({"name": "VNPU_MODEL_FORMAT", "value": source["format"]})
    dtype = model.spec.get("weights", {}).get("dtype")
    if dtype in api.RUNTIME_DTYPES:  # quantised file types (q4_1, ...) are the file's business, not a target
        env.append({"name": "VNPU_MODEL_DTYPE", "value": dtype})
    if "maxContextTokens" in model.spec.get("memory", {}):
        env.append({"name": "VNPU_MAX_CONTEXT", "value": str(model.spec["memory"]["maxContextTokens"])})
    offload = model.spec.get("offload", {})
    if offload.get("mode") == "async":
        env += [
            {"name": "VNPU_OFFLOAD_BUDGET_MIB", "value": str(offload["deviceBudgetMiB"])},
            {"name": "VNPU_PREFETCH_DEPTH", "value": str(offload.get("prefetchDepth", 2))},
        ]
    return env


def replica_pod(
    model: ModelRef,
    index: int,
    node: str,
    device: str,
    slices: int,
    holder: str | None,
    config: OperatorConfig,
    salt: str = "",
) -> dict[str, Any]:
    spec = model.spec
    port = int(spec.get("runtime", {}).get("port", 8000))
    annotations = {
        api.ANNOTATION_DEVICE: device,
        api.ANNOTATION_SLICES: str(slices),
        api.ANNOTATION_SHARE_GROUP: model.share_group,
        SAFE_TO_EVICT: "true",  # stateless: the autoscaler may move it
    }
    if holder:
        annotations[api.ANNOTATION_WEIGHT_HOLDER] = holder
    probe = {"httpGet": {"path": "/readyz", "port": RUNTIME_PORT_NAME}, "periodSeconds": 5}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": replica_pod_name(model.name, index, node, device, salt),
            "namespace": model.namespace,
            "labels": _labels(model, api.ROLE_REPLICA, model.share_group, {api.LABEL_REPLICA: str(index)}),
            "annotations": annotations,
            "ownerReferences": [_owner(model)],
        },
        "spec": {
            "affinity": _pin_to_node(node),
            "tolerations": _tolerations(spec),
            "containers": [
                {
                    "name": "runtime",
                    "image": spec.get("runtime", {}).get("image", config.runtime_image),
                    "imagePullPolicy": config.image_pull_policy,
                    "args": ["vnpu", "runtime", "serve", "--host", "0.0.0.0", "--port", str(port)],
                    "env": [*_runtime_env(model, config), {"name": "VNPU_PORT", "value": str(port)}],
                    "ports": [{"name": RUNTIME_PORT_NAME, "containerPort": port}],
                    "resources": _resources(spec, slices),
                    # Loading or attaching weights can take a while on a busy node: liveness starts
                    # only once the server has answered once (up to 5 minutes).
                    "startupProbe": {
                        "httpGet": {"path": "/healthz", "port": RUNTIME_PORT_NAME},
                        "periodSeconds": 2,
                        "failureThreshold": 150,
                    },
                    "readinessProbe": probe,
                    "livenessProbe": {**probe, "httpGet": {"path": "/healthz", "port": RUNTIME_PORT_NAME}},
                    "volumeMounts": _model_volumes(spec)[1],
                }
            ],
            "volumes": _model_volumes(spec)[0],
        },
    }


def holder_pod(
    owners: Sequence[ModelRef],
    share_group: str,
    node: str,
    device: str,
    slices: int,
    config: OperatorConfig,
    salt: str = "",
    weights_mib: int = 0,
) -> dict[str, Any]:
    """The weight-holder of ``share_group`` on one device. Owned by every model of the group that uses
    it, so garbage collection removes it only when the last one is gone (the operator also deletes it
    as soon as no replica of the group remains on that device)."""
    first = owners[0]
    refs = [{**_owner(m), "controller": m is first} for m in owners]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": holder_pod_name(share_group, node, device, salt),
            "namespace": first.namespace,
            "labels": _labels(None, api.ROLE_WEIGHTS, share_group),
            "annotations": {
                api.ANNOTATION_DEVICE: device,
                api.ANNOTATION_SLICES: str(slices),
                api.ANNOTATION_SHARE_GROUP: share_group,
                api.ANNOTATION_WEIGHTS_MIB: str(weights_mib),
                # Replicas on this device map its memory: evicting it would break them.
                SAFE_TO_EVICT: "false",
            },
            "ownerReferences": refs,
        },
        "spec": {
            "affinity": _pin_to_node(node),
            "tolerations": _tolerations(first.spec),
            "containers": [
                {
                    "name": "weights",
                    "image": first.spec.get("runtime", {}).get("image", config.runtime_image),
                    "imagePullPolicy": config.image_pull_policy,
                    "args": ["vnpu", "runtime", "weights-holder"],
                    "env": _runtime_env(first, config),
                    "resources": _resources(first.spec, slices),
                    "volumeMounts": _model_volumes(first.spec)[1],
                }
            ],
            "volumes": _model_volumes(first.spec)[0],
        },
    }


def placeholder_pod(
    model: ModelRef, index: int, slices: int, existing_nodes: Sequence[str], config: OperatorConfig
) -> dict[str, Any]:
    """A pause pod standing for a replica that fits nowhere. It requests the replica's slices, may not
    land on any node that exists now (so it stays Pending/Unschedulable and the Cluster Autoscaler
    sizes a new node from a template advertising vnpu.io/memory), and has a negative priority with
    preemption off so it never displaces real work."""
    selector = dict(model.spec.get("placement", {}).get("nodeSelector", {}))
    affinity: dict[str, Any] = {}
    if existing_nodes:
        term = {
            "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": sorted(existing_nodes)}]
        }
        affinity = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": placeholder_pod_name(model.name, index),
            "namespace": model.namespace,
            "labels": _labels(
                model, api.ROLE_PLACEHOLDER, model.share_group, {api.LABEL_REPLICA: str(index)}
            ),
            "annotations": {api.ANNOTATION_SLICES: str(slices), SAFE_TO_EVICT: "true"},
            "ownerReferences": [_owner(model)],
        },
        "spec": {
            "priorityClassName": PLACEHOLDER_PRIORITY_CLASS,
            "nodeSelector": selector,
            "affinity": affinity,
            "tolerations": _tolerations(model.spec),
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "placeholder",
                    "image": config.placeholder_image,
                    "imagePullPolicy": config.image_pull_policy,
                    "resources": _resources({}, slices),
                }
            ],
        },
    }
