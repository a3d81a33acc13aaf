"""Stable names of vnpu's Kubernetes API (see DESIGN.md "Names"). Change only with a migration note.

Every component imports these constants instead of spelling the strings, so a rename is one edit.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from typing import Any

GROUP = "vnpu.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceModel"
PLURAL = "inferencemodels"
SINGULAR = "inferencemodel"
SHORT_NAME = "infm"
CRD_NAME = f"{PLURAL}.{GROUP}"
#: The CRD's schema revision, also its annotation ``vnpu.io/crd-revision`` in crds/: bumped with every
#: change of the CRD's spec (a test pins its hash), so an operator can tell that the served CRD is older
#: than what it writes (Helm installs crds/ once and never upgrades them). A CRD without it is 0.
CRD_REVISION = 2
CRD_REVISION_ANNOTATION = f"{GROUP}/crd-revision"

#: Longest ``spec.modelName`` (the CRD's maxLength): what clients send as ``model``. A serving
#: weight-holder answers to any name and echoes it in every chunk, so it refuses a longer one.
MAX_MODEL_NAME_LEN = 253

#: Extended resources: one per physical device, ``vnpu.io/memory-<index>`` (the device's index on its
#: node); one unit is one slice of ``slice_mib`` MiB of that device. Per-device names let the scheduler
#: and the kubelet enforce the device the operator chose; nothing has to guess it. (Before 0.2 there was
#: one aggregate ``vnpu.io/memory``: see the README's migration note.)
RESOURCE_PREFIX = f"{GROUP}/memory-"
LEGACY_RESOURCE_MEMORY = f"{GROUP}/memory"
DEFAULT_SLICE_MIB = 1024
MAX_DEVICE_INDEX = 9999
_DEVICE_RESOURCE = re.compile(r"^vnpu\.io/memory-(?P<index>0|[1-9][0-9]{0,3})$")

#: Node annotation holding the JSON device inventory written by the device plugin.
ANNOTATION_DEVICES = f"{GROUP}/devices"

#: Tokens per block of the runtime's paged KV cache (vLLM's default on CUDA). The pool holds whole
#: blocks plus one null block, and the operator's estimate sizes a replica's KV cache the same way.
KV_BLOCK_SIZE = 16

#: Bytes every tensor of the runtime's weight arena is aligned to (vector loads on CPUs, GPU kernels'
#: widest accesses); the estimate counts the padding, so a holder's slices always hold its arena.
ARENA_ALIGNMENT = 256

#: Tokens of context the runtime holds per sequence when the spec gives no ``maxContextTokens`` (its
#: ``--max-context`` default; what a weight-holder serving a ``kvCacheMiB``-only spec is sized for).
DEFAULT_MAX_CONTEXT = 2048
#: Sequences the runtime decodes together when the spec gives no ``maxBatch`` (its ``--max-batch``
#: default; what a replica of a ``kvCacheMiB`` spec runs with, and is sized for).
DEFAULT_MAX_BATCH = 16

#: Weight dtypes vnpu's runtime holds on a device (quantized files are dequantised on load to one of
#: these); the CRD refuses other ``weights.dtype`` values unless ``runtime.image`` names another runtime.
RUNTIME_DTYPES = ("float32", "float16", "bfloat16")
#: ``VNPU_MODEL_DTYPE`` value the operator sets when ``weights.dtype`` is unset: hold the weights at the
#: dtype it sized them at (:func:`vnpu.memory.load_dtype` of the file), not at the device's default.
DTYPE_FROM_FILE = "file"

#: Pod annotations set by the operator and honoured by the device plugin.
ANNOTATION_DEVICE = f"{GROUP}/device"
ANNOTATION_SLICES = f"{GROUP}/slices"
ANNOTATION_SHARE_GROUP = f"{GROUP}/share-group"

#: Pod annotation naming the weight-holder pod a replica maps its weights from.
ANNOTATION_WEIGHT_HOLDER = f"{GROUP}/weight-holder"

#: Pod annotation on a replica started by a defragmentation: the uid of the pod (same model and replica
#: index) it replaces, which the operator keeps running until this one is Ready (make-before-break). A
#: uid, not a name: a later pod may take the old name, and a stale claim must never reach it.
ANNOTATION_REPLACES = f"{GROUP}/replaces"

#: How the pods of a model stop (one chain, each bound inside the next; the kubelet sends SIGKILL at a
#: pod's ``terminationGracePeriodSeconds``). A replica at SIGTERM takes no new request and gives those
#: in flight up to its model's ``runtime.drainSeconds`` to finish (a long generation, streamed; default
#: ``REPLICA_DRAIN_S``, at most ``MAX_DRAIN_S``); those still running then fail ("the server is shutting
#: down") and get ``DRAIN_ERROR_SEND_S`` to send that error before their connections are closed; its
#: pod's grace adds ``GRACE_MARGIN_S`` (that second, the step in flight and the process's exit). A
#: weight-holder at SIGTERM grants no new attach and waits for its replicas to detach, up to the longest
#: drain its attached replicas announced when they attached plus ``HOLDER_WAIT_MARGIN_S`` (past their
#: grace), so that a scale-down, a node drain or a model's deletion, which stop a replica and its holder
#: together, never take the weights from under a request in flight. Its pod's grace covers the longest
#: drain a model may set (a holder outlives its models' spec changes, and exits as soon as no replica is
#: attached): ``HOLDER_DRAIN_S`` (``weights-holder --drain-seconds``) bounds the wait, and the grace
#: adds the time to release the arena.
REPLICA_DRAIN_S = 60
MAX_DRAIN_S = 3600
GRACE_MARGIN_S = 5
DRAIN_ERROR_SEND_S = 1
HOLDER_WAIT_MARGIN_S = GRACE_MARGIN_S + 10
HOLDER_DRAIN_S = MAX_DRAIN_S + HOLDER_WAIT_MARGIN_S
HOLDER_GRACE_S = HOLDER_DRAIN_S + GRACE_MARGIN_S


#: Seconds a stopping server (a replica, the gateway) still accepts connections after SIGTERM, its
#: ``/readyz`` at 503, while Kubernetes takes it out of the Services that reach it: kube-proxy and the
#: gateway's EndpointSlice watch learn of a pod's deletion a moment after the kubelet's SIGTERM, and a
#: connection made in between to a closed listener was refused. Part of the drain, not added to it: the
#: drain still counts from SIGTERM, so the pod's grace stays as it is (a drain of 0 closes at once).
SHUTDOWN_DELAY_S = 5


def shutdown_delay_s(delay_s: float, drain_s: float) -> float:
    """How long a server told ``delay_s`` keeps its listener open within a drain of ``drain_s``."""
    return max(0.0, min(delay_s, drain_s))


def replica_grace_s(drain_s: int) -> int:
    """A replica pod's ``terminationGracePeriodSeconds`` for a drain of ``drain_s`` seconds."""
    return drain_s + GRACE_MARGIN_S


