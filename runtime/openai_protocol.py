"""OpenAI request bodies parsed once, at the HTTP edge, into frozen dataclasses (pure: no I/O, no torch).

Every field of OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` is known here. A field this
server implements is validated (``max_tokens``, ``max_completion_tokens``, ``temperature``, ``top_p``,
``seed``, ``stop``, ``stream``, ``stream_options``, ``logprobs``/``top_logprobs``, ``n`` = 1, ...). A
field it does not implement is accepted only at its neutral value (``frequency_penalty: 0``,
``tools: []``, ``response_format: {"type": "text"}``, ...), so clients that send defaults work and
clients that rely on a feature learn it is missing. **Unknown fields get a 400**, as issue 12 asks —
vLLM instead ignores them with a warning; a misspelt ``max_token`` silently generating 16 tokens is
the failure this prevents.

Extensions (vLLM's names where vLLM has the field): ``priority`` (an integer, **higher is more
important**, as Kubernetes PriorityClass and the model's ``spec.priority``; note vLLM's ``priority``
runs the other way), ``ignore_eos`` and ``return_token_ids`` (as vLLM).

Numbers: JSON's non-standard ``NaN``/``Infinity`` parse, then fail validation with the field named.

Size: a prompt must fit the model's context, which bounds what a body that can succeed may hold
(:func:`max_body_bytes`, :func:`max_messages`). The runtime refuses a body past those bounds before
parsing it (or, for messages, before parsing each one and rendering the template): a few MiB of JSON
cost a second of CPU that the engine thread, in the same process, loses (the GIL).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vnpu.api import INT32_MAX, INT32_MIN
from vnpu.runtime.errors import InvalidRequestError
from vnpu.runtime.sampling import MAX_TEMPERATURE, MAX_TOP_LOGPROBS, MIN_TEMPERATURE, SamplingParams
from vnpu.shown import MAX_SHOWN_CHARS, shown

#: OpenAI's limit on stop sequences.
MAX_STOP = 4
#: Longest stop sequence (characters). OpenAI states none; real stops are a few tokens. The bound keeps
#: the matcher's tables (built per request) small.
MAX_STOP_CHARS = 4096
#: Most alternatives per token for ``/v1/completions`` ``logprobs`` (OpenAI's limit).
MAX_COMPLETION_LOGPROBS = 5
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _shown(value: object) -> str:
    """``repr(value)``, cut as every echo of a client's value is (vnpu.shown.shown)."""
    return shown(repr(value))


#: Most bytes one byte of prompt text takes in a JSON string: ``\u0001`` (6) for a control character;
#: a character past U+FFFF as a surrogate pair is 12 bytes for its 4.
JSON_BYTES_PER_TEXT_BYTE = 6
#: Most bytes of a message's JSON besides its text ("role", the keys, OpenAI's 64-character "name",
#: "tool_call_id", "refusal": null, "tool_calls": [], indentation), or of one token id in a prompt of ids.
MESSAGE_ENVELOPE_BYTES = 256
#: Most bytes of a body's other fields: four stops of ``MAX_STOP_CHARS`` characters escaped as surrogate
#: pairs (192 KiB), plus 64 KiB for the model name, sampling fields, "user", "metadata" and the like.
OTHER_FIELDS_BYTES = MAX_STOP * MAX_STOP_CHARS * 12 + 64 * 1024


def max_body_bytes(max_context: int, max_token_bytes: int, cap: int) -> int:
    """Largest body (bytes, at most ``cap``) a request can need whose prompt fits ``max_context``
    tokens of at most ``max_token_bytes`` bytes each: its text JSON-escaped, a message's envelope per
    token (a chat template gives each message at least one; see :func:`max_messages`) or a token id's,
    and the other fields. A larger body can only be refused, after a parse that costs the engine its
    GIL."""
    per_token = JSON_BYTES_PER_TEXT_BYTE * max_token_bytes + MESSAGE_ENVELOPE_BYTES
    return min(cap, OTHER_FIELDS_BYTES + max_context * per_token)


