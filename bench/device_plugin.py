"""``vnpu bench device-plugin``: Allocate / GetPreferredAllocation latency and ListAndWatch size.

The plugin runs as a real ``vnpu device-plugin`` process with simulated devices (8 devices x 64
slices by default), on the real path with nothing turned off: it talks to a real kube-apiserver
(its node's inventory annotation is written), reconciles with a pod-resources server every few
seconds (this process plays the kubelet's, listing every allocation made so far as a live pod's), and
serves one endpoint per device. This process is the client and times each call over the device's
unix socket, as the kubelet would see it (client-side latency, gRPC included). Allocate is measured
side by side in three checkpoint sync modes (sync: fdatasync before returning; async, the default:
fdatasync right after on a thread; off), to show what durability costs. ListAndWatch message size is
computed for one device of the same layout and for larger devices. Health changes are timed from
the backend's view changing to the ListAndWatch message that reports it (a plugin of its own with a
simulated device file, flipped ``--health-flips`` times at random points of the poll interval).

Writes ``device-plugin.json`` (with the command, commit and load), ``device-plugin.md`` and
``device-plugin.png`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The issue's goal for Allocate, checked and reported (not asserted).
GOAL_P99_ALLOCATE_MS = 5.0
#: A device's health change reaches ListAndWatch within this, at the default 0.5 s poll (reported).
GOAL_HEALTH_FLIP_MS = 1000.0
GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 0.50),
        "p90_ms": percentile(ms, 0.90),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
    }


class FakeKubeletPodResources:
    """The kubelet's pod-resources v1 List, over the allocations the client made: each Allocate call
    becomes a live pod holding its slices, so the plugin's periodic reconcile has real work to do."""

    def __init__(self, socket: Path) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        from vnpu.device_plugin.proto import podresources_pb2, podresources_pb2_grpc

        self.socket = socket
        self._lock = threading.Lock()
        self._pods: list[Any] = []
        pb = podresources_pb2
        outer = self

        class Servicer(podresources_pb2_grpc.PodResourcesListerServicer):
            def List(self, request: Any, context: Any) -> Any:
                with outer._lock:
                    return pb.ListPodResourcesResponse(pod_resources=list(outer._pods))

        self.server = grpc.server(ThreadPoolExecutor(2))
        podresources_pb2_grpc.add_PodResourcesListerServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(f"unix://{socket}")
        self.server.start()
        self._pb = pb

    def hold(self, resource: str, ids: list[str]) -> None:
        pb = self._pb
        with self._lock:
            name = f"pod-{len(self._pods)}"
            devices = pb.ContainerDevices(resource_name=resource, device_ids=ids)
            container = pb.ContainerResources(name="main", devices=[devices])
            self._pods.append(pb.PodResources(name=name, namespace="bench", containers=[container]))

    def close(self) -> None:
        self.server.stop(0)


