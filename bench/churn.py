"""``vnpu bench churn``: a churn trace through the packer, the way the operator drives it.

2,000 seeded events over a population of up to 300 models drawn from the packing suite's real
architectures: arrivals, scale changes and deletions. After each event the packer runs as the
operator runs it: with the previous placements as the running state (stable: running replicas stay).
Three policies run side by side: ``sticky`` never moves a running replica; ``draining`` runs, every
``--consolidate-every`` events, one batch of the operator's ``--defragment``
(:func:`vnpu.operator.packing.drain`: at most ``--drain-max-moves`` replicas, each into room free now,
make-before-break); ``consolidating`` runs, every ``--consolidate-every`` events, the bounded
consolidation
(:func:`vnpu.operator.packing.consolidate`): only while the plan needs more than 1.05x the devices
of a fresh repack, it moves at most ``--move-budget`` running replicas, off thin weight copies and
near-empty devices, and only where a move frees a device or at least ``--min-slices-per-move``
slices. After each step the devices used are compared with a fresh repack of the same demands (what
a from-scratch packing would need), and every running replica that changes device is a move (a
replica removed by a scale-down or a deletion is not, nor is a new one).

Goal (issue 11): at the end, devices <= 1.05 x the fresh repack, with at most 5% of the replicas
moved over the whole trace (moves / replicas running at the end). For scale: the default trace adds
or removes 6,772 replicas, so the goal allows about 0.01 moves per change, where worst-case guarantees
of 1 + eps need moves of Omega(1/eps) times each change's size (Berndt, Jansen and Klein, "Fully
Dynamic Bin Packing Revisited", Math. Prog. 2018, arXiv:1411.0960).

Where the extra devices go: at the end each plan's used slices are split into weight copies (one per
share group and device) and replicas, and the free slices left on its used devices; the summary gives,
against the fresh repack, the extra weight copies and the extra free slices, each in devices' worth.

How far moves could take it: for each plan at the end, ``floor_with_goal_moves_left`` is a lower bound
on the devices any set of the moves the goal still allows (5% of the replicas, less those made) could
reach from it, over the fresh repack's devices (see :func:`devices_floor`: the slices left once moves
empty the weight copies they can, and the devices left once moves empty the devices with the fewest
replicas). When it is above 1.05, no move policy applied at the end can meet the goal; only a better
plan in the first place can.

What moves do reach from there: ``end_pass_ratio`` is the plan after one more bounded consolidation at
the end, allowed every move the goal still allows (``end_pass_moves`` of them used), with no bound (it
acts while a move frees a device or saves ``--min-slices-per-move`` slices) and ``END_PASS_TRIES``
candidates per move. The floor says how far any moves could go; the end pass, how far ours go.

What moves buy, beyond the goal's budget: ``price_curves`` drains, per policy, the devices with the most
waste (free slices and weight copies other than their group's fullest), ten more at a time, and lets
the packer re-place their replicas with everything else kept (:func:`price_curve`);
``drain_moves_to_goal_ratio`` is the moves of the first point that meets the goal ratio.

What the operator's ``--defragment`` reaches from there: ``drain_batches_*`` are its batches (of
``--drain-max-moves``) from each plan's end state, run one after another until one frees nothing.

What the fresh repack itself costs: ``defragment_moves`` is the running replicas that
``pack(..., defragment=True)`` (a fresh repack; the operator's ``--defragment`` drains in safe batches
instead, :func:`vnpu.operator.packing.drain`) restarts to reach it from each
plan's end state, its devices renamed onto the running ones where interchangeable
(:mod:`vnpu.operator.packing.align`); ``defragment_moved_fraction`` is that over the replicas.

Writes ``churn.json`` (with command, commit and load), ``churn.md`` and ``churn.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from vnpu.api import slices_for_mib
from vnpu.bench.packing import CATALOGUE, DEVICES_PER_NODE, deployment
from vnpu.bench.report import provenance, results_dir, write_table
from vnpu.operator.config import OperatorConfig
from vnpu.operator.packing import (
    CONSOLIDATE_BOUND,
    MIN_SLICES_PER_MOVE,
    Demand,
    Device,
    Node,
    PackResult,
    Placement,
    consolidate,
    drain,
    pack,
    waste_by_device,
    weight_copies,
)

GOAL_RATIO = 1.05
GOAL_MOVED = 0.05
#: Candidates the end pass tries per move (the consolidation's default is 24: it runs every few events).
END_PASS_TRIES = 400
#: Devices the price curve drains per point.
PRICE_STEP = 10


def trace(seed: int, events: int, max_models: int) -> list[tuple[str, Demand | str, int]]:
    """(kind, demand or model, replicas) events: arrive, scale, delete."""
    rng = random.Random(seed)
    sizes = [
        deployment(name, ctx, batch)
        for name in sorted(CATALOGUE)
        for ctx in (4096, 8192, 16384)
        for batch in (1, 4)
    ]
    sizes = [s for s in sizes if slices_for_mib(s.weight_mib) + slices_for_mib(s.replica_mib) <= 64]
    alive: dict[str, Demand] = {}
    out: list[tuple[str, Demand | str, int]] = []
    serial = 0
    while len(out) < events:
        r = rng.random()
        if len(alive) < max_models and (r < 0.4 or len(alive) < 20):
            size = rng.choice(sizes)
            group = f"ns-{serial % 20}/{size.name.split()[0]}"
            d = Demand(
                f"ns-{serial % 20}/m{serial}", group, rng.randint(1, 8), size.replica_mib, size.weight_mib
            )
            serial += 1
            alive[d.model] = d
            out.append(("arrive", d, d.replicas))
        elif r < 0.8:
            model = rng.choice(sorted(alive))
            n = max(1, alive[model].replicas + rng.choice([-3, -2, -1, 1, 2, 3]))
            alive[model] = replace(alive[model], replicas=n)
            out.append(("scale", model, n))
        else:
            model = rng.choice(sorted(alive))
            del alive[model]
            out.append(("delete", model, 0))
    return out


def footprint(result: PackResult, device_slices: int) -> dict[str, int]:
    """A plan's used devices split into weight copies, replica slices and the slices left free on them."""
    weight_slices = sum(h.slices for h in result.weight_holders)
    replica_slices = sum(a.slices for a in result.assignments)
    return {
        "weight_copies": len(result.weight_holders),
        "weight_slices": weight_slices,
        "replica_slices": replica_slices,
        "free_slices": result.devices_used() * device_slices - weight_slices - replica_slices,
    }


