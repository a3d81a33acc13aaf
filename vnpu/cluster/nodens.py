"""The private world a local node lives in: its own network and mount namespaces and a cgroup subtree.

A real kubelet with containerd touches a lot of a host: it creates network interfaces and pod network
namespaces, mounts volumes, writes under ``/var/lib``, ``/var/log`` and ``/run``, creates cgroups and
sets kernel tunables. :class:`NodeNamespaces` confines all of that, the way a VM or a kind node would:

* **network**: a fresh network namespace holding a bridge ``vnpu0`` with the node address and the API
  server's service address, and a default route into that bridge, so nothing the node does can leave
  it. Callers reach it from a thread that entered the namespace (:meth:`NodeNamespaces.entered`).
* **mounts**: a private mount namespace in which ``/var/lib``, ``/var/log`` and ``/run`` are bind mounts
  of directories under the work directory (so the node keeps the standard paths — the kubelet's
  ``/var/lib/kubelet``, containerd's ``/run/containerd`` — while the host's stay untouched), and the
  kernel tunables the kubelet insists on setting are regular files bound over ``/proc/sys``.
  Mounts the node makes (volumes, container root filesystems) die with the namespace.
* **cgroups**: a subtree ``/<name>`` in every cgroup hierarchy; the daemons run in ``/<name>/node`` and
  the kubelet puts pods below ``/<name>`` (its ``cgroupRoot``). Teardown kills everything in the
  subtree — containers and containerd's shims included — and removes it.

A holder process (``sleep infinity`` started by ``unshare``) keeps the namespaces alive; every
daemon enters them with ``nsenter`` (:meth:`NodeNamespaces.wrap`). Linux only, needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vnpu.cluster.processes import ManagedProcess, wait_until

CGROUP_MOUNT = Path("/sys/fs/cgroup")
#: Host directories that the node sees as private copies (bind mounts of ``<workdir>/<name>``).
PRIVATE_DIRS = ("/var/lib", "/var/log", "/run")
#: Tunables the kubelet sets at start-up unless ``protectKernelDefaults`` (which would make it exit
#: when they differ). Inside the node they are plain files, so the host's values never change.
KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
_CLONE_NEWNET = 0x40000000
#: Names ending in the owner's PID (``vnpu-e2e-1234``) let a later run recognise leftovers of a dead one.
_OWNED_NAME = re.compile(r"^vnpu-[a-z0-9-]*?-(?P<pid>\d+)$")


@dataclass(frozen=True)
class NodeNetwork:
    """Addresses inside the node's network namespace (all private, none routed anywhere)."""

    #: The node's InternalIP (kubelet ``--node-ip``), on bridge ``vnpu0``.
    node_ip: str = "10.213.0.1"
    node_prefix: int = 24
    #: Extra local addresses, e.g. the ``kubernetes`` Service ClusterIP the API server binds to so
    #: that in-cluster clients reach it without a kube-proxy.
    extra_ips: tuple[str, ...] = ("10.0.0.1",)
    bridge: str = "vnpu0"


def holder_script(workdir: Path, network: NodeNetwork, cgroup_procs: Sequence[Path], ready: Path) -> str:
    """The shell script the namespace holder runs (in its fresh namespaces) before it sleeps."""
    q = shlex.quote
    lines = ["set -eu"]
    lines += [f"echo $$ > {q(str(p))}" for p in cgroup_procs]
    lines += [
        "ip link set lo up",
        f"ip link add {network.bridge} type bridge",
        f"ip addr add {network.node_ip}/{network.node_prefix} dev {network.bridge}",
        *(f"ip addr add {ip}/32 dev {network.bridge}" for ip in network.extra_ips),
        f"ip link set {network.bridge} up",
        f"ip route add default dev {network.bridge}",
    ]
    for target in PRIVATE_DIRS:
        lines.append(f"mount --bind {q(str(private_dir(workdir, target)))} {q(target)}")
    for name in KUBELET_SYSCTLS:
        lines.append(f"mount --bind {q(str(workdir / 'sysctl' / name))} {q('/proc/sys/' + name)}")
    lines += [f"touch {q(str(ready))}", "exec sleep infinity"]
    return "\n".join(lines) + "\n"


def private_dir(workdir: Path, target: str) -> Path:
    """Where the node's private copy of host directory ``target`` lives on the host."""
    return workdir / "root" / target.strip("/").replace("/", "-")


def _through_host_symlinks(path: str) -> str:
    """``path`` with the host's symlinks above the private directories resolved (``/var/run/x`` is
    ``/run/x`` on Debian); components inside a private directory are left alone."""
    resolved = "/"
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        candidate = os.path.join(resolved, part)
        if candidate in PRIVATE_DIRS:
            return "/".join([candidate, *parts[i + 1 :]])
        resolved = os.path.realpath(candidate) if os.path.islink(candidate) else candidate
    return resolved


def cgroup_hierarchies() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers, named ones and a hybrid's cgroup2)."""
    found = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, target, fstype, *_ = line.split()
            if fstype in ("cgroup", "cgroup2") and target.startswith(str(CGROUP_MOUNT)):
                found.append(Path(target))
    return found


