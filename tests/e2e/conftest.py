"""The single-node end-to-end: a real kubelet with containerd and runc, in namespaces the test creates.

It runs in CI as part of the README's test command. A developer may skip it locally with
``VNPU_SKIP_NODE_E2E=1`` (tests/conftest.py); anywhere else a missing prerequisite is a failure, not
a skip, so CI cannot pass without having run it. ``hack/setup-env.sh`` installs the prerequisites.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vnpu.cluster.node import SingleNodeCluster, missing_prerequisites


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
