"""One NetworkPolicy per namespace with models (``--network-policy``): who may reach model pods.

Replicas and serving weight-holders answer HTTP without authentication; the gateway's API keys
(:mod:`vnpu.gateway.keys`) decide who may call which model, but only for traffic that goes through the
gateway. With this policy a model pod takes traffic only from pods of its own namespace (the tenant's
own clients) and from the peers the operator is given (the chart passes the gateway's pods, and any
``operator.networkPolicy.from`` entries, e.g. a monitoring namespace). Egress is left alone: replicas
may fetch weights. Kubelet probes come from the node, which the common CNIs (Calico, Cilium) let
through. Enforcement is the CNI's: on one that ignores NetworkPolicy the object changes nothing.

The policy is written before any pod of the namespace in a pass, and a namespace whose policy the API
server refuses gets no new pods (fail closed): its models are Degraded with the server's message and
back off, while every other namespace goes on. It is kept as the operator wants it (re-created when
deleted, put back when edited) at least every resync, and left in place when the namespace's last
model goes (it then selects no pod); ``docs/upgrade-and-uninstall.md`` says how to remove it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vnpu import api

NAME = "vnpu-model-pods"
#: The fields of a NetworkPolicyPeer (networking.k8s.io/v1).
PEER_FIELDS = frozenset({"podSelector", "namespaceSelector", "ipBlock"})
#: Fields whose empty object means something, which the API server keeps: an empty selector selects
#: all (``podSelector: {}`` every pod, ``namespaceSelector: {}`` every namespace, where an absent one
#: means the policy's own namespace). The spec's own ``podSelector`` is one too.
KEPT_WHEN_EMPTY = PEER_FIELDS


@dataclass(frozen=True)
class NetworkPolicyIntent:
    """The policy a namespace needs, and the models ("namespace/name") that fail if it is refused."""

    namespace: str
    models: tuple[str, ...]


def parse_peer(text: str) -> dict[str, Any]:
    """A NetworkPolicyPeer given as JSON on the command line, checked for shape (the API server checks
    the selectors themselves when the policy is written)."""
    try:
        peer = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(peer, dict) or not peer:
        raise ValueError('a NetworkPolicyPeer is a JSON object, e.g. {"namespaceSelector": {...}}')
    unknown = sorted(set(peer) - PEER_FIELDS)
    if unknown:
        raise ValueError(f"unknown NetworkPolicyPeer fields {unknown} (allowed: {sorted(PEER_FIELDS)})")
    if not all(isinstance(v, dict) for v in peer.values()):
        raise ValueError("each NetworkPolicyPeer field is an object")
    return canonical(peer)


def canonical(value: Any) -> Any:
    """``value`` (a NetworkPolicy spec or a part of it) as the API server returns it: a field holding
    null, an empty list or an empty map is dropped (``matchLabels: {}``, ``except: []``,
    ``values: []``: the same meaning as absent), except an empty map in :data:`KEPT_WHEN_EMPTY`; items
    of a list all stay (an ingress rule ``{}`` lets everyone in). Spelled otherwise, a policy would
    never compare equal to what the server stored, and be rewritten every resync."""
    if isinstance(value, Mapping):
        kept = {k: canonical(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in kept.items() if (k in KEPT_WHEN_EMPTY and v == {}) or v not in ({}, [])}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def intents(namespaces_models: Mapping[str, Sequence[str]]) -> list[NetworkPolicyIntent]:
    """One intent per namespace, in a stable order."""
    return [NetworkPolicyIntent(ns, tuple(sorted(ms))) for ns, ms in sorted(namespaces_models.items())]


def manifest(namespace: str, peers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The policy: every pod the operator manages in ``namespace`` (replicas, weight-holders,
    placeholders) takes ingress only from its namespace's pods and from ``peers``."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": NAME,
            "namespace": namespace,
            "labels": {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE},
        },
        "spec": {
            "podSelector": {"matchLabels": {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {}}, *(dict(p) for p in peers)]}],
        },
    }
