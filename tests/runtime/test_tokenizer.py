"""The byte-level BPE tokenizer built from GGUF metadata: ids equal to HF tokenizers, text round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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
    "tabs\t\tand   runs     of      spaces\n\n\n\r\n  \u3000ideographic space",
    "👩‍👩‍👧‍👦 family, 🇫🇷 flag, 🤖🦾 robots, ZWJ and skin tones 👍🏽",
    "class Foo:\n    def bar(self, x: int) -> int:\n        return x ** 2  # square\n",
    "<|endoftext|><|im_start|><|im_end|>text<|im_start|>inside",
    "numbers 1234567890 0.5e-10 -42 v1.2.3 2024-01-01",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, 한국어, ไทย",
    "mixed\u200bzero\u200cwidth\u200djoiners and combining e\u0301 a\u0300",
]


#: Numbers outside ASCII right after a space: see test_numbers_split_as_the_gguf_pre_tokenizer_says.
NUMBER_TEXTS = [" ١٢٣ arabic-indic", "x ² and ³", "version 2 of 10 (٣)", "Ⅻ roman ⅻ", " 12 34"]


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


@pytest.mark.parametrize("text", NUMBER_TEXTS)
def test_numbers_split_as_the_gguf_pre_tokenizer_says(tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    """``tokenizer.ggml.pre = "smollm"`` isolates every numeric code point before GPT-2's regex, as
    llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM and SmolLM2's own tokenizer.json (Digits with
    individual_digits, then ByteLevel) do. transformers' GGUF loader has no "smollm" entry and keeps
    GPT-2's regex alone, which differs only when a non-ASCII number follows a space (" ١" can merge
    into one piece there). The reference here is transformers' tokenizer with SmolLM2's pre-tokenizer."""
    import copy

    from tokenizers import pre_tokenizers

    reference = copy.deepcopy(hf_tokenizer)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    assert tokenizer.encode(text) == reference(text)["input_ids"]
    assert tokenizer.decode(tokenizer.encode(text)) == text


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


def _byte_tokens(tokenizer: Tokenizer) -> dict[int, int]:
    """byte -> the id of the ordinary token of that one byte (the vocabulary has none for a few bytes,
    0xc0 and 0xf5-0xff among them)."""
    return {
        b[0]: i for i, b in enumerate(tokenizer.token_bytes) if len(b) == 1 and i not in tokenizer.special_ids
    }


@st.composite
def _token_runs(draw: st.DrawFn, tokenizer: Tokenizer) -> list[int]:
    """Token ids whose bytes are random, valid UTF-8 or not, cut at random points: single-byte tokens
    for random bytes and for encoded text (cut at every byte), mixed with any ordinary token."""
    byte_token = _byte_tokens(tokenizer)
    ordinary = st.integers(0, tokenizer.vocab_size - 1).filter(lambda i: i not in tokenizer.special_ids)
    byte_runs = st.one_of(
        st.lists(st.sampled_from(sorted(byte_token)), min_size=1, max_size=4),
        st.text(max_size=3)
        .map(lambda text: list(text.encode()))
        .filter(lambda data: all(b in byte_token for b in data)),
    ).map(lambda data: [byte_token[b] for b in data])
    pieces = st.one_of(byte_runs, ordinary.map(lambda i: [i]))
    return [i for piece in draw(st.lists(pieces, max_size=12)) for i in piece]


def test_stream_decoder_keeps_a_character_after_stray_bytes(tokenizer: Tokenizer) -> None:
    """The decoder retried only its last four cut points, then replaced everything it held: the "中"
    after two stray continuation bytes came out as three U+FFFD, unlike in a whole decode."""
    byte_token = _byte_tokens(tokenizer)
    decoder = StreamDecoder(tokenizer)
    streamed = "".join(decoder.push(byte_token[b]) for b in b"\x80\x80\xe4\xb8\xad!") + decoder.flush()
    assert streamed == "\ufffd\ufffd中!"


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_streamed_text_equals_a_whole_decode(tokenizer: Tokenizer, data: st.DataObject) -> None:
    ids = data.draw(_token_runs(tokenizer))
    decoder = StreamDecoder(tokenizer)
    streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert streamed == tokenizer.decode_bytes(ids).decode("utf-8", errors="replace")


def test_unsupported_tokenizers_are_refused() -> None:
    with pytest.raises(TokenizerError, match="only byte-level BPE"):
        tokenizer_spec_from_gguf({"tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="pre-tokenizer"):
        tokenizer_spec_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery"})


def test_a_long_run_of_letters_matches_and_is_linear(tokenizer: Tokenizer, hf_tokenizer) -> None:
    """50k letters (6.7 s with the hand-written BPE this replaced) tokenize like transformers'."""
    text = "a" * 50_000
    assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]
    assert tokenizer.min_tokens(text) <= len(tokenizer.encode(text))


def test_chat_template_renders_like_transformers(tokenizer: Tokenizer, hf_tokenizer) -> None:
    """The GGUF's own chat template, rendered in the sandbox, gives transformers' text and ids."""
    from vnpu.runtime.chat import ChatTemplate

    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    template = ChatTemplate(tokenizer.chat_template, "<|im_start|>", "<|im_end|>")
    conversations = [
        [{"role": "user", "content": "Hi! 🤖"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    ]
    for messages in conversations:
        for generation_prompt in (True, False):
            ours = template.render(messages, add_generation_prompt=generation_prompt)
            theirs = hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
            assert ours == theirs
            assert tokenizer.encode(ours) == hf_tokenizer(theirs, add_special_tokens=False)["input_ids"]


def test_chat_templates_run_sandboxed() -> None:
    from vnpu.runtime.chat import ChatTemplate, ChatTemplateError

    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="unsafe"):
        escape.render([{"role": "user", "content": "x"}])
    mutate = ChatTemplate("{% set _ = messages.append(1) %}{{ messages }}")
    with pytest.raises(ChatTemplateError):
        mutate.render([{"role": "user", "content": "x"}])
