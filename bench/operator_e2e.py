"""End-to-end operator latency: many InferenceModels applied at once to the real apiserver with kwok nodes.

For each model: time from its create call returning to the moment every pod it needs (replicas and
the weight-holders of its group) exists, seen through a watch. Reports p50/p99 and the total time
to converge, and the API load of the operator per reconcile pass (from its own
``vnpu_operator_api_requests_total``): reads come from watch-fed caches, so a pass costs its writes,
which grow with the changes, not with the cluster. A steady-state phase (one model scaled in a
converged cluster) shows it; it starts once the statuses that trail the pods are written
(``statuses_settled_seconds``: the reporter writes them behind the pods). Writes JSON (with command,
commit and load), a table and a PNG histogram to ``--out`` (created if missing). The operator's peak
resident memory (``VmHWM``) is recorded beside the chart's 512 Mi limit.

Goals (issue 11): converge <= 60 s, create-to-pods p99 <= 10 s.

    vnpu bench operator --models 500 --nodes 200
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vnpu import api
from vnpu.bench.probes import cpu_seconds, peak_rss_kib, rss_kib
from vnpu.bench.report import percentile, provenance, results_dir, write_table

GIB = 1024


def _model(i: int, namespace: str) -> dict[str, Any]:
    """A seeded mix: 8 share groups of 1-8 GiB weights, 1-3 replicas of 1-2 GiB each."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": f"m{i:04d}", "namespace": namespace},
        "spec": {
            "modelName": f"model-{i}",
            "source": {"uri": f"pvc://models/group-{i % 8}.safetensors"},
            "shareGroup": f"group-{i % 8}",
            "weights": {"sizeMiB": (1 + i % 8) * GIB},
            "replicas": 1 + i % 3,
            "memory": {"kvCacheMiB": 768 + 256 * (i % 2), "activationMiB": 256},
        },
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vnpu bench operator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--devices-per-node", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--rate", type=float, default=0.0,
        help="models created per second (default 0: as fast as the API server takes them). A fixed "
        "rate gives two commits the same arrivals: unpaced, an API server that takes creates faster "
        "queues more models at the operator and shows as a longer create-to-pods latency",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    argv = list(argv)

    import urllib3
    from kubernetes import client, watch

    from vnpu.cluster.binaries import ensure_binaries
    from vnpu.cluster.controlplane import ControlPlane
    from vnpu.cluster.kwok import create_npu_nodes
    from vnpu.cluster.processes import ManagedProcess, wait_until

    crds = Path(__file__).resolve().parents[1] / "crds"
    namespace = "bench"
    with ControlPlane(ensure_binaries()) as cp:
        cp.start_controller_manager()
        cp.start_kwok()
        cp.kubectl("apply", "--server-side", "-f", str(crds))
        cp.kubectl("create", "namespace", namespace)
        api_client = cp.api_client()
        core = client.CoreV1Api(api_client)
        create_npu_nodes(api_client, args.nodes, devices=args.devices_per_node, device_mib=64 * GIB)
        wait_until(
            lambda: sum(1 for n in core.list_node().items if not n.spec.taints) == args.nodes,
            300,
            "nodes Ready",
        )
        from vnpu.cluster.controlplane import free_port

        metrics_port = free_port()
        operator = ManagedProcess(
            "operator",
            [sys.executable, "-m", "vnpu", "operator", "--kubeconfig", str(cp.kubeconfig),
             "-n", namespace, "--log-format", "text", "--no-placeholders",
             "--metrics-port", str(metrics_port)],
            cp.workdir / "logs" / "operator.log",
        )  # fmt: skip
        try:
            first_seen: dict[str, float] = {}
            expected: dict[str, set[str]] = {}
            stop = threading.Event()

            custom = client.CustomObjectsApi(api_client)
            statuses: dict[str, Any] = {}

            def follow(list_fn: Any, *args: Any, seen: Any) -> None:
                """LIST, then WATCH from there; again whenever the server ends the watch (a busy API
                server closes a consumer that falls behind), until the bench is done. A watch, not a
                LIST of every model each second: the bench must not load the API server it measures."""
                while not stop.is_set():
                    try:
                        listed = list_fn(*args, _preload_content=False)
                        body = json.loads(listed.data)
                        for obj in body["items"]:
                            seen(obj)
                        w = watch.Watch()
                        version = body["metadata"]["resourceVersion"]
                        for ev in w.stream(list_fn, *args, resource_version=version, timeout_seconds=60):
                            if ev["type"] != "ERROR":
                                seen(ev["raw_object"])
                            if stop.is_set():
                                w.stop()
                    except (urllib3.exceptions.HTTPError, client.ApiException):
                        time.sleep(0.2)  # the API server going away at the end, or 410 Gone: list again

            def pod_seen(obj: dict[str, Any]) -> None:
                first_seen.setdefault(obj["metadata"]["name"], time.perf_counter())

            def model_seen(obj: dict[str, Any]) -> None:
                statuses[obj["metadata"]["name"]] = obj.get("status") or {}

            watchers = (
                (core.list_namespaced_pod, (namespace,), pod_seen),
                (
                    custom.list_namespaced_custom_object,
                    (api.GROUP, api.VERSION, namespace, api.PLURAL),
                    model_seen,
                ),
            )
            for list_fn, list_args, seen in watchers:
                threading.Thread(
                    target=follow, args=(list_fn, *list_args), kwargs={"seen": seen}, daemon=True
                ).start()
            time.sleep(3)  # operator start-up and initial listing are not what we measure
            created_at: dict[str, float] = {}
            pids = {"operator": operator.pid} | {name: p.pid for name, p in cp.processes.items()}
            cpu_at_start = {name: cpu_seconds(pid) for name, pid in pids.items()}
            t0 = time.perf_counter()
            for i in range(args.models):
                if args.rate > 0:
                    time.sleep(max(0.0, t0 + i / args.rate - time.perf_counter()))
                body = _model(i, namespace)
                custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body)
                created_at[body["metadata"]["name"]] = time.perf_counter()
            t_applied = time.perf_counter() - t0

            def converged() -> bool:
                if len(statuses) < args.models:
                    return False
                for name, status in dict(statuses).items():
                    pods = {p["pod"] for p in status.get("placements", [])}
                    pods |= {p["weightHolder"] for p in status.get("placements", []) if p.get("weightHolder")}
                    if (
                        len(status.get("placements", []))
                        < _model(int(name[1:]), namespace)["spec"]["replicas"]
                    ):
                        return False
                    expected[name] = pods
                return all(pod in first_seen for pods in expected.values() for pod in pods)

            wait_until(converged, args.timeout, "all models placed and their pods created", interval=1.0)
            t_total = time.perf_counter() - t0
            cpu_converge = {n: round(cpu_seconds(pid) - cpu_at_start[n], 2) for n, pid in pids.items()}
            # The statuses trail the pods (Ready as kwok starts them): the converge phase ends when
            # the operator has written nothing for 3 s (at most 120 s), then the steady state starts.
            burst = _api_load(metrics_port)
            quiet_since, settle_deadline = time.monotonic(), time.monotonic() + 120
            while time.monotonic() - quiet_since < 3 and time.monotonic() < settle_deadline:
                time.sleep(0.5)
                now_load = _api_load(metrics_port)
                if now_load["writes"] != burst["writes"]:
                    burst, quiet_since = now_load, time.monotonic()
            t_settled = time.perf_counter() - t0 - (time.monotonic() - quiet_since)
            # Steady state: scale one model by one replica; the passes that follow cost their writes.
            custom.patch_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, "m0000", {"spec": {"replicas": 2}}
            )
            time.sleep(10)
            steady = _api_load(metrics_port, since=burst)
            peak_rss_mib, rss_mib = peak_rss_kib(operator.pid) / 1024, rss_kib(operator.pid) / 1024
            stop.set()
        finally:
            operator.stop()

    by_arrival = [max(first_seen[p] for p in expected[name]) - created_at[name] for name in sorted(expected)]
    latencies = sorted(by_arrival)
    pods_total = len({p for pods in expected.values() for p in pods})
    result = {
        "models": args.models,
        "nodes": args.nodes,
        "devices": args.nodes * args.devices_per_node,
        "pods": pods_total,
        "arrival_rate_per_s": args.rate or None,
        "apply_seconds": round(t_applied, 2),
        "converge_seconds": round(t_total, 2),
        "statuses_settled_seconds": round(t_settled, 2),
        "latency_p50_s": round(percentile(latencies, 50), 2),
        "latency_p99_s": round(percentile(latencies, 99), 2),
        "latency_max_s": round(latencies[-1], 2),
        "passes": burst["passes"],
        "api_writes_per_pass": round(burst["writes"] / max(1, burst["passes"]), 1),
        "api_reads_per_pass": round(burst["reads"] / max(1, burst["passes"]), 2),
        "steady_passes": steady["passes"],
        "steady_api_requests": steady["writes"] + steady["reads"],
        "operator_cpu_s_converge": cpu_converge["operator"],
        "apiserver_cpu_s_converge": cpu_converge.get("kube-apiserver"),
        "operator_peak_rss_mib": round(peak_rss_mib, 1),
        "operator_rss_mib_at_end": round(rss_mib, 1),
        "goal_converge_met": t_total <= 60,
        "goal_p99_met": percentile(latencies, 99) <= 10,
    }
    out = args.out or results_dir()
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "provenance": provenance("operator", argv),
        "result": result,
        "cpu_seconds_converge": cpu_converge,  # each process of the run, from the first create to converged
        "api_requests_converge": burst["by_kind"],
        "api_requests_steady": steady["by_kind"],
        "latencies_s": latencies,
        "latencies_by_arrival_s": [round(x, 3) for x in by_arrival],
    }
    (out / "operator_e2e.json").write_text(json.dumps(payload, indent=2))
    write_table(out / "operator_e2e.md", [result], title="Operator end to end (real apiserver, kwok nodes)")
    _plot(latencies, out / "operator_e2e.png", result)
    return 0


