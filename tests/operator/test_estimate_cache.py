"""Estimates that read a model's files run away from the reconcile pass: a tenant's slow or hostile
files never hold up the pass, nor another namespace's estimates, and a read past its deadline is killed.

Worker threads read with a stand-in estimate here (``isolate=False``), which blocks until the test lets
it go, so every ordering is decided by the test, not by a clock; the child process is tested with real
files at the end.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from model_files import hostile_gguf, safetensors
from test_planner import as_pods, estimate, model, node, run

from vnpu.memory import EstimateError, EstimatePending, FilesNeeded, MemoryEstimate
from vnpu.operator.estimate_cache import EstimateCache
from vnpu.operator.estimate_worker import EstimateProcess, EstimateTimeout
from vnpu.operator.state import ObservedModel


class Files:
    """A stand-in estimate: specs whose source is ``file:///slow/...`` need their files read, and each
    read waits until the test releases that model's name."""

    def __init__(self) -> None:
        self.released: dict[str, threading.Event] = {}
        self.started: list[str] = []
        self.lock = threading.Lock()

    def gate(self, name: str) -> threading.Event:
        with self.lock:
            return self.released.setdefault(name, threading.Event())

    def release(self, name: str) -> None:
        self.gate(name).set()

    def __call__(self, spec: dict[str, Any], read_files: bool = True, **_: Any) -> MemoryEstimate:
        uri = spec["source"]["uri"]
        if not uri.startswith("file:///slow/"):
            return estimate()
        if not read_files:
            raise FilesNeeded(uri)
        name = spec["modelName"]
        with self.lock:
            self.started.append(name)
        assert self.gate(name).wait(30), f"{name} never released"
        return estimate(weights=2048)


def slow(name: str, ns: str = "ns") -> ObservedModel:
    return model(name, ns=ns, source={"uri": f"file:///slow/{name}.gguf"})


@pytest.fixture
def files() -> Iterator[Files]:
    files = Files()
    yield files
    with files.lock:
        started = list(files.started)
    for name in started:  # no worker thread stays blocked after its test
        files.release(name)


def cache_of(files: Files, **kwargs: Any) -> EstimateCache:
    return EstimateCache(estimate=files, isolate=False, **kwargs)


def until(condition: Any, what: str) -> None:
    """Waits for a worker thread to get somewhere (the test's own release decides where it stops)."""
    done = threading.Event()
    for _ in range(3000):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"never: {what}")


def test_a_spec_that_gives_its_sizes_is_estimated_in_the_pass_without_a_worker(files: Files) -> None:
    cache = cache_of(files)
    assert cache.lookup([model("a")], wait_s=0)[("ns", "a")] == estimate()
    assert cache._threads == [] and files.started == []


def test_a_slow_read_never_holds_the_pass_nor_another_namespaces_estimate(files: Files) -> None:
    cache = cache_of(files, workers=2)
    hostile, healthy = slow("h", ns="evil"), slow("ok", ns="good")
    first = cache.lookup([hostile, model("plain", ns="evil")], wait_s=0)
    assert first[("evil", "h")] in (EstimatePending(reading=True), EstimatePending(reading=False))
    assert first[("evil", "plain")] == estimate()  # the namespace's other models are not held up
    files.release("ok")
    assert cache.get(healthy) == estimate(weights=2048)  # read by the other worker meanwhile
    assert cache.lookup([hostile], wait_s=0)[("evil", "h")] == EstimatePending(reading=True)
    files.release("h")
    assert cache.get(hostile) == estimate(weights=2048)
    cache.close()


def test_a_namespace_reads_one_model_at_a_time_and_namespaces_take_turns(files: Files) -> None:
    cache = cache_of(files, workers=2)
    evil = [slow(f"h{i}", ns="evil") for i in range(3)]
    cache.lookup(evil, wait_s=0)
    until(lambda: files.started == ["h0"], "the first read under way")
    got = cache.lookup(evil, wait_s=0)
    assert got[("evil", "h0")] == EstimatePending(reading=True)
    # The second worker is free, yet the namespace's next read waits: one at a time per namespace.
    assert got[("evil", "h1")] == EstimatePending(reading=False, ahead=1)
    assert got[("evil", "h2")] == EstimatePending(reading=False, ahead=2)
    other = slow("x", ns="good")
    files.release("x")
    assert cache.get(other) == estimate(weights=2048)  # the free worker took the other namespace's read
    assert files.started == ["h0", "x"]
    files.release("h0")
    files.release("h1")
    files.release("h2")
    assert cache.get(evil[2]) == estimate(weights=2048)
    assert files.started == ["h0", "x", "h1", "h2"]
    cache.close()


