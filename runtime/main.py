"""``vnpu runtime``: the model runtime inside vnpu's pods.

Subcommands:

* ``weights-holder`` — load a model once into one arena on this device and serve it to the replicas of
  its share group over a unix socket (zero-copy import: memfd over SCM_RIGHTS on CPU, IPC handles on
  CUDA/Ascend). With ``--serve`` it also answers completions itself, one sequence at a time (a model
  at zero replicas whose holder is kept warm).
* ``serve`` — the OpenAI-style HTTP server (chat and text completions, continuous batching).
  Attaches to the share group's weights-holder when a socket directory is configured, otherwise
  loads the model itself. Allocates its own KV cache (a block pool).
* ``generate`` — one completion on the command line (same loading/attaching rules as ``serve``).
* ``probe`` — ask a weights-holder for its status (exit 0 when it answers; for readiness probes).

Every option has an environment default, which is how the operator and the device plugin configure
the pods (see runtime/README.md): ``VNPU_MODEL_URI``, ``VNPU_MODEL_FORMAT``, ``VNPU_MODEL_DTYPE``,
``VNPU_MODEL_NAME``, ``VNPU_SHARE_NAMESPACE``, ``VNPU_SHARE_GROUP``, ``VNPU_WEIGHTS_ID``,
``VNPU_SHARE_KEY_FILE``, ``VNPU_SOCKET_DIR``, ``VNPU_DEVICE``, ``VNPU_MEMORY_LIMIT_MIB``,
``VNPU_OFFLOAD_BUDGET_MIB``, ``VNPU_PREFETCH_DEPTH``, ``VNPU_PORT``, ``VNPU_PVC_ROOT``, ``VNPU_HF_CACHE``,
``VNPU_TORCH_DEVICE``, ``VNPU_MAX_CONTEXT``, ``VNPU_MAX_BATCH``, ``VNPU_DEFAULT_PRIORITY``,
``VNPU_HOLDER_SERVE``.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vnpu import api, sharing
from vnpu.argtypes import seconds
from vnpu.logs import setup_logging
from vnpu.signals import wait_until_set

if TYPE_CHECKING:  # torch-free at import: the CLI's --help must not load the runtime
    from vnpu.runtime.sources import ResolvedSource

log = logging.getLogger("vnpu.runtime")

DEFAULT_PORT = 8000


def _env(*names: str, default: str | None = None) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return default


def _whole(
    env: str | None = None, minimum: int | None = None, maximum: int | None = None
) -> Callable[[str], int]:
    """An argparse ``type`` for a whole number in [minimum, maximum]. Give the option's default as the
    environment's string (argparse converts a string default with ``type``), so a malformed ``$env``
    is the same clear usage error as a malformed flag, naming both, never a traceback."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if (
            value is None
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
        ):
            bounds = " and ".join(
                b
                for b in (
                    f">= {minimum}" if minimum is not None else "",
                    f"<= {maximum}" if maximum is not None else "",
                )
                if b
            )
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number{' ' + bounds if bounds else ''}"
                + (f" (also read from ${env})" if env else "")
            )
        return value

    return parse


