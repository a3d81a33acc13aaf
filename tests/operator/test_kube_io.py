"""The operator's API calls over a real socket (a stub server on 127.0.0.1): none can block for good."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from apiserver_stub import ApiServerStub
from kubernetes.client.exceptions import ApiException
from test_planner import model

from vnpu import api
from vnpu.kubeclient import api_client_from_env
from vnpu.operator import disruption, network_policy
from vnpu.operator import kube as kube_module
from vnpu.operator.kube import Kube
from vnpu.operator.pods import ROLE_SHARE_KEY


@pytest.fixture
def stub() -> Iterator[ApiServerStub]:
    server = ApiServerStub()
    yield server
    server.close()


def pod(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "ns", "name": name}}


def every_call(kube: Kube) -> dict[str, Callable[[], Any]]:
    m = model("a", 1)
    return {
        "list_secrets": kube.list_secrets,
        "find_service": lambda: kube.find_service("ns", "vnpu-a"),
        "find_secret": lambda: kube.find_secret("ns", "s"),
        "find_pod": lambda: kube.find_pod("ns", "p"),
        "create_service": lambda: kube.create_service({"metadata": {"namespace": "ns", "name": "vnpu-a"}}),
        "create_pod": lambda: kube.create_pod(pod("p")),
        "create_secret": lambda: kube.create_secret({"metadata": {"namespace": "ns", "name": "s"}}),
        "delete_secret": lambda: kube.delete_secret("ns", "s", "uid-s"),
        "set_secret_owners": lambda: kube.set_secret_owners("ns", "s", []),
        "delete_pod": lambda: kube.delete_pod("ns", "p"),
        "set_pod_owners": lambda: kube.set_pod_owners("ns", "p", []),
        "set_pod_labels": lambda: kube.set_pod_labels("ns", "p", {"a": "b"}),
        "set_service_selector": lambda: kube.set_service_selector("ns", "vnpu-a", {"a": "b"}),
        "patch_model_status": lambda: kube.patch_model_status(m, {"phase": "Running"}),
        "scale_model": lambda: kube.scale_model("ns", "a", 0, "1"),
        "placeholder_priority_class_missing": kube.placeholder_priority_class_missing,
        "post_event": lambda: kube.post_event(m, "Normal", "Test", "a test"),
        "count_event": lambda: kube.count_event("ns", "a.1", 2),
        "keep_network_policy": lambda: kube.keep_network_policy(network_policy.manifest("ns", [])),
        "create_budget": lambda: kube.create_budget(disruption.manifest(disruption.BudgetIntent(m))),
        "find_budget": lambda: kube.find_budget("ns", "vnpu-a"),
        "set_budget_spec": lambda: kube.set_budget_spec("ns", "vnpu-a", disruption.spec("a")),
    }


def test_every_call_has_a_case_here() -> None:
    public = {n for n in vars(Kube) if not n.startswith("_") and callable(getattr(Kube, n))}
    assert public == set(every_call(Kube.__new__(Kube)))


def test_no_call_blocks_on_a_server_that_never_answers(
    stub: ApiServerStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube_module, "REQUEST_TIMEOUT", (1.0, 0.2))
    kube = Kube(stub.api_client(retries=0))
    stub.hang.set()  # every request is read and never answered: a half-open connection
    outcomes: dict[str, BaseException | None] = {}

    def call(name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            outcomes[name] = None
        except BaseException as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=call, args=item, daemon=True) for item in every_call(kube).items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)  # a call without a timeout would still be blocked here
    assert set(outcomes) == set(every_call(kube))
    assert {
        n: type(e).__name__ for n, e in outcomes.items() if not isinstance(e, urllib3.exceptions.HTTPError)
    } == {}
    # Every call reached the server (it hung there, not elsewhere). The stub's handler threads record a
    # request when they get to it, which on a loaded machine can be after the client gave up.
    deadline = time.monotonic() + 20
    while len(stub.requests) < len(outcomes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(stub.requests) == len(outcomes)


def test_the_client_from_the_environment_keeps_connections_alive(
    stub: ApiServerStub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: '{stub.url}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    api_client = api_client_from_env()
    assert api_client.configuration.host == stub.url
    options = api_client.rest_client.pool_manager.connection_pool_kw["socket_options"]
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in options
    assert Kube(api_client).create_pod(pod("p"))


def test_calls_reuse_one_connection(stub: ApiServerStub) -> None:
    kube = Kube(stub.api_client())
    calls = every_call(kube)
    for _ in range(3):
        for call in calls.values():
            call()
    # (keep_network_policy reads the policy, then puts back the spec the stub's empty object lacks.)
    assert len(stub.requests) == 3 * (len(calls) + 1)
    assert len(stub.client_ports) == 1  # sequential calls: one keep-alive connection, never a new one


def test_a_services_selector_is_replaced_whole_and_a_pods_labels_added_to(stub: ApiServerStub) -> None:
    """The selector by a JSON patch (a merge patch would keep a key the wanted selector lacks); labels by
    a merge patch of the labels alone (the pod's others stay)."""
    kube = Kube(stub.api_client(retries=0))
    kube.set_service_selector("ns", "vnpu-a-warm", {"a": "b"})
    kube.set_pod_labels("ns", "p", {"vnpu.io/weights": "abc"})
    assert stub.writes == [
        (
            "PATCH",
            "/api/v1/namespaces/ns/services/vnpu-a-warm",
            [{"op": "add", "path": "/spec/selector", "value": {"a": "b"}}],
        ),
        ("PATCH", "/api/v1/namespaces/ns/pods/p", {"metadata": {"labels": {"vnpu.io/weights": "abc"}}}),
    ]


def test_a_name_held_by_someone_elses_object_is_found_and_told_apart_from_ours(stub: ApiServerStub) -> None:
    """After AlreadyExists the operator looks the name up (a list by name: its RBAC grants list): a
    Secret as metadata only (its data never reaches the operator), ours only when labelled as the key
    Secret; a pod ours only when labelled as the operator's."""
    labels = {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE, api.LABEL_ROLE: ROLE_SHARE_KEY}
    stub.lists["secrets"] = [
        {"metadata": {"namespace": "ns", "name": "s", "uid": "u", "labels": {api.LABEL_SHARE_GROUP: "g"}}}
    ]
    stub.lists["pods"] = [{"metadata": {"namespace": "ns", "name": "p", "uid": "u"}}]
    kube = Kube(stub.api_client(retries=0))
    theirs = kube.find_secret("ns", "s")
    assert theirs is not None and theirs.uid == "u" and theirs.share_group == ""
    stub.lists["secrets"][0]["metadata"]["labels"].update(labels)
    ours = kube.find_secret("ns", "s")
    assert ours is not None and ours.share_group == "g"
    pod = kube.find_pod("ns", "p")
    assert pod is not None and not pod.managed
    stub.lists["pods"][0]["metadata"]["labels"] = {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE}
    assert kube.find_pod("ns", "p").managed  # type: ignore[union-attr]
    secret_gets = [(m, p) for m, p, _ in stub.requests if "/secrets" in p]
    assert secret_gets and all(m == "GET" and "fieldSelector=metadata.name%3Ds" in p for m, p in secret_gets)


def test_a_key_secret_is_deleted_only_while_it_is_the_one_seen(stub: ApiServerStub) -> None:
    """A uid precondition: a Secret made again since (a new leader's) is another one, and stays; the
    API server's 409 for it is no error."""
    kube = Kube(stub.api_client(retries=0))
    assert kube.delete_secret("ns", "s", "uid-s")
    method, path, body = stub.writes[-1]
    assert (method, path) == ("DELETE", "/api/v1/namespaces/ns/secrets/s")
    assert body["preconditions"] == {"uid": "uid-s"}

    class Conflict:
        def delete_namespaced_secret(self, *args: Any, **kwargs: Any) -> None:
            raise ApiException(status=409, reason="Conflict")

    kube.core = Conflict()  # type: ignore[assignment]
    assert kube.delete_secret("ns", "s", "uid-s") is False
