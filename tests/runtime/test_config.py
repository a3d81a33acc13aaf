"""What the runtime makes of a model file's config: a value it cannot run on is refused naming the
field, as UnsupportedModelError (``vnpu runtime`` says it in one line and exits 1), never a traceback
or a model that loads and answers garbage. A tenant controls these bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from vnpu.modelfile import read_model_file
from vnpu.runtime.config import MAX_POSITIONS, ModelConfig, UnsupportedModelError

BASE = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_size": 64,
    "intermediate_size": 128,
    "vocab_size": 100,
    "rms_norm_eps": 1e-5,
}


def config_of(tmp_path: Path, **extra: Any) -> ModelConfig:
    """The runtime's config of a one-tensor safetensors checkpoint with ``BASE | extra`` as config.json."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    config = {**BASE, **extra}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return ModelConfig.from_model_file(read_model_file(tmp_path), config)


def test_a_plain_config_is_read_with_its_defaults(tmp_path: Path) -> None:
    cfg = config_of(tmp_path, bos_token_id=1, eos_token_id=[2, 3])
    assert (cfg.rope_theta, cfg.max_position_embeddings) == (10000.0, 2048)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"rope_scaling": "x"}, "rope_scaling"),  # was AttributeError
        ({"rope_theta": float("nan")}, "rope_theta"),  # was accepted: garbage out
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"rope_theta": 10**400}, "rope_theta"),
        ({"rms_norm_eps": float("inf")}, "rms_norm_eps"),
        ({"bos_token_id": {}}, "bos_token_id"),  # was TypeError
        ({"bos_token_id": 100}, "bos_token_id"),  # past the vocabulary
        ({"eos_token_id": True}, "eos_token_id"),
        ({"max_position_embeddings": 10**30}, "context length"),  # RoPE tables of 10**30 positions
    ],
)
def test_a_config_value_the_runtime_cannot_run_on_is_refused_naming_it(
    tmp_path: Path, extra: dict[str, Any], field: str
) -> None:
    with pytest.raises(UnsupportedModelError, match=field):
        config_of(tmp_path, **extra)


def test_the_longest_context_declared_is_bounded(tmp_path: Path) -> None:
    assert config_of(tmp_path, max_position_embeddings=MAX_POSITIONS).max_position_embeddings == MAX_POSITIONS