#: Pod annotation on a weight-holder: MiB of the weight copy it holds (views of the memory saved by
#: sharing count (replicas - 1) copies of this per device, as the operator's status does).
ANNOTATION_WEIGHTS_MIB = f"{GROUP}/weights-mib"

#: InferenceModel annotations written by the gateway (vnpu.gateway.activity), read by the operator to
#: scale idle models to zero and to forecast demand: a cumulative request counter and the time of the
#: latest request (RFC 3339).
ANNOTATION_REQUESTS = f"{GROUP}/requests"
ANNOTATION_LAST_REQUEST = f"{GROUP}/last-request"
#: The most digits a counter in an annotation may have (below 2**63, as the gateway writes it).
MAX_COUNT_DIGITS = 18
#: How far ahead of its reader's clock a ``vnpu.io/last-request`` may be and still count: the gateway's
#: replicas and the operator run on different nodes, whose clocks differ a little. One further ahead was
#: written by a wrong clock (a node's, or one stepped back since) or by hand, and would keep its model
#: awake until the clocks reach it: the operator ignores it and the gateway writes over it
#: (:func:`credible_last_request`).
LAST_REQUEST_MAX_AHEAD_S = 60.0

#: ``spec.scaling.keepWarm``: whether a model's weight-holders stay while it is scaled to zero.
KEEP_WARM_ALWAYS, KEEP_WARM_NEVER, KEEP_WARM_AUTO = "Always", "Never", "Auto"
KEEP_WARM_MODES = (KEEP_WARM_ALWAYS, KEEP_WARM_NEVER, KEEP_WARM_AUTO)
DEFAULT_KEEP_WARM = KEEP_WARM_AUTO
DEFAULT_MIN_REPLICAS = 1
#: ``spec.priority``: placement priority, and the default priority of the model's requests (higher is
#: more important). A request may ask for its own (the runtime's ``priority`` field); through the
#: gateway with API keys, no higher than the model's own or its key's ``maxPriority``.
DEFAULT_PRIORITY = 0
#: Bounds of a request's integer fields (``priority``, ``max_tokens``): int32, as vLLM's and protobuf's.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def holder_serves(min_replicas: int, keep_warm: str) -> bool:
    """Whether the model's weight-holders answer its requests while no replica is ready: a model that
    may scale to zero and may keep its holders meanwhile. Such a holder serves one sequence at a time
    from memory of its own (counted with its weights), so a wake from warm answers at once, as Ollama's
    loaded models do, while the gateway scales the model back to a replica. The operator (what it
    creates) and the gateway (where it routes) both ask this, so they agree."""
    return min_replicas == 0 and keep_warm != KEEP_WARM_NEVER


LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "vnpu-operator"
LABEL_MODEL = f"{GROUP}/model"
LABEL_ROLE = f"{GROUP}/role"
ROLE_REPLICA = "replica"
ROLE_WEIGHTS = "weights"
ROLE_PLACEHOLDER = "placeholder"
#: Pod labels: which replica of its model a pod is, and its share group (selectable, unlike annotations).
LABEL_REPLICA = f"{GROUP}/replica"
LABEL_SHARE_GROUP = f"{GROUP}/share-group"
#: Weight-holder label: which weights it holds (a hash of vnpu.sharing.weights_id). One explicit share
#: group may hold several weights; a model's warm Service selects only the holders of its own.
LABEL_WEIGHTS = f"{GROUP}/weights"
#: Weight-holder label: its own pod name, so that its PodDisruptionBudget selects that pod alone (no
#: other label tells two holders of one group and weights on two devices apart).
LABEL_HOLDER = f"{GROUP}/holder"
#: Pod label: the hash of the model's pod template (and key generation) a replica was created from;
#: replicas of an older template are rolled out (like a Deployment's pod-template-hash).
LABEL_TEMPLATE_HASH = f"{GROUP}/template-hash"

#: A model's Services (the operator writes them, the gateway trusts only their EndpointSlices).
SERVICE_PREFIX = "vnpu-"
#: A Service name must be an RFC 1035 label: lower-case alphanumerics and '-', starting with a letter.
MAX_SERVICE_NAME = 63
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
#: The labels the EndpointSlice controller puts on the slices of a Service it serves (a slice anyone
#: else writes may point anywhere).
LABEL_SLICE_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
SLICE_CONTROLLER = "endpointslice-controller.k8s.io"
LABEL_SLICE_SERVICE = "kubernetes.io/service-name"


def service_name(model: str) -> str:
    """``vnpu-<model>``: the prefix keeps it off the names users give their own Services, and makes a
    model named ``7b`` a valid label. A model name that still is not one (dots, or longer than 58
    characters) is cut and made unique by a hash of the whole name: ``vnpu-<cut name>-<hash>``."""
    name = f"{SERVICE_PREFIX}{model}"
    if len(name) <= MAX_SERVICE_NAME and _DNS1035.match(name):
        return name
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    room = MAX_SERVICE_NAME - len(SERVICE_PREFIX) - len(digest) - 1
    cut = re.sub(r"[^a-z0-9-]+", "-", model.lower())[:room].strip("-")
    return f"{SERVICE_PREFIX}{cut}-{digest}" if cut else f"{SERVICE_PREFIX}{digest}"


