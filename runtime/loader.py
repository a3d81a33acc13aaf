"""Load a checkpoint once into an arena: resolve -> read/dequantise -> pack -> write -> seal.

Peak memory is the arena plus one tensor: tensors are read one at a time and written straight to
their packed offset. Used by the weights-holder and by a standalone ``serve`` (no holder).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from dataclasses import dataclass

from tqdm import tqdm

from vnpu.runtime.arena import Arena, allocate
from vnpu.runtime.checkpoint import as_bytes, canonical_order, open_checkpoint
from vnpu.runtime.config import UnsupportedModelError
from vnpu.runtime.manifest import DTYPE_BYTES, WeightManifest, pack
from vnpu.runtime.sources import ResolvedSource
from vnpu.runtime.units import all_tensor_names


@dataclass
class LoadedWeights:
    manifest: WeightManifest
    arena: Arena
    seconds: float


def release_free_heap() -> None:
    """Give freed heap back to the OS (glibc keeps large freed blocks of the dequantisation otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def default_dtype(device: str) -> str:
    """float32 on CPU (fast and exact there); bfloat16 on accelerators."""
    return "float32" if device.startswith("cpu") else "bfloat16"


def load_weights(
    source: ResolvedSource, device: str = "cpu", dtype: str | None = None, progress: bool = True
) -> LoadedWeights:
    """Read ``source`` into a fresh sealed arena on ``device``; returns its manifest and the arena."""
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype!r} (choose from {sorted(DTYPE_BYTES)})")
    start = time.perf_counter()
    ckpt = open_checkpoint(source)
    arena: Arena | None = None
    try:
        shapes = ckpt.shapes()
        missing = all_tensor_names(ckpt.config) - shapes.keys()
        if missing:
            raise UnsupportedModelError(f"{source.uri}: missing tensors {sorted(missing)[:5]}")
        names = canonical_order(list(shapes), ckpt.config)
        entries, total = pack((n, dtype, shapes[n]) for n in names)
        arena = allocate(total, device)
        bar = tqdm(names, desc=f"loading {source.weights[0].name}", unit="tensor", disable=not progress)
        for name in bar:
            arena.write(entries[name].offset, as_bytes(ckpt.read(name), dtype))
        arena.seal()
        manifest = WeightManifest(
            ckpt.config, entries, total, source.uri, ckpt.tokenizer, header_digest=source.header_digest
        )
    except BaseException:
        if arena is not None:
            arena.close()
        raise
    finally:
        ckpt.close()
    release_free_heap()
    return LoadedWeights(manifest, arena, time.perf_counter() - start)
