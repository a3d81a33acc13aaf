"""An operator that has just started (or taken over as leader) sizes every model again: estimates are
kept in memory, and a model whose files must be read is unsized for its first passes. Those passes
must change nothing the operator before it had settled: no pod, no Secret, no status."""

from __future__ import annotations

from dataclasses import replace

from test_planner import as_pods, estimate, keys_for, model, node, run, step

from vnpu import api
from vnpu.memory import EstimatePending

READING = EstimatePending(reading=True)


def settled(models, nodes, estimates=None):
    """The pods, statuses and Secrets once the operator before the restart had converged."""
    pods = []
    for _ in range(4):
        result = run(models, nodes, pods, estimates=estimates)
        pods = step(pods, result)
    written = {u.model.key: u for u in result.statuses}
    models = [replace(m, status={**m.status, **_written(written[m.key].status)}) for m in models]
    return models, [replace(p, ready=True) for p in pods]


def _written(patch):
    return {k: v for k, v in patch.items() if v is not None}


def test_a_model_still_being_sized_never_flips_its_share_groups_holder() -> None:
    """A may scale to zero and keep warm: its group's holders answer requests, a pod of another name
    and its replicas of another template. With A unsized and B (same group) sized, the group was taken
    for a plain one: B was rolled and a second holder loaded the same weights on the same device, and
    rolled back once A was sized (or never, while A's read kept failing)."""
    warm = {"minReplicas": 0, "idleSeconds": 300, "keepWarm": "Always"}
    a = model("a", replicas=1, shareGroup="g", scaling=warm)
    b = model("b", replicas=2, shareGroup="g")
    nodes = [node("n1", devices=1)]
    models, pods = settled([a, b], nodes)
    after_restart = run(models, nodes, pods, estimates={a.key: READING, b.key: estimate()})
    assert after_restart.create == [] and after_restart.delete == []


def test_a_model_still_being_sized_keeps_its_placeholders() -> None:
    """Deleted as "no longer in the plan", the autoscaler stopped seeing what the model asks for."""
    m = model("big", 3)
    est = {m.key: estimate(weights=12 * 1024, per_replica=3 * 1024)}
    nodes = [node("n1", devices=1)]
    pods = as_pods(run([m], nodes, estimates=est).create)
    pods += as_pods(run([m], nodes, pods, estimates=est).create)
    assert [p.role for p in pods].count(api.ROLE_PLACEHOLDER) == 2
    after_restart = run([m], nodes, pods, estimates={m.key: READING})
    assert after_restart.delete == [] and after_restart.create == []


def test_a_model_still_being_sized_keeps_its_groups_key_secret() -> None:
    """A model at zero replicas with no warm holder has no pod to mount its key: unsized, its group had
    no model the planner knew of, and its Secret was deleted, then made again with a new key."""
    m = model("asleep", replicas=0, shareGroup="g")
    secrets = keys_for([m])
    after_restart = run([m], [node("n1")], estimates={m.key: READING}, secrets=secrets)
    assert after_restart.delete_secrets == [] and after_restart.create_secrets == []
    deleted = replace(m, deleting=True)  # (once no model names it, it goes)
    gone = run([deleted], [node("n1")], estimates={m.key: READING}, secrets=secrets)
    assert [d.name for d in gone.delete_secrets] == [secrets[0].name]


def test_a_model_sized_before_the_restart_keeps_its_status_while_sized_again() -> None:
    """Its status went to Estimating with no placements, with an Event, then back: two status writes and
    an Event per model at every restart."""
    m = model("llama", replicas=2)
    nodes = [node("n1", devices=1)]
    models, pods = settled([m], nodes)
    (m,) = models
    assert m.status["phase"] == "Ready" and m.status["observedGeneration"] == m.generation
    (update,) = run([m], nodes, pods, estimates={m.key: READING}).statuses
    assert not update.changed and update.events == () and update.placed == 2
    # A spec changed since (a new generation) is Estimating as before, and says so.
    changed = replace(m, generation=m.generation + 1)
    (update,) = run([changed], nodes, pods, estimates={m.key: READING}).statuses
    assert update.changed and update.status["observedGeneration"] == m.generation + 1
    assert [e.reason for e in update.events] == ["Estimating"]
