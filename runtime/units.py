"""The model as a sequence of weight units: what the forward pass asks for, and what offload moves.

A unit is the set of tensors one step of the forward pass needs at once: the embedding table, each
block's attention (its norm, q, k, v, o), each block's feed-forward (norm, gate, up, down), the final
norm, and the output head. The head (the embedding table again when tied) is split by vocabulary rows
into chunks no bigger than a feed-forward block, so a streamed head never needs a ring slot much
larger than a layer. Execution order is fixed: ``embed, layers.0.attn, layers.0.ffn, ..., norm,
head.0, head.1, ...``. Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from vnpu.runtime.config import ModelConfig

ATTN, FFN, HEAD, EMBED, NORM = "attn", "ffn", "head", "embed", "norm"

_ATTN_KEYS = {
    "norm": "input_layernorm",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
}
_FFN_KEYS = {
    "norm": "post_attention_layernorm",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclass(frozen=True)
class Unit:
    """``name`` (e.g. ``layers.3.attn``), its ``kind``, ``tensors`` (short key -> full tensor name)
    and, for head chunks, the ``rows`` [start, end) of the (single) tensor the unit covers."""

    name: str
    kind: str
    layer: int | None
    tensors: dict[str, str]
    rows: tuple[int, int] | None = None


def head_chunks(config: ModelConfig) -> int:
    """How many row chunks the output head is split into: each at most one FFN block's size."""
    ffn_elements = 3 * config.hidden_size * config.intermediate_size
    return max(1, -(-config.vocab_size * config.hidden_size // ffn_elements))


def model_units(config: ModelConfig) -> list[Unit]:
    """All units of ``config``'s model in execution order."""
    units = [Unit("embed", EMBED, None, {"weight": "model.embed_tokens.weight"})]
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        attn = {k: f"{prefix}{v}.weight" for k, v in _ATTN_KEYS.items()}
        ffn = {k: f"{prefix}{v}.weight" for k, v in _FFN_KEYS.items()}
        units += [Unit(f"layers.{i}.attn", ATTN, i, attn), Unit(f"layers.{i}.ffn", FFN, i, ffn)]
    units.append(Unit("norm", NORM, None, {"weight": "model.norm.weight"}))
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    chunks = head_chunks(config)
    step = -(-config.vocab_size // chunks)
    for j, start in enumerate(range(0, config.vocab_size, step)):
        rows = (start, min(start + step, config.vocab_size))
        units.append(Unit(f"head.{j}", HEAD, None, {"weight": head}, rows))
    return units


def all_tensor_names(config: ModelConfig) -> set[str]:
    return {name for unit in model_units(config) for name in unit.tensors.values()}