def warm_service_name(model: str) -> str:
    """The warm Service's name: :func:`service_name` of ``<model>/warm``, a name no model can have (a
    model's name has no '/'), so it is cut and hashed: ``vnpu-<model>-warm-<hash>``."""
    return service_name(f"{model}/warm")


#: Device IDs advertised to the kubelet are ``<device-id>-s<index>`` and at most this long.
MAX_DEVICE_ID_LEN = 63
_SLICE_ID = re.compile(r"^(?P<device>.+)-s(?P<index>\d+)$")


def slice_id(device_id: str, index: int) -> str:
    """The kubelet-visible ID of slice ``index`` of physical device ``device_id``."""
    sid = f"{device_id}-s{index}"
    if len(sid) > MAX_DEVICE_ID_LEN:
        raise ValueError(f"slice id {sid!r} is longer than {MAX_DEVICE_ID_LEN} characters")
    return sid


def parse_slice_id(sid: str) -> tuple[str, int]:
    """Split a slice ID back into (physical device ID, slice index)."""
    m = _SLICE_ID.match(sid)
    if not m:
        raise ValueError(f"{sid!r} is not a vnpu slice id (<device>-s<index>)")
    return m.group("device"), int(m.group("index"))


def device_resource(index: int) -> str:
    """The extended resource of the device with ``index`` on its node: ``vnpu.io/memory-<index>``."""
    if not 0 <= index <= MAX_DEVICE_INDEX:
        raise ValueError(f"device index must be in [0, {MAX_DEVICE_INDEX}], got {index}")
    return f"{RESOURCE_PREFIX}{index}"


def device_resource_index(name: str) -> int | None:
    """The device index of a per-device resource name, or None when ``name`` is not one."""
    m = _DEVICE_RESOURCE.match(name)
    return int(m.group("index")) if m else None


def is_vnpu_resource(name: str) -> bool:
    """Any extended resource of vnpu's API group (per-device or the pre-0.2 aggregate)."""
    return name.startswith(f"{GROUP}/")


def slices_for_mib(mib: int, slice_mib: int = DEFAULT_SLICE_MIB) -> int:
    """How many whole slices cover ``mib`` MiB (at least one for any positive demand)."""
    if mib < 0 or slice_mib <= 0:
        raise ValueError(f"need mib >= 0 and slice_mib > 0, got {mib=} {slice_mib=}")
    return -(-mib // slice_mib)


#: Timestamps in annotations and status (``vnpu.io/last-request``, ``status.scaling.activeSince``) are
#: RFC 3339 in UTC to the second, as the API server writes its own.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_time(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime(TIME_FORMAT)


def parse_count(value: Any) -> int | None:
    """A non-negative counter from an annotation; None when absent or anything else (a sign, spaces,
    non-ASCII digits such as ``²``, more than :data:`MAX_COUNT_DIGITS` digits). Anyone who may edit a
    model may write its annotations: ``int()`` raises on ``²`` and on 4,301 digits, and a 400-digit
    count overflows a float rate, and neither may stop a reconcile or a flush."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_COUNT_DIGITS:
        return None
    return int(value) if value.isascii() and value.isdigit() else None


def parse_time(value: Any) -> dt.datetime | None:
    """An RFC 3339 timestamp (``2026-01-02T03:04:05Z``) as a UTC datetime (no zone: UTC); None when
    absent or unparsable: anyone may write an annotation, and a bad one must never stop a reconcile or a
    flush. A time that is only valid in its own zone (``9999-12-31T23:59:59-23:59`` is in the year 10000
    in UTC) is None too: it could be compared but never formatted again."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed.astimezone(dt.UTC) if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        return None


def credible_last_request(t: dt.datetime | None, now: dt.datetime) -> dt.datetime | None:
    """``t``, a parsed ``vnpu.io/last-request``, unless it is more than
    :data:`LAST_REQUEST_MAX_AHEAD_S` ahead of ``now`` (None then, as when absent)."""
    if t is None or (t - now).total_seconds() > LAST_REQUEST_MAX_AHEAD_S:
        return None
    return t
