"""When a background loop of the plugin last made progress, and whether it has stopped making any: what
``/healthz`` answers. A hung loop (a deadlock, a driver call that never returns) is mended only by a
restart, which keeps every allocation (the checkpoint)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Heartbeat:
    """The loop calls :meth:`beat` each time it makes progress; :meth:`stalled` says why it needs a
    restart, naming the loop (``loop``) and what probably hangs (``hint``)."""

    def __init__(self, loop: str, hint: str = "hung?", clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        self.hint = hint
        self._clock = clock
        self._last = clock()  #: when it last made progress (its creation, before the first)

    def beat(self) -> None:
        self._last = self._clock()

    def stalled(self, thread: threading.Thread | None, stopping: bool, limit_s: float) -> str | None:
        """Why the loop running on ``thread`` needs a restart, or None: not started yet, stopping,
        or it made progress within ``limit_s``."""
        if thread is None or stopping:
            return None
        if not thread.is_alive():
            return f"the {self.loop} has ended"
        idle = self._clock() - self._last
        if idle > limit_s:
            return f"the {self.loop} has made no progress for {idle:.0f}s ({self.hint})"
        return None
