"""A Service per InferenceModel: one stable in-cluster address for the model's replicas.

The Service selects the model's replica pods only (never its weight-holders or placeholders) on their
named port ``http``, so nothing in it depends on the model's spec: the operator creates it, creates it
again when someone deletes it, and changes nothing in it but its selector, put back in place when it
differs from the one wanted (:class:`SelectorUpdate`: an operator upgrade changed what a Service
selects). Garbage collection removes it with its model (controller ownerReference), so there is
nothing to delete either.

The EndpointSlice controller copies a Service's labels onto its EndpointSlices: the gateway
(:mod:`vnpu.gateway.discovery`) finds a model's ready replicas by the ``vnpu.io/model`` label and the
port name ``http`` there.

A model whose weight-holders answer while it has no ready replica (:func:`vnpu.api.holder_serves`:
it may scale to zero and keeps its holders) has a second Service, its warm one
(:func:`vnpu.api.warm_service_name`): the same labels plus ``vnpu.io/role: weights``, selecting its share
group's weight-holders of its own weights (``vnpu.io/weights``) on the same port name: a holder answers
whatever model name it is asked, and one explicit share group may hold several models' weights. The
gateway sends a request there only while the model's own Service has no ready endpoint.

The name is deterministic (:func:`vnpu.api.service_name`), so a retry after a crash creates the very same
object. A Service of that name that this model does not control is someone else's: it is left alone,
and the model's ``Degraded`` condition says so (reason ``ServiceNameTaken``).

Pure, like :mod:`vnpu.operator.pods`: the planner decides, the reconciler writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vnpu import api
from vnpu.api import service_name, warm_service_name
from vnpu.operator.pods import (
    RUNTIME_PORT_NAME,
    ModelRef,
    holder_selector,
    owner_references,
    replica_selector,
)
from vnpu.operator.state import ObservedModel, ObservedService

#: The Service's port (what clients dial); it forwards to the replicas' named port ``http``.
SERVICE_PORT = 80
#: Why a model has no Service: the name is someone else's Service.
REASON_NAME_TAKEN = "ServiceNameTaken"


def endpoint_url(namespace: str, name: str) -> str:
    """The in-cluster URL of Service ``name``: ``http://<name>.<namespace>.svc:80``. It ends in ``.svc``,
    not ``.svc.cluster.local``: the cluster domain is a setting of each cluster (the kubelet's
    ``clusterDomain``), and every pod's DNS search path resolves ``<service>.<namespace>.svc``."""
    return f"http://{name}.{namespace}.svc:{SERVICE_PORT}"


@dataclass(frozen=True)
class ServiceIntent:
    """The Service of ``owner`` to create."""

    name: str
    owner: ModelRef
    warm: bool = False  #: the warm Service, selecting the model's share group's weight-holders

    @property
    def namespace(self) -> str:
        return self.owner.namespace

    @property
    def models(self) -> tuple[str, ...]:
        return (self.owner.key,)


@dataclass(frozen=True)
class SelectorUpdate:
    """A Service of ``owner``'s whose selector is not the one it wants (Services from before
    ``vnpu.io/weights``): patched in place, so its ClusterIP, and its EndpointSlices the gateway
    watches, stay; deleting and creating it would leave the model without that route in between."""

    namespace: str
    name: str
    selector: Mapping[str, str]
    owner: str  #: the model, "namespace/name"

    @property
    def models(self) -> tuple[str, ...]:
        return (self.owner,)


@dataclass(frozen=True)
class ServiceView:
    """Where one model's Service stands after a pass."""

    intents: tuple[ServiceIntent, ...] = ()  #: to create: the model is served and has none
    updates: tuple[SelectorUpdate, ...] = ()  #: its Services to bring to the selector they want
    endpoint: str = ""  #: its URL, once the model's own Service exists
    problem: str = ""  #: why it has none that will be created; empty when nothing is wrong


def plan_service(
    model: ObservedModel, services: Mapping[tuple[str, str], ObservedService], weights_id: str
) -> ServiceView:
    """The Services ``model`` needs, from the Services observed (keyed by (namespace, name)); its warm
    one selects the holders of ``weights_id`` (:func:`vnpu.sharing.weights_id`). A served model (spec
    parsed, not being deleted) without its own gets an intent, and without its warm one while its
    holders serve; one of its own selecting otherwise gets a :class:`SelectorUpdate`; a name taken by
    a Service the model does not control is a problem instead, and that Service is never touched. A
    warm Service the model no longer needs stays: the gateway routes there only while
    :func:`vnpu.api.holder_serves` says so."""
    view = _plan_one(model, services, service_name(model.name), weights_id, warm=False)
    if model.spec is None or not model.spec.holder_serves:
        return view
    warm = _plan_one(model, services, warm_service_name(model.name), weights_id, warm=True)
    return ServiceView(
        intents=view.intents + warm.intents,
        updates=view.updates + warm.updates,
        endpoint=view.endpoint,
        problem="; ".join(p for p in (view.problem, warm.problem) if p),
    )


def _plan_one(
    model: ObservedModel,
    services: Mapping[tuple[str, str], ObservedService],
    name: str,
    weights_id: str,
    *,
    warm: bool,
) -> ServiceView:
    found = services.get((model.namespace, name))
    if found is not None and found.controller_uid == model.uid:
        there = not (found.terminating or found.pending)
        updates: tuple[SelectorUpdate, ...] = ()
        if there and model.spec is not None and not model.deleting and found.selector is not None:
            wanted = selector(model.name, model.spec.share_group, weights_id, warm=warm)
            if dict(found.selector) != wanted:
                updates = (SelectorUpdate(model.namespace, name, wanted, f"{model.namespace}/{model.name}"),)
        return ServiceView(updates=updates, endpoint=endpoint_url(model.namespace, name) if there else "")
    if found is not None:
        what = (
            "no warm Service (a request at zero replicas waits for one)"
            if warm
            else "no Service (the gateway cannot route to it)"
        )
        return ServiceView(
            problem=(
                f"Service {name} exists in {model.namespace} and is not this model's: it is left as it is, "
                f"and the model has {what} until that one is renamed or deleted"
            )
        )
    if model.spec is None or model.deleting:
        return ServiceView()
    ref = ModelRef(model.name, model.namespace, model.uid, model.spec, weights_id)
    return ServiceView(intents=(ServiceIntent(name, ref, warm=warm),))


def selector(model: str, share_group: str, weights_id: str, *, warm: bool) -> dict[str, str]:
    """The selector of ``model``'s Service: its replicas, or (the warm one) its share group's holders
    of its weights."""
    return holder_selector(share_group, weights_id) if warm else replica_selector(model)


def render_service(intent: ServiceIntent) -> dict[str, Any]:
    """The manifest of ``intent``: a ClusterIP Service on port 80 in front of the model's replicas (or,
    the warm one, its share group's weight-holders of its weights)."""
    model = intent.owner
    labels = {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE, api.LABEL_MODEL: model.name}
    if intent.warm:
        labels[api.LABEL_ROLE] = api.ROLE_WEIGHTS
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": intent.name,
            "namespace": model.namespace,
            # Copied onto its EndpointSlices, where the gateway looks for vnpu.io/model.
            "labels": labels,
            "ownerReferences": owner_references([model]),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector(model.name, model.share_group, model.weights_id, warm=intent.warm),
            "ports": [
                {
                    "name": RUNTIME_PORT_NAME,
                    "protocol": "TCP",
                    "port": SERVICE_PORT,
                    "targetPort": RUNTIME_PORT_NAME,
                }
            ],
        },
    }