def _finite_mib(env: str | None = None) -> Callable[[str], float]:
    """An argparse ``type`` for a finite, non-negative number of MiB (nan and inf are refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a finite number of MiB >= 0" + (f" (also read from ${env})" if env else "")
            )
        return value

    return parse


class SharingConfigError(ValueError):
    """The sharing options do not describe a share identity this process can use."""


def share_identity(args: argparse.Namespace) -> sharing.ShareIdentity | None:
    """The share identity the options name, None when none of its parts is set."""
    parts = {"--share-namespace": args.share_namespace, "--share-group": args.share_group,
             "--weights-id": args.weights_id}  # fmt: skip
    if not any(parts.values()):
        return None
    missing = [flag for flag, value in parts.items() if not value]
    if missing:
        raise SharingConfigError(
            f"a share identity needs {', '.join(parts)}; missing {', '.join(missing)} (the operator sets "
            f"${sharing.ENV_SHARE_NAMESPACE}, ${sharing.ENV_SHARE_GROUP} and ${sharing.ENV_WEIGHTS_ID})"
        )
    try:
        return sharing.ShareIdentity(args.share_namespace, args.share_group, args.weights_id)
    except ValueError as e:
        raise SharingConfigError(str(e)) from e


def holder_socket_path(args: argparse.Namespace, identity: sharing.ShareIdentity, key: bytes) -> Path:
    """``--socket``, else ``<socket dir>/<HMAC(key, identity, device)>``: one holder per (device, share
    identity), under a name only the group can compute."""
    if args.socket:
        return Path(args.socket)
    if not args.socket_dir or not args.device_id:
        raise SharingConfigError(
            "sharing weights needs the device's socket directory and device id (--socket-dir/--device-id, "
            "set by the device plugin as $VNPU_SOCKET_DIR and $VNPU_DEVICE: does the pod request a "
            "vnpu.io/memory-<index> resource?), or --socket"
        )
    return Path(args.socket_dir) / sharing.socket_name(key, identity, args.device_id)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model source")
    g.add_argument(
        "--model",
        default=_env("VNPU_MODEL_URI"),
        help="model URI: a path, file:///path, pvc://claim/path or hf://org/name@rev [$VNPU_MODEL_URI]",
    )
    g.add_argument(
        "--format",
        choices=("gguf", "safetensors"),
        default=_env("VNPU_MODEL_FORMAT"),
        help="file format when the source directory is ambiguous [$VNPU_MODEL_FORMAT]",
    )
    g.add_argument(
        "--dtype",
        default=_env("VNPU_MODEL_DTYPE"),
        help="dtype of the weights in memory: float32 | float16 | bfloat16 (quantised weights are "
        f"dequantised) | {api.DTYPE_FROM_FILE} (the file's own float dtype, bfloat16 for a quantised file: "
        "what the operator sizes them at); default float32 on CPU, bfloat16 on accelerators "
        "[$VNPU_MODEL_DTYPE]",
    )
    g.add_argument(
        "--pvc-root",
        default=_env("VNPU_PVC_ROOT"),
        help="where pvc://<claim> volumes are mounted (default /mnt/pvc) [$VNPU_PVC_ROOT]",
    )
    g.add_argument(
        "--hf-cache",
        default=_env("VNPU_HF_CACHE"),
        help="local Hugging Face hub cache or mirror for hf:// sources (never fetched) [$VNPU_HF_CACHE]",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar while loading weights")


def _add_sharing_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "weight sharing",
        "A share identity is (namespace, group, weights id); holder and replicas prove to each other "
        "that they hold the group's key (the operator mounts it from a Secret of the namespace).",
    )
    g.add_argument(
        "--share-namespace",
        default=_env(sharing.ENV_SHARE_NAMESPACE),
        help=f"namespace of the share group [${sharing.ENV_SHARE_NAMESPACE}]",
    )
    g.add_argument(
        "--share-group",
        default=_env(sharing.ENV_SHARE_GROUP),
        help=f"share group of this pod [${sharing.ENV_SHARE_GROUP}]",
    )
    g.add_argument(
        "--weights-id",
        default=_env(sharing.ENV_WEIGHTS_ID),
        help="which weights the group's holder holds (a hash of source, dtype and image) "
        f"[${sharing.ENV_WEIGHTS_ID}]",
    )
    g.add_argument(
        "--share-key-file",
        default=_env(sharing.ENV_SHARE_KEY_FILE, default=sharing.KEY_FILE),
        help=f"the share group's key [${sharing.ENV_SHARE_KEY_FILE}, default {sharing.KEY_FILE}]",
    )
    g.add_argument(
        "--socket-dir",
        default=_env("VNPU_SOCKET_DIR"),
        help="the device's socket directory (mounted by the device plugin) [$VNPU_SOCKET_DIR]",
    )
    g.add_argument("--socket", help="socket path (default: <socket-dir>/<name derived from the key>)")
    g.add_argument(
        "--device-id",
        default=_env("VNPU_DEVICE"),
        help="physical device id from the device plugin; part of the socket's name [$VNPU_DEVICE]",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default=_env("VNPU_TORCH_DEVICE", default="cpu"),
        help="torch device: cpu, cuda[:N] or npu[:N] [$VNPU_TORCH_DEVICE, default cpu]",
    )
    p.add_argument(
        "--memory-limit-mib",
        type=_whole("VNPU_MEMORY_LIMIT_MIB", minimum=1),
        default=_env("VNPU_MEMORY_LIMIT_MIB"),
        help="device memory this container may use (set by the device plugin) [$VNPU_MEMORY_LIMIT_MIB]",
    )
    p.add_argument("--threads", type=_whole(minimum=1), help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--log-format", choices=("json", "text"), default="json", help="log line format (default json)"
    )
    p.add_argument("--log-level", default="INFO", help="log level (default INFO)")


def _add_serving_args(p: argparse.ArgumentParser, http: bool, holder: bool = False) -> None:
    """Serving options; a weights-holder's (``holder``) leave out attaching and offload: it serves the
    weights it holds, all resident (its offload options are its replicas', see :func:`_holder_needs`)."""
    g = p.add_argument_group("serving (with --serve)" if holder else "serving")
    if not holder:
        _add_mode_args(g)
        _add_offload_args(g)
    _add_model_serving_args(g)
    if http:
        _add_http_args(g)


def _add_mode_args(g: argparse._ArgumentGroup) -> None:
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--attach",
        dest="attach",
        action="store_true",
        default=None,
        help="attach to the share group's weights-holder (the default with a share identity: such a "
        "replica never loads weights itself)",
    )
    mode.add_argument(
        "--standalone",
        dest="attach",
        action="store_false",
        help="load the weights in this process (no share identity)",
    )


