"""Wires the parts into one running device plugin and keeps it registered.

Start order: restore the ledger from its checkpoint, poll the backend once, reconcile with the
kubelet's pod-resources API, serve gRPC on ``<plugin dir>/<socket>``, register, then keep watching:
re-serve and re-register when the kubelet restarts, reconcile periodically, annotate the node,
watch this node's pods.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from vnpu.api import DEFAULT_SLICE_MIB, RESOURCE_MEMORY
from vnpu.device_plugin import contract, podresources, registration
from vnpu.device_plugin.annotator import NodeAnnotator
from vnpu.device_plugin.backends import Backend, create_backend
from vnpu.device_plugin.devices import DeviceTable, HealthMonitor
from vnpu.device_plugin.ledger import Ledger
from vnpu.device_plugin.metrics import PluginMetrics
from vnpu.device_plugin.pods import PodWatcher
from vnpu.device_plugin.proto import api_pb2_grpc
from vnpu.device_plugin.service import DevicePluginService, ServiceOptions

log = logging.getLogger(__name__)


@dataclass
class PluginConfig:
    """Every knob of the plugin; ``vnpu device-plugin --help`` documents them."""

    plugin_dir: Path = registration.DEFAULT_PLUGIN_DIR
    socket_name: str = "vnpu-memory.sock"
    resource_name: str = RESOURCE_MEMORY
    slice_mib: int = DEFAULT_SLICE_MIB
    backend: str = "auto"
    simulated_config: Path | None = None
    simulated_spec: str | None = None
    npu_smi: str = "npu-smi"
    sysfs_root: Path = Path("/sys")
    health_interval_s: float = 0.5
    allow_spanning: bool = False
    share_root: Path = Path(contract.DEFAULT_SHARE_ROOT)
    state_dir: Path = Path("/var/lib/vnpu/device-plugin")
    checkpoint_sync: str = "async"  #: sync | async | off (see vnpu.device_plugin.ledger)
    pod_resources_socket: Path = podresources.DEFAULT_SOCKET
    reconcile_interval_s: float = 30.0
    release_grace_s: float = 10.0
    watch_interval_s: float = 0.2
    node_name: str | None = None
    kubeconfig: Path | None = None
    use_api: bool = True  #: talk to the API server when a kubeconfig or in-cluster config exists
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9465  #: 0 disables the metrics endpoint
    grpc_workers: int = 16

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / "checkpoint.json"

    @property
    def socket_path(self) -> Path:
        return self.plugin_dir / self.socket_name


def api_configured(kubeconfig: Path | None) -> bool:
    """Whether API-server access is configured: a kubeconfig, or running in a pod."""
    return kubeconfig is not None or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def make_core_api(kubeconfig: Path | None) -> Any | None:
    """A CoreV1Api from ``kubeconfig``, else from the in-cluster service account, else None.
    Raises ValueError when the configuration exists but cannot be loaded."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        if kubeconfig is not None:
            return client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.CoreV1Api(client.ApiClient(configuration))
    except (ConfigException, OSError) as exc:
        raise ValueError(
            f"cannot load the API-server configuration ({kubeconfig or 'in-cluster'}): {exc}"
        ) from exc
    return None


