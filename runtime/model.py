"""A Llama-architecture decoder in plain torch: RMSNorm, RoPE, GQA attention, SwiGLU, KV cache.

Two entry points share the layer code: :meth:`LlamaModel.forward` runs one batch of equal-length
sequences over a contiguous :class:`KVCache` (the reference path: tests, offload benchmarks), and
:meth:`LlamaModel.forward_batch` runs one continuous-batching step — sequences of any lengths, each
with new tokens, flattened into one token batch — over a :class:`~vnpu.runtime.paged.PagedKVCache`
(the serving path, :mod:`vnpu.runtime.engine`).

The model owns no weights. It asks a :class:`WeightProvider` for one unit at a time (see
:mod:`vnpu.runtime.units`): a resident provider hands out views of a (possibly shared) arena, the
offload engine hands out ring-buffer slots it filled ahead of time. The math is the same either way,
so an offloaded run is bit-identical to a resident one.

Numerics follow Hugging Face ``LlamaForCausalLM`` (RMSNorm in float32, RoPE "rotate half" layout,
softmax attention with grouped KV heads) so greedy outputs match ``transformers`` token for token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from vnpu.runtime.config import ModelConfig
from vnpu.runtime.paged import BatchLayout, PagedKVCache
from vnpu.runtime.units import Unit, model_units


class WeightProvider(Protocol):
    """Source of weight units for the forward pass."""

    def unit(self, unit: Unit) -> contextlib.AbstractContextManager[Mapping[str, torch.Tensor]]:
        """Tensors of ``unit`` (short key -> tensor), valid inside the ``with`` block only."""
        ...

    def begin_pass(self) -> None:
        """Called at the start of every forward pass (the offload ring re-aligns itself here)."""
        ...


#: Projections that read the same input, in the order the loader packs them (see
#: :func:`vnpu.runtime.checkpoint.canonical_order`): one GEMM over their stacked rows replaces several.
STACKS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def stacked_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One ``[sum of rows, in]`` view over 2-d weights that lie back to back in one storage, or None.

    The arena packs a unit's tensors in forward order, so q, k, v (and gate, up) usually touch: a
    single GEMM over the stacked view then does the work of three (two) with no copy, and the one
    shared copy of the weights stays the only one. Fewer, wider kernel calls took 17% less GEMM time
    per decode step at batch 8 here. When padding separates them (sizes that are not a multiple of the
    arena's alignment) the caller keeps one GEMM per projection.
    """
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    columns = first.shape[-1]
    expected = first.data_ptr()
    for part in parts:
        if (
            part.dim() != 2
            or part.shape[1] != columns
            or part.dtype != first.dtype
            or not part.is_contiguous()
            or part.untyped_storage().data_ptr() != storage
            or part.data_ptr() != expected
        ):
            return None
        expected += part.numel() * part.element_size()
    return first.as_strided((sum(p.shape[0] for p in parts), columns), (columns, 1))


