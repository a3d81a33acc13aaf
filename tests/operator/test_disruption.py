"""A PodDisruptionBudget per InferenceModel, planned by the pure pass: over the model's replicas only,
one at a time, unhealthy ones always evictable; created once, put back when edited, never touched when
the name is someone else's, and never in the way of the model's pods."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

from test_planner import NOW, as_pods, model, node, run

from vnpu import api
from vnpu.operator import disruption
from vnpu.operator.disruption import (
    BudgetIntent,
    HolderBudgetIntent,
    budget_name,
    holder_budget_name,
    holders_in_use,
    manifest,
    plan_budgets,
    plan_holder_budgets,
)
from vnpu.operator.planner import (
    Failure,
    budget_failure_key,
    failure_model,
    placeholders_failure_key,
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
    assert pdb["spec"] == {
        "selector": {"matchLabels": replica_selector("llama")},
        "maxUnavailable": 1,
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
    assert not intent.update
    mine = observed(manifest(intent))
    assert disruption.ours(mine, m) and disruption.as_wanted(mine, "llama")
    assert run([m], nodes, budgets=[mine]).budgets == []  # as wanted: no write at all
    # Someone sets maxUnavailable 0 (no drain would ever pass), widens the selector, adds minAvailable
    # or drops the unhealthy-pod policy: the spec is put back, in place.
    edits: list[dict[str, Any]] = [
        {"maxUnavailable": 0},
        {"selector": {"matchLabels": {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE}}},
        {"selector": {"matchLabels": replica_selector("llama"), "matchExpressions": [EXISTS]}},
        {"unhealthyPodEvictionPolicy": "IfHealthyBudget"},
        {"maxUnavailable": None, "minAvailable": 1},
        {"maxUnavailable": "50%"},
    ]  # fmt: skip
    for edit in edits:
        pdb = manifest(intent)
        pdb["spec"] = {k: v for k, v in {**pdb["spec"], **edit}.items() if v is not None}
        (put_back,) = run([m], nodes, budgets=[observed(pdb)]).budgets
        assert put_back == BudgetIntent(m, update=True), edit
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
        assert run([m], nodes, budgets=[found]).budgets == [BudgetIntent(m)]
        message = disruption.taken_message(BudgetIntent(m), found)
        assert "PodDisruptionBudget vnpu-llama exists in ns and" in message and "left as it is" in message
    # An earlier model's of that name, being collected: nothing until it is gone.
    going = observed(another_controller, deletionTimestamp="2026-01-01T00:00:00Z")
    assert run([m], nodes, budgets=[going]).budgets == []


def test_a_model_at_zero_replicas_keeps_its_budget_and_a_deleted_one_gets_none() -> None:
    idle = model("idle", replicas=0)
    kept = observed(manifest(BudgetIntent(idle)))
    assert plan_budgets([idle], {}) == [BudgetIntent(idle)]
    assert plan_budgets([idle], {("ns", kept.name): kept}) == []  # kept: it selects no pod, blocks nothing
    going = replace(model("going"), deleting=True)
    assert plan_budgets([going], {}) == []  # garbage collection deletes its budget with it
    # A model whose spec the operator cannot read still gets one: its running replicas may stay.
    broken = replace(model("broken"), spec=None, spec_error="bad")
    assert plan_budgets([broken], {}) == [BudgetIntent(broken)]


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
    # The model's own backoff holds its budget too (none of its writes until it has passed).
    held = run([m], [node("n1", devices=1)], failures={key: replace(refused, message="pods: quota")})
    assert held.budgets == [] and held.create == []


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
