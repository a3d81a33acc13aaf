"""The chart's allow-lists of runtime images and model sources, against the real API server.

Whoever may write an InferenceModel chooses the image its pods run on the device nodes and the weights
they load; ``modelPolicy.allowedRuntimeImages`` and ``modelPolicy.allowedSources`` narrow both with a
ValidatingAdmissionPolicy. It is applied as the chart renders it, its binding narrowed to this test's
namespace so the rest of the session's tests are untouched.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest
from test_chart import render

from vnpu import api
from vnpu.cluster.processes import wait_until

pytestmark = pytest.mark.integration

TEMPLATE = "templates/model-admission-policy.yaml"
IMAGES = ["registry.example.com/vnpu/", "ghcr.io/acme/runtime:", "quay.io/acme/exact:1.0"]
SOURCES = ["hf://my-org/", "pvc://"]


def model(name: str, image: str | None = None, source: str = "hf://my-org/m", replicas: int = 1) -> str:
    spec: dict[str, Any] = {
        "modelName": name,
        "source": {"uri": source},
        "replicas": replicas,
        "memory": {"kvCacheMiB": 256},
        "weights": {"sizeMiB": 512},
    }
    if image is not None:
        spec["runtime"] = {"image": image}
    manifest = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}
    return json.dumps(manifest)


def values(key: str, entries: list[str]) -> list[str]:
    return ["--set-json", f"modelPolicy.{key}={json.dumps(entries)}"]


@pytest.fixture
def policy(control_plane, kube_bin_dir, namespace):
    """The policy for IMAGES and SOURCES, its binding limited to ``namespace``; removed after."""
    docs = render(
        kube_bin_dir, "--show-only", TEMPLATE, *values("allowedRuntimeImages", IMAGES),
        *values("allowedSources", SOURCES),
    )  # fmt: skip
    kinds = {d["kind"]: d for d in docs}
    vap, binding = kinds["ValidatingAdmissionPolicy"], kinds["ValidatingAdmissionPolicyBinding"]
    suffix = uuid.uuid4().hex[:6]
    vap["metadata"]["name"] += f"-{suffix}"
    binding["metadata"]["name"] += f"-{suffix}"
    binding["spec"]["policyName"] = vap["metadata"]["name"]
    binding["spec"]["matchResources"] = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    }
    # A model made before the policy (or before the lists were tightened), with what is now refused.
    assert (
        apply(control_plane, namespace, model("before", "docker.io/anyone/x:1", "hf://other/m")).returncode
        == 0
    )
    control_plane.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [vap, binding]})
    )

    def enforced() -> bool:  # the admission plugin loads policies asynchronously
        probe = model(f"probe-{uuid.uuid4().hex[:6]}", "docker.io/anyone/x:1")
        return apply(control_plane, namespace, probe, "create").returncode != 0

    wait_until(enforced, 30, "the policy enforced")
    yield vap["metadata"]["name"]
    control_plane.kubectl(
        "delete", "validatingadmissionpolicybinding", binding["metadata"]["name"], check=False
    )
    control_plane.kubectl("delete", "validatingadmissionpolicy", vap["metadata"]["name"], check=False)


def apply(
    control_plane, namespace: str, manifest: str, verb: str = "apply"
) -> subprocess.CompletedProcess[str]:
    return control_plane.kubectl(verb, "-n", namespace, "-f", "-", input=manifest, check=False)


def test_nothing_is_rendered_by_default(kube_bin_dir) -> None:
    assert render(kube_bin_dir) and not [
        d for d in render(kube_bin_dir) if "allowed-model-images" in d["metadata"]["name"]
    ]


@pytest.mark.parametrize(
    "image",
    [
        None,  # vnpu's own runtime, as the chart configures it
        "registry.example.com/vnpu/runtime:0.2",
        "registry.example.com/vnpu/team/other@sha256:" + "a" * 64,
        "ghcr.io/acme/runtime:cuda-12",
        "quay.io/acme/exact:1.0",
    ],
)
def test_allowed_images_pass(control_plane, namespace, policy, image) -> None:
    out = apply(control_plane, namespace, model(f"ok-{uuid.uuid4().hex[:6]}", image))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "image",
    [
        "docker.io/anyone/x:1",
        "registry.example.com/vnpu-evil/runtime:1",  # a prefix is a path: '/vnpu/' is not '/vnpu-evil'
        "registry.example.com/vnpu",
        "ghcr.io/acme/runtime-evil:1",  # every tag of one repository, not repositories that start alike
        "quay.io/acme/exact:1.0.1",  # an exact entry is exact
    ],
)
def test_other_images_are_refused_with_a_message_naming_the_value(
    control_plane, namespace, policy, image
) -> None:
    out = apply(control_plane, namespace, model(f"no-{uuid.uuid4().hex[:6]}", image))
    assert out.returncode != 0
    assert f"ValidatingAdmissionPolicy '{policy}'" in out.stderr, out.stderr
    assert f"runtime.image {image} is not allowed" in out.stderr
    assert "modelPolicy.allowedRuntimeImages" in out.stderr


def test_sources_are_allowed_by_prefix(control_plane, namespace, policy) -> None:
    for source in ["hf://my-org/m", "hf://my-org/other@v2", "pvc://weights/llama"]:
        assert (
            apply(control_plane, namespace, model(f"ok-{uuid.uuid4().hex[:6]}", source=source)).returncode
            == 0
        )
    for source in ["hf://my-org-evil/m", "file:///etc/models/m.gguf", "hf://other/m"]:
        out = apply(control_plane, namespace, model(f"no-{uuid.uuid4().hex[:6]}", source=source))
        assert out.returncode != 0 and f"source.uri {source} is not allowed" in out.stderr, out.stderr


def test_a_model_keeps_what_it_had_but_may_not_change_to_what_is_refused(
    control_plane, namespace, policy
) -> None:
    """Tightening the lists never blocks a running model: it scales, is labelled and is deleted as
    before; only a new image or source must be allowed."""
    kubectl = control_plane.kubectl
    assert kubectl("scale", "infm", "before", "-n", namespace, "--replicas=3", check=False).returncode == 0
    assert kubectl("label", "infm", "before", "-n", namespace, "team=a", check=False).returncode == 0
    assert (
        apply(control_plane, namespace, model("before", "docker.io/anyone/x:1", "hf://other/m", 2)).returncode
        == 0
    )
    out = apply(control_plane, namespace, model("before", "docker.io/anyone/x:2", "hf://other/m"))
    assert out.returncode != 0 and "runtime.image docker.io/anyone/x:2 is not allowed" in out.stderr
    out = apply(control_plane, namespace, model("before", "docker.io/anyone/x:1", "hf://other/n"))
    assert out.returncode != 0 and "source.uri hf://other/n is not allowed" in out.stderr
    out = apply(control_plane, namespace, model("before", "ghcr.io/acme/runtime:1", "hf://my-org/m"))
    assert out.returncode == 0, out.stderr
    assert kubectl("delete", "infm", "before", "-n", namespace, "--wait=false", check=False).returncode == 0
