"""Cutting a value someone else chose before it is echoed: in an error body, a status, an Event or a
log line. A client's 7 MiB ``model`` made a 7 MiB 404, and a holder's peer without the key a 64 KiB
log line per connection. One rule for every component, in a module that imports nothing (the
weight-holder and the replicas must not load aiohttp for it)."""

from __future__ import annotations

#: Longest echo of a value someone else chose, unless the caller gives its own limit.
MAX_SHOWN_CHARS = 80


def shown(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying so."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
