"""The install and upgrade commands the README and docs/upgrade-and-uninstall.md give, run as written
(the release and namespace renamed, ``--wait`` dropped: this cluster has no nodes). Both had broken
unseen: the README's ``--set …=true`` is a boolean the schema refuses, and ``--reuse-values`` kept
the previous chart's values whole, so every value added since was missing and the upgrade failed to
render. The end-to-end upgrade (``tests/e2e/test_upgrade.py``) passes its values whole and could not
see the second.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from test_chart import helm

from vnpu.cluster.helm import CHART, REPO_ROOT, extract_previous_release
from vnpu.cluster.processes import wait_until

README = REPO_ROOT / "README.md"
UPGRADE_DOC = REPO_ROOT / "docs" / "upgrade-and-uninstall.md"


def documented_commands(page: Path, heading: str, program: str) -> list[list[str]]:
    """The ``program`` commands of the first ```bash block after ``heading`` on ``page``, each as its
    argv (continuation lines joined, comments dropped, quoting as the shell reads it)."""
    text = page.read_text()
    start = text.index(heading)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, f"no bash block after {heading!r} in {page.name}"
    joined = block.group(1).replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [argv for argv in commands if argv and argv[0] == program]


def as_run_here(argv: list[str], release: str, namespace: str, kubeconfig: str | None) -> list[str]:
    """``argv`` for this test: its release and namespace, without waiting for pods, on our cluster."""
    out = [release if a == "vnpu" else namespace if a == "vnpu-system" else a for a in argv[1:]]
    out = [a for a in out if a != "--wait"]
    return [*out, "--kubeconfig", kubeconfig] if kubeconfig else out


def test_the_readme_install_command_renders(kube_bin_dir) -> None:
    (install,) = [a for a in documented_commands(README, "## On a real cluster", "helm") if a[1] == "install"]
    args = as_run_here(install, "vnpu", "vnpu-system", None)
    args = ["template", *[a for a in args[1:] if a != "--create-namespace"]]
    proc = helm(kube_bin_dir, *args, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.integration
def test_the_documented_upgrade_from_the_previous_release_keeps_its_values_and_renders_the_new_ones(
    control_plane, kube_bin_dir, tmp_path
) -> None:
    kc = str(control_plane.kubeconfig)
    release, namespace = "vnpu-doc", "vnpu-doc-system"
    previous_chart = extract_previous_release(tmp_path) / "deploy" / "helm" / "vnpu"
    # As in test_helm_install_into_the_real_apiserver: other tests applied this outside Helm.
    control_plane.kubectl("delete", "priorityclass", "vnpu-placeholder", "--ignore-not-found")
    helm(kube_bin_dir, "install", release, str(previous_chart), "-n", namespace, "--create-namespace",
         "--kubeconfig", kc, "--set", "operator.resyncSeconds=42", "--wait=false")  # fmt: skip
    try:
        steps = documented_commands(UPGRADE_DOC, "## Upgrade", "kubectl") + documented_commands(
            UPGRADE_DOC, "## Upgrade", "helm"
        )
        assert [argv[:2] for argv in steps] == [["kubectl", "apply"], ["helm", "upgrade"]]
        kubectl_apply, helm_upgrade = steps
        control_plane.kubectl(
            *[f"{REPO_ROOT}/{a}" if a.startswith("deploy/") else a for a in kubectl_apply[1:]]
        )
        upgrade = as_run_here(helm_upgrade, release, namespace, kc)
        upgrade = [str(CHART) if a == "deploy/helm/vnpu" else a for a in upgrade]
        proc = helm(kube_bin_dir, *upgrade, check=False)
        assert proc.returncode == 0, proc.stderr
        manifest = helm(kube_bin_dir, "get", "manifest", release, "-n", namespace, "--kubeconfig", kc).stdout
        assert "--preemption=namespace" in manifest  # a value the previous chart did not have
        values = helm(kube_bin_dir, "get", "values", release, "-n", namespace, "--kubeconfig", kc).stdout
        assert "resyncSeconds: 42" in values  # the value the release was installed with
    finally:
        helm(kube_bin_dir, "uninstall", release, "-n", namespace, "--kubeconfig", kc)
        probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": "default"},
                 "spec": {"containers": [{"name": "c", "image": "x",
                                          "resources": {"limits": {"vnpu.io/memory-0": "1"}}}]}}  # fmt: skip

        def admin_may_create() -> bool:
            return (
                control_plane.kubectl(
                    "create", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False
                ).returncode
                == 0
            )

        # Gone with the release: later tests (operators running as the admin) create vnpu pods again.
        wait_until(admin_may_create, 30, "the chart's admission policy removed")
