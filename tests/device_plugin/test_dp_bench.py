"""`vnpu bench device-plugin` runs end to end on the real path and writes its JSON, table and plot (no
timing asserted)."""

from __future__ import annotations

import json

import pytest

from vnpu.bench import device_plugin

pytestmark = pytest.mark.integration  # it starts a real control plane


def test_bench_writes_json_table_and_png(tmp_path):
    assert (
        device_plugin.main(["--calls", "20", "--devices", "2", "--slices", "16", "--out-dir", str(tmp_path)])
        == 0
    )
    result = json.loads((tmp_path / "device-plugin.json").read_text())
    for kind in ("allocate_sync", "allocate_async", "allocate_off", "preferred", "floor"):
        assert result[kind]["n"] == 20
    assert {s["n"] for s in result["allocate_server_side"].values()} == {20 + 50}  # warm-up calls included
    assert [m["slices"] for m in result["list_and_watch"]] == [16, 256, 2048]
    real = result["real_path"]
    assert real["api_server"] and all(real["node_annotation_written"].values())
    assert result["run"]["command"].startswith("vnpu bench device-plugin --calls 20")
    assert result["run"]["commit"] and len(result["run"]["loadavg_1_5_15"]) == 3
    assert "ListAndWatch message" in (tmp_path / "device-plugin.md").read_text()
    assert (tmp_path / "device-plugin.png").stat().st_size > 0
