"""``vnpu bench wake``: what keeping weights warm buys.

Section ``trace`` (no cluster): a week of requests to 200 models with Zipf popularity, a diurnal rate
in three time zones and random bursts, replayed minute by minute through four keep-warm policies at
several memory budgets. A model serves while requests come and is scaled to zero ``--idle`` minutes
after its last one; a request to a model at zero is a **warm** wake when its weights are held and a
**cold start** when they must be loaded. Reported per policy and budget: cold starts and the average
device memory held by weights (serving and warm), over the days after a warm-up.

* keep-all: every model's weights always held (no cold start; the most memory);
* keep-none: weights released at zero (every wake is cold; the least memory);
* LRU: the most recently used idle models' weights, within the budget;
* forecast: :mod:`vnpu.operator.forecast` (recent rate and time-of-day buckets) within the budget.

Section ``real`` (on a real node): see ``wake_on_node``; it measures warm and cold wake latency with
the chart installed and the gateway in front.

Writes ``wake.json`` (with command, commit and load), ``wake.md`` and ``wake.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vnpu.bench.report import provenance, results_dir
from vnpu.operator.forecast import DemandState, WarmCandidate, choose_warm, observe, request_probability

DAY = 24 * 60


@dataclass(frozen=True)
class TraceModel:
    name: str
    weights_mib: int
    weight: float  #: Zipf share of the traffic
    tz_hours: int  #: its users' time zone


def make_models(n: int, rng: random.Random, zipf_s: float = 1.1) -> list[TraceModel]:
    raw = [1.0 / (i + 1) ** zipf_s for i in range(n)]
    total = sum(raw)
    order = list(range(n))
    rng.shuffle(order)  # popularity independent of size and zone
    models = []
    for i in range(n):
        size = int(math.exp(rng.uniform(math.log(250), math.log(8192))))
        models.append(TraceModel(f"m{i:03d}", size, raw[order[i]] / total, rng.choice((0, 8, 16))))
    return models


def daytime(minute: int, tz_hours: int) -> float:
    """0..1: how much of a working day's traffic there is at this minute in the model's zone."""
    local = ((minute / 60) + tz_hours) % 24
    return max(0.0, math.sin(math.pi * (local - 7) / 12)) ** 2 if 7 <= local <= 19 else 0.0


def make_trace(
    models: Sequence[TraceModel], minutes: int, peak_per_min: float, rng: random.Random
) -> list[list[int]]:
    """Requests per minute per model (Poisson, a diurnal rate, bursts of x10 lasting 5-20 minutes)."""
    burst_until = [0] * len(models)
    trace = []
    for t in range(minutes):
        row = []
        for i, m in enumerate(models):
            if burst_until[i] <= t and rng.random() < 0.0005:
                burst_until[i] = t + rng.randint(5, 20)
            rate = peak_per_min * m.weight * (0.05 + 0.95 * daytime(t, m.tz_hours))
            if burst_until[i] > t:
                rate = rate * 10 + 0.5
            row.append(_poisson(rate, rng))
        trace.append(row)
    return trace


def _poisson(lam: float, rng: random.Random) -> int:
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    k, p, limit = 0, 1.0, math.exp(-lam)
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


Policy = Callable[[int, list[int], dict[int, int], list[DemandState]], set[int]]


def simulate(
    models: Sequence[TraceModel],
    trace: Sequence[Sequence[int]],
    policy: str,
    budget_mib: int,
    *,
    idle_min: int,
    warmup_min: int,
    horizon_min: int = 15,
    replan_min: int = 5,
) -> dict[str, Any]:
    n = len(models)
    serving_until = [-1] * n
    last_used = [-(10**9)] * n
    warm: set[int] = set()
    states = [DemandState() for _ in range(n)]
    totals = [0] * n
    cold = warm_wakes = 0
    memory_sum = 0.0
    measured = 0
    for t, row in enumerate(trace):
        for i, count in enumerate(row):
            if not count:
                continue
            totals[i] += count
            if serving_until[i] < t and t >= warmup_min:
                if i in warm or policy == "keep-all":
                    warm_wakes += 1
                else:
                    cold += 1
            serving_until[i] = t + idle_min
            last_used[i] = t
        if t % replan_min == 0:
            for i in range(n):
                states[i] = observe(states[i], float(t + 1), totals[i])
            idle = [i for i in range(n) if serving_until[i] < t]
            if policy == "lru":
                warm = set()
                spent = 0
                for i in sorted(idle, key=lambda i: -last_used[i]):
                    if last_used[i] < 0:
                        continue
                    if spent + models[i].weights_mib <= budget_mib:
                        warm.add(i)
                        spent += models[i].weights_mib
            elif policy == "forecast":
                candidates = [
                    WarmCandidate(
                        str(i), models[i].weights_mib, request_probability(states[i], t, horizon_min)
                    )
                    for i in idle
                ]
                warm = {int(k) for k in choose_warm(candidates, budget_mib)}
            else:
                warm = set()
        if t >= warmup_min:
            serving = {i for i in range(n) if serving_until[i] >= t}
            held = set(range(n)) if policy == "keep-all" else serving | warm
            memory_sum += sum(models[i].weights_mib for i in held)
            measured += 1
    return {
        "policy": policy,
        "budget_mib": budget_mib,
        "cold_starts": cold,
        "warm_wakes": warm_wakes,
        "avg_memory_mib": round(memory_sum / max(measured, 1), 1),
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy, marker in (("lru", "o"), ("forecast", "s"), ("keep-all", "^"), ("keep-none", "v")):
        rows = [r for r in results if r["policy"] == policy]
        ax.plot(
            [r["avg_memory_mib"] / 1024 for r in rows],
            [r["cold_starts"] for r in rows],
            marker=marker,
            label=policy,
            linestyle="-" if len(rows) > 1 else "none",
        )
    ax.set_xlabel("average device memory held by weights (GiB)")
    ax.set_ylabel("cold starts over the measured days")
    ax.set_title("keep-warm policies on a replayed week (200 models, Zipf, diurnal, bursts)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_trace(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    models = make_models(args.models, rng)
    minutes = args.days * DAY
    trace = make_trace(models, minutes, args.peak_per_min, rng)
    total_mib = sum(m.weights_mib for m in models)
    results = []
    for fraction in args.budgets:
        budget = int(total_mib * fraction)
        for policy in ("lru", "forecast"):
            r = simulate(models, trace, policy, budget, idle_min=args.idle, warmup_min=args.warmup_days * DAY)
            results.append({**r, "budget_fraction": fraction})
    for policy in ("keep-all", "keep-none"):
        r = simulate(models, trace, policy, 0, idle_min=args.idle, warmup_min=args.warmup_days * DAY)
        results.append({**r, "budget_fraction": 1.0 if policy == "keep-all" else 0.0})
    requests = sum(sum(row) for row in trace[args.warmup_days * DAY :])
    verdicts = []
    for fraction in args.budgets:
        lru = next(r for r in results if r["policy"] == "lru" and r["budget_fraction"] == fraction)
        fc = next(r for r in results if r["policy"] == "forecast" and r["budget_fraction"] == fraction)
        verdicts.append(
            {
                "budget_fraction": fraction,
                "forecast_fewer_cold_starts_than_lru": fc["cold_starts"] < lru["cold_starts"],
                "cold_starts_forecast_over_lru": round(fc["cold_starts"] / max(lru["cold_starts"], 1), 3),
                "memory_forecast_over_lru": round(fc["avg_memory_mib"] / max(lru["avg_memory_mib"], 1), 3),
            }
        )
    return {
        "models": args.models,
        "days": args.days,
        "warmup_days": args.warmup_days,
        "idle_minutes": args.idle,
        "requests_measured": requests,
        "total_weights_mib": total_mib,
        "results": results,
        "verdicts": verdicts,
    }


def table(trace: dict[str, Any]) -> str:
    rows = [
        "| policy | budget (of all weights) | cold starts | warm wakes | avg weights held (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in trace["results"]:
        rows.append(
            f"| {r['policy']} | {r['budget_fraction']:.0%} | {r['cold_starts']} | {r['warm_wakes']} "
            f"| {r['avg_memory_mib'] / 1024:.1f} |"
        )
    rows.append("")
    for v in trace["verdicts"]:
        met = "met" if v["forecast_fewer_cold_starts_than_lru"] else "NOT met"
        rows.append(
            f"Budget {v['budget_fraction']:.0%}: forecast / LRU cold starts = "
            f"{v['cold_starts_forecast_over_lru']} at memory ratio {v['memory_forecast_over_lru']} — goal "
            f"(fewer cold starts than LRU): **{met}**"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vnpu bench wake", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sections",
        default="trace,real",
        help="comma-separated: trace, real (real needs root: it starts a kubelet on containerd) "
        "(default %(default)s)",
    )
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--warmup-days", type=int, default=2)
    parser.add_argument(
        "--idle", type=int, default=10, help="minutes without a request before a model goes to 0"
    )
    parser.add_argument(
        "--peak-per-min", type=float, default=60.0, help="all models' requests per minute at peak"
    )
    parser.add_argument(
        "--budgets",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.05, 0.1, 0.2, 0.4],
        help="warm budgets as fractions of all weights (default 0.05,0.1,0.2,0.4)",
    )
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--rounds", type=int, default=3, help="warm and cold wakes each (section real; default %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench/results)")
    args = parser.parse_args(argv)
    out = args.out or results_dir()
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "suite": "wake",
        "run": provenance("wake", sys.argv[1:] if argv is None else argv),
    }
    sections = set(args.sections.split(","))
    text = ""
    if "trace" in sections:
        result["trace"] = run_trace(args)
        text += "## Keep-warm policies on a replayed trace\n\n" + table(result["trace"])
        plot(result["trace"]["results"], out / "wake.png")
    if "real" in sections:
        from vnpu.bench.wake_node import measure_wake

        result["real"] = measure_wake(out, rounds=args.rounds)
        text += "\n" + result["real"]["table"]
    (out / "wake.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "wake.md").write_text(text)
    print(text)
    print(f"wrote {out}/wake.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
