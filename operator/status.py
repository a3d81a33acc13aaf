"""InferenceModel status and the events worth posting, from one pass's outcome (pure).

Conditions follow the Kubernetes convention (type/status/reason/message/lastTransitionTime, the time
kept while the status does not flip): Placed, Ready, CapacityPending, Progressing, Degraded.

``Degraded`` says what is wrong in the words of whoever knows: the API server's message for a write it
refused, the scheduler's or the kubelet's for a replica or weight-holder that does not come up
(Unschedulable, CrashLoopBackOff, ...), the estimate's error while running pods are kept, a node
that is lost or inside its grace period, the operator's own when the model's Service name is taken. A
replica counts as ready only with its weight-holder ready.

Those words can be any length, so every condition and Event is cut to what the API server takes
(``MAX_MESSAGE_CHARS``, ``MAX_EVENT_MESSAGE_CHARS``): one too long has the whole status refused.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vnpu import api
from vnpu.memory import EstimateError, EstimatePending, MemoryEstimate
from vnpu.operator.packing import Unplaced
from vnpu.operator.services import REASON_NAME_TAKEN
from vnpu.operator.state import ObservedModel
from vnpu.shown import shown

if TYPE_CHECKING:
    from vnpu.operator.planner import Failure

NORMAL, WARNING = "Normal", "Warning"
#: Longest condition message written, cut past it. The CRD allows 32768 characters and the API server
#: refuses a longer one, and with it the model's whole status, pass after pass; the words that come
#: from outside (a tenant's nodeSelector the packer echoes, an API server's or a kubelet's message)
#: can be any length.
MAX_MESSAGE_CHARS = 4096
#: Longest Event message: with shown()'s "... (N characters)" within the 1 KiB kube.post_event keeps.
MAX_EVENT_MESSAGE_CHARS = 960
#: Longest condition or Event reason (a reason is a word: the API server's, the kubelet's).
MAX_REASON_CHARS = 128


@dataclass(frozen=True)
class Event:
    type: str  #: Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class PodProblem:
    """A replica or weight-holder of the model that is not coming up, and why."""

    pod: str
    role: str
    problem: str  #: "<Reason>: <message>" from the scheduler or the kubelet

    @property
    def reason(self) -> str:
        return self.problem.split(":", 1)[0].strip() or "PodNotReady"


@dataclass(frozen=True)
class Rollout:
    """A rolling update in progress: replicas of an older pod template still running."""

    desired: int
    old_replicas: int
    strategy: str
    new_ready: int = 0


@dataclass(frozen=True)
class ModelOutcome:
    estimate: MemoryEstimate | EstimateError | EstimatePending | None
    placements: Sequence[Mapping[str, Any]]
    unplaced: Sequence[Unplaced]
    ready_replicas: int
    saved_mib: int
    lost_nodes: Sequence[str] = ()
    #: NotReady nodes still inside their grace period, where replicas of the model run.
    suspect_nodes: Sequence[str] = ()
    #: Running replicas kept as they are because the model has no estimate now.
    frozen_replicas: int = 0
    problems: Sequence[PodProblem] = ()
    rollout: Rollout | None = None
    #: Defragmentation moves of its replicas started in this pass, one message each.
    moves: Sequence[str] = ()
    failure: Failure | None = None
    updated_replicas: int | None = None
    #: status.scaling (the idle clock, warm while at 0) and status.demand (the forecast's history).
    scaling: Mapping[str, Any] | None = None
    demand: Mapping[str, Any] | None = None
    #: Replicas the plan placed whose pods its writes' backoff kept from being created (placements
    #: then lists the pods that exist).
    unwritten: int = 0
    #: The URL of the model's Service once it exists (status.endpoint), else empty.
    endpoint: str = ""
    #: Why the model has no Service (its name is someone else's); empty when nothing is wrong.
    service_problem: str = ""


def _unplaced_summary(unplaced: Sequence[Unplaced]) -> list[dict[str, Any]]:
    counts = Counter(u.reason for u in unplaced)
    return [
        {"replicas": n, "reason": shown(reason, MAX_MESSAGE_CHARS)} for reason, n in sorted(counts.items())
    ]


def _degradation(outcome: ModelOutcome) -> tuple[str, str] | None:
    """(reason, message) of what degrades the model, the most pressing first; None when nothing does."""
    parts: list[tuple[str, str]] = []
    if outcome.failure is not None:
        parts.append((outcome.failure.reason, outcome.failure.message))
    if outcome.lost_nodes:
        lost = ", ".join(outcome.lost_nodes)
        if isinstance(outcome.estimate, MemoryEstimate):
            parts.append(("NodeLost", f"re-placing replicas from lost node(s): {lost}"))
        else:  # the planner places nothing without an estimate
            parts.append(
                (
                    "NodeLost",
                    f"the replicas on lost node(s) {lost} are gone: none re-placed without a memory estimate",
                )
            )
    for p in outcome.problems[:3]:
        parts.append(
            (p.reason, f"{'weight-holder' if p.role == api.ROLE_WEIGHTS else 'replica'} {p.pod}: {p.problem}")
        )
    if len(outcome.problems) > 3:
        parts.append(
            (outcome.problems[0].reason, f"and {len(outcome.problems) - 3} more pod(s) not coming up")
        )
    if outcome.service_problem:
        parts.append((REASON_NAME_TAKEN, outcome.service_problem))
    if outcome.suspect_nodes:
        nodes = ", ".join(outcome.suspect_nodes)
        parts.append(("NodeNotReady", f"node(s) {nodes} NotReady: their replicas stay for the grace period"))
    if not parts:
        return None
    return parts[0][0], "; ".join(m for _, m in parts)


def _pending_message(pending: EstimatePending) -> str:
    if pending.reading:
        return "reading the model's files to size it"
    if pending.ahead:
        return f"waiting to read the model's files: {pending.ahead} of the namespace's models first"
    return "waiting for a free worker to read the model's files"


def build_status(
    model: ObservedModel, outcome: ModelOutcome, now: dt.datetime
) -> tuple[dict[str, Any], list[Event]]:
    """The new ``status`` and the events for ``model``: the whole status, every key the operator sets
    (the planner turns it into the merge patch that also removes the keys it no longer sets)."""
    previous = {c.get("type"): c for c in model.status.get("conditions", [])}
    stamp = api.format_time(now)
    conditions: list[dict[str, Any]] = []

    def condition(type_: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
        """Adds the condition, as written (its reason and message cut to their limits)."""
        status = "True" if ok else "False"
        prev = previous.get(type_, {})
        since = prev.get("lastTransitionTime") if prev.get("status") == status else None
        conditions.append(
            {
                "type": type_,
                "status": status,
                "reason": shown(reason, MAX_REASON_CHARS),
                "message": shown(message, MAX_MESSAGE_CHARS),
                "lastTransitionTime": since or stamp,
                "observedGeneration": model.generation,
            }
        )
        return conditions[-1]

    def flipped(type_: str, status: str, reason: str | None = None) -> bool:
        prev = previous.get(type_, {})
        return prev.get("status") != status or (reason is not None and prev.get("reason") != reason)

    want = model.spec.replicas if model.spec else 0
    placed = len(outcome.placements)
    old = outcome.rollout.old_replicas if outcome.rollout else 0
    events: list[Event] = []
    status: dict[str, Any] = {
        "observedGeneration": model.generation,
        "replicas": max(placed, outcome.frozen_replicas) + old,
        "updatedReplicas": placed if outcome.updated_replicas is None else outcome.updated_replicas,
        "readyReplicas": outcome.ready_replicas,
        "selector": f"{api.LABEL_MODEL}={model.name},{api.LABEL_ROLE}={api.ROLE_REPLICA}",
        "placements": list(outcome.placements),
        "unplaced": _unplaced_summary(outcome.unplaced),
    }
    if outcome.scaling is not None:
        status["scaling"] = dict(outcome.scaling)
    if outcome.demand is not None:
        status["demand"] = dict(outcome.demand)
    if outcome.endpoint:
        status["endpoint"] = outcome.endpoint
    degraded = _degradation(outcome)

    def report_degraded() -> None:
        if degraded is None:
            condition("Degraded", False, "AsExpected", "")
            return
        reason, message = degraded
        written = condition("Degraded", True, reason, message)  # compared as written
        if (
            flipped("Degraded", "True", written["reason"])
            or previous.get("Degraded", {}).get("message") != written["message"]
        ):
            events.append(Event(WARNING, reason, message))

    if model.deleting:
        status["phase"] = "Terminating"
        condition("Placed", False, "Deleting", "the model is being deleted")
        condition("Ready", False, "Deleting", "the model is being deleted")
        condition("CapacityPending", False, "Deleting", "")
        condition("Progressing", False, "Deleting", "")
        condition("Degraded", False, "Deleting", "")
    elif isinstance(outcome.estimate, EstimatePending):
        # Its files are read away from the pass: nothing is placed without an estimate, and running
        # replicas (a spec changed) stay as they are until the new spec is sized, then roll.
        message = _pending_message(outcome.estimate)
        frozen = outcome.frozen_replicas
        ready = frozen > 0 and outcome.ready_replicas >= want
        if frozen:
            condition("Placed", True, "Estimating", f"keeping the {frozen} running replica(s) as they are")
        else:
            condition("Placed", False, "Estimating", message)
        condition("CapacityPending", False, "Estimating", "")
        condition(
            "Ready",
            ready,
            "AllReplicasReady" if ready else "ReplicasNotReady" if frozen else "Estimating",
            f"{outcome.ready_replicas}/{want} replicas ready" if frozen else message,
        )
        condition("Progressing", True, "Estimating", message)
        if flipped("Progressing", "True", "Estimating"):
            events.append(Event(NORMAL, "Estimating", message))
        report_degraded()  # whatever degrades the replicas kept (a lost node, a crash loop) is said
        if degraded is not None and degraded[0] != "NodeNotReady":
            status["phase"] = "Degraded"
        elif frozen:
            status["phase"] = "Ready" if ready else "Running"
        else:
            status["phase"] = "Pending"
    elif isinstance(outcome.estimate, EstimateError) or outcome.estimate is None:
        message = str(outcome.estimate or "no memory estimate")
        ready = outcome.frozen_replicas > 0 and outcome.ready_replicas >= want
        if outcome.frozen_replicas:
            # Running replicas stay as they are: an estimate that fails now (an unreadable source
            # during a storage hiccup, a spec the operator cannot size) is no reason to stop them.
            kept = f"keeping the {outcome.frozen_replicas} running replica(s) as they are"
            first = ("EstimateFailed", f"{message}; {kept}; retrying with backoff")
            status["phase"] = "Degraded"
            condition("Placed", True, "EstimateFailed", kept)
            condition("CapacityPending", False, "EstimateFailed", "")
        else:
            first = ("InvalidSpec", message)
            status["phase"] = "Failed"
            condition("Placed", False, "InvalidSpec", message)
            condition("CapacityPending", False, "InvalidSpec", "")
        # Whatever else degrades the model (a lost node, a crash-looping replica, a refused write)
        # is still said, after the estimate's error.
        degraded = first if degraded is None else (first[0], f"{first[1]}; {degraded[1]}")
        condition(
            "Ready",
            ready,
            "AllReplicasReady"
            if ready
            else "InvalidSpec"
            if not outcome.frozen_replicas
            else "ReplicasNotReady",
            message if not outcome.frozen_replicas else f"{outcome.ready_replicas}/{want} replicas ready",
        )
        condition("Progressing", False, degraded[0], "")
        report_degraded()
    else:
        est = outcome.estimate
        status["memory"] = {
            "weightsMiB": est.device_weights_mib,
            "perReplicaMiB": est.per_replica_mib,
            "savedBySharingMiB": outcome.saved_mib,
        }
        devices = len({(p["node"], p["device"]) for p in outcome.placements})
        nodes = len({p["node"] for p in outcome.placements})
        where = f"{placed}/{want} replicas on {devices} device(s) of {nodes} node(s)"
        if outcome.unplaced:
            first = sorted(outcome.unplaced, key=lambda u: u.replica)[0]
            message = f"{len(outcome.unplaced)} replica(s) unplaced: {first.reason}"
            condition("Placed", False, str(first.code), message)
            condition("CapacityPending", True, str(first.code), message)
            if flipped("CapacityPending", "True"):
                events.append(Event(WARNING, "CapacityPending", f"{message}; {where}"))
        elif outcome.unwritten:
            message = f"{where}: {outcome.unwritten} more not created while the model's writes back off"
            condition("Placed", False, "WritesBackingOff", message)
            condition("CapacityPending", False, "WritesBackingOff", "")
        else:
            condition("Placed", True, "AllPlaced", where)
            condition("CapacityPending", False, "AllPlaced", "")
        ready = outcome.ready_replicas >= want
        condition(
            "Ready",
            ready,
            "AllReplicasReady" if ready else "ReplicasNotReady",
            f"{outcome.ready_replicas}/{want} replicas ready",
        )
        rollout = outcome.rollout
        if rollout is not None:
            message = (
                f"{rollout.new_ready}/{want} replicas of the new pod template ready, {rollout.old_replicas} "
                f"of the old one left ({rollout.strategy})"
            )
            condition("Progressing", True, "RollingUpdate", message)
            if flipped("Progressing", "True", "RollingUpdate"):
                events.append(
                    Event(
                        NORMAL,
                        "RollingUpdate",
                        f"rolling {want} replicas to the new pod template ({rollout.strategy})",
                    )
                )
        else:
            condition(
                "Progressing",
                True,
                "RolloutComplete",
                f"{placed}/{want} replicas of the current pod template",
            )
            if previous.get("Progressing", {}).get("reason") == "RollingUpdate":
                events.append(
                    Event(NORMAL, "RolloutComplete", f"all {want} replicas run the new pod template")
                )
        report_degraded()
        events += [Event(NORMAL, "Defragmenting", message) for message in outcome.moves]
        before = sorted(p.get("pod", "") for p in model.status.get("placements", []))
        after = sorted(p["pod"] for p in outcome.placements)
        if after != before and outcome.placements:
            saved = f", {outcome.saved_mib} MiB saved by sharing weights" if outcome.saved_mib else ""
            events.append(Event(NORMAL, "Placed", f"{where}{saved}"))
        if want == 0 and not outcome.placements and degraded is None:
            status["phase"] = "Idle"  # scaled to zero (by the operator, a user or an autoscaler)
        elif ready and degraded is None:
            status["phase"] = "Ready"
        elif degraded is not None and degraded[0] != "NodeNotReady":
            status["phase"] = "Degraded"
        elif outcome.unplaced:
            status["phase"] = "CapacityPending"
        elif ready:
            status["phase"] = "Ready"
        elif placed >= want:
            status["phase"] = "Running"
        else:
            status["phase"] = "Placing"
    status["conditions"] = conditions
    events = [
        Event(e.type, shown(e.reason, MAX_REASON_CHARS), shown(e.message, MAX_EVENT_MESSAGE_CHARS))
        for e in events
    ]
    return status, events
