"""Waits on a process's main thread that a signal handler can end.

CPython runs every Python signal handler on the main thread, but the kernel hands a process-directed
signal (the kubelet's SIGTERM) to any thread of the process that does not block it: one of gRPC's,
aiohttp's, or a GPU driver's. The main thread then learns of it only when it next runs Python code, so
a main thread blocked in a wait without a timeout sleeps through SIGTERM until the kubelet's SIGKILL.
Seen on an H200: every ``vnpu runtime serve`` outlived SIGTERM, another thread (most likely one of the
CUDA driver's) having caught it; tests/thread_signals.py makes that delivery certain on any machine. An
asyncio main loop with its handlers installed is immune (they wake it through the wakeup fd); every
other main-thread wait uses these.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading

_PR_SET_PDEATHSIG = 1

#: The longest a main-thread wait sleeps before it lets pending signal handlers run, in seconds.
SIGNAL_POLL_S = 0.5


def wait_until_set(event: threading.Event) -> None:
    """Block until ``event`` is set (by a signal handler, say), running pending handlers meanwhile."""
    while not event.wait(SIGNAL_POLL_S):
        pass


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it ends (Linux's parent-death
    signal; elsewhere nothing), so that a helper cannot outlive a parent that was killed. ``parent``:
    the pid that started us, to exit at once if it ended before the request could take effect."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(1)
