"""How the next token is chosen: greedy, or temperature + nucleus (top-p) sampling with a seed.

:class:`SamplingParams` is what a request asks for, validated once at the HTTP edge
(:mod:`vnpu.runtime.openai_protocol`); :func:`sample_step` picks one token for each sequence of a
batched step. Greedy rows are one ``argmax`` over the batch; sampled rows each draw from their own
CPU ``torch.Generator`` (seeded from the request's ``seed``, so a seeded request reproduces whatever
else shares its batch, and keeps its stream across a preemption). Log-probabilities are those of the
model's distribution (``log_softmax`` of the raw logits, as vLLM reports by default), computed only
for the rows that ask for them. A row whose logits are not all finite (NaN or infinite: an overflow)
is not sampled: its sequence alone fails, and the others of the batch are sampled as usual.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Below this a temperature is refused (vLLM clamps it: it overflows the softmax in low precision).
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0
#: Most alternatives per token a request may ask for (OpenAI's ``top_logprobs`` limit).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  #: 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  #: vLLM's extension: generate exactly ``max_tokens`` (benchmarks)
    logprobs: int | None = None  #: None: none; 0: the chosen token's; k: also the k most likely

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        """The request's random stream (None when greedy)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else time.time_ns()
        return torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  #: the most likely tokens and their log-probabilities


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from a ``[vocab]`` row of logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        keep[0] = True  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_step(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> tuple[list[int | None], list[TokenLogprob | None]]:
    """The next token for every row of ``logits`` ``[rows, vocab]`` (row i uses ``params[i]``); None
    for a row whose logits are not all finite (``torch.multinomial`` raised on one such row for the
    whole batch, and ``argmax`` picked an arbitrary token from it)."""
    rows = len(params)
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    tokens: list[int | None] = [None] * rows
    greedy = [i for i in range(rows) if params[i].greedy and finite[i]]
    if greedy:
        picked = torch.argmax(logits[greedy] if len(greedy) < rows else logits, dim=-1).tolist()
        for i, token in zip(greedy, picked, strict=True):
            tokens[i] = int(token)
    for i in range(rows):
        if finite[i] and not params[i].greedy:
            tokens[i] = sample_token(logits[i], params[i], generators[i])
    logprobs: list[TokenLogprob | None] = [None] * rows
    wanted = [i for i in range(rows) if params[i].logprobs is not None and finite[i]]
    if wanted:
        table = torch.log_softmax(logits[wanted].float(), dim=-1).cpu()
        for row, i in enumerate(wanted):
            k = params[i].logprobs or 0
            top: tuple[tuple[int, float], ...] = ()
            if k:
                values, ids = torch.topk(table[row], k)
                top = tuple((int(t), float(v)) for t, v in zip(ids.tolist(), values.tolist(), strict=True))
            token = tokens[i]
            assert token is not None  # a finite row
            logprobs[i] = TokenLogprob(token, float(table[row, token]), top)
    return tokens, logprobs
