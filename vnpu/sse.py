"""Server-sent events as the OpenAI streaming API frames them: one ``data:`` line per event, a blank
line after it, and ``data: [DONE]`` at the end (the runtime's streams, and the gateway's own ending of a
stream whose replica broke off)."""

from __future__ import annotations

import json
from typing import Any


def event(data: dict[str, Any] | str) -> bytes:
    """One event: a JSON object, or a bare string such as ``[DONE]``."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


DONE = event("[DONE]")
