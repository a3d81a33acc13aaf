"""``vnpu bench device-plugin``: Allocate / GetPreferredAllocation latency and ListAndWatch size.

The plugin runs as a real ``vnpu device-plugin`` process with simulated devices (8 devices x 64
slices by default); this process is the client and times each call over the plugin's unix socket,
as the kubelet would see it (client-side latency, gRPC included). Allocate is measured twice side by
side in three checkpoint sync modes (sync: fdatasync before returning; async, the default: fdatasync
right after on a thread; off), to show what durability
costs. ListAndWatch message size is computed for the same layout and for 2,048 slices.

Writes ``device-plugin.json``, ``device-plugin.md`` and ``device-plugin.png`` to ``--out-dir``.
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


class PluginUnderTest:
    """A ``vnpu device-plugin`` subprocess with simulated devices in a temp dir."""

    def __init__(self, devices: int, slices: int, slice_mib: int, sync: str) -> None:
        from vnpu.cluster.controlplane import free_port

        self.root = Path(tempfile.mkdtemp(prefix="vnpu-bench-dp-"))
        self.metrics_port = free_port()
        self.socket = self.root / "dp" / "vnpu-memory.sock"
        args = [
            sys.executable,
            "-m",
            "vnpu",
            "device-plugin",
            "--backend",
            "simulated",
            "--simulated-devices",
            f"{devices}x{slices * slice_mib}:2",
            "--slice-mib",
            str(slice_mib),
            "--plugin-dir",
            str(self.root / "dp"),
            "--state-dir",
            str(self.root / "state"),
            "--share-root",
            str(self.root / "share"),
            "--pod-resources-socket",
            str(self.root / "none.sock"),
            "--no-api",
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

    def stub(self) -> Any:
        import grpc

        from vnpu.device_plugin.proto import api_pb2_grpc

        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"plugin did not start; log: {(self.root / 'plugin.log').read_text()[-2000:]}"
                )
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=10)
        return api_pb2_grpc.DevicePluginStub(self.channel)

    def close(self) -> None:
        if hasattr(self, "channel"):
            self.channel.close()
        self.proc.terminate()
        self.proc.wait(15)
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def measure_calls(
    devices: int, slices: int, slice_mib: int, n: int, seed: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Time n calls of each kind. Three plugins run at once (checkpoint sync, async, off) and the
    calls are interleaved in a shuffled order, so machine noise hits every measurement alike."""
    from vnpu.device_plugin.proto import api_pb2

    rng = random.Random(seed)
    ids = [f"npu{d}-s{s}" for d in range(devices) for s in range(slices)]
    plugins = {
        "sync": PluginUnderTest(devices, slices, slice_mib, sync="sync"),
        "async": PluginUnderTest(devices, slices, slice_mib, sync="async"),
        "off": PluginUnderTest(devices, slices, slice_mib, sync="off"),
    }
    try:
        stubs = {name: p.stub() for name, p in plugins.items()}
        for stub in stubs.values():
            assert len(next(iter(stub.ListAndWatch(api_pb2.Empty()))).devices) == devices * slices

        def allocate_request() -> Any:
            size = rng.randint(1, 8)
            device, start = rng.randrange(devices), rng.randrange(slices - size + 1)
            chosen = [f"npu{device}-s{s}" for s in range(start, start + size)]
            return api_pb2.AllocateRequest(
                container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=chosen)]
            )

        def preferred_request() -> Any:
            available = [s for s in ids if rng.random() < 0.6]
            return api_pb2.PreferredAllocationRequest(container_requests=[
                api_pb2.ContainerPreferredAllocationRequest(available_deviceIDs=available,
                                                            allocation_size=rng.randint(1, 8))
            ])  # fmt: skip

        kinds: dict[str, tuple[Callable[[Any], Any], Callable[[], Any]]] = {
            "allocate_sync": (stubs["sync"].Allocate, allocate_request),
            "allocate_async": (stubs["async"].Allocate, allocate_request),
            "allocate_off": (stubs["off"].Allocate, allocate_request),
            "preferred": (stubs["async"].GetPreferredAllocation, preferred_request),
            # The floor: a call doing no work measures gRPC and Python overhead alone.
            "floor": (stubs["async"].GetDevicePluginOptions, api_pb2.Empty),
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
                if i >= warmup:
                    samples[kind].append(elapsed)
        server_side = {name: p.server_side_allocate() for name, p in plugins.items()}
    finally:
        for p in plugins.values():
            p.close()
    return samples, server_side


def list_and_watch_bytes(devices: int, slices: int) -> dict[str, Any]:
    """Serialized size of the full ListAndWatch message (every slice with health and NUMA node)."""
    from vnpu.device_plugin.backends.simulated import parse_spec
    from vnpu.device_plugin.devices import DeviceTable
    from vnpu.device_plugin.service import list_and_watch_response

    table = DeviceTable(slice_mib=1024)
    table.update(parse_spec(f"{devices}x{slices * 1024}:2"))
    size = list_and_watch_response(table).ByteSize()
    return {
        "devices": devices,
        "slices": devices * slices,
        "bytes": size,
        "bytes_per_slice": size / (devices * slices),
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
        "| ListAndWatch message | slices | bytes | bytes/slice | of gRPC 4 MiB default |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in result["list_and_watch"]:
        rows.append(
            f"| {m['devices']} devices | {m['slices']} | {m['bytes']} | {m['bytes_per_slice']:.1f} "
            f"| {m['fraction_of_grpc_default_max']:.2%} |"
        )
    goal = result["goal"]
    rows += [
        "",
        f"Goal p99 Allocate < {goal['p99_allocate_ms']} ms: **{'met' if goal['met'] else 'NOT met'}** "
        f"(default mode p99 {result['allocate_async']['p99_ms']:.3f} ms). Allocate p50 sync / off = "
        f"{result['fsync_cost_ratio_p50']:.2f} (measured side by side); the no-work call's p50 "
        f"{result['floor']['p50_ms']:.3f} ms is the Python gRPC round trip every call pays. "
        f"Load average (1 min) before/after: {result['machine']['loadavg_1m_before_after']} on "
        f"{result['machine']['cpus']} CPUs.",
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
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"), help="(default: %(default)s)")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    samples, server_side = measure_calls(args.devices, args.slices, 1024, args.calls, seed=args.seed)
    result: dict[str, Any] = {
        "suite": "device-plugin",
        "layout": {"devices": args.devices, "slices_per_device": args.slices, "slice_mib": 1024},
        **{kind: summary_ms(values) for kind, values in samples.items()},
        "allocate_server_side": server_side,
        "list_and_watch": [
            list_and_watch_bytes(args.devices, args.slices),
            list_and_watch_bytes(8, 256),
            list_and_watch_bytes(32, 64),
        ],
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # This machine may be shared: the load average tells how much else ran during the measurement.
            "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "method": "plugins in their own processes; Python gRPC client in this process over the unix socket; "
        "calls of all kinds interleaved in shuffled order; Allocate asks for 1-8 contiguous slices of a "
        "random device; timings are client side (request built before the timer starts)",
    }
    result["fsync_cost_ratio_p50"] = result["allocate_sync"]["p50_ms"] / result["allocate_off"]["p50_ms"]
    result["goal"] = {
        "p99_allocate_ms": GOAL_P99_ALLOCATE_MS,
        "met": result["allocate_async"]["p99_ms"] < GOAL_P99_ALLOCATE_MS,
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
