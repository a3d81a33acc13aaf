"""The ``vnpu runtime`` command line: environment contract with the pods, help, one-shot generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rt_helpers import load_tiny_llama, smollm2_dir, write_tiny_llama

from vnpu import sharing
from vnpu.runtime.engine import ModelRuntime, ServeOptions
from vnpu.runtime.main import SharingConfigError, build_parser, holder_socket_path, share_identity


def test_cli_reads_the_pod_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator and the device plugin configure pods through these variables."""
    env = {
        "VNPU_MODEL_URI": "pvc://c/m",
        "VNPU_MODEL_NAME": "smol",
        "VNPU_SHARE_NAMESPACE": "team-a",
        "VNPU_SHARE_GROUP": "g1",
        "VNPU_WEIGHTS_ID": "0123456789abcdef",
        "VNPU_SHARE_KEY_FILE": "/var/run/vnpu/credential/key",
        "VNPU_SOCKET_DIR": "/var/run/vnpu/share",
        "VNPU_DEVICE": "npu-0",
        "VNPU_MEMORY_LIMIT_MIB": "2048",
        "VNPU_OFFLOAD_BUDGET_MIB": "512",
        "VNPU_PREFETCH_DEPTH": "3",
        "VNPU_OFFLOAD_RESIDENT_MIB": "480",
        "VNPU_PORT": "8123",
        "VNPU_REQUEST_DRAIN_SECONDS": "900",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(["serve"])
    assert (args.model, args.model_name) == ("pvc://c/m", "smol")
    identity = share_identity(args)
    assert identity == sharing.ShareIdentity("team-a", "g1", "0123456789abcdef")
    assert args.share_key_file == "/var/run/vnpu/credential/key"
    assert (args.memory_limit_mib, float(args.offload_budget_mib), args.prefetch_depth) == (2048, 512.0, 3)
    assert float(args.offload_resident_mib) == 480.0
    assert float(build_parser().parse_args(["weights-holder"]).offload_resident_mib) == 480.0
    assert args.port == 8123 and args.host == "127.0.0.1" and args.attach is None
    assert args.request_drain_seconds == 900
    # The socket's name comes from the key: the same for holder and replica, unguessable without it.
    key = b"k" * 32
    path = holder_socket_path(args, identity, key)
    assert path == Path("/var/run/vnpu/share") / sharing.socket_name(key, identity, "npu-0")
    assert path != holder_socket_path(args, identity, b"x" * 32)


def test_a_partial_share_identity_or_a_missing_socket_dir_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VNPU_SHARE_GROUP", "g1")
    args = build_parser().parse_args(["serve"])
    with pytest.raises(SharingConfigError, match="missing --share-namespace, --weights-id"):
        share_identity(args)
    identity = sharing.ShareIdentity("ns", "g1", "w")
    with pytest.raises(SharingConfigError, match=r"does the pod request a vnpu\.io/memory-<index> resource"):
        holder_socket_path(args, identity, b"k" * 32)


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("VNPU_MEMORY_LIMIT_MIB", "64Mi"),
        ("VNPU_MEMORY_LIMIT_MIB", "0"),
        ("VNPU_PORT", "http"),
        ("VNPU_PORT", "70000"),
        ("VNPU_MAX_CONTEXT", "-5"),
        ("VNPU_MAX_CONTEXT", "0"),
        ("VNPU_MAX_BATCH", "-1"),
        ("VNPU_PREFETCH_DEPTH", "two"),
        ("VNPU_OFFLOAD_BUDGET_MIB", "nan"),
        ("VNPU_OFFLOAD_BUDGET_MIB", "inf"),
        ("VNPU_OFFLOAD_BUDGET_MIB", "-1"),
        ("VNPU_DEFAULT_PRIORITY", "9" * 30),
        ("VNPU_REQUEST_DRAIN_SECONDS", "-1"),
        ("VNPU_REQUEST_DRAIN_SECONDS", "3601"),
        ("VNPU_REQUEST_DRAIN_SECONDS", "1m"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "weights-holder", "probe"])
