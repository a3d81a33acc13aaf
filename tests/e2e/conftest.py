"""The single-node end-to-end: a real kubelet with containerd and runc, in namespaces the test creates.

It runs in CI as part of the README's test command. A developer may skip it locally with
``VNPU_SKIP_NODE_E2E=1`` (tests/conftest.py); anywhere else a missing prerequisite is a failure, not
a skip, so CI cannot pass without having run it. ``hack/setup-env.sh`` installs the prerequisites.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vnpu.cluster.helm import CHART, RELEASE, RELEASE_NAMESPACE, local_node_values
from vnpu.cluster.node import SingleNodeCluster, missing_prerequisites


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Within this folder, tests of the chart's plain defaults (``installed_defaults`` without
    ``installed``) first: the first module that asks for ``installed`` upgrades the session's release
    for good. Everything else keeps its place (the end-to-end runs last, after the other suites)."""
    here = Path(__file__).parent
    slots = [n for n, item in enumerate(items) if here in item.path.parents]

    def defaults_only(item: pytest.Item) -> bool:
        names = getattr(item, "fixturenames", ())
        return "installed_defaults" in names and "installed" not in names

    ordered = sorted((items[n] for n in slots), key=lambda item: not defaults_only(item))
    for n, item in zip(slots, ordered, strict=True):
        items[n] = item


@pytest.fixture(scope="session")
def single_node(kube_bin_dir: Path) -> Iterator[SingleNodeCluster]:
    """Control plane + one real node (``vnpu-node``), torn down after the session.

    The test thread runs inside the node's network namespace while the cluster lives, so kubectl,
    helm and HTTP calls to pod addresses reach it; nothing leaves that namespace."""
    problems = missing_prerequisites()
    if problems:
        pytest.fail(
            "the single-node end-to-end cannot run: missing " + "; ".join(problems) + ". Run "
            "hack/setup-env.sh as root, or set VNPU_SKIP_NODE_E2E=1 to skip it on a developer machine.",
            pytrace=False,
        )
    workdir = Path(tempfile.mkdtemp(prefix="vnpu-e2e-", dir="/tmp"))
    cluster = SingleNodeCluster(kube_bin_dir, workdir, name=f"vnpu-e2e-{os.getpid()}")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def chart(cluster: SingleNodeCluster, command: str, values: dict[str, Any]) -> None:
    """``helm install|upgrade`` of deploy/helm/vnpu with ``values``; waits for its pods."""
    from e2e_helpers import helm

    path = cluster.workdir / "chart-values.json"
    path.write_text(json.dumps(values))
    helm(
        cluster,
        command, RELEASE, str(CHART),
        "--namespace", RELEASE_NAMESPACE, "--create-namespace",
        "--values", str(path),
        "--wait", "--timeout", "180s",
    )  # fmt: skip


@pytest.fixture(scope="session")
def installed_defaults(single_node: SingleNodeCluster) -> SingleNodeCluster:
    """The chart with its default values and only the local images: what a user installs."""
    values = local_node_values()
    del values["devicePlugin"]  # backend auto, fallback none
    chart(single_node, "install", values)
    return single_node


@pytest.fixture(scope="session")
def installed(installed_defaults: SingleNodeCluster) -> SingleNodeCluster:
    """Then upgraded to the default values plus only the local images and the simulated backend (its
    default: two 16 GiB devices, each its own resource of 16 slices of 1 GiB), as `vnpu up` installs
    it. Waits for the operator and the device plugin. Shared by the modules of tests/e2e."""
    chart(installed_defaults, "upgrade", local_node_values())
    return installed_defaults
