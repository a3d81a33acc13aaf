"""Shared pytest fixtures.

Integration tests (marked ``integration``, or living under tests/integration/) run against a real
etcd + kube-apiserver built from the Go module proxy (see vnpu/cluster/build-binaries.sh). The control
plane is session-scoped; scheduler, controller-manager and kwok start on first request.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Property tests check correctness, not speed: on this 2-core machine a CI run shares the CPU with
# kube-apiservers and model runtimes, and one example stalled past Hypothesis's 200 ms deadline (or
# slow data generation) would fail a test whose code is right.
settings.register_profile("vnpu", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vnpu")

REPO_ROOT = Path(__file__).resolve().parent.parent
CRDS_DIR = REPO_ROOT / "crds"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_node = os.environ.get("VNPU_SKIP_NODE_E2E") == "1"
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.node)
        if skip_node and item.get_closest_marker("node"):
            item.add_marker(pytest.mark.skip(reason="VNPU_SKIP_NODE_E2E=1 (developer opt-out; CI runs it)"))
    # The single-node end-to-end (root, containerd, a real kubelet) goes last: it is the slowest and
    # the most invasive, and nothing else should depend on the machine state it leaves.
    items.sort(key=lambda item: item.get_closest_marker("node") is not None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """A failed test's report carries the post-mortem of every fixture that has one (the operator's
    log): a CI run on a clean clone keeps no temporary directory, so the report is all there is."""
    report = yield
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            post_mortem = getattr(value, "post_mortem", None)
            if callable(post_mortem):
                report.sections.append((f"post-mortem: {name}", post_mortem()))
    return report


@pytest.fixture(scope="session")
def kube_bin_dir() -> Path:
    from vnpu.cluster.binaries import ensure_binaries

    return ensure_binaries()


@pytest.fixture(scope="session")
def control_plane(kube_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """etcd + kube-apiserver with RBAC on loopback, CRDs from crds/ applied and established."""
    from vnpu.cluster.controlplane import ControlPlane

    # OwnerReferencesPermissionEnforcement, on in OpenShift, off upstream: setting blockOwnerDeletion
    # on an owner reference then needs `update` on the owner's finalizers, which the chart's RBAC must
    # grant (tests/integration/test_operator.py runs the operator under exactly that RBAC). Not in the
    # node end-to-end's cluster: the previous release it upgrades from predates the grant.
    cp = ControlPlane(
        kube_bin_dir,
        tmp_path_factory.mktemp("control-plane"),
        apiserver_args=("--enable-admission-plugins=OwnerReferencesPermissionEnforcement",),
    )
    cp.start()
    try:
        cp.kubectl("apply", "--server-side", "-f", str(CRDS_DIR))
        cp.wait_established("inferencemodels.vnpu.io")
        yield cp
    finally:
        # VNPU_KEEP_CONTROL_PLANE=1 keeps logs (incl. the pod-deletion audit log) for a post-mortem.
        cp.stop() if os.environ.get("VNPU_KEEP_CONTROL_PLANE") == "1" else cp.cleanup()


@pytest.fixture
def namespace(control_plane: Any) -> Iterator[str]:
    """A fresh namespace per test (without a controller-manager it never finishes terminating; fine)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    if os.environ.get("VNPU_KEEP_NAMESPACES") != "1":
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def kwok_nodes(control_plane: Any) -> Iterator[Callable[..., list[str]]]:
    """Factory creating fake NPU nodes managed by kwok; they are deleted after the test."""
    from kubernetes import client

    from vnpu.cluster.kwok import create_npu_nodes, delete_nodes
    from vnpu.cluster.processes import wait_until

    control_plane.start_kwok()
    core = client.CoreV1Api(control_plane.api_client())
    created: list[str] = []
    counter = itertools.count()

    def make(count: int, **kwargs: Any) -> list[str]:
        prefix = kwargs.pop("prefix", f"npu-{uuid.uuid4().hex[:6]}-{next(counter)}")
        names = create_npu_nodes(control_plane.api_client(), count, prefix=prefix, **kwargs)
        created.extend(names)
        wait_until(lambda: all(usable(n) for n in names), 60, f"kwok nodes {names} Ready")
        return names

    def usable(name: str) -> bool:
        """Ready, and — when a controller-manager runs — rid of the not-ready taint it manages."""
        node = core.read_node(name)
        ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        untainted = "kube-controller-manager" not in control_plane.processes or not node.spec.taints
        return ready and untainted

    yield make
    delete_nodes(control_plane.api_client(), created)
