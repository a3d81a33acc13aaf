"""Byte-level BPE tokenizer (GPT-2 family) built from GGUF metadata or an HF ``tokenizer.json``.

The description of a tokenizer is a plain JSON-able dict (a "spec": tokens, merges, token types,
pre-tokenizer regexes, special ids) so a weights-holder can ship it to replicas in its manifest and a
replica never needs the model file. :class:`Tokenizer` turns a spec into ``encode``/``decode``.

Encoding follows HF ``tokenizers``: split out special tokens, pre-tokenize with the model's regexes
(each regex isolates its matches; text between matches is kept as its own piece), map bytes to the
GPT-2 printable alphabet, then apply merges by rank.
"""

from __future__ import annotations

import itertools
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
    """The tokenizer spec from GGUF ``tokenizer.ggml.*`` metadata (byte-level BPE only)."""
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


def tokenizer_spec_from_hf(data: Mapping[str, Any]) -> dict[str, Any]:
    """The tokenizer spec from an HF ``tokenizer.json`` (BPE model with a ByteLevel decoder)."""
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
    }


class Tokenizer:
    """Encode text to token ids and back. Built from a spec (see module docstring)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        import regex

        self.tokens: list[str] = list(spec["tokens"])
        self.types: list[int] = list(spec["types"])
        self.vocab = {tok: i for i, tok in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(spec["merges"])}
        self.bos_id: int | None = spec.get("bos_id")
        self.eos_id: int | None = spec.get("eos_id")
        self.unk_id: int | None = spec.get("unk_id")
        self.add_bos = bool(spec.get("add_bos"))
        self.add_prefix_space = bool(spec.get("add_prefix_space"))
        self.ignore_merges = bool(spec.get("ignore_merges"))
        self._pre = [regex.compile(p) for p in spec["pre_regexes"]]
        self.special_ids = {i for i, t in enumerate(self.types) if t in _SPECIAL_TYPES}
        specials = sorted((self.tokens[i] for i in self.special_ids if self.tokens[i]), key=len, reverse=True)
        self._special_split = (
            regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")") if specials else None
        )
        self._byte_enc, self._byte_dec = _byte_alphabet()
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.append(self.bos_id)
        if self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        segments = self._special_split.split(text) if self._special_split else [text]
        for i, segment in enumerate(segments):
            if i % 2 == 1:  # a special token captured by the split
                ids.append(self.vocab[segment])
            elif segment:
                for piece in self._pre_tokenize(segment):
                    ids.extend(self._bpe(piece))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        out = bytearray()
        for i in ids:
            if i in self.special_ids:
                if not skip_special:
                    out += self.tokens[i].encode()
                continue
            out += bytes(self._byte_dec[c] for c in self.tokens[i])
        return bytes(out)

    def _pre_tokenize(self, text: str) -> list[str]:
        pieces = [text]
        for pattern in self._pre:
            split: list[str] = []
            for piece in pieces:
                pos = 0
                for m in pattern.finditer(piece):
                    if m.start() > pos:
                        split.append(piece[pos : m.start()])
                    if m.end() > m.start():
                        split.append(m.group())
                    pos = m.end()
                if pos < len(piece):
                    split.append(piece[pos:])
            pieces = split
        return pieces

    def _bpe(self, piece: str) -> tuple[int, ...]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = [self._byte_enc[b] for b in piece.encode("utf-8")]
        joined = "".join(word)
        if self.ignore_merges and joined in self.vocab:
            word = [joined]
        while len(word) > 1:
            best, best_rank = None, None
            for pair in itertools.pairwise(word):
                rank = self.ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = tuple(self.vocab[s] if s in self.vocab else self._unknown(s) for s in word)
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def _unknown(self, symbol: str) -> int:
        if self.unk_id is None:
            raise TokenizerError(f"symbol {symbol!r} is not in the vocabulary and there is no unknown token")
        return int(self.unk_id)


class StreamDecoder:
    """Turns token ids into text incrementally, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._pending = b""

    def push(self, token_id: int) -> str:
        data = self._pending + self._tok.decode_bytes([token_id], self._skip)
        for cut in range(len(data), max(len(data) - 4, -1), -1):
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._pending = data[cut:]
            return text
        self._pending = b""
        return data.decode("utf-8", errors="replace")

    def flush(self) -> str:
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return text