def test_an_answer_no_pass_waits_for_starts_the_next_pass(files: Files) -> None:
    woken = threading.Event()
    cache = cache_of(files, on_ready=woken.set)
    cache.lookup([slow("a")], wait_s=0)
    assert not woken.is_set()
    files.release("a")
    assert woken.wait(10)
    assert cache.lookup([slow("a")], wait_s=0)[("ns", "a")] == estimate(weights=2048)


def test_a_read_the_pass_waited_for_wakes_nobody(files: Files) -> None:
    woken = threading.Event()
    cache = cache_of(files, on_ready=woken.set)
    files.release("a")
    assert cache.lookup([slow("a")], wait_s=None)[("ns", "a")] == estimate(weights=2048)
    assert not woken.is_set()


def test_a_read_answered_before_the_pass_begins_its_wait_wakes_nobody(files: Files, monkeypatch) -> None:
    """The pass marked its reads as awaited only after queueing them all: a worker that answered in
    between saw no mark and woke a second pass for an answer the first one used."""
    woken = threading.Event()
    cache = cache_of(files, on_ready=woken.set)
    files.release("a")
    enqueue = cache._enqueue

    def answered_before_returning(job: Any, **kwargs: Any) -> None:
        enqueue(job, **kwargs)
        until(lambda: not cache._queued_or_reading(job.key), "the read answered")

    monkeypatch.setattr(cache, "_enqueue", answered_before_returning)
    assert cache.lookup([slow("a")], wait_s=None)[("ns", "a")] == estimate(weights=2048)
    assert not woken.wait(0.5)  # (the worker wakes a pass just after it records the answer)
    cache.close()


def test_a_new_generation_drops_the_old_ones_queued_read(files: Files) -> None:
    cache = cache_of(files, workers=1)
    cache.lookup([slow("a")], wait_s=0)
    until(lambda: files.started == ["a"], "a's read under way")
    old = slow("b")
    cache.lookup([old], wait_s=0)  # queued behind it (one worker)
    new = ObservedModel(old.namespace, old.name, old.uid, 2, old.spec, deleting=False, raw_spec=old.raw_spec)
    cache.forget_except([slow("a"), new])
    assert [j.key for jobs in cache._queue.values() for j in jobs] == []
    files.release("a")
    files.release("b")
    assert cache.get(new) == estimate(weights=2048)
    assert files.started == ["a", "b"]  # read once, for the generation that exists
    cache.close()


def test_a_model_being_read_is_pending_and_its_running_pods_stay() -> None:
    nodes = [node("n1")]
    pods = as_pods(run([model("a", 2)], nodes).create)
    running = run([model("a", 2)], nodes, pods, estimates={("ns", "a"): EstimatePending(reading=True)})
    assert running.create == [] and running.delete == []
    status = running.statuses[0].status
    cond = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Ready" and status["readyReplicas"] == 2
    assert cond["Progressing"]["reason"] == "Estimating" and cond["Degraded"]["status"] == "False"
    assert any(e.reason == "Estimating" for e in running.statuses[0].events)

    new = run([model("b", 1)], nodes, estimates={("ns", "b"): EstimatePending(reading=False, ahead=2)})
    assert new.create == []
    status = new.statuses[0].status
    cond = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Pending" and cond["Placed"]["reason"] == "Estimating"
    assert "2 of the namespace's models first" in cond["Placed"]["message"]


# -- the child process, with real files ---------------------------------------------------------------


def file_spec(path: Path) -> dict[str, Any]:
    return {
        "modelName": path.stem,
        "source": {"uri": f"file://{path}"},
        "replicas": 1,
        "memory": {"kvCacheMiB": 256, "activationMiB": 64},
    }


def test_the_child_process_reads_what_the_pass_would_and_is_killed_at_its_deadline(tmp_path: Path) -> None:
    good = file_spec(safetensors(tmp_path / "good.safetensors"))
    bad = file_spec(hostile_gguf(tmp_path / "bad.gguf"))
    reader = EstimateProcess(timeout_s=0.5)
    try:
        got = reader.estimate(good, cache_dir=None, file_roots=(str(tmp_path),), block_size=16)
        assert got.weights_mib == 2
        pid = reader._proc.pid  # type: ignore[union-attr]
        assert reader.estimate(good, cache_dir=None, file_roots=(str(tmp_path),), block_size=16) == got
        assert reader._proc.pid == pid  # type: ignore[union-attr]  # kept between reads
        with pytest.raises(EstimateTimeout, match=r"longer than 0\.5s"):
            reader.estimate(bad, cache_dir=None, file_roots=(str(tmp_path),), block_size=16)
        assert reader._proc is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped
        # Outside the roots: refused before anything is opened, as in the pass.
        with pytest.raises(EstimateError, match="model-file-root"):
            reader.estimate(good, cache_dir=None, file_roots=("/nonexistent",), block_size=16)
        # A new child after the kill: the next model is read as usual.
        assert reader.estimate(good, cache_dir=None, file_roots=(str(tmp_path),), block_size=16) == got
    finally:
        reader.close()


