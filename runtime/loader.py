"""Load a checkpoint once into an arena: resolve -> read/dequantise -> pack -> write -> seal.

Peak memory is the arena plus one tensor: tensors are read one at a time and written straight to
their packed offset. Used by the weights-holder and by a standalone ``serve`` (no holder).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from vnpu.runtime.arena import Arena, allocate
from vnpu.runtime.checkpoint import as_bytes, canonical_order, open_checkpoint
from vnpu.runtime.config import UnsupportedModelError
from vnpu.runtime.manifest import DTYPE_BYTES, TensorEntry, WeightManifest, pack
from vnpu.runtime.sources import ResolvedSource
from vnpu.runtime.units import all_tensor_names

log = logging.getLogger("vnpu.runtime.loader")

#: Seconds between progress lines in a log (not a terminal).
PROGRESS_LOG_INTERVAL_S = 10.0


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
        for name in _with_progress(names, entries, source.weights[0].name, progress, start):
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
    seconds = time.perf_counter() - start
    log.info(
        "weights loaded",
        extra={
            "source": source.uri,
            "device": device,
            "dtype": dtype,
            "mib": round(total / 2**20, 1),
            "seconds": round(seconds, 2),
        },
    )
    return LoadedWeights(manifest, arena, seconds)


def _with_progress(
    names: Sequence[str], entries: Mapping[str, TensorEntry], label: str, progress: bool, start: float
) -> Iterator[str]:
    """``names`` in order, showing how far the load is: a bar on a terminal; in a log (a pod's), a
    line every :data:`PROGRESS_LOG_INTERVAL_S`: the container runtime writes a log line at its newline
    (or in 16 KiB pieces), so a bar's carriage-return updates reach ``kubectl logs`` as one line once
    the load is done, and a load that seems stuck shows nothing. ``start``: when the load began
    (``time.perf_counter``), so its lines count the checkpoint's opening too, as ``weights loaded`` does."""
    if not progress:
        yield from names
        return
    if sys.stderr.isatty():
        yield from tqdm(names, desc=f"loading {label}", unit="tensor")
        return
    total = sum(entries[n].nbytes for n in names) or 1
    done, said = 0, time.perf_counter()
    _log_progress(label, 0, len(names), 0.0, said - start)
    for i, name in enumerate(names, 1):
        yield name
        done += entries[name].nbytes
        now = time.perf_counter()
        if now - said >= PROGRESS_LOG_INTERVAL_S and i < len(names):  # the end: "weights loaded"
            said = now
            _log_progress(label, i, len(names), 100 * done / total, now - start)


def _log_progress(label: str, done: int, count: int, percent: float, seconds: float) -> None:
    extra = {
        "source": label,
        "tensors": f"{done}/{count}",
        "percent": round(percent, 1),
        "seconds": round(seconds, 2),  # as "weights loaded" says it
    }
    log.info("loading weights", extra=extra)