class PluginUnderTest:
    """A ``vnpu device-plugin`` subprocess with simulated devices in a temp dir, talking to the API
    server as node ``node`` and to a pod-resources server of its own."""

    def __init__(
        self,
        devices: int,
        slices: int,
        slice_mib: int,
        sync: str,
        kubeconfig: Path,
        node: str,
        simulated_config: Path | None = None,
    ) -> None:
        from vnpu.cluster.controlplane import free_port

        self.root = Path(tempfile.mkdtemp(prefix="vnpu-bench-dp-"))
        self.metrics_port = free_port()
        self.devices = devices
        self.pod_resources = FakeKubeletPodResources(self.root / "pod-resources.sock")
        args = [
            sys.executable,
            "-m",
            "vnpu",
            "device-plugin",
            "--backend",
            "simulated",
            *(
                ["--simulated-config", str(simulated_config)]
                if simulated_config
                else ["--simulated-devices", f"{devices}x{slices * slice_mib}:2"]
            ),
            "--slice-mib",
            str(slice_mib),
            "--plugin-dir",
            str(self.root / "dp"),
            "--state-dir",
            str(self.root / "state"),
            "--socket-root",
            str(self.root / "sockets"),
            "--pod-resources-socket",
            str(self.pod_resources.socket),
            "--kubeconfig",
            str(kubeconfig),
            "--node-name",
            node,
            "--metrics-port",
            str(self.metrics_port),
            "--log-format",
            "text",
            "--checkpoint-sync",
            sync,
        ]
        self.log = (self.root / "plugin.log").open("w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log)

    def server_side_allocate(self) -> dict[str, float]:
        """Allocate latency as the plugin itself measured it (its Prometheus histogram): the upper bound
        of the bucket holding p50 and p99. Excludes the client and the transport."""
        import urllib.request

        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        )
        buckets = [
            (float(le), float(count))
            for le, count in re.findall(
                r'^vnpu_allocate_duration_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M
            )
        ]
        total = buckets[-1][1]

        def upper_ms(q: float) -> float:
            return next(le for le, count in buckets if count >= q * total) * 1000

        return {"n": total, "p50_le_ms": upper_ms(0.5), "p99_le_ms": upper_ms(0.99)}

    def stubs(self) -> list[Any]:
        """One client per device endpoint (``vnpu-memory-<index>.sock``), by device index."""
        import grpc

        from vnpu.device_plugin.proto import api_pb2_grpc

        sockets = [self.root / "dp" / f"vnpu-memory-{d}.sock" for d in range(self.devices)]
        deadline = time.monotonic() + 60
        while not all(s.exists() for s in sockets):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"plugin did not start; log: {(self.root / 'plugin.log').read_text()[-2000:]}"
                )
            time.sleep(0.05)
        self.channels = [grpc.insecure_channel(f"unix://{s}") for s in sockets]
        for channel in self.channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        return [api_pb2_grpc.DevicePluginStub(c) for c in self.channels]

    def log_text(self) -> str:
        return (self.root / "plugin.log").read_text()

    def close(self) -> None:
        for channel in getattr(self, "channels", []):
            channel.close()
        self.proc.terminate()
        self.proc.wait(15)
        self.log.close()
        self.pod_resources.close()
        shutil.rmtree(self.root, ignore_errors=True)


