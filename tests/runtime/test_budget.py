"""The KV budget's arithmetic (pure): the context gather it reserves and the pool the limit buys."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnpu.api import DEFAULT_MAX_BATCH, DEFAULT_MAX_CONTEXT, KV_BLOCK_SIZE
from vnpu.memory import estimate_memory
from vnpu.modelfile import ModelConfig
from vnpu.runtime.budget import MIB, KVBudget
from vnpu.runtime.errors import MemoryBudgetError


def budget(max_batch: int, context_blocks: int, limit_mib: int | None = None) -> KVBudget:
    return KVBudget(
        block_bytes=64 * 1024,
        max_context=16 * context_blocks,
        block_size=16,
        max_batch=max_batch,
        limit_mib=limit_mib,
        fixed={"weights": 3 * MIB, "offload_ring": 0},
        step_bytes=MIB,
        gather_block_bytes=2 * 1024,
    )


@settings(max_examples=300, deadline=None)
@given(blocks=st.integers(0, 80), max_batch=st.integers(1, 20), context_blocks=st.integers(1, 20))
def test_the_gather_bound_is_the_largest_any_pool_of_that_size_can_gather(
    blocks: int, max_batch: int, context_blocks: int
) -> None:
    """Rows padded to the longest, ``w`` blocks: the rows hold ``w + r - 1`` blocks at least."""
    brute = max(
        (r * w for r in range(1, max_batch + 1) for w in range(1, context_blocks + 1) if w + r - 1 <= blocks),
        default=0,
    )
    assert budget(max_batch, context_blocks).gathered_blocks(blocks) == brute


def test_a_full_pool_reserves_the_full_batch_gather() -> None:
    full = budget(8, 10)
    assert full.gathered_blocks(full.wanted_blocks) == 8 * 10
    assert full.required()["activation"] == MIB + 80 * 2 * 1024


@settings(max_examples=200, deadline=None)
@given(limit_mib=st.integers(4, 16), max_batch=st.integers(1, 32), context_blocks=st.integers(1, 16))
def test_the_limit_buys_the_largest_pool_whose_costs_fit(
    limit_mib: int, max_batch: int, context_blocks: int
) -> None:
    b = budget(max_batch, context_blocks, limit_mib)
    one_sequence = replace(b, override=b.blocks_per_sequence)
    if sum(one_sequence.required().values()) > limit_mib * MIB:
        with pytest.raises(MemoryBudgetError, match="too small"):
            b.blocks()
        return
    blocks = b.blocks()
    assert sum(b.required().values()) <= limit_mib * MIB
    if blocks < b.wanted_blocks:
        more = replace(b, override=blocks + 1)
        assert sum(more.required().values()) > limit_mib * MIB


@st.composite
def llama_configs(draw: st.DrawFn) -> ModelConfig:
    """Llama-shaped configs across the range of real ones (GQA groups, head sizes, FFN widths)."""
    kv_heads = draw(st.sampled_from([1, 2, 4, 8, 16]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4, 7, 8]))
    head_dim = draw(st.sampled_from([64, 80, 128, 256]))
    hidden = heads * head_dim
    return ModelConfig(
        "llama",
        n_layers=draw(st.integers(1, 96)),
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=draw(st.integers(256, 260_000)),
        ffn_size=draw(st.integers(2, 5)) * hidden,
    )


def attached_replica(
    config: ModelConfig, dtype_bytes: int, context: int, batch: int, limit_mib: int
) -> KVBudget:
    """The budget of a replica attached to its holder (whose slices pay for the weights)."""
    return KVBudget.for_config(
        config,
        dtype_bytes,
        own_weight_bytes=0,
        ring_bytes=0,
        max_context=context,
        max_batch=batch,
        block_size=KV_BLOCK_SIZE,
        limit_mib=limit_mib,
    )


#: What the operator sizes a model pod from: its config, dtype, context, batch and the slice size.
SIZING = {
    "config": llama_configs(),
    "dtype_bytes": st.sampled_from([2, 4]),
    "context": st.integers(1, 32_768),
    "batch": st.integers(1, 64),
    "slice_mib": st.sampled_from([256, 512, 1024]),
}


@settings(max_examples=300, deadline=None)
@given(**SIZING)
def test_the_slices_the_operator_gives_a_replica_buy_the_runtime_its_whole_pool(
    config: ModelConfig,
    dtype_bytes: int,
    context: int,
    batch: int,
    slice_mib: int,
) -> None:
    """The operator sizes a replica (:mod:`vnpu.memory`, as its estimate cache calls it); the runtime
    under that limit gets ``maxBatch`` sequences of ``maxContextTokens``, not a few blocks fewer (which
    would preempt at full load what the spec promised to hold)."""
    estimate = estimate_memory(
        weights_mib=1,
        config=config,
        max_context_tokens=context,
        max_batch=batch,
        kv_dtype_bytes=dtype_bytes,
        block_size=KV_BLOCK_SIZE,
        slice_mib=slice_mib,
    )
    runtime = attached_replica(config, dtype_bytes, context, batch, estimate.replica_slices * slice_mib)
    assert runtime.blocks() == runtime.wanted_blocks


@settings(max_examples=300, deadline=None)
@given(
    config=llama_configs(),
    dtype_bytes=SIZING["dtype_bytes"],
    kv_cache_mib=st.integers(1, 64 * 1024),
    slice_mib=SIZING["slice_mib"],
)
def test_the_slices_the_operator_gives_a_replica_buy_the_runtime_the_pool_its_spec_gives(
    config: ModelConfig, dtype_bytes: int, kv_cache_mib: int, slice_mib: int
) -> None:
    """A spec that gives ``kvCacheMiB`` gives neither context nor batch (the CRD takes neither beside
    it): its replicas run at the runtime's defaults. Under the slices the operator gives one, the
    runtime's pool holds what ``kvCacheMiB`` buys in whole blocks (less the null block), or all its
    batch can use; a pool too small for one sequence is refused, and says so."""
    estimate = estimate_memory(
        weights_mib=1,
        config=config,
        kv_cache_mib=kv_cache_mib,
        kv_dtype_bytes=dtype_bytes,
        block_size=KV_BLOCK_SIZE,
        slice_mib=slice_mib,
    )
    runtime = attached_replica(
        config, dtype_bytes, DEFAULT_MAX_CONTEXT, DEFAULT_MAX_BATCH, estimate.replica_slices * slice_mib
    )
    asked = kv_cache_mib * MIB // runtime.block_bytes - 1
    try:
        blocks = runtime.blocks()
    except MemoryBudgetError:
        assert asked < runtime.blocks_per_sequence
        return
    assert blocks >= min(asked, runtime.wanted_blocks)


@settings(max_examples=300, deadline=None)
@given(
    **SIZING,
    weight_bytes=st.integers(1, 64 * 1024 * MIB),
    kv_cache_mib=st.none() | st.integers(1, 64 * 1024),
)
def test_the_slices_the_operator_gives_a_serving_holder_buy_it_one_sequence(
    config: ModelConfig,
    dtype_bytes: int,
    context: int,
    batch: int,
    weight_bytes: int,
    kv_cache_mib: int | None,
    slice_mib: int,
) -> None:
    """A weight-holder that answers requests (scale to zero) holds the weights and serves one sequence
    at the context length (``weights-holder --serve`` with ``VNPU_MAX_BATCH=1``) in the slices the
    operator gives it: the weights and ``holder_serving_mib``. The runtime under that limit must start
    (one sequence fits), or the model could never answer while scaled to zero; and for a spec that
    gives a pool, one sequence is all it takes (not the whole pool beside the weights)."""
    if kv_cache_mib is not None:  # a spec that gives the pool: the runtime's default context
        context = DEFAULT_MAX_CONTEXT
    estimate = estimate_memory(
        weights_mib=-(-weight_bytes // MIB),
        config=config,
        kv_cache_mib=kv_cache_mib,
        max_context_tokens=None if kv_cache_mib is not None else context,
        max_batch=None if kv_cache_mib is not None else batch,  # the CRD takes neither beside a pool
        kv_dtype_bytes=dtype_bytes,
        block_size=KV_BLOCK_SIZE,
        slice_mib=slice_mib,
    )
    holder_slices = -(-(estimate.device_weights_mib + estimate.holder_serving_mib) // slice_mib)
    holder = KVBudget.for_config(
        config,
        dtype_bytes,
        own_weight_bytes=weight_bytes,  # the holder's own arena
        ring_bytes=0,
        max_context=context,
        max_batch=1,
        block_size=KV_BLOCK_SIZE,
        limit_mib=holder_slices * slice_mib,
    )
    assert holder.blocks() == holder.wanted_blocks
