"""etcd data of a control plane whose owner died (SIGKILL) is removed by the next start; live owners'
data and unrelated directories are left alone."""

from __future__ import annotations

from pathlib import Path

from vnpu.cluster.controlplane import ETCD_DATA_PREFIX, sweep_dead_etcd_data


def test_only_dead_owners_data_is_removed(tmp_path: Path) -> None:
    dead = tmp_path / f"{ETCD_DATA_PREFIX}4000000-abc"  # above pid_max: no such process
    alive = tmp_path / f"{ETCD_DATA_PREFIX}1-def"  # PID 1 always runs
    unrelated = tmp_path / f"{ETCD_DATA_PREFIX}notapid-x"
    for d in (dead, alive, unrelated):
        (d / "member").mkdir(parents=True)
    assert sweep_dead_etcd_data(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and unrelated.exists()