def _add_offload_args(g: argparse._ArgumentGroup, holder: bool = False) -> None:
    budget_help = (
        "the group's replicas' device budget for weights: the holder keeps the weights in host memory "
        "for them to stream from, and only what they keep resident counts against its limit"
        if holder
        else "device budget for weights: keep what fits resident, stream the rest"
    )
    g.add_argument(
        "--offload-budget-mib",
        type=_finite_mib("VNPU_OFFLOAD_BUDGET_MIB"),
        default=_env("VNPU_OFFLOAD_BUDGET_MIB"),
        help=f"{budget_help} [$VNPU_OFFLOAD_BUDGET_MIB]",
    )
    g.add_argument(
        "--prefetch-depth",
        type=_whole("VNPU_PREFETCH_DEPTH", minimum=1),
        default=_env("VNPU_PREFETCH_DEPTH", default="2"),
        help="ring buffers for streamed layers [$VNPU_PREFETCH_DEPTH, default 2]",
    )
    g.add_argument(
        "--offload-resident-mib",
        type=_finite_mib("VNPU_OFFLOAD_RESIDENT_MIB"),
        default=_env("VNPU_OFFLOAD_RESIDENT_MIB"),
        help="at most this much of the weights resident (set by the operator: what the group's "
        "weight-holder's slices pay for, so the holder and its replicas plan alike) "
        "[$VNPU_OFFLOAD_RESIDENT_MIB]",
    )
    if holder:
        return
    g.add_argument(
        "--link-gbps",
        type=float,
        help="CPU only: emulate a host-to-device link of this many GB/s for streamed layers",
    )


