"""The KV budget's arithmetic (pure): the context gather it reserves and the pool the limit buys."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