def measure_calls(
    devices: int, slices: int, slice_mib: int, n: int, seed: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]], dict[str, Any]]:
    """Time n calls of each kind. A real control plane runs; three plugins run at once (checkpoint
    sync, async, off), each as its own node with its own pod-resources server, and the calls are
    interleaved in a shuffled order, so machine noise hits every measurement alike. Returns the
    samples, the plugins' own Allocate histograms, and what proves the real path ran."""
    import tempfile as tf

    from kubernetes import client

    from vnpu.api import ANNOTATION_DEVICES, device_resource
    from vnpu.cluster.binaries import ensure_binaries
    from vnpu.cluster.controlplane import ControlPlane
    from vnpu.device_plugin.proto import api_pb2

    rng = random.Random(seed)
    workdir = Path(tf.mkdtemp(prefix="vnpu-bench-dp-cp-"))
    cp = ControlPlane(ensure_binaries(), workdir).start()
    core = client.CoreV1Api(cp.api_client())
    plugins: dict[str, PluginUnderTest] = {}
    try:
        for mode in ("sync", "async", "off"):
            node = f"bench-dp-{mode}"
            core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node)))
            plugins[mode] = PluginUnderTest(devices, slices, slice_mib, mode, cp.kubeconfig, node)
        stubs = {name: p.stubs() for name, p in plugins.items()}
        for per_device in stubs.values():
            for d, stub in enumerate(per_device):
                assert len(next(iter(stub.ListAndWatch(api_pb2.Empty()))).devices) == slices, d

        def allocate_call(mode: str) -> tuple[Callable[[Any], Any], Callable[[], Any]]:
            chosen: dict[str, Any] = {}

            def request() -> Any:
                size = rng.randint(1, 8)
                device, start = rng.randrange(devices), rng.randrange(slices - size + 1)
                chosen["device"] = device
                chosen["ids"] = [f"npu{device}-s{s}" for s in range(start, start + size)]
                return api_pb2.AllocateRequest(
                    container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=chosen["ids"])]
                )

            def call(req: Any) -> Any:
                response = stubs[mode][chosen["device"]].Allocate(req)
                return response

            def after() -> None:  # what the kubelet then lists as a live pod's (outside the timing)
                plugins[mode].pod_resources.hold(device_resource(chosen["device"]), chosen["ids"])

            call.after = after  # type: ignore[attr-defined]
            return call, request

        def preferred() -> tuple[Callable[[Any], Any], Callable[[], Any]]:
            chosen: dict[str, int] = {}

            def request() -> Any:
                device = chosen["device"] = rng.randrange(devices)
                available = [f"npu{device}-s{s}" for s in range(slices) if rng.random() < 0.6]
                return api_pb2.PreferredAllocationRequest(container_requests=[
                    api_pb2.ContainerPreferredAllocationRequest(
                        available_deviceIDs=available, allocation_size=rng.randint(1, 8))
                ])  # fmt: skip

            return (lambda req: stubs["async"][chosen["device"]].GetPreferredAllocation(req)), request

        kinds: dict[str, tuple[Callable[[Any], Any], Callable[[], Any]]] = {
            "allocate_sync": allocate_call("sync"),
            "allocate_async": allocate_call("async"),
            "allocate_off": allocate_call("off"),
            "preferred": preferred(),
            # The floor: a call doing no work measures gRPC and Python overhead alone.
            "floor": (stubs["async"][0].GetDevicePluginOptions, api_pb2.Empty),
        }
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        warmup = 50
        for i in range(warmup + n):
            order = list(kinds)
            rng.shuffle(order)
            for kind in order:
                call, make_request = kinds[kind]
                request = make_request()
                t = time.perf_counter()
                call(request)
                elapsed = time.perf_counter() - t
                if hasattr(call, "after"):
                    call.after()
                if i >= warmup:
                    samples[kind].append(elapsed)
        server_side = {name: p.server_side_allocate() for name, p in plugins.items()}
        annotated = {
            name: bool(
                (core.read_node(f"bench-dp-{name}").metadata.annotations or {}).get(ANNOTATION_DEVICES)
            )
            for name in plugins
        }
        logs = {name: p.log_text() for name, p in plugins.items()}
        real_path = {
            "api_server": True,
            "node_annotation_written": annotated,
            "endpoints_per_plugin": devices,
            "pod_resources_reconciles_adopting_pods": {
                name: text.count("ledger reconciled with pod-resources") for name, text in logs.items()
            },
        }
    finally:
        for p in plugins.values():
            p.close()
        cp.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return samples, server_side, real_path


def measure_health_flips(flips: int) -> list[float]:
    """Seconds from a device turning unhealthy (or healthy again) in the backend's view to the
    ListAndWatch message that tells the kubelet, ``flips`` times, alternating. The plugin polls its
    backend every ``--health-interval`` (0.5 s, the default): the issue's bar is 1 s."""
    import tempfile as tf

    from kubernetes import client

    from vnpu.cluster.binaries import ensure_binaries
    from vnpu.cluster.controlplane import ControlPlane
    from vnpu.device_plugin.backends.simulated import write_config
    from vnpu.device_plugin.proto import api_pb2

    workdir = Path(tf.mkdtemp(prefix="vnpu-bench-dp-health-"))
    config = workdir / "devices.yaml"
    devices = [{"id": f"npu{i}", "memory_mib": 8192, "numa_node": 0} for i in range(2)]
    write_config(config, devices)
    cp = ControlPlane(ensure_binaries(), workdir / "cp").start()
    plugin: PluginUnderTest | None = None
    latencies: list[float] = []
    try:
        node = "bench-dp-health"
        client.CoreV1Api(cp.api_client()).create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node)))
        plugin = PluginUnderTest(2, 8, 1024, "async", cp.kubeconfig, node, simulated_config=config)
        stream = plugin.stubs()[1].ListAndWatch(api_pb2.Empty())
        next(stream)  # the initial list
        for i in range(flips):
            health = "Unhealthy" if i % 2 == 0 else "Healthy"
            sick = dict(devices[1], health=health, reason="bench") if health == "Unhealthy" else devices[1]
            time.sleep(random.uniform(0, 0.5))  # land anywhere in the poll interval
            write_config(config, [devices[0], sick])
            changed = time.perf_counter()
            message = next(stream)
            latencies.append(time.perf_counter() - changed)
            if {d.health for d in message.devices} != {health}:
                raise RuntimeError(f"flip {i}: expected {health}, got {message}")
        stream.cancel()
    finally:
        if plugin is not None:
            plugin.close()
        cp.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return latencies


