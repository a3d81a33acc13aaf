"""The torch side of continuous batching: a paged KV cache and the layout of one forward step.

:class:`PagedKVCache` is one allocation holding every layer's keys and values as *slots*
(``block * block_size + offset``), handed out a block at a time by the scheduler's
:class:`~vnpu.runtime.scheduler.BlockAllocator`. A sequence's context is the list of its blocks, so
sequences of any length share one pool with no fragmentation beyond a block, and a finished or
preempted sequence gives its blocks back at once. Attention reads a sequence's context a whole block
at a time (one row copy per block instead of one per token). Block 0 is the *null block*: never handed
out, it pads the block tables of shorter sequences in a decode batch. Positions past a sequence's
length are masked out, but they must hold finite values (NaN + -inf and inf x 0 are NaN, so one
non-finite slot poisons every sequence that later gets its block): every block is zero-filled before
its first use (:meth:`PagedKVCache.initialise`), and the blocks of a sequence that may have written
non-finite keys or values (its logits were not finite, or its step failed) are zeroed before they go
back to the free list (:meth:`PagedKVCache.scrub`); otherwise a block holds finite values of earlier
sequences. On CPU the pool's pages therefore cost memory only once used.

:class:`BatchLayout` flattens one step's sequences into one token batch — single-token (decode)
sequences first, then prefill chunks — so every linear layer runs once per step for all of them (and
the offload engine streams each layer once per step). Attention is per sequence: decode sequences run
as one padded SDPA call over their gathered slots, each prefill chunk as its own call with a causal
mask offset by its cached past.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vnpu.api import KV_BLOCK_SIZE
from vnpu.runtime.config import ModelConfig

#: Block 0 is never allocated: zero-filled padding for gathers.
NULL_BLOCK = 0


class PagedKVCache:
    """Per-layer keys and values ``[num_blocks * block_size, kv_heads, head_dim]``, allocated once."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = KV_BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"a paged KV cache needs at least 2 blocks (one is the null block), got {num_blocks}"
            )
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        slots = num_blocks * block_size
        shape = (2, config.num_hidden_layers, slots, config.num_key_value_heads, config.head_dim)
        self.storage = torch.empty(shape, dtype=dtype, device=device)
        self.keys = list(self.storage[0].unbind(0))
        self.values = list(self.storage[1].unbind(0))
        self._initialised = 0  # blocks [0, _initialised) have been zero-filled
        self.initialise(NULL_BLOCK)

    def initialise(self, last_block: int) -> None:
        """Zero-fill every block up to ``last_block`` that never was (before a step uses them)."""
        if last_block >= self._initialised:
            end = (last_block + 1) * self.block_size
            self.storage[:, :, self._initialised * self.block_size : end].zero_()
            self._initialised = last_block + 1

    def scrub(self, blocks: Sequence[int]) -> None:
        """Zero ``blocks`` in every layer: what a failed sequence wrote there may not be finite, and the
        next sequence to get them reads their unused slots (see the module docstring)."""
        if blocks:
            index = torch.tensor(list(blocks), dtype=torch.long, device=self.device)
            per_block = self.storage.view(2, self.config.num_hidden_layers, self.num_blocks, -1)
            per_block.index_fill_(2, index, 0)

    def blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``layer`` as ``[num_blocks, block_size * kv_heads * head_dim]`` rows."""
        return (
            self.keys[layer].view(self.num_blocks, -1),
            self.values[layer].view(self.num_blocks, -1),
        )

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    def compatible(self, config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> bool:
        return (
            self.dtype == dtype
            and self.device == torch.device(device)
            and (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
            == (self.config.num_hidden_layers, self.config.num_key_value_heads, self.config.head_dim)
        )

    @staticmethod
    def bytes_per_block(config: ModelConfig, dtype_bytes: int, block_size: int = KV_BLOCK_SIZE) -> int:
        return config.kv_bytes_per_token(dtype_bytes) * block_size


@dataclass(frozen=True)
class StepSequence:
    """One sequence's part of a step: ``tokens`` to run at positions ``start...`` over its ``blocks``."""

    tokens: Sequence[int]
    start: int
    blocks: Sequence[int]
    sample: bool  #: whether the logits of its last token are wanted (prefill done or decoding)


