"""Manifests the operator creates: replicas, weight-holders, autoscaler placeholders, and the Secret
holding each share group's key (each model's Service is :mod:`vnpu.operator.services`).

The planner decides *what* to run as typed :class:`PodIntent` values (in creation order); :func:`render`
turns one into a manifest. Pure functions: no API calls here, so the exact objects are unit-testable
and names are deterministic (a re-run after a crash creates the same names, and the API
server's AlreadyExists makes creation idempotent).

Every pod requests the extended resource of the device the operator chose (``vnpu.io/memory-<index>``),
so the scheduler and the kubelet enforce that device; the device plugin then hands the container that
device's environment and socket directory. What is specific to the pod — its share group, the weights
its holder holds, the group's key — is in the pod spec written here, never guessed on the node. The
pods of one (namespace, group) run as a user of their own (:func:`vnpu.sharing.share_uid`).

Every pod the operator creates passes the ``restricted`` Pod Security Standard (non-root, seccomp
RuntimeDefault, no privilege escalation, all capabilities dropped, a read-only root filesystem with a
scratch emptyDir, no service-account token), so a namespace that enforces it runs models like any other.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes.utils import parse_quantity

from vnpu import api, sharing
from vnpu.modelfile import MIB
from vnpu.operator.config import PLACEHOLDER_PRIORITY_CLASS, OperatorConfig
from vnpu.operator.spec import ModelSpec, PodToleration

SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"
RUNTIME_PORT_NAME = "http"
MAX_NAME = 63  # pod names end up as hostnames


#: Label value of the Secret holding a share group's key (vnpu.io/role).
ROLE_SHARE_KEY = "share-key"
#: Pod volume of the share group's key.
KEY_VOLUME = "share-key"
#: Scratch space of model pods (their root filesystem is read-only).
SCRATCH_VOLUME = "scratch"
SCRATCH_DIR = "/tmp"
#: The device a model's first placeholder requests: device 0 of a node the autoscaler would add (a pod
#: can name only one; its next placeholders request the next devices, see vnpu.operator.placeholders).
PLACEHOLDER_DEVICE_INDEX = 0
#: The pause image's own non-root user.
PLACEHOLDER_UID = 65535
#: Taints the node lifecycle controller puts on a node that stops reporting: model pods tolerate them
#: for the operator's node grace period, so the taint manager and the operator agree on when to move.
NODE_LOST_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


@dataclass(frozen=True)
class ModelRef:
    """What every pod of one InferenceModel needs to know about it."""

    name: str
    namespace: str
    uid: str
    spec: ModelSpec
    #: What its weight-holders hold (see vnpu.sharing.weights_id).
    weights_id: str = ""

    @property
    def share_group(self) -> str:
        return self.spec.share_group

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PodIntent:
    """One pod the plan wants: a replica on a device, the weight-holder of a group on a device, or a
    placeholder for a replica that fits nowhere. :func:`render` makes the manifest."""

    role: str  #: api.ROLE_REPLICA, ROLE_WEIGHTS or ROLE_PLACEHOLDER
    namespace: str
    name: str
    #: The models it serves: one for replicas and placeholders, every model using it for a holder.
    owners: tuple[ModelRef, ...]
    slices: int
    resource: str
    node: str | None = None
    device: str | None = None
    replica: int | None = None
    #: The weight-holder pod a replica maps its weights from.
    holder: str | None = None
    #: MiB of the weight copy a holder holds (a replica's: its holder's, under async offload the cap of
    #: what it keeps resident, so that it plans as its holder does).
    weights_mib: int = 0
    #: MiB of weights a holder keeps in host memory (an offloaded group's: every weight).
    host_mib: int = 0
    #: A holder that also answers requests (its group has a model for which vnpu.api.holder_serves).
    serves: bool = False
    #: Pod-template hash (and key generation) of a replica, its vnpu.io/template-hash label.
    template: str = ""
    #: The uid of the replica pod this one replaces (a defragmentation's move): kept until this one is
    #: Ready.
    replaces: str | None = None
    #: A placeholder's node labels beside the model's nodeSelector: the pool it stands for, when the
    #: model's pools differ (see :mod:`vnpu.operator.placeholders`).
    pool_selector: tuple[tuple[str, str], ...] = ()
    #: A node label a placeholder's node must not have: the pool it stands for is the unlabelled nodes.
    pool_absent: str = ""

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(o.key for o in self.owners)


def short_hash(*parts: str, length: int = 6) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:length]


def _name(prefix: str, suffix: str, distinct: bool = False) -> str:
    """``<prefix>-<suffix>`` cut to a valid length, keeping the (unique) suffix intact. ``distinct``:
    a prefix that is cut leaves a hash of itself in the name, so two (model names) that differ only
    past the cut never give one name; a name that fits is unchanged."""
    room = MAX_NAME - len(suffix) - 1
    if distinct and len(prefix) > room:
        tag = short_hash(prefix)
        return f"{prefix[: room - len(tag) - 1].rstrip('-.')}-{tag}-{suffix}"
    return f"{prefix[:room].rstrip('-.')}-{suffix}"


def replica_pod_name(model: str, index: int, node: str, device: str, salt: str = "") -> str:
    """Deterministic per (replica index, placement, ``salt``: size and pod-template hash): moving or
    re-sizing a replica yields a new name, so the old pod can still be terminating while the new one
    starts, and a retry after a crash creates the very same name instead of a duplicate."""
    return _name(model, f"{index}-{short_hash(node, device, salt)}", distinct=True)


def holder_pod_name(share_group: str, weights_id: str, node: str, device: str, salt: str = "") -> str:
    """Per (group, weights, placement, ``salt``: size and key generation): changed weights or a new key
    are a new holder, started beside the old one, never old weights under the old name."""
    return _name(f"vnpu-w-{share_group}", short_hash(weights_id, node, device, salt))


def placeholder_pod_name(model: str, index: int, shape: str = "") -> str:
    """Per (index, ``shape``: what it requests and where it may run): a placeholder whose size,
    selector, tolerations or pool changes is a new pod, and the old one goes."""
    return _name(f"{model}-pending", f"{index}-{short_hash(shape)}" if shape else str(index), distinct=True)


def render(intent: PodIntent, config: OperatorConfig) -> dict[str, Any]:
    """The manifest of ``intent``."""
    if intent.role == api.ROLE_REPLICA:
        manifest = _replica_pod(intent, config)
    elif intent.role == api.ROLE_WEIGHTS:
        manifest = _holder_pod(intent, config)
    elif intent.role == api.ROLE_PLACEHOLDER:
        manifest = _placeholder_pod(intent, config)
    else:
        raise ValueError(f"unknown pod role {intent.role!r}")
    if config.image_pull_secrets:  # (absent otherwise: pods made before this option look the same)
        manifest["spec"]["imagePullSecrets"] = [{"name": name} for name in config.image_pull_secrets]
    return manifest


def _labels(model: ModelRef | None, role: str, share_group: str, extra: dict[str, str]) -> dict[str, str]:
    labels = {
        api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE,
        api.LABEL_ROLE: role,
        api.LABEL_SHARE_GROUP: share_group,
    }
    if model is not None:
        labels[api.LABEL_MODEL] = model.name
    labels.update(extra)
    return labels


def replica_selector(model: str) -> dict[str, str]:
    """The labels that select exactly the replica pods of ``model`` (its Service's selector): the
    managed-by label keeps out pods anyone else labelled alike (the admission policy refuses those)."""
    return {
        api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE,
        api.LABEL_ROLE: api.ROLE_REPLICA,
        api.LABEL_MODEL: model,
    }


def weights_label(weights_id: str) -> str:
    """The vnpu.io/weights label value of a holder of ``weights_id``: a hash (a label value is at most
    63 characters; the id is a URI, a dtype and an image)."""
    return short_hash(weights_id, length=16)


def holder_selector(share_group: str, weights_id: str) -> dict[str, str]:
    """The labels that select the weight-holders of ``share_group`` holding ``weights_id`` (a model's
    warm Service): a holder answers whatever model name it is asked, so one of another model's weights
    in the same explicit share group would answer in this model's name."""
    return {
        api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE,
        api.LABEL_ROLE: api.ROLE_WEIGHTS,
        api.LABEL_SHARE_GROUP: share_group,
        api.LABEL_WEIGHTS: weights_label(weights_id),
    }


def holder_pod_selector(holder: str) -> dict[str, str]:
    """The labels that select exactly the weight-holder pod named ``holder`` (its PodDisruptionBudget's
    selector)."""
    return {
        api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE,
        api.LABEL_ROLE: api.ROLE_WEIGHTS,
        api.LABEL_HOLDER: holder,
    }


class Owner(Protocol):
    """What an ownerReference names of a model: a :class:`ModelRef`, or an observed model that is not
    planned this pass (its estimate fails) but whose running pods still use the object."""

    @property
    def name(self) -> str: ...

    @property
    def uid(self) -> str: ...


def _owner(model: Owner) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": model.name,
        "uid": model.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owner_references(owners: Sequence[Owner]) -> list[dict[str, Any]]:
    """Every model as an owner, the first as the controller."""
    return [{**_owner(m), "controller": i == 0} for i, m in enumerate(owners)]


def _pin_to_node(node: str) -> dict[str, Any]:
    """Required node affinity on the node's name (what DaemonSets use): the scheduler still checks
    resources, taints and the device's capacity, unlike setting spec.nodeName directly."""
    term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def _tolerations(spec: ModelSpec, node_grace_seconds: int | None) -> list[dict[str, Any]]:
    """The model's tolerations, plus the node-lost taints for the grace period unless it names them."""
    out = [t.manifest() for t in spec.placement.tolerations]
    if node_grace_seconds is not None:
        named = {t.key for t in spec.placement.tolerations}
        out += [
            PodToleration(key, "Exists", "", "NoExecute", node_grace_seconds).manifest()
            for key in NODE_LOST_TAINTS
            if key not in named
        ]
    return out


def _resources(spec: ModelSpec | None, resource: str, slices: int, host_mib: int = 0) -> dict[str, Any]:
    """The user's CPU/memory plus ``slices`` of the chosen device's own resource. ``host_mib``: weights
    a holder keeps in host memory (under async offload, all of them), added to the memory the user
    sized for a replica, which holds none of them: else the holder met its replicas' limit as it loaded
    and was OOM-killed, over and over."""
    requests = dict(spec.runtime.requests) if spec else {}
    limits = dict(spec.runtime.limits) if spec else {}
    if host_mib:
        for sized in (requests, limits):
            if "memory" in sized:
                sized["memory"] = f"{math.ceil(parse_quantity(sized['memory']) / MIB) + host_mib}Mi"
    # Extended resources must have requests == limits.
    requests[resource] = limits[resource] = str(slices)
    return {"requests": requests, "limits": limits}


def _pod_security(uid: int) -> dict[str, Any]:
    """The restricted profile, pod level: a non-root user of its own, RuntimeDefault seccomp."""
    return {
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


#: The restricted profile, container level.
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


def _share_uid(model: ModelRef) -> int:
    """The pod runs as its (namespace, group)'s own user: the kernel keeps other groups away from its
    socket on the shared device directory, and the key's files are readable through ``fsGroup``."""
    return sharing.share_uid(model.namespace, model.share_group)


def _key_volume(model: ModelRef) -> tuple[dict[str, Any], dict[str, Any]]:
    """The share group's Secret, read-only (0440, group = fsGroup), at vnpu.sharing.KEY_MOUNT_DIR."""
    volume = {
        "name": KEY_VOLUME,
        "secret": {"secretName": sharing.secret_name(model.share_group), "defaultMode": 0o440},
    }
    return volume, {"name": KEY_VOLUME, "mountPath": sharing.KEY_MOUNT_DIR, "readOnly": True}


def _scratch() -> tuple[dict[str, Any], dict[str, Any]]:
    return {"name": SCRATCH_VOLUME, "emptyDir": {}}, {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_DIR}


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


#: Where a pvc:// source's claim is mounted in model pods (the runtime's VNPU_PVC_ROOT default).
PVC_ROOT = "/mnt/pvc"


def _model_volumes(spec: ModelSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A pvc://<claim>/<path> source: the claim, read-only, at /mnt/pvc/<claim> in every model pod."""
    uri = spec.source.uri
    if not uri.startswith("pvc://"):
        return [], []
    claim = uri.removeprefix("pvc://").split("/", 1)[0]
    volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    return [volume], [{"name": "model", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True}]


def _runtime_env(spec: ModelSpec, weights_mib: int = 0) -> list[dict[str, Any]]:
    """The runtime's settings from the spec; ``weights_mib``: what the group's holder holds on the
    device (under async offload, at most that much of the weights stays resident)."""
    env = [
        {"name": "VNPU_MODEL_NAME", "value": spec.model_name},
        {"name": "VNPU_MODEL_URI", "value": spec.source.uri},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # The root filesystem is read-only: temporary files and caches go to the scratch emptyDir.
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "HOME", "value": SCRATCH_DIR},
    ]
    if spec.source.format:
        env.append({"name": "VNPU_MODEL_FORMAT", "value": spec.source.format})
    if spec.weights_dtype in api.RUNTIME_DTYPES:
        env.append({"name": "VNPU_MODEL_DTYPE", "value": spec.weights_dtype})
    elif spec.weights_dtype is None and not spec.runtime.image:
        # Held at the dtype the weights were sized at, not at the device's default (float32 on CPU
        # would double a bfloat16 file past the holder's slices). Another runtime's quantised types
        # are its own business.
        env.append({"name": "VNPU_MODEL_DTYPE", "value": api.DTYPE_FROM_FILE})
    if spec.memory.max_context_tokens is not None:
        env.append({"name": "VNPU_MAX_CONTEXT", "value": str(spec.memory.max_context_tokens)})
    if spec.memory.max_batch is not None:
        env.append({"name": "VNPU_MAX_BATCH", "value": str(spec.memory.max_batch)})
    env.append({"name": "VNPU_DEFAULT_PRIORITY", "value": str(spec.priority)})
    env.append({"name": "VNPU_REQUEST_DRAIN_SECONDS", "value": str(spec.runtime.drain_seconds)})
    if spec.offloaded:
        env += [
            {"name": "VNPU_OFFLOAD_BUDGET_MIB", "value": str(spec.offload.device_budget_mib)},
            {"name": "VNPU_PREFETCH_DEPTH", "value": str(spec.offload.prefetch_depth)},
        ]
        if weights_mib:
            env.append({"name": "VNPU_OFFLOAD_RESIDENT_MIB", "value": str(weights_mib)})
    return env


def _pod(
    intent: PodIntent,
    labels: dict[str, str],
    annotations: dict[str, str],
    owners: list[dict[str, Any]],
    spec: dict[str, Any],
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": intent.name,
            "namespace": intent.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": owners,
        },
        "spec": {"automountServiceAccountToken": False, "enableServiceLinks": False, **spec},
    }


def _replica_pod(intent: PodIntent, config: OperatorConfig) -> dict[str, Any]:
    """A serving replica on ``intent.device``. With a holder it maps that holder's weights and never
    loads its own; without one it loads them."""
    (model,) = intent.owners
    spec = model.spec
    assert intent.node and intent.device and intent.replica is not None
    port = spec.runtime.port
    annotations = {
        api.ANNOTATION_DEVICE: intent.device,
        api.ANNOTATION_SLICES: str(intent.slices),
        api.ANNOTATION_SHARE_GROUP: model.share_group,
        SAFE_TO_EVICT: "true",  # stateless: the autoscaler may move it
    }
    if intent.holder:
        annotations[api.ANNOTATION_WEIGHT_HOLDER] = intent.holder
    if intent.replaces:
        annotations[api.ANNOTATION_REPLACES] = intent.replaces
    # Readiness every second, as Knative's queue-proxy probes a starting revision aggressively: a
    # replica woken from zero (or attached to warm weights in ~0.1 s) takes traffic as soon as it can,
    # not up to a period later. /readyz is a dict lookup; liveness stays at 5 s.
    readiness = {"httpGet": {"path": "/readyz", "port": RUNTIME_PORT_NAME}, "periodSeconds": 1}
    volumes, mounts = _model_volumes(spec)
    env = _runtime_env(spec, intent.weights_mib)
    if intent.holder:
        key_volume, key_mount = _key_volume(model)
        volumes, mounts = [*volumes, key_volume], [*mounts, key_mount]
        env += _share_env(model)
    scratch, scratch_mount = _scratch()
    volumes, mounts = [*volumes, scratch], [*mounts, scratch_mount]
    labels = {api.LABEL_REPLICA: str(intent.replica), api.LABEL_TEMPLATE_HASH: intent.template}
    return _pod(
        intent,
        _labels(model, api.ROLE_REPLICA, model.share_group, labels),
        annotations,
        [_owner(model)],
        {
            "affinity": _pin_to_node(intent.node),
            "tolerations": _tolerations(spec, config.node_grace_seconds),
            "securityContext": _pod_security(_share_uid(model)),
            # Room for the requests in flight at SIGTERM (the runtime drains them for drainSeconds).
            "terminationGracePeriodSeconds": api.replica_grace_s(spec.runtime.drain_seconds),
            "containers": [
                {
                    "name": "runtime",
                    "image": spec.image(config.runtime_image),
                    "imagePullPolicy": config.image_pull_policy,
                    "args": ["vnpu", "runtime", "serve", "--host", "0.0.0.0", "--port", str(port)],
                    "env": [*env, {"name": "VNPU_PORT", "value": str(port)}],
                    "ports": [{"name": RUNTIME_PORT_NAME, "containerPort": port}],
                    "resources": _resources(spec, intent.resource, intent.slices),
                    # Loading or attaching weights can take a while on a busy node: liveness starts
                    # only once the server has answered once (up to 5 minutes).
                    "startupProbe": {
                        "httpGet": {"path": "/healthz", "port": RUNTIME_PORT_NAME},
                        "periodSeconds": 1,
                        "failureThreshold": 300,
                    },
                    "readinessProbe": readiness,
                    "livenessProbe": {
                        "httpGet": {"path": "/healthz", "port": RUNTIME_PORT_NAME},
                        "periodSeconds": 5,
                    },
                    "securityContext": CONTAINER_SECURITY,
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    )


def _holder_pod(intent: PodIntent, config: OperatorConfig) -> dict[str, Any]:
    """The weight-holder of the owners' share group and weights on one device. Owned by every model of
    the group that uses it, so garbage collection removes it only when the last one is gone (the
    operator also deletes it as soon as no replica of the group remains on that device)."""
    first = intent.owners[0]
    assert intent.node and intent.device
    volumes, mounts = _model_volumes(first.spec)
    key_volume, key_mount = _key_volume(first)
    scratch, scratch_mount = _scratch()
    labels = {
        api.LABEL_WEIGHTS: weights_label(first.weights_id),  # what a warm Service selects by
        api.LABEL_HOLDER: intent.name,  # what its PodDisruptionBudget selects by
    }
    container = {
        "name": "weights",
        "image": first.spec.image(config.runtime_image),
        "imagePullPolicy": config.image_pull_policy,
        "args": ["vnpu", "runtime", "weights-holder"],
        "env": [*_runtime_env(first.spec, intent.weights_mib), *_share_env(first)],
        "resources": _resources(first.spec, intent.resource, intent.slices, intent.host_mib),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [*mounts, key_mount, scratch_mount],
    }
    if intent.serves:
        serving = [o for o in intent.owners if o.spec.holder_serves] or list(intent.owners)
        container |= _holder_serving(container["env"], serving)
    return _pod(
        intent,
        _labels(None, api.ROLE_WEIGHTS, first.share_group, labels),
        {
            api.ANNOTATION_DEVICE: intent.device,
            api.ANNOTATION_SLICES: str(intent.slices),
            api.ANNOTATION_SHARE_GROUP: first.share_group,
            api.ANNOTATION_WEIGHTS_MIB: str(intent.weights_mib),
            # Replicas on this device map its memory, and its budget (vnpu.operator.disruption) refuses
            # its eviction while one does: the autoscaler honours it. Once none does (a warm holder of a
            # model at zero) it may go, and its node with it. "false" kept every node with a holder, warm
            # ones included, for good; without "true" its emptyDir and its controller (a custom
            # resource) block scale-down all the same.
            SAFE_TO_EVICT: "true",
        },
        owner_references(intent.owners),
        {
            "affinity": _pin_to_node(intent.node),
            "tolerations": _tolerations(first.spec, config.node_grace_seconds),
            "securityContext": _pod_security(_share_uid(first)),
            # Outlives any replica's grace: it waits for those attached to detach, as long as the longest
            # drain they announced (vnpu.api.HOLDER_DRAIN_S bounds it), and exits once none is left.
            "terminationGracePeriodSeconds": api.HOLDER_GRACE_S,
            "containers": [container],
            "volumes": [*volumes, key_volume, scratch],
        },
    )


def _holder_serving(env: list[dict[str, Any]], serving: Sequence[ModelRef]) -> dict[str, Any]:
    """What a holder that answers requests adds (``weights-holder --serve``): the HTTP port the warm
    Service selects, one sequence at a time (the memory its slices hold for it), at the longest context
    of the models it answers for. No readiness probe on it: a holder is Ready when it holds, and its
    replicas' readiness counts on that even where it cannot serve; until its server answers (while it
    loads, or never when too small to serve) the gateway finds the port closed and waits for a replica."""
    port = serving[0].spec.runtime.port
    # The longest a model's replicas take (a spec without maxContextTokens: the runtime's default),
    # which the group's holder size was estimated for (vnpu.memory: holder_serving_mib).
    context = max(o.spec.memory.max_context_tokens or api.DEFAULT_MAX_CONTEXT for o in serving)
    # Its requests in flight at SIGTERM get as long as the longest any of these models gives its own.
    drain = max(o.spec.runtime.drain_seconds for o in serving)
    replaced = {"VNPU_MAX_BATCH", "VNPU_MAX_CONTEXT", "VNPU_PORT", "VNPU_REQUEST_DRAIN_SECONDS"}
    env = [e for e in env if e["name"] not in replaced] + [
        {"name": "VNPU_MAX_BATCH", "value": "1"},
        {"name": "VNPU_PORT", "value": str(port)},
        {"name": "VNPU_MAX_CONTEXT", "value": str(context)},
        {"name": "VNPU_REQUEST_DRAIN_SECONDS", "value": str(drain)},
    ]
    return {
        "args": ["vnpu", "runtime", "weights-holder", "--serve", "--host", "0.0.0.0", "--port", str(port)],
        "env": env,
        "ports": [{"name": RUNTIME_PORT_NAME, "containerPort": port}],
    }


def _without_label(key: str) -> dict[str, Any]:
    """Pod spec fields that keep a pod off the nodes labelled ``key`` (a nodeSelector cannot say it)."""
    term = {"matchExpressions": [{"key": key, "operator": "DoesNotExist"}]}
    return {
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
        }
    }


def _placeholder_pod(intent: PodIntent, config: OperatorConfig) -> dict[str, Any]:
    """A pause pod standing for a device-worth of replicas that fit nowhere: it requests their slices
    (and the weights') of ``vnpu.io/memory-<i>`` in the slices of the pool it stands for, so the
    Cluster Autoscaler sizes new nodes from a template advertising it, with the model's nodeSelector
    (and that pool's label where the model's pools differ) and tolerations
    (:mod:`vnpu.operator.placeholders`). It names no node: a valid pod on any cluster. Were the
    scheduler to find room the packer did not, the pod runs pause at a negative priority with
    preemption off, and any replica preempts it, so it never keeps capacity from real work."""
    (model,) = intent.owners
    spec = model.spec
    return _pod(
        intent,
        _labels(model, api.ROLE_PLACEHOLDER, model.share_group, {api.LABEL_REPLICA: str(intent.replica)}),
        {api.ANNOTATION_SLICES: str(intent.slices), SAFE_TO_EVICT: "true"},
        [_owner(model)],
        {
            "priorityClassName": PLACEHOLDER_PRIORITY_CLASS,
            "nodeSelector": {**spec.placement.node_selector, **dict(intent.pool_selector)},
            "tolerations": [t.manifest() for t in spec.placement.tolerations],
            **(_without_label(intent.pool_absent) if intent.pool_absent else {}),
            "terminationGracePeriodSeconds": 0,
            "securityContext": _pod_security(PLACEHOLDER_UID),
            "containers": [
                {
                    "name": "placeholder",
                    "image": config.placeholder_image,
                    "imagePullPolicy": config.image_pull_policy,
                    "resources": _resources(None, intent.resource, intent.slices),
                    "securityContext": CONTAINER_SECURITY,
                }
            ],
        },
    )