def price_curve(
    nodes: list[Node], demands: list[Demand], plan: PackResult, fresh_devices: int
) -> list[dict[str, Any]]:
    """What moves buy from ``plan``: the devices with the most waste (free slices, plus weight copies
    that are not their group's fullest) are drained, ``PRICE_STEP`` more at a time, and their
    replicas re-placed by the packer with everything else kept; each point is (devices drained, moves,
    ratio to the fresh repack), up to the first that meets the goal ratio or every device drained."""
    waste = waste_by_device(plan, nodes)
    order = sorted(waste, key=lambda k: (-waste[k], k))
    running = plan.placements()
    points: list[dict[str, Any]] = []
    for k in [*range(PRICE_STEP, len(order), PRICE_STEP), len(order)]:
        drained = set(order[:k])
        result = pack(nodes, demands, [p for p in running if (p.node, p.device) not in drained])
        ratio = round(result.devices_used() / fresh_devices, 4)
        points.append({"drained": k, "moves": result.moved_from(running), "ratio": ratio})
        if ratio <= GOAL_RATIO:
            break
    return points


def drain_batches(
    nodes: list[Node], demands: list[Demand], plan: PackResult, max_moves: int
) -> list[tuple[int, int]]:
    """(moves, devices after it) of each batch the operator's ``--defragment`` runs from ``plan`` on a
    settled cluster, one after another, until a batch frees nothing."""
    out: list[tuple[int, int]] = []
    running = plan.placements()
    while True:
        result = drain(nodes, demands, pack(nodes, demands, running), max_moves=max_moves)
        moved = result.moved_from(running)
        if not moved:
            return out
        out.append((moved, result.devices_used()))
        running = result.placements()


