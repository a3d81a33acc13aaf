"""InferenceModel status and the events worth posting, from one pass's outcome (pure).

Conditions follow the Kubernetes convention (type/status/reason/message/lastTransitionTime, the time
kept while the status does not flip): Placed, Ready, CapacityPending, Degraded.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vnpu import api
from vnpu.memory import EstimateError, MemoryEstimate
from vnpu.operator.packing import Unplaced
from vnpu.operator.state import ObservedModel

NORMAL, WARNING = "Normal", "Warning"


@dataclass(frozen=True)
class ModelOutcome:
    estimate: MemoryEstimate | EstimateError | None
    placements: Sequence[Mapping[str, Any]]
    unplaced: Sequence[Unplaced]
    ready_replicas: int
    saved_mib: int
    lost_nodes: Sequence[str] = ()


def _unplaced_summary(unplaced: Sequence[Unplaced]) -> list[dict[str, Any]]:
    counts = Counter(u.reason for u in unplaced)
    return [{"replicas": n, "reason": reason} for reason, n in sorted(counts.items())]


def build_status(
    model: ObservedModel, outcome: ModelOutcome, now: dt.datetime
) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """The new ``status`` and events ``(type, reason, message)`` for ``model``."""
    previous = {c.get("type"): c for c in model.status.get("conditions", [])}
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions: list[dict[str, Any]] = []

    def condition(type_: str, ok: bool, reason: str, message: str) -> None:
        status = "True" if ok else "False"
        prev = previous.get(type_, {})
        since = prev.get("lastTransitionTime") if prev.get("status") == status else None
        conditions.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since or stamp,
                "observedGeneration": model.generation,
            }
        )

    def flipped(type_: str, status: str) -> bool:
        return previous.get(type_, {}).get("status") != status

    want = int(model.spec.get("replicas", 1))
    placed = len(outcome.placements)
    events: list[tuple[str, str, str]] = []
    status: dict[str, Any] = {
        "observedGeneration": model.generation,
        "replicas": placed,
        "readyReplicas": outcome.ready_replicas,
        "selector": f"{api.LABEL_MODEL}={model.name},{api.LABEL_ROLE}={api.ROLE_REPLICA}",
        "placements": list(outcome.placements),
        "unplaced": _unplaced_summary(outcome.unplaced),
    }

    if model.deleting:
        status["phase"] = "Terminating"
        condition("Placed", False, "Deleting", "the model is being deleted")
        condition("Ready", False, "Deleting", "the model is being deleted")
        condition("CapacityPending", False, "Deleting", "")
        condition("Degraded", False, "Deleting", "")
    elif isinstance(outcome.estimate, EstimateError) or outcome.estimate is None:
        message = str(outcome.estimate or "no memory estimate")
        status["phase"] = "Failed"
        condition("Placed", False, "InvalidSpec", message)
        condition("Ready", False, "InvalidSpec", message)
        condition("CapacityPending", False, "InvalidSpec", "")
        condition("Degraded", True, "InvalidSpec", message)
        if flipped("Degraded", "True") or previous.get("Degraded", {}).get("message") != message:
            events.append((WARNING, "InvalidSpec", message))
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
                events.append((WARNING, "CapacityPending", f"{message}; {where}"))
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
        if outcome.lost_nodes:
            lost = ", ".join(outcome.lost_nodes)
            condition("Degraded", True, "NodeLost", f"re-placing replicas from lost node(s): {lost}")
            if flipped("Degraded", "True"):
                events.append((WARNING, "NodeLost", f"re-placing replicas from lost node(s): {lost}"))
        else:
            condition("Degraded", False, "AsExpected", "")
        before = sorted(p.get("pod", "") for p in model.status.get("placements", []))
        after = sorted(p["pod"] for p in outcome.placements)
        if after != before and outcome.placements:
            saved = f", {outcome.saved_mib} MiB saved by sharing weights" if outcome.saved_mib else ""
            events.append((NORMAL, "Placed", f"{where}{saved}"))
        if ready:
            status["phase"] = "Ready"
        elif outcome.unplaced:
            status["phase"] = "CapacityPending"
        elif placed >= want:
            status["phase"] = "Running"
        else:
            status["phase"] = "Placing"
    status["conditions"] = conditions
    return status, events
