"""The values schema allows Helm's ``global`` key. Its top level refuses unknown keys
(``additionalProperties: false``), and Helm passes ``global`` to every chart it renders as a
subchart, so without it the chart failed as a dependency of another chart (``additional properties
'global' not allowed``) whatever the parent set. Unknown keys are still refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_chart import helm, render

from vnpu.cluster.helm import CHART


def test_global_values_render(kube_bin_dir: Path) -> None:
    docs = render(kube_bin_dir, "--set", "global.foo=bar")
    assert any(d["kind"] == "DaemonSet" for d in docs)


def test_the_chart_renders_as_a_subchart(kube_bin_dir: Path, tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    (parent / "charts").mkdir(parents=True)
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    chart = {"apiVersion": "v2", "name": "parent", "version": "0.1.0",
             "dependencies": [{"name": "vnpu", "version": version}]}  # fmt: skip
    (parent / "Chart.yaml").write_text(yaml.safe_dump(chart))
    values = {"global": {"imageRegistry": "registry.example.com"}, "vnpu": {"operator": {"replicas": 2}}}
    (parent / "values.yaml").write_text(yaml.safe_dump(values))
    (parent / "charts" / "vnpu").symlink_to(CHART, target_is_directory=True)
    out = helm(kube_bin_dir, "template", "p", str(parent), "-n", "ns", "--kube-version", "1.34.4").stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    (operator,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    ]
    assert operator["spec"]["replicas"] == 2  # the parent's values reach the chart


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        (["--set", "bogus=1"], "additional properties 'bogus' not allowed"),
        (["--set", "global=1"], "/global"),
    ],
    ids=["unknown-key", "global-not-an-object"],
)
def test_unknown_top_level_keys_are_still_refused(
    kube_bin_dir: Path, setting: list[str], refusal: str
) -> None:
    proc = helm(kube_bin_dir, "template", "vnpu", str(CHART), *setting, check=False)
    assert proc.returncode != 0, proc.stdout
    assert refusal in proc.stderr, proc.stderr
