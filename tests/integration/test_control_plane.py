"""The local control plane itself: real versions, kwok NPU nodes, clean teardown."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kubernetes import client

from vnpu import api
from vnpu.cluster.controlplane import ControlPlane
from vnpu.cluster.processes import wait_until
from vnpu.inventory import NodeInventory


def test_apiserver_reports_the_pinned_release(control_plane) -> None:
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.34.4"
    assert version["clientVersion"]["gitVersion"] == "v1.34.4"


def test_rbac_is_enforced(control_plane) -> None:
    nobody = control_plane.kubeconfig_for("nobody", "nobody")
    proc = control_plane.kubectl("get", "pods", "-A", kubeconfig=nobody, check=False)
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower()


def test_kwok_nodes_advertise_vnpu_memory_and_become_ready(control_plane, kwok_nodes) -> None:
    names = kwok_nodes(2, devices=4, device_mib=32 * 1024)
    core = client.CoreV1Api(control_plane.api_client())

    def all_ready() -> bool:
        for name in names:
            node = core.read_node(name)
            ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
            if not ready or ready[0].status != "True":
                return False
        return True

    wait_until(all_ready, 60, "kwok nodes Ready")
    node = core.read_node(names[0])
    assert {k: v for k, v in node.status.allocatable.items() if api.is_vnpu_resource(k)} == {
        api.device_resource(i): "32" for i in range(4)
    }
    inventory = NodeInventory.from_json(node.metadata.annotations[api.ANNOTATION_DEVICES])
    assert [d.slices for d in inventory.devices] == [32, 32, 32, 32]


def test_teardown_leaves_no_process_behind(kube_bin_dir, tmp_path) -> None:
    with ControlPlane(kube_bin_dir, tmp_path) as cp:
        cp.start_kwok()
        pids = [p.pid for p in cp.processes.values()]
        etcd_data = cp._etcd_data
        assert etcd_data.name.startswith(f"vnpu-etcd-{os.getpid()}-")  # a later run can tell it is ours
    # Leaving the context stopped everything and removed etcd's (in-memory) data.
    assert not etcd_data.exists()
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z"
