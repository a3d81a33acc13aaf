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

import pytest

from vnpu.cluster.helm import CHART, RELEASE, RELEASE_NAMESPACE, local_node_values
from vnpu.cluster.node import SingleNodeCluster, missing_prerequisites

#: The `installed` chart's simulated devices: two of 16 GiB in 1 GiB slices.
DEVICE_MIB = 16 * 1024


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


@pytest.fixture(scope="session")
def installed(single_node: SingleNodeCluster) -> SingleNodeCluster:
    """The chart installed with the values of a local node, as `vnpu up` installs it: the locally built
    image, our pause image, simulated devices (two 16 GiB devices, each its own resource of 16 slices
    of 1 GiB). Waits for the operator and the device plugin. Shared by the modules of tests/e2e."""
    from e2e_helpers import helm

    values = single_node.workdir / "chart-values.json"
    values.write_text(json.dumps(local_node_values(devices=2, device_mib=DEVICE_MIB)))
    helm(
        single_node,
        "install", RELEASE, str(CHART),
        "--namespace", RELEASE_NAMESPACE, "--create-namespace",
        "--values", str(values),
        "--wait", "--timeout", "180s",
    )  # fmt: skip
    return single_node