def devices_floor(result: PackResult, moves: int, device_slices: int) -> int:
    """A lower bound on the devices ``result`` could use after at most ``moves`` more moves, whatever
    they are. A move relocates one replica and its slices go with it, so moves save slices only by
    emptying weight copies: emptying a copy of ``n`` replicas takes ``n`` moves and saves at most its
    weight slices, and each share group keeps one copy (its fullest, the dearest to empty). The most
    that can be saved is bounded by the fractional knapsack over those copies (best slices per move
    first), and the rest needs at least ``ceil(slices / device_slices)`` devices even packed perfectly.
    And a device is freed only when every replica on it moves: at most as many devices go as the
    fewest-replica devices whose replicas add up to ``moves``, and every other device stays in use.
    The floor is the larger of the two bounds.
    """
    emptiable = sorted(
        ((c.slices, c.replicas) for c in weight_copies(result) if not c.fullest),
        key=lambda c: c[0] / c[1],
        reverse=True,
    )
    saved, left = 0.0, moves
    for slices, n in emptiable:
        if left <= 0:
            break
        take = min(1.0, left / n)
        saved += take * slices
        left -= n
    by_slices = math.ceil((result.slices_used() - saved) / device_slices)
    on_device = Counter((a.node, a.device) for a in result.assignments)
    freed, left = 0, moves
    for n in sorted(on_device.values()):
        if n > left:
            break
        freed, left = freed + 1, left - n
    return max(by_slices, len(on_device) - freed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vnpu bench churn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--models", type=int, default=300, help="most models alive at once")
    parser.add_argument("--nodes", type=int, default=250, help="nodes of 8 x 64 GiB devices")
    parser.add_argument("--consolidate-every", type=int, default=10)
    parser.add_argument("--move-budget", type=int, default=2, help="moves one consolidation may make")
    parser.add_argument(
        "--drain-max-moves",
        type=int,
        default=OperatorConfig.defragment_max_moves,
        help="moves one drain batch may make (default %(default)s, the operator's --defragment-max-moves)",
    )
    parser.add_argument(
        "--min-slices-per-move",
        type=int,
        default=MIN_SLICES_PER_MOVE,
        help="slices a move that frees no device must save",
    )
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    argv = list(argv or [])

    device_slices = 64
    nodes = [
        Node(f"node-{i:04d}", tuple(Device(f"npu{j}", device_slices) for j in range(DEVICES_PER_NODE)))
        for i in range(args.nodes)
    ]
    demands: dict[str, Demand] = {}
    policies = ("sticky", "draining", "consolidating")
    current: dict[str, list[Placement]] = {name: [] for name in policies}
    plans: dict[str, PackResult] = {}
    moves = dict.fromkeys(policies, 0)
    steps: list[dict[str, Any]] = []
    started = time.perf_counter()
    for step, (kind, what, n) in enumerate(trace(args.seed, args.events, args.models), 1):
        if kind == "arrive":
            assert isinstance(what, Demand)
            demands[what.model] = what
        elif kind == "scale":
            demands[str(what)] = replace(demands[str(what)], replicas=n)
        else:
            del demands[str(what)]
        row: dict[str, Any] = {"step": step, "event": kind, "models": len(demands)}
        for name in policies:
            due = step % args.consolidate_every == 0
            if due and name == "consolidating":
                result = consolidate(
                    nodes,
                    list(demands.values()),
                    current[name],
                    max_moves=args.move_budget,
                    min_slices_per_move=args.min_slices_per_move,
                )
            elif due and name == "draining":  # the event's pass, then a batch once it has settled
                settled = pack(nodes, list(demands.values()), current[name]).placements()
                stable = pack(nodes, list(demands.values()), settled)
                result = drain(nodes, list(demands.values()), stable, max_moves=args.drain_max_moves)
            else:
                result = pack(nodes, list(demands.values()), current[name])
            moved = result.moved_from(current[name])
            moves[name] += moved
            current[name], plans[name] = result.placements(), result
            row.update({f"{name}_devices": result.devices_used(), f"{name}_moves": moved})
            row["replicas"], row["unplaced"] = len(result.assignments), len(result.unplaced)
        if step % 10 == 0 or step == args.events:
            plans["fresh"] = pack(nodes, list(demands.values()))
            row["fresh_devices"] = plans["fresh"].devices_used()
        steps.append(row)
    seconds = time.perf_counter() - started
    last = steps[-1]
    replicas_end = last["replicas"]
    fresh = footprint(plans["fresh"], device_slices)
    summaries = []
    curves: dict[str, list[dict[str, Any]]] = {}
    for name in policies:
        mine = footprint(plans[name], device_slices)
        summary = {
            "policy": name,
            "events": args.events,
            "models_at_end": last["models"],
            "replicas_at_end": replicas_end,
            "devices_at_end": last[f"{name}_devices"],
            "fresh_repack_devices_at_end": last["fresh_devices"],
            "ratio_at_end": round(last[f"{name}_devices"] / last["fresh_devices"], 4),
            "worst_ratio": round(
                max(r[f"{name}_devices"] / r["fresh_devices"] for r in steps if "fresh_devices" in r), 4
            ),
            "moves_total": moves[name],
            "moved_fraction": round(moves[name] / max(1, replicas_end), 4),
            "unplaced_at_end": last["unplaced"],
            "weight_copies": mine["weight_copies"],
            "fresh_weight_copies": fresh["weight_copies"],
            "extra_weights_in_devices": round(
                (mine["weight_slices"] - fresh["weight_slices"]) / device_slices, 1
            ),
            "extra_free_in_devices": round((mine["free_slices"] - fresh["free_slices"]) / device_slices, 1),
        }
        moves_left = max(0, math.floor(GOAL_MOVED * replicas_end) - moves[name])
        summary["floor_with_goal_moves_left"] = round(
            devices_floor(plans[name], moves_left, device_slices) / last["fresh_devices"], 4
        )
        end_pass = consolidate(
            nodes,
            list(demands.values()),
            plans[name].placements(),
            max_moves=moves_left,
            bound=1.0,
            min_slices_per_move=args.min_slices_per_move,
            tries=END_PASS_TRIES,
        )
        summary["end_pass_moves"] = end_pass.moved_from(plans[name].placements())
        summary["end_pass_ratio"] = round(end_pass.devices_used() / last["fresh_devices"], 4)
        batches = drain_batches(nodes, list(demands.values()), plans[name], args.drain_max_moves)
        summary["drain_batches"] = len(batches)
        summary["drain_batches_moves"] = sum(moved for moved, _ in batches)
        summary["drain_batches_ratio"] = round(
            (batches[-1][1] if batches else last[f"{name}_devices"]) / last["fresh_devices"], 4
        )
        defragmented = pack(nodes, list(demands.values()), plans[name].placements(), defragment=True)
        summary["defragment_moves"] = defragmented.moved_from(plans[name].placements())
        summary["defragment_moved_fraction"] = round(summary["defragment_moves"] / max(1, replicas_end), 4)
        summary["defragment_ratio"] = round(defragmented.devices_used() / last["fresh_devices"], 4)
        curve = price_curve(nodes, list(demands.values()), plans[name], last["fresh_devices"])
        met = [p for p in curve if p["ratio"] <= GOAL_RATIO]
        summary["drain_moves_to_goal_ratio"] = met[0]["moves"] if met else None
        curves[name] = curve
        summary["goal_ratio_met"] = summary["ratio_at_end"] <= GOAL_RATIO
        summary["goal_moves_met"] = summary["moved_fraction"] <= GOAL_MOVED
        summaries.append(summary)
    settings = {
        "consolidate_every": args.consolidate_every,
        "move_budget": args.move_budget,
        "drain_max_moves": args.drain_max_moves,
        "min_slices_per_move": args.min_slices_per_move,
        "bound": CONSOLIDATE_BOUND,
        "nodes": args.nodes,
        "seconds": round(seconds, 1),
    }
    out = args.out or results_dir()
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "provenance": provenance("churn", argv),
        "settings": settings,
        "goals": {"ratio": GOAL_RATIO, "moved_fraction": GOAL_MOVED},
        "summary": summaries,
        "price_curves": curves,
        "steps": steps,
    }
    (out / "churn.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_table(
        out / "churn.md", summaries, title="Churn trace through the packer: devices vs a fresh repack, moves"
    )
    _plot(steps, summaries, curves, out / "churn.png")
    return 0


