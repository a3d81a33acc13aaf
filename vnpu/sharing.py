"""Share identity and the weight-holder handshake: who may map a share group's weights.

A share group is always ``(namespace, group)``: groups of different namespaces never meet. What a
group's holder holds is named by a *weights id* (a hash of source, dtype and runtime image), so a
change of any of them is a new holder, never old weights under a new name.

Trust comes from Kubernetes, not from the node. The operator keeps one random key per
``(namespace, group)`` in a Secret of that namespace (only pods of that namespace can mount it) and
mounts it read-only into the group's holders and replicas. With the key:

* **socket names** are ``HMAC(key, identity, device)``: nobody without the key can predict the name a
  holder will bind in the device's shared socket directory, so no other tenant can squat it first;
  and no tenant can list that directory (mode 1733, see ``vnpu.device_plugin.plugin``) to learn the
  name afterwards;
* **mutual authentication**: on connect the replica sends a nonce, the holder answers with its own
  nonce and ``HMAC(key, "holder", identity, both nonces)``; the replica checks it (a squatter fails
  here) and answers ``HMAC(key, "replica", ...)``, which the holder checks (a pod of another namespace
  fails here). Proofs are compared with :func:`hmac.compare_digest`. The identity is inside every MAC,
  so a proof for one group or one weights id is worthless for another.

Defence in depth: each ``(namespace, group)`` also runs under a user id of its own
(:func:`share_uid`), so the kernel keeps other groups from connecting to (socket mode 0600) or
unlinking (sticky directory) its socket even before the handshake.

Pure and dependency-free: both the operator and the runtime import it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

#: Pod environment the operator sets on weight-holders and replicas (the runtime reads it).
ENV_SHARE_NAMESPACE = "VNPU_SHARE_NAMESPACE"
ENV_SHARE_GROUP = "VNPU_SHARE_GROUP"
ENV_WEIGHTS_ID = "VNPU_WEIGHTS_ID"
ENV_SHARE_KEY_FILE = "VNPU_SHARE_KEY_FILE"

#: The Secret holding a group's key: one per (namespace, group), data key ``key``.
SECRET_KEY_FIELD = "key"
#: Where the Secret is mounted (read-only) in holders and replicas.
KEY_MOUNT_DIR = "/var/run/vnpu/credential"
KEY_FILE = f"{KEY_MOUNT_DIR}/{SECRET_KEY_FIELD}"

#: Random bytes in a new key, and the fewest a runtime accepts.
KEY_BYTES = 32
MIN_KEY_BYTES = 16
#: Hex characters of a nonce (128 bits of randomness).
NONCE_HEX = 32

#: User ids of share groups: [UID_BASE, UID_BASE + UID_RANGE). Far above the ids of host accounts and
#: of the chart's own pods (65532).
UID_BASE = 200_000
UID_RANGE = 800_000


class ShareKeyError(ValueError):
    """The share key cannot be used (missing, unreadable, too short)."""


@dataclass(frozen=True)
class ShareIdentity:
    """Whose weights: a group of one namespace, holding one version of the weights."""

    namespace: str
    group: str
    weights_id: str

    def __post_init__(self) -> None:
        for name in ("namespace", "group", "weights_id"):
            value = getattr(self, name)
            if not value or "\x00" in value or "/" in value:
                raise ValueError(f"share identity {name} must be non-empty without '/' or NUL, got {value!r}")

    def __str__(self) -> str:
        return f"{self.namespace}/{self.group}@{self.weights_id}"

    def _context(self) -> bytes:
        return "\x00".join((self.namespace, self.group, self.weights_id)).encode()


def _digest(*parts: str, length: int) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:length]


def weights_id(uri: str, dtype: str, image: str, held: str = "") -> str:
    """What a holder holds, as 16 hex characters: the source (an hf revision is in its URI), the dtype
    on the device, the runtime image that loads it and, where not all on the device, how it is held
    (``held``, see :func:`offload_holding`); a holder that holds them otherwise is another holder."""
    parts = ("weights", uri, dtype or "", image or "") + ((held,) if held else ())
    return _digest(*parts, length=16)


def offload_holding(device_budget_mib: int, prefetch_depth: int) -> str:
    """``held`` of :func:`weights_id` under async offload: the holder keeps the weights in host memory
    and on the device the part its replicas' plan keeps resident, which the budget and depth decide.
    Replicas of one holder must make the same plan to map that part rather than copy it."""
    return f"offload:{device_budget_mib}/{prefetch_depth}"


def secret_name(group: str) -> str:
    """The Secret of ``group``'s key in its namespace (deterministic: a restarted operator finds it)."""
    return f"vnpu-share-{_digest('secret', group, length=16)}"


