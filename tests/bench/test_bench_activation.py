"""`vnpu bench activation` runs end to end on a small shape and writes its outputs (no figure is
asserted here: tests/runtime/test_activation_peak.py checks the reserve covers the step)."""

from __future__ import annotations

import json
import logging

import pytest

from vnpu.bench import activation


def test_a_small_run_writes_json_table_and_png(tmp_path) -> None:
    level = logging.getLogger("vnpu").level
    assert activation.main(["--shapes", "2x256", "--no-wide", "--out-dir", str(tmp_path)]) == 0
    # In-process, it leaves the logging as it found it (later tests read warnings from the log).
    assert logging.getLogger("vnpu").level == level
    result = json.loads((tmp_path / "activation.json").read_text())
    (row,) = result["rows"]
    assert (row["model"], row["batch"], row["context"]) == ("smollm2-135m", 2, 256)
    assert row["peak_decode_mib"] > 0 and row["peak_prefill_end_mib"] > 0
    assert row["reserve_mib"] > row["reserve_without_gather_mib"]
    assert result["provenance"]["command"].startswith("vnpu bench activation --shapes 2x256")
    assert (tmp_path / "activation.png").stat().st_size > 0
    assert "smollm2" in (tmp_path / "activation.md").read_text()


@pytest.mark.parametrize(("batch", "context"), [(1, 100), (8, 4096), (255, 512), (256, 512), (300, 64)])
def test_the_worst_steps_are_steps_the_scheduler_could_run(batch: int, context: int) -> None:
    """Each sequence ends at ``context`` within its own blocks, and a step's tokens fit one chunk
    (the prefill's share is what the decodes leave; none when they fill it)."""
    steps = activation.worst_steps(batch, context, block_size=16)
    assert set(steps) <= set(activation.STEPS)
    assert ("prefill end" in steps) == (batch < activation.PREFILL_CHUNK + 1)
    for sequences in steps.values():
        assert len(sequences) == batch
        assert sum(len(s.tokens) for s in sequences) <= max(activation.PREFILL_CHUNK, batch)
        for s in sequences:
            assert s.start >= 0 and s.start + len(s.tokens) == context
            assert len(s.blocks) * 16 >= context
        tables = [b for s in sequences for b in s.blocks]
        assert len(tables) == len(set(tables))
