"""How many KV blocks a replica's memory budget buys (pure: no torch, no I/O).

``VNPU_MEMORY_LIMIT_MIB`` is all a replica may use on its device. Fixed costs come first: the weights
this process owns (none when attached to a weights-holder, whose slices pay for them; the resident part
under offload), the activation estimate of one step of ``max_batch`` sequences at ``max_context``
(:mod:`vnpu.memory`: the attention's context gather included) and the offload ring. What is left becomes
the paged KV pool, as vLLM gives the KV cache everything left after weights and activations — capped at
``max_batch`` sequences of ``max_context`` tokens, which is all the scheduler can ever hold at once. The
pool must hold one full ``max_context`` sequence (a sequence that can never fit would preempt itself
forever), or the process refuses to start with the numbers in the message. Without a limit the pool is
exactly ``max_batch`` x ``max_context`` tokens, the CRD's ``maxBatch`` x ``maxContextTokens``. Block 0
(the null block) is paid on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vnpu import memory
from vnpu.modelfile import ModelConfig
from vnpu.runtime.errors import MemoryBudgetError

MIB = 1024 * 1024


@dataclass(frozen=True)
class KVBudget:
    """One process's device memory: the fixed terms, one step's activations, and how many KV blocks
    the rest buys.

    A step's activations are fixed except the attention's context gather, which grows with the pool:
    a step gathers, per layer, every decode sequence's blocks padded to the longest, and the sequences
    in a pool of ``n`` blocks hold ``n`` blocks between them. So a limit that buys fewer than
    ``max_batch`` full sequences reserves the gather of the pool it buys, not of the full batch.
    """

    block_bytes: int
    max_context: int
    block_size: int
    max_batch: int
    limit_mib: int | None
    fixed: dict[str, int] = field(default_factory=dict)  #: weights, offload_ring (bytes)
    step_bytes: int = 0  #: one step's activations but the context gather (:mod:`vnpu.memory`)
    gather_block_bytes: int = 0  #: the widest layer's keys and values of one block
    override: int | None = None  #: a fixed number of usable blocks (``--kv-blocks``)

    @classmethod
    def for_config(
        cls,
        config: ModelConfig,
        dtype_bytes: int,
        *,
        own_weight_bytes: int,
        ring_bytes: int,
        max_context: int,
        max_batch: int,
        block_size: int,
        limit_mib: int | None,
        override: int | None = None,
    ) -> KVBudget:
        """The budget of a model of ``config`` held at ``dtype_bytes`` (keys, values and activations)."""
        return cls(
            block_bytes=memory.kv_bytes_per_token(config, dtype_bytes) * block_size,
            max_context=max_context,
            block_size=block_size,
            max_batch=max_batch,
            limit_mib=limit_mib,
            fixed={"weights": own_weight_bytes, "offload_ring": ring_bytes},
            step_bytes=memory.default_activation_bytes(config, max_batch, 0, dtype_bytes),
            gather_block_bytes=memory.context_gather_bytes(config, block_size, 1, dtype_bytes),
            override=override,
        )

    @property
    def blocks_per_sequence(self) -> int:
        return -(-self.max_context // self.block_size)

    @property
    def wanted_blocks(self) -> int:
        """``max_batch`` sequences of ``max_context`` tokens."""
        return self.max_batch * self.blocks_per_sequence

    def gathered_blocks(self, blocks: int) -> int:
        """The most blocks one layer's gather copies in a step over a pool of ``blocks``
        (:func:`vnpu.memory.gathered_blocks`)."""
        return memory.gathered_blocks(blocks, self.max_batch, self.blocks_per_sequence)

    def activation(self, blocks: int) -> int:
        """One step's activations over a pool of ``blocks`` usable blocks."""
        return self.step_bytes + self.gathered_blocks(blocks) * self.gather_block_bytes

    def _needs(self, blocks: int) -> int:
        """Bytes a pool of ``blocks`` usable blocks costs with everything around it (+ the null block)."""
        return sum(self.fixed.values()) + self.activation(blocks) + (blocks + 1) * self.block_bytes

    def _room(self) -> int:
        """Usable blocks the limit allows (the most whose cost fits; costs grow with the pool)."""
        if self.limit_mib is None:
            return self.wanted_blocks
        low, high = 0, self.wanted_blocks
        if self._needs(0) > self.limit_mib * MIB:
            return 0
        while low < high:
            middle = (low + high + 1) // 2
            if self._needs(middle) <= self.limit_mib * MIB:
                low = middle
            else:
                high = middle - 1
        return low

    def blocks(self) -> int:
        """Usable blocks of the pool; raises MemoryBudgetError when one sequence does not fit."""
        one = self.blocks_per_sequence
        if self.override is not None:
            if self.override < one:
                raise MemoryBudgetError(
                    f"{self.override} KV blocks cannot hold one sequence of --max-context "
                    f"{self.max_context} tokens ({one} blocks)"
                )
            return self.override
        blocks = self._room()
        if blocks < one:
            assert self.limit_mib is not None
            terms = {"activation": self.activation(one), **self.fixed}
            detail = ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in terms.items() if v)
            room = max(0, self.limit_mib * MIB - sum(terms.values()) - self.block_bytes)
            raise MemoryBudgetError(
                f"VNPU_MEMORY_LIMIT_MIB={self.limit_mib} is too small: after {detail} it leaves "
                f"{room / MIB:.2f} MiB for the KV cache, and one sequence of --max-context "
                f"{self.max_context} tokens needs {one * self.block_bytes / MIB:.2f} MiB; lower "
                "--max-context, enable offload, or raise the limit"
            )
        return blocks

    def required(self) -> dict[str, int]:
        """Bytes this process needs, term by term (the pool at least one sequence, + the null block)."""
        blocks = self.override if self.override is not None else max(self._room(), self.blocks_per_sequence)
        return {
            "kv_cache": (blocks + 1) * self.block_bytes,
            "activation": self.activation(blocks),
            **self.fixed,
        }
