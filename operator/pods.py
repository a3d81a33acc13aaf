"""Manifests the operator creates: replicas, weight-holders, autoscaler placeholders, and the Secret
holding each share group's key.

Pure functions from (model, placement) to a manifest dict: no API calls here, so the exact objects are
unit-testable and names are deterministic (a re-run after a crash creates the same names, and the API
server's AlreadyExists makes creation idempotent).

Every pod requests the extended resource of the device the operator chose (``vnpu.io/memory-<index>``),
so the scheduler and the kubelet enforce that device; the device plugin then hands the container that
device's environment and socket directory. What is specific to the pod — its share group, the weights
its holder holds, the group's key — is in the pod spec written here, never guessed on the node. The
pods of one (namespace, group) run as a user of their own (:func:`vnpu.sharing.share_uid`).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vnpu import api, sharing
from vnpu.operator.config import PLACEHOLDER_PRIORITY_CLASS, OperatorConfig

SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"
RUNTIME_PORT_NAME = "http"
MAX_NAME = 63  # pod names end up as hostnames


#: Label value of the Secret holding a share group's key (vnpu.io/role).
ROLE_SHARE_KEY = "share-key"
#: Pod volume of the share group's key.
KEY_VOLUME = "share-key"
#: The resource placeholders request: device 0 of a node the autoscaler would add (any device of a
#: fresh node fits what fits on one device; a pod can name only one).
PLACEHOLDER_DEVICE_INDEX = 0


@dataclass(frozen=True)
class ModelRef:
    """What every pod of one InferenceModel needs to know about it."""

    name: str
    namespace: str
    uid: str
    spec: Mapping[str, Any]
    share_group: str
    #: What its weight-holders hold (see vnpu.sharing.weights_id).
    weights_id: str = ""


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


def holder_pod_name(share_group: str, weights_id: str, node: str, device: str, salt: str = "") -> str:
    """Per (group, weights, placement, ``salt``: size and key generation): changed weights or a new key
    are a new holder, started beside the old one, never old weights under the old name."""
    return _name(f"vnpu-w-{share_group}", short_hash(weights_id, node, device, salt))


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


def _resources(spec: Mapping[str, Any], resource: str, slices: int) -> dict[str, Any]:
    """The user's CPU/memory plus ``slices`` of the chosen device's own resource."""
    user = spec.get("runtime", {}).get("resources", {})
    requests = {k: str(v) for k, v in user.get("requests", {}).items()}
    limits = {k: str(v) for k, v in user.get("limits", {}).items()}
    # Extended resources must have requests == limits.
    requests[resource] = limits[resource] = str(slices)
    return {"requests": requests, "limits": limits}


def _share_security(model: ModelRef) -> dict[str, Any]:
    """The pod runs as its (namespace, group)'s own user: the kernel keeps other groups away from its
    socket on the shared device directory, and the key's files are readable through ``fsGroup``."""
    uid = sharing.share_uid(model.namespace, model.share_group)
    return {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid, "runAsNonRoot": True}


def _key_volume(model: ModelRef) -> tuple[dict[str, Any], dict[str, Any]]:
    """The share group's Secret, read-only (0440, group = fsGroup), at vnpu.sharing.KEY_MOUNT_DIR."""
    volume = {
        "name": KEY_VOLUME,
        "secret": {"secretName": sharing.secret_name(model.share_group), "defaultMode": 0o440},
    }
    return volume, {"name": KEY_VOLUME, "mountPath": sharing.KEY_MOUNT_DIR, "readOnly": True}


