"""A PodDisruptionBudget per InferenceModel against the real API server, disruption controller, scheduler
and kwok nodes: a node drain takes a model's replicas one at a time.

The disruption controller (kube-controller-manager, under its own service account as in a real cluster)
counts the pods a budget selects against its integer minAvailable (the model's pods less one); the
Eviction API then allows one replica at a time, and a replica that was never placed blocks nothing. A
crash-looping model never blocks a drain, the operator keeps the budget as it wants it (put back when
edited, created again when deleted, one only across restarts), never touches a budget of that name
that is someone else's, and garbage collection deletes it with the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import test_operator
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from operator_harness import OperatorProcess, get_model, live, pods_of
from test_operator import GIB, apply, conditions_of, holder_pods, replica_pods, spec, wait_phase

from vnpu import api
from vnpu.cluster.processes import wait_until
from vnpu.operator.disruption import budget_name
from vnpu.operator.pods import holder_pod_selector, replica_selector

# test_operator's fixtures: its kwok cluster, the operator process, the models claim (autouse).
cluster = test_operator.cluster
operator = test_operator.operator
model_claim = test_operator.model_claim

#: What the Eviction API answers when a budget allows no disruption now.
VIOLATES = "Cannot evict pod as it would violate the pod's disruption budget"


def budgets(cp: Any) -> Any:
    return client.PolicyV1Api(cp.api_client())


def read_budget(cp: Any, namespace: str, name: str) -> Any:
    """The budget ``name``, or None when there is none."""
    try:
        return budgets(cp).read_namespaced_pod_disruption_budget(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def budget_status(cp: Any, namespace: str, model: str, name: str | None = None) -> Any:
    """The status of the model's budget (or of the budget ``name``), or None while there is none (or the
    controller has not seen its spec)."""
    pdb = read_budget(cp, namespace, name or budget_name(model))
    if pdb is None:
        return None
    status = pdb.status
    if status is None or status.observed_generation != pdb.metadata.generation:
        return None
    return status


def wait_budget(
    cp: Any,
    namespace: str,
    model: str,
    what: str,
    check: Callable[[Any], bool],
    timeout: float = 60,
    name: str | None = None,
) -> Any:
    """Wait until the disruption controller's status of the model's budget (or of the budget ``name``)
    passes ``check``."""
    seen: list[Any] = []
    whose = f"budget {name}" if name else f"{model}'s budget"

    def reached() -> bool:
        status = budget_status(cp, namespace, model, name)
        seen[:] = [status]
        return status is not None and check(status)

    try:
        wait_until(reached, timeout, f"{whose}: {what}")
    except TimeoutError as exc:
        raise AssertionError(f"{whose}: {what}; last status {seen}") from exc
    return seen[0]


def allows_one_of_three(status: Any) -> bool:
    return (
        status.expected_pods == 3
        and status.current_healthy == 3
        and status.desired_healthy == 2
        and status.disruptions_allowed == 1
    )


def evict(cp: Any, namespace: str, pod: str) -> tuple[int, str]:
    """(HTTP status, message) of an eviction through the Eviction API, as kubectl drain sends it."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
    core = client.CoreV1Api(cp.api_client())
    try:
        _, status, _ = core.create_namespaced_pod_eviction_with_http_info(pod, namespace, body)
    except ApiException as exc:
        return exc.status, str(exc.body)
    return status, ""


def assert_refused(cp: Any, namespace: str, pod: str) -> None:
    """An eviction of ``pod`` is refused by its disruption budget (429; kubectl drain retries it)."""
    status, message = evict(cp, namespace, pod)
    assert status == 429 and VIOLATES in message, (status, message)


def ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def ready_replicas_off(cp: Any, namespace: str, model: str, node: str) -> list[Any]:
    """The model's Ready replicas that are not on ``node``."""
    return [p for p in replica_pods(cp, namespace, model) if p.spec.node_name != node and ready(p)]