@dataclass(frozen=True)
class PrefillSpan:
    """A multi-token chunk: rows [row, row + count) of the step, positions [start, start + count)."""

    row: int
    count: int
    start: int
    blocks: torch.Tensor  #: [n] the blocks holding positions [0, start + count), in order
    mask: torch.Tensor | None  #: [count, start + count] causal mask offset by the past; None: start 0


@dataclass(frozen=True)
class BatchLayout:
    """One forward step over a :class:`PagedKVCache` (see module docstring)."""

    input_ids: torch.Tensor  #: [T] new tokens, decode sequences first
    positions: torch.Tensor  #: [T]
    slots: torch.Tensor  #: [T] where each new token's key and value are written
    decode_count: int  #: rows [0, decode_count) are single-token sequences
    decode_blocks: torch.Tensor | None  #: [B, n] block table per decode sequence, null-padded
    decode_mask: torch.Tensor | None  #: [B, 1, 1, n * block_size] True where attended; None: all
    prefills: tuple[PrefillSpan, ...]
    sample_rows: torch.Tensor  #: [S] rows whose logits the step returns, in the order given
    last_block: int  #: the highest block id the step touches

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def build_layout(
    sequences: Sequence[StepSequence], block_size: int, device: str | torch.device = "cpu"
) -> tuple[BatchLayout, list[int]]:
    """The step's layout, and for each input sequence its index into the returned logits (-1: none).

    Decode sequences (one new token) are put first so their attention is one batched call.
    """
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].tokens) != 1)
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lengths: list[int] = []
    prefills: list[PrefillSpan] = []
    sample_rows: list[int] = []
    logit_index = [-1] * len(sequences)
    last_block = NULL_BLOCK
    for i in order:
        seq = sequences[i]
        count = len(seq.tokens)
        if count == 0:
            raise ValueError("a scheduled sequence must run at least one token")
        end = seq.start + count
        used = -(-end // block_size)
        if len(seq.blocks) < used:
            raise ValueError(f"{len(seq.blocks)} blocks cannot hold {end} positions")
        table = list(seq.blocks[:used])
        last_block = max(last_block, *table)
        row = len(ids)
        ids.extend(seq.tokens)
        positions.extend(range(seq.start, end))
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(seq.start, end))
        if count == 1:
            decode_tables.append(table)
            decode_lengths.append(end)
        else:
            mask = None
            if seq.start > 0:
                rows = torch.arange(seq.start, end)[:, None]
                mask = (torch.arange(end)[None, :] <= rows).to(device)
            blocks = torch.tensor(table, dtype=torch.long, device=device)
            prefills.append(PrefillSpan(row, count, seq.start, blocks, mask))
        if seq.sample:
            logit_index[i] = len(sample_rows)
            sample_rows.append(row + count - 1)
    decode_blocks = decode_mask = None
    if decode_tables:
        width = max(len(t) for t in decode_tables)
        padded = [t + [NULL_BLOCK] * (width - len(t)) for t in decode_tables]
        decode_blocks = torch.tensor(padded, dtype=torch.long, device=device)
        if any(n != width * block_size for n in decode_lengths):
            lengths = torch.tensor(decode_lengths)
            mask = torch.arange(width * block_size)[None, :] < lengths[:, None]
            decode_mask = mask[:, None, None, :].to(device)
    layout = BatchLayout(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slots=torch.tensor(slots, dtype=torch.long, device=device),
        decode_count=len(decode_tables),
        decode_blocks=decode_blocks,
        decode_mask=decode_mask,
        prefills=tuple(prefills),
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
        last_block=last_block,
    )
    return layout, logit_index
