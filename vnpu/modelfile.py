"""Read model files' headers — safetensors and GGUF — without loading any tensor data.

The operator sizes a model from its files before anything runs: weight bytes (per dtype) come from the
tensor table in the header, and the architecture numbers the KV-cache formula needs (layers, KV heads,
head dim) come from GGUF metadata or from the ``config.json`` beside a safetensors checkpoint. Only the
header bytes are read, so sizing a 30 GB checkpoint costs kilobytes of I/O for safetensors and a few
megabytes for GGUF (whose header carries the tokenizer's vocabulary, skipped rather than kept).

A header is untrusted input to a process with little memory (the operator runs in 512Mi): what a parse
may read and keep is bounded (the ``MAX_*`` limits below), well above any real model's header, and
anything past a limit is a ``ValueError`` or, for long GGUF values, a summary.

Pure Python on purpose (no numpy, torch or gguf): the operator image stays small. Every malformed or
truncated input raises ``ValueError`` with the file and what is wrong; nothing else escapes the parsers.

Every file is opened through :func:`_open_model_file`: a regular file only (a FIFO would block the
operator's pass, a device or directory is no header), opened without blocking, and, given a ``root``
(the directory the source was allowed under), only when it resolves inside it: a checkpoint's files
are its author's, and a symlink among them must not lead the operator to another tenant's files or
its own. Links within the root stay fine (a Hugging Face cache's snapshots link into its ``blobs``).

Formats (see notes/runtime.md §6):

* safetensors: u64 little-endian header length N, N bytes of JSON ``{name: {dtype, shape,
  data_offsets: [start, end]}, "__metadata__": {str: str}}``, then the data; offsets are relative to
  the end of the header and tile the data region contiguously.
* GGUF v2/v3: ``GGUF`` magic, u32 version, u64 tensor count, u64 metadata count, typed key/value
  metadata, tensor infos (name, dims, ggml type, offset), then data aligned to ``general.alignment``.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

MIB = 1024 * 1024

Format = Literal["safetensors", "gguf"]

#: safetensors dtype -> bits per element (sub-byte types are packed).
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

#: ggml tensor type id -> (name, elements per block, bytes per block), from the block layouts of ggml.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}

#: The safetensors library accepts JSON headers up to 100 MB, but parsed JSON takes up to ~12 times its
#: size in Python objects (measured: short keys or numbers), and the operator runs in 512Mi. Real headers
#: hold ~150 bytes a tensor, hundreds of kilobytes at most (a shard of a large MoE: a few thousand
#: tensors), so 8 MiB is ample and bounds a parse to ~100 MiB.
MAX_SAFETENSORS_HEADER = 8 * MIB
#: Tensors one file may describe (safetensors or GGUF): real files hold hundreds to a few thousand; each
#: costs up to ~1 KB while parsed. Also bounds the JSON objects and arrays a safetensors header may hold.
MAX_TENSORS_PER_FILE = 65_536
#: GGUF headers are bigger (the tokenizer's vocabulary and merges: ~2 MB for 50k tokens, ~12 MB for the
#: largest vocabularies) but mostly skipped, not kept; past this many bytes a header is refused. With the
#: limits below a parse keeps ~150 MiB at worst (measured apart: ~65 MiB for a header of keys or kept
#: strings, ~40 MiB for MAX_KEPT_ITEMS, ~30 MiB for MAX_TENSORS_PER_FILE).
MAX_GGUF_HEADER = 64 * MIB
#: GGUF metadata entries at most (real files hold tens).
MAX_GGUF_METADATA = 65_536
#: The GGUF spec's limit on a metadata key (tensor names, limited to 64 bytes by ggml, get the same bound).
MAX_GGUF_KEY = 65_535
#: GGUF metadata arrays longer than this are kept as a :class:`ArraySummary` (type + length) only.
MAX_KEPT_ARRAY = 1024
#: GGUF metadata strings longer than this (bytes) are kept as a :class:`StringSummary` only; chat
#: templates, the longest real ones, are tens of kilobytes.
MAX_KEPT_STRING = MIB
#: Array items a GGUF header may keep in all (each costs ~40 bytes as a Python object; the short arrays
#: real files keep, per-layer counts and tags, hold hundreds).
MAX_KEPT_ITEMS = 1 << 20
#: The largest layer count, head count or dimension a model config may claim (the CRD's own largest
#: bound, hidden_size's); real models stay far below it.
MAX_CONFIG_DIMENSION = 1 << 20
#: The bounds above are per file; these bound a whole checkpoint (a directory of shards), so that its
#: files' kept headers together stay within what one file's parse may hold. Real checkpoints stay far
#: below: the largest open ones (DeepSeek-V3/R1, Kimi-K2) have 60-170 shards and ~100k tensors.
MAX_MODEL_FILES = 1024
MAX_MODEL_TENSORS = 1 << 18
#: Bytes of tensor names and safetensors ``__metadata__`` strings kept over all of a model's files.
MAX_MODEL_KEPT_BYTES = 64 * MIB
#: Header bytes a parse may walk over all of a model's files: a file's header is bounded, but walking
#: 64 MiB of GGUF metadata takes seconds of the operator's pass, and a split set of 1024 links to one
#: such file took hours. Real checkpoints walk a few MB (a GGUF's first split holds the tokenizer).
MAX_MODEL_HEADER_BYTES = 2 * MAX_GGUF_HEADER
#: ``model.safetensors.index.json``: ~100 bytes a tensor in real ones (a few MB). Its entries are
#: counted before the JSON is built, as a safetensors header's are.
MAX_SHARD_INDEX = 32 * MIB
#: ``config.json``: a few KiB in real models (classifiers with large label maps reach a few hundred).
MAX_CONFIG_FILE = 4 * MIB
#: Dimensions of one tensor (ggml has 4, real safetensors weights at most 5), each below 2**63 (the
#: formats' own u64/usize, torch's int64). A shape is kept for as long as the model's estimate is, in
#: every file of a checkpoint: unbounded, one 8 MiB header of ``"shape": [0, 0, ...]`` kept ~32 MiB.
MAX_TENSOR_DIMS = 8
MAX_TENSOR_DIM = (1 << 63) - 1
_MAX_ARRAY_DEPTH = 8


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a header: no data is read."""

    name: str
    dtype: str  #: safetensors dtype ("BF16") or ggml type name ("Q4_1")
    shape: tuple[int, ...]  #: safetensors order; GGUF keeps ggml order (fastest-varying first)
    nbytes: int
    offset: int  #: absolute byte offset of the data in its file
    file: str = ""  #: the file holding the data (for sharded checkpoints)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ArraySummary:
    """A long GGUF metadata array (e.g. the tokenizer vocabulary) kept as its item type and length."""

    item_type: str
    length: int


