"""Statuses as the API server ends up holding them, pass after pass: what the planner compares is what
its merge patch leaves there, so a settled model gets no status write."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from test_planner import as_pods, model, node, run, step
from test_scaling import idle_model

from vnpu.memory import EstimateError
from vnpu.operator.reported import merge_patch


def passes(
    m: Any, nodes: list[Any], pods: list[Any], server: dict[str, Any], count: int, **kwargs: Any
) -> tuple[list[bool], dict[str, Any], list[Any]]:
    """``count`` passes over ``m`` with the server's status, each changed status merge-patched there as
    the API server does: whether each pass wrote the status, the server's status, the pods."""
    changed = []
    for _ in range(count):
        result = run([replace(m, status=server)], nodes, pods, **kwargs)
        pods = step(pods, result)
        (update,) = result.statuses
        if update.changed:
            server = merge_patch(server, update.status)
        changed.append(update.changed)
    return changed, server, pods


def test_a_woken_model_loses_scaling_warm_and_then_gets_no_status_write() -> None:
    """``scaling.warm`` is set at zero replicas only: once the model wakes the patch removes it (null),
    so the server's status is the planned one and the following passes write nothing."""
    nodes = [node("n1")]
    pods = as_pods(run([idle_model(replicas=1)], nodes).create)
    at_zero = idle_model(replicas=0)
    _, server, pods = passes(at_zero, nodes, pods, {}, 3)
    assert server["scaling"]["warm"] is True  # its holder stays: keepWarm Always
    woken = replace(idle_model(replicas=1), generation=2)
    changed, server, pods = passes(woken, nodes, pods, server, 6)
    assert "warm" not in server["scaling"]
    assert changed[-3:] == [False, False, False], changed  # settled: no patch on every pass


def test_a_model_whose_estimate_fails_loses_its_memory_and_then_gets_no_status_write() -> None:
    """A frozen model (running replicas kept, no estimate) has no ``memory``, ``scaling`` or ``demand``:
    one patch removes them, then nothing changes on the server and nothing is written."""
    m = model("a", 1)
    nodes = [node("n1")]
    _, server, pods = passes(m, nodes, [], {}, 4)
    assert {"memory", "scaling", "demand"} <= set(server)
    failing = {m.key: EstimateError("source unreadable")}
    changed, server, pods = passes(m, nodes, pods, server, 4, estimates=failing)
    assert not {"memory", "scaling", "demand"} & set(server)
    assert server["phase"] == "Degraded"
    assert changed == [True, False, False, False]