def _setns(fd: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def sweep_orphans() -> list[str]:
    """Remove the cgroup subtrees (and kill what still runs in them: containers and containerd shims
    survive a SIGKILLed owner) of nodes whose owning process is gone. Returns the names removed."""
    removed = []
    names = {d.name for h in cgroup_hierarchies() if h.is_dir() for d in h.iterdir() if d.is_dir()}
    for name in sorted(names):
        m = _OWNED_NAME.match(name)
        if m is None or Path(f"/proc/{m.group('pid')}").exists():
            continue
        NodeNamespaces(name, Path("/nonexistent")).stop()
        removed.append(name)
    return removed


class NodeNamespaces:
    """Network + mount namespaces and a cgroup subtree named ``name`` (unique per run)."""

    def __init__(self, name: str, workdir: Path, network: NodeNetwork | None = None) -> None:
        self.name = name
        self.workdir = workdir
        self.network = network or NodeNetwork()
        self.holder: ManagedProcess | None = None
        self._hierarchies = cgroup_hierarchies()

    # -- paths -------------------------------------------------------------------------------------------
    @property
    def cgroup_root(self) -> str:
        """The kubelet's ``cgroupRoot``: pods go below it."""
        return f"/{self.name}"

    def host_path(self, node_path: str | Path) -> Path:
        """The host path of a file the node sees at ``node_path`` (inside a private directory)."""
        p = _through_host_symlinks(str(node_path))
        for target in PRIVATE_DIRS:
            if p == target or p.startswith(target + "/"):
                return private_dir(self.workdir, target) / p[len(target) :].lstrip("/")
        return Path(p)

    @property
    def pid(self) -> int:
        if self.holder is None or not self.holder.alive():
            raise RuntimeError(f"the namespaces of node {self.name} are not running")
        return self.holder.pid

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> NodeNamespaces:
        for target in PRIVATE_DIRS:
            if str(self.workdir).startswith(target + "/"):
                raise ValueError(f"the work directory {self.workdir} must not lie under {target}")
            private_dir(self.workdir, target).mkdir(parents=True, exist_ok=True)
        for name in KUBELET_SYSCTLS:
            copy = self.workdir / "sysctl" / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(Path("/proc/sys", name).read_text())
        # Symlinked directories of the standard layout (/var/run -> /run) work unchanged.
        self._make_cgroups()
        ready = self.workdir / "namespaces.ready"
        ready.unlink(missing_ok=True)
        script = holder_script(self.workdir, self.network, self._procs_files("node"), ready)
        self.holder = ManagedProcess(
            "node-namespaces",
            ["unshare", "--net", "--mount", "--propagation=private", "--", "sh", "-c", script],
            self.workdir / "logs" / "namespaces.log",
        )

        def up() -> bool:
            if self.holder is not None and not self.holder.alive():
                raise RuntimeError(f"setting up the node namespaces failed:\n{self.holder.tail()}")
            return ready.exists()

        try:
            wait_until(up, 20, "node namespaces")
        except BaseException:
            self.stop()
            raise
        return self

    def wrap(self) -> list[str]:
        """Command prefix running a command in the node's cgroup and namespaces (the pid stays the same:
        ``sh`` joins the cgroup and execs ``nsenter``, which execs the command)."""
        join = "; ".join(f"echo $$ > {shlex.quote(str(p))}" for p in self._procs_files("node"))
        return [
            "sh",
            "-c",
            f'{join}; exec "$@"',
            "sh",
            "nsenter",
            f"--target={self.pid}",
            "--net",
            "--mount",
            "--",
        ]

    def net_wrap(self) -> list[str]:
        """Command prefix entering only the network namespace (for the control plane, which keeps the
        host's files but must listen on the node's addresses)."""
        return ["nsenter", f"--target={self.pid}", "--net", "--"]

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the calling thread (and the threads and processes it starts) in the node's network
        namespace: HTTP clients, ``kubectl`` and ``helm`` then reach the node's addresses. ``setns`` is
        per thread, so the rest of the process is unaffected."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)

    def stop(self) -> None:
        """Kill every process of the node (daemons, shims, containers), end the namespaces, remove the
        cgroup subtree. Idempotent."""
        self.kill_all()
        if self.holder is not None:
            self.holder.stop(timeout=2)
            self.holder = None
        self._remove_cgroups()

    def kill_all(self, timeout: float = 30.0) -> None:
        """SIGKILL whatever runs in the cgroup subtree until it is empty."""
        deadline = time.monotonic() + timeout
        holder = self.holder.pid if self.holder is not None else None
        while True:
            pids = self.pids() - ({holder} if holder else set())
            if not pids:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of node {self.name} survived SIGKILL: {sorted(pids)}")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def pids(self) -> set[int]:
        """Every process in the node's cgroup subtree (in any hierarchy)."""
        found: set[int] = set()
        for root in self._cgroup_dirs():
            for directory, _, files in os.walk(root):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError):
                        found.update(int(x) for x in Path(directory, "cgroup.procs").read_text().split())
        return found

    # -- cgroups -----------------------------------------------------------------------------------------
    def _cgroup_dirs(self) -> list[Path]:
        return [h / self.name for h in self._hierarchies]

    def _procs_files(self, child: str) -> list[Path]:
        return [d / child / "cgroup.procs" for d in self._cgroup_dirs()]

    def _make_cgroups(self) -> None:
        for hierarchy in self._hierarchies:
            parent = hierarchy
            for part in (self.name, "node"):
                d = parent / part
                d.mkdir(exist_ok=True)
                # cpuset children start empty and accept no task until given CPUs and memory nodes.
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    if (d / knob).exists() and not (d / knob).read_text().strip():
                        (d / knob).write_text((parent / knob).read_text())
                parent = d

    def _remove_cgroups(self) -> None:
        for root in self._cgroup_dirs():
            if not root.exists():
                continue
            for directory, _, _ in sorted(os.walk(root), key=lambda w: -len(Path(w[0]).parts)):
                for _ in range(50):  # a cgroup is busy for a moment after its last task died
                    try:
                        os.rmdir(directory)
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.1)
