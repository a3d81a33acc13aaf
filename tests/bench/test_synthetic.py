"""``vnpu bench synthetic-model``: a random-weight llama of any shape that the runtime loads like a
real checkpoint, with the real model's tokenizer (what the GPU figures are measured on)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vnpu.bench.synthetic import PRESETS, main
from vnpu.bench.weights import model_description, smollm2_dir


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return next(smollm2_dir().glob("*.gguf"))


def test_a_synthetic_model_has_the_shape_asked_and_the_real_tokenizer(tmp_path: Path, smollm2_gguf: Path):
    from vnpu.runtime.checkpoint import open_checkpoint
    from vnpu.runtime.sources import resolve
    from vnpu.runtime.tokenizer import Tokenizer

    out = tmp_path / "m.gguf"
    assert main(["--like", str(smollm2_gguf), "--out", str(out), "--preset", "tiny", "--layers", "3"]) == 0
    synthetic, real = open_checkpoint(resolve(str(out))), open_checkpoint(resolve(str(smollm2_gguf)))
    shape = PRESETS["tiny"]
    config = synthetic.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (3, 64, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (shape.heads, shape.kv_heads)
    assert config.vocab_size == real.config.vocab_size
    assert synthetic.tokenizer == real.tokenizer  # every tokenizer field, the chat template included
    text = "Hello, 123 world!"
    assert Tokenizer(synthetic.tokenizer).encode(text) == Tokenizer(real.tokenizer).encode(text)
    assert "synthetic" in model_description(out) and "random weights" in model_description(out)
    # Its own tokenizer travels on: a model made from a synthetic one keeps it.
    again = tmp_path / "again.gguf"
    assert main(["--like", str(out), "--out", str(again), "--hidden", "32", "--heads", "2"]) == 0
    assert open_checkpoint(resolve(str(again))).tokenizer == real.tokenizer


def test_a_synthetic_model_runs_the_same_in_vnpu_and_transformers(tmp_path: Path, smollm2_gguf: Path):
    """Both sides of ``vnpu bench serving`` compute the same function of a synthetic model."""
    import torch

    from vnpu.bench.serving import transformers_llama
    from vnpu.runtime.loader import load_weights
    from vnpu.runtime.model import LlamaModel, ResidentWeights
    from vnpu.runtime.sources import resolve

    out = tmp_path / "m.gguf"
    main(["--like", str(smollm2_gguf), "--out", str(out)])
    weights = load_weights(resolve(str(out)), progress=False)
    up = weights.arena.view(weights.manifest.tensors["model.layers.0.mlp.up_proj.weight"])
    assert tuple(up.shape) == (128, 64) and 0.015 < float(up.float().std()) < 0.025
    assert bool((weights.arena.view(weights.manifest.tensors["model.norm.weight"]) == 1).all())
    tensors = {name: weights.arena.view(entry) for name, entry in weights.manifest.tensors.items()}
    ours = LlamaModel(weights.manifest.config, ResidentWeights(tensors), max_positions=64)
    ids = torch.tensor([[1, 17, 4000, 9, 123, 45000]])
    with torch.no_grad():
        theirs = transformers_llama(weights)(ids).logits[:, -1]
    torch.testing.assert_close(ours.forward(ids, ours.new_cache(64), 0), theirs, rtol=1e-4, atol=1e-4)


def test_an_inconsistent_shape_is_a_usage_error(tmp_path: Path, smollm2_gguf: Path):
    with pytest.raises(SystemExit) as e:
        main(["--like", str(smollm2_gguf), "--out", str(tmp_path / "x.gguf"), "--hidden", "65"])
    assert e.value.code == 2
    assert not (tmp_path / "x.gguf").exists()
