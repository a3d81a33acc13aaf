"""Byte-level BPE tokenizers (GPT-2 family), run by the Rust ``tokenizers`` library.

The description of a tokenizer is a plain JSON-able dict (a "spec": tokens, merges, token types,
pre-tokenizer regexes, special ids, the chat template) so a weights-holder can ship it to replicas in
its manifest and a replica never needs the model file. The spec comes from the model's own files —
GGUF ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` metadata, or an HF ``tokenizer.json`` plus
``tokenizer_config.json`` — and :class:`Tokenizer` builds a ``tokenizers.Tokenizer`` from it:
``BPE(vocab, merges)``; the model's pre-tokenizer regexes as ``Split(regex, "isolated")`` (each regex
isolates its matches, text between matches is kept as its own piece) followed by
``ByteLevel(use_regex=False)``; control and user-defined tokens as added tokens (split out before
pre-tokenization); a ``ByteLevel`` decoder. That is the pipeline HF ``tokenizers`` runs for these
models, so ids equal transformers' (tests/runtime/test_tokenizer.py).

Encoding runs in Rust, in time linear in the text (the hand-written Python BPE this replaced was
super-linear: 50k letters took 6.7 s); the server runs it outside any lock, in a worker thread. Specs
from older holders (no ``chat_template``) still load: the model just has no chat template.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

#: GPT-2's pre-tokenizer (also ByteLevel(use_regex=True) in HF tokenizers).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = _LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

#: ``tokenizer.ggml.pre`` -> pre-tokenizer regexes, applied in order (llama.cpp's pre-tokenizer names).
GGUF_PRE_TOKENIZERS: dict[str, list[str]] = {
    "default": [GPT2_PATTERN],
    "gpt2": [GPT2_PATTERN],
    "gpt-2": [GPT2_PATTERN],
    # SmolLM/StarCoder: isolate every digit, then GPT-2's regex.
    "smollm": [r"\p{N}", GPT2_PATTERN],
    "starcoder": [r"\p{N}", GPT2_PATTERN],
    "refact": [r"\p{N}", GPT2_PATTERN],
    "llama-bpe": [_LLAMA3_PATTERN],
    "llama3": [_LLAMA3_PATTERN],
    "qwen2": [_QWEN2_PATTERN],
}

#: GGUF token types (llama.cpp ``llama_token_type``).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
_SPECIAL_TYPES = (TOKEN_CONTROL, TOKEN_USER_DEFINED)


class TokenizerError(ValueError):
    """The tokenizer description is one this runtime cannot implement."""


@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    encoder = {b: chr(c) for b, c in zip(printable, chars, strict=True)}
    return encoder, {c: b for b, c in encoder.items()}


def tokenizer_spec_from_gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The tokenizer spec from GGUF ``tokenizer.*`` metadata (byte-level BPE only)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in GGUF_PRE_TOKENIZERS:
        raise TokenizerError(
            f"GGUF pre-tokenizer {pre!r} is not known (known: {sorted(GGUF_PRE_TOKENIZERS)})"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    template = meta.get("tokenizer.chat_template")
    return {
        "tokens": tokens,
        "merges": list(meta.get("tokenizer.ggml.merges") or []),
        "types": [int(t) for t in types],
        "pre_regexes": GGUF_PRE_TOKENIZERS[pre],
        "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "bos_id": None if bos is None else int(bos),
        "eos_id": None if eos is None else int(eos),
        "unk_id": meta.get("tokenizer.ggml.unknown_token_id"),
        "ignore_merges": False,
        "chat_template": str(template) if template else None,
    }


def _hf_pre_regexes(node: Mapping[str, Any] | None) -> tuple[list[str], bool]:
    """Regexes and add_prefix_space for an HF ``pre_tokenizer`` node."""
    if node is None:
        return [], False
    kind = node.get("type")
    if kind == "Sequence":
        regexes: list[str] = []
        prefix = False
        for child in node.get("pretokenizers", []):
            r, p = _hf_pre_regexes(child)
            regexes += r
            prefix = prefix or p
        return regexes, prefix
    if kind == "Digits":
        return [r"\p{N}" if node.get("individual_digits") else r"\p{N}+"], False
    if kind == "ByteLevel":
        return ([GPT2_PATTERN] if node.get("use_regex", True) else []), bool(node.get("add_prefix_space"))
    if kind == "Split" and node.get("behavior") == "Isolated" and "Regex" in node.get("pattern", {}):
        return [node["pattern"]["Regex"]], False
    raise TokenizerError(f"pre-tokenizer {dict(node)!r} is not supported")


def _hf_chat_template(config: Mapping[str, Any] | None) -> str | None:
    """``chat_template`` of an HF ``tokenizer_config.json``: a string, or named templates (the default)."""
    template = (config or {}).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def tokenizer_spec_from_hf(
    data: Mapping[str, Any], config: Mapping[str, Any] | None = None, chat_template: str | None = None
) -> dict[str, Any]:
    """The tokenizer spec from an HF ``tokenizer.json`` (BPE model with a ByteLevel decoder).

    ``config`` is ``tokenizer_config.json`` (for its chat template); ``chat_template`` is the text of a
    ``chat_template.jinja`` file beside it, which newer checkpoints use instead.
    """
    model = data.get("model", {})
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") not in ("ByteLevel", None):
        raise TokenizerError("only byte-level BPE tokenizer.json files are supported")
    vocab: dict[str, int] = dict(model["vocab"])
    specials = {t["content"]: (t["id"], bool(t.get("special"))) for t in data.get("added_tokens", [])}
    for content, (tid, _) in specials.items():
        vocab[content] = tid
    tokens = [""] * (max(vocab.values()) + 1)
    types = [TOKEN_UNUSED] * len(tokens)
    for tok, tid in vocab.items():
        tokens[tid] = tok
        types[tid] = TOKEN_NORMAL
    for tid, special in specials.values():
        types[tid] = TOKEN_CONTROL if special else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    regexes, prefix = _hf_pre_regexes(data.get("pre_tokenizer"))
    template = ((data.get("post_processor") or {}).get("single") or [{}])[0]
    return {
        "tokens": tokens,
        "merges": merges,
        "types": types,
        "pre_regexes": regexes,
        "add_bos": "SpecialToken" in template,
        "add_prefix_space": prefix,
        "bos_id": None,
        "eos_id": None,
        "unk_id": vocab.get(model.get("unk_token") or ""),
        "ignore_merges": bool(model.get("ignore_merges", False)),
        "chat_template": chat_template or _hf_chat_template(config),
    }


class Tokenizer:
    """Encode text to token ids and back, with ``tokenizers`` (see module docstring)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as RustTokenizer

        self.tokens: list[str] = list(spec["tokens"])
        self.types: list[int] = list(spec["types"])
        self.bos_id: int | None = spec.get("bos_id")
        self.eos_id: int | None = spec.get("eos_id")
        unk_id = spec.get("unk_id")
        self.add_bos = bool(spec.get("add_bos"))
        self.add_prefix_space = bool(spec.get("add_prefix_space"))
        self.chat_template: str | None = spec.get("chat_template") or None
        self.special_ids = frozenset(
            i for i, t in enumerate(self.types) if t in _SPECIAL_TYPES and self.tokens[i]
        )
        vocab: dict[str, int] = {}
        for i, tok in enumerate(self.tokens):
            vocab.setdefault(tok, i)  # a duplicated string (padding entries) keeps its first id
        merges = [tuple(m.split(" ", 1)) for m in spec["merges"]]
        bpe = models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=self.tokens[int(unk_id)] if unk_id is not None else None,
            ignore_merges=bool(spec.get("ignore_merges")),
        )
        rust = RustTokenizer(bpe)
        rust.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in spec["pre_regexes"]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        rust.decoder = decoders.ByteLevel()
        control = [i for i in sorted(self.special_ids) if self.types[i] == TOKEN_CONTROL]
        user = [i for i in sorted(self.special_ids) if self.types[i] == TOKEN_USER_DEFINED]
        rust.add_special_tokens([AddedToken(self.tokens[i], special=True, normalized=False) for i in control])
        rust.add_tokens([AddedToken(self.tokens[i], special=False, normalized=False) for i in user])
        self._rust = rust
        _, byte_dec = _byte_alphabet()
        # Bytes of every token (what the streaming decoder and logprobs need): special tokens are
        # their text, the others map the byte-level alphabet back to bytes.
        self.token_bytes: list[bytes] = [
            tok.encode() if i in self.special_ids else bytes(byte_dec.get(c, 0x3F) for c in tok)
            for i, tok in enumerate(self.tokens)
        ]
        self.max_token_bytes = max((len(b) for b in self.token_bytes), default=1) or 1

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_text(self, token_id: int) -> str:
        """The token's text (bytes of a partial UTF-8 character come out as U+FFFD)."""
        return self.token_bytes[token_id].decode("utf-8", errors="replace")

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        ids: list[int] = self._rust.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))`` computed without tokenizing (no token holds more than
        ``max_token_bytes`` bytes, and every character is at least one byte)."""
        return -(-len(text) // self.max_token_bytes)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        if not skip_special:
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        return str(self._rust.decode(list(ids), skip_special_tokens=True))

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids if not (skip_special and i in self.special_ids))

    def special_token_text(self, token_id: int | None) -> str:
        return self.tokens[token_id] if token_id is not None and 0 <= token_id < len(self.tokens) else ""


class StreamDecoder:
    """Turns token ids into text incrementally, holding back bytes of an unfinished UTF-8 character.

    The streamed pieces join to what decoding all the bytes at once gives, invalid bytes included
    (U+FFFD where ``bytes.decode(errors="replace")`` puts one): Python's incremental UTF-8 decoder
    keeps that contract. Retrying the last few cut points did not: a valid character after stray
    bytes came out as U+FFFD too."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.decode_bytes([token_id], self._skip))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
