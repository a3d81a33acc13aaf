"""Errors the runtime reports to its callers (torch-free, so the CLI can catch them cheaply)."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """The request cannot be served as asked (answered with HTTP 400)."""


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested tokens do not fit the context this process was started with; ``param``:
    the request's field holding the prompt (None outside an HTTP request)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RuntimeUnavailableError(RuntimeError):
    """The model cannot serve right now (weights not loaded, or the weights-holder went away)."""


class MemoryBudgetError(RuntimeError):
    """The configuration does not fit ``VNPU_MEMORY_LIMIT_MIB``."""


class OffloadPlanError(ValueError):
    """The device budget cannot hold even the prefetch ring (the message gives the numbers)."""
