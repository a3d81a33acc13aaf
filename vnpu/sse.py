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


#: The most of one event the gateway holds back waiting for its end; a stream that never ends its
#: events within that is passed on as it comes. A runtime's largest event (a token with 20 top
#: logprobs) is about 1.5 KiB; the bound is per stream, and a tenant's replica that never frames its
#: events must not make the shared gateway hold much for each of its streams.
MAX_HELD_BYTES = 64 << 10


class EventFramer:
    """Cuts a relayed stream at the ends of its events, so that what ends a stream early (the gateway's
    ``error`` event when the replica's answer breaks off, or when its drain runs out) follows a whole
    event. Relayed as it came, a break mid-event put the error's ``data:`` line inside the cut event,
    and the client failed to parse it instead of reading why the stream ended. A whole event is passed
    on the moment its end arrives, so streaming is as prompt as before."""

    def __init__(self, max_held: int = MAX_HELD_BYTES) -> None:
        self._held = bytearray()
        self._max_held = max_held

    def feed(self, chunk: bytes) -> bytes:
        """What of the stream so far may go out: up to the end of its last whole event."""
        seen = max(0, len(self._held) - 3)  # an end split across chunks is found too
        self._held += chunk
        end = _last_event_end(self._held, seen)
        if end == 0 and len(self._held) > self._max_held:
            end = len(self._held)
        whole = bytes(self._held[:end])
        del self._held[:end]
        return whole

    @property
    def held(self) -> bytes:
        """The start of an event whose end has not come (at the end of a stream: passed on as is)."""
        return bytes(self._held)


def _last_event_end(data: bytearray, start: int) -> int:
    """The offset just past the last blank line at or after ``start`` (``\\n\\n`` or ``\\r\\n\\r\\n``,
    as the SSE specification allows); 0 if there is none."""
    lf, crlf = data.rfind(b"\n\n", start), data.rfind(b"\r\n\r\n", start)
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
