"""Whose running replicas a model's ``spec.priority`` may evict (the operator's ``--preemption``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_planner import CONFIG, as_pods, estimate, model, node, run


def full_device_then_urgent(ns: str, preemption: str) -> list[str]:
    """team-b's running model fills the device; a priority-1000 model of ``ns`` that fits nowhere
    arrives. The pods of running replicas the pass deletes, by whose they are ("namespace/name")."""
    config = replace(CONFIG, preemption=preemption)
    nodes = [node("n1", devices=1)]  # 16 slices
    low = model("low", 1, ns="team-b", priority=-1000, source={"uri": "file:///models/low.gguf"})
    urgent = model("urgent", 1, ns=ns, priority=1000, source={"uri": "file:///models/urgent.gguf"})
    est = {low.key: estimate(4096, 8192), urgent.key: estimate(4096, 8192)}  # 4 + 8 slices each
    pods = as_pods(run([low], nodes, estimates={low.key: est[low.key]}, config=config).create)
    result = run([low, urgent], nodes, pods, estimates=est, config=config)
    return sorted({m for d in result.delete if d.role == "replica" for m in d.models})


@pytest.mark.parametrize("preemption", ["namespace", "never"])
def test_a_priority_never_evicts_another_namespaces_running_replicas(preemption: str) -> None:
    assert full_device_then_urgent("team-a", preemption) == []


def test_within_a_namespace_a_higher_priority_evicts_a_lower_one() -> None:
    assert full_device_then_urgent("team-b", "namespace") == ["team-b/low"]
    assert full_device_then_urgent("team-b", "never") == []


def test_preemption_across_namespaces_is_the_cluster_admins_choice() -> None:
    assert full_device_then_urgent("team-a", "cluster") == ["team-b/low"]


def test_the_command_line_sets_the_scope_and_defaults_to_the_namespace() -> None:
    from vnpu.operator.main import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args([])).preemption == "namespace"
    assert config_from_args(build_parser().parse_args(["--preemption", "cluster"])).preemption == "cluster"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--preemption", "anyone"])
