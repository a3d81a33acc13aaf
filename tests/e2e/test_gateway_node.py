"""The gateway on the real node (issue 13): one OpenAI endpoint for every model, through the chart's
gateway Service, with the official ``openai`` client.

Two models in one namespace; the gateway (deployed by the chart with its defaults) finds their ready
replicas through the EndpointSlices of the Services the operator creates per model. This node runs no
kube-proxy, so the client reaches the gateway Service at the address its own EndpointSlice lists
(what kube-proxy would forward the ClusterIP to).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from e2e_helpers import is_ready, kget
from test_tenancy import (
    apply_models,
    live_pods,
    models_dir,  # noqa: F401 (a fixture)
    namespace_with_models,
    pid_of,
    tiny,
    wait_models_ready,
)

from vnpu import api
from vnpu.cluster.helm import RELEASE, RELEASE_NAMESPACE
from vnpu.cluster.processes import wait_until

NS = "gateway-e2e"


@pytest.fixture(scope="module")
def cluster(installed: Any, models_dir: Path) -> Any:  # noqa: F811
    installed.cp.kubectl("delete", "infm", "--all", "-A", "--timeout=120s", check=False)
    return installed


def gateway_url(cluster: Any) -> str:
    """The gateway Service's ready endpoint, from its EndpointSlice."""
    selector = f"kubernetes.io/service-name={RELEASE}-gateway"

    def ready_address() -> str | None:
        for s in kget(cluster, "endpointslices", "-n", RELEASE_NAMESPACE, "-l", selector)["items"]:
            port = next((p["port"] for p in s.get("ports") or [] if p.get("name") == "http"), None)
            for e in s.get("endpoints") or []:
                if port and (e.get("conditions") or {}).get("ready"):
                    return f"http://{e['addresses'][0]}:{port}/v1"
        return None

    wait_until(lambda: ready_address() is not None, 120, "the gateway Service has a ready endpoint")
    url = ready_address()
    assert url
    return url


@pytest.fixture(scope="module")
def served(cluster: Any, models_dir: Path) -> Iterator[Any]:  # noqa: F811
    namespace_with_models(cluster, NS, models_dir)
    apply_models(
        cluster,
        NS,
        {
            "alpha": tiny("tiny-v1", replicas=2, modelName="alpha", shareGroup="alpha"),
            "beta": tiny(
                "tiny-v2",
                replicas=1,
                modelName="beta",
                shareGroup="beta",
                scaling={"minReplicas": 0, "idleSeconds": 3600, "keepWarm": "Always"},
            ),
        },
    )
    wait_models_ready(cluster, NS, ["alpha", "beta"])
    client = openai.OpenAI(base_url=gateway_url(cluster), api_key="unused", max_retries=0, timeout=180)
    # The gateway sees the replicas once their Services' EndpointSlices list them ready.
    wait_until(lambda: _answers(client, "alpha") and _answers(client, "beta"), 120, "both models routed")
    yield client
    cluster.cp.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def _answers(client: Any, model: str) -> bool:
    try:
        return bool(client.completions.create(model=model, prompt="hi", max_tokens=1, temperature=0).choices)
    except openai.APIError:
        return False


def test_two_models_answer_through_one_gateway_by_name(served: Any) -> None:
    listed = {m.id for m in served.models.list().data}
    assert {"alpha", "beta"} <= listed
    for name in ("alpha", "beta"):
        answer = served.completions.create(model=name, prompt="hello", max_tokens=4, temperature=0)
        assert answer.model == name and answer.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError) as err:
        served.completions.create(model="no-such-model", prompt="hello", max_tokens=1)
    assert "alpha" not in str(err.value) and "beta" not in str(err.value)  # names nothing else


def test_streaming_passes_through_chunk_by_chunk(served: Any) -> None:
    chunks = list(
        served.completions.create(model="alpha", prompt="one two", max_tokens=6, temperature=0, stream=True)
    )
    assert len(chunks) >= 2
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = served.completions.create(model="alpha", prompt="one two", max_tokens=6, temperature=0)
    assert streamed == whole.choices[0].text


def test_a_killed_replica_is_routed_around(cluster: Any, served: Any) -> None:
    replicas = [
        p
        for p in live_pods(cluster, NS, api.ROLE_REPLICA)
        if p["metadata"]["labels"][api.LABEL_MODEL] == "alpha"
    ]
    assert len(replicas) == 2
    victim = replicas[0]
    os.kill(
        pid_of(cluster, victim), signal.SIGKILL
    )  # before any probe notices: the endpoint still looks ready
    for _ in range(6):
        answer = served.completions.create(model="alpha", prompt="hello", max_tokens=2, temperature=0)
        assert answer.choices
    # The kubelet restarts it; the model serves with both again.
    wait_models_ready(cluster, NS, ["alpha"])


def test_a_model_at_zero_with_keep_warm_always_answers_its_next_request(cluster: Any, served: Any) -> None:
    (holder,) = [
        p
        for p in live_pods(cluster, NS, api.ROLE_WEIGHTS)
        if p["metadata"]["labels"][api.LABEL_SHARE_GROUP] == "beta"
    ]
    cluster.cp.kubectl("scale", "-n", NS, "infm/beta", "--replicas=0")
    wait_until(
        lambda: kget(cluster, "infm", "beta", "-n", NS).get("status", {}).get("phase") == "Idle",
        60,
        "beta Idle",
    )
    wait_until(
        lambda: (
            not [
                p
                for p in live_pods(cluster, NS, api.ROLE_REPLICA)
                if p["metadata"]["labels"][api.LABEL_MODEL] == "beta"
            ]
        ),
        60,
        "beta's replica gone",
    )
    started = time.monotonic()
    raw = served.completions.with_raw_response.create(
        model="beta", prompt="hello", max_tokens=2, temperature=0
    )
    woke_s = time.monotonic() - started
    answer = raw.parse()
    assert answer.model == "beta" and answer.choices
    # No replica was ready: the warm holder itself answered (minReplicas 0 with keepWarm), at once.
    assert raw.headers["x-vnpu-replica"] == holder["metadata"]["name"]
    # The gateway woke it: its scale PATCH runs beside the answer, and may land just after it.
    wait_until(lambda: kget(cluster, "infm", "beta", "-n", NS)["spec"]["replicas"] == 1, 30, "woken")

    def beta_replicas() -> list[dict[str, Any]]:
        return [
            p
            for p in live_pods(cluster, NS, api.ROLE_REPLICA)
            if p["metadata"]["labels"][api.LABEL_MODEL] == "beta" and is_ready(p)
        ]

    wait_until(lambda: len(beta_replicas()) == 1, 180, "beta's replica back and Ready")
    (replica,) = beta_replicas()
    # Once it is, the replica takes the traffic.
    wait_until(
        lambda: (
            served.completions.with_raw_response.create(model="beta", prompt="hi", max_tokens=1).headers[
                "x-vnpu-replica"
            ]
            == replica["metadata"]["name"]
        ),
        60,
        "the replica answering",
    )
    (still,) = [
        p
        for p in live_pods(cluster, NS, api.ROLE_WEIGHTS)
        if p["metadata"]["labels"][api.LABEL_SHARE_GROUP] == "beta"
    ]
    assert still["metadata"]["uid"] == holder["metadata"]["uid"] and is_ready(still)
    assert replica["metadata"]["annotations"]["vnpu.io/weight-holder"] == holder["metadata"]["name"]
    print(f"warm wake through the gateway: {woke_s:.1f}s")