@dataclass(frozen=True)
class StringSummary:
    """A GGUF metadata string longer than :data:`MAX_KEPT_STRING` bytes, kept as its length only."""

    length: int


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers that size a decoder's memory; general across GGUF and HF configs.

    ``n_kv_heads`` is the largest per-layer count; ``kv_heads_per_layer`` is set only where layers
    differ. ``kv_lora_rank``/``qk_rope_head_dim`` are set for multi-head latent attention (DeepSeek),
    whose cache holds one latent of that width per token and layer instead of K and V.
    """

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int | None = None
    context_length: int | None = None
    ffn_size: int | None = None
    dtype: str | None = None  #: declared weight dtype ("bfloat16"; for GGUF the dominant ggml type)
    value_head_dim: int | None = None  #: when V's head dim differs from K's
    kv_heads_per_layer: tuple[int, ...] | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    tie_word_embeddings: bool | None = None
    rope_theta: float | None = None
    norm_eps: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
            if value > MAX_CONFIG_DIMENSION:
                # Sizing builds per-layer tuples: a header claiming 2**62 layers must not exhaust memory.
                raise ValueError(
                    f"model config: {name} {value} is beyond any model (> {MAX_CONFIG_DIMENSION})"
                )
        # Optional counts and widths: absent (None) or positive, as at the parse edge (which names the
        # source's key); all but the context length within the same bound as head_dim (the estimate
        # multiplies them into bytes and divides by a MiB as a float: 10**400 is an OverflowError).
        for name in (
            "vocab_size",
            "context_length",
            "ffn_size",
            "value_head_dim",
            "kv_lora_rank",
            "qk_rope_head_dim",
        ):
            value = _as_int(getattr(self, name), name)
            if value is not None and name != "context_length" and value > MAX_CONFIG_DIMENSION:
                raise ValueError(
                    f"model config: {name} {value} is beyond any model (> {MAX_CONFIG_DIMENSION})"
                )
        if self.kv_heads_per_layer is not None and len(self.kv_heads_per_layer) != self.n_layers:
            raise ValueError(
                f"model config: {len(self.kv_heads_per_layer)} per-layer KV head counts "
                f"for {self.n_layers} layers"
            )


@dataclass(frozen=True)
class ModelFileInfo:
    """What the headers of a model's file(s) say: tensors, metadata and (when derivable) the config."""

    format: Format
    paths: tuple[str, ...]
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)  #: GGUF key/values or safetensors __metadata__
    config: ModelConfig | None = None
    config_error: str | None = None  #: why ``config`` is None (no config.json, unusable metadata)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def weight_mib(self) -> int:
        """Weight size in whole MiB, rounded up."""
        return -(-self.total_bytes // MIB)

    @property
    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return dict(sorted(out.items()))

    @property
    def param_count(self) -> int:
        return sum(t.numel for t in self.tensors)

    def layer_bytes(self) -> dict[int, int]:
        """Bytes per transformer block, keyed by block index (tensors outside blocks are left out)."""
        out: dict[int, int] = {}
        for t in self.tensors:
            index = layer_index(t.name)
            if index is not None:
                out[index] = out.get(index, 0) + t.nbytes
        return out


_LAYER_NAME = re.compile(r"(?:^|\.)(?:blk|layers|layer|h|block|blocks)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The block index in a tensor name (``blk.3.attn_q.weight``, ``model.layers.3.mlp...``), or None."""
    m = _LAYER_NAME.search(tensor_name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------
# Bounded binary reading


class _Reader:
    """Sequential reads from a binary stream of known size; running past the end, or past ``limit``
    (the most header bytes a parse may walk), is a ValueError."""

    def __init__(
        self, stream: BinaryIO, size: int, name: str, byteorder: str = "<", limit: int | None = None
    ) -> None:
        self.stream = stream
        self.size = size
        self.name = name
        self.pos = 0
        self.byteorder = byteorder
        self.limit = size if limit is None else limit
        self.kept_items = 0  #: array items kept so far (GGUF metadata)

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def _check(self, n: int) -> None:
        if self.pos + n > self.limit:
            raise ValueError(
                f"{self.name}: header runs past {self.limit} bytes (at offset {self.pos}, {n} more): "
                "larger than any model's; the file is corrupt or hostile"
            )

    def read(self, n: int) -> bytes:
        if n < 0 or n > self.remaining:
            raise ValueError(
                f"{self.name}: truncated: needs {n} bytes at offset {self.pos}, {self.remaining} left"
            )
        self._check(n)
        data = self.stream.read(n)
        if len(data) != n:
            raise ValueError(f"{self.name}: truncated at offset {self.pos + len(data)}")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if n < 0 or n > self.remaining:
            raise ValueError(f"{self.name}: truncated: cannot skip {n} bytes at offset {self.pos}")
        self._check(n)
        self.stream.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, fmt: str) -> Any:
        st = struct.Struct(self.byteorder + fmt)
        return st.unpack(self.read(st.size))[0]

    def u32(self) -> int:
        return int(self.unpack("I"))

    def u64(self) -> int:
        return int(self.unpack("Q"))

    def string(self, limit: int | None = None, what: str = "string") -> str:
        """A length-prefixed UTF-8 string; longer than ``limit`` bytes is a ValueError (checked before
        anything is read)."""
        n = self.u64()
        if limit is not None and n > limit:
            raise ValueError(f"{self.name}: {what} at offset {self.pos} is {n} bytes long (at most {limit})")
        return self.text(n)

    def text(self, n: int) -> str:
        """The next ``n`` bytes as UTF-8."""
        raw = self.read(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.name}: string at offset {self.pos - n} is not UTF-8") from exc


def _stream_size(stream: BinaryIO) -> int:
    here = stream.tell()
    end = stream.seek(0, os.SEEK_END)
    stream.seek(here)
    return end - here


# ---------------------------------------------------------------------------------------------------
# safetensors


def parse_safetensors(
    stream: BinaryIO, size: int | None = None, name: str = "<safetensors>"
) -> tuple[tuple[TensorInfo, ...], dict[str, str]]:
    """Parse a safetensors header from ``stream`` (positioned at the file start).

    Returns the tensors (offsets absolute in the file) and the ``__metadata__`` map. ``size`` is the
    file size (taken from the stream when None) and is used to detect truncated files.
    """
    if size is None:
        size = _stream_size(stream)
    reader = _Reader(stream, size, name)
    header_len = reader.u64()
    if header_len > MAX_SAFETENSORS_HEADER:
        raise ValueError(
            f"{name}: header length {header_len} exceeds {MAX_SAFETENSORS_HEADER} bytes "
            "(real headers are at most a few MB)"
        )
    raw = reader.read(header_len)
    # Each tensor is one JSON object and two arrays: count them before json.loads builds them (a
    # header of "[]" or "{}" alone would make ~20 times its size in Python objects).
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > 3 * MAX_TENSORS_PER_FILE + 2:
        raise ValueError(
            f"{name}: header holds {containers} JSON objects and arrays, more than "
            f"{MAX_TENSORS_PER_FILE} tensors need"
        )
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{name}: header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{name}: header must be a JSON object, got {type(header).__name__}")
    data_start = 8 + header_len
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError(f"{name}: __metadata__ must map strings to strings")
    tensors = []
    for tname, entry in header.items():
        tensors.append(_safetensors_entry(name, tname, entry, data_start))
    # The data region is tiled by the tensors in offset order, with no gap or overlap.
    expected = 0
    for t in sorted(tensors, key=lambda t: (t.offset, t.nbytes)):
        start = t.offset - data_start
        if start != expected:
            raise ValueError(
                f"{name}: tensor {t.name!r} starts at data offset {start}, expected {expected} "
                "(offsets overlap or leave a gap)"
            )
        expected = start + t.nbytes
    if expected > data_len:
        raise ValueError(f"{name}: truncated: tensors need {expected} data bytes, file holds {data_len}")
    tensors.sort(key=lambda t: t.offset)
    return tuple(tensors), dict(metadata)


def _safetensors_entry(name: str, tname: str, entry: Any, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise ValueError(f"{name}: tensor {tname!r} must be an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise ValueError(f"{name}: tensor {tname!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
        raise ValueError(f"{name}: tensor {tname!r} shape must be a list of non-negative integers")
    if len(shape) > MAX_TENSOR_DIMS or any(d > MAX_TENSOR_DIM for d in shape):
        raise ValueError(
            f"{name}: tensor {tname!r} shape has {len(shape)} dimensions (at most {MAX_TENSOR_DIMS}, "
            f"each at most {MAX_TENSOR_DIM}): no model's tensor; the file is corrupt or hostile"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_nonneg_int(o) for o in offsets)):
        raise ValueError(f"{name}: tensor {tname!r} data_offsets must be [start, end]")
    start, end = offsets
    nbytes = -(-math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype] // 8)
    if end - start != nbytes:
        raise ValueError(
            f"{name}: tensor {tname!r} spans {end - start} bytes but {dtype}{shape} needs {nbytes}"
        )
    return TensorInfo(tname, dtype, tuple(shape), nbytes, data_start + start)


def _is_nonneg_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# ---------------------------------------------------------------------------------------------------
# GGUF

#: GGUF metadata value type -> (name, struct format or None for string/array).
_GGUF_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "B"),
    1: ("INT8", "b"),
    2: ("UINT16", "H"),
    3: ("INT16", "h"),
    4: ("UINT32", "I"),
    5: ("INT32", "i"),
    6: ("FLOAT32", "f"),
    7: ("BOOL", "?"),
    8: ("STRING", None),
    9: ("ARRAY", None),
    10: ("UINT64", "Q"),
    11: ("INT64", "q"),
    12: ("FLOAT64", "d"),
}
_GGUF_MIN_VALUE_SIZE = {8: 8, 9: 12}  # a string holds at least its length; an array its type + count


def parse_gguf(
    stream: BinaryIO, size: int | None = None, name: str = "<gguf>"
) -> tuple[tuple[TensorInfo, ...], dict[str, Any]]:
    """Parse a GGUF header from ``stream`` (positioned at the file start): tensors and metadata.

    Metadata arrays longer than :data:`MAX_KEPT_ARRAY` become :class:`ArraySummary` values, strings
    longer than :data:`MAX_KEPT_STRING` :class:`StringSummary` values. Tensor offsets are absolute;
    tensors running past ``size`` (the file size) are reported as truncation. Headers past the
    ``MAX_GGUF_*`` limits are a ValueError.
    """
    if size is None:
        size = _stream_size(stream)
    reader = _Reader(stream, size, name, limit=MAX_GGUF_HEADER)
    if reader.read(4) != b"GGUF":
        raise ValueError(f"{name}: not a GGUF file (bad magic)")
    raw_version = reader.read(4)
    version = struct.unpack("<I", raw_version)[0]
    if version not in (2, 3):
        swapped = struct.unpack(">I", raw_version)[0]
        if swapped not in (2, 3):
            raise ValueError(f"{name}: unsupported GGUF version {version} (only v2 and v3 are read)")
        reader.byteorder, version = ">", swapped
    n_tensors, n_kv = reader.u64(), reader.u64()
    if n_kv * 13 > reader.remaining:  # key length (8) + key (>= 1) + value type (4) + value (>= 0)
        raise ValueError(f"{name}: truncated: {n_kv} metadata entries cannot fit in {reader.remaining} bytes")
    if n_kv > MAX_GGUF_METADATA:
        raise ValueError(f"{name}: {n_kv} metadata entries (at most {MAX_GGUF_METADATA})")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = reader.string(MAX_GGUF_KEY, "metadata key")
        value_type = reader.u32()
        metadata[key] = _gguf_value(reader, value_type, 0)
    if n_tensors * 24 > reader.remaining:  # name length (8) + n_dims (4) + type (4) + offset (8)
        raise ValueError(
            f"{name}: truncated: {n_tensors} tensor infos cannot fit in {reader.remaining} bytes"
        )
    if n_tensors > MAX_TENSORS_PER_FILE:
        raise ValueError(f"{name}: {n_tensors} tensors in one file (at most {MAX_TENSORS_PER_FILE})")
    infos = []
    for _ in range(n_tensors):
        tname = reader.string(MAX_GGUF_KEY, "tensor name")
        n_dims = reader.u32()
        if n_dims > MAX_TENSOR_DIMS:
            raise ValueError(f"{name}: tensor {tname!r} has {n_dims} dimensions (at most {MAX_TENSOR_DIMS})")
        dims = tuple(reader.u64() for _ in range(n_dims))
        type_id = reader.u32()
        offset = reader.u64()
        infos.append((tname, dims, type_id, offset))
    alignment = metadata.get("general.alignment", 32)
    if (
        isinstance(alignment, bool)
        or not isinstance(alignment, int)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        raise ValueError(f"{name}: general.alignment must be a positive power of two, got {alignment!r}")
    data_start = -(-reader.pos // alignment) * alignment
    tensors = []
    for tname, dims, type_id, offset in infos:
        if type_id not in GGML_TYPES:
            raise ValueError(f"{name}: tensor {tname!r} has unknown ggml type {type_id}")
        type_name, block, block_bytes = GGML_TYPES[type_id]
        if dims and dims[0] % block:
            raise ValueError(
                f"{name}: tensor {tname!r} row of {dims[0]} is not a multiple of {type_name} blocks"
            )
        if offset % alignment:
            raise ValueError(f"{name}: tensor {tname!r} offset {offset} is not aligned to {alignment}")
        nbytes = math.prod(dims) // block * block_bytes
        end = data_start + offset + nbytes
        if end > size:
            raise ValueError(f"{name}: truncated: tensor {tname!r} ends at byte {end}, file has {size}")
        tensors.append(TensorInfo(tname, type_name, dims, nbytes, data_start + offset))
    return tuple(tensors), metadata


def _gguf_value(reader: _Reader, value_type: int, depth: int) -> Any:
    if value_type not in _GGUF_VALUE_TYPES:
        raise ValueError(f"{reader.name}: unknown metadata value type {value_type} at offset {reader.pos}")
    fmt = _GGUF_VALUE_TYPES[value_type][1]
    if fmt is not None:
        return reader.unpack(fmt)
    if value_type == 8:
        length = reader.u64()
        if length > MAX_KEPT_STRING:
            reader.skip(length)
            return StringSummary(length)
        return reader.text(length)
    if depth >= _MAX_ARRAY_DEPTH:
        raise ValueError(f"{reader.name}: metadata arrays nested deeper than {_MAX_ARRAY_DEPTH}")
    item_type = reader.u32()
    count = reader.u64()
    if item_type not in _GGUF_VALUE_TYPES:
        raise ValueError(f"{reader.name}: unknown array item type {item_type} at offset {reader.pos}")
    item_name, item_fmt = _GGUF_VALUE_TYPES[item_type]
    item_min = struct.calcsize(item_fmt) if item_fmt else _GGUF_MIN_VALUE_SIZE[item_type]
    if count * item_min > reader.remaining:
        raise ValueError(f"{reader.name}: truncated: array of {count} {item_name} at offset {reader.pos}")
    if count > MAX_KEPT_ARRAY:
        if item_fmt is not None:
            reader.skip(count * item_min)
        else:
            for _ in range(count):
                _skip_gguf_value(reader, item_type, depth + 1)
        return ArraySummary(item_name, count)
    reader.kept_items += count
    if reader.kept_items > MAX_KEPT_ITEMS:
        raise ValueError(f"{reader.name}: metadata arrays keep more than {MAX_KEPT_ITEMS} items in all")
    if item_fmt is not None:
        return list(struct.unpack(f"{reader.byteorder}{count}{item_fmt}", reader.read(count * item_min)))
    return [_gguf_value(reader, item_type, depth + 1) for _ in range(count)]


def _skip_gguf_value(reader: _Reader, value_type: int, depth: int) -> None:
    if value_type == 8:
        reader.skip(reader.u64())
    else:
        _gguf_value(reader, value_type, depth)


# ---------------------------------------------------------------------------------------------------
# Model configs


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = mapping.get(key)
        if value is not None:
            return value
    return None


def _as_int(value: Any, what: str) -> int | None:
    """A count or width of a model config, None when absent. Zero or negative would make the memory
    formulas shrink or go negative (a replica sized below its needs), so it is refused here."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"model config: {what} must be an integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"model config: {what} must be a positive integer, got {value}")
    return value


def _first_key(mapping: Mapping[str, Any], *keys: str) -> str | None:
    """The first of ``keys`` that ``mapping`` sets (to anything but None)."""
    return next((key for key in keys if mapping.get(key) is not None), None)


def _config_int(config: Mapping[str, Any], *keys: str) -> int | None:
    """The first of ``keys`` that ``config`` sets, as a positive integer; an error names that key."""
    key = _first_key(config, *keys)
    return None if key is None else _as_int(config[key], key)


def _as_float(value: Any) -> float | None:
    """A JSON number as a float (an integer past a float's range as infinity, which the runtime then
    refuses by name: JSON integers have no bound), else None."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from a Hugging Face ``config.json`` dict (any decoder-style family).

    Multimodal configs that nest the language model under ``text_config`` are read from there.
    Missing ``num_key_value_heads`` means multi-head attention (one KV head per query head).
    """
    if not isinstance(config, Mapping):
        raise ValueError("model config: config.json must be a JSON object")
    text = config.get("text_config")
    if isinstance(text, Mapping) and _first(config, "num_hidden_layers", "n_layer", "num_layers") is None:
        merged = {k: v for k, v in config.items() if k in ("torch_dtype", "dtype", "model_type")}
        merged.update(text)
        return config_from_hf(merged)
    architectures = config.get("architectures")
    arch = config.get("model_type") or (
        architectures[0] if isinstance(architectures, list) and architectures else ""
    )
    n_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    n_heads = _config_int(config, "num_attention_heads", "n_head", "num_heads", "n_heads")
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model", "dim")
    if n_layers is None or n_heads is None or hidden is None:
        raise ValueError(
            "model config: needs the number of layers (num_hidden_layers), attention heads "
            "(num_attention_heads) and hidden size (hidden_size)"
        )
    n_kv = _config_int(config, "num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num")
    if n_kv is None:
        n_kv = 1 if config.get("multi_query") is True else n_heads
    head_dim = _config_int(config, "head_dim") or hidden // n_heads
    ffn_key = (
        _first_key(config, "intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim")
        or "intermediate_size"
    )
    ffn = config.get(ffn_key)
    if isinstance(ffn, list):  # per-layer FFN widths (some families): the widest sizes the memory
        ffn = max(ffn) if ffn and all(_is_nonneg_int(v) for v in ffn) else None
    ffn_size = _as_int(ffn, ffn_key)
    kv_lora_rank = _config_int(config, "kv_lora_rank")
    return ModelConfig(
        architecture=str(arch),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=_config_int(config, "vocab_size", "padded_vocab_size"),
        context_length=_config_int(
            config,
            "max_position_embeddings",
            "n_positions",
            "max_seq_len",
            "seq_length",
            "max_sequence_length",
        ),
        ffn_size=ffn_size,
        dtype=_first(config, "torch_dtype", "dtype"),
        value_head_dim=_config_int(config, "v_head_dim") if kv_lora_rank is None else None,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=_config_int(config, "qk_rope_head_dim") if kv_lora_rank else None,
        tie_word_embeddings=config.get("tie_word_embeddings")
        if isinstance(config.get("tie_word_embeddings"), bool)
        else None,
        rope_theta=_as_float(config.get("rope_theta")),
        norm_eps=_as_float(_first(config, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")),
    )


def config_from_gguf_metadata(metadata: Mapping[str, Any], tensors: Iterable[TensorInfo] = ()) -> ModelConfig:
    """A :class:`ModelConfig` from GGUF metadata (``<arch>.block_count``, ``<arch>.attention.*``, ...).

    The vocabulary size falls back to the tokenizer's token count; the dtype is the ggml type holding
    the most bytes. Per-layer arrays (some architectures vary KV heads per layer) are honoured.
    """
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError("GGUF metadata: general.architecture is missing")

    def get(key: str) -> Any:
        return metadata.get(f"{arch}.{key}")

    def per_layer_max(key: str) -> tuple[int | None, tuple[int, ...] | None]:
        value = get(key)
        if isinstance(value, list):
            if not value or not all(_is_nonneg_int(v) for v in value):
                raise ValueError(f"GGUF metadata: {arch}.{key} must hold non-negative integers")
            return _as_int(max(value), f"{arch}.{key}"), tuple(value) if len(set(value)) > 1 else None
        return get_int(key), None

    def get_int(key: str) -> int | None:
        return _as_int(get(key), f"{arch}.{key}")

    n_layers = get_int("block_count")
    n_heads, _ = per_layer_max("attention.head_count")
    n_kv, kv_per_layer = per_layer_max("attention.head_count_kv")
    hidden = get_int("embedding_length")
    if n_layers is None or n_heads is None or hidden is None:
        raise ValueError(
            f"GGUF metadata: needs {arch}.block_count, {arch}.attention.head_count "
            f"and {arch}.embedding_length"
        )
    head_dim = get_int("attention.key_length") or hidden // n_heads
    value_dim = get_int("attention.value_length")
    vocab = get_int("vocab_size")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if vocab is None and isinstance(tokens, ArraySummary | list):
        vocab = (tokens.length if isinstance(tokens, ArraySummary) else len(tokens)) or None
    ffn, _ = per_layer_max("feed_forward_length")
    kv_lora_rank = get_int("attention.kv_lora_rank")
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t.dtype] = by_type.get(t.dtype, 0) + t.nbytes
    if kv_per_layer is not None and len(kv_per_layer) != n_layers:
        raise ValueError(
            f"GGUF metadata: {arch}.attention.head_count_kv has {len(kv_per_layer)} entries "
            f"for {n_layers} blocks"
        )
    return ModelConfig(
        architecture=arch,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv if n_kv is not None else n_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=vocab,
        context_length=get_int("context_length"),
        ffn_size=ffn,
        dtype=max(by_type, key=lambda k: (by_type[k], k)) if by_type else None,
        value_head_dim=value_dim if value_dim not in (None, head_dim) and kv_lora_rank is None else None,
        kv_heads_per_layer=kv_per_layer,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=get_int("rope.dimension_count") if kv_lora_rank else None,
        tie_word_embeddings=None if not by_type else not any(t.name == "output.weight" for t in tensors),
        rope_theta=_as_float(get("rope.freq_base")),
        norm_eps=_as_float(
            _first(
                metadata, f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.layer_norm_epsilon"
            )
        ),
    )


def read_hf_config(
    path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> ModelConfig:
    """Read a ``config.json`` file into a :class:`ModelConfig` (``root``: as for :func:`read_model_file`)."""
    p = Path(path)
    with _open_model_file(p, p.parent, root) as f:
        try:
            raw = f.read(MAX_CONFIG_FILE + 1)
        except OSError as exc:
            raise ValueError(f"{path}: cannot read model config: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_FILE:  # read whole, an endless one would take the operator's memory
        raise ValueError(f"{path}: model config larger than {MAX_CONFIG_FILE} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: cannot read model config: {exc}") from exc
    try:
        return config_from_hf(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------
# Files and directories


def read_safetensors_file(path: str | os.PathLike[str]) -> ModelFileInfo:
    """Header of one safetensors file (plus ``config.json`` beside it, when present)."""
    return read_model_file(path, "safetensors")


def read_gguf_file(path: str | os.PathLike[str]) -> ModelFileInfo:
    """Header and metadata-derived config of one GGUF file."""
    return read_model_file(path, "gguf")


def _open_model_file(path: Path, checkpoint: Path, root: str | os.PathLike[str] | None) -> BinaryIO:
    """``path`` opened for reading: a regular file, resolving inside ``root`` (anywhere when None).

    The one door every read of this module goes through. ``path`` is resolved (``os.path.realpath``)
    and checked against ``root`` before anything is opened; what is opened is that resolved path, with
    O_NOFOLLOW (a final component swapped for a link meanwhile is refused) and O_NONBLOCK (a FIFO
    swapped in does not block), and what was opened is checked again. Errors name the file relative to
    ``checkpoint`` and never say where a link points.
    """
    shown = path.relative_to(checkpoint) if path.is_relative_to(checkpoint) else path
    real = os.path.realpath(path)
    if root is not None and not resolves_within(real, root):
        raise ValueError(f"{shown}: resolves outside {root}, the directory this model is read under")
    try:
        mode = os.stat(real).st_mode
        if not stat.S_ISREG(mode):  # refused before open(): opening a device may act on it
            raise ValueError(f"{shown}: not a regular file ({_file_kind(mode)})")
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ValueError(f"{shown}: cannot read: {exc.strerror or exc}") from exc
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    opened = f"/proc/self/fd/{fd}"  # what was opened, should a directory above it have been swapped
    if not stat.S_ISREG(mode) or (
        root is not None and os.path.exists(opened) and not resolves_within(os.readlink(opened), root)
    ):
        f.close()
        why = "changed while opened" if stat.S_ISREG(mode) else f"not a regular file ({_file_kind(mode)})"
        raise ValueError(f"{shown}: {why}")
    return f


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "a device or special file")


@dataclass(frozen=True)
class _ParsedFile:
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, Any]
    identity: tuple[int, int]  #: (st_dev, st_ino): the file itself, whatever name or link reached it
    walked: int  #: header bytes the parse read or skipped


def _parse_file(
    path: Path, fmt: Format, checkpoint: Path, root: str | os.PathLike[str] | None
) -> _ParsedFile:
    with _open_model_file(path, checkpoint, root) as f:
        try:
            st = os.fstat(f.fileno())
            parse = parse_gguf if fmt == "gguf" else parse_safetensors
            tensors, metadata = parse(f, st.st_size, str(path))
            walked = f.tell()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    tensors = tuple(_with_file(t, str(path)) for t in tensors)
    return _ParsedFile(tensors, metadata, (st.st_dev, st.st_ino), walked)


def _with_file(t: TensorInfo, file: str) -> TensorInfo:
    return TensorInfo(t.name, t.dtype, t.shape, t.nbytes, t.offset, file)


def detect_format(path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None) -> Format:
    """``gguf`` or ``safetensors`` from a file's magic bytes (directories: from the files inside;
    ``root``: as for :func:`read_model_file`)."""
    p = Path(path)
    if p.is_dir():
        if any(p.glob("*.gguf")):
            return "gguf"
        if any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file():
            return "safetensors"
        raise ValueError(f"{p}: directory holds no *.safetensors or *.gguf file")
    with _open_model_file(p, p.parent, root) as f:
        try:
            magic = f.read(4)
        except OSError as exc:
            raise ValueError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    return "gguf" if magic == b"GGUF" else "safetensors"


_GGUF_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def _model_files(directory: Path, fmt: Format, root: str | os.PathLike[str] | None) -> list[Path]:
    """The data files of a checkpoint directory, in a stable order (not yet opened, but for the index)."""
    if fmt == "safetensors":
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            return [_shard_path(directory, index, n) for n in _shard_names(index, root)]
        files = sorted(directory.glob("*.safetensors"))
    else:
        files = sorted(directory.glob("*.gguf"))
        if len(files) > 1 and not all(_GGUF_SPLIT.search(f.name) for f in files):
            raise ValueError(
                f"{directory}: several GGUF files ({', '.join(f.name for f in files)}): "
                "point the source at one"
            )
    if not files:
        raise ValueError(f"{directory}: no *.{fmt} file in the directory")
    return files


def _shard_names(index: Path, root: str | os.PathLike[str] | None) -> list[str]:
    """The distinct files a ``model.safetensors.index.json`` maps tensors to, bounded as a header is."""
    with _open_model_file(index, index.parent, root) as f:
        try:  # (read() allocates what it is asked for: ask for what is there)
            size = os.fstat(f.fileno()).st_size
            raw = f.read(size + 1) if size <= MAX_SHARD_INDEX else b""
        except OSError as exc:
            raise ValueError(f"{index}: cannot read: {exc.strerror or exc}") from exc
    if size > MAX_SHARD_INDEX or len(raw) > MAX_SHARD_INDEX:  # (or it grew while read)
        raise ValueError(f"{index}: shard index larger than {MAX_SHARD_INDEX} bytes")
    if raw.count(b":") > MAX_MODEL_TENSORS + 1024:  # an entry is a key and a value, so one ':' at least
        raise ValueError(f"{index}: shard index maps more than {MAX_MODEL_TENSORS} tensors")
    try:
        weight_map = json.loads(raw)["weight_map"]
        return sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"{index}: malformed shard index: {exc!r}") from exc


def _shard_path(directory: Path, index: Path, name: str) -> Path:
    """A shard named by the index, which must stay inside the checkpoint's directory: the index is
    the checkpoint author's text, and the operator reads headers on behalf of any tenant. (This is
    the name only; where a link leads is checked when the file is opened.)"""
    parts = Path(name).parts if isinstance(name, str) else ()
    if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise ValueError(f"{index}: shard {name!r} is not a file inside {directory}")
    return directory / name


def read_model_file(
    path: str | os.PathLike[str],
    fmt: Format | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
) -> ModelFileInfo:
    """Read the header(s) of a model: one file, or a checkpoint directory (sharded safetensors with or
    without ``model.safetensors.index.json``; one GGUF or a ``-0000N-of-0000M`` split set).

    The config comes from GGUF metadata, or from ``config.json`` in the safetensors' directory (None
    when there is none). Raises ValueError for missing, unreadable or malformed files, and for any
    file that is not a regular file or, given ``root`` (the directory the source was allowed under),
    that resolves outside it.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file or directory")
    fmt = fmt or detect_format(p, root=root)
    if fmt not in ("safetensors", "gguf"):
        raise ValueError(f"unknown model format {fmt!r} (safetensors or gguf)")
    checkpoint = p if p.is_dir() else p.parent
    files = _model_files(p, fmt, root) if p.is_dir() else [p]
    if len(files) > MAX_MODEL_FILES:
        raise ValueError(f"{p}: {len(files)} data files (at most {MAX_MODEL_FILES})")
    tensors: list[TensorInfo] = []
    metadata: dict[str, Any] = {}
    kept = walked = 0  # bytes of names and metadata strings kept, of headers walked, so far
    seen: dict[tuple[int, int], Path] = {}  # (st_dev, st_ino) -> the first name it was read under
    for i, f in enumerate(files):
        parsed = _parse_file(f, fmt, checkpoint, root)
        if parsed.identity in seen:  # (links or index names such as "./a" and "a")
            first = seen[parsed.identity].relative_to(checkpoint)
            raise ValueError(
                f"{f.relative_to(checkpoint)}: the same file as {first}: a checkpoint names each of its "
                "files once"
            )
        seen[parsed.identity] = f
        walked += parsed.walked
        if walked > MAX_MODEL_HEADER_BYTES:
            raise ValueError(
                f"{p}: headers of its {len(files)} files run past {MAX_MODEL_HEADER_BYTES} bytes "
                f"(at {f.relative_to(checkpoint)}): larger than any model's"
            )
        file_tensors, file_meta = parsed.tensors, parsed.metadata
        tensors.extend(file_tensors)
        kept += sum(len(t.name) for t in file_tensors)
        if i == 0 or fmt == "safetensors":  # a GGUF split set keeps the model metadata in its first file
            metadata.update(file_meta)
            if fmt == "safetensors":
                kept += sum(len(k) + len(v) for k, v in file_meta.items())
        if len(tensors) > MAX_MODEL_TENSORS:
            raise ValueError(f"{p}: more than {MAX_MODEL_TENSORS} tensors in its {len(files)} files")
        if kept > MAX_MODEL_KEPT_BYTES:
            raise ValueError(
                f"{p}: tensor names and metadata of its {len(files)} files exceed "
                f"{MAX_MODEL_KEPT_BYTES} bytes"
            )
    config: ModelConfig | None = None
    config_error: str | None = None
    try:
        if fmt == "gguf":
            config = config_from_gguf_metadata(metadata, tensors)
        else:
            config_path = checkpoint / "config.json"
            if config_path.is_file():
                config = read_hf_config(config_path, root=root)
            else:
                config_error = f"no config.json beside {p}"
    except ValueError as exc:  # the weights are still sized; what needs the config reports this
        config_error = str(exc)
    return ModelFileInfo(fmt, tuple(str(f) for f in files), tuple(tensors), metadata, config, config_error)


# ---------------------------------------------------------------------------------------------------
# Source URIs


def resolves_within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Is ``path``, symlinks resolved, ``root`` itself or below it (``root`` resolved too)? The one
    containment rule for model sources: a claim's files in the runtime, the operator's readable roots."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def source_is_local(uri: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Could :func:`local_source_path` give a path for ``uri``? Decided without touching a file."""
    if uri.startswith("hf://"):
        return cache_dir is not None
    return uri.startswith("file://") or "://" not in uri


def local_source_path(uri: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The local path of a model source, or None when this process cannot read it.

    ``file:///abs/path`` and plain paths are local. ``hf://org/name[@rev]`` resolves inside
    ``cache_dir`` when one is given: first the Hugging Face hub cache layout
    (``models--org--name/snapshots/<commit>``, with ``refs/<rev>`` naming the commit), then a plain
    mirror (``org/name/<rev>`` or ``org/name``). ``pvc://`` sources live in a volume the operator does
    not mount, so they are never local here. Nothing is ever downloaded.
    """
    if uri.startswith("file://"):
        rest = uri[len("file://") :]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise ValueError(f"source {uri!r}: file:// URIs need an absolute path (file:///path)")
        return Path(rest)
    if uri.startswith("hf://"):
        if cache_dir is None:
            return None
        repo, _, rev = uri[len("hf://") :].partition("@")
        org, _, name = repo.partition("/")
        if not org or not name or "/" in name:
            raise ValueError(f"source {uri!r}: expected hf://org/name[@revision]")
        return _resolve_hf(Path(cache_dir), org, name, rev)
    if "://" in uri:
        return None
    return Path(uri)


def _resolve_hf(cache: Path, org: str, name: str, rev: str) -> Path | None:
    """Find ``org/name`` at ``rev`` (default branch ``main`` when empty) in a local cache or mirror."""
    hub = cache / f"models--{org}--{name}"
    wanted = rev or "main"
    if hub.is_dir():
        ref = hub / "refs" / wanted
        commit = wanted
        if ref.is_file():
            with _open_model_file(ref, hub, cache) as f:
                commit = f.read(4096).decode("utf-8", "replace").strip()
        snapshot = hub / "snapshots" / commit
        if snapshot.is_dir():
            return snapshot
    candidates = [cache / org / name / wanted]
    if not rev:  # an unpinned source may use a mirror that keeps one unversioned copy
        candidates.append(cache / org / name)
    return next((c for c in candidates if c.is_dir()), None)