class PluginRunner:
    """One device plugin instance: start(), then stop() (or use as a context manager)."""

    def __init__(
        self, config: PluginConfig, backend: Backend | None = None, core_api: Any | None = None
    ) -> None:
        self.config = config
        self.backend = backend or create_backend(
            config.backend,
            config_path=config.simulated_config,
            spec=config.simulated_spec,
            npu_smi=config.npu_smi,
            sysfs_root=config.sysfs_root,
        )
        self.table = DeviceTable(config.slice_mib)
        self.monitor = HealthMonitor(self.backend, self.table, config.health_interval_s)
        self.ledger = Ledger(config.checkpoint_path, sync=config.checkpoint_sync)
        self.metrics = PluginMetrics(self.table, self.ledger)
        self.metrics_port: int | None = None
        if core_api is None and config.use_api:
            if api_configured(config.kubeconfig) and not config.node_name:
                raise ValueError("talking to the API server needs the node name (--node-name or NODE_NAME)")
            core_api = make_core_api(config.kubeconfig)
        self.core_api = core_api
        self.pods: PodWatcher | None = None
        self.annotator: NodeAnnotator | None = None
        if core_api is not None:
            if not config.node_name:
                raise ValueError("talking to the API server needs the node name (--node-name or NODE_NAME)")
            self.pods = PodWatcher(
                core_api, config.node_name, resource=config.resource_name, on_gone=self._release_pods
            )
            self.annotator = NodeAnnotator(core_api, config.node_name, self.table)
        self.service = DevicePluginService(
            self.table,
            self.ledger,
            self.backend,
            ServiceOptions(config.slice_mib, config.allow_spanning, config.share_root),
            pods=self.pods,
            metrics=self.metrics,
        )
        self._server: grpc.Server | None = None
        self._stop = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._registered_kubelet: registration.FileIdentity | None = None
        self.registrations = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> PluginRunner:
        cfg = self.config
        restored = self.ledger.load()
        log.info(
            "plugin starting",
            extra={
                "backend": self.backend.name,
                "resource": cfg.resource_name,
                "slice_mib": cfg.slice_mib,
                "plugin_dir": str(cfg.plugin_dir),
                "restored_slices": restored,
            },
        )
        self.monitor.start()
        self.reconcile()
        if cfg.metrics_port:
            self.metrics_port = self.metrics.serve(cfg.metrics_address, cfg.metrics_port)
            log.info("metrics endpoint", extra={"address": cfg.metrics_address, "port": self.metrics_port})
        if self.pods is not None:
            self.pods.start()
        if self.annotator is not None:
            self.annotator.start()
        self._serve()
        self._try_register()
        self._watch_thread = threading.Thread(target=self._watch_loop, name="vnpu-kubelet-watch", daemon=True)
        self._watch_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=5)
        for part in (self.annotator, self.pods, self.monitor):
            if part is not None:
                part.stop()
        if self._server is not None:
            self._server.stop(grace=0.5).wait(2)
            self._server = None
        self.table.wake_watchers()
        self.metrics.stop()
        self.ledger.close()
        self.backend.close()
        self.config.socket_path.unlink(missing_ok=True)
        log.info("plugin stopped")

    def __enter__(self) -> PluginRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self) -> None:
        """Block until stop() is called (from a signal handler)."""
        self._stop.wait()

    # -- gRPC server and registration ---------------------------------------------------------------
    def _serve(self) -> None:
        cfg = self.config
        if self._server is not None:
            # Wait for the old server to be gone: gRPC unlinks its socket path when a server stops,
            # which would delete the new server's socket if it were already bound there.
            self._server.stop(grace=0).wait(5)
            self._server = None
        cfg.plugin_dir.mkdir(parents=True, exist_ok=True)
        cfg.socket_path.unlink(missing_ok=True)
        server = grpc.server(ThreadPoolExecutor(max_workers=cfg.grpc_workers, thread_name_prefix="vnpu-grpc"))
        api_pb2_grpc.add_DevicePluginServicer_to_server(self.service, server)
        server.add_insecure_port(f"unix://{cfg.socket_path.resolve()}")
        server.start()
        self._server = server
        log.info("serving the device plugin API", extra={"socket": str(cfg.socket_path)})

    def _try_register(self) -> bool:
        cfg = self.config
        kubelet = cfg.plugin_dir / registration.KUBELET_SOCKET_NAME
        identity = registration.file_identity(kubelet)
        if identity is None:
            return False
        try:
            registration.register(cfg.plugin_dir, cfg.socket_name, cfg.resource_name)
        except grpc.RpcError as exc:
            log.warning(
                "registration with the kubelet failed; will retry",
                extra={"kubelet_socket": str(kubelet), "error": f"{exc.code().name}: {exc.details()}"},
            )
            return False
        self._registered_kubelet = identity
        self.registrations += 1
        self.metrics.registrations.inc()
        log.info(
            "registered with the kubelet",
            extra={"kubelet_socket": str(kubelet), "resource": cfg.resource_name},
        )
        return True

    def _watch_loop(self) -> None:
        cfg = self.config
        kubelet = cfg.plugin_dir / registration.KUBELET_SOCKET_NAME
        next_reconcile = time.monotonic() + cfg.reconcile_interval_s
        retry_at = 0.0
        while not self._stop.wait(cfg.watch_interval_s):
            try:
                if not cfg.socket_path.exists():
                    log.warning(
                        "plugin socket disappeared (kubelet restart?); serving again",
                        extra={"socket": str(cfg.socket_path)},
                    )
                    self._serve()
                    self._registered_kubelet = None
                identity = registration.file_identity(kubelet)
                stale = identity is not None and identity != self._registered_kubelet
                if stale and time.monotonic() >= retry_at and not self._try_register():
                    retry_at = time.monotonic() + 0.5
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + cfg.reconcile_interval_s
                    self.reconcile()
            except Exception:  # keep watching whatever happens
                log.exception("kubelet watch iteration failed")

    # -- ledger upkeep ------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Align the ledger with the kubelet's pod-resources API when its socket exists."""
        sock = self.config.pod_resources_socket
        if not sock.exists():
            return
        try:
            live = podresources.list_held_slices(sock, self.config.resource_name)
        except grpc.RpcError as exc:
            log.warning("pod-resources List failed", extra={"socket": str(sock), "error": str(exc.code())})
            return
        added, released = self.ledger.reconcile(live, grace_s=self.config.release_grace_s)
        if added or released:
            log.info(
                "ledger reconciled with pod-resources",
                extra={"added": added, "released": released, "held": len(self.ledger.held_slices())},
            )

    def _release_pods(self, gone: list[Any]) -> None:
        released = self.ledger.release_pods(gone)
        if released:
            log.info(
                "released slices of finished pods", extra={"pods": [str(p) for p in gone], "slices": released}
            )