def _api_load(port: int, since: dict[str, Any] | None = None) -> dict[str, Any]:
    """The operator's API requests (by verb/resource) and passes, from its metrics, minus ``since``."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    by_kind: dict[str, float] = {}
    passes = 0.0
    for line in text.splitlines():
        if line.startswith("vnpu_operator_api_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            by_kind[labels[len("vnpu_operator_api_requests_total") :]] = float(value)
        elif line.startswith("vnpu_operator_reconcile_duration_seconds_count"):
            passes = float(line.rsplit(" ", 1)[1])
    if since:
        by_kind = {k: v - since["by_kind"].get(k, 0) for k, v in by_kind.items()}
        passes -= since["passes"]
    reads = sum(v for k, v in by_kind.items() if 'verb="list"' in k or 'verb="watch"' in k)
    writes = sum(by_kind.values()) - reads
    return {"by_kind": by_kind, "passes": passes, "reads": reads, "writes": writes}


def _plot(latencies: list[float], path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(latencies, bins=40, color="#4c72b0")
    for q, style in (("latency_p50_s", "--"), ("latency_p99_s", ":")):
        ax.axvline(result[q], color="black", linestyle=style, label=f"{q[8:11]} {result[q]} s")
    ax.set_xlabel("seconds from create to all of the model's pods created")
    ax.set_ylabel("models")
    ax.set_title(
        f"{result['models']} InferenceModels on {result['nodes']} kwok nodes ({result['pods']} pods)"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
