"""A PodDisruptionBudget per InferenceModel, planned by the pure pass: over the model's replicas only,
one at a time of the pods that exist (a replica never placed blocks nothing), unhealthy ones always
evictable; created once, put back when edited or when its pods' count changes, never touched when the
name is someone else's, and never in the way of the model's pods."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

from test_planner import CONFIG, NOW, as_pods, estimate, keys_for, model, node, run

from vnpu import api
from vnpu.operator import disruption
from vnpu.operator.disruption import (
    BudgetIntent,
    HolderBudgetIntent,
    budget_name,
    holder_budget_name,
    holders_in_use,
    manifest,
    min_available,
    plan_budgets,
    plan_holder_budgets,
    replica_pods,
)
from vnpu.operator.planner import (
    Failure,
    budget_failure_key,
    failure_model,
    placeholders_failure_key,
    plan,
)
from vnpu.operator.pods import holder_pod_selector, replica_selector
from vnpu.operator.state import ObservedBudget, ObservedPod, parse_budget

EXISTS = {"key": "x", "operator": "Exists"}


def observed(budget: dict[str, Any], **meta: Any) -> ObservedBudget:
    """``budget`` as the informer sees it once the API server holds it (``meta`` on its metadata)."""
    return parse_budget({**budget, "metadata": {**budget["metadata"], "uid": "pdb-uid", **meta}})


def selected(budget: dict[str, Any], pods: list[dict[str, Any]]) -> list[str]:
    """The names of ``pods`` the budget's selector selects."""
    match = budget["spec"]["selector"]["matchLabels"].items()
    return sorted(p["metadata"]["name"] for p in pods if match <= p["metadata"]["labels"].items())