def max_messages(max_context: int) -> int:
    """Most messages a chat request can hold whose prompt fits ``max_context`` tokens: a chat template
    puts each message between role markers (ChatML's ``<|im_start|>user\\n…<|im_end|>``, Llama 3's
    headers, Gemma's turns), at least one token each, and a message that rendered to nothing would be
    invisible to the model. A request past it is refused before its messages are parsed and rendered."""
    return max_context


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
DEFAULT_COMPLETION_MAX_TOKENS = 16  #: OpenAI's default for /v1/completions


class BadRequest(InvalidRequestError):
    """A request body this server refuses, with the offending field in ``param``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _neutral(*values: Any) -> Callable[[Any], bool]:
    """Accepts exactly ``values``, each in its own JSON type: ``v in values`` took ``true`` for ``1``
    and ``false`` or ``0`` for each other (Python's ``True == 1``), where OpenAI's API refuses a value
    of the wrong type. A number field lists both ``0`` and ``0.0``: OpenAI takes an integer for it."""
    return lambda v: any(type(v) is type(n) and v == n for n in values)


def _is_empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


def _any(v: Any) -> bool:
    return True


#: OpenAI fields this server does not implement -> which values it accepts (the neutral ones, in the
#: field's JSON type as OpenAI's API checks it: a number also as an integer, an integer never as
#: ``1.0`` or ``true``, a boolean never as ``0``; vLLM's lax pydantic models take all of those).
_NOT_IMPLEMENTED: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": _neutral(None, 0, 0.0),
    "presence_penalty": _neutral(None, 0, 0.0),
    "logit_bias": _is_empty,
    "best_of": _neutral(None, 1),
    "echo": _neutral(None, False),
    "suffix": _neutral(None, ""),
    "tools": _is_empty,
    "tool_choice": _neutral(None, "none", "auto"),
    "parallel_tool_calls": _any,
    "functions": _is_empty,
    "function_call": _neutral(None, "none", "auto"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v is None or v == ["text"],
    "audio": _neutral(None),
    "prediction": _neutral(None),
    "reasoning_effort": _neutral(None),
    "verbosity": _neutral(None),
    "web_search_options": _neutral(None),
    # Bookkeeping fields with no effect on the output: any value.
    "user": _any,
    "metadata": _any,
    "store": _any,
    "service_tier": _any,
    "prompt_cache_key": _any,
    "prompt_cache_retention": _any,
    "safety_identifier": _any,
}

_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n"}
_EXTENSIONS = {"priority", "ignore_eos", "return_token_ids"}
_COMPLETION_FIELDS = _COMMON | _EXTENSIONS | {"prompt", "logprobs"}
_CHAT_FIELDS = _COMMON | _EXTENSIONS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
_MESSAGE_FIELDS = {
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "refusal",
    "function_call",
    "audio",
    "annotations",  # the SDK's own assistant message has it (citations): sent back as history, empty
}


@dataclass(frozen=True)
class SamplingFields:
    """The sampling part of a request; ``max_tokens`` None means "as many as the context allows"."""

    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    logprobs: int | None

    def params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
        )


@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompt: str | tuple[int, ...]
    sampling: SamplingFields
    stream: bool
    include_usage: bool
    priority: int | None
    return_token_ids: bool


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    name: str | None = None

    def to_template(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            message["name"] = self.name
        return message


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: tuple[ChatMessage, ...]
    sampling: SamplingFields
    stream: bool
    include_usage: bool
    priority: int | None
    return_token_ids: bool
    top_logprobs: int | None  #: None unless ``logprobs`` is true


# --- field validators ------------------------------------------------------------------------------


def _int(body: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{key}' must be an integer, got {_shown(value)}", key)
    if not low <= value <= high:
        raise BadRequest(f"'{key}' must be in [{low}, {high}], got {value}", key)
    return value


def _number(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{key}' must be a number, got {_shown(value)}", key)
    if not math.isfinite(value):
        raise BadRequest(f"'{key}' must be a finite number, got {value}", key)
    return float(value)


def _bool(body: Mapping[str, Any], key: str, within: str | None = None) -> bool:
    """``body[key]`` (false when absent); ``within``: the request's field whose object ``body`` is,
    which the error names as its ``param``."""
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        name = f"{within}.{key}" if within else key
        raise BadRequest(f"'{name}' must be true or false, got {_shown(value)}", within or key)
    return value


def _unicode(text: str, what: str, param: str | None) -> str:
    """``text`` if it is valid Unicode. A JSON ``\\ud800`` escape puts a lone surrogate in a string,
    which no UTF-8 encoder and no tokenizer accepts: refused here instead of failing deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(
            f"{what} is not valid Unicode: a lone surrogate at character {e.start}", param
        ) from e
    return text


def _check_fields(body: Mapping[str, Any], allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed:
            continue
        check = _NOT_IMPLEMENTED.get(key)
        if check is None:
            raise BadRequest(
                f"unknown field {_shown(key)} (this server refuses fields it does not know)",
                key[:MAX_SHOWN_CHARS],
            )
        if not check(value):
            raise BadRequest(f"{_shown(key)} = {_shown(value)} is not supported by this server", key)


def _max_tokens(body: Mapping[str, Any], key: str, context: int | None) -> int | None:
    """``body[key]``: at least 1 and, for a model whose context holds ``context`` tokens, less than
    that (the prompt takes at least one): a larger value fits no prompt, and is refused before the
    prompt is tokenized."""
    value = _int(body, key, 1, INT32_MAX)
    if value is not None and context is not None and value >= context:
        raise BadRequest(
            f"'{key}' must be less than {context}: this model's maximum context length is {context} tokens, "
            f"the prompt's included; got {value}",
            key,
        )
    return value


def _sampling(
    body: Mapping[str, Any], max_tokens_key: str = "max_tokens", context: int | None = None
) -> SamplingFields:
    max_tokens = _max_tokens(body, max_tokens_key, context)
    if max_tokens_key != "max_tokens" and max_tokens is None:
        max_tokens = _max_tokens(body, "max_tokens", context)
    temperature = _number(body, "temperature")
    if temperature is None:
        temperature = 1.0
    if temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise BadRequest(
            f"'temperature' must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
            f"got {temperature}",
            "temperature",
        )
    top_p = _number(body, "top_p")
    if top_p is None:
        top_p = 1.0
    if not 0 < top_p <= 1:
        raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    seed = _int(body, "seed", INT64_MIN, INT64_MAX)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP:
        stops = tuple(stop)
    else:
        raise BadRequest(f"'stop' must be a string or a list of up to {MAX_STOP} strings", "stop")
    for s in stops:
        _unicode(s, "'stop'", "stop")
        if len(s) > MAX_STOP_CHARS:
            raise BadRequest(
                f"a 'stop' sequence may hold up to {MAX_STOP_CHARS} characters, got {len(s)}", "stop"
            )
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):  # not 1.0 nor true: an integer, as OpenAI's
        raise BadRequest(f"only 'n': 1 is supported, got {_shown(n)}", "n")
    return SamplingFields(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        seed=seed,
        stop=tuple(s for s in stops if s),
        ignore_eos=_bool(body, "ignore_eos"),
        logprobs=None,
    )


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise BadRequest("'stream_options' is only allowed with 'stream': true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise BadRequest(
            "'stream_options' may only hold 'include_usage' and 'include_obfuscation'", "stream_options"
        )
    # Obfuscation pads chunks against length side channels; this server pads nothing, either way.
    _bool(options, "include_obfuscation", "stream_options")
    return stream, _bool(options, "include_usage", "stream_options")


def _model(body: Mapping[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    if model is not None:
        _unicode(model, "'model'", "model")
    return model or None


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


# --- requests ------------------------------------------------------------------------------------


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def parse_completion(raw: Any, context: int | None = None) -> CompletionRequest:
    """Validate a ``/v1/completions`` body (raises :class:`BadRequest`), for a model whose context
    holds ``context`` tokens (None: no bound on ``max_tokens``)."""
    body = _object(raw)
    _check_fields(body, _COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_ids(prompt[0])):
        prompt = prompt[0]  # one prompt in a list (strings or token ids)
    if isinstance(prompt, str):
        parsed: str | tuple[int, ...] = _unicode(prompt, "'prompt'", "prompt")
    elif _is_ids(prompt):
        parsed = tuple(prompt)
    else:
        raise BadRequest(
            "'prompt' must be a string, a list of token ids, or a list holding one of those "
            "(one prompt per request)",
            "prompt",
        )
    logprobs = _int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    stream, usage = _stream(body)
    sampling = _sampling(body, context=context)
    if sampling.max_tokens is None:
        sampling = _replace(sampling, max_tokens=DEFAULT_COMPLETION_MAX_TOKENS)
    return CompletionRequest(
        model=_model(body),
        prompt=parsed,
        sampling=_replace(sampling, logprobs=logprobs),
        stream=stream,
        include_usage=usage,
        priority=_int(body, "priority", INT32_MIN, INT32_MAX),
        return_token_ids=_bool(body, "return_token_ids"),
    )


def _message(raw: Any, index: int) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be an object with 'role' and 'content'", "messages")
    unknown = set(raw) - _MESSAGE_FIELDS
    if unknown:
        raise BadRequest(f"{where} has unknown fields {_shown(sorted(unknown))}", "messages")
    role = raw.get("role")
    if role not in CHAT_ROLES:
        raise BadRequest(f"{where}.role must be one of {list(CHAT_ROLES)}, got {_shown(role)}", "messages")
    if not _is_empty(raw.get("tool_calls")):
        raise BadRequest(f"{where}.tool_calls: tool calls are not supported by this server", "messages")
    if raw.get("function_call") is not None:
        raise BadRequest(
            f"{where}.function_call: function calls are not supported by this server", "messages"
        )
    if raw.get("audio") is not None:
        raise BadRequest(f"{where}.audio: audio is not supported by this server", "messages")
    if not _is_empty(raw.get("annotations")):
        raise BadRequest(f"{where}: annotations are not supported", "messages")
    content = raw.get("content")
    if content is None and role == "assistant":  # optional for an assistant's message; empty, as vLLM's
        content = ""
    if isinstance(content, list):  # content parts: text only, joined as vLLM joins them
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise BadRequest(f"{where}.content: only text parts are supported", "messages")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or a list of text parts", "messages")
    _unicode(content, f"{where}.content", "messages")
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise BadRequest(f"{where}.name must be a string", "messages")
    if name is not None:
        _unicode(name, f"{where}.name", "messages")
    return ChatMessage(role, content, name)


def parse_chat(raw: Any, context: int | None = None) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body (raises :class:`BadRequest`), for a model whose context
    holds ``context`` tokens (None: no bound on the number of messages nor on ``max_tokens``)."""
    body = _object(raw)
    _check_fields(body, _CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    if context is not None and len(messages) > max_messages(context):
        raise BadRequest(
            f"'messages' holds {len(messages)} messages; this model's context of {context} tokens holds "
            f"at most {max_messages(context)} (every message takes at least one token)",
            "messages",
        )
    parsed = tuple(_message(m, i) for i, m in enumerate(messages))
    want_logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not want_logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    stream, usage = _stream(body)
    sampling = _sampling(body, "max_completion_tokens", context)
    if want_logprobs:
        sampling = _replace(sampling, logprobs=top or 0)
    return ChatRequest(
        model=_model(body),
        messages=parsed,
        sampling=sampling,
        stream=stream,
        include_usage=usage,
        priority=_int(body, "priority", INT32_MIN, INT32_MAX),
        return_token_ids=_bool(body, "return_token_ids"),
        top_logprobs=(top or 0) if want_logprobs else None,
    )


def _replace(fields: SamplingFields, **changes: Any) -> SamplingFields:
    return dataclasses.replace(fields, **changes)


# --- responses -----------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