def _share_env(model: ModelRef) -> list[dict[str, Any]]:
    """Who this pod shares weights with: its namespace (from the API server, not a value a pod author
    could choose), group and weights, and where the group's key is."""
    return [
        {"name": sharing.ENV_SHARE_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": sharing.ENV_SHARE_GROUP, "value": model.share_group},
        {"name": sharing.ENV_WEIGHTS_ID, "value": model.weights_id},
        {"name": sharing.ENV_SHARE_KEY_FILE, "value": sharing.KEY_FILE},
    ]


def share_key_secret(
    namespace: str, share_group: str, owners: Sequence[ModelRef], key: bytes
) -> dict[str, Any]:
    """The Secret of ``share_group``'s key in ``namespace``: only pods of that namespace can mount it.
    Immutable (a key never changes; a new key is a new Secret, which rolls the group's pods) and owned
    by the group's models, so it goes with the last of them."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "immutable": True,
        "metadata": {
            "name": sharing.secret_name(share_group),
            "namespace": namespace,
            "labels": {
                api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE,
                api.LABEL_ROLE: ROLE_SHARE_KEY,
                api.LABEL_SHARE_GROUP: share_group,
            },
            "ownerReferences": owner_references(owners),
        },
        "data": {sharing.SECRET_KEY_FIELD: base64.b64encode(key).decode()},
    }


def owner_references(owners: Sequence[ModelRef]) -> list[dict[str, Any]]:
    """Every model as an owner, the first as the controller."""
    return [{**_owner(m), "controller": i == 0} for i, m in enumerate(owners)]


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
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if "format" in source:
        env.append({"name": "VNPU_MODEL_FORMAT", "value": source["format"]})
    dtype = model.spec.get("weights", {}).get("dtype")
    if dtype in api.RUNTIME_DTYPES:  # quantised file types (q4_1, ...) are the file's business, not a target
        env.append({"name": "VNPU_MODEL_DTYPE", "value": dtype})
    memory = model.spec.get("memory", {})
    if "maxContextTokens" in memory:
        env.append({"name": "VNPU_MAX_CONTEXT", "value": str(memory["maxContextTokens"])})
    if "maxBatch" in memory:
        env.append({"name": "VNPU_MAX_BATCH", "value": str(memory["maxBatch"])})
    env.append({"name": "VNPU_DEFAULT_PRIORITY", "value": str(int(model.spec.get("priority", 0)))})
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
    resource: str,
    slices: int,
    holder: str | None,
    config: OperatorConfig,
    salt: str = "",
) -> dict[str, Any]:
    """A serving replica on ``device`` (``resource`` is that device's extended resource). With a
    ``holder`` it maps that holder's weights and never loads its own; without one it loads them."""
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
    volumes, mounts = _model_volumes(spec)
    env = _runtime_env(model, config)
    pod_security: dict[str, Any] = {}
    if holder:
        key_volume, key_mount = _key_volume(model)
        volumes, mounts = [*volumes, key_volume], [*mounts, key_mount]
        env += _share_env(model)
        pod_security = _share_security(model)
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
            "securityContext": pod_security,
            "containers": [
                {
                    "name": "runtime",
                    "image": spec.get("runtime", {}).get("image", config.runtime_image),
                    "imagePullPolicy": config.image_pull_policy,
                    "args": ["vnpu", "runtime", "serve", "--host", "0.0.0.0", "--port", str(port)],
                    "env": [*env, {"name": "VNPU_PORT", "value": str(port)}],
                    "ports": [{"name": RUNTIME_PORT_NAME, "containerPort": port}],
                    "resources": _resources(spec, resource, slices),
                    # Loading or attaching weights can take a while on a busy node: liveness starts
                    # only once the server has answered once (up to 5 minutes).
                    "startupProbe": {
                        "httpGet": {"path": "/healthz", "port": RUNTIME_PORT_NAME},
                        "periodSeconds": 2,
                        "failureThreshold": 150,
                    },
                    "readinessProbe": probe,
                    "livenessProbe": {**probe, "httpGet": {"path": "/healthz", "port": RUNTIME_PORT_NAME}},
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    }


def holder_pod(
    owners: Sequence[ModelRef],
    node: str,
    device: str,
    resource: str,
    slices: int,
    config: OperatorConfig,
    salt: str = "",
    weights_mib: int = 0,
) -> dict[str, Any]:
    """The weight-holder of the owners' share group and weights on one device. Owned by every model of
    the group that uses it, so garbage collection removes it only when the last one is gone (the
    operator also deletes it as soon as no replica of the group remains on that device)."""
    first = owners[0]
    share_group = first.share_group
    volumes, mounts = _model_volumes(first.spec)
    key_volume, key_mount = _key_volume(first)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": holder_pod_name(share_group, first.weights_id, node, device, salt),
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
            "ownerReferences": owner_references(owners),
        },
        "spec": {
            "affinity": _pin_to_node(node),
            "tolerations": _tolerations(first.spec),
            "securityContext": _share_security(first),
            "containers": [
                {
                    "name": "weights",
                    "image": first.spec.get("runtime", {}).get("image", config.runtime_image),
                    "imagePullPolicy": config.image_pull_policy,
                    "args": ["vnpu", "runtime", "weights-holder"],
                    "env": [*_runtime_env(first, config), *_share_env(first)],
                    "resources": _resources(first.spec, resource, slices),
                    "volumeMounts": [*mounts, key_mount],
                }
            ],
            "volumes": [*volumes, key_volume],
        },
    }


def placeholder_pod(
    model: ModelRef, index: int, slices: int, existing_nodes: Sequence[str], config: OperatorConfig
) -> dict[str, Any]:
    """A pause pod standing for a replica that fits nowhere. It requests the replica's slices, may not
    land on any node that exists now (so it stays Pending/Unschedulable and the Cluster Autoscaler
    sizes a new node from a template advertising ``vnpu.io/memory-0``: what fits on one device fits on
    a fresh node's first), and has a negative priority with preemption off so it never displaces real
    work."""
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
                    "resources": _resources({}, api.device_resource(PLACEHOLDER_DEVICE_INDEX), slices),
                }
            ],
        },
    }