def test_a_drain_takes_a_models_replicas_one_at_a_time(cluster, namespace, kwok_nodes, operator) -> None:
    kwok_nodes(2, devices=1, device_mib=16 * GIB)
    apply(cluster, namespace, "chat", spec(replicas=3))
    model = wait_phase(cluster, namespace, "chat", "Ready")
    pdb = budgets(cluster).read_namespaced_pod_disruption_budget("vnpu-chat", namespace)
    assert pdb.metadata.labels == {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE, api.LABEL_MODEL: "chat"}
    (owner,) = pdb.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == (api.KIND, "chat", model["metadata"]["uid"])
    assert owner.controller and owner.block_owner_deletion
    assert (
        pdb.spec.selector.match_labels == replica_selector("chat") and not pdb.spec.selector.match_expressions
    )
    assert pdb.spec.min_available == 2 and pdb.spec.max_unavailable is None
    assert pdb.spec.unhealthy_pod_eviction_policy == "AlwaysAllow"
    # An integer minAvailable: the disruption controller counts the pods the budget selects, 3, and
    # one of them may go.
    wait_budget(
        cluster, namespace, "chat", "3 expected, 3 healthy, 1 disruption allowed", allows_one_of_three
    )

    # Dense packing: the three replicas share one weight copy on one device of one node.
    replicas = sorted(replica_pods(cluster, namespace, "chat"), key=lambda p: p.metadata.name)
    (draining,) = {p.spec.node_name for p in replicas}
    cluster.kubectl("cordon", draining)  # kubectl drain's first step: it takes nothing new
    first, second, third = (p.metadata.name for p in replicas)
    assert evict(cluster, namespace, first) == (201, "")
    # While the first is not replaced, the second may not go: kubectl drain would retry it.
    assert_refused(cluster, namespace, second)

    # The operator places the evicted replica again, on the node that is not cordoned; once it is
    # Ready the next one may go.
    wait_until(
        lambda: len(ready_replicas_off(cluster, namespace, "chat", draining)) == 1,
        60,
        "the evicted replica Ready on the other node",
    )
    wait_budget(cluster, namespace, "chat", "one disruption allowed again", allows_one_of_three)
    assert evict(cluster, namespace, second) == (201, "")
    # The rest as kubectl drain does it: every pod of the node, the budget's refusals retried (every
    # 5 s) until the replacements are Ready.
    drained = cluster.kubectl(
        "drain", draining, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=120s", check=False
    )
    assert drained.returncode == 0, drained.stderr
    wait_until(
        lambda: len(ready_replicas_off(cluster, namespace, "chat", draining)) == 3,
        60,
        "three Ready replicas off the drained node",
    )
    assert not [p for p in live(pods_of(cluster, namespace)) if p.spec.node_name == draining]
    assert third not in {p.metadata.name for p in replica_pods(cluster, namespace, "chat")}

    # Deleting the model deletes its budget (garbage collection: it is the budget's controller).
    cluster.kubectl("delete", "-n", namespace, "infm/chat", "--timeout=60s")
    wait_until(lambda: budget_status(cluster, namespace, "chat") is None, 60, "the budget gone")
    assert not budgets(cluster).list_namespaced_pod_disruption_budget(namespace).items


def not_ready(cp: Any, namespace: str, pod: Any) -> None:
    """What the kubelet reports of a replica whose readiness probe fails (stuck loading)."""
    status = {
        "status": {
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
                {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady"},
            ]
        }
    }
    client.CoreV1Api(cp.api_client()).patch_namespaced_pod_status(pod.metadata.name, namespace, status)