def test_a_malformed_number_in_the_environment_is_a_usage_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: str, value: str, command: str
) -> None:
    """A malformed integer variable raised while the parser was built, so every command (``probe``,
    ``--help``) died with a traceback; nan/inf budgets, negative contexts and batches gave tracebacks or
    blamed another setting, and 0 silently became the default. Each is now argparse's usage error (exit
    2) naming the option and the variable; ``--help`` still works."""
    from vnpu.runtime.main import main

    monkeypatch.setenv(env, value)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    if f"${env}" not in capsys.readouterr().out:
        return  # (this command does not read the variable)
    with pytest.raises(SystemExit) as exit_info:
        main([command])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"${env}" in err and repr(value)[:40] in err and "Traceback" not in err


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
    key = short_tmp / "key"
    key.write_bytes(sharing.new_key())
    probe = [sys.executable, "-m", "vnpu", "runtime", "probe", "--socket", str(short_tmp / "none.sock")]
    probe += [
        "--share-namespace",
        "ns",
        "--share-group",
        "g",
        "--weights-id",
        "w",
        "--share-key-file",
        str(key),
    ]
    proc = subprocess.run(probe, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "no weights-holder is listening" in proc.stderr
    proc = subprocess.run([*probe[:-1], "/nonexistent/key"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "cannot read the share key /nonexistent/key" in proc.stderr


def _share_identity_args(root: Path) -> list[str]:
    """A share identity and a fresh group key in ``root``, as the operator gives a model pod."""
    key = root / "key"
    key.write_bytes(sharing.new_key())
    return [
        "--share-namespace",
        "ns",
        "--share-group",
        "g",
        "--weights-id",
        "w",
        "--share-key-file",
        str(key),
    ]


def test_a_replica_planned_to_attach_never_loads_its_own_weights(short_tmp: Path) -> None:
    """With a share identity but no holder answering, ``generate`` waits for the holder and gives up
    with the reason; it never falls back to loading the model into its KV-sized slices."""
    model = write_tiny_llama(short_tmp / "model")
    cmd = [sys.executable, "-m", "vnpu", "runtime", "generate", "--model", str(model), "--prompt", "hi"]
    cmd += _share_identity_args(short_tmp)
    cmd += ["--socket", str(short_tmp / "holder.sock"), "--max-context", "64"]  # progress on: see below
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "VNPU_ATTACH_WAIT_S": "2"}
    )
    assert proc.returncode == 1 and "no weights-holder is listening" in proc.stderr
    assert "loading" not in proc.stderr  # the loader never started (it says "loading weights")


def test_the_runtime_holds_weights_within_what_the_operator_sized_them_at(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bfloat16 file with ``weights.dtype`` unset: the operator sizes it as stored and sets
    ``VNPU_MODEL_DTYPE=file``; the runtime then holds it at bfloat16, where its CPU default (float32)
    would need twice the holder's slices."""
    import torch
    from safetensors.torch import load_file, save_file

    from vnpu import api
    from vnpu.memory import estimate_from_spec
    from vnpu.runtime import main
    from vnpu.runtime.loader import load_weights
    from vnpu.runtime.sources import resolve

    model = write_tiny_llama(short_tmp / "model")
    weights = model / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}, str(weights))
    source = resolve(str(model))
    sized_mib = estimate_from_spec({"source": {"uri": str(model)}, "memory": {"kvCacheMiB": 1}}).weights_mib

    monkeypatch.setenv("VNPU_MODEL_DTYPE", api.DTYPE_FROM_FILE)
    told = main._weights_dtype(build_parser().parse_args(["weights-holder"]), source)
    held = load_weights(source, "cpu", told, progress=False)
    stored = source.info.total_bytes
    assert sized_mib == -(-stored // 2**20)  # sized as stored
    assert told == "bfloat16" and stored <= held.manifest.total_bytes < 1.01 * stored  # + alignment
    monkeypatch.delenv("VNPU_MODEL_DTYPE")
    default = main._weights_dtype(build_parser().parse_args(["weights-holder"]), source)
    assert default == "float32"  # what it held before the operator said: twice what was sized
    assert load_weights(source, "cpu", default, progress=False).manifest.total_bytes >= 2 * stored


def test_loading_weights_in_a_pod_shows_progress_as_log_lines(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: Any
) -> None:
    """Off a terminal (a pod's log) the load says it started, how far it is every 10 s (here at every
    tensor) and when it is done, as log lines: a bar's carriage returns would reach ``kubectl logs``
    as one line at the end. On a terminal the bar is unchanged; with ``--no-progress`` only the end."""
    import logging

    from vnpu.runtime import loader
    from vnpu.runtime.sources import resolve

    source = resolve(str(write_tiny_llama(short_tmp / "model")))
    monkeypatch.setattr(loader, "PROGRESS_LOG_INTERVAL_S", 0.0)
    caplog.set_level(logging.INFO, logger="vnpu.runtime.loader")
    weights = loader.load_weights(source, "cpu", progress=True)
    count = len(weights.manifest.tensors)
    said = [(r.getMessage(), getattr(r, "tensors", ""), getattr(r, "percent", 0.0)) for r in caplog.records]
    assert said[0] == ("loading weights", f"0/{count}", 0.0)
    assert [t for _, t, _ in said[1:-1]] == [f"{i}/{count}" for i in range(1, count)]
    percents = [p for _, _, p in said[:-1]]
    assert percents == sorted(percents) and percents[-1] < 100
    assert said[-1][0] == "weights loaded" and caplog.records[-1].mib > 0  # type: ignore[attr-defined]
    seconds = [r.seconds for r in caplog.records]  # type: ignore[attr-defined]
    assert seconds == sorted(seconds)  # all counted from the start of the load, opening included
    assert "\r" not in capsys.readouterr().err  # no bar

    caplog.clear()
    loader.load_weights(source, "cpu", progress=False)
    assert [r.getMessage() for r in caplog.records] == ["weights loaded"]


def test_a_holder_under_offload_pays_its_limit_only_for_what_replicas_keep_resident(short_tmp: Path) -> None:
    """Under async offload the operator sizes the group's holder at the budget less the prefetch ring,
    not at every weight: the holder keeps the weights in host memory for its replicas to stream from
    and checks only the part they keep resident against its limit (it used to load every weight, refuse
    its limit and exit, leaving the replicas nothing to attach to)."""
    from vnpu.runtime.sources import resolve

    model = write_tiny_llama(short_tmp / "model", layers=16)
    total = resolve(str(model)).info.total_bytes
    assert total > 2**20  # more than the holder's 1 MiB limit
    cmd = [sys.executable, "-m", "vnpu", "runtime", "weights-holder", "--model", str(model), "--no-progress"]
    cmd += _share_identity_args(short_tmp)
    cmd += ["--socket", str(short_tmp / "holder.sock")]
    limited = {**os.environ, "VNPU_MEMORY_LIMIT_MIB": "1"}

    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=limited)
    assert refused.returncode == 1 and "the weights need" in refused.stderr  # all of them, no offload

    # A budget that holds every weight, and no cap: all resident, more than the limit.
    roomy = {**limited, "VNPU_OFFLOAD_BUDGET_MIB": str(4 * total / 2**20), "VNPU_PREFETCH_DEPTH": "2"}
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=roomy)
    assert refused.returncode == 1 and "kept resident under offload need" in refused.stderr

    tight = {**limited, "VNPU_OFFLOAD_BUDGET_MIB": "1", "VNPU_PREFETCH_DEPTH": "2"}
    capped = {**roomy, "VNPU_OFFLOAD_RESIDENT_MIB": "1"}  # the operator's: what the holder's slices pay for
    for offloading in (tight, capped):
        holder = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=offloading
        )
        try:
            assert holder.stdout is not None
            ready = json.loads(holder.stdout.readline())
            assert ready["event"] == "ready", holder.stderr.read() if holder.stderr else ""
            assert (ready["backend"], ready["arena_bytes"]) == ("cpu", ready["arena_bytes"])
            assert ready["arena_bytes"] >= total  # every weight held, on the host
        finally:
            holder.terminate()
            holder.wait(30)


