"""Token generation over a :class:`~vnpu.runtime.model.LlamaModel`: chunked prefill, then decode.

Greedy (``temperature == 0``) is deterministic; sampling uses a seeded generator so a request with a
``seed`` reproduces. Stop conditions: a stop token id, ``max_new_tokens``, or the callback asking to
stop (a client that went away, or a stop string matched by the caller).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vnpu.runtime.errors import ContextLengthError, InvalidRequestError
from vnpu.runtime.model import KVCache, LlamaModel

__all__ = ["ContextLengthError", "GenerationResult", "check_context", "generate"]


@dataclass
class GenerationResult:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decode_time = self.total_s - self.time_to_first_token_s
        return (len(self.token_ids) - 1) / decode_time if len(self.token_ids) > 1 and decode_time > 0 else 0.0


def check_context(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    if prompt_tokens == 0:
        raise InvalidRequestError("the prompt is empty")
    if max_new_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {max_new_tokens}")
    if prompt_tokens + max_new_tokens > context:
        raise ContextLengthError(
            f"this model's maximum context length is {context} tokens, but {prompt_tokens} prompt tokens "
            f"plus {max_new_tokens} completion tokens were requested"
        )


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float().cpu()  # the seeded generator lives on the CPU, whatever the device
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: LlamaModel,
    cache: KVCache,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    prefill_chunk: int = 256,
    on_token: Callable[[int], bool] | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` (sequence slot 0 of ``cache``).

    ``on_token(id)`` is called for every new token; returning False stops generation ("stop").
    """
    check_context(len(prompt_ids), max_new_tokens, cache.max_tokens)
    generator = None
    if temperature > 0:
        generator = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns()))
    result = GenerationResult(prompt_tokens=len(prompt_ids))
    start = time.perf_counter()
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    logits = None
    for begin in range(0, len(prompt_ids), prefill_chunk):
        logits = model.forward(ids[:, begin : begin + prefill_chunk], cache, begin)
    assert logits is not None
    position = len(prompt_ids)
    stops = set(stop_ids)
    while True:
        token = _pick(logits[0], temperature, top_p, generator)
        if not result.token_ids:
            result.time_to_first_token_s = time.perf_counter() - start
        result.token_ids.append(token)
        if token in stops:
            result.finish_reason = "stop"
            break
        if on_token is not None and on_token(token) is False:
            result.finish_reason = "stop"
            break
        if len(result.token_ids) >= max_new_tokens:
            break
        logits = model.forward(torch.tensor([[token]]), cache, position)
        position += 1
    result.total_s = time.perf_counter() - start
    return result
