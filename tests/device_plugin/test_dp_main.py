"""``vnpu device-plugin``: help, refusals of bad configuration, clean shutdown; the harness's go.mod."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dp_helpers import GOHARNESS_SRC, wait_for

from vnpu.device_plugin.main import build_parser

VNPU = [sys.executable, "-m", "vnpu", "device-plugin"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VNPU, *args], capture_output=True, text=True, timeout=60, check=False)


def test_help_documents_every_group():
    out = run("--help")
    assert out.returncode == 0
    for text in (
        "usage: vnpu device-plugin",
        "--plugin-dir",
        "--simulated-devices",
        "--socket-root",
        "--socket-prefix",
        "--node-name",
        "--metrics-port",
        "vnpu.io/memory-<index>",
        "never looks at pods",
    ):
        assert text in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--slice-mib", "0", "--no-api"], "--slice-mib must be >= 1"),
        (
            ["--health-interval", "inf", "--no-api"],
            "argument --health-interval: 'inf' is not a finite number",
        ),
        (["--kubeconfig", "/nonexistent/kubeconfig"], "needs the node name"),
        (
            ["--kubeconfig", "/nonexistent/kubeconfig", "--node-name", "n1"],
            "cannot load the API-server configuration",
        ),
    ],
)
def test_bad_configuration_exits_2_with_a_clear_message(args, message, monkeypatch):
    monkeypatch.delenv("NODE_NAME", raising=False)
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        # inf killed the health thread (OverflowError in Event.wait): a device that went bad stayed
        # Healthy for ever; -1 and 0 polled the backend in a busy loop (forking npu-smi on Ascend).
        ("--health-interval", "inf"),
        ("--health-interval", "1e300"),
        ("--health-interval", "-1"),
        ("--health-interval", "0"),
        ("--health-interval", "nan"),
        # nan compares false: nothing was ever reconciled, or ever released.
        ("--reconcile-interval", "nan"),
        ("--reconcile-interval", "0"),
        ("--reconcile-interval", "-5"),
        ("--release-grace", "nan"),
        ("--release-grace", "inf"),
        ("--release-grace", "-1"),
        ("--release-grace", "soon"),
    ],
)
def test_an_interval_or_grace_that_is_not_a_finite_number_of_seconds_is_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: {value!r} is not a finite number of seconds" in capsys.readouterr().err


def test_intervals_and_grace_take_finite_seconds():
    args = build_parser().parse_args(
        ["--health-interval", "0.25", "--reconcile-interval", "86400", "--release-grace", "0"]
    )
    assert (args.health_interval, args.reconcile_interval, args.release_grace) == (0.25, 86400.0, 0.0)
    defaults = build_parser().parse_args([])
    assert (defaults.health_interval, defaults.reconcile_interval, defaults.release_grace) == (0.5, 5.0, 10.0)


def test_sigterm_stops_cleanly_and_logs_json(plugin_process, dirs):
    plugin = plugin_process("--no-api", "--metrics-port", "0")
    sockets = [dirs.plugin_dir / "vnpu-memory-0.sock", dirs.plugin_dir / "vnpu-memory-1.sock"]
    wait_for(lambda: all(s.exists() for s in sockets), timeout=30, what="one socket per device")
    assert plugin.terminate() == 0
    assert not any(s.exists() for s in sockets)
    messages = [e["msg"] for e in plugin.log_lines()]
    assert "plugin starting" in messages and "plugin stopped" in messages
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in plugin.log_lines())
    json.dumps(plugin.log_lines())  # every line was a JSON object


def test_sigterm_caught_by_another_thread_still_stops_the_plugin(plugin_process, dirs):
    """The kernel may hand the kubelet's SIGTERM to one of gRPC's threads; the main thread, waiting for
    the stop, still runs the handler (vnpu.signals) instead of sleeping until SIGKILL."""
    from thread_signals import signal_another_thread

    plugin = plugin_process("--no-api", "--metrics-port", "0")
    socket = dirs.plugin_dir / "vnpu-memory-0.sock"
    wait_for(socket.exists, timeout=30, what="the device's socket")
    signal_another_thread(plugin.proc.pid)
    assert plugin.proc.wait(15) == 0
    assert not socket.exists()
    assert "plugin stopped" in [e["msg"] for e in plugin.log_lines()]


def test_harness_gomod_replaces_exactly_the_staging_modules_of_kubernetes():
    """go.mod must replace every staging module k/k requires at v0.0.0 (gen-gomod.sh derives the list)."""
    gomod = (GOHARNESS_SRC / "go.mod").read_text()
    version = re.search(r"^\s*k8s\.io/kubernetes (v1\.\d+\.\d+)$", gomod, re.M).group(1)
    # The module's go.mod, from the Go module cache wherever it is (GOMODCACHE), fetched if missing:
    # the way CI finds it, never a skip.
    download = subprocess.run(
        ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env={**os.environ, "GOFLAGS": "-mod=mod"},
    )
    upstream = Path(json.loads(download.stdout)["GoMod"])
    staging = set(re.findall(r"^\s+(k8s\.io/[a-z0-9-]+) v0\.0\.0$", upstream.read_text(), re.M))
    replaced = dict(re.findall(r"^replace (k8s\.io/[a-z0-9-]+) => \1 (v\S+)$", gomod, re.M))
    assert set(replaced) == staging
    assert set(replaced.values()) == {"v0." + version.removeprefix("v1.")}
