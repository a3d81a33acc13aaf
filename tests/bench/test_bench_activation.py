"""`vnpu bench activation` runs end to end on a small shape and writes its outputs (no figure is
asserted here: tests/runtime/test_activation_peak.py checks the reserve covers the step)."""

from __future__ import annotations

import json
import logging

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
