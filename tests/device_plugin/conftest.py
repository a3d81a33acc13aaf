"""Fixtures for the device-plugin tests: temp plugin dirs, the plugin in-process or as a
``vnpu device-plugin`` subprocess, and the Go harness (kubelet code) driving it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from dp_helpers import (
    GOHARNESS_SRC,
    TWO_DEVICES,
    Harness,
    PluginDirs,
    PluginProcess,
    harness_key,
    write_devices,
)

from vnpu.device_plugin.plugin import PluginRunner
from vnpu.device_plugin.proto import api_pb2_grpc


@pytest.fixture
def dirs() -> Iterator[PluginDirs]:
    # Unix socket paths must stay under ~108 bytes and pytest's tmp_path can be long: use a short root.
    root = Path(tempfile.mkdtemp(prefix="vdp-", dir="/tmp"))
    yield PluginDirs(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def run_plugin(dirs: PluginDirs) -> Iterator[Callable[..., PluginRunner]]:
    """Start an in-process plugin (simulated devices from ``dirs.devices_file``); stopped after the test."""
    runners: list[PluginRunner] = []

    def start(devices: list[dict[str, Any]] | None = TWO_DEVICES, **overrides: Any) -> PluginRunner:
        if devices is not None:
            write_devices(dirs.devices_file, devices)
        runner = PluginRunner(dirs.config(**overrides)).start()
        runners.append(runner)
        return runner

    yield start
    for r in runners:
        r.stop()


@pytest.fixture
def stub_for() -> Iterator[Callable[..., api_pb2_grpc.DevicePluginStub]]:
    """A client of one device's endpoint (index 0 unless told)."""
    channels: list[grpc.Channel] = []

    def make(runner: PluginRunner, index: int = 0) -> api_pb2_grpc.DevicePluginStub:
        channel = grpc.insecure_channel(
            f"unix://{runner.config.plugin_dir / runner.config.socket_name(index)}"
        )
        channels.append(channel)
        return api_pb2_grpc.DevicePluginStub(channel)

    yield make
    for c in channels:
        c.close()


@pytest.fixture
def plugin_process(dirs: PluginDirs) -> Iterator[Callable[..., PluginProcess]]:
    procs: list[PluginProcess] = []

    def start(*extra: str) -> PluginProcess:
        if not dirs.devices_file.exists():
            write_devices(dirs.devices_file, TWO_DEVICES)
        p = PluginProcess(dirs.cli_args(*extra), dirs.root / "plugin.log").start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()


@pytest.fixture(scope="session")
def dp_harness_bin() -> Path:
    """Build the harness into ~/.cache/vnpu/goharness/<hash>/ once; reused while its sources are the same."""
    cache = (
        Path(os.environ.get("VNPU_CACHE_DIR", Path.home() / ".cache" / "vnpu")) / "goharness" / harness_key()
    )
    binary = cache / "dpharness"
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        pytest.fail(
            "the Go toolchain is missing, so the kubelet-code harness cannot be built (hack/setup-env.sh "
            "installs golang-go)",
            pytrace=False,
        )
    cache.mkdir(parents=True, exist_ok=True)
    print(
        f"\n[goharness] building the kubelet device-plugin harness into {cache} (first run: a few minutes)",
        file=sys.__stderr__,
        flush=True,
    )
    started = time.monotonic()
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly"}
    proc = subprocess.Popen(
        [go, "build", "-trimpath", "-o", str(binary) + ".tmp", "."],
        cwd=GOHARNESS_SRC,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
    reader.start()
    while proc.poll() is None:
        time.sleep(1)
        elapsed = time.monotonic() - started
        if int(elapsed) % 30 == 0:
            print(f"[goharness] … still building ({elapsed:.0f}s)", file=sys.__stderr__, flush=True)
    reader.join(5)
    if proc.returncode != 0:
        pytest.fail(f"building the Go harness failed:\n{''.join(output)[-4000:]}")
    os.replace(str(binary) + ".tmp", binary)
    print(f"[goharness] built in {time.monotonic() - started:.0f}s", file=sys.__stderr__, flush=True)
    return binary


@pytest.fixture
def harness(dp_harness_bin: Path, dirs: PluginDirs) -> Iterator[Harness]:
    h = Harness([str(dp_harness_bin), str(dirs.plugin_dir)], dirs.root / "harness.log")
    yield h
    h.close()


@pytest.fixture
def kubelet_node(dp_harness_bin: Path, dirs: PluginDirs) -> Iterator[Harness]:
    """The harness in manager mode: the kubelet's whole device manager at its fixed paths under
    /var/lib/kubelet, in a private mount namespace (a tmpfs on /var/lib there; the host is untouched)."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("SKIPPED LOUDLY: manager mode needs root and unshare(1) for a private mount namespace")
    env = {**os.environ, "DPHARNESS_OUTER_MNT_NS": os.readlink("/proc/self/ns/mnt")}
    argv = [unshare, "--mount", "--propagation", "private", str(dp_harness_bin), "--manager"]
    h = Harness(argv, dirs.root / "harness.log", env=env)
    yield h
    h.close()
