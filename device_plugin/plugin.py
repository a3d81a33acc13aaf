"""Wires the parts into one running device plugin and keeps it registered.

Start order: restore the ledger from its checkpoint, poll the backend once, reconcile with the
kubelet's pod-resources API, then for every physical device serve its own gRPC endpoint
(``<plugin dir>/vnpu-memory-<index>.sock``) and register its resource (``vnpu.io/memory-<index>``).
Then keep watching: serve and register devices that appear, re-serve and re-register when the
kubelet restarts, reconcile periodically, annotate the node. The plugin never watches pods: what a
container gets depends on the device alone.

Each part of that upkeep (one device's endpoint, one endpoint's re-serving and registration, the
reconcile) fails alone: it is logged and retried on the next look, and the other parts run on. One
device whose endpoint cannot be set up (an ID that cannot name its socket directory, a directory that
cannot be created) must neither stop the plugin from starting nor keep the other devices unserved.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from vnpu.api import DEFAULT_SLICE_MIB
from vnpu.device_plugin import contract, podresources, registration
from vnpu.device_plugin.annotator import NodeAnnotator
from vnpu.device_plugin.backends import Backend, create_backend
from vnpu.device_plugin.devices import BACKEND_ERROR_GRACE_S, DeviceEntry, DeviceTable, HealthMonitor
from vnpu.device_plugin.heartbeat import Heartbeat
from vnpu.device_plugin.ledger import Ledger
from vnpu.device_plugin.metrics import PluginMetrics
from vnpu.device_plugin.proto import api_pb2_grpc
from vnpu.device_plugin.service import DeviceService, ServiceOptions
from vnpu.signals import wait_until_set

log = logging.getLogger(__name__)

#: Sticky, writable and searchable by all, readable by none but root: see ensure_socket_dir.
SOCKET_DIR_MODE = 0o1733
#: Seconds without progress of a loop (the kubelet watch: a part of its pass done; the device health: a
#: poll done) before ``/healthz`` fails. Every part is bounded by its calls' timeouts (a registration
#: 10 s, a pod-resources List 5 s, an npu-smi run 10 s), so a minute without one is a hang (a deadlock,
#: a driver call that never returns) that only a restart mends. A kubelet that is down or slow makes no
#: part last longer than its timeout.
STALL_S = 60.0
#: A registration that failed is tried again after this long, doubling up to the max while the
#: same kubelet.sock refuses it (a kubelet that died leaves its socket behind); a new kubelet.sock
#: (a kubelet that started) is tried at once.
REGISTER_RETRY_MIN_S = 0.5
REGISTER_RETRY_MAX_S = 10.0


@dataclass
class PluginConfig:
    """Every knob of the plugin; ``vnpu device-plugin --help`` documents them."""

    plugin_dir: Path = registration.DEFAULT_PLUGIN_DIR
    #: Endpoint sockets are ``<prefix><index>.sock`` in the plugin directory.
    socket_prefix: str = "vnpu-memory-"
    slice_mib: int = DEFAULT_SLICE_MIB
    backend: str = "auto"
    simulated_config: Path | None = None
    simulated_spec: str | None = None
    npu_smi: str = "npu-smi"
    sysfs_root: Path = Path("/sys")
    health_interval_s: float = 0.5
    backend_error_grace_s: float = BACKEND_ERROR_GRACE_S
    socket_root: Path = Path(contract.DEFAULT_SOCKET_ROOT)
    state_dir: Path = Path("/var/lib/vnpu/device-plugin")
    checkpoint_sync: str = "async"  #: sync | async | off (see vnpu.device_plugin.ledger)
    pod_resources_socket: Path = podresources.DEFAULT_SOCKET
    reconcile_interval_s: float = 5.0
    release_grace_s: float = 10.0
    watch_interval_s: float = 0.2
    #: a loop (kubelet watch, device health) with no progress this long is hung: /healthz fails
    stall_s: float = STALL_S
    node_name: str | None = None
    kubeconfig: Path | None = None
    use_api: bool = True  #: talk to the API server when a kubeconfig or in-cluster config exists
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9465  #: 0 disables the metrics endpoint
    grpc_workers: int = 4  #: per device endpoint (one is busy with the ListAndWatch stream)

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / "checkpoint.json"

    def socket_name(self, index: int) -> str:
        return f"{self.socket_prefix}{index}.sock"


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


class DeviceEndpoint:
    """One device's gRPC server on its own socket, registered as its own resource."""

    def __init__(self, config: PluginConfig, resource: str, index: int, service: DeviceService) -> None:
        self.config = config
        self.resource = resource
        self.index = index
        self.service = service
        self.socket_name = config.socket_name(index)
        self.socket_path = config.plugin_dir / self.socket_name
        self.registered_kubelet: registration.FileIdentity | None = None
        #: the kubelet.sock the last registration failed with, the error, and when to try it again
        self.refused_by: registration.FileIdentity | None = None
        self.register_error: str | None = None
        self.retry_delay_s = 0.0
        self.retry_at = 0.0
        self._server: grpc.Server | None = None

    @property
    def device_id(self) -> str:
        return self.service.device_id

    def serve(self) -> None:
        if self._server is not None:
            # Wait for the old server to be gone: gRPC unlinks its socket path when a server stops,
            # which would delete the new server's socket if it were already bound there.
            self._server.stop(grace=0).wait(5)
            self._server = None
        self.config.plugin_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        server = grpc.server(
            ThreadPoolExecutor(
                max_workers=self.config.grpc_workers, thread_name_prefix=f"vnpu-grpc-{self.index}"
            )
        )
        api_pb2_grpc.add_DevicePluginServicer_to_server(self.service, server)
        server.add_insecure_port(f"unix://{self.socket_path.resolve()}")
        server.start()
        self._server = server
        self.registered_kubelet = None
        log.info(
            "serving the device plugin API",
            extra={"socket": str(self.socket_path), "device": self.device_id, "resource": self.resource},
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0.5).wait(2)
            self._server = None
        self.socket_path.unlink(missing_ok=True)


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
        self.ledger = Ledger(config.checkpoint_path, sync=config.checkpoint_sync)
        # Loaded before the first poll (start): a restarted plugin gives a contested index to the device
        # its running pods hold slices of.
        self.table = DeviceTable(config.slice_mib, holding=self.ledger.count_by_device)
        self.monitor = HealthMonitor(
            self.backend, self.table, config.health_interval_s, config.backend_error_grace_s
        )
        self.metrics = PluginMetrics(self.table, self.ledger)
        self.metrics_port: int | None = None
        if core_api is None and config.use_api:
            if api_configured(config.kubeconfig) and not config.node_name:
                raise ValueError("talking to the API server needs the node name (--node-name or NODE_NAME)")
            core_api = make_core_api(config.kubeconfig)
        self.core_api = core_api
        self.annotator: NodeAnnotator | None = None
        if core_api is not None:
            if not config.node_name:
                raise ValueError("talking to the API server needs the node name (--node-name or NODE_NAME)")
            self.annotator = NodeAnnotator(
                core_api, config.node_name, self.table, unserved=lambda: dict(self._unserved)
            )
        self.options = ServiceOptions(socket_root=str(config.socket_root))
        #: resource -> its endpoint; a resource keeps its endpoint (and device) for the plugin's life
        self.endpoints: dict[str, DeviceEndpoint] = {}
        self._stop = threading.Event()
        self._watch_thread: threading.Thread | None = None
        #: a beat per part of the watch loop's pass done (each bounded by its calls' timeouts)
        self._watch = Heartbeat("kubelet watch loop")
        self.registrations = 0
        #: part of the upkeep -> the error it last failed with (logged once until it changes or clears)
        self._failing: dict[str, str] = {}
        #: device id -> why its endpoint could not be set up (the node annotation says it is Unhealthy)
        self._unserved: dict[str, str] = {}
        #: why the last reconcile could not list pod-resources (None: it could), logged once per change
        self._pod_resources_problem: str | None = None
        #: the pod-resources socket last seen: a new one is a kubelet that restarted
        self._pod_resources_identity: registration.FileIdentity | None = None
        #: time.monotonic() until which a reconcile releases nothing (a restarted kubelet's List
        #: may not name its pods yet)
        self._releases_held_until = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> PluginRunner:
        cfg = self.config
        restored = self.ledger.load()
        log.info(
            "plugin starting",
            extra={
                "backend": self.backend.name,
                "slice_mib": cfg.slice_mib,
                "plugin_dir": str(cfg.plugin_dir),
                "restored_slices": restored,
            },
        )
        self.monitor.start()
        self.reconcile()
        if cfg.metrics_port:
            self.metrics_port = self.metrics.serve(cfg.metrics_address, cfg.metrics_port, self.health)
            log.info("metrics endpoint", extra={"address": cfg.metrics_address, "port": self.metrics_port})
        if self.annotator is not None:
            self.annotator.start()
        self._add_endpoints()
        kubelet = registration.file_identity(cfg.plugin_dir / registration.KUBELET_SOCKET_NAME)
        for endpoint in self.endpoints.values():
            self._try_register(endpoint, kubelet)
        self._watch.beat()
        self._watch_thread = threading.Thread(target=self._watch_loop, name="vnpu-kubelet-watch", daemon=True)
        self._watch_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=5)
        for part in (self.annotator, self.monitor):
            if part is not None:
                part.stop()
        for endpoint in self.endpoints.values():
            endpoint.stop()
        self.table.wake_watchers()
        self.metrics.stop()
        self.ledger.close()
        self.backend.close()
        log.info("plugin stopped")

    def __enter__(self) -> PluginRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def health(self) -> str | None:
        """Why the plugin needs a restart (``/healthz`` answers 503 with it), or None. The watch loop
        re-serves vanished sockets, registers with a restarted kubelet and releases ended pods' slices;
        the health monitor reports devices that break. Hung or dead, the node's devices drift from the
        kubelet's view until someone restarts the pod."""
        # (None while starting: the endpoint serves before the loop runs)
        watch = self._watch.stalled(self._watch_thread, self._stop.is_set(), self.config.stall_s)
        return watch or self.monitor.stalled(self.config.stall_s)

    def wait(self) -> None:
        """Block until stop() is called (from a signal handler, which runs while this waits)."""
        wait_until_set(self._stop)

    # -- endpoints and registration -----------------------------------------------------------------
    def _add_endpoints(self) -> list[DeviceEndpoint]:
        """Serve an endpoint for every device with a resource of its own that has none yet. A device
        whose endpoint cannot be set up is skipped (logged) and tried again on the next call."""
        added = []
        unserved: dict[str, str] = {}
        for entry in self.table.entries():
            resource = entry.resource
            if not resource or resource in self.endpoints:
                continue
            part = f"serving {resource} for device {entry.id!r}"
            if self._attempt(part, self._add_endpoint, entry):
                added.append(self.endpoints[resource])
            else:
                unserved[entry.id] = self._failing[part]
        if unserved != self._unserved:
            self._unserved = unserved
            if self.annotator is not None:
                self.annotator.refresh()
        return added

    def _add_endpoint(self, entry: DeviceEntry) -> None:
        ensure_socket_dir(contract.device_socket_dir(self.config.socket_root, entry.id))
        service = DeviceService(
            entry.id, self.table, self.ledger, self.backend, self.options, metrics=self.metrics
        )
        endpoint = DeviceEndpoint(self.config, entry.resource, entry.device.index, service)
        endpoint.serve()
        self.endpoints[entry.resource] = endpoint

    def _attempt(self, part: str, action: Callable[..., object], *args: Any) -> bool:
        """Run one part of the upkeep; False when it failed. A failure is logged (again only when the
        error changes) and never reaches the caller, so the parts after it still run."""
        try:
            action(*args)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if self._failing.get(part) != error:
                self._failing[part] = error
                log.exception("%s failed; will retry", part, extra={"error": error})
            return False
        finally:
            self._watch.beat()  # done, either way: the loop is not hung (health)
        if self._failing.pop(part, None) is not None:
            log.info("%s works again", part)
        return True

    def _try_register(self, endpoint: DeviceEndpoint, kubelet: registration.FileIdentity | None) -> bool:
        cfg = self.config
        if kubelet is None:
            return False
        try:
            registration.register(cfg.plugin_dir, endpoint.socket_name, endpoint.resource)
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
            if kubelet != endpoint.refused_by:
                endpoint.retry_delay_s = 0.0  # another kubelet: back off from the start
            endpoint.retry_delay_s = min(
                max(2 * endpoint.retry_delay_s, REGISTER_RETRY_MIN_S), REGISTER_RETRY_MAX_S
            )
            endpoint.retry_at = time.monotonic() + endpoint.retry_delay_s
            endpoint.refused_by = kubelet
            if error != endpoint.register_error:  # once, not on every retry (a dead kubelet: for ever)
                log.warning(
                    "registration with the kubelet failed; retrying with a backoff up to %g s (logged "
                    "again only if the error changes)",
                    REGISTER_RETRY_MAX_S,
                    extra={"resource": endpoint.resource, "error": error},
                )
            endpoint.register_error = error
            return False
        endpoint.registered_kubelet = kubelet
        endpoint.refused_by, endpoint.register_error, endpoint.retry_delay_s = None, None, 0.0
        self.registrations += 1
        self.metrics.registrations.inc()
        log.info(
            "registered with the kubelet",
            extra={
                "resource": endpoint.resource,
                "device": endpoint.device_id,
                "socket": endpoint.socket_name,
            },
        )
        return True

    def _watch_loop(self) -> None:
        cfg = self.config
        kubelet_socket = cfg.plugin_dir / registration.KUBELET_SOCKET_NAME
        next_reconcile = time.monotonic() + cfg.reconcile_interval_s
        while not self._stop.wait(cfg.watch_interval_s):
            # Every part on its own: one that fails must not skip the others (see the module docstring).
            self._attempt("serving devices that appeared", self._add_endpoints)
            kubelet = registration.file_identity(kubelet_socket)
            for resource, endpoint in list(self.endpoints.items()):
                self._attempt(f"keeping {resource} served and registered", self._upkeep, endpoint, kubelet)
            if time.monotonic() >= next_reconcile:
                next_reconcile = time.monotonic() + cfg.reconcile_interval_s
                self._attempt("reconciling with pod-resources", self.reconcile)

    def _upkeep(self, endpoint: DeviceEndpoint, kubelet: registration.FileIdentity | None) -> None:
        """Serve ``endpoint`` again if its socket is gone, register it again with a new kubelet."""
        if not endpoint.socket_path.exists():
            endpoint.serve()  # logged once it worked: a failure is logged by _attempt, not on every retry
            log.warning(
                "plugin socket disappeared (kubelet restart?); served it again",
                extra={"socket": str(endpoint.socket_path)},
            )
        stale = kubelet is not None and kubelet != endpoint.registered_kubelet
        if stale and (kubelet != endpoint.refused_by or time.monotonic() >= endpoint.retry_at):
            self._try_register(endpoint, kubelet)

    # -- ledger upkeep ------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Align the ledger with the kubelet's pod-resources API when its socket exists. For a grace
        period after that socket is re-created (a kubelet restart) nothing is released: the kubelet
        serves it before it has loaded its pods, so its List can leave out pods that still run."""
        sock = self.config.pod_resources_socket
        identity = registration.file_identity(sock)
        if identity is None:
            self._pod_resources_trouble(f"its socket {sock} does not exist")
            return
        if identity != self._pod_resources_identity:
            # Also the first socket this plugin sees: it may have started while the kubelet restarted
            # too, whose first Lists would leave out pods that still run.
            self._releases_held_until = time.monotonic() + self.config.release_grace_s
            log.info(
                "the kubelet's pod-resources socket is new to this plugin (the kubelet or the plugin "
                "started): releasing no slices for %g s while the kubelet loads its pods",
                self.config.release_grace_s,
                extra={"socket": str(sock)},
            )
        self._pod_resources_identity = identity
        listed_at = time.time()  # an allocation made while the List runs is not in it, and must stay
        try:
            live = podresources.list_held_slices(sock)
        except grpc.RpcError as exc:
            self._pod_resources_trouble(f"its List at {sock} failed: {exc.code().name}: {exc.details()}")
            return
        added, released = self.ledger.reconcile(
            live,
            grace_s=self.config.release_grace_s,
            now=listed_at,
            release=time.monotonic() >= self._releases_held_until,
        )
        self.metrics.pod_resources_reconciled.set(listed_at)
        self._pod_resources_trouble(None)
        if added or released:
            log.info(
                "ledger reconciled with pod-resources",
                extra={"added": added, "released": released, "held": len(self.ledger.held_slices())},
            )

    def _pod_resources_trouble(self, problem: str | None) -> None:
        """Log a reconcile's trouble with pod-resources once when it starts or changes, and once when
        it is over (a reconcile runs every few seconds: one line each time would flood the log)."""
        if problem == self._pod_resources_problem:
            return
        sock = str(self.config.pod_resources_socket)
        if problem is not None:
            log.warning(
                "cannot reconcile allocations with the kubelet's pod-resources API: %s; slices of pods "
                "that ended are not released until it can (is --pod-resources-socket, or the chart's "
                "devicePlugin.kubeletRootDir, right?)",
                problem,
                extra={"socket": sock},
            )
        else:
            log.info("the kubelet's pod-resources API answers again", extra={"socket": sock})
        self._pod_resources_problem = problem


def ensure_socket_dir(path: Path) -> None:
    """The host directory of one device's sockets, mounted read-write into every container on that
    device. Pods run as their share group's user (see vnpu.sharing) and create their sockets here
    under names only their group can compute, so the directory is writable by all and sticky (none
    can remove another's socket), and searchable but not readable by others: a pod reaches a socket
    whose name it knows and cannot list the others'. With a listing, any tenant on the device would
    learn every group's socket name, squat it after that group's holder stops, or (from a colliding
    uid) unlink it. A directory left readable (the 1777 of earlier versions) is tightened here, on
    every start."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_mode & 0o7777 != SOCKET_DIR_MODE:
        path.chmod(SOCKET_DIR_MODE)
