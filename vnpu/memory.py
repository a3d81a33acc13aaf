"""Device-memory estimate of one InferenceModel: shared weights once per device, the rest per replica.

The packer needs two numbers per model: what the weight-holder occupies on a device (the weights, or
under async offload the resident part of them) and what every replica adds (KV cache + activation +
runtime overhead + the offload prefetch ring). Both come from the spec, with the weight size and the
architecture read from the model file's header (:mod:`vnpu.modelfile`) when the spec leaves them out.

KV cache (notes/runtime.md §5): ``Σ_layers 2 · kv_heads · head_dim · dtype_bytes`` per token; multi-head
latent attention caches one ``kv_lora_rank + rope_dim`` latent per layer instead. Paged engines round
each sequence up to whole blocks. Every defaulted term is listed in ``MemoryEstimate.assumptions`` so the
operator can show the user what it guessed.

Pure: no Kubernetes, no numpy; the only I/O is reading a header through :mod:`vnpu.modelfile`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vnpu.api import (
    ARENA_ALIGNMENT,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONTEXT,
    DEFAULT_SLICE_MIB,
    RUNTIME_DTYPES,
    slices_for_mib,
)
from vnpu.modelfile import (
    MIB,
    ModelConfig,
    ModelFileInfo,
    TensorInfo,
    config_from_hf,
    layer_index,
    local_source_path,
    read_model_file,
    resolves_within,
    source_is_local,
)

#: Bytes per weight element for the CRD's ``weights.dtype`` values (ggml block types include scales).
WEIGHT_DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8": 1,
    "int8": 1,
    "int4": 0.5,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
}
#: KV cache element size when the spec says nothing: fp16/bf16, or fp32 for fp32 models.
DEFAULT_KV_DTYPE_BYTES = 2
#: Activation reserve when neither ``memory.activationMiB`` nor a model config is available.
DEFAULT_ACTIVATION_MIB = 256
#: Tokens one forward step processes in the analytic activation estimate (a chunked-prefill step).
PREFILL_CHUNK_TOKENS = 512
DEFAULT_PREFETCH_DEPTH = 2


class EstimateError(ValueError):
    """The spec does not give enough to size the model (the message says which field to set)."""


class FilesNeeded(Exception):
    """``estimate_from_spec(..., read_files=False)``: the estimate needs the source's files, and nothing
    has been opened (the operator reads them away from its reconcile pass)."""


@dataclass(frozen=True)
class EstimatePending:
    """A model whose estimate is being read from its files, or waits its turn to be."""

    reading: bool  #: its files are being read now (else it waits its turn)
    ahead: int = 0  #: models of its namespace whose files are read before its own


def mib_ceil(nbytes: float) -> int:
    """Whole MiB covering ``nbytes``."""
    return math.ceil(nbytes / MIB)


# ---------------------------------------------------------------------------------------------------
# Analytic pieces


def kv_bytes_per_token(config: ModelConfig, kv_dtype_bytes: int = DEFAULT_KV_DTYPE_BYTES) -> int:
    """KV-cache bytes one token costs across all layers.

    Standard attention: ``Σ_layers kv_heads · (head_dim + v_head_dim) · bytes`` (= 2·kv·head_dim·bytes
    when K and V have the same head dim). MLA: ``layers · (kv_lora_rank + qk_rope_head_dim) · bytes``.
    """
    if kv_dtype_bytes <= 0:
        raise EstimateError(f"KV dtype size must be positive, got {kv_dtype_bytes}")
    if config.kv_lora_rank:
        return config.n_layers * (config.kv_lora_rank + (config.qk_rope_head_dim or 0)) * kv_dtype_bytes
    per_head = config.head_dim + (config.value_head_dim or config.head_dim)
    per_layer = config.kv_heads_per_layer or (config.n_kv_heads,) * config.n_layers
    heads = sum(per_layer)
    return heads * per_head * kv_dtype_bytes


def padded_tokens(tokens: int, block_size: int | None) -> int:
    """``tokens`` rounded up to whole blocks of ``block_size`` (unchanged without paging)."""
    return -(-tokens // block_size) * block_size if block_size else tokens


def kv_cache_bytes(
    config: ModelConfig,
    max_context_tokens: int,
    max_batch: int,
    kv_dtype_bytes: int = DEFAULT_KV_DTYPE_BYTES,
    block_size: int | None = None,
) -> int:
    """KV cache for ``max_batch`` sequences of ``max_context_tokens``; with paging, each sequence is
    rounded up to whole blocks of ``block_size`` tokens (vLLM's CUDA default 16, Ascend commonly 128)."""
    if max_context_tokens <= 0 or max_batch <= 0:
        raise EstimateError(
            f"need maxContextTokens > 0 and maxBatch > 0, got {max_context_tokens}, {max_batch}"
        )
    return (
        padded_tokens(max_context_tokens, block_size) * max_batch * kv_bytes_per_token(config, kv_dtype_bytes)
    )


def estimate_param_count(config: ModelConfig) -> int:
    """Parameters of a Llama-style decoder from its config (embeddings, attention, gated FFN, norms).

    Used only when no header can be read; exact for Llama/Qwen2/Mistral up to biases.
    """
    if not config.ffn_size or not config.vocab_size:
        raise EstimateError("sizing weights from a model config needs its FFN size and vocabulary size")
    h, q_width = config.hidden_size, config.n_heads * config.head_dim
    kv_width = config.n_kv_heads * (config.head_dim + (config.value_head_dim or config.head_dim))
    per_layer = h * q_width + h * kv_width + q_width * h + 3 * h * config.ffn_size + 2 * h
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return config.n_layers * per_layer + embeddings + h


def widest_layer_kv_bytes_per_token(config: ModelConfig, kv_dtype_bytes: int = DEFAULT_KV_DTYPE_BYTES) -> int:
    """KV-cache bytes one token costs in the layer that caches the most (``n_kv_heads`` is the largest
    per-layer count; MLA: the latent)."""
    if config.kv_lora_rank:
        return (config.kv_lora_rank + (config.qk_rope_head_dim or 0)) * kv_dtype_bytes
    return config.n_kv_heads * (config.head_dim + (config.value_head_dim or config.head_dim)) * kv_dtype_bytes


def default_activation_bytes(
    config: ModelConfig,
    max_batch: int,
    gather_bytes: int,
    act_bytes: int = 2,
) -> int:
    """A rough upper bound on one forward step's transient memory: a prefill chunk through attention
    and the FFN, the fp32 logits of a decode batch, and the attention's context gather.

    The gather is the largest term at long contexts: paged attention copies every decode sequence's
    keys and values, padded to the longest, out of the block pool into one contiguous tensor per layer
    (and a prefill chunk its own context), so one step holds ``gather_bytes`` at once
    (:func:`context_gather_bytes`: one layer's share of a full batch's KV cache). Measured against the
    runtime's own steps by ``vnpu bench activation``. Calibrate with a profile run and set
    ``memory.activationMiB`` instead."""
    tokens = max(max_batch, PREFILL_CHUNK_TOKENS)
    ffn = config.ffn_size or 4 * config.hidden_size
    step = tokens * (4 * config.hidden_size + 2 * ffn) * act_bytes
    logits = max_batch * (config.vocab_size or 0) * 4
    return step + logits + gather_bytes


def context_gather_bytes(
    config: ModelConfig,
    max_context_tokens: int,
    max_batch: int,
    kv_dtype_bytes: int = DEFAULT_KV_DTYPE_BYTES,
    block_size: int | None = None,
) -> int:
    """Keys and values one layer's attention gathers in a step of ``max_batch`` sequences at
    ``max_context_tokens`` (each padded to whole blocks): the widest layer's share of that KV cache."""
    tokens = padded_tokens(max_context_tokens, block_size)
    return max_batch * tokens * widest_layer_kv_bytes_per_token(config, kv_dtype_bytes)


def gathered_blocks(blocks: int, max_batch: int, blocks_per_sequence: int) -> int:
    """The most blocks one layer's gather copies in a step over a pool of ``blocks``: ``r`` decode rows
    padded to the longest, ``w`` blocks, where the rows hold ``w + r - 1`` blocks at least (``r <=
    max_batch``, ``w <= blocks_per_sequence``). Padding makes it more than the pool: one long sequence
    beside short ones gathers ``r`` times the long one. ``r * w`` peaks at ``r = n - w + 1``, either at
    the longest ``w`` or where ``r`` and ``w`` meet."""
    rows = min(max_batch, blocks)
    if rows < 1:
        return 0
    middle = (blocks + 1) // 2
    candidates = {
        max(1, min(rows, blocks - blocks_per_sequence + 1)),
        max(1, min(rows, middle)),
        max(1, min(rows, middle + 1)),
    }
    return max(r * min(blocks_per_sequence, blocks - r + 1) for r in candidates)


def pool_gather_bytes(
    config: ModelConfig,
    pool_mib: int,
    max_context_tokens: int,
    max_batch: int,
    kv_dtype_bytes: int = DEFAULT_KV_DTYPE_BYTES,
    block_size: int | None = None,
) -> int:
    """Keys and values one layer's attention gathers, at most, in a step over a KV pool of ``pool_mib``
    (its null block included when paged): :func:`gathered_blocks` of the sequences the pool holds."""
    block = block_size or 1
    block_bytes = block * kv_bytes_per_token(config, kv_dtype_bytes)
    blocks = pool_mib * MIB // block_bytes - (1 if block_size else 0)
    per_sequence = -(-max_context_tokens // block)
    widest = block * widest_layer_kv_bytes_per_token(config, kv_dtype_bytes)
    return gathered_blocks(blocks, max_batch, per_sequence) * widest


#: File tensor dtypes (safetensors / ggml names) as the CRD's ``weights.dtype`` values.
_FILE_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8",
    "F8_E5M2": "float8",
    "I8": "int8",
    "Q8_0": "q8_0",
    "Q4_0": "q4_0",
    "Q4_1": "q4_1",
}


def file_dtype(info: ModelFileInfo) -> str | None:
    """The CRD dtype holding most of a model file's bytes (None for types the CRD does not name)."""
    by_dtype = info.bytes_by_dtype
    if not by_dtype:
        return None
    return _FILE_DTYPES.get(max(by_dtype, key=lambda k: (by_dtype[k], k)))


def load_dtype(info: ModelFileInfo, requested: str | None = None) -> str:
    """The dtype vnpu's runtime holds a file's weights at, and the estimate sizes them at: the requested
    one if the runtime holds it, else the file's own float dtype, else bfloat16 (a quantized file is
    dequantised on load). One rule for both sides, so a weight-holder never needs more than its slices
    (the runtime's device default, float32 on CPU, would double a bfloat16 file)."""
    if requested in RUNTIME_DTYPES:
        return str(requested)
    stored = file_dtype(info)
    return stored if stored in RUNTIME_DTYPES else "bfloat16"  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Device memory of one model: ``device_weights_mib`` once per device that runs any of its
    replicas (held by the weight-holder pod), ``per_replica_mib`` for every replica."""

    weights_mib: int  #: all the weights
    device_weights_mib: int  #: the part resident on the device (< weights_mib under async offload)
    kv_cache_mib: int
    activation_mib: int
    overhead_mib: int
    staging_mib: int  #: per-replica prefetch ring for streamed layers (0 without offload)
    slice_mib: int = DEFAULT_SLICE_MIB
    kv_bytes_per_token: int | None = None
    config: ModelConfig | None = None
    assumptions: tuple[str, ...] = ()  #: every term that was defaulted rather than given or read
    #: What a weight-holder that answers requests needs besides the weights (see
    #: :func:`vnpu.api.holder_serves`): one sequence's KV at the context length, the activations of one
    #: sequence, and the overhead.
    holder_serving_mib: int = 0

    @property
    def per_replica_mib(self) -> int:
        return self.kv_cache_mib + self.activation_mib + self.overhead_mib + self.staging_mib

    @property
    def weight_slices(self) -> int:
        """Slices of the weight-holder pod (0: nothing resident, no holder needed)."""
        return slices_for_mib(self.device_weights_mib, self.slice_mib)

    @property
    def replica_slices(self) -> int:
        return slices_for_mib(self.per_replica_mib, self.slice_mib)

    def device_mib(self, replicas_on_device: int) -> int:
        """Memory ``replicas_on_device`` replicas of this model take on one device, sharing weights."""
        if replicas_on_device <= 0:
            return 0
        return self.device_weights_mib + replicas_on_device * self.per_replica_mib

    def saved_by_sharing_mib(self, replicas_on_device: int) -> int:
        """What one weight copy for ``replicas_on_device`` replicas saves over a copy each."""
        return max(0, replicas_on_device - 1) * self.device_weights_mib


def estimate_memory(
    *,
    weights_mib: int,
    config: ModelConfig | None = None,
    kv_cache_mib: int | None = None,
    max_context_tokens: int | None = None,
    max_batch: int | None = None,
    activation_mib: int | None = None,
    overhead_mib: int = 0,
    offload_budget_mib: int | None = None,
    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH,
    largest_layer_mib: int | None = None,
    kv_dtype_bytes: int = DEFAULT_KV_DTYPE_BYTES,
    block_size: int | None = None,
    slice_mib: int = DEFAULT_SLICE_MIB,
) -> MemoryEstimate:
    """The estimate from plain numbers (see :func:`estimate_from_spec` for the CRD form).

    KV: ``kv_cache_mib`` when given, else ``max_context_tokens × max_batch`` tokens through the config;
    with ``block_size`` (a paged pool, as the operator sizes for vnpu's runtime) each sequence is padded to
    whole blocks and the pool's null block is added, so the limit buys the runtime its whole pool.
    Offload: with ``offload_budget_mib`` below ``weights_mib``, the budget covers the resident weights
    (shared, in the weight-holder) plus each replica's prefetch ring of ``prefetch_depth`` buffers of the
    largest layer (per replica, because every replica streams layers for its own forward passes).
    """
    assumptions: list[str] = []
    if weights_mib < 0 or overhead_mib < 0:
        raise EstimateError(f"weights and overhead must be non-negative, got {weights_mib}, {overhead_mib}")
    per_token = kv_bytes_per_token(config, kv_dtype_bytes) if config else None
    # A paged pool holds one null block beside the sequences' (the runtime's padding for gathers).
    null_block = (block_size or 0) * (per_token or 0)
    if kv_cache_mib is not None:
        kv_mib = kv_cache_mib
    elif max_context_tokens is not None and max_batch is not None:
        if config is None:
            raise EstimateError(
                "memory.maxContextTokens/maxBatch need the model config (layers, KV heads, head dim): "
                "use a source the operator can read, or set memory.kvCacheMiB"
            )
        kv_mib = mib_ceil(
            kv_cache_bytes(config, max_context_tokens, max_batch, kv_dtype_bytes, block_size) + null_block
        )
    else:
        raise EstimateError("spec.memory needs kvCacheMiB, or maxContextTokens together with maxBatch")
    if config is not None:  # one sequence at the context the runtime holds (a serving weight-holder's)
        one_context = max_context_tokens or DEFAULT_MAX_CONTEXT
        one_kv_mib = mib_ceil(kv_cache_bytes(config, one_context, 1, kv_dtype_bytes, block_size) + null_block)
    else:
        one_kv_mib = -(-kv_mib // max(1, max_batch or 1))
    if activation_mib is not None:  # given for a whole replica: more than one sequence needs
        one_activation_mib = activation_mib
    elif config is not None:
        # The runtime's batch and context where the spec gives a pool instead (vnpu.api's defaults).
        batch, context = max_batch or DEFAULT_MAX_BATCH, max_context_tokens or DEFAULT_MAX_CONTEXT
        if max_context_tokens is not None:
            gather = context_gather_bytes(config, context, batch, kv_dtype_bytes, block_size)
        else:  # a given pool: the most a step of the runtime's batch gathers from it (rows padded)
            gather = pool_gather_bytes(config, kv_mib, context, batch, kv_dtype_bytes, block_size)
        one_gather = context_gather_bytes(config, context, 1, kv_dtype_bytes, block_size)
        act_bytes = max(2, kv_dtype_bytes)  # activations in the model's dtype (a narrower KV cache: 16-bit)
        activation_mib = mib_ceil(default_activation_bytes(config, batch, gather, act_bytes))
        one_activation_mib = mib_ceil(default_activation_bytes(config, 1, one_gather, act_bytes))
        assumptions.append(f"activationMiB={activation_mib} estimated analytically from the model config")
    else:
        activation_mib = one_activation_mib = DEFAULT_ACTIVATION_MIB
        assumptions.append(f"activationMiB={activation_mib} (default: no model config to estimate from)")
    device_weights, staging = weights_mib, 0
    if offload_budget_mib is not None and offload_budget_mib < weights_mib:
        if prefetch_depth < 1:
            raise EstimateError(f"offload.prefetchDepth must be at least 1, got {prefetch_depth}")
        if largest_layer_mib is None:
            if config is None:
                raise EstimateError(
                    "async offload needs the layer sizes: use a source the operator can read, or set "
                    "offload.mode=none"
                )
            largest_layer_mib = -(-weights_mib // config.n_layers)
            assumptions.append(f"largest layer ≈ {largest_layer_mib} MiB (weights / layers)")
        staging = prefetch_depth * largest_layer_mib
        device_weights = offload_budget_mib - staging
        if device_weights < 0:
            raise EstimateError(
                f"offload.deviceBudgetMiB={offload_budget_mib} is smaller than the prefetch ring "
                f"({prefetch_depth} × {largest_layer_mib} MiB layers = {staging} MiB)"
            )
    return MemoryEstimate(
        weights_mib=weights_mib,
        device_weights_mib=device_weights,
        kv_cache_mib=kv_mib,
        activation_mib=activation_mib,
        overhead_mib=overhead_mib,
        staging_mib=staging,
        slice_mib=slice_mib,
        kv_bytes_per_token=per_token,
        config=config,
        assumptions=tuple(assumptions),
        holder_serving_mib=one_kv_mib + one_activation_mib + overhead_mib,
    )


def _opt_int(section: Mapping[str, Any], key: str, where: str) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EstimateError(f"spec.{where}.{key} must be a non-negative integer, got {value!r}")
    return value


def _section(spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, Mapping):
        raise EstimateError(f"spec.{key} must be an object")
    return value


def estimate_from_spec(
    spec: Mapping[str, Any],
    *,
    slice_mib: int = DEFAULT_SLICE_MIB,
    cache_dir: str | os.PathLike[str] | None = None,
    file_roots: Sequence[str | os.PathLike[str]] | None = None,
    model_file: ModelFileInfo | None = None,
    overhead_mib: int = 0,
    block_size: int | None = None,
    kv_dtype_bytes: int | None = None,
    read_header: Callable[..., ModelFileInfo] = read_model_file,
    read_files: bool = True,
) -> MemoryEstimate:
    """The estimate for an InferenceModel ``spec`` (the CRD's camelCase dict).

    Reads the source's header only when the spec lacks something it gives (``weights.sizeMiB``, the
    config for ``maxContextTokens``/``maxBatch``, the activation default, layer sizes for offload).
    ``file://`` and plain paths are readable under ``file_roots`` (anywhere when None: a user's own
    machine; the operator passes its ``--model-file-root`` directories, none by default, so that a
    tenant's spec cannot make it read files of its own); ``hf://`` is readable inside ``cache_dir`` (an
    HF hub cache or mirror) when one is configured; ``pvc://`` never is (the operator mounts no claims).
    An optional ``spec.modelConfig`` (config.json keys: ``num_hidden_layers``, ``num_key_value_heads``,
    ``head_dim``, ...) stands in for the header's config. ``model_file`` passes an already-read header
    (caching is the caller's business); with ``read_files=False`` an estimate that would read the
    source raises :class:`FilesNeeded` before it opens anything. Raises :class:`EstimateError` (a
    ValueError) naming the field to set when something is missing.
    """
    source = _section(spec, "source")
    weights = _section(spec, "weights")
    memory = _section(spec, "memory")
    offload = _section(spec, "offload")
    uri = str(source.get("uri", ""))
    dtype = weights.get("dtype")
    if dtype is not None and dtype not in WEIGHT_DTYPE_BYTES:
        raise EstimateError(f"spec.weights.dtype {dtype!r} is not one of {sorted(WEIGHT_DTYPE_BYTES)}")
    size_mib = _opt_int(weights, "sizeMiB", "weights")
    kv_mib = _opt_int(memory, "kvCacheMiB", "memory")
    max_ctx = _opt_int(memory, "maxContextTokens", "memory")
    max_batch = _opt_int(memory, "maxBatch", "memory")
    activation = _opt_int(memory, "activationMiB", "memory")
    offloading = offload.get("mode", "none") == "async"
    budget = _opt_int(offload, "deviceBudgetMiB", "offload") if offloading else None
    if offloading and budget is None:
        raise EstimateError("spec.offload.deviceBudgetMiB is required when offload.mode is async")
    depth = _opt_int(offload, "prefetchDepth", "offload") or DEFAULT_PREFETCH_DEPTH

    config: ModelConfig | None = None
    hint = spec.get("modelConfig")
    if hint is not None:
        if not isinstance(hint, Mapping):
            raise EstimateError("spec.modelConfig must be an object with config.json keys")
        try:
            config = config_from_hf(_complete_kv_hint(hint))
        except ValueError as exc:
            raise EstimateError(f"spec.modelConfig: {exc}") from exc

    needs_config = config is None and (kv_mib is None or activation is None)
    needs_header = size_mib is None or needs_config or (budget is not None and model_file is None)
    missing = [
        what
        for what, needed in (
            ("spec.weights.sizeMiB", size_mib is None and (config is None or dtype is None)),
            (
                "spec.memory.kvCacheMiB (or spec.modelConfig for maxContextTokens/maxBatch)",
                needs_config and kv_mib is None,
            ),
        )
        if needed
    ]
    info = model_file
    if info is None and needs_header:
        info = _read_source_header(
            uri, source.get("format"), cache_dir, file_roots, read_header, missing, read_files
        )
    if config is None and info is not None:
        config = info.config
    assumptions: list[str] = []
    # The dtype on the device: weights.dtype, which may differ from the file's (a GGUF the runtime
    # dequantises, a checkpoint quantised on load); unset, what vnpu's runtime loads the file at
    # (:func:`load_dtype`, which the operator passes to it), or the file's own with a runtime.image.
    custom_runtime = bool(_section(spec, "runtime").get("image"))
    on_device = dtype
    if on_device is None and info is not None and not custom_runtime:
        on_device = load_dtype(info)
    # The dtype the file's tensors are sized at when not as stored (layers for the offload ring too,
    # whether or not weights.sizeMiB is given).
    held_as = (
        on_device if info is not None and on_device is not None and on_device != file_dtype(info) else None
    )
    if size_mib is None:
        if info is not None:
            size_mib = _arena_mib(info, held_as)
            if held_as and size_mib != _arena_mib(info, None):
                assumptions.append(
                    f"weights.sizeMiB={size_mib}: {info.param_count} parameters as {on_device}"
                )
        elif config is not None and dtype is not None:
            size_mib = mib_ceil(estimate_param_count(config) * WEIGHT_DTYPE_BYTES[dtype])
            assumptions.append(f"weights.sizeMiB={size_mib} estimated from spec.modelConfig and {dtype}")
        else:
            raise EstimateError(_unreadable_message(uri, missing))
    if kv_mib is None and config is None:
        why = info.config_error if info is not None and info.config_error else "no model config"
        raise EstimateError(
            f"memory.maxContextTokens/maxBatch need the model's layers, KV heads and head dim ({why}): "
            "set spec.memory.kvCacheMiB or spec.modelConfig"
        )
    largest_layer = _largest_layer_mib(info, held_as) if info is not None else None
    if kv_dtype_bytes is None:
        fp32 = on_device == "float32" or (
            on_device is None and config is not None and config.dtype == "float32"
        )
        kv_dtype_bytes = 4 if fp32 else DEFAULT_KV_DTYPE_BYTES
    estimate = estimate_memory(
        weights_mib=size_mib,
        config=config,
        kv_cache_mib=kv_mib,
        max_context_tokens=max_ctx,
        max_batch=max_batch,
        activation_mib=activation,
        overhead_mib=_opt_int(memory, "overheadMiB", "memory") or overhead_mib,
        offload_budget_mib=budget,
        prefetch_depth=depth,
        largest_layer_mib=largest_layer,
        kv_dtype_bytes=kv_dtype_bytes,
        block_size=block_size,
        slice_mib=slice_mib,
    )
    if assumptions:
        estimate = dataclasses.replace(estimate, assumptions=(*assumptions, *estimate.assumptions))
    return estimate


def _held_bytes(t: TensorInfo, held_as: str | None) -> int:
    """One tensor as stored, or held at ``held_as``."""
    return math.ceil(t.numel * WEIGHT_DTYPE_BYTES[held_as]) if held_as else t.nbytes


def _arena_mib(info: ModelFileInfo, held_as: str | None) -> int:
    """The weights as the runtime's arena holds them: every tensor (as stored, or at ``held_as``) at an
    :data:`~vnpu.api.ARENA_ALIGNMENT` boundary."""
    align = ARENA_ALIGNMENT
    return mib_ceil(sum(-(-_held_bytes(t, held_as) // align) * align for t in info.tensors))


def _largest_layer_mib(info: ModelFileInfo, held_as: str | None) -> int | None:
    """The largest transformer block (what the prefetch ring holds), as stored or held at ``held_as``."""
    blocks: dict[int, int] = {}
    for t in info.tensors:
        index = layer_index(t.name)
        if index is not None:
            blocks[index] = blocks.get(index, 0) + _held_bytes(t, held_as)
    return mib_ceil(max(blocks.values())) if blocks else None


def _complete_kv_hint(hint: Mapping[str, Any]) -> dict[str, Any]:
    """A hint that names only what the KV formula needs (layers, KV heads, head dim) is enough: the
    query heads default to the KV heads and the hidden size to heads × head dim."""
    out = dict(hint)
    if "num_attention_heads" not in out and "num_key_value_heads" in out:
        out["num_attention_heads"] = out["num_key_value_heads"]
    heads, head_dim = out.get("num_attention_heads"), out.get("head_dim")
    if "hidden_size" not in out and isinstance(heads, int) and isinstance(head_dim, int):
        out["hidden_size"] = heads * head_dim
    return out


def _unreadable_message(uri: str, missing: list[str]) -> str:
    if uri.startswith("pvc://"):
        where = "pvc:// sources are only mounted into the model's pods, not into the operator"
    elif uri.startswith("hf://"):
        where = "hf:// sources are readable only with a local model cache configured for the operator"
    else:
        where = (
            f"source {uri!r} is not readable by the operator (it reads file:// sources only under the "
            "directories its --model-file-root names, none by default)"
        )
    return f"cannot size the model: {where}; set {' and '.join(missing)}"


def _read_source_header(
    uri: str,
    fmt: Any,
    cache_dir: str | os.PathLike[str] | None,
    file_roots: Sequence[str | os.PathLike[str]] | None,
    read_header: Callable[..., ModelFileInfo],
    missing: list[str],
    read_files: bool = True,
) -> ModelFileInfo | None:
    """The header of the source, or None when it cannot be read and nothing depends on it (an optional
    refinement such as the activation estimate then falls back to its default). Without
    ``read_files``, a source that would be looked at raises FilesNeeded before anything is opened."""
    roots = [cache_dir] if uri.startswith("hf://") and cache_dir is not None else file_roots
    if not read_files and uri and source_is_local(uri, cache_dir) and (roots is None or roots):
        raise FilesNeeded(uri)
    try:
        path = local_source_path(uri, cache_dir) if uri else None
    except ValueError as exc:  # a malformed URI, or a cache's ref file that is not one to follow
        if not missing:
            return None
        raise EstimateError(f"cannot resolve {uri}: {exc}") from exc
    root = None  # the root the source is read under: every file the header read opens must stay in it
    if path is not None and roots is not None:
        root = next((r for r in roots if resolves_within(path, r)), None)
        if root is None:
            path = None  # decided before anything is opened: a refusal says nothing about what lies outside
    if path is None:
        if missing:
            raise EstimateError(_unreadable_message(uri, missing))
        return None
    try:
        return read_header(str(path), fmt, root=root)
    except ValueError as exc:
        if not missing:
            return None
        raise EstimateError(f"cannot read the header of {uri}: {exc}") from exc
