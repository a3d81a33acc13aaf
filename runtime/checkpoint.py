"""Read a checkpoint's tensors (GGUF via the ``gguf`` package, safetensors via ``safetensors``).

Whatever the file format, tensors come out under Hugging Face Llama names
(``model.layers.3.self_attn.q_proj.weight``) in HF orientation (``[out_features, in_features]``) and
HF head layout, so one model implementation — ours and the ``transformers`` reference — runs either.

GGUF specifics handled here:

* quantised tensors (Q4_1, Q8_0, ...) are dequantised with ``gguf.quants.dequantize``;
* llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so RoPE can rotate adjacent pairs;
  we apply the inverse permutation, giving back HF's "rotate half" layout;
* a missing ``output.weight`` means the output head is tied to ``token_embd.weight``.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any, Protocol

import numpy as np

from vnpu.runtime.config import ModelConfig, UnsupportedModelError
from vnpu.runtime.sources import ResolvedSource
from vnpu.runtime.tokenizer import tokenizer_spec_from_gguf, tokenizer_spec_from_hf

#: GGUF tensor name -> HF name, per block (``{i}``) and global.
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def hf_name_for_gguf(name: str) -> str:
    """The HF parameter name of a llama GGUF tensor (raises for tensors the runtime does not know)."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    m = _GGUF_BLOCK.match(name)
    if m and m.group(2) in _GGUF_BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK_NAMES[m.group(2)]}.weight"
    raise UnsupportedModelError(f"GGUF tensor {name!r} is not part of the supported llama architecture")


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's two halves per head).

    llama.cpp's converter reshapes ``[n_heads, 2, head_dim/2, in]`` and swaps the middle axes; the
    inverse reshapes ``[n_heads, head_dim/2, 2, in]`` and swaps them back.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return np.ascontiguousarray(
        weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


class Checkpoint(Protocol):
    """A model file opened for reading: config, tokenizer description and tensors by HF name."""

    config: ModelConfig
    tokenizer: dict[str, Any]

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def read(self, name: str) -> np.ndarray | Any: ...

    def close(self) -> None: ...


class GGUFCheckpoint:
    """A llama GGUF file read through ``gguf.GGUFReader`` (memory-mapped, dequantised per tensor)."""

    def __init__(self, source: ResolvedSource) -> None:
        from gguf import GGUFReader

        self.config = ModelConfig.from_model_file(source.info)
        self._reader = GGUFReader(str(source.weights[0]))
        tokenizer_meta = {
            name: f.contents()
            for name, f in self._reader.fields.items()
            if name.startswith("tokenizer.")  # tokenizer.ggml.* and tokenizer.chat_template
        }
        self._tensors = {hf_name_for_gguf(t.name): t for t in self._reader.tensors}
        self.tokenizer = tokenizer_spec_from_gguf(tokenizer_meta)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        # GGUF lists dimensions fastest-first (ne0 = in_features); HF shapes are the reverse.
        return {name: tuple(int(d) for d in reversed(t.shape)) for name, t in self._tensors.items()}

    def read(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        weight = np.asarray(dequantize(t.data, t.tensor_type)).reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rope_rows(weight, self.config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rope_rows(weight, self.config.num_key_value_heads)
        return weight

    def close(self) -> None:
        # Drop the memory map of the file so its pages stop counting against this process.
        self._tensors.clear()
        self._reader = None  # type: ignore[assignment]


class SafetensorsCheckpoint:
    """HF-layout safetensors shards plus ``config.json`` (and ``tokenizer.json``) beside them."""

    _IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

    def __init__(self, source: ResolvedSource) -> None:
        from safetensors import safe_open

        if source.config_json is None:
            raise UnsupportedModelError(f"no config.json next to {source.weights[0]}")
        cfg = json.loads(source.config_json.read_text())
        self.config = ModelConfig.from_model_file(source.info, cfg)
        self._handles = [safe_open(str(f), framework="pt") for f in source.weights]
        self._where: dict[str, Any] = {}
        for handle in self._handles:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if not self._IGNORED.search(key):
                    self._where[key] = handle
        if self.config.tie_word_embeddings:
            self._where.pop("lm_head.weight", None)
        tokenizer_json = source.tokenizer_json
        config_json = source.directory / "tokenizer_config.json"
        template_file = source.directory / "chat_template.jinja"
        self.tokenizer = (
            tokenizer_spec_from_hf(
                json.loads(tokenizer_json.read_text()),
                json.loads(config_json.read_text()) if config_json.is_file() else None,
                template_file.read_text() if template_file.is_file() else None,
            )
            if tokenizer_json
            else {}
        )
        if self.tokenizer.get("bos_id") is None:
            self.tokenizer["bos_id"] = self.config.bos_token_id
        if self.tokenizer.get("eos_id") is None:
            self.tokenizer["eos_id"] = self.config.eos_token_id

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(h.get_slice(k).get_shape()) for k, h in self._where.items()}

    def read(self, name: str) -> Any:
        return self._where[name].get_tensor(name)

    def close(self) -> None:
        self._where.clear()
        self._handles.clear()


def open_checkpoint(source: ResolvedSource) -> Checkpoint:
    if source.format == "gguf":
        return GGUFCheckpoint(source)
    return SafetensorsCheckpoint(source)


def as_bytes(tensor: np.ndarray | Any, dtype: str) -> np.ndarray:
    """``tensor`` converted to ``dtype`` and returned as a flat uint8 numpy view (for arena writes)."""
    if isinstance(tensor, np.ndarray) and dtype in ("float32", "float16"):
        return np.ascontiguousarray(tensor.astype(dtype, copy=False)).reshape(-1).view(np.uint8)
    import torch

    if isinstance(tensor, np.ndarray):
        # A read-only map of the file: torch warns that writing through it would be undefined, and
        # nothing here writes (the arena gets a copy), so every holder's log need not carry the warning.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.as_tensor(tensor)
    t = tensor.to(getattr(torch, dtype)).contiguous().reshape(-1)
    return t.view(torch.uint8).numpy()


def canonical_order(names: list[str], config: ModelConfig) -> list[str]:
    """Tensors in forward-pass order, grouped by unit (see :mod:`vnpu.runtime.units`).

    Packing the arena in this order makes every unit one contiguous byte range, so the offload
    engine streams a unit with a single copy. Tensors outside the known units come last.
    """
    from vnpu.runtime.units import model_units

    ordered: list[str] = []
    for unit in model_units(config):
        ordered += [n for n in unit.tensors.values() if n in names and n not in ordered]
    return ordered + sorted(set(names) - set(ordered))
