"""The repository layout must never shadow the standard library's ``operator`` (DESIGN.md "Names")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_in_repo_root(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    return proc.stdout.strip()


def test_stdlib_operator_wins_from_repo_root() -> None:
    out = _run_in_repo_root("-c", "import collections, operator; print(operator.add)")
    assert out == "<built-in function add>"


def test_stdlib_operator_wins_even_without_site() -> None:
    # -S skips site, so nothing pre-imports `operator`: the repo root really is searched first.
    out = _run_in_repo_root("-S", "-c", "import operator; print(operator.__file__)")
    assert "/operator/" not in out and out.endswith("operator.py")


def test_no_package_init_in_operator_folder() -> None:
    assert not (REPO_ROOT / "operator" / "__init__.py").exists()
    assert not (REPO_ROOT / "vnpu" / "__init__.py").exists()


def test_components_import_as_vnpu_subpackages_from_repo_root() -> None:
    out = _run_in_repo_root(
        "-c",
        "import vnpu.api, vnpu.operator, vnpu.device_plugin, vnpu.runtime, operator; "
        "print(list(vnpu.operator.__path__)[0].endswith('/operator'), operator.add.__module__)",
    )
    assert out == "True _operator"


#: Every module of the operator and the device plugin: importing them all must not pull in torch.
OPERATOR_AND_PLUGIN_MODULES = sorted(
    f"vnpu.{folder}.{path.relative_to(REPO_ROOT / folder).with_suffix('').as_posix().replace('/', '.')}"
    for folder in ("operator", "device_plugin")
    for path in (REPO_ROOT / folder).rglob("*.py")
    if "proto" not in path.parts and path.name != "__init__.py"
)


def test_operator_and_device_plugin_never_import_torch() -> None:
    assert "vnpu.operator.main" in OPERATOR_AND_PLUGIN_MODULES
    assert "vnpu.operator.packing.plans" in OPERATOR_AND_PLUGIN_MODULES
    assert "vnpu.device_plugin.main" in OPERATOR_AND_PLUGIN_MODULES
    imports = "; ".join(f"import {m}" for m in OPERATOR_AND_PLUGIN_MODULES)
    out = _run_in_repo_root(
        "-c",
        f"import sys, vnpu.cli, vnpu.api, vnpu.inventory; {imports}; "
        "print('torch' in sys.modules, len([m for m in sys.modules if m.startswith('vnpu.')]))",
    )
    imported, count = out.split()
    assert imported == "False" and int(count) >= len(OPERATOR_AND_PLUGIN_MODULES)


def test_test_modules_have_unique_basenames() -> None:
    """The test folders are not packages, so pytest imports each test module by its basename:
    two files of one name anywhere under tests/ stop collection of the whole suite."""
    seen: dict[str, Path] = {}
    for path in sorted((REPO_ROOT / "tests").rglob("*.py")):
        if path.name in ("conftest.py", "__init__.py"):
            continue
        other = seen.setdefault(path.name, path)
        assert other == path, f"{path.relative_to(REPO_ROOT)} shadows {other.relative_to(REPO_ROOT)}"