def _add_model_serving_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--max-context",
        type=_whole("VNPU_MAX_CONTEXT", minimum=1),
        default=_env("VNPU_MAX_CONTEXT", default=str(api.DEFAULT_MAX_CONTEXT)),
        help="tokens of KV cache (prompt + completion limit) "
        f"[$VNPU_MAX_CONTEXT, default {api.DEFAULT_MAX_CONTEXT}]",
    )
    g.add_argument(
        "--max-batch",
        type=_whole("VNPU_MAX_BATCH", minimum=1),
        default=_env("VNPU_MAX_BATCH", default=str(api.DEFAULT_MAX_BATCH)),
        help="sequences decoded together by continuous batching (spec.memory.maxBatch) "
        f"[$VNPU_MAX_BATCH, default {api.DEFAULT_MAX_BATCH}]",
    )
    g.add_argument(
        "--default-priority",
        type=_whole("VNPU_DEFAULT_PRIORITY", minimum=api.INT32_MIN, maximum=api.INT32_MAX),
        default=_env("VNPU_DEFAULT_PRIORITY", default=str(api.DEFAULT_PRIORITY)),
        help="priority of requests that give none; higher is served first and preempted last "
        f"(spec.priority) [$VNPU_DEFAULT_PRIORITY, default {api.DEFAULT_PRIORITY}]",
    )
    g.add_argument(
        "--prefill-chunk",
        type=_whole(minimum=1),
        default=256,
        help="tokens per forward step, decode tokens included: longer prompts are prefilled in chunks "
        "interleaved with decoding (default 256)",
    )
    g.add_argument(
        "--kv-blocks",
        type=_whole(minimum=1),
        help="usable KV blocks of 16 tokens, overriding what the memory budget gives (experiments, "
        "as vLLM's --num-gpu-blocks-override)",
    )
    g.add_argument(
        "--model-name",
        default=_env("VNPU_MODEL_NAME"),
        help="model name clients ask for (default: from the model file) [$VNPU_MODEL_NAME]",
    )


