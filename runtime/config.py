"""The architecture parameters of a Llama-family model, from the shared header reader (vnpu.modelfile).

One small dataclass is the only description of the model the rest of the runtime sees: the torch
implementation, the KV cache, the offload planner and the weights-holder manifest all use it, so a
replica attached to a holder rebuilds exactly the model the holder loaded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vnpu import memory, modelfile

#: Architectures the torch implementation in :mod:`vnpu.runtime.model` runs (all share Llama's block).
SUPPORTED_ARCHITECTURES = ("llama",)


class UnsupportedModelError(ValueError):
    """The model file describes something this runtime cannot run (with the reason in the message)."""


#: Longest context a model file may declare (``max_position_embeddings``): the RoPE tables are built
#: up to it. The longest released models declare about 10M tokens.
MAX_POSITIONS = 2**24


def _positive(value: Any, field: str, where: str) -> float:
    """``value`` as a finite positive float, or UnsupportedModelError naming the field: a NaN RoPE
    base or norm epsilon would load and answer garbage."""
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer past a float's range
            number = math.inf
    if not (math.isfinite(number) and number > 0):
        raise UnsupportedModelError(f"{where}: {field} must be a finite positive number, got {value!r}")
    return number


def _token_id(value: Any, field: str, where: str, vocab_size: int) -> int | None:
    """A special token id, within the vocabulary (or None), or UnsupportedModelError naming the field."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise UnsupportedModelError(f"{where}: {field} must be a token id below {vocab_size}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only Llama model. Field names follow HF ``LlamaConfig`` where one exists."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    architecture: str = "llama"
    name: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"{self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} KV heads"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def kv_group_size(self) -> int:
        """How many query heads share one KV head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes one token costs (the shared formula of :mod:`vnpu.memory`)."""
        return memory.kv_bytes_per_token(self.to_modelfile_config(), dtype_bytes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_modelfile_config(self) -> modelfile.ModelConfig:
        """The shared-core view of this config (what :mod:`vnpu.memory` sizes memory from)."""
        return modelfile.ModelConfig(
            architecture=self.architecture,
            n_layers=self.num_hidden_layers,
            n_heads=self.num_attention_heads,
            n_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            context_length=self.max_position_embeddings,
            ffn_size=self.intermediate_size,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_theta=self.rope_theta,
            norm_eps=self.rms_norm_eps,
        )

    @classmethod
    def from_model_file(
        cls, info: modelfile.ModelFileInfo, hf_config: Mapping[str, Any] | None = None
    ) -> ModelConfig:
        """Build from the header view :func:`vnpu.modelfile.read_model_file` gives (plus ``config.json``).

        The shared reader extracts the architecture numbers; this adds what only running the model
        needs (norm epsilon, RoPE base, special token ids) and refuses what the torch code cannot run.
        """
        cfg = info.config
        if cfg is None:
            raise UnsupportedModelError(f"{info.paths[0]}: no usable model config ({info.config_error})")
        meta = info.metadata if info.format == "gguf" else (hf_config or {})
        arch = cfg.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})"
            )
        if cfg.kv_lora_rank or cfg.value_head_dim or cfg.kv_heads_per_layer:
            raise UnsupportedModelError(
                "latent attention, distinct V head dims and per-layer KV heads are not supported"
            )
        missing = [n for n in ("ffn_size", "vocab_size", "norm_eps") if getattr(cfg, n) is None]
        if missing:
            raise UnsupportedModelError(f"{info.paths[0]}: the model config lacks {missing}")
        if info.format == "gguf":
            scaling = meta.get(f"{arch}.rope.scaling.type")
            rope_dim = meta.get(f"{arch}.rope.dimension_count", cfg.head_dim)
            if scaling not in (None, "none") or rope_dim != cfg.head_dim:
                raise UnsupportedModelError(
                    f"RoPE scaling {scaling!r} / partial RoPE dim {rope_dim} is not supported"
                )
            bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        else:
            rope = meta.get("rope_parameters") or meta.get("rope_scaling") or {}
            if not isinstance(rope, Mapping):
                raise UnsupportedModelError(f"{info.paths[0]}: rope_scaling must be an object, got {rope!r}")
            if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
                raise UnsupportedModelError(f"RoPE scaling {rope!r} is not supported")
            bos, eos = meta.get("bos_token_id"), meta.get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
        tied = cfg.tie_word_embeddings
        if tied is None:
            tied = not any(t.name in ("lm_head.weight", "output.weight") for t in info.tensors)
        theta = cfg.rope_theta
        if theta is None and info.format != "gguf":
            theta = (meta.get("rope_parameters") or {}).get("rope_theta")
        where = str(info.paths[0])
        vocab = int(cfg.vocab_size or 0)
        positions = int(cfg.context_length or 2048)
        if not 0 < positions <= MAX_POSITIONS:
            raise UnsupportedModelError(
                f"{where}: the context length must be between 1 and {MAX_POSITIONS}, got {positions}"
            )
        return cls(
            vocab_size=vocab,
            hidden_size=cfg.hidden_size,
            intermediate_size=int(cfg.ffn_size or 0),
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            rope_theta=_positive(10000.0 if theta is None else theta, "rope_theta", where),
            rms_norm_eps=_positive(1e-6 if cfg.norm_eps is None else cfg.norm_eps, "rms_norm_eps", where),
            max_position_embeddings=positions,
            tie_word_embeddings=bool(tied),
            bos_token_id=_token_id(bos, "bos_token_id", where, vocab),
            eos_token_id=_token_id(eos, "eos_token_id", where, vocab),
            architecture=arch,
            name=str(meta.get("general.name") or meta.get("_name_or_path") or ""),
        )
