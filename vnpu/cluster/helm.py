"""The Helm chart on a local cluster: the ``helm`` built by build-binaries.sh, and the chart values for
a node without a registry or an accelerator: the chart's defaults plus the locally built images and
the simulated backend — nothing else. Used by ``vnpu up`` on a real node and by the single-node
end-to-end, so both install exactly what a user would, on a machine like this one."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from vnpu.cluster import images

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "deploy" / "helm" / "vnpu"
RELEASE = "vnpu"
RELEASE_NAMESPACE = "vnpu-system"
#: The previous release, which the upgrade tests upgrade from: chart 0.2.0 as on main before issue
#: 14's least-privilege and upgrade work. Move both to the last release when the chart's version is
#: bumped again.
PREVIOUS_VERSION = "0.2.0"
PREVIOUS_COMMIT = "daab16c574396b2e00e21ba93a4889e7520c0f0f"


class PreviousReleaseMissingError(RuntimeError):
    """The git history here lacks :data:`PREVIOUS_COMMIT` (a shallow clone)."""


def extract_previous_release(into: Path) -> Path:
    """The repository at :data:`PREVIOUS_COMMIT`, extracted into ``into`` (``git archive``: its chart,
    with the ``crds`` link resolving inside the tree, and its code); returns ``into``."""
    proc = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", PREVIOUS_COMMIT],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise PreviousReleaseMissingError(
            f"the upgrade tests need commit {PREVIOUS_COMMIT} (vnpu {PREVIOUS_VERSION}) in the git history "
            f"of {REPO_ROOT} (a full clone, not a shallow one): "
            + proc.stderr.decode(errors="replace").strip()
        )
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as archive:
        archive.extractall(into, filter="data")
    return into


def local_node_values(*, simulated_devices: str = "", resync_seconds: int | None = None) -> dict[str, Any]:
    """Chart values for :class:`~vnpu.cluster.node.LocalNode`: the locally built image (nothing can be
    pulled, so ``pullPolicy: Never``), our own pause image for the placeholder pods, and the device
    plugin's simulated backend (``simulated_devices`` as ``COUNTxMIB``; empty: the plugin's default of
    two 16 GiB devices). ``resync_seconds`` shortens the operator's periodic pass (``vnpu up``)."""
    repository, tag = images.VNPU_IMAGE.rsplit(":", 1)
    values: dict[str, Any] = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "operator": {"placeholders": {"image": images.PAUSE_IMAGE}},
        "devicePlugin": {"backend": "simulated"},
    }
    if simulated_devices:
        values["devicePlugin"]["simulatedDevices"] = simulated_devices
    if resync_seconds is not None:
        values["operator"]["resyncSeconds"] = resync_seconds
    return values


def helm(bin_dir: Path, kubeconfig: Path, cache_dir: Path, *args: str, timeout: float = 300) -> str:
    """Run ``helm`` against ``kubeconfig`` (its caches under ``cache_dir``); stdout, or RuntimeError."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HELM_CACHE_HOME": str(cache_dir)}
    proc = subprocess.run(
        [str(bin_dir / "helm"), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def template(bin_dir: Path, *args: str) -> str:
    """``helm template`` of the chart as release ``vnpu`` in ``vnpu-system`` (no cluster needed)."""
    proc = subprocess.run(
        [str(bin_dir / "helm"), "template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"helm template {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def placeholder_priority_class(bin_dir: Path) -> str:
    """The placeholder PriorityClass as the chart ships it, for an operator run outside Helm (the
    operator never creates it): apply it with ``kubectl apply -f -``."""
    return template(bin_dir, "--show-only", "templates/priorityclass.yaml")