def test_a_replica_never_placed_blocks_no_drain(cluster, namespace, kwok_nodes, operator) -> None:
    """A model of 3 replicas of which its one node holds 2 (4 GiB of weights and 2 replicas of 1 GiB
    on a 6 GiB device). Against spec.replicas (maxUnavailable: 1, the budget before) the third, never
    placed, counted as disrupted: no Ready replica could be evicted, nor its node drained, for as long
    as the model stayed short (a tenant's replicas: 1000 held its nodes for good). Its budget counts
    the pods that exist: one of the two may go, not both at once. Placed in full, with one replica not
    Ready, none of the Ready ones may go."""
    kwok_nodes(1, devices=1, device_mib=6 * GIB)
    apply(cluster, namespace, "big", spec(replicas=3))
    wait_phase(cluster, namespace, "big", "CapacityPending")
    wait_until(
        lambda: len(ready_replicas_off(cluster, namespace, "big", "")) == 2,
        60,
        "the two placed replicas Ready",
    )
    counted = wait_budget(
        cluster, namespace, "big", "both replicas healthy", lambda s: s.current_healthy == 2
    )
    first, second = sorted(p.metadata.name for p in replica_pods(cluster, namespace, "big"))
    assert evict(cluster, namespace, first) == (201, "")  # (against spec.replicas: a 429)
    assert (counted.expected_pods, counted.desired_healthy, counted.disruptions_allowed) == (2, 1, 1)
    assert read_budget(cluster, namespace, "vnpu-big").spec.min_available == 1
    # One at a time among the pods that exist: the other stays until the first is back and Ready.
    assert_refused(cluster, namespace, second)

    # Room for the third (another node): all three placed, the budget follows (all but one of 3).
    kwok_nodes(1, devices=1, device_mib=6 * GIB)
    wait_phase(cluster, namespace, "big", "Ready")
    wait_budget(cluster, namespace, "big", "one of three may go", allows_one_of_three)
    assert read_budget(cluster, namespace, "vnpu-big").spec.min_available == 2
    # One not Ready (it counts as the one disrupted): no Ready replica may go; the unready one may.
    replicas = sorted(replica_pods(cluster, namespace, "big"), key=lambda p: p.metadata.name)
    assert len(replicas) == 3 and all(ready(p) for p in replicas)
    unready, *rest = replicas
    not_ready(cluster, namespace, unready)
    wait_budget(
        cluster,
        namespace,
        "big",
        "3 expected, 2 healthy, none allowed",
        lambda s: (s.expected_pods, s.current_healthy, s.disruptions_allowed) == (3, 2, 0),
    )
    for pod in rest:
        assert_refused(cluster, namespace, pod.metadata.name)
    assert evict(cluster, namespace, unready.metadata.name) == (201, "")


def holds_its_holder(status: Any) -> bool:
    """A weight-holder's budget while replicas map it: the holder counted, none of it may go."""
    return (
        status.expected_pods == 1
        and status.current_healthy == 1
        and status.desired_healthy == 1
        and status.disruptions_allowed == 0
    )