def share_uid(namespace: str, group: str) -> int:
    """The user (and group) id the pods of ``(namespace, group)`` run as."""
    return UID_BASE + int(_digest("uid", namespace, group, length=12), 16) % UID_RANGE


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def load_key(path: str | Path) -> bytes:
    """Read a share key (the mounted Secret); raises ShareKeyError saying what is wrong."""
    try:
        key = Path(path).read_bytes()
    except OSError as exc:
        raise ShareKeyError(
            f"cannot read the share key {path}: {exc.strerror or exc} (the operator mounts the group's "
            f"Secret there; is this pod one the operator created?)"
        ) from exc
    # Raw bytes as the Secret holds them: a random key may begin or end with bytes that look like
    # whitespace, and stripping them would give holder and replica different keys than the Secret's.
    if len(key) < MIN_KEY_BYTES:
        raise ShareKeyError(f"the share key {path} has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


def socket_name(key: bytes, identity: ShareIdentity, device_id: str) -> str:
    """The holder's socket file name in the device's socket directory (unguessable without the key)."""
    mac = hmac.new(key, b"socket\x00" + identity._context() + b"\x00" + device_id.encode(), "sha256")
    return f"w-{mac.hexdigest()[:40]}.sock"


def lock_name(key: bytes, socket_file: str) -> str:
    """The file a holder ``flock``s beside its socket while it removes a stale one and binds, or removes
    its own (see ``vnpu.runtime.holder``). Named from the key, not from the socket's name: whoever
    learnt a socket's name (a stale one's owner, say) still cannot pre-create its lock to keep the
    group's holders out."""
    mac = hmac.new(key, b"lock\x00" + socket_file.encode(), "sha256")
    return f"w-{mac.hexdigest()[:40]}.lock"


def new_nonce() -> str:
    return secrets.token_hex(NONCE_HEX // 2)


def valid_nonce(value: object) -> bool:
    return isinstance(value, str) and len(value) == NONCE_HEX and all(c in "0123456789abcdef" for c in value)


def proof(key: bytes, role: str, identity: ShareIdentity, client_nonce: str, server_nonce: str) -> str:
    """``role`` ("holder" or "replica") proves it knows ``key`` for ``identity`` in this exchange; a
    replica's hello ticket (:func:`vnpu.runtime.handshakes.hello_ticket`) is role "ticket", so that
    no ticket is ever a proof."""
    if role not in ("holder", "replica", "ticket"):
        raise ValueError(f"role must be 'holder', 'replica' or 'ticket', got {role!r}")
    message = b"\x00".join(
        (b"vnpu-share-v1", role.encode(), identity._context(), client_nonce.encode(), server_nonce.encode())
    )
    return hmac.new(key, message, "sha256").hexdigest()


def proof_matches(expected: str, received: object) -> bool:
    """Constant-time comparison of a received proof with the expected one. Whatever a peer sent, the
    answer is a bool: a string that cannot be encoded (a lone surrogate) is simply not the proof."""
    return (
        isinstance(received, str)
        and received.isascii()
        and hmac.compare_digest(expected.encode(), received.encode())
    )
