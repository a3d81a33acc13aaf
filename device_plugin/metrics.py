"""Prometheus metrics of the device plugin, served on a loopback port by default.

Device gauges are computed at scrape time from the device table and the ledger (no polling loop
to keep in sync); the Allocate latency histogram is observed by the servicer. The same port answers
``/healthz`` for the kubelet's liveness probe: 200, or 503 with the problem the plugin reports.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from vnpu.device_plugin.devices import DeviceTable
    from vnpu.device_plugin.ledger import Ledger

MIB = 1024 * 1024
#: Allocate latency buckets (seconds): the goal is p99 < 5 ms, so resolve well below that.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class _DeviceCollector(Collector):
    def __init__(self, table: DeviceTable, ledger: Ledger) -> None:
        self.table = table
        self.ledger = ledger

    def collect(self) -> Iterator[Any]:
        labels = ["device", "model"]
        total = GaugeMetricFamily(
            "vnpu_device_slices_total", "Slices advertised per physical device.", labels=labels
        )
        allocated = GaugeMetricFamily(
            "vnpu_device_slices_allocated", "Slices held by containers.", labels=labels
        )
        free = GaugeMetricFamily(
            "vnpu_device_slices_free", "Slices neither allocated nor unhealthy.", labels=labels
        )
        memory_total = GaugeMetricFamily(
            "vnpu_device_memory_total_bytes", "Device memory size.", labels=labels
        )
        memory_used = GaugeMetricFamily(
            "vnpu_device_memory_used_bytes", "Device memory in use as the backend reports it.", labels=labels
        )
        healthy = GaugeMetricFamily(
            "vnpu_device_healthy", "1 when the device is healthy, else 0.", labels=labels
        )
        held = self.ledger.count_by_device()
        for entry in self.table.entries():
            key = [entry.id, entry.device.model]
            n_alloc = min(held.get(entry.id, 0), entry.slices)
            total.add_metric(key, entry.slices)
            allocated.add_metric(key, n_alloc)
            free.add_metric(key, (entry.slices - n_alloc) if entry.healthy else 0)
            memory_total.add_metric(key, entry.total_mib * MIB)
            if entry.device.used_mib is not None:
                memory_used.add_metric(key, entry.device.used_mib * MIB)
            healthy.add_metric(key, 1 if entry.healthy else 0)
        yield from (total, allocated, free, memory_total, memory_used, healthy)


class PluginMetrics:
    """All metrics of one plugin instance in their own registry (tests can run several)."""

    def __init__(self, table: DeviceTable, ledger: Ledger) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_DeviceCollector(table, ledger))
        self.allocate_seconds = Histogram(
            "vnpu_allocate_duration_seconds",
            "Time to answer one Allocate call.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.allocate_errors = Counter(
            "vnpu_allocate_errors",
            "Allocate calls refused (bad device IDs) or failed (the journal could not take them).",
            registry=self.registry,
        )
        self.registrations = Counter(
            "vnpu_kubelet_registrations", "Successful registrations with the kubelet.", registry=self.registry
        )
        self.pod_resources_reconciled = Gauge(
            "vnpu_pod_resources_last_reconcile_timestamp_seconds",
            "When allocations were last reconciled with the kubelet's pod-resources API (Unix time; 0: "
            "never). Slices of pods that ended are released only by this reconcile.",
            registry=self.registry,
        )
        self._server: Any = None

    def serve(self, address: str, port: int, health: Callable[[], str | None] = lambda: None) -> int:
        """Start the HTTP endpoint (``/metrics``, and ``/healthz`` answering 503 with what ``health``
        returns when it is not None); returns the bound port (``port=0`` is not allowed: 0 disables
        serving)."""
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/healthz":
                return metrics(environ, start_response)  # type: ignore[no-any-return]
            problem = health()
            status = "200 OK" if problem is None else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{problem or 'ok'}\n".encode()]

        class Server(ThreadingWSGIServer):
            address_family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]

        server = make_server(address, port, app, Server, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="vnpu-metrics", daemon=True).start()
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _QuietHandler(WSGIRequestHandler):
    """No access line per scrape or probe (every few seconds, for the plugin's life)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
