"""A local control plane from the real binaries: etcd, kube-apiserver and, on demand, kube-scheduler,
kube-controller-manager and kwok. Everything listens on 127.0.0.1 (or on an address of a network
namespace the caller created) and is torn down with :meth:`ControlPlane.stop`.

The apiserver flags follow envtest's defaults (controller-runtime ``controlplane/apiserver.go``):
RBAC on, the ServiceAccount admission plugin off unless a controller-manager will create the
default service accounts.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vnpu.cluster.pki import Pki, create_pki
from vnpu.cluster.processes import ManagedProcess, wait_until

#: Room for a Service per model: every InferenceModel gets one (vnpu.operator.services), and a /24 ran
#: out at 253 ("range is full"), which the 500-model operator bench hit. 10.0.0.1 stays the API server's.
SERVICE_CIDR = "10.0.0.0/16"
#: etcd data directories are named ``<prefix><owner pid>-<random>`` so later runs can remove dead ones.
ETCD_DATA_PREFIX = "vnpu-etcd-"
#: Addresses kwok gives its fake pods and nodes: apart from the Service range (where a fake pod could
#: show the API server's ClusterIP) and from a real local node's ranges (10.213/16, 10.214/16).
KWOK_POD_CIDR = "10.215.0.0/16"
KWOK_NODE_IP = "10.212.0.1"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (the usual small race is acceptable for tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    """A self-contained kubeconfig (certificates embedded as paths the file can outlive is avoided)."""
    import base64

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "vnpu-local", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}
        ],
        "users": [
            {"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}
        ],
        "contexts": [{"name": "vnpu-local", "context": {"cluster": "vnpu-local", "user": user}}],
        "current-context": "vnpu-local",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class ControlPlane:
    """etcd + kube-apiserver (+ optional components) rooted in ``workdir``."""

    def __init__(
        self,
        bin_dir: Path,
        workdir: Path | None = None,
        *,
        host: str = "127.0.0.1",
        service_account_admission: bool = False,
        wrap: Sequence[str] = (),
        apiserver_port: int | None = None,
        apiserver_args: Sequence[str] = (),
    ) -> None:
        """``wrap`` prefixes every command (e.g. ``["ip", "netns", "exec", "vnpu-e2e"]``);
        ``apiserver_port`` fixes the secure port (e.g. 443 when ``host`` is the ``kubernetes`` Service
        address inside a private network namespace, so pods reach the API server without a kube-proxy);
        ``apiserver_args`` are appended to kube-apiserver's flags."""
        self.bin_dir = bin_dir
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="vnpu-cp-"))
        self.host = host
        self.service_account_admission = service_account_admission
        self.wrap = list(wrap)
        self.apiserver_args = list(apiserver_args)
        self.processes: dict[str, ManagedProcess] = {}
        self.etcd_port = free_port()
        self.apiserver_port = apiserver_port or free_port()
        self.pki: Pki = create_pki(self.workdir / "pki", extra_ips=(host,) if host != "127.0.0.1" else ())
        self.server = f"https://{host}:{self.apiserver_port}"
        self.kubeconfig = self.workdir / "admin.kubeconfig"

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> ControlPlane:
        try:
            self._start_etcd()
            self._start_apiserver()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.processes.pop(name).stop()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.remove_data()  # the work directory (logs) stays

    def _spawn(self, name: str, argv: Sequence[str]) -> ManagedProcess:
        proc = ManagedProcess(name, [*self.wrap, *argv], self.workdir / "logs" / f"{name}.log")
        self.processes[name] = proc
        return proc

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _start_etcd(self) -> None:
        peer = free_port()
        parent = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        sweep_dead_etcd_data(parent)
        data = Path(tempfile.mkdtemp(prefix=f"{ETCD_DATA_PREFIX}{os.getpid()}-", dir=parent))
        self._etcd_data = data
        url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{peer}"
        proc = self._spawn(
            "etcd",
            [
                self._bin("etcd"),
                "--name=vnpu",
                f"--data-dir={data}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=vnpu={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        wait_until(lambda: _http_ok(f"{url}/health"), 60, "etcd health")
        if not proc.alive():
            raise RuntimeError(f"etcd exited:\n{proc.tail()}")

    def _start_apiserver(self) -> None:
        p = self.pki
        admission = [] if self.service_account_admission else ["--disable-admission-plugins=ServiceAccount"]
        # Who deleted which pod or model: an audit trail of deletions only (cheap, and the first question
        # when a test sees something vanish).
        policy = self.workdir / "audit-policy.yaml"
        deletions = {
            "level": "Metadata",
            "verbs": ["delete", "deletecollection"],
            "resources": [
                {"group": "", "resources": ["pods"]},
                {"group": "vnpu.io", "resources": ["inferencemodels"]},
            ],
        }
        policy.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    "rules": [deletions, {"level": "None"}],
                }
            )
        )
        audit = [f"--audit-policy-file={policy}", f"--audit-log-path={self.workdir / 'logs' / 'audit.log'}"]
        proc = self._spawn(
            "kube-apiserver",
            [
                self._bin("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--bind-address={self.host}",
                f"--advertise-address={self.host}",
                f"--secure-port={self.apiserver_port}",
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={p.serving_cert}",
                f"--tls-private-key-file={p.serving_key}",
                f"--client-ca-file={p.ca_cert}",
                f"--service-account-issuer=https://{self.host}:{self.apiserver_port}",
                f"--service-account-key-file={p.sa_pub}",
                f"--service-account-signing-key-file={p.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                *admission,
                *audit,
                *self.apiserver_args,
            ],
        )
        admin = p.client("admin", "vnpu-admin", "system:masters")
        write_kubeconfig(self.kubeconfig, self.server, p.ca_cert, admin.cert, admin.key, "admin")

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"kube-apiserver exited:\n{proc.tail()}")
            return self._get("/readyz") == "ok"

        wait_until(ready, 120, "kube-apiserver /readyz")

    def start_scheduler(self) -> None:
        if "kube-scheduler" in self.processes:
            return
        sched = self.kubeconfig_for("kube-scheduler", "system:kube-scheduler")
        port = free_port()
        proc = self._spawn(
            "kube-scheduler",
            [
                self._bin("kube-scheduler"),
                f"--kubeconfig={sched}",
                f"--authentication-kubeconfig={sched}",
                f"--authorization-kubeconfig={sched}",
                f"--bind-address={self.host}",
                f"--secure-port={port}",
                "--leader-elect=false",
            ],
        )
        wait_until(
            lambda: proc.alive() and _https_ok(f"https://{self.host}:{port}/healthz"), 60, "kube-scheduler"
        )

    def start_controller_manager(self) -> None:
        if "kube-controller-manager" in self.processes:
            return
        kcm = self.kubeconfig_for("kube-controller-manager", "system:kube-controller-manager")
        port = free_port()
        proc = self._spawn(
            "kube-controller-manager",
            [
                self._bin("kube-controller-manager"),
                f"--kubeconfig={kcm}",
                f"--authentication-kubeconfig={kcm}",
                f"--authorization-kubeconfig={kcm}",
                f"--bind-address={self.host}",
                f"--secure-port={port}",
                "--leader-elect=false",
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca_cert}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--use-service-account-credentials=true",
                # Node lifecycle: notice a lost node quickly so tests of re-placement finish fast.
                "--node-monitor-grace-period=20s",
                "--node-monitor-period=2s",
            ],
        )
        wait_until(
            lambda: proc.alive() and _https_ok(f"https://{self.host}:{port}/healthz"),
            60,
            "kube-controller-manager",
        )

    def start_kwok(self) -> None:
        """The kwok controller: it keeps fake nodes Ready and runs pods bound to them."""
        if "kwok" in self.processes:
            return
        port = free_port()
        proc = self._spawn(
            "kwok",
            [
                self._bin("kwok"),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={self._bin('kwok-stages.yaml')}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--manage-nodes-with-label-selector=",
                "--manage-single-node=",
                f"--cidr={KWOK_POD_CIDR}",
                f"--node-ip={KWOK_NODE_IP}",
                "--node-lease-duration-seconds=40",
                f"--server-address={self.host}:{port}",
            ],
        )
        wait_until(lambda: proc.alive() and _http_ok(f"http://{self.host}:{port}/healthz"), 60, "kwok")

    # -- clients -----------------------------------------------------------------------------------------
    def kubeconfig_for(self, name: str, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig authenticating as ``user`` (member of ``groups``) with a client certificate."""
        org = ",".join(groups) if groups else None
        if groups and len(groups) > 1:
            raise ValueError("one group per user keeps the openssl subject simple")
        cert = self.pki.client(name, user, org)
        return write_kubeconfig(
            self.workdir / f"{name}.kubeconfig", self.server, self.pki.ca_cert, cert.cert, cert.key, name
        )

    def api_client(self, kubeconfig: Path | None = None) -> Any:
        """A ``kubernetes.client.ApiClient`` for the admin (or the given kubeconfig)."""
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig or self.kubeconfig), client_configuration=cfg)
        return client.ApiClient(cfg)

    def wait_established(self, crd: str, timeout: float = 60) -> None:
        """Wait until CustomResourceDefinition ``crd`` serves its resource. Not ``kubectl wait
        --for=condition=Established``: on a busy server it can look before the CRD has any conditions,
        and then fails at once (".status.conditions accessor error") instead of waiting."""
        query = '{.status.conditions[?(@.type=="Established")].status}'

        def established() -> bool:
            got = self.kubectl("get", f"crd/{crd}", "-o", f"jsonpath={query}", check=False)
            return got.returncode == 0 and got.stdout.strip() == "True"

        wait_until(established, timeout, f"CRD {crd} Established", interval=0.2)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self._bin("kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, check=False, timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def _get(self, path: str) -> str:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        admin = self.pki.client("admin", "vnpu-admin", "system:masters")
        ctx.load_cert_chain(str(admin.cert), str(admin.key))
        with urllib.request.urlopen(f"{self.server}{path}", context=ctx, timeout=5) as resp:
            return resp.read().decode()

    def remove_data(self) -> None:
        """Delete etcd's data (it lives in memory, under /dev/shm, when that exists)."""
        shutil.rmtree(getattr(self, "_etcd_data", ""), ignore_errors=True)

    def cleanup(self) -> None:
        """Stop everything and delete the work directory and etcd data."""
        self.stop()
        self.remove_data()
        shutil.rmtree(self.workdir, ignore_errors=True)


def sweep_dead_etcd_data(parent: Path) -> list[Path]:
    """Remove etcd data directories whose owning process is gone (a SIGKILLed run cannot clean up, and
    under /dev/shm its data would hold memory until reboot). Returns what was removed."""
    removed = []
    for path in parent.glob(f"{ETCD_DATA_PREFIX}*-*"):
        owner = path.name[len(ETCD_DATA_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


def _https_ok(url: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed serving certs of scheduler/controller-manager
    with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
        return bool(resp.status == 200)
