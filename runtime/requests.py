"""A request's life in the engine: what the caller submits and receives, and how tokens become text.

:class:`GenerationRequest` goes in (token ids, :class:`~vnpu.runtime.sampling.SamplingParams`, a
priority); :class:`RequestOutput` comes out, once per step that produced something, through the
callback the caller gave (the HTTP server turns each into a stream chunk), the last one with its
``finish_reason``. Inside the engine a :class:`RequestState` holds the scheduler's
:class:`~vnpu.runtime.scheduler.Sequence` and what turns its tokens into text: an incremental UTF-8
decoder and a stop-string matcher that holds back text which might be the start of a stop string,
so a client never sees part of one. Finishing: a stop token (EOS, unless ``ignore_eos``) or stop
string -> "stop"; ``max_tokens`` or the context -> "length".
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
    """Cuts generated text at the first stop string, holding back a tail that might start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        text = self._pending + piece
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)[0]]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return "" if self.stopped else text


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
        logprobs = (logprob,) if logprob is not None and token not in self.stop_ids else ()
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
