"""Memory estimates that read a tenant's model files, run in a child process under a deadline.

A model's header is the tenant's bytes. Within every bound the reader keeps, a hostile one still costs
seconds of CPU (a GGUF header of 8M empty strings: 7 s), and a read from a hung NFS mount never ends.
Read inside the reconcile pass, either stalled every namespace's pass. A child process can be killed
at the deadline (a thread cannot), runs at a lower CPU priority than the operator's pass, and holds no
GIL the operator needs. One is started on first use and kept for the next estimate; each answer is a
pickled :class:`~vnpu.memory.MemoryEstimate` or an error message. (The child is the operator's own
code running with the operator's own rights: nothing it could send back is worth more than what it
already has.)

    python -m vnpu.operator.estimate_worker PID  # the child of PID: frames on stdin, answers on stdout
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

from vnpu.memory import EstimateError, FilesNeeded, MemoryEstimate, estimate_from_spec
from vnpu.signals import die_with_parent

#: The child's niceness: its CPU goes to the operator's own pass first.
CHILD_NICENESS = 10
_LENGTH = struct.Struct(">I")
#: A request is a model's spec (the API server bounds an object at 1.5 MiB) and an answer is an
#: estimate: a frame past this is a broken pipe, not data.
MAX_FRAME_BYTES = 16 * 1024 * 1024


class EstimateBug(EstimateError):
    """The estimate raised what nobody foresaw (a bug, or an input no check knew): ``trace`` is the
    child's traceback, for the operator's log rather than the model's status."""

    def __init__(self, message: str, trace: str) -> None:
        super().__init__(message)
        self.trace = trace


class EstimateTimeout(EstimateError):
    """The child did not answer by the deadline (and was killed)."""


class EstimateProcess:
    """One child process that estimates one model at a time; the caller serializes its calls."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        #: Set by kill(): no child starts after it (a kill that came between a worker taking a read and
        #: its child starting would otherwise miss it, and the child would read on after the stop).
        self._killed = False
        self._lock = threading.Lock()  # _killed and _proc, between kill() and the reading thread

    def estimate(
        self,
        spec: Mapping[str, Any],
        *,
        cache_dir: str | None,
        file_roots: tuple[str, ...],
        block_size: int,
    ) -> MemoryEstimate:
        """The estimate, as :func:`~vnpu.memory.estimate_from_spec` gives it; raises EstimateError for
        the spec's, the files' and the child's failures alike (a deadline passed, the child killed)."""
        proc = self._started()
        request = pickle.dumps(
            (dict(spec), {"cache_dir": cache_dir, "file_roots": file_roots, "block_size": block_size})
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(_LENGTH.pack(len(request)) + request)
            proc.stdin.flush()
            answer = _read_frame(proc.stdout, time.monotonic() + self.timeout_s)
        except TimeoutError:
            self.close()
            raise EstimateTimeout(
                f"reading the model's files took longer than {self.timeout_s:g}s (the operator's "
                "--estimate-timeout); retrying with backoff"
            ) from None
        except (OSError, EOFError, ValueError) as exc:
            code = self.close()
            raise EstimateError(f"the estimate's process ended (exit code {code}): {exc}") from None
        kind, value, trace = pickle.loads(answer)
        if kind == "ok":
            return value  # type: ignore[no-any-return]
        if trace:
            raise EstimateBug(value, trace)
        raise EstimateError(value)

    def kill(self) -> None:
        """Kill the child now (from any thread): a read under way ends as an error, and the thread
        that made it closes this process. No child starts after it."""
        with self._lock:
            self._killed = True
            proc = self._proc
        if proc is not None:
            proc.kill()

    def close(self) -> int | None:
        """Kill the child, if any; returns its exit code."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return None
        proc.kill()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        return proc.wait()

    def _started(self) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._killed:
                raise EstimateError("the operator is stopping: the model's files were not read")
            if self._proc is not None and self._proc.poll() is None:
                return self._proc
            # Started under the lock: a kill() from now on finds the child and kills it.
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "vnpu.operator.estimate_worker", str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
            )
            return self._proc


def _read_frame(stream: BinaryIO, deadline: float) -> bytes:
    """One length-prefixed frame from ``stream``; TimeoutError past ``deadline``, EOFError at its end."""
    poller = select.poll()  # (select() refuses a descriptor numbered 1024 or more)
    fd = stream.fileno()
    poller.register(fd, select.POLLIN)
    data = b""
    want = _LENGTH.size
    header = True
    while len(data) < want:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise TimeoutError
        chunk = os.read(fd, want - len(data))
        if not chunk:
            raise EOFError("no answer")
        data += chunk
        if header and len(data) == want:
            (length,) = _LENGTH.unpack(data)
            if length > MAX_FRAME_BYTES:
                raise ValueError(f"a frame of {length} bytes")
            data, want, header = b"", length, False
    return data


def checked(estimate: Callable[[], MemoryEstimate]) -> MemoryEstimate:
    """Runs ``estimate``; every failure comes out as an EstimateError naming what went wrong (an
    EstimateBug for what nobody foresaw: that model's failure, not the reconcile pass's)."""
    try:
        return estimate()
    except (EstimateError, FilesNeeded):
        raise
    except OSError as exc:
        raise EstimateError(f"spec.source.uri could not be read: {exc}") from None
    except Exception as exc:
        raise EstimateBug(
            f"the memory estimate failed unexpectedly: {exc!r}", traceback.format_exc()
        ) from None


def _answer(request: bytes) -> tuple[str, Any, str]:
    """(kind, value, traceback): ("ok", the estimate, ""), or ("error", its message, the traceback of
    an exception nobody foresaw, else "")."""
    spec, options = pickle.loads(request)
    try:
        return "ok", checked(lambda: estimate_from_spec(spec, **options)), ""
    except EstimateBug as exc:
        return "error", str(exc), exc.trace
    except EstimateError as exc:
        return "error", str(exc), ""


def main() -> None:
    """The child's loop: a request per frame on stdin, an answer per frame on stdout, until EOF. Killed
    with the operator: a read on a hung mount would otherwise outlive it, for good."""
    die_with_parent(int(sys.argv[1]) if len(sys.argv) > 1 else None)
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print() must not corrupt the frames
    os.nice(CHILD_NICENESS)
    while True:
        header = requests.read(_LENGTH.size)
        if len(header) < _LENGTH.size:
            return  # the operator closed the pipe (it stopped, or gave this child up)
        (length,) = _LENGTH.unpack(header)
        answer = pickle.dumps(_answer(requests.read(length)))
        answers.write(_LENGTH.pack(len(answer)) + answer)
        answers.flush()


if __name__ == "__main__":
    main()
