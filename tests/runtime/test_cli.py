"""The ``vnpu runtime`` command line: environment contract with the pods, help, one-shot generation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rt_helpers import load_tiny_llama, write_tiny_llama

from vnpu.runtime.engine import ModelRuntime, ServeOptions
from vnpu.runtime.main import build_parser, default_socket_path


def test_cli_reads_the_pod_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator and the device plugin configure pods through these variables."""
    env = {
        "VNPU_MODEL_URI": "pvc://c/m",
        "VNPU_MODEL_NAME": "smol",
        "VNPU_SHARE_GROUP_NAME": "g1",
        "VNPU_SOCKET_DIR": "/var/run/vnpu/share",
        "VNPU_DEVICE": "npu-0",
        "VNPU_MEMORY_LIMIT_MIB": "2048",
        "VNPU_OFFLOAD_BUDGET_MIB": "512",
        "VNPU_PREFETCH_DEPTH": "3",
        "VNPU_PORT": "8123",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(["serve"])
    assert (args.model, args.model_name, args.share_group) == ("pvc://c/m", "smol", "g1")
    assert (args.memory_limit_mib, float(args.offload_budget_mib), args.prefetch_depth) == (2048, 512.0, 3)
    assert args.port == 8123 and args.host == "127.0.0.1" and args.attach is None
    assert default_socket_path(args.socket_dir, args.device_id) == Path(
        "/var/run/vnpu/share/weights-npu-0.sock"
    )
    monkeypatch.setenv("VNPU_SHARE_GROUP", "from-device-plugin")
    assert build_parser().parse_args(["weights-holder"]).share_group == "from-device-plugin"


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    from vnpu.runtime.main import main

    for argv in (["--help"], ["serve", "--help"], ["weights-holder", "--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "weights-holder" in out and "--offload-budget-mib" in out and "--socket-mode" in out


def test_generate_standalone_and_probe_without_holder(short_tmp: Path) -> None:
    model = write_tiny_llama(short_tmp / "model")
    cmd = [sys.executable, "-m", "vnpu", "runtime", "generate", "--standalone", "--model", str(model)]
    cmd += ["--prompt", "hello", "--max-tokens", "6", "--json", "--max-context", "64", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    runtime = ModelRuntime(ServeOptions(max_context=64))
    weights = load_tiny_llama(short_tmp / "model")
    runtime.install(weights.manifest, weights.arena, shared=False, seconds=0)
    assert result["token_ids"] == runtime.complete("hello", 6).result.token_ids
    probe = [sys.executable, "-m", "vnpu", "runtime", "probe", "--socket", str(short_tmp / "none.sock")]
    proc = subprocess.run(probe, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "no weights-holder is listening" in proc.stderr
