"""How many KV blocks a replica's memory budget buys (pure: no torch, no I/O).

``VNPU_MEMORY_LIMIT_MIB`` is all a replica may use on its device. Fixed costs come first: the weights
this process owns (none when attached to a weights-holder, whose slices pay for them; the resident
part under offload), the activation estimate of one step at ``max_batch`` (:mod:`vnpu.memory`) and
the offload ring. What is left becomes the paged KV pool, as vLLM gives the KV cache everything left
after weights and activations — capped at ``max_batch`` sequences of ``max_context`` tokens, which is
all the scheduler can ever hold at once. The pool must hold one full ``max_context`` sequence (a
sequence that can never fit would preempt itself forever), or the process refuses to start with the
numbers in the message. Without a limit the pool is exactly ``max_batch`` x ``max_context`` tokens,
the CRD's ``maxBatch`` x ``maxContextTokens``. Block 0 (the null block) is paid on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vnpu import memory
from vnpu.runtime.errors import MemoryBudgetError
from vnpu.runtime.manifest import DTYPE_BYTES, WeightManifest

MIB = 1024 * 1024


@dataclass(frozen=True)
class KVBudget:
    """One process's device memory: the fixed terms and how many KV blocks the rest buys."""

    block_bytes: int
    max_context: int
    block_size: int
    max_batch: int
    limit_mib: int | None
    fixed: dict[str, int] = field(default_factory=dict)  #: activation, weights, offload_ring (bytes)
    override: int | None = None  #: a fixed number of usable blocks (``--kv-blocks``)

    @classmethod
    def of(
        cls,
        manifest: WeightManifest,
        *,
        own_weight_bytes: int,
        ring_bytes: int,
        max_context: int,
        max_batch: int,
        block_size: int,
        limit_mib: int | None,
        override: int | None = None,
    ) -> KVBudget:
        dtype_bytes = DTYPE_BYTES[next(iter(manifest.tensors.values())).dtype]
        activation = memory.default_activation_bytes(
            manifest.config.to_modelfile_config(), max_batch, dtype_bytes
        )
        return cls(
            block_bytes=manifest.config.kv_bytes_per_token(dtype_bytes) * block_size,
            max_context=max_context,
            block_size=block_size,
            max_batch=max_batch,
            limit_mib=limit_mib,
            fixed={"activation": activation, "weights": own_weight_bytes, "offload_ring": ring_bytes},
            override=override,
        )

    @property
    def blocks_per_sequence(self) -> int:
        return -(-self.max_context // self.block_size)

    @property
    def wanted_blocks(self) -> int:
        """``max_batch`` sequences of ``max_context`` tokens."""
        return self.max_batch * self.blocks_per_sequence

    def _room(self) -> tuple[int, int]:
        """(usable blocks the limit allows, bytes it leaves for the KV cache)."""
        if self.limit_mib is None:
            return self.wanted_blocks, self.wanted_blocks * self.block_bytes
        room = max(0, self.limit_mib * MIB - sum(self.fixed.values()) - self.block_bytes)  # - null block
        return min(self.wanted_blocks, room // self.block_bytes), room

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
        blocks, room = self._room()
        if blocks < one:
            detail = ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in self.fixed.items() if v)
            raise MemoryBudgetError(
                f"VNPU_MEMORY_LIMIT_MIB={self.limit_mib} is too small: after {detail} it leaves "
                f"{room / MIB:.2f} MiB for the KV cache, and one sequence of --max-context "
                f"{self.max_context} tokens needs {one * self.block_bytes / MIB:.2f} MiB; lower "
                "--max-context, enable offload, or raise the limit"
            )
        return int(blocks)

    def required(self) -> dict[str, int]:
        """Bytes this process needs, term by term (the pool at least one sequence, + the null block)."""
        blocks = (
            self.override if self.override is not None else max(self._room()[0], self.blocks_per_sequence)
        )
        return {"kv_cache": (blocks + 1) * self.block_bytes, **self.fixed}
