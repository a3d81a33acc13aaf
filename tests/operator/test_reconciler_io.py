"""The reconciler against a stub API server on 127.0.0.1: a stuck pass fails the liveness probe, a failed
start leaves nothing running."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import kopf
import pytest
import urllib3
from apiserver_stub import ApiServerStub
from kopf._core.engines import activities
from kopf._core.engines.indexing import OperatorIndexers
from kopf._core.engines.probing import health_reporter
from kopf._core.intents import causes

from vnpu import api
from vnpu.cluster.kwok import npu_node_manifest
from vnpu.operator import handlers, metrics, reconciler
from vnpu.operator.config import OperatorConfig
from vnpu.operator.kube import Kube
from vnpu.operator.reconciler import UNHEALTHY_AFTER_RESYNCS, Reconciler, Unhealthy


@pytest.fixture(autouse=True)
def no_model_series_left() -> Iterator[None]:
    """The passes here set per-model series in the process-wide registry: gone with the test."""
    yield
    metrics.forget_models(set())


@pytest.fixture
def stub() -> Iterator[ApiServerStub]:
    server = ApiServerStub()
    node_manifest = npu_node_manifest("n1", devices=2, device_mib=16 * 1024)
    node_manifest["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    server.lists["nodes"] = [node_manifest]
    server.lists["inferencemodels"] = [model_object("a")]
    yield server
    server.close()


def model_object(name: str, uid: str = "") -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {
            "namespace": "ns",
            "name": name,
            "uid": uid or f"uid-{name}",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": {
            "modelName": name,
            "source": {"uri": "file:///models/m.gguf"},
            "replicas": 1,
            "weights": {"sizeMiB": 4096},
            "memory": {"kvCacheMiB": 1024},
        },
    }


class StuckKube(Kube):
    """The real client, but a pod create never returns once ``stuck`` is set (until ``release``)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.stuck = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def create_pod(self, manifest: Any) -> bool:
        if self.stuck.is_set():
            self.entered.set()
            self.release.wait()
        return super().create_pod(manifest)


async def probe_status(url: str) -> int:
    def get() -> int:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    return await asyncio.to_thread(get)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_pass_stuck_on_the_api_server_fails_the_liveness_probe(
    stub: ApiServerStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconciler, "MIN_UNHEALTHY_SECONDS", 0.0)  # 3 resyncs of 0.2 s (the floor: 120 s)
    config = OperatorConfig(placeholders=False, resync_seconds=0.2, debounce_seconds=0.01)
    kube = StuckKube(stub.api_client())
    kube.stuck.set()

    async def scenario() -> None:
        rec = Reconciler(config, kube=kube)
        await rec.start()
        try:
            assert rec.health()["last_error"] == ""
            # The first pass creates the share group's key Secret; the next one its pods, and sticks.
            assert await asyncio.to_thread(kube.entered.wait, 10)
            assert rec.health()["passes"] >= 1
            for _ in range(200):
                try:
                    rec.health()
                except Unhealthy as exc:
                    message = str(exc)
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("health() stayed green while the pass was stuck")
            limit = UNHEALTHY_AFTER_RESYNCS * config.resync_seconds
            assert message.startswith("no reconcile pass went through for ")
            assert f"(limit {limit:g}s: {UNHEALTHY_AFTER_RESYNCS} resync periods of 0.2s" in message
            # On-call reads what the pass was waiting for.
            assert "the pass in flight (started " in message and "writing the plan" in message
            assert "for the API server on: creating " in message and " pod " in message
            # kopf's liveness endpoint answers with an error (the kubelet restarts the pod).
            registry = kopf.OperatorRegistry()
            handlers.register(registry, config)
            memo = kopf.Memo()
            memo["reconciler"] = rec
            url = f"http://127.0.0.1:{free_port()}/healthz"
            ready = asyncio.Event()
            server = asyncio.create_task(
                health_reporter(
                    url,
                    memo=memo,
                    indices=OperatorIndexers().indices,
                    registry=registry,
                    settings=kopf.OperatorSettings(),
                    ready_flag=ready,
                )
            )
            try:
                await asyncio.wait_for(ready.wait(), 10)
                assert await probe_status(url) == 500
            finally:
                server.cancel()
        finally:
            kube.release.set()
            await rec.stop()

    asyncio.run(scenario())