def test_a_drain_takes_a_weight_holder_only_after_the_replicas_that_map_it(
    cluster, namespace, kwok_nodes, operator
) -> None:
    """Two replicas map one holder on one node. Cordoned, the node's holder may not be evicted while
    either is there (with no budget kubectl drain evicted it at once, with every replica's weights); the
    replicas go one at a time, placed again on the other node, and the holder goes last: deleted by the
    operator once nothing on its node maps it (its budget, collected with it), never started again on
    the cordoned node."""
    kwok_nodes(2, devices=1, device_mib=16 * GIB)
    apply(cluster, namespace, "chat", spec(replicas=2))
    wait_phase(cluster, namespace, "chat", "Ready")
    (holder,) = holder_pods(cluster, namespace)
    name, draining = holder.metadata.name, holder.spec.node_name
    replicas = sorted(replica_pods(cluster, namespace, "chat"), key=lambda p: p.metadata.name)
    assert {p.spec.node_name for p in replicas} == {draining}
    assert {p.metadata.annotations[api.ANNOTATION_WEIGHT_HOLDER] for p in replicas} == {name}
    assert holder.metadata.labels[api.LABEL_HOLDER] == name

    # Its budget: named as the pod, over that pod alone, owned by it (no blockOwnerDeletion), held.
    wait_until(lambda: read_budget(cluster, namespace, name) is not None, 30, "the holder's budget")
    pdb = read_budget(cluster, namespace, name)
    assert pdb.metadata.labels == {
        api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE,
        api.LABEL_ROLE: api.ROLE_WEIGHTS,
        api.LABEL_SHARE_GROUP: holder.metadata.labels[api.LABEL_SHARE_GROUP],
        api.LABEL_HOLDER: name,
    }
    (owner,) = pdb.metadata.owner_references
    assert (owner.api_version, owner.kind, owner.name, owner.uid) == ("v1", "Pod", name, holder.metadata.uid)
    assert owner.controller and not owner.block_owner_deletion
    assert pdb.spec.selector.match_labels == holder_pod_selector(name)
    assert pdb.spec.min_available == 1 and pdb.spec.max_unavailable is None
    assert pdb.spec.unhealthy_pod_eviction_policy == "AlwaysAllow"
    # An integer minAvailable: the controller counts the pod it selects, no scale subresource.
    wait_budget(cluster, namespace, "chat", "1 expected, 0 allowed", holds_its_holder, name=name)

    def two_of_two(status: Any) -> bool:
        return status.expected_pods == 2 and status.current_healthy == 2 and status.disruptions_allowed == 1

    wait_budget(cluster, namespace, "chat", "one of two may go", two_of_two)
    cluster.kubectl("cordon", draining)
    assert_refused(cluster, namespace, name)
    first, second = (p.metadata.name for p in replicas)
    assert evict(cluster, namespace, first) == (201, "")
    # One replica still maps it: still refused.
    assert_refused(cluster, namespace, name)
    wait_until(
        lambda: len(ready_replicas_off(cluster, namespace, "chat", draining)) == 1,
        60,
        "the evicted replica Ready on the other node",
    )
    wait_budget(cluster, namespace, "chat", "one may go again", two_of_two)
    assert_refused(cluster, namespace, name)

    # kubectl drain does the rest: the second replica (201), and the holder (429, retried every 5 s)
    # until the operator, the replica placed elsewhere, deletes it (a 404 ends the drain's wait).
    drained = cluster.kubectl(
        "drain", draining, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=120s", check=False
    )
    assert drained.returncode == 0, drained.stderr
    assert f"pod/{second} evicted" in drained.stdout, drained.stdout
    wait_until(
        lambda: len(ready_replicas_off(cluster, namespace, "chat", draining)) == 2,
        60,
        "two Ready replicas off the drained node",
    )
    assert not [p for p in live(pods_of(cluster, namespace)) if p.spec.node_name == draining]
    # Never started again on the cordoned node; its budget collected with it.
    assert name not in {p.metadata.name for p in pods_of(cluster, namespace)}
    assert operator.log().count(f"created weights pod {namespace}/{name}") == 1
    wait_until(lambda: read_budget(cluster, namespace, name) is None, 60, "the holder's budget gone with it")
    # The new holder on the other node has its own, held.
    (moved,) = holder_pods(cluster, namespace)
    assert moved.spec.node_name != draining
    wait_budget(
        cluster, namespace, "chat", "1 expected, 0 allowed", holds_its_holder, name=moved.metadata.name
    )


