"""Pure parts of the local node (vnpu/cluster/node.py, nodens.py, images.py): the configuration the
real node runs with. The node itself is exercised by tests/e2e/test_single_node.py."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from vnpu.cluster import images
from vnpu.cluster.node import (
    api_service_records,
    cluster_dns_args,
    cni_conflist,
    containerd_config,
    kubelet_config,
)
from vnpu.cluster.nodens import KUBELET_SYSCTLS, PRIVATE_DIRS, NodeNamespaces, NodeNetwork, holder_script


def test_holder_script_confines_network_mounts_and_tunables(tmp_path: Path) -> None:
    procs = [tmp_path / "cpu/x/node/cgroup.procs", tmp_path / "memory/x/node/cgroup.procs"]
    script = holder_script(tmp_path, NodeNetwork(), procs, tmp_path / "ready")
    lines = script.splitlines()
    assert lines[0] == "set -eu" and lines[-1] == "exec sleep infinity"
    assert all(f"echo $$ > {p}" in lines for p in procs)
    assert "ip addr add 10.213.0.1/24 dev vnpu0" in lines and "ip addr add 10.0.0.1/32 dev vnpu0" in lines
    assert "ip route add default dev vnpu0" in lines  # nothing routes out of the namespace
    for target in PRIVATE_DIRS:
        assert any(line.startswith("mount --bind") and line.endswith(f" {target}") for line in lines)
    for name in KUBELET_SYSCTLS:
        assert f"mount --bind {tmp_path}/sysctl/{name} /proc/sys/{name}" in lines


def test_node_paths_map_to_the_private_copies(tmp_path: Path) -> None:
    ns = NodeNamespaces("n", tmp_path)
    assert ns.host_path("/var/lib/kubelet/device-plugins") == tmp_path / "root/var-lib/kubelet/device-plugins"
    assert ns.host_path("/var/log/pods") == tmp_path / "root/var-log/pods"
    assert ns.host_path("/run/containerd/containerd.sock") == tmp_path / "root/run/containerd/containerd.sock"
    assert (
        ns.host_path("/var/run/vnpu/share-groups") == tmp_path / "root/run/vnpu/share-groups"
    )  # /var/run -> /run
    assert ns.host_path("/var/library") == Path("/var/library")  # only whole path components match
    assert ns.host_path("/usr/bin") == Path("/usr/bin")
    assert ns.cgroup_root == "/n"


def test_containerd_config_is_valid_toml_for_a_kubelet_without_systemd(tmp_path: Path) -> None:
    text = containerd_config(sandbox_image="local.test/pause:1", cni_conf_dir=tmp_path / "cni")
    config = tomllib.loads(text)
    assert config["version"] == 2
    assert "io.containerd.internal.v1.opt" in config["disabled_plugins"]  # never writes the host's /opt
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "local.test/pause:1"
    assert cri["restrict_oom_score_adj"] is True
    runc = cri["containerd"]["runtimes"]["runc"]
    assert runc["options"]["SystemdCgroup"] is False
    assert "base_runtime_spec" not in runc  # containers see nothing of this machine's Python
    assert cri["cni"]["conf_dir"] == str(tmp_path / "cni")


def test_cni_network_never_masquerades() -> None:
    bridge = cni_conflist("10.214.0.0/24")["plugins"][0]
    assert bridge["type"] == "bridge" and bridge["ipMasq"] is False
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.214.0.0/24"}]]


def test_kubelet_config_for_cgroup_v1_without_registry() -> None:
    config = kubelet_config(address="10.213.0.1", cgroup_root="/vnpu-e2e-1")
    assert config["failCgroupV1"] is False and config["cgroupDriver"] == "cgroupfs"
    assert config["cgroupRoot"] == "/vnpu-e2e-1" and config["address"] == "10.213.0.1"
    assert config["imageGCHighThresholdPercent"] == 100  # collected images could never be pulled again
    assert config["containerRuntimeEndpoint"] == "unix:///run/containerd/containerd.sock"


def test_image_references() -> None:
    assert images.split_reference("local.test/vnpu:dev") == ("local.test/vnpu", "dev")
    assert images.split_reference("localhost:5000/x:1") == ("localhost:5000/x", "1")
    with pytest.raises(ValueError, match="explicit tag"):
        images.split_reference("localhost:5000/x")


def test_cluster_dns_answers_the_api_service_and_forwards_nothing() -> None:
    args = cluster_dns_args("10.213.0.1", api_service_records("10.0.0.1"))
    assert "--no-resolv" in args and "--conf-file=/dev/null" in args  # no upstream, no host config
    assert "--address=/#/" in args  # NXDOMAIN for every other name
    assert "--address=/kubernetes.default.svc/10.0.0.1" in args
    assert "--address=/kubernetes.default.svc.cluster.local/10.0.0.1" in args
    assert "--listen-address=10.213.0.1" in args and "--bind-interfaces" in args
    config = kubelet_config(address="10.213.0.1", cgroup_root="/x", cluster_dns="10.213.0.1")
    assert config["clusterDNS"] == ["10.213.0.1"] and config["clusterDomain"] == "cluster.local"
    assert "clusterDNS" not in kubelet_config(address="10.213.0.1", cgroup_root="/x")
