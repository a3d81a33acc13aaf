"""Where each weight lives inside one arena: the table a weights-holder hands to its replicas.

A model's tensors are packed back to back, each at an ``ALIGNMENT``-byte boundary, into one flat
buffer (the arena). The manifest records ``name -> (dtype, shape, offset)``; with it and the arena a
replica builds every parameter as a zero-copy view. Pure data, no I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vnpu.runtime.config import ModelConfig

#: 256 B keeps every tensor aligned for vector loads on CPUs and for GPU kernels' widest accesses.
ALIGNMENT = 256

#: Bytes per element of the dtypes an arena may hold (names as in torch / numpy).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass
class WeightManifest:
    """The model (config + tokenizer description) and the arena layout of its weights."""

    config: ModelConfig
    tensors: dict[str, TensorEntry]
    total_bytes: int
    source: str = ""
    tokenizer: dict[str, Any] = field(default_factory=dict)
    #: Digest of the source's headers (see ResolvedSource.header_digest); empty when unknown.
    header_digest: str = ""

    @property
    def dtype(self) -> str:
        """The arena's dtype (every tensor of an arena has the same one)."""
        return next(iter(self.tensors.values())).dtype if self.tensors else ""

    @property
    def weight_bytes(self) -> int:
        """Bytes of tensor data (without alignment padding)."""
        return sum(t.nbytes for t in self.tensors.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "tensors": [[t.name, t.dtype, list(t.shape), t.offset] for t in self.tensors.values()],
            "total_bytes": self.total_bytes,
            "source": self.source,
            "tokenizer": self.tokenizer,
            "header_digest": self.header_digest,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightManifest:
        tensors = {n: TensorEntry(n, d, tuple(s), o) for n, d, s, o in data["tensors"]}
        return cls(
            config=ModelConfig.from_dict(data["config"]),
            tensors=tensors,
            total_bytes=int(data["total_bytes"]),
            source=str(data.get("source", "")),
            tokenizer=dict(data.get("tokenizer", {})),
            header_digest=str(data.get("header_digest", "")),
        )


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def pack(
    specs: Iterable[tuple[str, str, tuple[int, ...]]], alignment: int = ALIGNMENT
) -> tuple[dict[str, TensorEntry], int]:
    """Lay ``(name, dtype, shape)`` tensors out back to back; returns the entries and the arena size."""
    entries: dict[str, TensorEntry] = {}
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"{name}: unsupported arena dtype {dtype!r}")
        if name in entries:
            raise ValueError(f"duplicate tensor {name!r}")
        entry = TensorEntry(name, dtype, tuple(int(d) for d in shape), offset)
        entries[name] = entry
        offset = align_up(offset + entry.nbytes, alignment)
    return entries, max(offset, alignment)
