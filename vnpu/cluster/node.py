"""A real Kubernetes node on this machine: containerd + runc (Debian packages) and the kubelet built by
``build-binaries.sh``, registered with a :class:`~vnpu.cluster.controlplane.ControlPlane`.

Everything runs inside :class:`~vnpu.cluster.nodens.NodeNamespaces` (own network and mount
namespaces, own cgroup subtree), so the node uses the standard paths (``/var/lib/kubelet``,
``/run/containerd``, ``/var/log/pods``) without touching the host's, and nothing it does leaves the
namespace. The settings a VM of this kind needs:

* cgroup v1 without systemd: ``cgroupDriver: cgroupfs`` in the kubelet, ``SystemdCgroup = false`` in
  containerd, and ``failCgroupV1: false`` (the kubelet refuses cgroup v1 by default from 1.35);
* no registry: images are built locally (:mod:`vnpu.cluster.images`), the sandbox image is our own
  pause, and image garbage collection is off (``imageGCHighThresholdPercent: 100``) because a
  collected image could never be pulled again;
* pod networking: a CNI bridge with host-local addresses inside the node's network namespace; the API
  server listens on the ``kubernetes`` Service address there, so pods reach it without a kube-proxy;
* the vnpu image is the real one (Debian's python3, vnpu, torch), built by
  :mod:`vnpu.cluster.imagebuild` and imported with ``ctr``: containers see nothing of this machine's
  Python.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from vnpu.cluster import images
from vnpu.cluster.controlplane import ControlPlane
from vnpu.cluster.nodens import NodeNamespaces, sweep_orphans
from vnpu.cluster.processes import ManagedProcess, wait_until

CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
KUBELET_ROOT = "/var/lib/kubelet"
POD_LOGS = "/var/log/pods"
DEFAULT_POD_CIDR = "10.214.0.0/24"
CNI_BIN_DIR = "/usr/lib/cni"  # Debian containernetworking-plugins
CLUSTER_DOMAIN = "cluster.local"


# -- pure configuration ----------------------------------------------------------------------------------
def containerd_config(*, sandbox_image: str, cni_conf_dir: Path) -> str:
    """containerd 1.6 configuration (TOML, version 2) for a kubelet without systemd."""
    return f"""\
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
# The opt plugin would install into the host's /opt; nothing here needs it.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  enable_selinux = false
  # Lowering an OOM score needs CAP_SYS_RESOURCE, which sandboxed machines (this one) may lack:
  # clamp pods' scores at containerd's own instead of failing every sandbox.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf_dir}"