def _add_http_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--host", default="127.0.0.1", help="listen address (default 127.0.0.1; use 0.0.0.0 in a pod)"
    )
    g.add_argument(
        "--port",
        type=_whole("VNPU_PORT", minimum=0, maximum=65535),
        default=_env("VNPU_PORT", default=str(DEFAULT_PORT)),
        help=f"listen port [$VNPU_PORT, default {DEFAULT_PORT}]",
    )
    g.add_argument(
        "--max-queue",
        type=_whole(minimum=0),
        default=64,
        help="requests waiting for a batch slot before new ones get 429 (default 64); a newcomer of a "
        "higher priority takes the place of the lowest waiting request with no output yet, which gets "
        "the 429 instead",
    )
    g.add_argument(
        "--request-drain-seconds",
        type=_whole("VNPU_REQUEST_DRAIN_SECONDS", minimum=0, maximum=api.MAX_DRAIN_S),
        default=_env("VNPU_REQUEST_DRAIN_SECONDS", default=str(api.REPLICA_DRAIN_S)),
        help="at SIGTERM, take no new request and give those in flight up to this long to finish "
        "(the model's runtime.drainSeconds; an attached replica tells its weights-holder, which keeps "
        f"the weights that long) [$VNPU_REQUEST_DRAIN_SECONDS, default {api.REPLICA_DRAIN_S}]",
    )
    g.add_argument(
        "--shutdown-delay-seconds",
        type=seconds(zero_ok=True, maximum=api.MAX_DRAIN_S),
        default=float(api.SHUTDOWN_DELAY_S),
        metavar="SECONDS",
        help="at SIGTERM, /readyz turns 503 at once but new connections are still taken this long, "
        "the first part of the request drain, while Kubernetes takes the pod out of its Services (a "
        "connection to a closed listener is refused) (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vnpu runtime",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    holder = sub.add_parser(
        "weights-holder",
        help="load a model once and share it with this group's replicas",
        description="Load the model into one arena on the device and serve it over a unix socket.",
    )
    _add_model_args(holder)
    _add_sharing_args(holder)
    _add_common(holder)
    holder.add_argument(
        "--socket-mode", default="0600", help="socket permissions, octal (0600, or 0660 with --socket-group)"
    )
    holder.add_argument("--socket-group", help="group (name or gid) allowed to attach besides our own uid")
    holder.add_argument(
        "--drain-seconds",
        type=float,
        default=_env("VNPU_HOLDER_DRAIN_SECONDS", default=str(api.HOLDER_DRAIN_S)),
        help="at SIGTERM, stop granting attaches and wait for the replicas attached to detach (they finish "
        "their requests in flight first) before their weights go: as long as the longest request drain "
        f"they announced plus {api.HOLDER_WAIT_MARGIN_S} s ({api.REPLICA_DRAIN_S} for one that announced "
        "none), at most this long; default %(default)s, inside the holder pod's grace period "
        "[$VNPU_HOLDER_DRAIN_SECONDS]",
    )
    holder.add_argument(
        "--serve",
        action="store_true",
        default=_env("VNPU_HOLDER_SERVE") == "1",
        help="also answer completions over HTTP from the held weights, with KV memory of its own, for any "
        "model of the share group: the operator sets it for models that may scale to zero and keep their "
        "holders, so a request at zero replicas is answered at once [$VNPU_HOLDER_SERVE=1]",
    )
    _add_serving_args(holder, http=True, holder=True)
    _add_offload_args(holder.add_argument_group("async offload (the group's replicas')"), holder=True)

    serve = sub.add_parser(
        "serve",
        help="serve completions over HTTP",
        description="OpenAI-style completions, /healthz, /readyz and /metrics over HTTP.",
    )
    _add_model_args(serve)
    _add_sharing_args(serve)
    _add_common(serve)
    _add_serving_args(serve, http=True)

    gen = sub.add_parser("generate", help="one completion on the command line")
    _add_model_args(gen)
    _add_sharing_args(gen)
    _add_common(gen)
    _add_serving_args(gen, http=False)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--json", action="store_true", help="print a JSON object with token ids and timings")

    probe = sub.add_parser("probe", help="ask a weights-holder for its status (exit 0 when it answers)")
    _add_sharing_args(probe)
    return parser


def _sharing(args: argparse.Namespace) -> tuple[sharing.ShareIdentity, bytes, Path]:
    """Identity, key and socket path for a holder, an attaching replica or a probe."""
    identity = share_identity(args)
    if identity is None:
        raise SharingConfigError(
            "no share identity: set --share-namespace, --share-group and --weights-id (the operator sets "
            f"${sharing.ENV_SHARE_NAMESPACE}, ${sharing.ENV_SHARE_GROUP}, ${sharing.ENV_WEIGHTS_ID})"
        )
    key = sharing.load_key(args.share_key_file)
    return identity, key, holder_socket_path(args, identity, key)


def _weights_dtype(args: argparse.Namespace, source: ResolvedSource) -> str:
    """The dtype to hold ``source``'s weights at: --dtype, the file's (see :data:`api.DTYPE_FROM_FILE`),
    or the device's default."""
    if args.dtype == api.DTYPE_FROM_FILE:
        from vnpu.memory import load_dtype

        return load_dtype(source.info)
    if args.dtype in (None, "", "auto"):
        return _default_dtype(args.device)
    if args.dtype not in api.RUNTIME_DTYPES:
        log.warning("weights are dequantised to a float dtype", extra={"requested_dtype": args.dtype})
        return _default_dtype(args.device)
    return str(args.dtype)


def _load_local(args: argparse.Namespace) -> object:
    from vnpu.runtime.loader import load_weights
    from vnpu.runtime.sources import resolve

    if not args.model:
        raise SystemExit("vnpu runtime: --model (or $VNPU_MODEL_URI) is required")
    source = resolve(args.model, args.format, pvc_root=args.pvc_root, hf_cache=args.hf_cache)
    # A replica's own weights are host memory it copies from; so are a holder's under offload, where
    # the replicas keep a part on the device and stream the rest from there.
    holds_on_device = args.command == "weights-holder" and args.offload_budget_mib is None
    arena_device = args.device if holds_on_device else "cpu"
    return load_weights(source, arena_device, _weights_dtype(args, source), progress=not args.no_progress)


def _default_dtype(device: str) -> str:
    from vnpu.runtime.loader import default_dtype

    return default_dtype(device)


def cmd_weights_holder(args: argparse.Namespace) -> int:
    from vnpu.runtime.holder import WeightsHolder
    from vnpu.runtime.loader import release_free_heap

    identity, key, path = _sharing(args)
    weights = _load_local(args)
    limit = args.memory_limit_mib
    needed, what, plan = _holder_needs(args, weights.manifest)  # type: ignore[attr-defined]
    if limit is not None and needed > limit * 1024 * 1024:
        raise SystemExit(
            f"vnpu runtime weights-holder: {what} need {needed / 2**20:.1f} MiB "
            f"but VNPU_MEMORY_LIMIT_MIB={limit}"
        )
    resident = None
    if plan is not None and plan.resident and not args.device.startswith("cpu"):
        # On a device the replicas map the resident units from here rather than each copy them.
        from vnpu.runtime.arena import ArenaError
        from vnpu.runtime.offload_plan import build_resident_part

        try:
            resident = build_resident_part(weights.manifest, weights.arena, plan, args.device)  # type: ignore[attr-defined]
        except ArenaError as exc:  # the device is out of memory, or no such device: say which, no traceback
            raise SystemExit(f"vnpu runtime weights-holder: the resident units under offload: {exc}") from exc
    group = None
    if args.socket_group is not None:
        import grp

        group = (
            int(args.socket_group) if args.socket_group.isdigit() else grp.getgrnam(args.socket_group).gr_gid
        )
    holder = WeightsHolder(weights, identity, key, path, int(args.socket_mode, 8), group, resident)  # type: ignore[arg-type]
    if args.serve:
        from vnpu.runtime.errors import MemoryBudgetError

        try:
            return _hold_and_serve(args, holder, weights)
        except MemoryBudgetError as e:  # still hold: the replicas need the weights more than this
            log.error("the weights-holder cannot serve; holding only", extra={"error": str(e)})
    # The holder keeps the manifest encoded; the tokenizer tables as Python objects are dead weight.
    weights.manifest.tokenizer = {}  # type: ignore[attr-defined]
    release_free_heap()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if holder.start_when_free(stop):  # (the holder this one replaces may still serve the socket)
        print(json.dumps({"event": "ready", "socket": str(path), **holder.info()}), flush=True)
        wait_until_set(stop)  # wakes for a SIGTERM caught by another thread (vnpu.signals)
    holder.stop(drain_s=args.drain_seconds)
    return 0


def _holder_needs(args: argparse.Namespace, manifest: Any) -> tuple[int, str, Any]:
    """Device bytes the holder's slices pay for, what they are, and the offload plan if any: every
    weight, or under async offload the part the replicas keep resident (the same plan they make; the
    operator sized the holder at the budget less the prefetch ring), the rest staying in the holder's
    host memory."""
    if args.offload_budget_mib is None:
        return manifest.total_bytes, "the weights", None
    from vnpu.runtime.errors import OffloadPlanError
    from vnpu.runtime.offload_plan import plan_for

    try:
        plan = plan_for(manifest, args.offload_budget_mib, args.prefetch_depth, args.offload_resident_mib)
    except OffloadPlanError as exc:
        raise SystemExit(f"vnpu runtime weights-holder: {exc}") from exc
    return plan.resident_bytes, "the weights kept resident under offload", plan


def _hold_and_serve(args: argparse.Namespace, holder: Any, weights: Any) -> int:
    """``weights-holder --serve``: the HTTP server over the held weights, its KV cache within the
    holder's memory limit beside the weights. The server is up before the socket is bound: a holder
    that says it is ready also answers HTTP."""
    from vnpu.runtime.engine import ModelRuntime, apply_device_memory_limit

    apply_device_memory_limit(args.device, args.memory_limit_mib)
    runtime = ModelRuntime(_serve_options(args), engine_thread=False)  # type: ignore[arg-type]
    runtime.install(weights.manifest, weights.arena, shared=False, seconds=weights.seconds)

    stopped = threading.Event()

    def bind() -> None:
        # On its own thread: the holder this one replaces may still serve the socket, and meanwhile
        # this one answers HTTP (the warm Service's requests) with the same weights.
        from vnpu.runtime.holder import HolderError

        try:
            bound = holder.start_when_free(stopped)
        except HolderError as e:  # as main() says it, and exits 1 for the kubelet to restart it
            print(f"vnpu runtime weights-holder: {e}", file=sys.stderr, flush=True)
            os._exit(1)
        if bound:
            info = {"event": "ready", "socket": str(holder.socket_path), "port": args.port, **holder.info()}
            print(json.dumps(info), flush=True)

    def listening() -> None:
        threading.Thread(target=bind, name="holder-bind", daemon=True).start()

    def stopping() -> None:
        stopped.set()
        holder.close_listener()

    try:
        return _serve_http(args, runtime, listening, stopping=stopping)
    finally:
        stopped.set()
        holder.stop(drain_s=args.drain_seconds)


def _serve_http(
    args: argparse.Namespace,
    runtime: Any,
    listening: Callable[[], None] = lambda: None,
    stopping: Callable[[], None] = lambda: None,
) -> int:
    """The HTTP server on another thread and the model on this (the initial) one (see
    ModelRuntime.run_engine for why), until SIGTERM or SIGINT; ``listening`` runs once it is up,
    ``stopping`` at the signal, before the server's drain."""
    from vnpu.runtime.server import HttpServerThread, make_app

    drain_s = float(args.request_drain_seconds)
    server = HttpServerThread(
        make_app(runtime), args.host, args.port, drain_s=drain_s, shutdown_delay=args.shutdown_delay_seconds
    )
    try:
        server.start()
        log.info("serving", extra={"host": args.host, "port": args.port})
        listening()

        def stop(signum: int, _frame: object) -> None:
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
            # Not on this thread: a handler runs wherever the main thread was, maybe under a lock.
            threading.Thread(target=stopping, name="stopping", daemon=True).start()
            server.stop_then(runtime.close)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop)
        runtime.run_engine()
    finally:
        server.stop_then(lambda: None)
        server.join(drain_s + api.GRACE_MARGIN_S)
        runtime.close()
    return 0


