"""Leftovers of a node whose owner died (SIGKILL: containerd's shims and the containers outlive it)
are swept by the next run, and nothing else is touched."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from vnpu.cluster.nodens import cgroup_hierarchies, sweep_orphans


def _make_cgroup(name: str) -> list[Path]:
    dirs = []
    for h in cgroup_hierarchies():
        d = h / name
        d.mkdir()
        for knob in ("cpuset.cpus", "cpuset.mems"):  # cpuset children accept tasks only once set
            if (d / knob).exists():
                (d / knob).write_text((h / knob).read_text())
        dirs.append(d)
    return dirs


def test_orphaned_node_cgroups_are_swept_and_live_ones_kept() -> None:
    dead_owner = 4_000_000  # above pid_max: no such process can exist
    orphan, alive = f"vnpu-test-{dead_owner}", "vnpu-test-1"  # PID 1 is always alive
    orphan_dirs = _make_cgroup(orphan)
    alive_dirs = _make_cgroup(alive)
    leftover = subprocess.Popen(["sleep", "600"])
    try:
        for d in orphan_dirs:
            (d / "cgroup.procs").write_text(str(leftover.pid))
        assert orphan in sweep_orphans()
        assert leftover.wait(timeout=10) == -9  # killed
        assert not any(d.exists() for d in orphan_dirs)
        assert all(d.exists() for d in alive_dirs)
    finally:
        leftover.kill()
        for d in orphan_dirs + alive_dirs:
            for _ in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
