"""The distribution outside the checkout: the wheel holds every component and its `vnpu` command runs
from anywhere, and deploy/image/Containerfile builds the image from exactly what the wheel is built
from (tests/core/test_image_recipe.py: the Containerfile and `make image` read one list)."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

from vnpu.cluster import images

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "deploy" / "image" / "Containerfile"


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_wheel_runs_every_component_outside_the_checkout(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("vnpu-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    # Dependencies come from this environment's site-packages (no network); vnpu only from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "--no-deps",
         "-q", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    probe = (
        "import vnpu.api, vnpu.operator.main, vnpu.device_plugin.main, vnpu.runtime.main, vnpu.bench.main;"
        "print(vnpu.api.__file__); print(vnpu.operator.main.__file__)"
    )
    out = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", probe], cwd="/", check=True, capture_output=True, text=True
    ).stdout.split()
    assert all(path.startswith(str(site)) for path in out), out  # not the checkout
    version = subprocess.run(
        [str(env_dir / "bin" / "vnpu"), "--version"], cwd="/", check=True, capture_output=True, text=True
    )
    assert version.stdout.strip() == f"vnpu {pyproject()['project']['version']}"
    # The proto stubs and the scripts the cluster helpers run ship as package data.
    files = subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(wheel)], check=True, capture_output=True, text=True
    ).stdout
    for name in (
        "vnpu/device_plugin/proto/api.proto",
        "vnpu/cluster/build-binaries.sh",
        "vnpu/cluster/pause.c",
    ):
        assert name in files


def test_the_containerfile_copies_every_source_folder() -> None:
    text = CONTAINERFILE.read_text()
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", text, re.M))
    sources = set(pyproject()["tool"]["setuptools"]["package-dir"].values())
    assert copied == sources, "the image must be built from exactly the wheel's source folders"
    chart = (REPO / "deploy" / "helm" / "vnpu" / "templates" / "operator-deployment.yaml").read_text()
    uid = re.search(r"runAsUser: (\d+)", chart)
    assert uid and f"USER {uid.group(1)}:" in text  # the chart's non-root user exists in the image
    assert f"USER {images.NON_ROOT_USER}" in text  # and the e2e's local image runs as the same user
