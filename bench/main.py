"""``vnpu bench <suite>``: dispatch to one benchmark suite (each has its own ``--help``)."""

from __future__ import annotations

import importlib
import sys

SUITES: dict[str, tuple[str, str]] = {
    "packing": (
        "vnpu.bench.packing",
        "packing quality vs baselines and the MILP optimum; packing time at scale",
    ),
    "device-plugin": (
        "vnpu.bench.device_plugin",
        "Allocate/GetPreferredAllocation latency, ListAndWatch size",
    ),
    "runtime": ("vnpu.bench.runtime", "shared-weight memory, attach vs load time, async-offload overlap"),
    "activation": ("vnpu.bench.activation", "one forward step's transient memory vs the activation reserve"),
    "serving": (
        "vnpu.bench.serving",
        "continuous batching vs transformers generate: tokens/s, TTFT, inter-token latency, priority",
    ),
    "operator": ("vnpu.bench.operator_e2e", "create-to-pods latency for many InferenceModels on kwok nodes"),
    "churn": (
        "vnpu.bench.churn",
        "arrivals, scale changes and deletions through the packer vs a fresh repack",
    ),
    "wake": ("vnpu.bench.wake", "keep-warm policies on a replayed trace; warm vs cold wake on a real node"),
    "synthetic-model": (
        "vnpu.bench.synthetic",
        "write a llama GGUF of any shape with random weights and a real model's tokenizer",
    ),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, SUITES))
        print("usage: vnpu bench <suite> [options]\n\nsuites:")
        for name, (_, text) in SUITES.items():
            print(f"  {name:<{width}}  {text}")
        return 0
    if argv[0] not in SUITES:
        print(f"vnpu bench: unknown suite {argv[0]!r}; one of {', '.join(SUITES)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(SUITES[argv[0]][0]).main(argv[1:]))