def test_a_model_gets_a_budget_over_its_replicas_only() -> None:
    m, other = model("llama", replicas=3), model("llama-2", replicas=1)
    placed = run([m, other], [node("n1", devices=1)])
    waiting = run([m, other], [])  # no node: placeholders
    pods = placed.create + waiting.create
    assert {p["metadata"]["labels"][api.LABEL_ROLE] for p in pods} == {"replica", "weights", "placeholder"}
    (intent,) = [i for i in placed.budgets if i.owner.name == "llama"]
    pdb = manifest(intent)
    assert pdb["apiVersion"] == "policy/v1" and pdb["kind"] == "PodDisruptionBudget"
    assert pdb["metadata"]["name"] == "vnpu-llama" == budget_name("llama") == api.service_name("llama")
    assert pdb["metadata"]["namespace"] == "ns"
    assert pdb["metadata"]["labels"] == {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE, api.LABEL_MODEL: "llama"}
    (owner,) = pdb["metadata"]["ownerReferences"]
    assert (owner["apiVersion"], owner["kind"], owner["name"]) == (api.API_VERSION, api.KIND, "llama")
    assert owner["uid"] == "uid-llama" and owner["controller"] is True and owner["blockOwnerDeletion"]
    # Three replicas placed: all but one of them must stay (an integer minAvailable: the disruption
    # controller counts the pods it selects, not the scale subresource's spec.replicas).
    assert pdb["spec"] == {
        "selector": {"matchLabels": replica_selector("llama")},
        "minAvailable": 2,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    # Exactly the model's three replicas: not its weight-holder or placeholders, nor the other model's.
    replicas = [
        p
        for p in placed.create
        if p["metadata"]["labels"][api.LABEL_ROLE] == "replica"
        and p["metadata"]["labels"][api.LABEL_MODEL] == "llama"
    ]
    assert len(replicas) == 3
    assert selected(pdb, pods) == sorted(p["metadata"]["name"] for p in replicas)
    # The selector the scale subresource reports (status.selector) selects no fewer.
    status = next(u.status for u in placed.statuses if u.model.name == "llama")
    assert (
        dict(kv.split("=") for kv in status["selector"].split(",")).items()
        <= replica_selector("llama").items()
    )


def test_the_budget_is_created_once_and_put_back_when_edited() -> None:
    m = model("llama", replicas=2)
    nodes = [node("n1", devices=1)]
    first = run([m], nodes)
    (intent,) = first.budgets
    assert not intent.update and intent.min_available == 1
    mine = observed(manifest(intent))
    assert disruption.ours(mine, m) and disruption.as_wanted(mine, "llama", 1)
    assert run([m], nodes, budgets=[mine]).budgets == []  # as wanted: no write at all
    # Someone sets minAvailable to every pod (no drain would ever pass), adds maxUnavailable, widens the
    # selector or drops the unhealthy-pod policy: the spec is put back, in place.
    edits: list[dict[str, Any]] = [
        {"minAvailable": 2},
        {"minAvailable": "100%"},
        {"minAvailable": None, "maxUnavailable": 0},
        {"maxUnavailable": 1},
        {"selector": {"matchLabels": {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE}}},
        {"selector": {"matchLabels": replica_selector("llama"), "matchExpressions": [EXISTS]}},
        {"unhealthyPodEvictionPolicy": "IfHealthyBudget"},
    ]  # fmt: skip
    for edit in edits:
        pdb = manifest(intent)
        pdb["spec"] = {k: v for k, v in {**pdb["spec"], **edit}.items() if v is not None}
        (put_back,) = run([m], nodes, budgets=[observed(pdb)]).budgets
        assert put_back == BudgetIntent(m, 1, update=True), edit
    # Its labels are the operator's own: the informer (by label) sees it, so only its spec can differ.


def test_a_budget_that_is_not_the_models_is_never_changed() -> None:
    m = model("llama", replicas=2)
    nodes = [node("n1", devices=1)]
    pdb = manifest(BudgetIntent(m))
    someone_elses = {**pdb, "metadata": {**pdb["metadata"], "ownerReferences": [], "labels": {"team": "a"}}}
    (owner,) = pdb["metadata"]["ownerReferences"]
    another_controller = {**pdb, "metadata": {**pdb["metadata"], "ownerReferences": [{**owner, "uid": "x"}]}}
    for theirs in (someone_elses, another_controller):
        found = observed(theirs)
        assert not disruption.ours(found, m)
        # A create, never an update: the API server's AlreadyExists, and a look, tell the model why.
        assert run([m], nodes, budgets=[found]).budgets == [BudgetIntent(m, 1)]
        message = disruption.taken_message(BudgetIntent(m, 1), found)
        assert "PodDisruptionBudget vnpu-llama exists in ns and" in message and "left as it is" in message
    # An earlier model's of that name, being collected: nothing until it is gone.
    going = observed(another_controller, deletionTimestamp="2026-01-01T00:00:00Z")
    assert run([m], nodes, budgets=[going]).budgets == []


def test_a_model_at_zero_replicas_keeps_its_budget_and_a_deleted_one_gets_none() -> None:
    idle = model("idle", replicas=0)
    kept = observed(manifest(BudgetIntent(idle)))
    assert plan_budgets([idle], {}, {}) == [BudgetIntent(idle)]
    # Kept: it selects no pod, blocks nothing.
    assert plan_budgets([idle], {("ns", kept.name): kept}, {}) == []
    going = replace(model("going"), deleting=True)
    assert plan_budgets([going], {}, {}) == []  # garbage collection deletes its budget with it
    # A model whose spec the operator cannot read still gets one: its running replicas may stay, all
    # but one of them (no spec.replicas to cap the count at).
    broken = replace(model("broken"), spec=None, spec_error="bad")
    assert plan_budgets([broken], {}, {("ns", "broken"): 3}) == [BudgetIntent(broken, 2)]


def disruptions_allowed(spec: dict[str, Any], healthy: int) -> int:
    """What the disruption controller allows under an integer minAvailable: the healthy pods less it."""
    return max(0, healthy - spec["minAvailable"])


def test_the_budget_keeps_all_of_a_models_pods_but_one_and_never_more_than_its_replicas_less_one() -> None:
    assert [min_available(pods, 3) for pods in range(6)] == [0, 0, 1, 2, 2, 2]
    assert min_available(1, 1) == 0  # one pod: evictable (nothing to fail over to)
    assert min_available(0, 0) == min_available(5, 0) == 0  # never below 0
    assert min_available(4, None) == 3  # no spec to cap it


def replica(name: str, model: str = "llama", ns: str = "ns", **fields: Any) -> ObservedPod:
    pod = ObservedPod(ns, name, api.ROLE_REPLICA, model, "g", 0, "n1", "d", 1, "Running", True, False)
    return replace(pod, **fields)


def plan_intents(m: Any) -> list[Any]:
    """The pod intents of ``m``'s first pass on one node, as the planner hands them (unrendered)."""
    return plan(
        [m], [node("n1", devices=1)], [], {m.key: estimate()}, CONFIG, NOW, secrets=keys_for([m])
    ).create


def test_a_models_pods_are_counted_as_the_pass_leaves_them() -> None:
    intents = plan_intents(model("llama", replicas=2))
    new = sorted(i.name for i in intents if i.role == api.ROLE_REPLICA)
    assert len(intents) == 3 and len(new) == 2  # a holder and two replicas
    pods = [
        replica("a"),
        replica("b"),
        replica("evicted", terminating=True),
        replica("ended", finished=True),
        replica("retired"),
        replica(new[0], terminating=True),  # its successor of that name waits for it to go: counted once
        replica("x", model="other"),
        replica("y", ns="team-b"),
        replace(replica("holder"), role=api.ROLE_WEIGHTS),
    ]
    counted = replica_pods(pods, intents, {("ns", "retired")})
    assert counted == {("ns", "llama"): 4, ("ns", "other"): 1, ("team-b", "llama"): 1}
    # A planned pod that exists is counted once; nothing at all counts none.
    assert replica_pods([replica(new[0])], intents, set()) == {("ns", "llama"): 2}
    assert replica_pods([], [], set()) == {}


def test_a_replica_never_placed_blocks_no_drain() -> None:
    """One device fits 12 replicas: a model of 13 (or 1000) has 12 pods, and one of them may go. Against
    spec.replicas (maxUnavailable: 1, the budget before) the missing one counted as disrupted: none."""
    nodes = [node("n1", devices=1)]
    for replicas in (12, 13, 1000):
        m = model("victim", replicas=replicas)
        pods = as_pods(run([m], nodes).create)
        assert sum(p.role == api.ROLE_REPLICA for p in pods) == 12
        (intent,) = run([m], nodes, pods).budgets
        assert intent.min_available == 11, replicas
        assert disruptions_allowed(intent.spec(), healthy=12) == 1
        # One not Ready: the rest stay.
        assert disruptions_allowed(intent.spec(), healthy=11) == 0
    # A model of one pod may be evicted.
    (one,) = run([model("solo", replicas=1)], nodes).budgets
    assert one.min_available == 0 and disruptions_allowed(one.spec(), healthy=1) == 1


def test_an_evicted_replica_keeps_the_budget_while_the_pass_places_it_again() -> None:
    m = model("llama", replicas=3)
    n1, n2 = node("n1", devices=1), node("n2", devices=1)
    pods = as_pods(run([m], [n1]).create)
    (intent,) = run([m], [n1], pods).budgets
    kept = [observed(manifest(intent))]
    assert intent.min_available == 2 and run([m], [n1, n2], pods, budgets=kept).budgets == []
    evicted = sorted(p.name for p in pods if p.role == api.ROLE_REPLICA)[0]
    pods = [replace(p, terminating=True) if p.name == evicted else p for p in pods]
    cordoned = replace(n1, schedulable=False)
    # Placed on n2 this very pass: still 3 pods, no write; the next eviction waits for it to be Ready.
    moved = run([m], [cordoned, n2], pods, budgets=kept)
    assert sum(p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_REPLICA for p in moved.create) == 1
    assert moved.budgets == []
    # Not cordoned (evicted by something other than a drain): its successor of the same name waits for
    # it to go, and counts meanwhile.
    assert run([m], [n1], pods, budgets=kept).budgets == []
    # Nowhere to go: 2 pods, one of which may go; the drain is not held by a replica with no room.
    (fewer,) = run([m], [cordoned], pods, budgets=kept).budgets
    assert fewer == BudgetIntent(m, 1, update=True)


def test_a_model_woken_from_zero_needs_no_budget_write() -> None:
    nodes = [node("n1", devices=1)]
    at_zero = [observed(manifest(BudgetIntent(model("llama", replicas=0))))]
    assert run([model("llama", replicas=0)], nodes, budgets=at_zero).budgets == []
    woken = model("llama", replicas=1)
    assert run([woken], nodes, budgets=at_zero).budgets == []
    assert run([woken], nodes, as_pods(run([woken], nodes).create), budgets=at_zero).budgets == []
    # A second replica: all but one of two stay.
    (two,) = run([model("llama", replicas=2)], nodes, budgets=at_zero).budgets
    assert two.update and two.min_available == 1


def test_a_rollouts_surge_pods_count_up_to_the_models_replicas() -> None:
    nodes = [node("n1", devices=2)]
    pods = as_pods(run([model("a", 4)], nodes).create)
    changed = model("a", 4, memory={"kvCacheMiB": 2048})
    result = run([changed], nodes, pods, estimates={changed.key: estimate(per_replica=2048)})
    surge = [p for p in result.create if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_REPLICA]
    assert len(surge) == 1 and result.delete == []
    # 5 pods, but 3 of the 4 replicas are owed: a surge pod that never gets Ready (a broken template)
    # holds no old replica for ever.
    (intent,) = result.budgets
    assert intent.min_available == 3
    assert disruptions_allowed(intent.spec(), healthy=4) == 1


def test_a_budget_of_an_older_operator_is_put_back_once() -> None:
    m = model("llama", replicas=3)
    nodes = [node("n1", devices=1)]
    pods = as_pods(run([m], nodes).create)
    (intent,) = run([m], nodes, pods).budgets
    older = manifest(intent)
    older["spec"] = {k: v for k, v in older["spec"].items() if k != "minAvailable"} | {"maxUnavailable": 1}
    (put_back,) = run([m], nodes, pods, budgets=[observed(older)]).budgets
    assert put_back == BudgetIntent(m, 2, update=True)
    assert run([m], nodes, pods, budgets=[observed(put_back.manifest())]).budgets == []


def test_a_frozen_model_counts_the_pods_it_has() -> None:
    """No estimate (the model's files unreadable for now): its pods are kept as they are, and counted."""
    m = model("llama", replicas=5)
    nodes = [node("n1", devices=1)]
    pods = as_pods(run([model("llama", replicas=3)], nodes).create)
    (intent,) = run([m], nodes, pods, estimates={"none": estimate()}).budgets
    assert intent.min_available == 2


def test_a_model_whose_pods_are_refused_counts_the_pods_it_has() -> None:
    """A namespace quota lets 2 of 12 replica pods be created: while its writes are refused (in its
    backoff, and on each retry until one goes through) the budget counts the 2, not the 12 planned."""
    m = model("llama", replicas=12)
    nodes = [node("n1", devices=1)]
    planned = run([m], nodes).create
    created = [p for p in as_pods(planned) if p.role == api.ROLE_WEIGHTS]
    created += [p for p in as_pods(planned) if p.role == api.ROLE_REPLICA][:2]
    (first,) = run([m], nodes, created).budgets
    assert first.min_available == 11  # (the pass cannot know the quota yet)
    quota = Failure(
        "creating replica pod x: exceeded quota", NOW - dt.timedelta(seconds=1), reason="Forbidden"
    )
    retry = run([m], nodes, created, failures={"ns/llama": quota}, budgets=[observed(manifest(first))])
    assert len(retry.create) == 10  # retried
    assert retry.budgets == [BudgetIntent(m, 1, update=True)]
    # Once they go through, the next pass counts what it places again.
    assert run([m], nodes, created, budgets=[observed(manifest(first))]).budgets == []


def test_a_refused_budget_backs_off_the_budget_alone() -> None:
    m = model("llama", replicas=2)
    key = "ns/llama"
    later = NOW + dt.timedelta(seconds=60)
    refused = Failure("creating PodDisruptionBudget vnpu-llama: exceeded quota", later, reason="Forbidden")
    result = run([m], [node("n1", devices=1)], failures={budget_failure_key(key): refused})
    assert result.budgets == []
    assert len(result.create) == 3  # its holder and replicas are written as usual
    degraded = next(c for c in result.statuses[0].status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "Forbidden"
    assert "PodDisruptionBudget vnpu-llama" in degraded["message"]
    # Nor the other way round: refused placeholders hold back neither the budget nor the replicas.
    waiting = run([m], [], failures={placeholders_failure_key(key): refused})
    assert waiting.create == [] and waiting.budgets == [BudgetIntent(m)]
    # The model's own backoff holds its pods, not its budget: that follows the pods it has (none here).
    held = run([m], [node("n1", devices=1)], failures={key: replace(refused, message="pods: quota")})
    assert held.budgets == [BudgetIntent(m)] and held.create == []


def test_the_budgets_failure_key_is_the_models() -> None:
    assert failure_model(budget_failure_key("team-a/m")) == "team-a/m"
    assert failure_model(placeholders_failure_key("team-a/m")) == "team-a/m"
    # A model named like a part's suffix is a model like any other.
    assert failure_model("team-a/disruption-budget") == "team-a/disruption-budget"
    assert failure_model(budget_failure_key("team-a/placeholders")) == "team-a/placeholders"


# -- weight-holders ----------------------------------------------------------------------------------


def _placed(replicas: int = 8) -> tuple[Any, list[Any], list[dict[str, Any]], list[ObservedPod]]:
    """A model of ``replicas`` on two one-device nodes (four replicas fill one): two holders of one group
    and weights. The pods as the API server holds them after the first pass."""
    m = model("llama", replicas=replicas)
    nodes = [node("n1", devices=1, device_gib=8), node("n2", devices=1, device_gib=8)]
    manifests = run([m], nodes).create
    return m, nodes, manifests, as_pods(manifests)


def _holder_budget(intent: HolderBudgetIntent, **meta: Any) -> ObservedBudget:
    return observed(intent.manifest(), **meta)


def test_each_holder_gets_a_budget_over_itself_alone_held_while_replicas_map_it() -> None:
    m, nodes, manifests, pods = _placed()
    holders = sorted(p.name for p in pods if p.role == api.ROLE_WEIGHTS)
    assert len(holders) == 2
    # New holders carry the label their budget selects by: their own name.
    for p in manifests:
        if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_WEIGHTS:
            assert p["metadata"]["labels"][api.LABEL_HOLDER] == p["metadata"]["name"]
    # Their budgets come once the informer shows the pods (the ownerReference needs the pod's uid).
    assert run([m], nodes).holder_budgets == []
    result = run([m], nodes, pods)
    assert result.set_labels == []
    assert sorted(i.name for i in result.holder_budgets) == holders
    for intent in result.holder_budgets:
        holder = intent.holder
        assert intent.in_use and intent.models == ("ns/llama",) and not intent.update
        pdb = intent.manifest()
        assert (pdb["apiVersion"], pdb["kind"]) == ("policy/v1", "PodDisruptionBudget")
        assert pdb["metadata"]["name"] == holder_budget_name(holder.name) == holder.name
        assert pdb["metadata"]["namespace"] == "ns"
        assert pdb["metadata"]["labels"] == {
            api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE,
            api.LABEL_ROLE: api.ROLE_WEIGHTS,
            api.LABEL_SHARE_GROUP: holder.share_group,
            api.LABEL_HOLDER: holder.name,
        }
        # Collected with the pod; no blockOwnerDeletion (it would need pods/finalizers).
        assert pdb["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "Pod", "name": holder.name, "uid": holder.uid, "controller": True}
        ]
        assert pdb["spec"] == {
            "selector": {"matchLabels": holder_pod_selector(holder.name)},
            "minAvailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        }
        # That holder alone: not the other holder of the same group and weights, nor any replica.
        assert selected(pdb, manifests) == [holder.name]
    # Kept as it is: no write, pass after pass (and after a restart, whose informer lists them).
    kept = [_holder_budget(i) for i in result.holder_budgets]
    assert run([m], nodes, pods, budgets=kept).holder_budgets == []


def test_a_holder_is_in_use_while_a_live_replica_maps_it() -> None:
    _, _, _, pods = _placed()
    holders = sorted((p.namespace, p.name) for p in pods if p.role == api.ROLE_WEIGHTS)
    assert holders_in_use(pods) == set(holders)
    first, second = holders
    of_first = [p for p in pods if p.role == api.ROLE_REPLICA and p.weight_holder == first[1]]
    assert len(of_first) == 4
    others = [p for p in pods if p not in of_first]
    # Terminating (evicted, deleted) or finished replicas do not count; another holder's replicas
    # never count for this one.
    assert holders_in_use([*others, *(replace(p, terminating=True) for p in of_first)]) == {second}
    assert holders_in_use([*others, *(replace(p, finished=True) for p in of_first)]) == {second}
    one_left = [*others, *(replace(p, terminating=True) for p in of_first[1:]), of_first[0]]
    assert holders_in_use(one_left) == {first, second}
    # Another namespace's replica naming a holder of that name maps another pod.
    assert holders_in_use([replace(p, namespace="other") for p in of_first]) == {("other", first[1])}
    # Neither a holder nor a placeholder maps anything.
    assert holders_in_use([p for p in pods if p.role != api.ROLE_REPLICA]) == set()


def test_a_holders_budget_relaxes_once_no_replica_maps_it_and_tightens_again() -> None:
    m, nodes, _, pods = _placed()
    kept = {
        (b.namespace, b.name): b for b in (_holder_budget(i) for i in run([m], nodes, pods).holder_budgets)
    }
    first = sorted(p.name for p in pods if p.role == api.ROLE_WEIGHTS)[0]
    going = [
        replace(p, terminating=True) if p.role == api.ROLE_REPLICA and p.weight_holder == first else p
        for p in pods
    ]
    # (The pure decision: in a pass the planner usually deletes such a holder at once, its replicas
    # placed elsewhere; the budget matters while it is kept, or the operator is slow or stopped.)
    (relax,) = plan_holder_budgets(going, [m], kept)
    assert relax.holder.name == first and relax.update and not relax.in_use
    assert relax.spec() == {
        "selector": {"matchLabels": holder_pod_selector(first)},
        "minAvailable": 0,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    # Relaxed, and a replica maps it again: held again.
    relaxed = {**kept, ("ns", first): _holder_budget(relax)}
    assert plan_holder_budgets(going, [m], relaxed) == []
    (hold,) = plan_holder_budgets(pods, [m], relaxed)
    assert hold.holder.name == first and hold.update and hold.in_use and hold.spec()["minAvailable"] == 1
    # Edited by someone (IfHealthyBudget: a broken holder would block the drain): put back.
    pdb = hold.manifest()
    pdb["spec"] = {**pdb["spec"], "unhealthyPodEvictionPolicy": "IfHealthyBudget"}
    (put_back,) = plan_holder_budgets(pods, [m], {**kept, ("ns", first): observed(pdb)})
    assert put_back == replace(hold, update=True)


def test_a_warm_holder_without_replicas_may_go() -> None:
    """A model at zero keeps its holder warm: nothing maps it, so a drain may evict it."""
    nodes = [node("n1")]
    warm = {"minReplicas": 0, "idleSeconds": 300, "keepWarm": "Always"}
    pods = as_pods(run([model("a", 1, scaling=warm)], nodes).create)
    holder = [p for p in pods if p.role == api.ROLE_WEIGHTS]
    (held,) = run([model("a", 1, scaling=warm)], nodes, pods).holder_budgets
    assert held.in_use
    at_zero = run([model("a", 0, scaling=warm)], nodes, holder, budgets=[_holder_budget(held)])
    assert at_zero.warm_holders == {"default": 1} and at_zero.delete == []
    (relax,) = at_zero.holder_budgets
    assert relax.update and not relax.in_use and relax.spec()["minAvailable"] == 0


def test_a_holder_from_before_the_label_gets_it() -> None:
    m, nodes, _, pods = _placed()
    holder = next(p for p in pods if p.role == api.ROLE_WEIGHTS)
    old = [replace(p, holder_label=None) if p.name == holder.name else p for p in pods]
    (update,) = run([m], nodes, old).set_labels
    assert (update.name, dict(update.labels), update.models) == (
        holder.name,
        {api.LABEL_HOLDER: holder.name},
        ("ns/llama",),
    )
    # Together with vnpu.io/weights for one from before that too: one patch.
    older = [replace(p, holder_label=None, weights=None) if p.name == holder.name else p for p in pods]
    (update,) = run([m], nodes, older).set_labels
    assert set(update.labels) == {api.LABEL_HOLDER, api.LABEL_WEIGHTS}


def test_no_budget_for_a_holder_on_its_way_out() -> None:
    m, nodes, _, pods = _placed()
    holders = sorted(p.name for p in pods if p.role == api.ROLE_WEIGHTS)
    # Terminating, or owned by no live model: none.
    terminating = [replace(p, terminating=True) if p.name == holders[0] else p for p in pods]
    assert [i.name for i in run([m], nodes, terminating).holder_budgets] == holders[1:]
    orphan = [replace(p, owner_uids=("gone",)) if p.name == holders[0] else p for p in pods]
    assert [i.name for i in run([m], nodes, orphan).holder_budgets] == holders[1:]
    # Deleted in this very pass (scaled down to one device): its budget goes with it, no write.
    smaller = run([replace(m, spec=replace(m.spec, replicas=4))], nodes, pods)
    (gone,) = {d.name for d in smaller.delete if d.role == api.ROLE_WEIGHTS}
    assert gone not in {i.name for i in smaller.holder_budgets}


def test_a_refused_holder_budget_backs_off_the_budgets_alone() -> None:
    m, nodes, _, pods = _placed()
    refused = Failure("creating PodDisruptionBudget x: quota", NOW + dt.timedelta(seconds=60))
    result = run([m], nodes, pods, failures={budget_failure_key("ns/llama"): refused})
    assert result.holder_budgets == [] and result.budgets == []
    assert run([m], nodes, pods).holder_budgets  # (once the backoff is over)
    # A holder shared by two models waits only while both do: one model's budget refused (its name
    # taken) leaves the other's replicas their holder's budget.
    a, b = model("a", 1, shareGroup="g"), model("b", 1, shareGroup="g")
    both = run([a, b], [node("n1", devices=1)])
    shared = as_pods(both.create)
    shared = [replace(p, owner_uids=("uid-a", "uid-b")) if p.role == api.ROLE_WEIGHTS else p for p in shared]
    (intent,) = run([a, b], [node("n1", devices=1)], shared).holder_budgets
    assert intent.models == ("ns/a", "ns/b")
    one = {budget_failure_key("ns/a"): refused}
    assert run([a, b], [node("n1", devices=1)], shared, failures=one).holder_budgets == [intent]
    two = {**one, budget_failure_key("ns/b"): refused}
    assert run([a, b], [node("n1", devices=1)], shared, failures=two).holder_budgets == []
    # Someone else's budget of the holder's name: a create (AlreadyExists tells why), never an update.
    intent = run([m], nodes, pods).holder_budgets[0]
    pdb = intent.manifest()
    theirs = observed({**pdb, "metadata": {**pdb["metadata"], "ownerReferences": [], "labels": {}}})
    assert not intent.owns(theirs)
    (again,) = [i for i in run([m], nodes, pods, budgets=[theirs]).holder_budgets if i.name == intent.name]
    assert not again.update
    message = disruption.taken_message(again, theirs)
    assert f"weight-holder {intent.holder.name}, and with it every replica that maps it" in message
