"""Small helpers every benchmark suite shares: where results go, percentiles, a Markdown table."""

from __future__ import annotations

import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def results_dir() -> Path:
    """``$VNPU_BENCH_OUT`` or bench/results/ of this checkout (created)."""
    out = Path(os.environ.get("VNPU_BENCH_OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def git_commit() -> str:
    """The commit measured, with ``-dirty`` when the tree had changes. Where the code runs outside its
    git tree (an installed wheel on a machine of its own), ``VNPU_BENCH_COMMIT`` names it."""
    if named := os.environ.get("VNPU_BENCH_COMMIT"):
        return named
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    # Results another benchmark is rewriting meanwhile are not a change of the code measured.
    if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"):
        commit += "-dirty"
    return commit


def provenance(suite: str, argv: Sequence[str]) -> dict[str, Any]:
    """What every result JSON records about its run: the command that reproduces it, the commit (with
    ``-dirty`` when the tree had changes), when, and how loaded this (possibly shared) machine was."""
    commit = git_commit()
    return {
        "command": shlex.join(["vnpu", "bench", suite, *argv]),
        "commit": commit,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "argv0": sys.argv[0],
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def markdown_table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    columns = list(rows[0]) if rows else []
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(path: Path, rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """Write the table as Markdown, print it, and return it."""
    text = markdown_table(rows, title)
    path.write_text(text)
    print(text)
    return text