def list_and_watch_bytes(slices: int) -> dict[str, Any]:
    """Serialized size of one device's full ListAndWatch message (every slice with health and NUMA
    node): each device is its own resource, so this is what one stream carries."""
    from vnpu.device_plugin.backends.simulated import parse_spec
    from vnpu.device_plugin.devices import DeviceTable
    from vnpu.device_plugin.service import list_and_watch_response

    table = DeviceTable(slice_mib=1024)
    table.update(parse_spec(f"1x{slices * 1024}:2"))
    size = list_and_watch_response(table.entries()[0]).ByteSize()
    return {
        "slices": slices,
        "bytes": size,
        "bytes_per_slice": size / slices,
        "fraction_of_grpc_default_max": size / GRPC_DEFAULT_MAX_MESSAGE,
    }


def plot(result: dict[str, Any], samples: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in samples.items():
        ms = sorted(v * 1000 for v in values)
        ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], label=label)
    ax.axvline(
        GOAL_P99_ALLOCATE_MS,
        color="red",
        linestyle="--",
        label=f"goal: p99 Allocate < {GOAL_P99_ALLOCATE_MS} ms",
    )
    ax.set_xscale("log")
    ax.set_xlabel("latency per call, client side over the unix socket (ms, log scale)")
    ax.set_ylabel("fraction of calls")
    layout = result["layout"]
    ax.set_title(f"vnpu device plugin: {layout['devices']} devices x {layout['slices_per_device']} slices")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    rows = ["| measurement | n | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for key, label in [
        ("allocate_async", "Allocate (--checkpoint-sync async, the default)"),
        ("allocate_sync", "Allocate (--checkpoint-sync sync: fdatasync before returning)"),
        ("allocate_off", "Allocate (--checkpoint-sync off)"),
        ("preferred", "GetPreferredAllocation (~60% of slices available)"),
        ("floor", "GetDevicePluginOptions (no work: the gRPC round-trip floor)"),
        ("health_flip", "Health change in the backend -> ListAndWatch message (0.5 s poll)"),
    ]:
        s = result[key]
        rows.append(f"| {label} | {s['n']} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['max_ms']:.3f} |")
    rows += [
        "",
        "| Allocate inside the plugin (its histogram: bucket bounds) | p50 ≤ ms | p99 ≤ ms |",
        "|---|---:|---:|",
    ]
    for name, s in result["allocate_server_side"].items():
        rows.append(f"| {name} | {s['p50_le_ms']:g} | {s['p99_le_ms']:g} |")
    rows += [
        "",
        "| ListAndWatch message of one device | slices | bytes | bytes/slice | of gRPC 4 MiB default |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in result["list_and_watch"]:
        rows.append(
            f"| {m['slices']} slices | {m['slices']} | {m['bytes']} | {m['bytes_per_slice']:.1f} "
            f"| {m['fraction_of_grpc_default_max']:.2%} |"
        )
    goal, real = result["goal"], result["real_path"]
    rows += [
        "",
        f"Goal p99 Allocate < {goal['p99_allocate_ms']} ms: **{'met' if goal['met'] else 'NOT met'}** "
        f"(default mode p99 {result['allocate_async']['p99_ms']:.3f} ms). Goal health change within "
        f"{goal['max_health_flip_ms']:g} ms, every one of {result['health_flip']['n']}: "
        f"**{'met' if goal['health_flip_met'] else 'NOT met'}** "
        f"(max {result['health_flip']['max_ms']:.0f} ms). Allocate p50 sync / off = "
        f"{result['fsync_cost_ratio_p50']:.2f} (measured side by side); the no-work call's p50 "
        f"{result['floor']['p50_ms']:.3f} ms is the Python gRPC round trip every call pays. "
        f"Load average (1 min) before/after: {result['machine']['loadavg_1m_before_after']} on "
        f"{result['machine']['cpus']} CPUs.",
        "",
        f"Real path: a kube-apiserver (node annotation written: {real['node_annotation_written']}), "
        f"{real['endpoints_per_plugin']} endpoints per plugin, pod-resources reconciles that "
        f"adopted allocations: {real['pod_resources_reconciles_adopting_pods']}.",
        f"Command: `{result['run']['command']}` at commit {result['run']['commit']}.",
    ]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vnpu bench device-plugin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=8, help="simulated devices (default: %(default)s)")
    parser.add_argument("--slices", type=int, default=64, help="slices per device (default: %(default)s)")
    parser.add_argument(
        "--calls", type=int, default=2000, help="timed calls per measurement (default: %(default)s)"
    )
    parser.add_argument(
        "--health-flips", type=int, default=20, help="timed health changes (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"), help="(default: %(default)s)")
    args = parser.parse_args(argv)

    from vnpu.bench.report import provenance

    run = provenance("device-plugin", sys.argv[1:] if argv is None else argv)
    load_before = os.getloadavg()
    samples, server_side, real_path = measure_calls(
        args.devices, args.slices, 1024, args.calls, seed=args.seed
    )
    flips = measure_health_flips(args.health_flips)
    result: dict[str, Any] = {
        "suite": "device-plugin",
        "run": run,
        "layout": {"devices": args.devices, "slices_per_device": args.slices, "slice_mib": 1024},
        **{kind: summary_ms(values) for kind, values in samples.items()},
        "health_flip": summary_ms(flips),
        "allocate_server_side": server_side,
        "real_path": real_path,
        "list_and_watch": [
            list_and_watch_bytes(args.slices),
            list_and_watch_bytes(256),
            list_and_watch_bytes(2048),
        ],
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # This machine may be shared: the load average tells how much else ran during the measurement.
            "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "method": "plugins in their own processes, each with a real API server (node annotation) and a "
        "pod-resources server listing every allocation made so far; Python gRPC client in this process "
        "over the device's own unix socket; calls of all kinds interleaved in shuffled order; Allocate "
        "asks for 1-8 contiguous slices of a random device; timings are client side (request built "
        "before the timer starts)",
    }
    result["fsync_cost_ratio_p50"] = result["allocate_sync"]["p50_ms"] / result["allocate_off"]["p50_ms"]
    result["goal"] = {
        "p99_allocate_ms": GOAL_P99_ALLOCATE_MS,
        "met": result["allocate_async"]["p99_ms"] < GOAL_P99_ALLOCATE_MS,
        "max_health_flip_ms": GOAL_HEALTH_FLIP_MS,
        "health_flip_met": result["health_flip"]["max_ms"] < GOAL_HEALTH_FLIP_MS,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "device-plugin.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (args.out_dir / "device-plugin.md").write_text(text)
    labels = {
        "allocate_async": "Allocate (async, the default)",
        "allocate_sync": "Allocate (sync)",
        "allocate_off": "Allocate (off)",
        "preferred": "GetPreferredAllocation",
        "floor": "GetDevicePluginOptions (floor)",
    }
    plot(result, {labels[k]: v for k, v in samples.items()}, args.out_dir / "device-plugin.png")
    print(text)
    print(f"wrote {args.out_dir}/device-plugin.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
