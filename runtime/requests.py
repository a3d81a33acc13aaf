"""A request's life in the engine: what the caller submits and receives, and how tokens become text.

:class:`GenerationRequest` goes in (token ids, :class:`~vnpu.runtime.sampling.SamplingParams`, a
priority); :class:`RequestOutput` comes out, once per step that produced something, through the
callback the caller gave (the HTTP server turns each into a stream chunk), the last one with its
``finish_reason``. Inside the engine a :class:`RequestState` holds the scheduler's
:class:`~vnpu.runtime.scheduler.Sequence` and what turns its tokens into text: an incremental UTF-8
decoder and a stop-string matcher that holds back text which might be the start of a stop string,
so a client never sees part of one. Finishing: a stop token (EOS, unless ``ignore_eos``) or stop
string -> "stop"; ``max_tokens`` or the context -> "length". A stop token is generated like any other:
it is in ``token_ids``, counted in ``completion_tokens`` and has its logprob (as vLLM's outputs), only
its text is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vnpu.runtime.sampling import SamplingParams, TokenLogprob
from vnpu.runtime.scheduler import Sequence as ScheduledSequence
from vnpu.runtime.tokenizer import StreamDecoder


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    priority: int | None = None  #: None: the model's default priority


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request; the last one carries ``finish_reason``."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  #: "stop", "length", "cancelled" or "error"
    error: Exception | None = None
    completion_tokens: int = 0  #: generated so far (all of them in the last output)


class StopMatcher:
    """Cuts generated text at the first stop string, holding back a tail that might start one.

    Each stop is a KMP automaton whose state is the longest prefix of the stop that ends the text so
    far: a new character costs O(1) amortised, whatever the stops' lengths. (Trying every prefix of
    every stop against the text's end cost O(L^2) per token on the engine thread, L the text held
    back: a client's long stops slowed every sequence in the batch.)
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  #: per stop: how much of it the text ends with
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text of ``piece`` that can be sent now (none after a stop)."""
        if self.stopped:
            return ""
        text = self._pending + piece
        first_start: int | None = None
        for i, (stop, fail) in enumerate(zip(self.stops, self._fail, strict=True)):
            k = self._state[i]
            for j in range(len(self._pending), len(text)):
                c = text[j]
                while k and stop[k] != c:
                    k = fail[k - 1]
                if stop[k] == c:
                    k += 1
                if k == len(stop):  # the stop's first occurrence: it ends at j
                    start = j - k + 1
                    first_start = start if first_start is None else min(first_start, start)
                    break
            self._state[i] = k
        if first_start is not None:
            self.stopped = True
            self._pending = ""
            return text[:first_start]
        hold = max(self._state, default=0)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return "" if self.stopped else text


def _failure(pattern: str) -> list[int]:
    """KMP's failure function: for each prefix, the length of its longest proper border."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail


@dataclass(eq=False)
class RequestState:
    """A request inside the engine: its scheduler sequence and everything that turns tokens into text."""

    seq: ScheduledSequence
    params: SamplingParams
    sink: Callable[[RequestOutput], None]
    decoder: StreamDecoder
    matcher: StopMatcher
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    submitted: float
    first_token_at: float | None = None
    last_token_at: float | None = None
    closed: bool = False  #: the caller has had its last output

    def advance(
        self, token: int, logprob: TokenLogprob | None, now: float, max_context: int
    ) -> RequestOutput:
        """One new token: detokenize, match stop strings and ids, decide the finish."""
        seq = self.seq
        seq.tokens.append(token)
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        generated = seq.num_generated
        finish: str | None = None
        text = ""
        if token in self.stop_ids:
            finish = "stop"
        else:
            text = self.matcher.feed(self.decoder.push(token))
            if self.matcher.stopped:
                finish = "stop"
            elif generated >= self.params.max_tokens or len(seq.tokens) >= max_context:
                finish = "length"
        if finish is not None and not self.matcher.stopped:
            text += self.matcher.feed(self.decoder.flush()) + self.matcher.flush()
        logprobs = (logprob,) if logprob is not None else ()
        return RequestOutput(text, (token,), logprobs, finish, completion_tokens=generated)


class RequestHandle:
    """The caller's side of a submitted request."""

    def __init__(self, state: RequestState, abort: Callable[[RequestHandle], bool]) -> None:
        self._abort = abort
        self.id = state.seq.id
        self.prompt_tokens = state.seq.prompt_len
        self.priority = state.seq.priority

    def abort(self) -> bool:
        """Cancel the request (its blocks are freed now, or right after the step using them)."""
        return self._abort(self)
