"""`vnpu up` is the README's main job: it must come up on its own, place the examples, serve a real
completion, and `vnpu down` must stop all of it. This is the kwok-only mode (any machine); the
real-node mode is tests/e2e/test_main_job_up.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from vnpu.cluster.processes import wait_until


def test_up_places_serves_and_down_stops_everything(kube_bin_dir, tmp_path: Path) -> None:
    workdir = tmp_path / "up"
    png = tmp_path / "placement.png"
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vnpu",
                "up",
                "--node",
                "kwok",
                "--nodes",
                "2",
                "--workdir",
                str(workdir),
                "--png",
                str(png),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: "vnpu is up" in log.read_text() or up.poll() is not None, 400, "vnpu up", interval=1
        )
        text = log.read_text()
        assert up.poll() is None, text
        assert "SAVED MiB" in text and "device(s) in use" in text
        assert "smollm2-chat" in text and "Ready" in text
        assert "completed:" in text and "'The three primary colors are' -> '" in text
        assert png.stat().st_size > 10_000
        pids = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _child_of(int(p.name), up.pid)
        ]
        assert pids, "up runs its control plane, operator and runtime as child processes"

        down = subprocess.run(
            [sys.executable, "-m", "vnpu", "down", "--workdir", str(workdir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode == 0 and "stopped" in down.stdout
        assert up.wait(60) == 0
        time.sleep(1)
        assert not (workdir / "up.json").exists()
        assert not [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
    finally:
        if up.poll() is None:
            up.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "gone"


def _child_of(pid: int, parent: int) -> bool:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1]) == parent
    except (OSError, ValueError, IndexError):
        return False


def test_up_with_a_bad_example_says_why_and_cleans_up(kube_bin_dir, tmp_path: Path) -> None:
    """An example the API server refuses ends `up` with the server's message (no traceback) and exit 1;
    the logs named in the message stay."""
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "bad.yaml").write_text(
        "apiVersion: vnpu.io/v1alpha1\nkind: InferenceModel\nmetadata: {name: bad}\n"
        "spec: {modelName: m, source: {uri: 'file:///m.gguf'}, weights: {dtype: q4_1}}\n"
    )
    workdir = tmp_path / "up"
    proc = subprocess.run(
        [sys.executable, "-m", "vnpu", "up", "--node", "kwok", "--nodes", "1", "--once",
         "--examples", str(examples), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "vnpu up failed:" in proc.stderr and "weights.dtype" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir / "up.json").exists()
    assert (workdir / "control-plane" / "logs" / "kube-apiserver.log").stat().st_size > 0  # logs stay
