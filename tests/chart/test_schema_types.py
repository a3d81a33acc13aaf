"""The values schema types what Kubernetes types: every string-to-string map (node selectors, pod and
ServiceAccount annotations, labels) takes strings only, and tolerations are Toleration objects.
``--set gateway.nodeSelector.pool=1`` makes an integer: it rendered, and the install failed half-way,
at the API server, with ``Deployment in version "v1" cannot be handled as a Deployment: json: cannot
unmarshal number into Go struct field PodSpec.spec.template.spec.nodeSelector of type string``, which
names no key. The schema refuses it up front, naming the key; ``--set-string`` (or quotes in a values
file) gives ``"1"``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_chart import helm, render

from vnpu.cluster.helm import CHART

STRING_MAPS = [
    "serviceAccount.annotations",
    "operator.nodeSelector",
    "operator.podAnnotations",
    "devicePlugin.nodeSelector",
    "devicePlugin.podAnnotations",
    "gateway.nodeSelector",
    "gateway.podAnnotations",
    "serviceMonitor.labels",
]


def test_every_string_map_of_the_values_is_typed() -> None:
    """A map added to values.yaml (empty, so nothing else says what it holds) gets a type too."""
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    maps = {
        f"{section}.{key}"
        for section, fields in values.items()
        if isinstance(fields, dict)
        for key, value in fields.items()
        if value == {} and key in ("nodeSelector", "podAnnotations", "annotations", "labels")
    }
    assert maps == set(STRING_MAPS)
    for path in STRING_MAPS:
        section, key = path.split(".")
        node = schema["properties"][section]["properties"][key]
        assert node.get("additionalProperties") == {"type": "string"}, path


@pytest.mark.parametrize("path", STRING_MAPS)
def test_a_string_map_refuses_other_values_naming_the_key(kube_bin_dir: Path, path: str) -> None:
    proc = helm(kube_bin_dir, "template", "x", str(CHART), "--set", f"{path}.pool=1", check=False)
    assert proc.returncode != 0, proc.stdout
    assert f"/{path.replace('.', '/')}/pool" in proc.stderr and "want string" in proc.stderr, proc.stderr
    extra = ["--set", "serviceMonitor.enabled=true", "--api-versions", "monitoring.coreos.com/v1"]
    docs = render(kube_bin_dir, "--set-string", f"{path}.pool=1", *extra)
    assert "pool: '1'" in yaml.safe_dump_all(docs)


@pytest.mark.parametrize("component", ["operator", "devicePlugin", "gateway"])
@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        (["tolerations[0]=nvidia.com/gpu"], "/tolerations/0': got string, want object"),
        (["tolerations[0].key=pool", "tolerations[0].value=1"], "/tolerations/0/value': got number"),
        (["tolerations[0].key=pool", "tolerations[0].operator=exists"], "/tolerations/0/operator"),
    ],
    ids=["not-an-object", "value-a-number", "operator-misspelt"],
)
def test_tolerations_are_toleration_objects(
    kube_bin_dir: Path, component: str, settings: list[str], refusal: str
) -> None:
    args = [a for s in settings for a in ("--set", f"{component}.{s}")]
    proc = helm(kube_bin_dir, "template", "x", str(CHART), *args, check=False)
    assert proc.returncode != 0 and f"/{component}{refusal}" in proc.stderr, proc.stderr


def test_the_default_tolerations_and_string_values_pass(kube_bin_dir: Path) -> None:
    docs = render(
        kube_bin_dir,
        "--set-string", "gateway.tolerations[0].key=pool",
        "--set-string", "gateway.tolerations[0].value=1",
        "--set", "gateway.tolerations[0].effect=NoSchedule",
    )  # fmt: skip
    (gateway,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway")]
    assert gateway["spec"]["template"]["spec"]["tolerations"] == [
        {"key": "pool", "value": "1", "effect": "NoSchedule"}
    ]


@pytest.mark.parametrize("component", ["operator", "devicePlugin"])
def test_extra_env_values_are_strings(kube_bin_dir: Path, component: str) -> None:
    """``--set operator.extraEnv[0].value=1`` rendered an integer that the API server refused at apply
    (``cannot unmarshal number into Go struct field EnvVar ... of type string``), naming no key."""
    base = ["--set", f"{component}.extraEnv[0].name=X"]
    for setting, refusal in [
        (f"{component}.extraEnv[0].value=1", f"/{component}/extraEnv/0/value': got number"),
        (f"{component}.extraEnv[0].vaule=a", "vaule"),  # a misspelt key
    ]:
        proc = helm(kube_bin_dir, "template", "x", str(CHART), *base, "--set", setting, check=False)
        assert proc.returncode != 0 and refusal in proc.stderr, (setting, proc.stderr)
    docs = render(kube_bin_dir, *base, "--set-string", f"{component}.extraEnv[0].value=1")
    assert "value: '1'" in yaml.safe_dump_all(docs)


@pytest.mark.parametrize("component", ["operator", "devicePlugin", "gateway"])
def test_resources_are_requests_and_limits_of_quantities(kube_bin_dir: Path, component: str) -> None:
    """The gateway's took any object: a misspelt ``request`` rendered and was dropped by the API server
    (the pod ran with no request at all), and a boolean failed at apply naming no key."""
    for setting, refusal in [
        (f"{component}.resources.request.cpu=1", "request"),
        (f"{component}.resources.limits.memory=true", f"/{component}/resources/limits/memory"),
    ]:
        proc = helm(kube_bin_dir, "template", "x", str(CHART), "--set", setting, check=False)
        assert proc.returncode != 0 and refusal in proc.stderr, (setting, proc.stderr)
    docs = render(kube_bin_dir, "--set", f"{component}.resources.limits.cpu=2")
    assert "cpu: 2" in yaml.safe_dump_all(docs)


def test_an_empty_priority_class_leaves_the_field_out(kube_bin_dir: Path) -> None:
    """``devicePlugin.priorityClassName=""`` (the cluster's default priority) rendered a null field."""
    (plugin,) = [
        d
        for d in render(kube_bin_dir, "--set", "devicePlugin.priorityClassName=")
        if d["kind"] == "DaemonSet"
    ]
    assert "priorityClassName" not in plugin["spec"]["template"]["spec"]
    (default,) = [d for d in render(kube_bin_dir) if d["kind"] == "DaemonSet"]
    assert default["spec"]["template"]["spec"]["priorityClassName"] == "system-node-critical"
