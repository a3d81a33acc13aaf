"""Real processes: one weights-holder, four ``serve`` replicas attached to it, and a standalone one.

Checks the acceptance bar of shared weights on CPU: identical tokens, one physical copy of the weights
(PSS), clear failures while the holder is gone and recovery when it returns.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vnpu.bench.probes import free_port, http_json, mapping_kib, pss_kib, rss_kib

REPLICAS = 4
CONTEXT = 256
REQUEST = {
    "prompt": "The three primary colors are",
    "max_tokens": 12,
    "temperature": 0,
    "return_token_ids": True,
}
GROUP = "smollm2-test"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass
class Cluster:
    root: Path
    model: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, *args: str, port: int | None = None) -> Proc:
        log = self.root / f"{name}.log"
        cmd = [sys.executable, "-m", "vnpu", "runtime", *args, "--threads", "1", "--no-progress"]
        if port is not None:
            cmd += ["--port", str(port)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with log.open("w") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        proc = Proc(name, popen, log, port)
        self.procs.append(proc)
        return proc

    def holder(self) -> Proc:
        proc = self.spawn(
            "holder",
            "weights-holder",
            "--model",
            str(self.model),
            *self.sharing(),
        )
        wait_for(lambda: '"event": "ready"' in proc.log.read_text(), proc, 180)
        return proc

    def sharing(self) -> list[str]:
        """The share identity, key and device the operator and device plugin would give a pod."""
        key = self.root / "key"
        if not key.exists():
            key.write_bytes(os.urandom(32))
            key.chmod(0o600)
        return [
            *("--share-namespace", "procs", "--share-group", GROUP, "--weights-id", "w-procs"),
            *("--share-key-file", str(key), "--socket-dir", str(self.root / "sock"), "--device-id", "cpu0"),
        ]

    def serve(self, name: str, *args: str) -> Proc:
        return self.spawn(name, "serve", "--max-context", str(CONTEXT), *args, port=free_port())


def wait_for(condition: Any, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.popen.poll() is not None:
            raise AssertionError(
                f"{proc.name} exited {proc.popen.returncode}:\n{proc.log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.name} not ready in {timeout}s:\n{proc.log.read_text()[-3000:]}")
        time.sleep(0.2)


def ready(proc: Proc) -> bool:
    try:
        return http_json(proc.url + "/readyz", timeout=5)[0] == 200
    except OSError:
        return False


def complete(proc: Proc) -> dict:
    status, body = http_json(proc.url + "/v1/completions", REQUEST)
    assert status == 200, body
    return body["choices"][0]


@pytest.fixture(scope="module")
def cluster(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="vnpu-procs-"))  # short: unix socket paths are limited
    c = Cluster(root, smollm2_path)
    try:
        yield c
    finally:
        for proc in c.procs:
            proc.stop(signal.SIGKILL)
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def standalone(cluster: Cluster) -> dict[str, Any]:
    """A replica that loads the weights itself: its tokens, and its memory once it has run."""
    proc = cluster.serve("standalone", "--standalone", "--model", str(cluster.model))
    wait_for(lambda: ready(proc), proc, 240)
    choice = complete(proc)
    result = {"choice": choice, "pss_kib": pss_kib(proc.popen.pid), "rss_kib": rss_kib(proc.popen.pid)}
    proc.stop()
    return result


@pytest.fixture(scope="module")
def shared(cluster: Cluster, standalone: dict[str, Any]) -> dict[str, Any]:
    holder = cluster.holder()
    replicas = [
        cluster.serve(f"replica{i}", "--model", str(cluster.model), *cluster.sharing())
        for i in range(REPLICAS)
    ]
    for proc in replicas:
        wait_for(lambda p=proc: ready(p), proc, 240)
    return {"holder": holder, "replicas": replicas}


def test_replicas_generate_the_same_tokens_as_a_standalone_process(
    shared: dict[str, Any], standalone: dict[str, Any]
) -> None:
    expected = standalone["choice"]
    assert len(expected["token_ids"]) == REQUEST["max_tokens"]
    for proc in shared["replicas"]:
        choice = complete(proc)
        assert choice["token_ids"] == expected["token_ids"] and choice["text"] == expected["text"], proc.name


def test_one_physical_copy_of_the_weights(
    shared: dict[str, Any], standalone: dict[str, Any], smollm2_weights: Any
) -> None:
    """PSS(holder + 4 replicas) <= weights + 4 x (KV + overhead) + 10%.

    Overhead is measured, not assumed: what a replica running alone costs besides its weights and KV
    cache (interpreter, torch, tokenizer, activations) — the standalone replica's RSS minus those.
    RSS, not PSS: a standalone's PSS depends on how many other processes on the machine (pytest
    itself, other test processes) happen to map the same torch libraries, which made the bound vary
    from machine to machine. The one-copy property itself is asserted directly below (the PSS shares
    of the weight mapping sum to one copy).
    """
    for proc in shared["replicas"]:
        complete(proc)  # every replica has touched every weight
    weights_kib = smollm2_weights.manifest.total_bytes / 1024
    kv_kib = smollm2_weights.manifest.config.kv_bytes_per_token(4) * CONTEXT / 1024
    overhead_kib = standalone["rss_kib"] - weights_kib - kv_kib
    assert overhead_kib > 0
    pids = [shared["holder"].popen.pid] + [p.popen.pid for p in shared["replicas"]]
    total_kib = sum(pss_kib(pid) for pid in pids)
    bound_kib = 1.10 * (weights_kib + REPLICAS * (kv_kib + overhead_kib))
    mib = {
        k: round(v / 1024)
        for k, v in {"total": total_kib, "bound": bound_kib, "weights": weights_kib}.items()
    }
    print(f"\nPSS of holder + {REPLICAS} replicas {mib}, overhead/replica {overhead_kib / 1024:.0f} MiB")
    assert total_kib <= bound_kib
    # And directly: every process maps all the weight pages, yet their PSS shares sum to one copy.
    maps = [mapping_kib(pid, "memfd:vnpu-weights") for pid in pids]
    for rss, _ in maps:
        assert rss >= 0.99 * weights_kib
    assert abs(sum(pss for _, pss in maps) - weights_kib) <= 0.01 * weights_kib


def test_holder_death_fails_clearly_and_replicas_recover(cluster: Cluster, shared: dict[str, Any]) -> None:
    replicas = shared["replicas"]
    expected = complete(replicas[0])["token_ids"]
    shared["holder"].stop(signal.SIGKILL)
    for proc in replicas:
        wait_for(lambda p=proc: not ready(p), proc, 30)
        status, body = http_json(proc.url + "/v1/completions", REQUEST)
        assert status == 503
        assert "weights-holder" in body["error"]["message"], body
        assert proc.popen.poll() is None  # failing requests, not a crashed process
    cluster.holder()  # it comes back (a fresh process: a new arena)
    for proc in replicas:
        wait_for(lambda p=proc: ready(p), proc, 120)
        assert complete(proc)["token_ids"] == expected


def test_sigterm_finishes_the_request_in_flight_then_exits(cluster: Cluster) -> None:
    """The model runs on serve's main thread and HTTP on another (ModelRuntime.run_engine): SIGTERM
    still stops gracefully, as aiohttp's run_app did: no new requests, the one in flight completes."""
    proc = cluster.serve("graceful", "--standalone", "--model", str(cluster.model))
    wait_for(lambda: ready(proc), proc, 240)
    client, answers = _long_request_in_flight(proc)
    proc.popen.send_signal(signal.SIGTERM)
    client.join(120)
    assert proc.popen.wait(60) == 0, proc.log.read_text()[-3000:]
    ((status, body),) = answers
    assert status == 200 and body["usage"]["completion_tokens"] == 64, body
    assert not ready(proc)


