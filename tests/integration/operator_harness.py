"""Run the real operator (``vnpu operator``) as a process against the test control plane."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path
from typing import Any

from kubernetes import client

from vnpu import api
from vnpu.cluster.controlplane import free_port
from vnpu.cluster.processes import ManagedProcess, wait_until


class OperatorProcess:
    def __init__(
        self,
        control_plane: Any,
        namespace: str,
        log_dir: Path,
        kubeconfig: Path | None = None,
        *,
        clusterwide: bool = False,
    ) -> None:
        """The operator watches ``namespace`` only, or every namespace when ``clusterwide``."""
        self.cp = control_plane
        self.namespace = namespace
        self.clusterwide = clusterwide
        self.log_dir = log_dir
        self.kubeconfig = kubeconfig or control_plane.kubeconfig
        self.proc: ManagedProcess | None = None
        self.starts = 0

    def start(self, *extra: str) -> OperatorProcess:
        port, metrics_port = free_port(), free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.starts += 1
        argv = [
            *(sys.executable, "-m", "vnpu", "operator", "--standalone", "--log-format", "text"),
            *("--kubeconfig", str(self.kubeconfig), "--resync-seconds", "3"),
            *(() if self.clusterwide else ("-n", self.namespace)),
            *("--liveness", f"http://127.0.0.1:{port}/healthz", "--metrics-port", str(metrics_port)),
            *("--runtime-image", "local.test/vnpu:dev"),
            *extra,
        ]
        self.proc = ManagedProcess("operator", argv, self.log_dir / f"operator-{self.starts}.log")
        proc = self.proc

        def healthy() -> bool:
            if not proc.alive():
                raise RuntimeError(f"operator exited:\n{proc.tail(40)}")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                return resp.status == 200

        wait_until(healthy, 60, "operator liveness endpoint")
        return self

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return resp.read().decode()

    def kill(self) -> None:
        """SIGKILL, no cleanup: what a crashed or evicted operator looks like."""
        if self.proc:
            import os
            import signal

            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.proc.wait(10)
            self.proc.stop()

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("operator-*.log")))

    def post_mortem(self) -> str:
        """The newest lines of every start's log: what a failed test's report shows (see conftest)."""
        return "\n".join(
            f"--- {p.name} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-150:])
            for p in sorted(self.log_dir.glob("operator-*.log"))
        )


def get_model(cp: Any, namespace: str, name: str) -> dict[str, Any]:
    crd = client.CustomObjectsApi(cp.api_client())
    return crd.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)  # type: ignore[no-any-return]


def pods_of(cp: Any, namespace: str, selector: str = "") -> list[Any]:
    sel = f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}" + (f",{selector}" if selector else "")
    return list(client.CoreV1Api(cp.api_client()).list_namespaced_pod(namespace, label_selector=sel).items)


def live(pods: list[Any]) -> list[Any]:
    return [p for p in pods if p.metadata.deletion_timestamp is None]