def _serve_options(args: argparse.Namespace) -> object:
    from vnpu.runtime.engine import ServeOptions

    offload_mib = getattr(args, "offload_budget_mib", None)
    link_gbps = getattr(args, "link_gbps", None)
    return ServeOptions(
        device=args.device,
        max_context=args.max_context,
        prefill_chunk=args.prefill_chunk,
        memory_limit_mib=args.memory_limit_mib,
        offload_budget_mib=float(offload_mib) if offload_mib is not None else None,
        prefetch_depth=getattr(args, "prefetch_depth", 2),
        offload_resident_mib=getattr(args, "offload_resident_mib", None),
        link_bytes_per_s=link_gbps * 1e9 if link_gbps else None,
        model_name=args.model_name or "",
        any_model_name=args.command == "weights-holder",
        max_batch=args.max_batch,
        default_priority=args.default_priority,
        max_queue=getattr(args, "max_queue", 64),
        kv_blocks=args.kv_blocks,
    )


def _runtime(args: argparse.Namespace, engine_thread: bool = True) -> tuple[object, object | None]:
    """A ModelRuntime with weights installed (loaded) or being attached (supervisor started)."""
    from vnpu.runtime.engine import ModelRuntime, apply_device_memory_limit
    from vnpu.runtime.supervisor import SharedWeightsSupervisor

    apply_device_memory_limit(args.device, args.memory_limit_mib)
    runtime = ModelRuntime(_serve_options(args), engine_thread=engine_thread)
    attach = args.attach if args.attach is not None else share_identity(args) is not None
    if attach:
        identity, key, path = _sharing(args)
        supervisor = SharedWeightsSupervisor(
            runtime,
            path,
            identity,
            key,
            args.device,
            _expected(args),
            drain_s=getattr(args, "request_drain_seconds", api.REPLICA_DRAIN_S),
        )
        supervisor.start()
        return runtime, supervisor
    weights = _load_local(args)
    runtime.install(weights.manifest, weights.arena, shared=False, seconds=weights.seconds)  # type: ignore[attr-defined]
    return runtime, None