def test_close_ends_a_read_under_way(tmp_path: Path) -> None:
    spec = file_spec(hostile_gguf(tmp_path / "bad.gguf"))
    bad = ObservedModel("ns", "bad", "uid-bad", 1, None, deleting=False, raw_spec=spec)
    cache = EstimateCache(None, (str(tmp_path),), timeout_s=600)
    assert cache.lookup([bad], wait_s=0)[("ns", "bad")] in (
        EstimatePending(reading=True),
        EstimatePending(reading=False),
    )
    until(lambda: cache._readers and cache._readers[0]._proc is not None, "the child started")
    cache.close()
    until(lambda: isinstance(cache.lookup([bad], wait_s=0)[("ns", "bad")], EstimateError), "the read's end")
    got = cache.lookup([bad], wait_s=0)[("ns", "bad")]
    assert "process ended" in str(got) and cache.retry_in(bad) is not None
    until(lambda: not cache._threads[0].is_alive(), "the worker's end")


def test_an_estimate_failing_for_days_is_still_backed_off() -> None:
    """The 1,025th failure in a row (3.5 days at the 5-minute cap) computed ``1.0 * 2 ** 1024``: an
    OverflowError in the pass (or, for a read, in the worker thread, which died holding its model)."""
    from vnpu.operator.estimate_cache import MAX_BACKOFF_SECONDS, _Failed

    def unreadable(spec: dict[str, Any], **_: Any) -> MemoryEstimate:
        raise EstimateError("spec.source.uri could not be read: Stale file handle")

    now = [0.0]
    cache = EstimateCache(estimate=unreadable, isolate=False, clock=lambda: now[0])
    m = model("a")
    assert isinstance(cache.get(m), EstimateError)
    key = (m.uid, m.generation)
    cache._failed[key] = replace(cache._failed[key], attempts=1024, retry_at=0.0)
    now[0] = 1.0
    assert isinstance(cache.lookup([m], wait_s=0)[m.key], EstimateError)
    assert cache._failed[key] == _Failed(cache._failed[key].error, 1.0 + MAX_BACKOFF_SECONDS, 1025)


@pytest.mark.parametrize(
    "source",
    [
        {"uri": "pvc://models/m.safetensors"},  # a claim the operator does not mount
        {"uri": "hf://org/m"},  # no --model-cache-dir
        {"uri": "file:///models/m.gguf"},  # no --model-file-root
    ],
)
def test_a_source_the_operator_cannot_read_is_sized_in_the_pass(source: dict[str, str]) -> None:
    """Its header would only refine the estimate (the activation default wants the model's config):
    nothing to read, so nothing to wait for. Sent to a worker, every such model waited its namespace's
    turn behind the others (the operator bench's 500 models, one namespace: create->pods p99 up 35%)."""
    cache = EstimateCache(None, ())
    m = model("a", source=source, weights={"sizeMiB": 4096})
    assert isinstance(cache.lookup([m], wait_s=0)[m.key], MemoryEstimate)
    assert cache._threads == []


def test_a_source_under_a_model_file_root_is_read_by_a_worker(tmp_path: Path) -> None:
    cache = EstimateCache(None, (str(tmp_path),))
    safetensors(tmp_path / "m.safetensors")
    m = model("a", source={"uri": f"file://{tmp_path}/m.safetensors"}, weights={"sizeMiB": 4096})
    assert isinstance(cache.get(m), MemoryEstimate) and len(cache._threads) == 1
    cache.close()


