"""The activation reserve covers what one forward step really allocates, at full batch and context.

A replica's KV pool gets what its memory limit leaves after the fixed terms (:mod:`vnpu.runtime.budget`),
so a step that allocates more than the activation reserve runs out of device memory exactly when the
replica is busiest: every sequence decoding at the end of a long context. Here the runtime's own
``forward_batch`` runs its worst steps on CPU under torch's profiler (:mod:`vnpu.bench.activation`), and
the peak of what a step allocates must stay within the reserve the budget charges. The largest term is
the paged attention's context gather: each decode sequence's keys and values, padded to the longest,
copied out of the pool into one tensor per layer.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from rt_helpers import load_tiny_llama

from vnpu.bench.activation import reserve_and_peaks, step_peak_bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", layers=2)


@pytest.mark.parametrize(("batch", "context"), [(1, 4096), (8, 1024), (8, 4096), (16, 4096)])
def test_the_worst_steps_of_a_small_model_stay_within_the_activation_reserve(
    tiny: Any, batch: int, context: int
) -> None:
    reserve, peaks = reserve_and_peaks(tiny, batch, context)
    for name, peak in peaks.items():
        assert peak <= reserve["reserve"], f"{name}: a step at {batch} x {context} held {peak} B > {reserve}"
    # Honest, not padded: the reserve is within a few times the worst step it covers.
    assert reserve["reserve"] <= 4 * max(peaks.values())


def test_the_worst_steps_of_smollm2_stay_within_the_activation_reserve(smollm2_weights: Any) -> None:
    """The real architecture (GQA 9/3 heads, 30 layers, float32 on CPU) at batch 8 x 2,048."""
    reserve, peaks = reserve_and_peaks(smollm2_weights, 8, 2048)
    # The gather dominates: 8 x 2,048 tokens x 3 heads x 64 x (K and V) x 4 B = 24 MiB, and without it
    # the reserve would not cover the step.
    assert reserve["reserve_without_gather"] < max(peaks.values())
    for name, peak in peaks.items():
        assert peak <= reserve["reserve"], f"{name}: held {peak} B > the reserve {reserve}"


def test_the_meter_counts_what_is_held_at_once() -> None:
    """Two live 4 MiB tensors peak at 8 MiB; one freed and another made does not add to it."""

    def run() -> None:
        a = torch.empty(1 << 20)
        b = torch.empty(1 << 20)
        del a, b
        c = torch.empty(1 << 20)
        del c

    assert step_peak_bytes(run) == 8 << 20
