"""Benchmarks: each suite measures ratios side by side in one run and writes JSON, a table and a PNG
to bench/results/. Run them with ``vnpu bench <suite>``."""
