"""Where each weight lives inside one arena: the table a weights-holder hands to its replicas.

A model's tensors are packed back to back, each at an ``ALIGNMENT``-byte boundary, into one flat
buffer (the arena). The manifest records ``name -> (dtype, shape, offset)``; with it and the arena a
replica builds every parameter as a zero-copy view. Pure data, no I/O, no torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vnpu.api import ARENA_ALIGNMENT
from vnpu.runtime.config import ModelConfig

#: Every tensor's offset is a multiple of it (:data:`vnpu.api.ARENA_ALIGNMENT`).
ALIGNMENT = ARENA_ALIGNMENT

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
        """Parse what a holder sent (ValueError when it is not a manifest); whether the layout fits
        the arena is :func:`layout_problem`'s question."""
        tensors: dict[str, TensorEntry] = {}
        for n, d, s, o in data["tensors"]:
            if n in tensors:
                raise ValueError(f"duplicate tensor {n!r}")
            tensors[n] = TensorEntry(
                str(n), str(d), tuple(_int(x, f"{n}: shape") for x in s), _int(o, f"{n}: offset")
            )
        return cls(
            config=ModelConfig.from_dict(data["config"]),
            tensors=tensors,
            total_bytes=int(data["total_bytes"]),
            source=str(data.get("source", "")),
            tokenizer=dict(data.get("tokenizer", {})),
            header_digest=str(data.get("header_digest", "")),
        )


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return value


def layout_problem(manifest: WeightManifest, arena_bytes: int) -> str | None:
    """Why ``manifest`` does not describe an arena of ``arena_bytes`` laid out as :func:`pack` lays
    one out, or None when it does (pure). A replica asks before it makes views: a negative offset
    would alias other bytes (slicing counts from the end), overlapping tensors would share them, and
    neither fails on its own."""
    if manifest.total_bytes != arena_bytes:
        return f"it says the arena holds {manifest.total_bytes} bytes, the arena holds {arena_bytes}"
    spans = []
    for t in manifest.tensors.values():
        if t.dtype not in DTYPE_BYTES:
            return f"{t.name}: unknown dtype {t.dtype!r} (an arena holds {', '.join(DTYPE_BYTES)})"
        if any(d < 0 for d in t.shape):
            return f"{t.name}: negative dimension in shape {list(t.shape)}"
        if t.offset % ALIGNMENT:
            return f"{t.name}: offset {t.offset} is not a multiple of {ALIGNMENT}"
        if t.offset < 0 or t.offset + t.nbytes > arena_bytes:
            return (
                f"{t.name}: bytes [{t.offset}, {t.offset + t.nbytes}) lie outside the arena's {arena_bytes}"
            )
        spans.append((t.offset, t.offset + t.nbytes, t.name))
    spans.sort()
    # Sorted by start: if any two overlap, so do two neighbours.
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            return f"{other} overlaps {name}"
    return None


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
