"""Signals that reach a process through a thread other than its main one.

The kernel delivers a process-directed signal (the kubelet's SIGTERM, ``kill PID``) to any thread of the
process that does not block it. CPython runs the Python handler on the main thread, and learns of a
signal caught elsewhere only when its main thread next runs Python code. On an H200 every ``vnpu runtime
serve`` outlived SIGTERM that way (its main thread waited without a timeout; the driver's threads
caught the signal). ``tgkill`` aims a signal at one thread, so a test makes that delivery certain.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
from pathlib import Path

_SYS_TGKILL = {"x86_64": 234, "aarch64": 131}


def blocks(pid: int, tid: int, sig: int) -> bool:
    """Whether thread ``tid`` of ``pid`` blocks ``sig`` (its ``SigBlk`` mask)."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def signal_another_thread(pid: int, sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` to the newest thread of ``pid`` that is not its main thread and does not block it.
    Returns that thread's id."""
    tids = sorted((int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid), reverse=True)
    tid = next((t for t in tids if not blocks(pid, t, sig)), None)
    if tid is None:
        raise AssertionError(f"process {pid} has no thread but its main one that takes signal {sig}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_TGKILL[platform.machine()], pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {sig}) failed")
    return tid
