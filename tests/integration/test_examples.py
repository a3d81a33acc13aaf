"""Every manifest in examples/ is accepted by the real apiserver (server-side dry run: CRD schema,
CEL rules, HPA validation)."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_valid(control_plane, namespace, path: Path) -> None:
    proc = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))
    assert "created (server dry run)" in proc.stdout


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 3