def test_a_warm_holder_without_replicas_may_be_evicted(cluster, namespace, kwok_nodes, operator) -> None:
    """A model at zero keeps its holder warm: no replica maps it, its budget relaxes (minAvailable 0)
    and the Eviction API lets it go; garbage collection takes the budget with it."""
    kwok_nodes(1, devices=1, device_mib=16 * GIB)
    at_zero = {"minReplicas": 0, "keepWarm": "Always"}
    apply(cluster, namespace, "chat", spec(replicas=1, scaling=at_zero))
    wait_phase(cluster, namespace, "chat", "Ready")
    (holder,) = holder_pods(cluster, namespace)
    name = holder.metadata.name
    wait_budget(cluster, namespace, "chat", "held", holds_its_holder, name=name)
    assert_refused(cluster, namespace, name)

    apply(cluster, namespace, "chat", spec(replicas=0, scaling=at_zero))
    wait_until(lambda: not replica_pods(cluster, namespace, "chat"), 60, "no replica left")
    relaxed = wait_budget(
        cluster,
        namespace,
        "chat",
        "relaxed: 0 desired, 1 allowed",
        lambda s: s.expected_pods == 1 and s.desired_healthy == 0 and s.disruptions_allowed == 1,
        name=name,
    )
    assert relaxed.current_healthy == 1
    assert read_budget(cluster, namespace, name).spec.min_available == 0
    assert [p.metadata.uid for p in holder_pods(cluster, namespace)] == [holder.metadata.uid]  # kept warm
    assert evict(cluster, namespace, name) == (201, "")
    wait_until(lambda: read_budget(cluster, namespace, name) is None, 60, "the holder's budget gone with it")


