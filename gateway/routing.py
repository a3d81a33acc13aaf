"""Which model a request names and which replica serves it. Pure: no I/O, no clock of its own.

The gateway's view of the cluster is a :class:`RouteTable`: every served model (an InferenceModel) by
the name clients ask for, with its ready endpoints. Names are per namespace in Kubernetes but one
flat space for an OpenAI client, and a modelName may itself hold '/' (a Hugging Face id such as
``meta-llama/Llama-3.1-8B``), so a requested name cannot be split into namespace and name. Instead
its candidates are the routes the caller may call (its API key's; every route with keys off) whose
qualified name ``<namespace>/<modelName>`` or bare ``<modelName>`` equals it. One candidate is the
route; none or several is "not found", the same 404 as a missing model: never a guess between
tenants, and no caller learns another tenant's names. :meth:`RouteTable.listed` lists exactly the
names that resolve, through the same candidates.

With keys scoped per namespace (``team-a/*``: a pattern with '/' matches qualified names only, see
:mod:`.keys`), another tenant cannot make a team's names ambiguous: its models are not the team's
candidates. Without keys names are one flat space for every caller: a model another namespace names
``team-a/chat`` makes team-a's qualified name ``team-a/chat`` ambiguous (a 404) while team-a serves
``chat``, and answers to it while team-a does not (before team-a's is created, after it is deleted).
Keys are what keeps tenants apart.

Picking follows the Gateway API Inference Extension's endpoint picker, scaled down: the endpoint
with the fewest requests outstanding through this gateway, then the lowest KV-cache usage the
runtime reports, then a rotation so equal endpoints share the load.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vnpu.api import DEFAULT_PRIORITY


@dataclass(frozen=True)
class Endpoint:
    """One replica's HTTP address (from an EndpointSlice)."""

    address: str
    port: int
    pod: str = ""

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class ModelKey:
    namespace: str
    name: str  #: the InferenceModel's name


@dataclass(frozen=True)
class Route:
    """A served model as clients see it."""

    key: ModelKey
    model_name: str  #: spec.modelName: what clients ask for
    replicas: int  #: spec.replicas (0: scaled to zero; a request wakes it when it may)
    min_replicas: int = 1  #: spec.scaling.minReplicas (0 allows scale to zero)
    endpoints: tuple[Endpoint, ...] = ()  #: its ready replicas
    #: Its share group's serving weight-holders (its warm Service), used while no replica is ready.
    warm: tuple[Endpoint, ...] = ()
    holder_serves: bool = False  #: vnpu.api.holder_serves: its holders may answer it
    priority: int = DEFAULT_PRIORITY  #: spec.priority: its requests' default priority

    @property
    def qualified_name(self) -> str:
        return f"{self.key.namespace}/{self.model_name}"

    @property
    def targets(self) -> tuple[Endpoint, ...]:
        """Where its requests go: the ready replicas, else (when it may) the serving holders."""
        if self.endpoints or not self.holder_serves:
            return self.endpoints
        return self.warm


@dataclass
class RouteTable:
    """Routes by model key; rebuilt from watch events (see :mod:`.discovery`)."""

    routes: dict[ModelKey, Route] = field(default_factory=dict)

    def candidates(self, allowed: Iterable[Route] | None) -> dict[str, list[Route]]:
        """Every name among the routes in ``allowed`` (None: every route), with the routes that answer
        to it: by qualified name or by bare name. resolve and listed both read this, so they never
        disagree."""
        found: dict[str, list[Route]] = {}  # keyed by requested name
        for r in self.routes.values() if allowed is None else allowed:
            for name in (r.qualified_name, r.model_name):
                found.setdefault(name, []).append(r)
        return found

    def resolve(self, requested: str, allowed: Iterable[Route] | None) -> Route | None:
        """The route a request's ``model`` names for a caller who may call ``allowed`` (None: every
        route), or None when it names none or several (ambiguous)."""
        found = self.candidates(allowed).get(requested, [])
        return found[0] if len(found) == 1 else None

    def listed(self, allowed: Iterable[Route] | None) -> list[str]:
        """The names that resolve for a caller who may call ``allowed`` (None: every route), sorted."""
        return sorted(name for name, found in self.candidates(allowed).items() if len(found) == 1)


def pick(
    endpoints: Iterable[Endpoint],
    outstanding: Mapping[Endpoint, int],
    kv_usage: Mapping[Endpoint, float],
    *,
    turn: int = 0,
    exclude: Iterable[Endpoint] = (),
) -> Endpoint | None:
    """The endpoint to send the next request to: fewest outstanding, then least KV usage (unknown
    counts as full), then ``turn`` rotates among the rest. None when every endpoint is excluded."""
    skip = set(exclude)
    candidates = sorted({e for e in endpoints if e not in skip}, key=lambda e: (e.address, e.port))
    if not candidates:
        return None
    best = min((outstanding.get(e, 0), kv_usage.get(e, 1.0)) for e in candidates)
    tied = [e for e in candidates if (outstanding.get(e, 0), kv_usage.get(e, 1.0)) == best]
    return tied[turn % len(tied)]