def with_stacks(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` plus a stacked view (:data:`STACKS`) for every group that lies back to back."""
    out = dict(tensors)
    for stack, keys in STACKS.items():
        if all(k in tensors for k in keys):
            view = stacked_rows([tensors[k] for k in keys])
            if view is not None:
                out[stack] = view
    return out


class ResidentWeights:
    """All weights already in place (e.g. views into an arena): every unit is a dict lookup."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self._units: dict[str, Mapping[str, torch.Tensor]] = {}

    @contextlib.contextmanager
    def unit(self, unit: Unit) -> Iterator[Mapping[str, torch.Tensor]]:
        out = self._units.get(unit.name)
        if out is None:
            out = {key: self.tensors[name] for key, name in unit.tensors.items()}
            if unit.rows is not None:
                out = {key: t[unit.rows[0] : unit.rows[1]] for key, t in out.items()}
            out = self._units[unit.name] = with_stacks(out)
        yield out

    def begin_pass(self) -> None:
        pass


class KVCache:
    """Per-layer key/value tensors ``[max_batch, kv_heads, max_tokens, head_dim]``, allocated once."""

    def __init__(
        self,
        config: ModelConfig,
        max_tokens: int,
        max_batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        shape = (max_batch, config.num_key_value_heads, max_tokens, config.head_dim)
        self.max_tokens = max_tokens
        self.max_batch = max_batch
        # One allocation for all of it (keys and values of every layer); layers get views.
        self.storage = torch.zeros((2, config.num_hidden_layers, *shape), dtype=dtype, device=device)
        self.keys = list(self.storage[0].unbind(0))
        self.values = list(self.storage[1].unbind(0))

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, HF's "rotate half" layout."""
    return x * cos + _rotate_half(x) * sin


Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's ``vendor_id`` (``GenuineIntel``, ``AuthenticAMD``, ...), or "" where it is not said."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return ""


def linear_kernel(device: torch.device, dtype: torch.dtype, vendor: str | None = None) -> Linear:
    """``x @ w.T`` for weights ``[out, in]``: on a non-Intel CPU in float32, oneDNN; else ``F.linear``.

    PyTorch sends a CPU float32 ``F.linear`` to MKL's sgemm. On Intel CPUs that is the fastest kernel
    here; on others MKL takes a generic path, and oneDNN's kernels (what vLLM's CPU backend uses for
    its linear layers), reading the same weights in place with no copy or prepacking, are faster.
    Measured on SmolLM2-135M decode steps (``vnpu bench serving --sections step`` reports both):
    on an AMD EPYC (2 threads), MKL / oneDNN 61.8 / 48.6 ms at 1 sequence and 110 / 68.9 ms at 8; on
    an Intel Xeon with AVX-512 (2 threads), 29.0 / 38.2 ms at 1, 46 / 52 at 4, 54.5 / 55.9 at 8 and
    90 / 95 at 32. Same float32 math, another summation order: logits differ by ~1e-6 relative, as
    between batch sizes. ``vendor`` defaults to this machine's (:func:`cpu_vendor`).
    """
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
        if op is not None and (vendor if vendor is not None else cpu_vendor()) != "GenuineIntel":

            def onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return op(x, w, None, "none", [], "")

            return onednn_linear
    return F.linear


class LlamaModel:
    """Forward pass of a Llama model over weights from a provider and a :class:`KVCache`."""

    def __init__(
        self,
        config: ModelConfig,
        weights: WeightProvider,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_positions: int | None = None,
    ) -> None:
        self.config = config
        self.weights = weights
        self.device = torch.device(device)
        self.dtype = dtype
        self._linear = linear_kernel(self.device, dtype)
        self.units = model_units(config)
        self._embed = self.units[0]
        self._blocks = [u for u in self.units if u.kind in ("attn", "ffn")]
        self._norm = next(u for u in self.units if u.kind == "norm")
        self._head = [u for u in self.units if u.kind == "head"]
        positions = max_positions or config.max_position_embeddings
        d = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos().to(device=self.device, dtype=dtype)
        self._sin = emb.sin().to(device=self.device, dtype=dtype)

    def new_cache(self, max_tokens: int, max_batch: int = 1) -> KVCache:
        return KVCache(self.config, max_tokens, max_batch, self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, cache: KVCache, start: int, last_only: bool = True
    ) -> torch.Tensor:
        """Logits for ``input_ids`` ``[batch, tokens]`` placed at positions ``start...`` of ``cache``.

        Returns ``[batch, vocab]`` for the last position (``last_only``) or ``[batch, tokens, vocab]``.
        """
        batch, count = input_ids.shape
        end = start + count
        if end > cache.max_tokens or batch > cache.max_batch:
            raise ValueError(f"positions {start}..{end} x batch {batch} exceed the KV cache")
        self.weights.begin_pass()
        with self.weights.unit(self._embed) as w:
            table = w["weight"]
            hidden = F.embedding(input_ids.to(table.device), table).to(self.device, self.dtype)
        cos, sin = self._cos[start:end, None], self._sin[start:end, None]  # [count, 1, d]: per head
        mask = None
        if count > 1 and start > 0:  # chunked prefill: causal within the chunk, all of the past visible
            rows = torch.arange(start, end, device=self.device)[:, None]
            mask = torch.arange(end, device=self.device)[None, :] <= rows
        for unit in self._blocks:
            with self.weights.unit(unit) as w:
                if unit.kind == "attn":
                    hidden = hidden + self._attention(
                        hidden, w, cache, unit.layer or 0, start, cos, sin, mask
                    )
                else:
                    hidden = hidden + self._feed_forward(hidden, w)
        if last_only:
            hidden = hidden[:, -1]
        with self.weights.unit(self._norm) as w:
            hidden = rms_norm(hidden, w["weight"], self.config.rms_norm_eps)
        logits = []
        for unit in self._head:
            with self.weights.unit(unit) as w:
                logits.append(self._linear(hidden, w["weight"]).float())
        return torch.cat(logits, dim=-1)

    def _attention(
        self,
        x: torch.Tensor,
        w: Mapping[str, torch.Tensor],
        cache: KVCache,
        layer: int,
        start: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        cfg = self.config
        batch, count, _ = x.shape
        q, k, v = self._qkv(rms_norm(x, w["norm"], cfg.rms_norm_eps), w, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        end = start + count
        cache.keys[layer][:batch, :, start:end] = k
        cache.values[layer][:batch, :, start:end] = v
        keys = cache.keys[layer][:batch, :, :end]
        values = cache.values[layer][:batch, :, :end]
        out = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            is_causal=count > 1 and start == 0,
            enable_gqa=cfg.kv_group_size > 1,
        )
        return self._linear(out.transpose(1, 2).reshape(batch, count, -1), w["o"])

    @torch.inference_mode()
    def forward_batch(self, layout: BatchLayout, cache: PagedKVCache) -> torch.Tensor:
        """Logits ``[len(layout.sample_rows), vocab]`` of one continuous-batching step.

        Every weight unit is used once for the whole step (one pass of the offload ring).
        """
        self.weights.begin_pass()
        cache.initialise(layout.last_block)
        with self.weights.unit(self._embed) as w:
            table = w["weight"]
            hidden = F.embedding(layout.input_ids.to(table.device), table).to(self.device, self.dtype)
        # index_select, not advanced indexing: several times faster for these row gathers on CPU.
        cos = self._cos.index_select(0, layout.positions)[:, None, :]
        sin = self._sin.index_select(0, layout.positions)[:, None, :]
        for unit in self._blocks:
            with self.weights.unit(unit) as w:
                if unit.kind == "attn":
                    hidden = hidden + self._paged_attention(
                        hidden, w, cache, unit.layer or 0, layout, cos, sin
                    )
                else:
                    hidden = hidden + self._feed_forward(hidden, w)
        hidden = hidden.index_select(0, layout.sample_rows)
        with self.weights.unit(self._norm) as w:
            hidden = rms_norm(hidden, w["weight"], self.config.rms_norm_eps)
        logits = []
        for unit in self._head:
            with self.weights.unit(unit) as w:
                logits.append(self._linear(hidden, w["weight"]).float())
        return torch.cat(logits, dim=-1)

    def _paged_attention(
        self,
        x: torch.Tensor,
        w: Mapping[str, torch.Tensor],
        cache: PagedKVCache,
        layer: int,
        layout: BatchLayout,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.config
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = self._qkv(rms_norm(x, w["norm"], cfg.rms_norm_eps), w, cos, sin)
        keys, values = cache.keys[layer], cache.values[layer]
        keys.index_copy_(0, layout.slots, k)
        values.index_copy_(0, layout.slots, v)
        gqa = cfg.kv_group_size > 1
        key_blocks, value_blocks = cache.blocks(layer)
        parts = []
        b = layout.decode_count
        if b:
            assert layout.decode_blocks is not None
            table = layout.decode_blocks
            shape = (b, table.shape[1] * cache.block_size, kv_heads, d)
            # Whole blocks per row: index_select, not advanced indexing (several times faster on CPU).
            ctx_k = key_blocks.index_select(0, table.reshape(-1)).view(shape).transpose(1, 2)
            ctx_v = value_blocks.index_select(0, table.reshape(-1)).view(shape).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q[:b, :, None, :], ctx_k, ctx_v, attn_mask=layout.decode_mask, enable_gqa=gqa
            )
            parts.append(out.reshape(b, heads * d))
        for span in layout.prefills:
            end = span.start + span.count
            shape = (-1, kv_heads, d)
            ctx_k = key_blocks.index_select(0, span.blocks).view(shape)[:end].transpose(0, 1)[None]
            ctx_v = value_blocks.index_select(0, span.blocks).view(shape)[:end].transpose(0, 1)[None]
            q_span = q[span.row : span.row + span.count].transpose(0, 1)[None]
            out = F.scaled_dot_product_attention(
                q_span, ctx_k, ctx_v, attn_mask=span.mask, is_causal=span.mask is None, enable_gqa=gqa
            )
            parts.append(out[0].transpose(0, 1).reshape(span.count, heads * d))
        attended = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return self._linear(attended, w["o"])

    def _qkv(
        self, h: torch.Tensor, w: Mapping[str, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys (rotated) and values of ``h`` ``[..., hidden]``, each ``[..., heads, d]``.

        With a stacked ``qkv`` view it is one GEMM, and queries and keys, adjacent in its output,
        are rotated together.
        """
        cfg = self.config
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        lead = h.shape[:-1]
        stacked = w.get("qkv")
        if stacked is None:
            q = self._linear(h, w["q"]).view(*lead, heads, d)
            k = self._linear(h, w["k"]).view(*lead, kv_heads, d)
            v = self._linear(h, w["v"]).view(*lead, kv_heads, d)
            return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v
        out = self._linear(h, stacked).view(*lead, heads + 2 * kv_heads, d)
        qk, v = out[..., : heads + kv_heads, :], out[..., heads + kv_heads :, :]
        qk = _apply_rope(qk, cos, sin)
        return qk[..., :heads, :], qk[..., heads:, :], v

    def _feed_forward(self, x: torch.Tensor, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h = rms_norm(x, w["norm"], self.config.rms_norm_eps)
        stacked = w.get("gate_up")
        if stacked is None:
            gate, up = self._linear(h, w["gate"]), self._linear(h, w["up"])
        else:
            gate, up = self._linear(h, stacked).split(self.config.intermediate_size, dim=-1)
        return self._linear(F.silu(gate) * up, w["down"])