def _expected(args: argparse.Namespace) -> object:
    """What this replica must find in its holder's manifest: its own source, dtype and header digest
    (read from its own copy of the source's headers: no weight data is read)."""
    from vnpu.runtime.attach import Expected
    from vnpu.runtime.sources import resolve

    if not args.model:
        raise SharingConfigError("--model (or $VNPU_MODEL_URI) is required to check the holder's weights")
    source = resolve(args.model, args.format, pvc_root=args.pvc_root, hf_cache=args.hf_cache)
    return Expected(args.model, _weights_dtype(args, source), source.header_digest)


def cmd_serve(args: argparse.Namespace) -> int:
    runtime, supervisor = _runtime(args, engine_thread=False)
    try:
        return _serve_http(args, runtime)
    finally:
        if supervisor is not None:
            supervisor.stop()  # type: ignore[attr-defined]


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    runtime, supervisor = _runtime(args)
    deadline = time.monotonic() + float(os.environ.get("VNPU_ATTACH_WAIT_S", "60"))
    while not runtime.ready:  # type: ignore[attr-defined]
        fatal = getattr(supervisor, "fatal", None)
        if fatal or getattr(supervisor, "refused", False) or time.monotonic() > deadline:
            print(f"vnpu runtime generate: {fatal or runtime.unavailable_reason}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
        time.sleep(0.05)
    completion = runtime.complete(  # type: ignore[attr-defined]
        args.prompt, args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    if args.json:
        result = completion.result
        print(
            json.dumps(
                {
                    "text": completion.text,
                    "token_ids": result.token_ids,
                    "prompt_tokens": completion.prompt_tokens,
                    "finish_reason": completion.finish_reason,
                    "time_to_first_token_s": result.time_to_first_token_s,
                    "total_s": result.total_s,
                }
            )
        )
    else:
        print(completion.text)
    if supervisor is not None:
        supervisor.stop()  # type: ignore[attr-defined]
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from vnpu.runtime.attach import AttachRefusedError, HolderUnavailableError, holder_status

    try:
        identity, key, path = _sharing(args)
    except (SharingConfigError, sharing.ShareKeyError) as e:
        print(f"vnpu runtime probe: {e}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(holder_status(path, identity, key)))
    except (HolderUnavailableError, AttachRefusedError) as e:
        print(f"vnpu runtime probe: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(
        getattr(args, "log_format", "json"), getattr(logging, str(getattr(args, "log_level", "INFO")).upper())
    )
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    from vnpu.runtime.attach import AttachRefusedError, HolderUnavailableError
    from vnpu.runtime.config import UnsupportedModelError
    from vnpu.runtime.errors import MemoryBudgetError, OffloadPlanError
    from vnpu.runtime.holder import HolderError
    from vnpu.runtime.sources import SourceError

    # A fault in native code (a checkpoint file truncated under its mmap while loading: SIGBUS) leaves
    # the Python stack in the log instead of a silent signal death.
    faulthandler.enable()
    commands = {
        "weights-holder": cmd_weights_holder,
        "serve": cmd_serve,
        "generate": cmd_generate,
        "probe": cmd_probe,
    }
    try:
        return commands[args.command](args)
    except (
        SourceError,
        UnsupportedModelError,
        MemoryBudgetError,
        OffloadPlanError,
        HolderUnavailableError,
        HolderError,
        AttachRefusedError,
        SharingConfigError,
        sharing.ShareKeyError,
    ) as e:
        print(f"vnpu runtime {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