def informer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("informer-") and t.is_alive()}


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_start_that_fails_leaves_no_informer_behind(
    stub: ApiServerStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RBAC refuses listing Services: kopf retries the startup handler, each try must stop its informers."""
    monkeypatch.setattr(reconciler, "SYNC_TIMEOUT", 0.3)
    monkeypatch.setattr(reconciler, "api_client_from_env", stub.api_client)
    stub.forbidden.add("services")
    config = OperatorConfig(placeholders=False)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, config)
    settings = kopf.OperatorSettings()
    settings.execution.default_backoff = 0.1
    memo = kopf.Memo()
    before = informer_threads()

    def node_lists() -> int:
        return sum(
            1 for _, path, watch in stub.requests if path.split("?")[0] == "/api/v1/nodes" and not watch
        )

    async def scenario() -> None:
        startup = asyncio.create_task(
            activities.run_activity(
                lifecycle=kopf.lifecycles.all_at_once,
                registry=registry,
                settings=settings,
                activity=causes.Activity.STARTUP,
                indices=OperatorIndexers().indices,
                memo=memo,
            )
        )
        try:
            assert await asyncio.to_thread(wait_until, lambda: node_lists() >= 3)  # two tries failed
            stub.forbidden.clear()  # the chart's RBAC is fixed: the next try starts
            await asyncio.wait_for(startup, 20)
            # One cache's informers run (nodes, pods, InferenceModels, Services, PodDisruptionBudgets);
            # every failed try's stopped.
            assert await asyncio.to_thread(wait_until, lambda: len(informer_threads() - before) == 5)
            assert sorted(t.name for t in informer_threads() - before) == [
                "informer-inferencemodels",
                "informer-nodes",
                "informer-poddisruptionbudgets",
                "informer-pods",
                "informer-services",
            ]
        finally:
            startup.cancel()
            if "reconciler" in memo:
                await memo["reconciler"].stop()
        assert await asyncio.to_thread(wait_until, lambda: not informer_threads() - before)

    asyncio.run(scenario())


class FlakyKube(Kube):
    """The real client, but the first ``fail[method]`` calls of a method lose their connection."""

    def __init__(self, api_client: Any, fail: dict[str, int]) -> None:
        super().__init__(api_client)
        self.fail = dict(fail)
        self.raised: list[str] = []
        self._lock = threading.Lock()

    def _connection_lost(self, method: str) -> None:
        with self._lock:
            if not self.fail.get(method):
                return
            self.fail[method] -= 1
            self.raised.append(method)
        raise urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))

    def create_service(self, manifest: Any) -> bool:
        self._connection_lost("create_service")
        return super().create_service(manifest)

    def patch_model_status(self, model: Any, status: Any) -> None:
        self._connection_lost("patch_model_status")
        super().patch_model_status(model, status)


def written(stub: ApiServerStub, path_end: str) -> list[Any]:
    return [body for method, path, body in list(stub.writes) if path.endswith(path_end)]


def run_until(kube: Kube, config: OperatorConfig, *checks: Callable[[], bool], nudge: bool = False) -> None:
    """Start a reconciler on ``kube``; wait for each check in turn (triggering passes if ``nudge``)."""

    async def scenario() -> None:
        rec = Reconciler(config, kube=kube)
        await rec.start()
        try:
            for check in checks:
                for _ in range(200):
                    if check():
                        break
                    if nudge:
                        rec.trigger("test")
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail(f"not reached in 10 s: {check.__doc__}")
        finally:
            await rec.stop()

    asyncio.run(scenario())


def test_a_service_that_cannot_be_created_holds_back_neither_events_nor_status(stub: ApiServerStub) -> None:
    kube = FlakyKube(stub.api_client(), fail={"create_service": 1})
    config = OperatorConfig(placeholders=False, debounce_seconds=0.01)

    def reported() -> bool:
        """the model's first Events and status, in the report whose Service failed"""
        return bool(written(stub, "/inferencemodels/a/status"))

    def degraded() -> bool:
        """the model Degraded, saying why"""
        return any(
            c["type"] == "Degraded" and c["status"] == "True"
            for s in written(stub, "/inferencemodels/a/status")
            for c in s["status"]["conditions"]
        )

    def service() -> bool:
        """the Service created on the next try"""
        return bool(written(stub, "/services"))

    run_until(kube, config, reported, degraded, service)
    assert kube.raised == ["create_service"]
    events = written(stub, "/events")
    assert [e["reason"] for e in events[:2]] == ["Placed", "ProtocolError"]
    assert events[1]["message"].startswith("creating Service vnpu-a: ('Connection aborted.'")
    first = written(stub, "/inferencemodels/a/status")[0]["status"]
    assert first["phase"] == "Running"


def test_a_status_write_that_lost_its_connection_is_written_again_by_the_next_pass(
    stub: ApiServerStub,
) -> None:
    kube = FlakyKube(stub.api_client(), fail={"patch_model_status": 1})
    # A resync far away: only a pass that knows the write failed writes the status again.
    config = OperatorConfig(placeholders=False, debounce_seconds=0.01, resync_seconds=600)

    def status() -> bool:
        """the status written after the first attempt lost its connection"""
        return bool(written(stub, "/inferencemodels/a/status"))

    run_until(kube, config, status, nudge=True)
    assert kube.raised == ["patch_model_status"]
    assert [s["status"]["phase"] for s in written(stub, "/inferencemodels/a/status")] == ["Running"]
