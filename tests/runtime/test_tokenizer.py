"""The byte-level BPE tokenizer built from GGUF metadata: ids equal to HF tokenizers, text round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from rt_helpers import GGUF_NAME

from vnpu.runtime.checkpoint import GGUFCheckpoint
from vnpu.runtime.sources import resolve
from vnpu.runtime.tokenizer import (
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    tokenizer_spec_from_gguf,
    tokenizer_spec_from_hf,
)

TEXTS = [
    "Hello world, 12345 héllo <|im_start|>user",
    "  leading spaces\n\n\ttabs and 'quotes' don't they'll",
    "日本語のテキスト 🤖 emoji!! Ünïcödé — dashes",
    "x=a+b*3.14159; print(x)\r\n    return {'k': [1, 2]}",
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
    "",
    " ",
    "a" * 300,
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: Path) -> Tokenizer:
    return Tokenizer(GGUFCheckpoint(resolve(str(smollm2_path))).tokenizer)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path: Path):
    import transformers  # the `test` extra

    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path), gguf_file=GGUF_NAME)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_hf_tokenizers(tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]


def test_special_tokens_and_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.eos_id == 2 and tokenizer.bos_id == 1
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.decode([1, 2], skip_special=True) == ""


def test_tokenizer_json_spec_matches_gguf_spec(tokenizer: Tokenizer, hf_tokenizer, tmp_path: Path) -> None:
    """An HF tokenizer.json (as written next to safetensors checkpoints) gives the same encoder."""
    import json

    hf_tokenizer.save_pretrained(tmp_path)
    spec = tokenizer_spec_from_hf(json.loads((tmp_path / "tokenizer.json").read_text()))
    from_json = Tokenizer(spec)
    for text in TEXTS:
        assert from_json.encode(text) == tokenizer.encode(text)


def test_stream_decoder_holds_partial_utf8(tokenizer: Tokenizer) -> None:
    text = "🤖 héllo 日本"
    ids = tokenizer.encode(text)
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_unsupported_tokenizers_are_refused() -> None:
    with pytest.raises(TokenizerError, match="only byte-level BPE"):
        tokenizer_spec_from_gguf({"tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="pre-tokenizer"):
        tokenizer_spec_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery"})