def test_a_holder_under_offload_on_a_device_it_cannot_use_says_so(short_tmp: Path) -> None:
    """On a device the holder keeps the resident units in a device arena of their own; a device out
    of memory (or none at all, as here, or an ordinal past the machine's) is one clear line and exit
    1, not a traceback from the allocator."""
    model = write_tiny_llama(short_tmp / "model", layers=4)
    cmd = [sys.executable, "-m", "vnpu", "runtime", "weights-holder", "--model", str(model), "--no-progress"]
    cmd += [*_share_identity_args(short_tmp), "--socket", str(short_tmp / "holder.sock")]
    cmd += ["--device", "cuda:99", "--offload-budget-mib", "0.5"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1, refused.stderr
    assert "the resident units under offload: cannot allocate" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("offload", [False, True], ids=["resident", "offloaded"])
def test_a_weights_holder_and_a_probe_never_load_torch(short_tmp: Path, offload: bool) -> None:
    """A holder that only holds (no ``--serve``) maps the weights and answers attaches, and ``probe``
    asks a holder for its status: neither needs torch, which costs a holder about 260 MiB more PSS
    (``vnpu bench runtime``'s memory section at 650c111, where an import of the offload module for its
    error class loaded it for every runtime command) and a probe seconds of CPU. GGUF weights, read
    with numpy (a safetensors checkpoint still loads torch: safetensors reads bfloat16 through it).
    Under async offload on CPU the holder makes its replicas' plan, which is torch-free too."""
    model = smollm2_dir()
    share = _share_identity_args(short_tmp)
    cmd = [sys.executable, "-m", "vnpu", "runtime", "weights-holder", "--model", str(model), "--no-progress"]
    cmd += [*share, "--socket", str(short_tmp / "holder.sock")]
    if offload:
        cmd += ["--offload-budget-mib", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert '"event": "ready"' in line, line
        assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()
        probe = ["probe", "--socket", str(short_tmp / "holder.sock"), *share]
        code = (
            "import sys; from vnpu.runtime.main import main; "
            f"code = main({probe!r}); print(code, 'torch' in sys.modules)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.stdout.splitlines()[-1].split() == ["0", "False"], out.stdout + out.stderr
    finally:
        proc.terminate()
        proc.wait(30)
