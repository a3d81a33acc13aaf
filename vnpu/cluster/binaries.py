"""Locate the Kubernetes binaries, building them from the Go module proxy when they are missing.

The build itself is ``build-binaries.sh`` beside this file (shell, because it is mostly ``go`` commands);
it caches by version under ``$VNPU_CACHE_DIR`` (default ``~/.cache/vnpu``) so only the first run pays.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BUILD_SCRIPT = Path(__file__).with_name("build-binaries.sh")
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
    "kwok",
    "kwok-stages.yaml",
    "helm",
    "kubeconform",
)


class BinariesUnavailable(RuntimeError):
    """The Kubernetes binaries are missing and could not be built."""


def ensure_binaries(*, quiet: bool = False) -> Path:
    """Return the directory holding every component in :data:`COMPONENTS`, building what is missing.

    ``VNPU_BIN_DIR`` points at a ready directory and skips the build entirely (e.g. binaries from a
    release tarball). Build progress goes to stderr unless ``quiet``.
    """
    override = os.environ.get("VNPU_BIN_DIR")
    if override:
        bin_dir = Path(override)
        missing = [c for c in COMPONENTS if not (bin_dir / c).exists()]
        if missing:
            raise BinariesUnavailable(f"VNPU_BIN_DIR={bin_dir} lacks {', '.join(missing)}")
        return bin_dir
    if shutil.which("go") is None:
        raise BinariesUnavailable(
            "the Go toolchain is needed to build the Kubernetes binaries (no `go` on PATH)"
        )
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else sys.stderr,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BinariesUnavailable(
            f"{BUILD_SCRIPT.name} failed with exit code {proc.returncode} (see its output)"
        )
    return Path(proc.stdout.strip().splitlines()[-1])