def _long_request_in_flight(proc: Proc) -> tuple[threading.Thread, list[tuple[int, Any]]]:
    """A client thread whose 64-token completion ``proc`` is generating when this returns, and the list
    its (status, body) lands in: (0, the error) when the server cut the connection."""
    answers: list[tuple[int, Any]] = []
    long = {**REQUEST, "max_tokens": 64, "ignore_eos": True}

    def ask() -> None:
        try:
            answers.append(http_json(proc.url + "/v1/completions", long))
        except OSError as e:
            answers.append((0, repr(e)))

    client = threading.Thread(target=ask)
    client.start()
    wait_for(lambda: _generating(proc), proc, 60)
    return client, answers


def _generating(proc: Proc) -> bool:
    try:
        with urllib.request.urlopen(proc.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return False
    return "vnpu_runtime_requests_running 1.0" in text


def test_a_serving_holder_answers_for_any_model_of_its_group_and_still_shares(
    cluster: Cluster, standalone: dict[str, Any]
) -> None:
    """``weights-holder --serve`` (a model that may scale to zero and keeps its holder): the holder itself
    answers, under whichever name of its share group the gateway forwards, with the tokens a replica
    gives, while replicas still attach to its weights. Its own group and socket: the module's holder
    is another process."""
    sharing = cluster.sharing()
    sharing[sharing.index("--share-group") + 1] = "serving-holder"
    port = free_port()
    holder = cluster.spawn(
        "serving-holder",
        "weights-holder",
        "--serve",
        *("--model", str(cluster.model), "--max-context", str(CONTEXT), "--max-batch", "1"),
        *sharing,
        port=port,
    )
    wait_for(lambda: '"event": "ready"' in holder.log.read_text(), holder, 180)
    assert ready(holder)  # the HTTP server is up before the socket is bound and "ready" is said
    for name in ("chat", "team-a-chat"):
        status, body = http_json(holder.url + "/v1/completions", {**REQUEST, "model": name})
        assert status == 200, body
        assert body["model"] == name
        assert body["choices"][0]["token_ids"] == standalone["choice"]["token_ids"]
    replica = cluster.serve("serving-holder-replica", "--model", str(cluster.model), *sharing)
    try:
        wait_for(lambda: ready(replica), replica, 240)
        assert complete(replica)["token_ids"] == standalone["choice"]["token_ids"]
    finally:
        replica.stop()
        holder.stop()
    assert holder.popen.returncode == 0, holder.log.read_text()[-2000:]


def test_a_holder_too_small_to_serve_still_holds(cluster: Cluster) -> None:
    """A memory limit with room for the weights but not one sequence's KV: the holder logs why it
    cannot serve and holds (its replicas need the weights more than a warm answer)."""
    sharing = cluster.sharing()
    sharing[sharing.index("--share-group") + 1] = "tight-holder"
    # float32 weights are 514 MiB; one sequence of 8192 tokens needs 360 MiB of KV.
    holder = cluster.spawn(
        "tight-holder",
        "weights-holder",
        "--serve",
        *("--model", str(cluster.model), "--max-context", "8192", "--max-batch", "1"),
        *("--memory-limit-mib", "560"),
        *sharing,
        port=free_port(),
    )
    try:
        wait_for(lambda: '"event": "ready"' in holder.log.read_text(), holder, 180)
        assert "cannot serve; holding only" in holder.log.read_text()
        assert not ready(holder)
    finally:
        holder.stop()


def test_a_holder_in_the_slices_the_operator_gives_it_serves(cluster: Cluster) -> None:
    """The operator's estimate for a model at zero that gives only ``kvCacheMiB`` (a pool of 4 full
    sequences) sizes its serving holder for one sequence at the context its replicas take, no longer
    for the whole pool beside the weights; the holder under exactly that limit (1 MiB slices: no
    rounding to hide behind) answers."""
    from vnpu.api import DEFAULT_MAX_CONTEXT, KV_BLOCK_SIZE
    from vnpu.memory import estimate_from_spec

    source = {"uri": f"file://{cluster.model}"}
    one = estimate_from_spec(
        {
            "source": source,
            "weights": {"dtype": "float32"},
            "memory": {"maxContextTokens": 2048, "maxBatch": 1},
        }
    )
    spec = {
        "source": source,
        "weights": {"dtype": "float32"},
        "memory": {"kvCacheMiB": 4 * (DEFAULT_MAX_CONTEXT * one.kv_bytes_per_token >> 20)},
    }
    estimate = estimate_from_spec(spec, slice_mib=1, block_size=KV_BLOCK_SIZE)
    limit = estimate.device_weights_mib + estimate.holder_serving_mib
    assert estimate.holder_serving_mib < estimate.kv_cache_mib  # one sequence, not the pool
    sharing = cluster.sharing()
    sharing[sharing.index("--share-group") + 1] = "sized-holder"
    holder = cluster.spawn(
        "sized-holder",
        "weights-holder",
        "--serve",
        *("--model", str(cluster.model), "--dtype", "float32", "--max-batch", "1"),
        *("--memory-limit-mib", str(limit)),
        *sharing,
        port=free_port(),
    )
    try:
        wait_for(lambda: '"event": "ready"' in holder.log.read_text(), holder, 180)
        assert "cannot serve" not in holder.log.read_text()
        status, body = http_json(holder.url + "/v1/completions", REQUEST)
        assert status == 200, body
    finally:
        holder.stop()


def test_sigterm_caught_by_another_thread_still_stops_a_replica_and_a_holder(cluster: Cluster) -> None:
    """The kernel may hand the kubelet's SIGTERM to any thread; the handler runs on the main thread,
    which must not sleep through it. On an H200 every replica outlived SIGTERM until SIGKILL: its main
    thread waited for work without a timeout while a CUDA driver thread caught the signal."""
    from thread_signals import signal_another_thread

    sharing = cluster.sharing()
    sharing[sharing.index("--share-group") + 1] = "signals"
    holder = cluster.spawn("signals-holder", "weights-holder", "--model", str(cluster.model), *sharing)
    wait_for(lambda: '"event": "ready"' in holder.log.read_text(), holder, 180)
    replica = cluster.serve("signals-replica", "--model", str(cluster.model), *sharing)
    wait_for(lambda: ready(replica), replica, 240)
    complete(replica)  # the engine has run a step and waits for the next request
    for proc in (replica, holder):
        signal_another_thread(proc.popen.pid)
        try:
            code = proc.popen.wait(15)
        except subprocess.TimeoutExpired:
            proc.stop(signal.SIGKILL)
            raise AssertionError(f"{proc.name} outlived SIGTERM:\n{proc.log.read_text()[-2000:]}") from None
        assert code == 0, proc.log.read_text()[-2000:]


@pytest.mark.parametrize("serving", [False, True], ids=["holder", "serving-holder"])
def test_a_replica_stopped_with_its_holder_finishes_its_request_in_flight(
    cluster: Cluster, serving: bool
) -> None:
    """A scale-down, a node drain or a model's deletion stops a replica and its weights-holder at the
    same moment. The holder waits for the replica to detach, so the request the replica is still
    answering completes; before, the holder ended every lease at SIGTERM and that request failed. A
    holder that also serves (scale to zero) drains its own HTTP server meanwhile."""
    sharing = cluster.sharing()
    sharing[sharing.index("--share-group") + 1] = f"drain-{serving}"
    extra = ("--serve", "--max-context", str(CONTEXT), "--max-batch", "1") if serving else ()
    holder = cluster.spawn(
        f"drain-holder-{serving}",
        "weights-holder",
        *("--model", str(cluster.model), *extra),
        *sharing,
        port=free_port() if serving else None,
    )
    wait_for(lambda: '"event": "ready"' in holder.log.read_text(), holder, 180)
    replica = cluster.serve(f"drain-replica-{serving}", "--model", str(cluster.model), *sharing)
    wait_for(lambda: ready(replica), replica, 240)
    client, answers = _long_request_in_flight(replica)
    holder.popen.send_signal(signal.SIGTERM)  # the worst order: the holder first
    replica.popen.send_signal(signal.SIGTERM)
    client.join(120)
    assert replica.popen.wait(60) == 0, replica.log.read_text()[-3000:]
    assert holder.popen.wait(60) == 0, holder.log.read_text()[-3000:]
    ((status, body),) = answers
    assert status == 200 and body["usage"]["completion_tokens"] == 64, body
    log = holder.log.read_text()
    assert "waiting for the replicas attached to detach" in log
    assert "still attached" not in log


def test_a_replica_gives_its_requests_in_flight_its_models_drain_and_no_more(cluster: Cluster) -> None:
    """``--request-drain-seconds`` (the model's ``runtime.drainSeconds``) is what the server gives the
    requests in flight at SIGTERM: at 0 the replica cuts its 64-token answer at once and exits, where
    at the default it finishes it (the test above)."""
    replica = cluster.serve(
        "drain-zero", "--standalone", "--model", str(cluster.model), "--request-drain-seconds", "0"
    )
    wait_for(lambda: ready(replica), replica, 240)
    client, answers = _long_request_in_flight(replica)
    replica.popen.send_signal(signal.SIGTERM)
    assert replica.popen.wait(30) == 0, replica.log.read_text()[-3000:]
    client.join(30)
    assert not client.is_alive()
    ((status, body),) = answers
    assert status != 200 or body["usage"]["completion_tokens"] < 64, body


def test_a_holder_stops_after_its_drain_even_with_a_replica_attached(cluster: Cluster) -> None:
    """The wait is bounded (``--drain-seconds``): a replica that is not stopping (its holder deleted
    alone) loses the weights at the end of it and says so, as when a holder dies, and the holder exits
    cleanly inside its pod's grace period."""
    sharing = cluster.sharing()
    sharing[sharing.index("--share-group") + 1] = "drain-bounded"
    holder = cluster.spawn(
        "bounded-holder",
        "weights-holder",
        *("--model", str(cluster.model), "--drain-seconds", "1"),
        *sharing,
    )
    wait_for(lambda: '"event": "ready"' in holder.log.read_text(), holder, 180)
    replica = cluster.serve("bounded-replica", "--model", str(cluster.model), *sharing)
    try:
        wait_for(lambda: ready(replica), replica, 240)
        holder.popen.send_signal(signal.SIGTERM)
        assert holder.popen.wait(30) == 0, holder.log.read_text()[-3000:]
        assert "replicas still attached at the end of the drain" in holder.log.read_text()
        wait_for(lambda: not ready(replica), replica, 30)
        status, body = http_json(replica.url + "/v1/completions", REQUEST)
        assert status == 503 and "weights-holder" in body["error"]["message"], body
    finally:
        replica.stop()


def test_a_holder_started_beside_the_one_it_replaces_waits_then_takes_over(cluster: Cluster) -> None:
    """Real processes: a second holder of the same share identity and device (a serving holder for a
    plain one, a holder renamed by an upgrade) is started while the first still serves a replica. It
    stays up, loaded, saying once that it waits (before: it exited 1, for a crash loop); at the first
    one's SIGTERM it binds the socket, and the replica, whose lease ends with the old holder's drain,
    attaches to it and answers again."""
    sharing = cluster.sharing()
    sharing[sharing.index("--share-group") + 1] = "handover"
    model = ("--model", str(cluster.model))
    old = cluster.spawn("handover-old", "weights-holder", *model, "--drain-seconds", "1", *sharing)
    wait_for(lambda: '"event": "ready"' in old.log.read_text(), old, 180)
    replica = cluster.serve("handover-replica", *model, *sharing)
    try:
        wait_for(lambda: ready(replica), replica, 240)
        expected = complete(replica)["token_ids"]
        new = cluster.spawn("handover-new", "weights-holder", *model, *sharing)
        wait_for(lambda: "waiting for it to stop" in new.log.read_text(), new, 180)
        assert '"event": "ready"' not in new.log.read_text()
        old.popen.send_signal(signal.SIGTERM)
        assert old.popen.wait(30) == 0, old.log.read_text()[-3000:]
        wait_for(lambda: '"event": "ready"' in new.log.read_text(), new, 30)
        wait_for(lambda: ready(replica), replica, 60)
        assert complete(replica)["token_ids"] == expected
        assert new.popen.poll() is None
        assert new.log.read_text().count("waiting for it to stop") == 1
    finally:
        replica.stop()
