"""Helpers shared by the device-plugin tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from vnpu.device_plugin.backends.simulated import write_config
from vnpu.device_plugin.plugin import PluginConfig
from vnpu.device_plugin.proto import api_pb2, api_pb2_grpc, podresources_pb2, podresources_pb2_grpc

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
GOHARNESS_SRC = HERE / "goharness"
PYTHON = sys.executable


def write_devices(path: Path, devices: list[dict[str, Any]], model: str = "sim-910B") -> Path:
    """Write a simulated-backend config (the backend's own writer: atomic)."""
    return write_config(path, devices, model)


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def scrape(port: int) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (samples only)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def fake_npu_smi(tmp_path: Path, info: str | Path, *, exit_code: int = 0) -> Path:
    """An executable standing in for npu-smi (the real one needs Ascend hardware): prints recorded output
    (``info`` names a recorded fixture, or is an absolute path to output a test wrote)."""
    script = tmp_path / "npu-smi"
    recorded = FIXTURES / "npu-smi"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$2" = "-m" ]; then cat {recorded / "910b-8x-info-m.txt"}; exit 0; fi\n'
        f"cat {recorded / info}\n"
        f"echo 'npu-smi: simulated failure' >&2\n"
        f"exit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@dataclass
class PluginDirs:
    root: Path
    plugin_dir: Path = field(init=False)
    state_dir: Path = field(init=False)
    socket_root: Path = field(init=False)
    devices_file: Path = field(init=False)
    pod_resources_socket: Path = field(init=False)

    def __post_init__(self) -> None:
        self.plugin_dir = self.root / "device-plugins"
        self.state_dir = self.root / "state"
        self.socket_root = self.root / "sockets"
        self.devices_file = self.root / "devices.yaml"
        self.pod_resources_socket = self.root / "pod-resources" / "kubelet.sock"
        self.plugin_dir.mkdir(parents=True)
        self.pod_resources_socket.parent.mkdir(parents=True)

    def config(self, **overrides: Any) -> PluginConfig:
        values: dict[str, Any] = dict(
            plugin_dir=self.plugin_dir,
            state_dir=self.state_dir,
            socket_root=self.socket_root,
            backend="simulated",
            simulated_config=self.devices_file,
            use_api=False,
            metrics_port=0,
            pod_resources_socket=self.pod_resources_socket,
        )
        values.update(overrides)
        return PluginConfig(**values)

    def cli_args(self, *extra: str) -> list[str]:
        return [
            "--plugin-dir",
            str(self.plugin_dir),
            "--state-dir",
            str(self.state_dir),
            "--socket-root",
            str(self.socket_root),
            "--backend",
            "simulated",
            "--simulated-config",
            str(self.devices_file),
            "--pod-resources-socket",
            str(self.pod_resources_socket),
            *extra,
        ]


TWO_DEVICES = [
    {"id": "npu0", "memory_mib": 4096, "numa_node": 0},
    {"id": "npu1", "memory_mib": 8192, "numa_node": 1},
]


def allocate(stub: api_pb2_grpc.DevicePluginStub, ids: list[str]) -> api_pb2.ContainerAllocateResponse:
    resp = stub.Allocate(
        api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids)])
    )
    return resp.container_responses[0]


def preferred(
    stub: api_pb2_grpc.DevicePluginStub, available: list[str], size: int, must: list[str] | None = None
) -> list[str]:
    resp = stub.GetPreferredAllocation(
        api_pb2.PreferredAllocationRequest(
            container_requests=[
                api_pb2.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available, must_include_deviceIDs=must or [], allocation_size=size
                )
            ]
        )
    )
    return list(resp.container_responses[0].deviceIDs)


class FakePodResources(podresources_pb2_grpc.PodResourcesListerServicer):
    """The kubelet's pod-resources API on a real socket, listing ``holders`` (pod name -> the slices
    of ``resource`` it holds). ``restart()`` serves it again on a new socket, as a restarted kubelet
    does; ``stop()`` removes it."""

    def __init__(self, socket_path: Path, resource: str = "vnpu.io/memory-0") -> None:
        self.socket_path = socket_path
        self.resource = resource
        self.holders: dict[str, list[str]] = {}
        self.lists = 0
        self._server: grpc.Server | None = None
        self.start()

    def List(self, request: Any, context: Any) -> podresources_pb2.ListPodResourcesResponse:
        self.lists += 1
        return podresources_pb2.ListPodResourcesResponse(
            pod_resources=[
                podresources_pb2.PodResources(
                    name=name,
                    namespace="ns",
                    containers=[
                        podresources_pb2.ContainerResources(
                            name="c",
                            devices=[
                                podresources_pb2.ContainerDevices(resource_name=self.resource, device_ids=ids)
                            ],
                        )
                    ],
                )
                for name, ids in self.holders.items()
            ]
        )

    def start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.socket_path.unlink(missing_ok=True)
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        podresources_pb2_grpc.add_PodResourcesListerServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix://{self.socket_path}")
        self._server.start()

    def stop(self) -> None:
        self.socket_path.unlink(missing_ok=True)  # first: a client sees it gone, never a dead socket
        if self._server is not None:
            self._server.stop(grace=0).wait(5)
            self._server = None

    def restart(self) -> None:
        self.stop()
        self.start()


class StreamWatcher:
    """Consumes a ListAndWatch stream on a thread; each message becomes {slice id: health}."""

    def __init__(self, stub: api_pb2_grpc.DevicePluginStub) -> None:
        self.call = stub.ListAndWatch(api_pb2.Empty())
        self.messages: queue.Queue[tuple[float, dict[str, str]]] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for msg in self.call:
                self.messages.put((time.monotonic(), {d.ID: d.health for d in msg.devices}))
        except grpc.RpcError:
            pass

    def next(self, timeout: float = 5.0) -> tuple[float, dict[str, str]]:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.call.cancel()


class PluginProcess:
    """``python -m vnpu device-plugin ...`` with its JSON log captured to a file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PluginProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "vnpu", "device-plugin", *self.args], stdout=log, stderr=log
        )
        return self

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


def harness_key() -> str:
    """Cache key of the harness binary: every source file, go.mod and go.sum."""
    digest = hashlib.sha256()
    for path in sorted([*GOHARNESS_SRC.glob("*.go"), GOHARNESS_SRC / "go.mod", GOHARNESS_SRC / "go.sum"]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


class Harness:
    """The Go harness process: send commands, wait for replies and events (see goharness/main.go)."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_path.open("w"),
            text=True,
            bufsize=1,
            env=env,
        )
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._ids = iter(range(1, 1 << 30))
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_event(lambda e: e["kind"] == "ready")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait_event(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0, after: int = 0
    ) -> dict[str, Any]:
        """The first event (index >= ``after``) that ``match`` accepts."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[after:]:
                    if match(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(json.dumps(e)[:300] for e in self.events[-10:])
                    raise AssertionError(f"harness event not seen within {timeout}s; last events:\n{tail}")
                self._cond.wait(left)

    def mark(self) -> int:
        """Index to pass as ``after`` to only see events from now on."""
        with self._cond:
            return len(self.events)

    def call(self, op: str, timeout: float = 15.0, **args: Any) -> dict[str, Any]:
        cid = next(self._ids)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": cid, "op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self.wait_event(lambda e: e.get("id") == cid, timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError, BrokenPipeError):
                self.call("quit", timeout=5)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
