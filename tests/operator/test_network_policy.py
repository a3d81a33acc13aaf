"""The NetworkPolicy the operator keeps per namespace (``--network-policy``): its shape, its peers
as given on the command line, and which namespaces a pass asks for."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace

import pytest
from test_planner import CONFIG, NOW, model, node, run

from vnpu import api
from vnpu.operator import network_policy
from vnpu.operator.main import build_parser
from vnpu.operator.planner import Failure

ON = replace(CONFIG, network_policy=True)


def test_a_pass_asks_for_one_policy_per_namespace_with_models_only_when_on() -> None:
    models = [model("a", 1, ns="team-a"), model("b", 1, ns="team-a"), model("c", 1, ns="team-b")]
    nodes = [node("n1")]
    assert run(models, nodes).network_policies == []
    assert run(models, nodes, config=ON).network_policies == [
        network_policy.NetworkPolicyIntent("team-a", ("team-a/a", "team-a/b")),
        network_policy.NetworkPolicyIntent("team-b", ("team-b/c",)),
    ]
    deleting = replace(models[2], deleting=True)
    assert [i.namespace for i in run([*models[:2], deleting], nodes, config=ON).network_policies] == [
        "team-a"
    ]


def test_a_model_in_backoff_does_not_retry_its_namespaces_policy_before_its_backoff_ends() -> None:
    """Else a refused policy, retried every pass, would double the backoff every pass."""
    models = [model("a", 1, ns="team-a")]
    waiting = {"team-a/a": Failure("refused", NOW + dt.timedelta(seconds=30), 1, "Forbidden", "uid-a")}
    assert run(models, [node("n1")], config=ON, failures=waiting).network_policies == []
    over = {"team-a/a": replace(waiting["team-a/a"], retry_at=NOW - dt.timedelta(seconds=1))}
    assert len(run(models, [node("n1")], config=ON, failures=over).network_policies) == 1


def test_the_policy_takes_every_pod_the_operator_makes_and_lets_in_its_namespace_and_the_peers() -> None:
    gateway = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vnpu-system"}}}
    manifest = network_policy.manifest("team-a", [gateway])
    assert manifest["metadata"] == {
        "name": "vnpu-model-pods",
        "namespace": "team-a",
        "labels": {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE},
    }
    assert manifest["spec"] == {
        "podSelector": {"matchLabels": {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {}}, gateway]}],
    }
    # Every pod the planner makes carries the label the policy selects by.
    result = run([model("a", 2)], [node("n1")])
    assert result.create and all(
        p["metadata"]["labels"][api.LABEL_MANAGED_BY] == api.MANAGED_BY_VALUE for p in result.create
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not JSON"),
        ("[]", "is a JSON object"),
        ("{}", "is a JSON object"),
        ('{"ports": [{"port": 80}]}', "unknown NetworkPolicyPeer fields ['ports']"),
        ('{"podSelector": "app=x"}', "each NetworkPolicyPeer field is an object"),
    ],
)
def test_a_peer_that_is_not_a_network_policy_peer_is_refused_at_the_start(text, message, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--network-policy-from", text])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        # An empty selector selects all: namespaceSelector {} is every namespace (absent, it would be
        # the policy's own), so it stays; an empty matchLabels inside it means nothing and goes.
        ({"namespaceSelector": {"matchLabels": {}}}, {"namespaceSelector": {}}),
        (
            {"podSelector": {}, "namespaceSelector": {"matchExpressions": []}},
            {"podSelector": {}, "namespaceSelector": {}},
        ),
        ({"ipBlock": {"cidr": "10.0.0.0/8", "except": []}}, {"ipBlock": {"cidr": "10.0.0.0/8"}}),
        (
            {
                "podSelector": {
                    "matchLabels": {"app": ""},
                    "matchExpressions": [{"key": "a", "operator": "Exists", "values": []}],
                }
            },
            {
                "podSelector": {
                    "matchLabels": {"app": ""},
                    "matchExpressions": [{"key": "a", "operator": "Exists"}],
                }
            },
        ),
    ],
)
def test_a_peer_is_spelled_as_the_api_server_stores_it_without_changing_what_it_selects(
    given, stored
) -> None:
    """The server drops empty fields; spelled with them, the policy never compared equal to what it
    stored and was rewritten every resync."""
    assert network_policy.parse_peer(json.dumps(given)) == stored
    assert network_policy.parse_peer(json.dumps(stored)) == stored


def test_a_policy_compares_equal_to_what_the_server_stored_and_unequal_to_an_edit() -> None:
    ours = network_policy.manifest("team-a", [{"namespaceSelector": {"matchLabels": {}}}])["spec"]
    stored = {
        "podSelector": {"matchLabels": {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {}}, {"namespaceSelector": {}}]}],
    }
    assert network_policy.canonical(ours) == network_policy.canonical(stored)
    # Every pod of the namespace is not every pod of every namespace; a rule {} lets everyone in.
    swapped = {**stored, "ingress": [{"from": [{"namespaceSelector": {}}, {"namespaceSelector": {}}]}]}
    assert network_policy.canonical(swapped) != network_policy.canonical(stored)
    everyone = {**stored, "ingress": [{}]}
    assert network_policy.canonical(everyone) == everyone != network_policy.canonical(stored)
    assert network_policy.canonical({**stored, "ingress": [{"from": []}]}) == everyone