def test_a_crash_looping_model_never_blocks_a_drain(cluster, namespace, kwok_nodes, operator) -> None:
    """Every replica NotReady (crash-looping): none counts against the budget, each may be evicted
    (unhealthyPodEvictionPolicy AlwaysAllow; with IfHealthyBudget, the default, none could go and the
    drain would hang)."""
    kwok_nodes(2, devices=1, device_mib=16 * GIB)
    apply(cluster, namespace, "broken", spec(replicas=3))
    wait_phase(cluster, namespace, "broken", "Ready")
    wait_budget(cluster, namespace, "broken", "one of three may go", allows_one_of_three)
    core = client.CoreV1Api(cluster.api_client())
    replicas = replica_pods(cluster, namespace, "broken")
    for pod in replicas:  # what the kubelet reports of a container in CrashLoopBackOff
        waiting = {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container"}
        crashing = {
            "status": {
                "conditions": [
                    {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
                    {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady"},
                ],
                "containerStatuses": [
                    {
                        "name": "runtime",
                        "ready": False,
                        "restartCount": 7,
                        "image": pod.spec.containers[0].image,
                        "imageID": "",
                        "state": {"waiting": waiting},
                        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
                    }
                ],
            }
        }
        core.patch_namespaced_pod_status(pod.metadata.name, namespace, crashing)
    wait_budget(
        cluster,
        namespace,
        "broken",
        "no replica healthy, no disruption allowed",
        lambda s: s.expected_pods == 3 and s.current_healthy == 0 and s.disruptions_allowed == 0,
    )
    (node,) = {p.spec.node_name for p in replicas}
    cluster.kubectl("cordon", node)
    for pod in replicas:  # back to back, none replaced meanwhile
        assert evict(cluster, namespace, pod.metadata.name) == (201, ""), pod.metadata.name


def test_the_budget_is_kept_across_edits_deletes_and_restarts_and_never_takes_someone_elses(
    cluster, namespace, kwok_nodes, tmp_path
) -> None:
    kwok_nodes(1, devices=1, device_mib=16 * GIB)
    policy = budgets(cluster)
    # Someone's own budget, under the name the operator would give the model "taken".
    theirs = policy.create_namespaced_pod_disruption_budget(
        namespace,
        {
            "metadata": {"name": "vnpu-taken", "labels": {"team": "a"}},
            "spec": {"selector": {"matchLabels": {"app": "theirs"}}, "maxUnavailable": 0},
        },
    )
    op = OperatorProcess(cluster, namespace, tmp_path)
    try:
        op.start()
        apply(cluster, namespace, "chat", spec(replicas=2))
        apply(cluster, namespace, "taken", spec(replicas=1))
        wait_phase(cluster, namespace, "chat", "Ready")
        made = policy.read_namespaced_pod_disruption_budget("vnpu-chat", namespace)

        # Edited (no drain would ever pass): put back in place. Deleted: created again.
        policy.patch_namespaced_pod_disruption_budget("vnpu-chat", namespace, {"spec": {"minAvailable": 2}})
        wait_until(
            lambda: (
                policy.read_namespaced_pod_disruption_budget("vnpu-chat", namespace).spec.min_available == 1
            ),
            30,
            "the budget's spec put back",
        )
        assert policy.read_namespaced_pod_disruption_budget("vnpu-chat", namespace).metadata.uid == (
            made.metadata.uid
        )
        policy.delete_namespaced_pod_disruption_budget("vnpu-chat", namespace)

        def created_again() -> bool:
            try:
                return bool(
                    policy.read_namespaced_pod_disruption_budget("vnpu-chat", namespace).metadata.uid
                    != made.metadata.uid
                )
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise

        wait_until(created_again, 30, "the budget created again")

        # The name "taken" would get is someone else's: left as it is, and the model says why.
        wait_until(
            lambda: (
                conditions_of(cluster, namespace, "taken").get("Degraded", {}).get("reason")
                == "DisruptionBudgetNameTaken"
            ),
            30,
            "taken: Degraded, DisruptionBudgetNameTaken",
        )
        degraded = conditions_of(cluster, namespace, "taken")["Degraded"]
        assert "PodDisruptionBudget vnpu-taken exists in" in degraded["message"]
        still = policy.read_namespaced_pod_disruption_budget("vnpu-taken", namespace)
        assert still.metadata.generation == theirs.metadata.generation and not still.metadata.owner_references
        assert still.spec.selector.match_labels == {"app": "theirs"} and still.metadata.labels == {
            "team": "a"
        }
        wait_until(  # its pods are not held back
            lambda: get_model(cluster, namespace, "taken")["status"].get("readyReplicas") == 1,
            60,
            "taken: its replica Ready",
        )

        # Killed and started again: the same budgets (the model's, and its weight-holder's once the
        # holder exists), not written again, and no second one.
        (holder,) = holder_pods(cluster, namespace)
        wait_until(
            lambda: read_budget(cluster, namespace, holder.metadata.name) is not None,
            30,
            "the holder's budget",
        )
        managed = f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}"

        def ours() -> list[tuple[str, str, int]]:
            found = policy.list_namespaced_pod_disruption_budget(namespace, label_selector=managed).items
            return sorted((b.metadata.name, b.metadata.uid, b.metadata.generation) for b in found)

        kept = ours()
        assert [name for name, _, _ in kept] == sorted(["vnpu-chat", holder.metadata.name])
        before = policy.read_namespaced_pod_disruption_budget("vnpu-chat", namespace).metadata
        op.kill()
        op.start()
        passes = "vnpu_operator_reconcile_duration_seconds_count"

        def passes_done() -> float:
            line = next((x for x in op.metrics().splitlines() if x.startswith(passes)), f"{passes} 0")
            return float(line.split()[-1])

        wait_until(lambda: passes_done() >= 3, 60, "three passes of the new operator")
        assert ours() == kept
        # (Its generation counts writes of its spec; the disruption controller's status writes do not.)
        assert policy.read_namespaced_pod_disruption_budget("vnpu-chat", namespace).metadata.generation == (
            before.generation
        )
        second_log = (tmp_path / f"operator-{op.starts}.log").read_text()
        assert f"PodDisruptionBudget {namespace}/vnpu-chat" not in second_log, (
            "the new operator wrote it again"
        )
        assert f"PodDisruptionBudget {namespace}/{holder.metadata.name}" not in second_log

        # Once their budget is gone, "taken" gets its own (after its backoff).
        policy.delete_namespaced_pod_disruption_budget("vnpu-taken", namespace)
        wait_until(
            lambda: budget_status(cluster, namespace, "taken") is not None,
            90,
            "taken: its own budget once the name is free",
        )
        wait_until(
            lambda: conditions_of(cluster, namespace, "taken")["Degraded"]["status"] == "False",
            30,
            "taken: no longer Degraded",
        )
    finally:
        cluster.kubectl("delete", "infm", "--all", "-n", namespace, "--timeout=60s", check=False)
        op.stop()
