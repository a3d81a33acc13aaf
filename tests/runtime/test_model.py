"""Our Llama implementation against ``transformers`` on the same dequantised SmolLM2 weights."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rt_helpers import load_tiny_llama

from vnpu.runtime.checkpoint import GGUFCheckpoint, as_bytes
from vnpu.runtime.generate import generate
from vnpu.runtime.loader import load_weights
from vnpu.runtime.model import LlamaModel, ResidentWeights, stacked_rows
from vnpu.runtime.sources import resolve
from vnpu.runtime.tokenizer import Tokenizer

PROMPT = (
    "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
STEPS = 32


def our_model(weights: Any, max_positions: int = 512) -> LlamaModel:
    tensors = {name: weights.arena.view(entry) for name, entry in weights.manifest.tensors.items()}
    return LlamaModel(weights.manifest.config, ResidentWeights(tensors), max_positions=max_positions)


def hf_model(weights: Any):
    """HF LlamaForCausalLM from a LlamaConfig derived from GGUF metadata, loaded with the same tensors
    (the builder the serving benchmark's peer uses)."""
    from vnpu.bench.serving import transformers_llama

    model = transformers_llama(weights)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def hf_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with HF's own KV cache (no stop token: exactly ``steps`` tokens)."""
    out, logits = [], []
    past = None
    inputs = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            result = model(input_ids=inputs, past_key_values=past, use_cache=True)
            past = result.past_key_values
            step_logits = result.logits[0, -1].float()
            token = int(step_logits.argmax())
            out.append(token)
            logits.append(step_logits)
            inputs = torch.tensor([[token]])
    return out, logits


def our_greedy(model: LlamaModel, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    cache = model.new_cache(len(ids) + steps)
    out, logits = [], []
    step_logits = model.forward(torch.tensor([ids]), cache, 0)[0]
    position = len(ids)
    for _ in range(steps):
        token = int(step_logits.argmax())
        out.append(token)
        logits.append(step_logits)
        step_logits = model.forward(torch.tensor([[token]]), cache, position)[0]
        position += 1
    return out, logits


@pytest.fixture(scope="module")
def tokenizer(smollm2_weights: Any) -> Tokenizer:
    return Tokenizer(smollm2_weights.manifest.tokenizer)


def test_config_from_gguf_metadata(smollm2_weights: Any) -> None:
    c = smollm2_weights.manifest.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert c.rope_theta == 100000.0 and c.tie_word_embeddings and c.vocab_size == 49152
    assert c.kv_bytes_per_token(2) == 30 * 2 * 3 * 64 * 2  # the KV formula of vnpu.memory


def test_qk_unpermutation_matches_transformers_gguf_loader(smollm2_path: Path, smollm2_weights: Any) -> None:
    """Our inverse of llama.cpp's q/k row permutation equals transformers' own GGUF loader's."""
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    ckpt = GGUFCheckpoint(resolve(str(smollm2_path)))
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    tensors = {t.name: t for t in ckpt._reader.tensors}  # the raw GGUF tensors
    pairs = (("blk.7.attn_q.weight", "self_attn.q_proj"), ("blk.7.attn_k.weight", "self_attn.k_proj"))
    for gguf_name, hf_name in pairs:
        t = tensors[gguf_name]
        raw = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
        reference = processor.process(raw, gguf_name).weights
        entry = smollm2_weights.manifest.tensors[f"model.layers.7.{hf_name}.weight"]
        ours = smollm2_weights.arena.view(entry)
        np.testing.assert_array_equal(ours.numpy(), reference)
        assert not np.array_equal(raw, reference)  # the permutation is real: undoing it matters


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_greedy_generation_matches_transformers(smollm2_weights: Any, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    ours, our_logits = our_greedy(our_model(smollm2_weights), ids, STEPS)
    theirs, their_logits = hf_greedy(hf_model(smollm2_weights), ids, STEPS)
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
    for step, (a, b) in enumerate(zip(our_logits, their_logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3, msg=f"logits differ at step {step}")
    # The un-permuted RoPE layout is the right one: the model answers sensibly.
    assert "Paris" in tokenizer.decode(ours)


def test_the_arena_stacks_q_k_v_and_gate_up_in_place(smollm2_weights: Any) -> None:
    """The loader packs q, k, v (and gate, up) back to back: the model gets one view over each group,
    into the same memory, holding exactly the rows of its parts."""
    model = our_model(smollm2_weights)
    for unit, stack, keys in (
        (model._blocks[0], "qkv", "qkv"),
        (model._blocks[1], "gate_up", ("gate", "up")),
    ):
        with model.weights.unit(unit) as w:
            assert w[stack].data_ptr() == w[keys[0]].data_ptr()  # a view, no copy
            torch.testing.assert_close(w[stack], torch.cat([w[k] for k in keys]), rtol=0, atol=0)


def test_a_read_only_map_of_the_file_converts_without_a_warning(tmp_path: Path) -> None:
    """Weights come from a read-only map of the file; converting them for the arena reads it only, and
    every weight-holder's log carried torch's "not writable" warning for each load."""
    values = np.arange(12, dtype=np.float32)
    values.tofile(tmp_path / "w.bin")
    mapped = np.memmap(tmp_path / "w.bin", dtype=np.float32, mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = as_bytes(mapped, "bfloat16")
    assert torch.equal(torch.frombuffer(bytearray(data), dtype=torch.bfloat16).float(), torch.arange(12.0))


def test_stacked_rows_refuses_weights_that_do_not_touch() -> None:
    flat = torch.zeros(10 * 4 + 8)
    a, b = flat[:16].view(4, 4), flat[16:32].view(4, 4)
    assert stacked_rows([a, b]) is not None
    assert stacked_rows([a, flat[20:36].view(4, 4)]) is None  # padding between them
    assert stacked_rows([b, a]) is None  # out of order
    assert stacked_rows([a, flat[16:32].clone().view(4, 4)]) is None  # another storage
    assert stacked_rows([a, flat[16:32].view(2, 8)]) is None  # other columns
    assert stacked_rows([a, flat[16:48].view(4, 8)[:, :4]]) is None  # not contiguous


def test_separate_projections_give_the_tokens_stacked_ones_give(
    smollm2_weights: Any, tokenizer: Tokenizer
) -> None:
    """Weights that do not touch (each its own copy) take one GEMM per projection: same greedy tokens."""
    ids = tokenizer.encode(PROMPT)
    copies = {
        name: smollm2_weights.arena.view(entry).clone()
        for name, entry in smollm2_weights.manifest.tensors.items()
    }
    separate = LlamaModel(smollm2_weights.manifest.config, ResidentWeights(copies), max_positions=512)
    with separate.weights.unit(separate._blocks[0]) as w:
        assert "qkv" not in w
    ours, our_logits = our_greedy(our_model(smollm2_weights), ids, 12)
    theirs, their_logits = our_greedy(separate, ids, 12)
    assert ours == theirs
    for a, b in zip(our_logits, their_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_chunked_prefill_equals_one_shot(tmp_path: Path) -> None:
    """Prefill in chunks (causal mask offset by the cached past) computes what one pass computes."""
    weights = load_tiny_llama(tmp_path / "tiny")
    model = our_model(weights)
    ids = list(range(3, 40))
    whole = model.forward(torch.tensor([ids]), model.new_cache(64), 0, last_only=False)
    cache = model.new_cache(64)
    parts = [
        model.forward(torch.tensor([ids[i : i + 5]]), cache, i, last_only=False)
        for i in range(0, len(ids), 5)
    ]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-5)
    one = generate(model, model.new_cache(64), ids, 8, prefill_chunk=512)
    chunked = generate(model, model.new_cache(64), ids, 8, prefill_chunk=5)
    assert one.token_ids == chunked.token_ids


def test_safetensors_checkpoint_gives_the_same_tokens(
    smollm2_weights: Any, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """The same weights saved by transformers as safetensors + config.json load to the same model."""
    hf = hf_model(smollm2_weights)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "tokenizer.json").write_text(
        json.dumps(_hf_tokenizer_json(tokenizer, smollm2_weights.manifest.tokenizer["merges"]))
    )
    loaded = load_weights(resolve(f"file://{tmp_path}"), progress=False)
    assert dataclasses.replace(loaded.manifest.config, name="") == dataclasses.replace(
        smollm2_weights.manifest.config, name=""
    )
    ids = tokenizer.encode(PROMPT)
    from_st = generate(our_model(loaded), our_model(loaded).new_cache(64), ids, 4)
    from_gguf = generate(our_model(smollm2_weights), our_model(smollm2_weights).new_cache(64), ids, 4)
    assert from_st.token_ids == from_gguf.token_ids
    assert Tokenizer(loaded.manifest.tokenizer).encode(PROMPT) == ids


def _hf_tokenizer_json(tokenizer: Tokenizer, merges: list[str]) -> dict[str, Any]:
    """A minimal HF tokenizer.json for the same vocabulary (ByteLevel BPE with SmolLM's digit split)."""
    specials = sorted(tokenizer.special_ids)
    return {
        "added_tokens": [{"id": i, "content": tokenizer.tokens[i], "special": True} for i in specials],
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            ],
        },
        "decoder": {"type": "ByteLevel"},
        "model": {
            "type": "BPE",
            "vocab": {t: i for i, t in enumerate(tokenizer.tokens) if i not in tokenizer.special_ids},
            "merges": list(merges),
        },
    }


@pytest.mark.parametrize("shape", [(1, 576), (8, 576), (3, 5, 576)], ids=["decode 1", "decode 8", "3-d"])
def test_the_cpu_linear_kernel_computes_what_f_linear_does(shape: tuple[int, ...]) -> None:
    """The serving path's ``x @ w.T`` on CPU float32 (oneDNN where torch has it) against ``F.linear``,
    on a weight that is a view into a larger buffer, as the arena's are."""
    import torch.nn.functional as F

    from vnpu.runtime.model import linear_kernel

    g = torch.Generator().manual_seed(0)
    arena = torch.randn(2 * 1536 * 576, generator=g)
    weight = arena[1536 * 576 :].view(1536, 576)  # the second of two tensors packed back to back
    x = torch.randn(*shape, generator=g)
    linear = linear_kernel(torch.device("cpu"), torch.float32, vendor="AuthenticAMD")
    got, want = linear(x, weight), F.linear(x, weight)
    assert got.shape == want.shape == (*shape[:-1], 1536)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert linear_kernel(torch.device("cpu"), torch.bfloat16) is F.linear  # other dtypes: torch's own


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize(
    ("vendor", "kernel"),
    [
        ("GenuineIntel", "aten::mm"),
        ("AuthenticAMD", "mkldnn::_linear_pointwise"),
        ("", "mkldnn::_linear_pointwise"),
    ],
)
@pytest.mark.parametrize("rows", [1, 8])
def test_the_cpu_linear_kernel_is_mkl_on_intel_and_onednn_elsewhere(
    vendor: str, kernel: str, rows: int
) -> None:
    """Which library runs the GEMMs (MKL is the faster on Intel, oneDNN on AMD: see
    ``linear_kernel``), read from the ops torch records."""
    from torch.profiler import ProfilerActivity, profile

    from vnpu.runtime.model import linear_kernel

    linear = linear_kernel(torch.device("cpu"), torch.float32, vendor=vendor)
    weight, x = torch.randn(64, 32), torch.randn(rows, 32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        linear(x, weight)
    ran = {event.key for event in prof.key_averages()}
    other = "mkldnn::_linear_pointwise" if kernel == "aten::mm" else "aten::mm"
    assert kernel in ran
    assert other not in ran


def test_the_cpu_vendor_is_read_from_cpuinfo(tmp_path: Path) -> None:
    from vnpu.runtime.model import cpu_vendor

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert cpu_vendor(str(info)) == "AuthenticAMD"
    info.write_text("processor\t: 0\n")  # e.g. an arm64 kernel says no vendor_id
    assert cpu_vendor(str(info)) == ""
    assert cpu_vendor(str(tmp_path / "absent")) == ""
