"""The names the chart gives its objects: valid for every release name Helm accepts (up to 53 characters,
a digit first, dots), as the real API server judges them, and unchanged for the releases that installed
before (an upgrade renaming a Deployment or a Service would replace it; the Lease and the bindings go by
name too).

Services are the strict ones: a DNS-1035 label (at most 63 characters, a letter first, no dots), where
the other objects take a DNS-1123 subdomain. "<fullname>-operator-metrics" was 64 characters for a
release name of 42 ("-vnpu" added), and "2024-prod-vnpu-gateway" starts with a digit."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_chart import helm

from vnpu.cluster.helm import CHART

#: Everything the chart can render, as far as names go: the monitoring objects (no CRDs for them on the
#: test's API server: checked by pattern only) and the model policy.
ALL_ON = (
    "--set", "serviceMonitor.enabled=true", "--api-versions", "monitoring.coreos.com/v1",
    "--set-json", 'modelPolicy.allowedRuntimeImages=["registry.example.com/vnpu/"]',
)  # fmt: skip
#: The release "vnpu" (vnpu up, the documented install): every name as chart 0.2.x gave it.
DEFAULT_NAMES = {
    ("ClusterRole", "vnpu-device-plugin"),
    ("ClusterRole", "vnpu-gateway"),
    ("ClusterRole", "vnpu-operator"),
    ("ClusterRoleBinding", "vnpu-device-plugin"),
    ("ClusterRoleBinding", "vnpu-gateway"),
    ("ClusterRoleBinding", "vnpu-operator"),
    ("DaemonSet", "vnpu-device-plugin"),
    ("Deployment", "vnpu-gateway"),
    ("Deployment", "vnpu-operator"),
    ("PodMonitor", "vnpu-device-plugin"),
    ("PriorityClass", "vnpu-placeholder"),
    ("Role", "vnpu-operator-leader-election"),
    ("RoleBinding", "vnpu-operator-leader-election"),
    ("Service", "vnpu-gateway"),
    ("Service", "vnpu-operator-metrics"),
    ("ServiceAccount", "vnpu-device-plugin"),
    ("ServiceAccount", "vnpu-gateway"),
    ("ServiceAccount", "vnpu-operator"),
    ("ServiceMonitor", "vnpu-operator"),
    ("ValidatingAdmissionPolicy", "vnpu-allowed-model-images-and-sources"),
    ("ValidatingAdmissionPolicy", "vnpu-device-plugin-own-node"),
    ("ValidatingAdmissionPolicy", "vnpu-gateway-activity-only"),
    ("ValidatingAdmissionPolicy", "vnpu-operator-only-pods"),
    ("ValidatingAdmissionPolicy", "vnpu-operator-scope"),
    ("ValidatingAdmissionPolicyBinding", "vnpu-allowed-model-images-and-sources"),
    ("ValidatingAdmissionPolicyBinding", "vnpu-device-plugin-own-node"),
    ("ValidatingAdmissionPolicyBinding", "vnpu-gateway-activity-only"),
    ("ValidatingAdmissionPolicyBinding", "vnpu-operator-only-pods"),
    ("ValidatingAdmissionPolicyBinding", "vnpu-operator-scope"),
}
#: And the names its objects give each other (service accounts, bindings, the operator's Lease).
DEFAULT_REFERENCES = {
    "--leader-election-id=vnpu-operator",
    "policyName=vnpu-allowed-model-images-and-sources",
    "policyName=vnpu-device-plugin-own-node",
    "policyName=vnpu-gateway-activity-only",
    "policyName=vnpu-operator-only-pods",
    "policyName=vnpu-operator-scope",
    "roleRef=vnpu-device-plugin",
    "roleRef=vnpu-gateway",
    "roleRef=vnpu-operator",
    "roleRef=vnpu-operator-leader-election",
    "serviceAccountName=vnpu-device-plugin",
    "serviceAccountName=vnpu-gateway",
    "serviceAccountName=vnpu-operator",
    "subject=vnpu-device-plugin",
    "subject=vnpu-gateway",
    "subject=vnpu-operator",
}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
#: Release names Helm accepts that the chart's names once broke: its longest (53), a digit first, dots,
#: and all three at once.
LONGEST = "r" * 53
UNUSUAL = {
    "53-characters": LONGEST,
    "42-characters": "p" * 42,
    "digit-first": "2024-prod",
    "dotted": "team.a-prod",
    "53-digit-first-dotted": "2024.a." + "b" * 46,
}


def render(bin_dir: Path, release: str, namespace: str, *values: str) -> list[dict[str, Any]]:
    out = helm(bin_dir, "template", release, str(CHART), "-n", namespace, "--kube-version", "1.34.4", *values)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def names(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def references(docs: list[dict[str, Any]]) -> set[str]:
    """The names the objects give each other: service accounts, role and policy bindings, the Lease."""
    found: set[str] = set()
    for d in docs:
        spec = d.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        if "serviceAccountName" in pod:
            found.add(f"serviceAccountName={pod['serviceAccountName']}")
        for arg in (c for container in pod.get("containers", []) for c in container.get("args", [])):
            if arg.startswith("--leader-election-id="):
                found.add(arg)
        if "roleRef" in d:
            found.add(f"roleRef={d['roleRef']['name']}")
            found.update(f"subject={s['name']}" for s in d["subjects"])
        if "policyName" in spec:
            found.add(f"policyName={spec['policyName']}")
    return found


@pytest.mark.parametrize(
    ("release", "values", "fullname"),
    [
        ("vnpu", (), "vnpu"),
        ("prod", (), "prod-vnpu"),
        ("vnpu-install-test", (), "vnpu-install-test"),
        ("my-team-2024", (), "my-team-2024-vnpu"),
        ("q" * 41, (), "q" * 41 + "-vnpu"),  # the longest whose Services fitted: "-operator-metrics" at 63
        ("x", ("--set", "fullnameOverride=acme"), "acme"),
        ("prod", ("--set", "nameOverride=npu"), "prod-npu"),
    ],
)
def test_the_names_of_releases_that_installed_before_are_unchanged(
    kube_bin_dir, release, values, fullname
) -> None:
    docs = render(kube_bin_dir, release, "vnpu-system", *ALL_ON, *values)
    want = {(kind, name.replace("vnpu", fullname, 1)) if name != "vnpu-placeholder" else (kind, name)
            for kind, name in DEFAULT_NAMES}  # fmt: skip
    assert names(docs) == want
    assert references(docs) == {ref.replace("=vnpu", f"={fullname}", 1) for ref in DEFAULT_REFERENCES}


def check_names(docs: list[dict[str, Any]]) -> None:
    for kind, name in names(docs):
        assert len(name) <= 253 and DNS1123_SUBDOMAIN.match(name), (kind, name)
        if kind == "Service":
            assert len(name) <= 63 and DNS1035_LABEL.match(name), (kind, name)
    for ref in references(docs):
        assert DNS1123_SUBDOMAIN.match(ref.split("=", 1)[1]), ref


@pytest.mark.parametrize("release", UNUSUAL.values(), ids=UNUSUAL.keys())
def test_every_name_is_valid_for_any_release_name_helm_accepts(kube_bin_dir, release) -> None:
    docs = render(kube_bin_dir, release, "vnpu-system", *ALL_ON)
    check_names(docs)
    assert len(names(docs)) == len(DEFAULT_NAMES)  # none lost to another's name
    services = {name for kind, name in names(docs) if kind == "Service"}
    assert {s.endswith("-gateway") for s in services} == {True, False}  # the suffix kept, whole
    assert any(s.endswith("-operator-metrics") for s in services)


def test_long_release_names_alike_up_to_the_cut_get_services_of_their_own(kube_bin_dir) -> None:
    def services(release: str) -> set[str]:
        return {name for kind, name in names(render(kube_bin_dir, release, "ns")) if kind == "Service"}

    a, b = services("a" * 52 + "1"), services("a" * 52 + "2")
    assert len(a) == len(b) == 2 and not a & b
    assert services("a" * 52 + "1") == a  # and the same on every upgrade


@pytest.mark.integration
@pytest.mark.parametrize("release", UNUSUAL.values(), ids=UNUSUAL.keys())
def test_the_api_server_accepts_every_object_for_any_release_name(
    control_plane, kube_bin_dir, namespace, release, tmp_path
) -> None:
    docs = [
        d
        for d in render(kube_bin_dir, release, namespace, *ALL_ON)
        if d["kind"] not in ("ServiceMonitor", "PodMonitor")  # no Prometheus Operator CRDs here
    ]
    manifest = tmp_path / "chart.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    proc = control_plane.kubectl("apply", "--dry-run=server", "-f", str(manifest), check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == len(docs), proc.stdout
    # The install's notes name the gateway's Service as it is.
    (service,) = [d["metadata"]["name"] for d in docs if d["kind"] == "Service" and "gateway" in str(d)]
    out = helm(
        kube_bin_dir, "install", release, str(CHART), "-n", namespace, "--dry-run=server",
        "--kubeconfig", str(control_plane.kubeconfig),
    )  # fmt: skip
    assert f"http://{service}.{namespace}.svc/v1" in out.stdout


@pytest.mark.parametrize(
    ("setting", "path"),
    [
        (("--set", "nameOverride=Vnpu_X"), "/nameOverride"),
        (("--set", "fullnameOverride=-"), "/fullnameOverride"),
        (("--set-string", "fullnameOverride=2024"), "/fullnameOverride"),  # a Service needs a letter first
        (("--set", "fullnameOverride=acme.prod"), "/fullnameOverride"),
        (("--set", "fullnameOverride=" + "f" * 47), "/fullnameOverride"),  # -operator-metrics: 64
        (("--set", "nameOverride=" + "n" * 47), "/nameOverride"),
    ],
)
def test_the_schema_refuses_overrides_that_make_no_name(kube_bin_dir, setting, path) -> None:
    proc = helm(kube_bin_dir, "template", "x", str(CHART), *setting, check=False)
    assert proc.returncode != 0 and path in proc.stderr, proc.stderr


def test_a_name_that_cannot_be_made_valid_is_said_even_without_the_schema(kube_bin_dir) -> None:
    for setting in ("fullnameOverride=-", "nameOverride=Vnpu_X"):
        proc = helm(
            kube_bin_dir,
            "template",
            "x",
            str(CHART),
            "--set",
            setting,
            "--skip-schema-validation",
            check=False,
        )
        assert proc.returncode != 0, proc.stdout
        assert "which is not a Kubernetes name" in proc.stderr and "set fullnameOverride" in proc.stderr
    # The longest fullnameOverride the schema takes gives Services as it says, not shortened.
    docs = render(kube_bin_dir, "x", "ns", "--set", "fullnameOverride=" + "f" * 46)
    assert ("Service", "f" * 46 + "-operator-metrics") in names(docs)
    check_names(docs)


def test_helm_refuses_a_release_name_longer_than_53(kube_bin_dir) -> None:
    """The 53 of :data:`LONGEST` is Helm's own limit: no longer release name reaches the chart."""
    proc = subprocess.run(
        [str(kube_bin_dir / "helm"), "template", "r" * 54, str(CHART)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "must not be longer than 53" in proc.stderr
