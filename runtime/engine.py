"""A serving process's model: weights (own or attached), KV cache, tokenizer, one request at a time.

:class:`ModelRuntime` is what the HTTP server talks to. Weights are *installed* into it — from a
local load or from a weights-holder lease — and can be *uninstalled* when the holder goes away; the
KV cache belongs to the process and survives a re-attach (:mod:`vnpu.runtime.supervisor` keeps the
lease).

Memory contract (``VNPU_MEMORY_LIMIT_MIB``): on CUDA/NPU the limit becomes torch's per-process memory
fraction; on CPU it is a checked budget — KV cache + activation estimate + offload ring + the weights
this process owns (none when attached: the holder's slices pay for them) must fit, or the process
refuses to start with the numbers in the message.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vnpu import memory
from vnpu.runtime.arena import Arena
from vnpu.runtime.errors import InvalidRequestError, MemoryBudgetError, RuntimeUnavailableError
from vnpu.runtime.generate import GenerationResult, check_context, generate
from vnpu.runtime.manifest import DTYPE_BYTES, WeightManifest
from vnpu.runtime.metrics import RuntimeMetrics
from vnpu.runtime.model import KVCache, LlamaModel, ResidentWeights, WeightProvider
from vnpu.runtime.offload import OffloadedWeights, OffloadPlan, ThrottledLink, plan_offload, unit_sizes
from vnpu.runtime.tokenizer import StreamDecoder, Tokenizer
from vnpu.runtime.units import model_units

log = logging.getLogger("vnpu.runtime.engine")
MIB = 1024 * 1024


@dataclass
class ServeOptions:
    device: str = "cpu"
    max_context: int = 2048
    prefill_chunk: int = 256
    memory_limit_mib: int | None = None
    offload_budget_mib: float | None = None  #: None: everything resident
    prefetch_depth: int = 2
    link_bytes_per_s: float | None = None  #: CPU only: emulate a host-to-device link of this bandwidth
    model_name: str = ""


@dataclass
class Completion:
    text: str
    result: GenerationResult
    finish_reason: str
    prompt_tokens: int


@dataclass
class _Installed:
    manifest: WeightManifest
    model: LlamaModel
    tokenizer: Tokenizer
    provider: WeightProvider
    shared: bool
    keep: list[Any] = field(default_factory=list)  # objects whose lifetime the views depend on


def apply_device_memory_limit(device: str, limit_mib: int | None) -> float | None:
    """On CUDA/NPU, cap torch's allocator at ``limit_mib``; returns the fraction set (None on CPU)."""
    if limit_mib is None or device.startswith("cpu"):
        return None
    if device.startswith("npu"):
        import torch_npu  # noqa: F401  - registers the npu device and torch.npu
    dev = torch.device(device)
    backend = torch.cuda if dev.type == "cuda" else torch.npu  # type: ignore[attr-defined]
    index = dev.index or 0
    total = backend.get_device_properties(index).total_memory
    fraction = min(1.0, limit_mib * MIB / total)
    backend.set_per_process_memory_fraction(fraction, index)
    return fraction