def _plot(
    steps: list[dict[str, Any]],
    summaries: list[dict[str, Any]],
    curves: dict[str, list[dict[str, Any]]],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, price) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for s in summaries:
        name = s["policy"]
        label = f"{name}: end ratio {s['ratio_at_end']}, {s['moves_total']} moves ({s['moved_fraction']:.1%})"
        ax.plot([r["step"] for r in steps], [r[f"{name}_devices"] for r in steps], label=label)
    fresh = [r for r in steps if "fresh_devices" in r]
    ax.plot([r["step"] for r in fresh], [r["fresh_devices"] for r in fresh], label="fresh repack", alpha=0.8)
    ax.set_xlabel("event")
    ax.set_ylabel("devices used")
    ax.set_title(f"Churn: {summaries[0]['events']} arrivals, scale changes and deletions")
    ax.legend(fontsize=8)
    # What moves buy at the end: the drain curve, the end pass, the operator's drain batches and a fresh
    # repack, per policy.
    for s in summaries:
        name, n = s["policy"], max(1, s["replicas_at_end"])
        curve = [(0, s["ratio_at_end"])] + [(p["moves"] / n, p["ratio"]) for p in curves[s["policy"]]]
        (line,) = price.plot(*zip(*curve, strict=True), marker=".", label=f"{name}: drain the most wasteful")
        price.scatter([s["end_pass_moves"] / n], [s["end_pass_ratio"]], color=line.get_color(), marker="s")
        price.scatter(
            [s["drain_batches_moves"] / n], [s["drain_batches_ratio"]], color=line.get_color(), marker="D"
        )
        price.scatter(
            [s["defragment_moved_fraction"]],
            [s["defragment_ratio"]],
            color=line.get_color(),
            marker="*",
            s=80,
        )
    price.axhline(GOAL_RATIO, color="grey", linestyle=":", label=f"goal: ratio {GOAL_RATIO}")
    price.axvline(GOAL_MOVED, color="grey", linestyle="--", label=f"goal: {GOAL_MOVED:.0%} moved")
    price.set_xlabel(
        "replicas moved at the end (fraction)\n"
        "square: end pass, diamond: --defragment batches, star: fresh repack"
    )
    price.set_ylabel("devices / fresh repack")
    price.set_title("What moves buy at the end of the trace")
    price.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
