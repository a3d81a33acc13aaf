"""`vnpu bench wake --sections trace` runs end to end on a short trace and writes its outputs (no
figure is asserted: the benchmark reports, tests check it runs and its bookkeeping adds up)."""

from __future__ import annotations

import json

from vnpu.bench import wake


def test_trace_section_writes_json_table_and_png(tmp_path) -> None:
    argv = [
        "--sections",
        "trace",
        "--models",
        "20",
        "--days",
        "2",
        "--warmup-days",
        "1",
        "--budgets",
        "0.2",
        "--out",
        str(tmp_path),
    ]
    assert wake.main(argv) == 0
    result = json.loads((tmp_path / "wake.json").read_text())
    rows = result["trace"]["results"]
    assert {r["policy"] for r in rows} == {"lru", "forecast", "keep-all", "keep-none"}
    keep_all = next(r for r in rows if r["policy"] == "keep-all")
    keep_none = next(r for r in rows if r["policy"] == "keep-none")
    assert keep_all["cold_starts"] == 0 and keep_none["warm_wakes"] == 0
    for r in rows:  # every wake after the warm-up is either warm or cold, whatever the policy
        assert r["cold_starts"] + r["warm_wakes"] == keep_none["cold_starts"]
    assert result["run"]["command"].startswith("vnpu bench wake")
    assert (tmp_path / "wake.png").stat().st_size > 0 and "forecast" in (tmp_path / "wake.md").read_text()