"""


def cni_conflist(pod_cidr: str = DEFAULT_POD_CIDR, bridge: str = "cni0") -> dict[str, Any]:
    """A bridge network with host-local addresses; no masquerading (nothing may leave the node)."""
    return {
        "cniVersion": "1.0.0",
        "name": "vnpu-node",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }
        ],
    }


def kubelet_config(*, address: str, cgroup_root: str, cluster_dns: str | None = None) -> dict[str, Any]:
    """KubeletConfiguration for a test node on cgroup v1 without systemd and without a registry."""
    dns = {"clusterDNS": [cluster_dns], "clusterDomain": CLUSTER_DOMAIN} if cluster_dns else {}
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": address,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroup_root,
        "failCgroupV1": False,
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
        "failSwapOn": False,
        # The API server (for logs/exec) is the only client that can reach the kubelet's port: it
        # lives in the node's private network namespace.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        # Images cannot be pulled again once collected; keep the node running on a nearly full disk.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "makeIPTablesUtilChains": False,
        "resolvConf": "/etc/resolv.conf",
        "serializeImagePulls": False,
        "nodeStatusUpdateFrequency": "4s",
        "syncFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "maxPods": 30,
        **dns,
    }


def cluster_dns_args(listen: str, records: Mapping[str, str]) -> list[str]:
    """dnsmasq as the node's cluster DNS: it answers the given names (and their subdomains) and says
    NXDOMAIN to everything else, so no query is ever forwarded out of the node."""
    args = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        "--user=root",
        "--log-facility=-",
        f"--listen-address={listen}",
        "--bind-interfaces",
        "--address=/#/",
    ]
    return args + [f"--address=/{name}/{ip}" for name, ip in sorted(records.items())]


def api_service_records(service_ip: str) -> dict[str, str]:
    """DNS names of the ``kubernetes`` Service (what in-cluster clients such as kopf resolve)."""
    return {f"kubernetes.default.svc.{CLUSTER_DOMAIN}": service_ip, "kubernetes.default.svc": service_ip}


# -- the node --------------------------------------------------------------------------------------------
class LocalNode:
    """containerd + kubelet registered as node ``name`` with ``control_plane``."""

    def __init__(
        self,
        control_plane: ControlPlane,
        namespaces: NodeNamespaces,
        bin_dir: Path,
        *,
        name: str = "vnpu-node",
        labels: Mapping[str, str] | None = None,
        pod_cidr: str = DEFAULT_POD_CIDR,
    ) -> None:
        self.cp = control_plane
        self.ns = namespaces
        self.bin_dir = bin_dir
        self.name = name
        self.labels = dict(labels or {})
        self.pod_cidr = pod_cidr
        self.dir = namespaces.workdir / "node"
        self.processes: dict[str, ManagedProcess] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> LocalNode:
        """containerd, the pause and vnpu images, the kubelet; returns once the node is Ready."""
        try:
            self.start_containerd()
            self.import_images()
            self.start_cluster_dns()
            self.start_kubelet()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the kubelet and containerd, then kill whatever else the node still runs (containers and
        their shims) — the containers' state goes with containerd's root in the work directory."""
        for name in ("kubelet", "containerd", "dns"):
            proc = self.processes.pop(name, None)
            if proc is not None:
                proc.stop(timeout=10)
        self.ns.kill_all()

    def _spawn(self, name: str, argv: Sequence[str]) -> ManagedProcess:
        proc = ManagedProcess(name, [*self.ns.wrap(), *argv], self.dir / "logs" / f"{name}.log")
        self.processes[name] = proc
        return proc

    # -- containerd --------------------------------------------------------------------------------------
    def start_containerd(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cni_dir = self.dir / "cni"
        cni_dir.mkdir(exist_ok=True)
        (cni_dir / "10-vnpu-node.conflist").write_text(json.dumps(cni_conflist(self.pod_cidr), indent=2))
        config = self.dir / "containerd.toml"
        config.write_text(containerd_config(sandbox_image=images.PAUSE_IMAGE, cni_conf_dir=cni_dir))
        proc = self._spawn("containerd", ["containerd", "--config", str(config)])
        socket = self.ns.host_path(CONTAINERD_SOCKET)

        def up() -> bool:
            if not proc.alive():
                raise RuntimeError(f"containerd exited:\n{proc.tail()}")
            return socket.exists() and self.ctr("version", check=False).returncode == 0

        wait_until(up, 30, "containerd")

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ctr`` against the node's containerd."""
        argv = [*self.ns.wrap(), "ctr", f"--address={CONTAINERD_SOCKET}", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def import_images(self) -> None:
        """Build and import the pause image; import ``local.test/vnpu:dev`` from the image cache
        (built first when this checkout's image is not there yet)."""
        from vnpu.cluster.imagebuild import ensure_image

        build = self.dir / "images"
        ctr = [*self.ns.wrap(), "ctr", f"--address={CONTAINERD_SOCKET}"]
        images.import_image(ctr, images.build_pause_image(build), images.PAUSE_IMAGE)
        images.import_image(ctr, ensure_image(), images.VNPU_IMAGE)

    # -- cluster DNS -------------------------------------------------------------------------------------
    def start_cluster_dns(self) -> None:
        """Pods resolve the API server's Service name through this (there is no CoreDNS here)."""
        proc = self._spawn(
            "dns", ["dnsmasq", *cluster_dns_args(self.ns.network.node_ip, api_service_records(self.cp.host))]
        )
        wait_until(lambda: proc.alive() and "started" in proc.tail(), 10, "the cluster DNS (dnsmasq)")

    # -- kubelet -----------------------------------------------------------------------------------------
    def start_kubelet(self) -> None:
        kdir = self.dir / "kubelet"
        kdir.mkdir(parents=True, exist_ok=True)
        config = kdir / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                kubelet_config(
                    address=self.ns.network.node_ip,
                    cgroup_root=self.ns.cgroup_root,
                    cluster_dns=self.ns.network.node_ip if "dns" in self.processes else None,
                )
            )
        )
        kubeconfig = self.cp.kubeconfig_for("kubelet", f"system:node:{self.name}", ["system:nodes"])
        argv = [
            str(self.bin_dir / "kubelet"),
            f"--config={config}",
            f"--kubeconfig={kubeconfig}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.ns.network.node_ip}",
            "--v=1",
        ]
        if self.labels:
            argv.append("--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(self.labels.items())))
        proc = self._spawn("kubelet", argv)
        wait_until(
            lambda: proc.alive() or _raise(f"kubelet exited:\n{proc.tail()}"),
            3,
            "kubelet start-up",
        )

    def stop_kubelet(self) -> None:
        proc = self.processes.pop("kubelet", None)
        if proc is not None:
            proc.stop(timeout=10)

    def restart_kubelet(self) -> None:
        """Stop and start the kubelet (containers keep running under containerd)."""
        self.stop_kubelet()
        self.start_kubelet()

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            proc = self.processes.get("kubelet")
            if proc is None or not proc.alive():
                raise RuntimeError(f"kubelet is not running:\n{proc.tail() if proc else ''}")
            out = self.cp.kubectl(
                "get",
                "node",
                self.name,
                "-o",
                'jsonpath={.status.conditions[?(@.type=="Ready")].status}',
                check=False,
            )
            return out.stdout.strip() == "True"

        wait_until(ready, timeout, f"node {self.name} Ready", interval=0.5)

    # -- inspection --------------------------------------------------------------------------------------
    def host_path(self, node_path: str) -> Path:
        """Where a node path (``/var/lib/kubelet/...``, ``/var/log/pods/...``) lives on the host."""
        return self.ns.host_path(node_path)

    def container_log(self, namespace: str, pod: str, container: str) -> str:
        """The CRI log of ``container`` (all restarts) read from the node's disk, without the API server."""
        root = self.host_path(POD_LOGS)
        chunks = []
        for pod_dir in sorted(root.glob(f"{namespace}_{pod}_*")):
            for log in sorted((pod_dir / container).glob("*.log")):
                chunks.append(log.read_text(errors="replace"))
        return "".join(chunks)

    def _run(self, argv: Sequence[str], *, wrap: bool = True) -> str:
        cmd = [*self.ns.wrap(), *argv] if wrap else list(argv)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
        return proc.stdout


def _raise(message: str) -> bool:
    raise RuntimeError(message)


# -- prerequisites and the whole single-node cluster -----------------------------------------------------
#: Host commands the node needs, with the Debian package providing each (hack/setup-env.sh installs them).
REQUIRED_COMMANDS = {
    "containerd": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "umoci": "umoci",
    "gcc": "gcc",
    "ip": "iproute2",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "mount": "mount",
    "tar": "tar",
    "dnsmasq": "dnsmasq-base",
}
REQUIRED_CNI_PLUGINS = ("bridge", "host-local", "loopback")


def missing_prerequisites() -> list[str]:
    """What keeps a real node from running here, as readable reasons (empty when nothing does)."""
    missing = []
    if sys.platform != "linux":
        return [f"a Linux host (this is {sys.platform})"]
    if os.geteuid() != 0:
        missing.append("root (the node creates namespaces, cgroups and mounts)")
    for command, package in REQUIRED_COMMANDS.items():
        if shutil.which(command) is None:
            missing.append(f"`{command}` (Debian package {package})")
    for plugin in REQUIRED_CNI_PLUGINS:
        if not (Path(CNI_BIN_DIR) / plugin).exists():
            missing.append(f"CNI plugin {CNI_BIN_DIR}/{plugin} (Debian package containernetworking-plugins)")
    if not Path("/sys/fs/cgroup").is_dir():
        missing.append("cgroups mounted at /sys/fs/cgroup")
    return missing


class SingleNodeCluster:
    """Control plane + one real node, all inside one :class:`NodeNamespaces`.

    The calling thread enters the node's network namespace for the lifetime of the cluster (between
    :meth:`start` and :meth:`stop`), so ``kubectl``, ``helm``, the Kubernetes Python client and HTTP
    calls to pod addresses made from it just work; other threads are unaffected.
    """

    def __init__(
        self,
        bin_dir: Path,
        workdir: Path,
        *,
        name: str | None = None,
        node_name: str = "vnpu-node",
        node_labels: Mapping[str, str] | None = None,
        keep_workdir: bool = False,
    ) -> None:
        """``keep_workdir`` keeps the work directory (logs, containerd's state) after :meth:`stop` and
        after a failed :meth:`start`, for a post-mortem; the caller removes it."""
        self.bin_dir = bin_dir
        self.workdir = workdir
        self.keep_workdir = keep_workdir
        self.ns = NodeNamespaces(name or f"vnpu-node-{os.getpid()}", workdir)
        self.node_name = node_name
        self.node_labels = dict(node_labels or {})
        self.cp: ControlPlane | None = None
        self.node: LocalNode | None = None
        self._entered: contextlib.ExitStack | None = None

    def start(self) -> SingleNodeCluster:
        problems = missing_prerequisites()
        if problems:
            raise RuntimeError("a real node cannot run here; missing: " + "; ".join(problems))
        sweep_orphans()  # a previous run killed with SIGKILL leaves containers behind
        stack = contextlib.ExitStack()
        try:
            self.ns.start()
            stack.callback(self.ns.stop)
            stack.enter_context(self.ns.entered())
            apiserver_vip = self.ns.network.extra_ips[0]
            self.cp = ControlPlane(
                self.bin_dir,
                self.workdir / "control-plane",
                host=apiserver_vip,
                apiserver_port=443,
                wrap=self.ns.net_wrap(),
                service_account_admission=True,
                # The node's name resolves nowhere: reach the kubelet (logs, exec) by its address.
                apiserver_args=["--kubelet-preferred-address-types=InternalIP"],
            )
            stack.callback(self.cp.remove_data)
            stack.callback(self.cp.stop)
            self.cp.start()
            self.cp.start_scheduler()
            self.cp.start_controller_manager()
            self.node = LocalNode(
                self.cp, self.ns, self.bin_dir, name=self.node_name, labels=self.node_labels
            )
            stack.callback(self.node.stop)
            self.node.start()
        except BaseException:
            stack.close()
            self._remove_workdir()
            raise
        self._entered = stack
        return self

    def stop(self) -> None:
        """Stop the node, the control plane and the namespaces; delete the work directory unless the
        cluster was made with ``keep_workdir``."""
        if self._entered is not None:
            self._entered.close()
            self._entered = None
        self._remove_workdir()

    def _remove_workdir(self) -> None:
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SingleNodeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