def test_a_failed_read_keeps_its_error_while_its_retry_is_read_and_sets_no_timer(files: Files) -> None:
    """A retry under way showed the model Pending (or a running one Ready) until it failed again, and
    its past retry time asked for a pass every 0.5 s for as long as the read took: a tenant with many
    failing models kept the operator planning twice a second."""
    now = [0.0]
    failing = [True]

    def read(spec: dict[str, Any], read_files: bool = True, **_: Any) -> MemoryEstimate:
        if not read_files:
            raise FilesNeeded(spec["source"]["uri"])
        if failing[0]:
            raise EstimateError("spec.source.uri could not be read: Stale file handle")
        return files(spec, read_files=True)

    cache = EstimateCache(estimate=read, isolate=False, clock=lambda: now[0])
    m = slow("a")
    error = cache.get(m)
    assert isinstance(error, EstimateError) and cache.retry_in(m) == pytest.approx(1)
    failing[0] = False
    now[0] = 2.0  # past its backoff: the next pass queues the retry, which blocks in files()
    assert cache.lookup([m], wait_s=0)[m.key] is error
    until(lambda: files.started == ["a"], "the retry under way")
    assert cache.lookup([m], wait_s=0)[m.key] is error and cache.retry_in(m) is None
    files.release("a")
    until(lambda: isinstance(cache.lookup([m], wait_s=0)[m.key], MemoryEstimate), "the retry's answer")
    assert cache.retry_in(m) is None
    cache.close()


def test_a_read_that_answers_within_the_pass_wait_is_in_that_pass(files: Files) -> None:
    """The pass waits ESTIMATE_WAIT_S for the reads it queued: a model whose files read at once is
    placed by the pass that first sees it, not the one its answer wakes."""
    woken = threading.Event()
    cache = cache_of(files, on_ready=woken.set)
    files.release("a")
    assert cache.lookup([slow("a")])[("ns", "a")] == estimate(weights=2048)  # the default wait
    assert not woken.is_set()
    cache.close()


def test_no_child_starts_after_kill(tmp_path: Path) -> None:
    """kill() from close() between a worker taking a read and its child starting found no child: the
    child started after the stop and read on (for good, on a hung mount)."""
    reader = EstimateProcess(timeout_s=600)
    reader.kill()
    good = file_spec(safetensors(tmp_path / "good.safetensors"))
    with pytest.raises(EstimateError, match="stopping"):
        reader.estimate(good, cache_dir=None, file_roots=(str(tmp_path),), block_size=16)
    assert reader._proc is None


def test_the_child_is_read_past_descriptor_1023(tmp_path: Path) -> None:
    """select() refuses a descriptor numbered 1024 or more: an operator holding that many (watches,
    connections) failed every file read as a dead child."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    good = file_spec(safetensors(tmp_path / "good.safetensors"))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    reader = EstimateProcess(timeout_s=60)
    try:
        got = reader.estimate(good, cache_dir=None, file_roots=(str(tmp_path),), block_size=16)
        assert got.weights_mib == 2
        assert reader._proc is not None and reader._proc.stdout.fileno() >= 1024  # type: ignore[union-attr]
    finally:
        reader.close()
        for fd in held:
            os.close(fd)


def test_the_child_dies_with_the_operator(tmp_path: Path) -> None:
    """An operator killed (OOM, SIGKILL) mid-read: its child read on to the end of the file, and on a
    hung mount (a stopped child here) for good. It now gets the parent-death signal."""
    import signal
    import subprocess
    import sys

    hostile_gguf(tmp_path / "bad.gguf")
    script = f"""
import threading, time
from vnpu.operator.estimate_worker import EstimateProcess
reader = EstimateProcess(timeout_s=600)
spec = {file_spec(tmp_path / "bad.gguf")!r}
threading.Thread(
    target=reader.estimate, args=(spec,),
    kwargs=dict(cache_dir=None, file_roots=({str(tmp_path)!r},), block_size=16), daemon=True,
).start()
while reader._proc is None:
    time.sleep(0.01)
print(reader._proc.pid, flush=True)
time.sleep(600)
"""
    operator = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(operator.stdout.readline())  # type: ignore[union-attr]

        def reading() -> bool:
            try:
                return any(os.readlink(fd).endswith("bad.gguf") for fd in Path(f"/proc/{child}/fd").iterdir())
            except OSError:  # an fd closed while looked at
                return False

        until(reading, "the child reading the file")
        os.kill(child, signal.SIGSTOP)  # a read that never ends, as on a hung mount
        operator.send_signal(signal.SIGKILL)
        operator.wait(30)

        def gone() -> bool:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return True
            # Reparented and killed: a zombie until its new parent reaps it.
            return Path(f"/proc/{child}/stat").read_text().split(") ")[1].startswith("Z")

        until(gone, "the child's end")
    finally:
        operator.kill()
        operator.wait(30)
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(child, signal.SIGKILL)
