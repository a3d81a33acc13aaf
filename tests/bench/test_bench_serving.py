"""bench/serving.py's ``step`` section: it times the engine's own decode step and its matrix products
on the real SmolLM2 weights (correctness of what it reports, never its speed)."""

from __future__ import annotations

import argparse

import torch

from vnpu.bench.serving import bench_step
from vnpu.bench.weights import smollm2_dir


def test_the_step_section_times_the_decode_step_and_its_matrix_products():
    args = argparse.Namespace(device="cpu", dtype="float32", threads=1, concurrency="1,8")
    out = bench_step(smollm2_dir(), args, repeats=1)
    assert [r["batch"] for r in out["rows"]] == [1, 8]
    assert 500 <= out["weights_mib"] <= 530  # SmolLM2-135M's matrices in float32 (the head is tied)
    for row in out["rows"]:
        assert row["step_ms"] > 0 and row["gemm_ms"] > 0 and row["gemm_weights_gb_per_s"] > 0
        assert row["kernel"] in ("mkl", "onednn")
        if torch.backends.mkldnn.is_available():  # both kernels the runtime chooses between, timed
            assert row["gemm_ms_mkl"] > 0 and row["gemm_ms_onednn"] > 0
        assert abs(row["tokens_per_s"] - row["batch"] / (row["step_ms"] / 1000)) <= 0.05 * row["tokens_per_s"]
    rates = {r["batch"]: r["tokens_per_s"] for r in out["rows"]}
    assert out["scaling_bound_at_8"] == round(rates[8] / rates[1], 2)