class StopMatcher:
    """Cuts generated text at the first stop string, holding back a tail that might start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        text = self._pending + piece
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)[0]]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return "" if self.stopped else text


class ModelRuntime:
    def __init__(self, options: ServeOptions, metrics: RuntimeMetrics | None = None) -> None:
        self.options = options
        self.metrics = metrics or RuntimeMetrics()
        self._lock = threading.Lock()  # one generation at a time; install/uninstall wait for it
        self._installed: _Installed | None = None
        self._cache: KVCache | None = None
        self._unavailable = "weights are not loaded yet"
        self.plan: OffloadPlan | None = None  #: the offload plan in use, if any

    # --- state ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._unavailable is None

    @property
    def unavailable_reason(self) -> str | None:
        return self._unavailable

    @property
    def model_name(self) -> str:
        installed = self._installed
        return self.options.model_name or (installed.manifest.config.name if installed else "")

    def kv_cache_bytes(self, manifest: WeightManifest) -> int:
        dtype = next(iter(manifest.tensors.values())).dtype
        return manifest.config.kv_bytes_per_token(DTYPE_BYTES[dtype]) * self.options.max_context

    def required_bytes(
        self, manifest: WeightManifest, shared: bool, ring_bytes: int, plan: OffloadPlan | None = None
    ) -> dict[str, int]:
        """What this process needs on its device under its memory limit, term by term.

        Weights: none when attached (the holder's slices pay for them), the resident part under
        offload (the rest stays in host memory), else all of them.
        """
        dtype_bytes = DTYPE_BYTES[next(iter(manifest.tensors.values())).dtype]
        own_weights = 0 if shared else (plan.resident_bytes if plan is not None else manifest.total_bytes)
        activation = memory.default_activation_bytes(manifest.config.to_modelfile_config(), 1, dtype_bytes)
        return {
            "kv_cache": self.kv_cache_bytes(manifest),
            "activation": activation,
            "weights": own_weights,
            "offload_ring": ring_bytes,
        }

    def check_budget(
        self, manifest: WeightManifest, shared: bool, ring_bytes: int, plan: OffloadPlan | None = None
    ) -> None:
        limit = self.options.memory_limit_mib
        if limit is None:
            return
        parts = self.required_bytes(manifest, shared, ring_bytes, plan)
        total = sum(parts.values())
        if total > limit * MIB:
            detail = ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in parts.items() if v)
            raise MemoryBudgetError(
                f"VNPU_MEMORY_LIMIT_MIB={limit} is too small: this process needs {total / MIB:.1f} MiB "
                f"({detail}); lower --max-context, enable offload, or raise the limit"
            )

    # --- install / uninstall --------------------------------------------------------------------

    def install(
        self, manifest: WeightManifest, arena: Arena, *, shared: bool, seconds: float, keep: Any = None
    ) -> None:
        """Build the model over ``arena`` (views, no copy) and become ready."""
        opts = self.options
        config = manifest.config
        units = model_units(config)
        dtype = getattr(torch, next(iter(manifest.tensors.values())).dtype)
        provider: WeightProvider
        ring = 0
        offload = opts.offload_budget_mib is not None
        if offload and arena.backend != "cpu":
            # Attached to a device arena: every weight is already resident on the device.
            log.warning("offload budget ignored: the weights-holder's arena is on the device already")
            offload = False
        if offload:
            plan = plan_offload(
                unit_sizes(units, manifest), int((opts.offload_budget_mib or 0) * MIB), opts.prefetch_depth
            )
            ring = plan.ring_bytes
            self.check_budget(manifest, shared, ring, plan)
            link = ThrottledLink(opts.link_bytes_per_s) if opts.device.startswith("cpu") else None
            provider = OffloadedWeights(units, manifest, arena.byte_tensor(), plan, opts.device, link)
            self.plan = plan
            log.info(
                "offload plan",
                extra={k: v for k, v in plan.to_dict().items() if k not in ("resident", "streamed")},
            )
        else:
            self.check_budget(manifest, shared, 0)
            tensors = {name: arena.view(entry) for name, entry in manifest.tensors.items()}
            if arena.backend == "cpu" and not opts.device.startswith("cpu"):
                tensors = {name: t.to(opts.device) for name, t in tensors.items()}
            provider = ResidentWeights(tensors)
        with self._lock:
            previous = self._installed
            if previous is not None and isinstance(previous.provider, OffloadedWeights):
                previous.provider.close()
            if (
                self._cache is None
                or self._cache.storage.dtype != dtype
                or self._cache.keys[0].shape[1:]
                != (config.num_key_value_heads, opts.max_context, config.head_dim)
                or len(self._cache.keys) != config.num_hidden_layers
            ):
                if self._cache is not None:
                    self._cache = None
                    gc.collect()  # free the old cache before allocating the new one
                self._cache = KVCache(config, opts.max_context, 1, dtype, opts.device)
            model = LlamaModel(config, provider, opts.device, dtype, max_positions=opts.max_context)
            self._installed = _Installed(
                manifest, model, Tokenizer(manifest.tokenizer), provider, shared, [arena, keep]
            )
            self._unavailable = None
        m = self.metrics
        m.kv_cache_bytes.set(self._cache.nbytes)
        m.weights_bytes.labels("shared" if shared else "own").set(manifest.total_bytes)
        m.weights_bytes.labels("own" if shared else "shared").set(0)
        m.attach_seconds.labels("attach" if shared else "load").set(seconds)
        m.ready.set(1)
        log.info(
            "model ready",
            extra={
                "model": self.model_name,
                "shared": shared,
                "seconds": round(seconds, 4),
                "kv_cache_bytes": self._cache.nbytes,
                "weights_bytes": manifest.total_bytes,
            },
        )

    def set_unavailable(self, reason: str) -> None:
        """Record why the model cannot serve (only while nothing is installed)."""
        if self._installed is None:
            self._unavailable = reason
            self.metrics.ready.set(0)

    def uninstall(self, reason: str) -> None:
        """Stop serving (new requests fail with ``reason`` at once), then drop the weight views."""
        self._unavailable = reason
        self.metrics.ready.set(0)
        with self._lock:
            installed, self._installed = self._installed, None
        if installed is not None and isinstance(installed.provider, OffloadedWeights):
            installed.provider.close()
        del installed
        gc.collect()
        log.warning("model unavailable", extra={"reason": reason})

    # --- requests -----------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        installed = self._installed
        if installed is None:
            raise RuntimeUnavailableError(self._unavailable or "not ready")
        return installed.tokenizer.encode(text)

    def complete(
        self,
        prompt: str | Sequence[int],
        max_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Completion:
        """Run one completion; raises RuntimeUnavailableError or ContextLengthError (never crashes)."""
        with self._lock:
            installed = self._installed
            if installed is None or self._cache is None:
                raise RuntimeUnavailableError(self._unavailable or "not ready")
            tok = installed.tokenizer
            ids = tok.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
            if any(i < 0 or i >= installed.manifest.config.vocab_size for i in ids):
                raise InvalidRequestError("prompt token ids out of the vocabulary range")
            check_context(len(ids), max_tokens, self.options.max_context)
            decoder = StreamDecoder(tok)
            matcher = StopMatcher(stop)
            pieces: list[str] = []
            capacity = self.options.max_context

            def emit(text: str) -> None:
                if text:
                    pieces.append(text)
                    if on_text is not None:
                        on_text(text)

            generated = 0

            def on_token(token: int) -> bool:
                nonlocal generated
                generated += 1
                self.metrics.kv_cache_usage.set((len(ids) + generated) / capacity)
                emit(matcher.feed(decoder.push(token)))
                return not matcher.stopped and not (cancelled is not None and cancelled())

            stats = getattr(installed.provider, "stats", None)
            before = (stats.bytes_copied, stats.stall_seconds) if stats else (0, 0.0)
            eos = (
                [installed.manifest.config.eos_token_id]
                if installed.manifest.config.eos_token_id is not None
                else []
            )
            result = generate(
                installed.model,
                self._cache,
                ids,
                max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop_ids=eos,
                prefill_chunk=self.options.prefill_chunk,
                on_token=on_token,
            )
            if not matcher.stopped:
                emit(matcher.feed(decoder.flush()) + matcher.flush())
            if stats:
                self.metrics.offload_bytes.inc(stats.bytes_copied - before[0])
                self.metrics.offload_stall_seconds.inc(stats.stall_seconds - before[1])
        m = self.metrics
        m.kv_cache_usage.set(0)
        m.prompt_tokens.inc(len(ids))
        m.generated_tokens.inc(len(result.token_ids))
        m.time_to_first_token.observe(result.time_to_first_token_s)
        if result.decode_tokens_per_s:
            m.tokens_per_second.set(result.decode_tokens_per_s)
        return Completion("".join(pieces), result, result.finish_reason, len(ids))
