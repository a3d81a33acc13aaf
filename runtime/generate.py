"""One sequence's generation over a :class:`~vnpu.runtime.model.LlamaModel` and a contiguous KV cache.

The reference path (tests, offload benchmarks): chunked prefill, then decode, one sequence. Serving
runs many sequences at once through :mod:`vnpu.runtime.engine`; both pick tokens with
:mod:`vnpu.runtime.sampling`. Greedy (``temperature == 0``) is deterministic; sampling uses a
seeded generator so a request with a ``seed`` reproduces. Stop conditions: a stop token id,
``max_new_tokens``, or the callback asking to stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vnpu.runtime.errors import ContextLengthError, InvalidRequestError
from vnpu.runtime.model import KVCache, LlamaModel
from vnpu.runtime.sampling import SamplingParams, sample_token

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


def context_length_error(context: int, output: int, prompt: str, param: str | None) -> ContextLengthError:
    """The refusal of a prompt that leaves no room for ``output`` tokens in ``context``, in OpenAI's and
    vLLM's words, which clients parse ("maximum context length is (\\d+) tokens", vLLM's "you requested N
    output tokens and your prompt contains M input tokens"); ``prompt``: what the prompt was found to
    hold; ``param``: the request's field holding it."""
    return ContextLengthError(
        f"This model's maximum context length is {context} tokens. However, you requested {output} output "
        f"tokens and your prompt contains {prompt}. Please reduce the length of the prompt or the number of "
        "requested output tokens.",
        param,
    )


def check_context(prompt_tokens: int, max_new_tokens: int, context: int, param: str | None = None) -> None:
    """Refuse a prompt that is empty or, with ``max_new_tokens``, does not fit ``context``; ``param``:
    the request's field holding the prompt."""
    if prompt_tokens == 0:
        raise InvalidRequestError("the prompt is empty")
    if max_new_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {max_new_tokens}")
    if prompt_tokens + max_new_tokens > context:
        total = prompt_tokens + max_new_tokens
        raise context_length_error(
            context, max_new_tokens, f"{prompt_tokens} input tokens, for a total of {total} tokens", param
        )


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
    params = SamplingParams(max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    generator = params.generator()
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
        token = sample_token(logits[0], params, generator)
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
