"""Memory estimates per InferenceModel, kept out of the reconcile pass's way.

A success is cached by (uid, generation): a spec that has not changed cannot change its estimate. A
failure is not: it may be transient (an ``hf://`` cache on NFS during a hiccup, a file being copied
in), so it is retried with exponential backoff (1 s doubling to 5 minutes), and the planner keeps a
running model's pods meanwhile.

An estimate the spec alone gives (``weights.sizeMiB``, ``modelConfig``) is arithmetic, worked out in
the pass. One that reads the model's files reads the tenant's bytes at the storage's speed: a hostile
header costs seconds of CPU within every bound, a hung NFS read never ends. Those are read by worker
threads, each with a child process it kills at the deadline (:mod:`vnpu.operator.estimate_worker`).
The pass waits up to :data:`ESTIMATE_WAIT_S` for the reads it queued itself, so that a model with
readable files is placed in the pass that first sees it; one still being read is
:class:`~vnpu.memory.EstimatePending` (nothing placed for it yet, a running model's pods kept), and the
pass after its answer starts at once (``on_ready``). Namespaces take turns, and a namespace reads one
model at a time: a tenant's slow files hold one worker at most, and another tenant's estimate waits
for none of them while a worker is free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vnpu import api
from vnpu.backoff import backoff_seconds
from vnpu.memory import EstimateError, EstimatePending, FilesNeeded, MemoryEstimate, estimate_from_spec
from vnpu.operator import metrics
from vnpu.operator.estimate_worker import EstimateBug, EstimateProcess, EstimateTimeout, checked
from vnpu.operator.state import ObservedModel

log = logging.getLogger(__name__)

BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 300.0
#: The longest a pass waits for the estimates it queued (a small model's files read in milliseconds).
ESTIMATE_WAIT_S = 0.5
#: Worker threads (each with its child process): ``--estimate-workers``.
DEFAULT_WORKERS = 2
#: The longest one estimate may read a model's files: ``--estimate-timeout``. A large real checkpoint's
#: headers read in well under a second (a GGUF's metadata: its tokenizer's strings, about 1 us each).
DEFAULT_TIMEOUT_S = 20.0

Estimate = MemoryEstimate | EstimateError | EstimatePending
_Key = tuple[str, int]  # (uid, generation)


@dataclass(frozen=True)
class _Failed:
    error: EstimateError
    retry_at: float
    attempts: int


@dataclass(frozen=True)
class _Job:
    key: _Key
    namespace: str
    name: str
    spec: Mapping[str, Any]


class EstimateCache:
    def __init__(
        self,
        cache_dir: str | None = None,
        file_roots: tuple[str, ...] = (),
        *,
        workers: int = DEFAULT_WORKERS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        estimate: Callable[..., MemoryEstimate] = estimate_from_spec,
        isolate: bool = True,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """``estimate`` is :func:`~vnpu.memory.estimate_from_spec` or a test's stand-in; ``isolate``
        reads files in child processes (off: in the worker threads, with ``estimate``); ``on_ready`` is
        called from a worker thread when an answer came that no pass is waiting for."""
        self.cache_dir = cache_dir
        self.file_roots = file_roots
        self.workers = workers
        self.timeout_s = timeout_s
        self._clock = clock
        self._estimate = estimate
        self._isolate = isolate
        self.on_ready = on_ready
        self._cond = threading.Condition()
        # Everything below is guarded by _cond.
        self._ok: dict[_Key, MemoryEstimate] = {}
        self._failed: dict[_Key, _Failed] = {}
        #: namespace -> its models' reads, oldest first; the dict's order is the namespaces' turns.
        self._queue: dict[str, deque[_Job]] = {}
        self._queued: set[_Key] = set()  # the keys of the jobs in _queue
        self._reading: dict[_Key, str] = {}  # key -> namespace
        self._awaited: set[_Key] = set()  # the reads a pass waits for now (their answers wake nobody)
        self._threads: list[threading.Thread] = []
        self._readers: list[EstimateProcess] = []
        self._closed = False

    # -- the pass's side -------------------------------------------------------------------------------
    def lookup(
        self, models: Sequence[ObservedModel], wait_s: float | None = ESTIMATE_WAIT_S
    ) -> dict[tuple[str, str], Estimate]:
        """Each model's estimate, its error (retried once its backoff ends) or EstimatePending. Waits up
        to ``wait_s`` (None: for good) for the files this call queued to be read."""
        queued: set[_Key] = set()
        try:
            for m in models:
                key = (m.uid, m.generation)
                with self._cond:
                    if key in self._ok or self._queued_or_reading(key) or self._backing_off(key):
                        continue
                spec = m.raw_spec
                try:  # the spec alone, if it gives the estimate: nothing is opened
                    estimate = checked(lambda: self._run(spec, read_files=False))  # noqa: B023 (called here)
                except FilesNeeded:
                    self._enqueue(_Job(key, m.namespace, m.name, spec), awaited=True)
                    queued.add(key)
                except EstimateError as exc:
                    self._record(key, f"{m.namespace}/{m.name}", exc)
                else:
                    self._record(key, f"{m.namespace}/{m.name}", estimate)
            if queued:
                with self._cond:
                    self._cond.wait_for(lambda: not any(map(self._queued_or_reading, queued)), wait_s)
        finally:
            if queued:  # (marked by _enqueue)
                with self._cond:
                    self._awaited = set()
        with self._cond:
            ahead = self._ahead()
            return {m.key: self._known((m.uid, m.generation), ahead) for m in models}

    def get(self, model: ObservedModel) -> Estimate:
        """One model's estimate, waiting for its files to be read if they are (tests, tools)."""
        self.lookup([model], wait_s=0)
        key = (model.uid, model.generation)
        with self._cond:
            self._cond.wait_for(lambda: not self._queued_or_reading(key))
            return self._known(key, {})

    def retry_in(self, model: ObservedModel) -> float | None:
        """Seconds until a failed estimate of ``model`` is tried again (None: not failing)."""
        key = (model.uid, model.generation)
        with self._cond:
            if self._queued_or_reading(key):
                return None  # its retry is under way: the answer wakes the next pass
            failed = self._failed.get(key)
        return None if failed is None else max(0.0, failed.retry_at - self._clock())

    def forget_except(self, models: Iterable[ObservedModel]) -> None:
        """Drop entries and queued reads of models and generations that no longer exist (a read under
        way ends as it will; its answer goes with the next call)."""
        live = {(m.uid, m.generation) for m in models}
        with self._cond:
            self._ok = {k: v for k, v in self._ok.items() if k in live}
            self._failed = {k: v for k, v in self._failed.items() if k in live}
            for namespace, jobs in list(self._queue.items()):
                kept = deque(j for j in jobs if j.key in live)
                if kept:
                    self._queue[namespace] = kept
                else:
                    del self._queue[namespace]
            self._queued &= live
            self._count_pending()

    def close(self) -> None:
        """Stop the workers and kill their child processes (a read under way ends as an error)."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._queued.clear()
            self._cond.notify_all()
            readers = list(self._readers)
        for reader in readers:
            reader.kill()

    # -- under the lock --------------------------------------------------------------------------------
    def _known(self, key: _Key, ahead: Mapping[_Key, int]) -> Estimate:
        if key in self._ok:
            return self._ok[key]
        if key in self._failed:  # its last error stands while its retry is read (no flapping status)
            return self._failed[key].error
        if key in self._reading:
            return EstimatePending(reading=True)
        if key in self._queued:
            return EstimatePending(reading=False, ahead=ahead.get(key, 0))
        return EstimatePending(reading=False)

    def _ahead(self) -> dict[_Key, int]:
        """Each queued read's count of its namespace's reads before it (the one under way included)."""
        reading = set(self._reading.values())
        return {
            job.key: i + (namespace in reading)
            for namespace, jobs in self._queue.items()
            for i, job in enumerate(jobs)
        }

    def _queued_or_reading(self, key: _Key) -> bool:
        return key in self._reading or key in self._queued

    def _backing_off(self, key: _Key) -> bool:
        failed = self._failed.get(key)
        return failed is not None and self._clock() < failed.retry_at

    def _count_pending(self) -> None:
        metrics.ESTIMATES_PENDING.set(len(self._reading) + len(self._queued))

    def _take(self) -> _Job | None:
        """The next read: the oldest of the first namespace in turn that reads nothing now."""
        busy = set(self._reading.values())
        for namespace in list(self._queue):
            if namespace in busy:
                continue
            jobs = self._queue.pop(namespace)
            job = jobs.popleft()
            if jobs:
                self._queue[namespace] = jobs  # to the back of the turns
            self._queued.discard(job.key)
            self._reading[job.key] = namespace
            return job
        return None

    # -- the workers' side -----------------------------------------------------------------------------
    def _enqueue(self, job: _Job, awaited: bool = False) -> None:
        """Queue ``job``; ``awaited``: the pass waits for it (its answer wakes nobody), marked under
        the same lock, so a worker that answers before the pass starts waiting knows it too."""
        with self._cond:
            if self._closed:
                return
            if awaited:
                self._awaited.add(job.key)
            self._queue.setdefault(job.namespace, deque()).append(job)
            self._queued.add(job.key)
            self._count_pending()
            if len(self._threads) < self.workers:
                thread = threading.Thread(
                    target=self._work, name=f"vnpu-estimate-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            self._cond.notify_all()

    def _work(self) -> None:
        reader = EstimateProcess(self.timeout_s) if self._isolate else None
        if reader is not None:
            with self._cond:
                self._readers.append(reader)
        try:
            while True:
                with self._cond:
                    job = None
                    while not self._closed and (job := self._take()) is None:
                        self._cond.wait()
                    if job is None:
                        return
                started = time.monotonic()
                result = self._read(job, reader)
                outcome = (
                    "ok" if isinstance(result, MemoryEstimate) else
                    "timeout" if isinstance(result, EstimateTimeout) else "error"
                )  # fmt: skip
                metrics.ESTIMATE_READ_SECONDS.labels(outcome).observe(time.monotonic() - started)
                with self._cond:
                    del self._reading[job.key]
                    self._record(job.key, f"{job.namespace}/{job.name}", result)
                    wake = job.key not in self._awaited
                    self._cond.notify_all()
                if wake and self.on_ready is not None:
                    try:
                        self.on_ready()
                    except RuntimeError:  # the operator's loop is closed: it is stopping
                        log.debug("no pass to wake for %s/%s's estimate", job.namespace, job.name)
        finally:
            if reader is not None:
                reader.close()

    def _read(self, job: _Job, reader: EstimateProcess | None) -> MemoryEstimate | EstimateError:
        try:
            if reader is not None:
                return reader.estimate(job.spec, **self._options())
            return checked(lambda: self._run(job.spec, read_files=True))
        except EstimateError as exc:
            return exc
        except Exception as exc:  # the worker outlives what it did not foresee (an answer it cannot read)
            log.exception("reading %s/%s's files failed unexpectedly", job.namespace, job.name)
            return EstimateError(f"the memory estimate failed unexpectedly: {exc!r}")

    def _run(self, spec: Mapping[str, Any], *, read_files: bool) -> MemoryEstimate:
        return self._estimate(spec, **self._options(), read_files=read_files)

    def _options(self) -> dict[str, Any]:
        """What every estimate is made with, in the pass, a worker or a child process."""
        # The KV cache is sized in blocks, as the runtime's paged pool is.
        return {"cache_dir": self.cache_dir, "file_roots": self.file_roots, "block_size": api.KV_BLOCK_SIZE}

    def _record(self, key: _Key, model: str, result: MemoryEstimate | EstimateError) -> None:
        """Keep a success for the generation; back a failure off. (Takes _cond: it is reentrant.)"""
        with self._cond:
            if isinstance(result, MemoryEstimate):
                self._ok[key] = result
                self._failed.pop(key, None)
            else:
                if isinstance(result, EstimateBug):
                    log.error(
                        "estimating a model failed unexpectedly\n%s", result.trace, extra={"model": model}
                    )
                failed = self._failed.get(key)
                attempts = failed.attempts + 1 if failed else 1
                delay = backoff_seconds(attempts, BACKOFF_SECONDS, MAX_BACKOFF_SECONDS)
                self._failed[key] = _Failed(result, self._clock() + delay, attempts)
            self._count_pending()
