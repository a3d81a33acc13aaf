"""The model's own chat template, rendered as transformers renders it.

A chat model is trained on one exact text layout of a conversation; the layout ships with the model
as a Jinja template (GGUF ``tokenizer.chat_template``, or ``chat_template`` in an HF
``tokenizer_config.json``). Templates are untrusted code from a model file, so they run in jinja2's
``ImmutableSandboxedEnvironment`` with transformers' settings (``trim_blocks``, ``lstrip_blocks``, the
``loopcontrols`` extension, its ``tojson`` filter, ``raise_exception`` and ``strftime_now`` globals;
``transformers/utils/chat_template_utils.py``), so a conversation renders to the same text here as
in ``tokenizer.apply_chat_template(..., tokenize=False)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from vnpu.runtime.errors import InvalidRequestError


class ChatTemplateError(InvalidRequestError):
    """The template refused the conversation (``raise_exception``) or failed to render it."""


class ChatTemplate:
    """A compiled chat template plus the special-token strings templates refer to."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(
            x: Any,
            ensure_ascii: bool = False,
            indent: int | None = None,
            separators: tuple[str, str] | None = None,
            sort_keys: bool = False,
        ) -> str:
            return json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self._template = env.from_string(source)
        self._errors = (jinja2.exceptions.TemplateError, TypeError, ValueError)
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (plain dicts: ``role``, ``content`` and optional fields)."""
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except self._errors as e:
            raise ChatTemplateError(f"the model's chat template refused the messages: {e}") from e
