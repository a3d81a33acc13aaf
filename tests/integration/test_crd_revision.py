"""The operator tells when the served InferenceModel CRD is older than the one it writes for (a
``helm upgrade`` without the documented CRD apply: the API server then refuses the status phase
``Idle`` and drops ``status.scaling`` and ``status.endpoint``, and nothing said why)."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess

import pytest
import yaml

from vnpu import api
from vnpu.cluster.helm import REPO_ROOT
from vnpu.operator import metrics
from vnpu.operator.crd import APPLY_COMMAND, CrdRevisionCheck

#: sha256 of the CRD's ``spec`` (JSON, keys sorted) at revision :data:`vnpu.api.CRD_REVISION`. When the
#: spec changes, bump ``CRD_REVISION`` and the annotation in crds/, then put the new hash here.
CRDS_DIR = REPO_ROOT / "crds"
CRD_SPEC_SHA256 = "e1a498653758d203f9b655ec84476d946551b6a5f8f2444b8e74ffb9f0baad1a"


def test_the_crds_revision_is_bumped_with_every_change_of_its_spec() -> None:
    crd = yaml.safe_load((CRDS_DIR / "inferencemodel.yaml").read_text())
    assert crd["metadata"]["annotations"][api.CRD_REVISION_ANNOTATION] == str(api.CRD_REVISION)
    digest = hashlib.sha256(json.dumps(crd["spec"], sort_keys=True).encode()).hexdigest()
    assert digest == CRD_SPEC_SHA256, (
        "the CRD's spec changed: bump vnpu.api.CRD_REVISION and the vnpu.io/crd-revision annotation in "
        f"crds/inferencemodel.yaml, then set CRD_SPEC_SHA256 = {digest!r} in this test"
    )


@pytest.mark.integration
def test_an_outdated_served_crd_is_an_error_saying_what_to_apply_until_it_is_applied(
    control_plane, caplog: pytest.LogCaptureFixture
) -> None:
    check = CrdRevisionCheck(control_plane.api_client())
    assert check.check_once() is False and metrics.CRD_OUTDATED._value.get() == 0
    # What an upgrade without the CRD step leaves: the previous release's CRD, with no revision.
    control_plane.kubectl("annotate", "crd", api.CRD_NAME, f"{api.CRD_REVISION_ANNOTATION}-")
    try:
        with caplog.at_level(logging.INFO, logger="vnpu.operator.crd"):
            assert check.check_once() is True and check.check_once() is True
        assert metrics.CRD_OUTDATED._value.get() == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and APPLY_COMMAND in errors[0] and "revision 0" in errors[0]
    finally:
        control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS_DIR))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vnpu.operator.crd"):
        assert check.check_once() is False
    assert metrics.CRD_OUTDATED._value.get() == 0
    assert "up to date again" in caplog.text


@pytest.mark.integration
def test_the_chart_refuses_to_install_over_an_older_crd_saying_what_to_apply(
    control_plane, kube_bin_dir, namespace
) -> None:
    """Helm never upgrades crds/: an upgrade, or a re-install over the CRD an uninstall left, ran the new
    operator on the old schema. The chart now looks the served CRD up and refuses, naming the step
    (the operator's own check says the same command)."""
    from vnpu.cluster.helm import CHART

    def install() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(kube_bin_dir / "helm"), "install", "crdcheck", str(CHART), "-n", namespace,
             "--dry-run=server", "--kubeconfig", str(control_plane.kubeconfig),
             # (the one object of a fixed name: other tests' clusters hold a PriorityClass of it)
             "--set", "placeholderPriorityClass.create=false"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    assert install().returncode == 0, install().stderr  # the served CRD is this revision
    control_plane.kubectl("annotate", "--overwrite", "crd", api.CRD_NAME, f"{api.CRD_REVISION_ANNOTATION}=1")
    try:
        refused = install()
        assert refused.returncode != 0
        assert f"revision 1, older than this chart's {api.CRD_REVISION}" in refused.stderr, refused.stderr
        assert APPLY_COMMAND in refused.stderr
    finally:
        control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS_DIR))
    assert install().returncode == 0
