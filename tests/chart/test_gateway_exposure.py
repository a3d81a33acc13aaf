"""The gateway outside the cluster only with API keys: a NodePort or LoadBalancer Service with
``gateway.apiKeys.secretName`` empty would let anyone who reaches it call every model of every
namespace, so the chart refuses to render it, saying what to set, unless
``gateway.service.allowUnauthenticated`` opts in (something in front of the gateway authenticates
callers). ClusterIP without keys, the in-cluster default, stays as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_chart import helm, render

from vnpu.cluster.helm import CHART

EXPOSED = ["NodePort", "LoadBalancer"]
KEYS = ["--set", "gateway.apiKeys.secretName=gateway-keys"]
OPT_IN = ["--set", "gateway.service.allowUnauthenticated=true"]


def gateway(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """The gateway's Service, and its container's arguments."""
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-gateway")]
    (deployment,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway")
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return service, container["args"]


@pytest.mark.parametrize("schema", [[], ["--skip-schema-validation"]], ids=["schema", "no-schema"])
@pytest.mark.parametrize("kind", EXPOSED)
def test_an_exposed_gateway_without_api_keys_is_refused_saying_what_to_set(
    kube_bin_dir: Path, kind: str, schema: list[str]
) -> None:
    for values in ([], ["--set", "gateway.service.allowUnauthenticated=false"]):
        proc = helm(
            kube_bin_dir, "template", "x", str(CHART), "--set", f"gateway.service.type={kind}",
            *values, *schema, check=False,
        )  # fmt: skip
        assert proc.returncode != 0, proc.stdout
        assert f"gateway.service.type={kind}" in proc.stderr, proc.stderr
        assert "every model of every namespace" in proc.stderr
        for setting in ("gateway.apiKeys.secretName", "gateway.service.allowUnauthenticated=true"):
            assert setting in proc.stderr, proc.stderr
    # A string is no opt-in (the schema says so; without it, only "true" opts in).
    proc = helm(
        kube_bin_dir, "template", "x", str(CHART), "--set", f"gateway.service.type={kind}",
        "--set-string", "gateway.service.allowUnauthenticated=false", *schema, check=False,
    )  # fmt: skip
    refusal = "gateway.apiKeys.secretName" if schema else "/gateway/service/allowUnauthenticated"
    assert proc.returncode != 0 and refusal in proc.stderr, proc.stderr


@pytest.mark.parametrize("kind", EXPOSED)
def test_an_exposed_gateway_with_api_keys_renders(kube_bin_dir: Path, kind: str) -> None:
    service, args = gateway(render(kube_bin_dir, "--set", f"gateway.service.type={kind}", *KEYS))
    assert service["spec"]["type"] == kind
    assert "--api-keys=/etc/vnpu/api-keys/keys.yaml" in args


@pytest.mark.parametrize("kind", EXPOSED)
def test_an_exposed_gateway_without_keys_renders_only_when_opted_in(kube_bin_dir: Path, kind: str) -> None:
    service, args = gateway(render(kube_bin_dir, "--set", f"gateway.service.type={kind}", *OPT_IN))
    assert service["spec"]["type"] == kind
    assert not [a for a in args if a.startswith("--api-keys")]


def test_a_cluster_ip_gateway_needs_no_api_keys(kube_bin_dir: Path) -> None:
    for values in ([], ["--set", "gateway.service.type=ClusterIP"]):
        service, args = gateway(render(kube_bin_dir, *values))
        assert service["spec"]["type"] == "ClusterIP"
        assert not [a for a in args if a.startswith("--api-keys")]


def test_no_gateway_no_refusal(kube_bin_dir: Path) -> None:
    docs = render(
        kube_bin_dir, "--set", "gateway.enabled=false", "--set", "gateway.service.type=LoadBalancer"
    )
    assert not [d for d in docs if d["metadata"]["name"].endswith("-gateway") and d["kind"] == "Service"]
