"""A Service per InferenceModel, planned by the pure pass: created once, never touched when the name
is someone else's, its URL in status.endpoint."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from test_planner import NOW, as_pods, estimate, model, node, run

from vnpu import api
from vnpu.api import service_name, warm_service_name
from vnpu.gateway.discovery import PORT_NAME
from vnpu.operator.planner import Failure
from vnpu.operator.pods import RUNTIME_PORT_NAME
from vnpu.operator.services import render_service
from vnpu.operator.state import ObservedService, parse_service

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def created(result) -> list[ObservedService]:
    """The plan's Services as the informer would see them once created."""
    return [
        parse_service({**(m := render_service(i)), "metadata": {**m["metadata"], "uid": f"svc-{i.name}"}})
        for i in result.create_services
    ]


def conditions(result, i: int = 0) -> dict[str, dict]:
    return {c["type"]: c for c in result.statuses[i].status["conditions"]}


def test_a_served_model_gets_a_service_selecting_its_replicas_only() -> None:
    m = model("llama", replicas=2)
    first = run([m], [node("n1", devices=1)])
    (intent,) = first.create_services
    svc = render_service(intent)
    assert svc["metadata"]["name"] == "vnpu-llama" and svc["metadata"]["namespace"] == "ns"
    assert svc["metadata"]["labels"] == {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE, api.LABEL_MODEL: "llama"}
    (owner,) = svc["metadata"]["ownerReferences"]
    assert owner["uid"] == "uid-llama" and owner["kind"] == api.KIND
    assert owner["controller"] is True and owner["blockOwnerDeletion"] is True
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"}]
    # The port name the gateway reads from the EndpointSlices, and the replicas' container port name.
    assert PORT_NAME == RUNTIME_PORT_NAME == "http"
    selector = svc["spec"]["selector"].items()
    selected = {
        p["metadata"]["labels"][api.LABEL_ROLE]
        for p in first.create
        if selector <= p["metadata"]["labels"].items()
    }
    assert selected == {api.ROLE_REPLICA} and len(first.create) == 3  # not the weight-holder
    assert "endpoint" not in first.statuses[0].status  # not before the Service exists

    second = run([m], [node("n1", devices=1)], services=created(first))
    assert second.create_services == []
    assert second.statuses[0].status["endpoint"] == "http://vnpu-llama.ns.svc:80"


def test_a_deleted_service_is_created_again_and_its_endpoint_dropped_meanwhile() -> None:
    m = model("llama")
    served = run([m], [node("n1")], services=created(run([m], [node("n1")])))
    with_endpoint = replace(m, status=served.statuses[0].status)
    again = run([with_endpoint], [node("n1")], services=[])
    assert [i.name for i in again.create_services] == ["vnpu-llama"]
    assert again.statuses[0].status["endpoint"] is None  # merge patch: removes the field
    assert again.statuses[0].changed


def test_a_foreign_service_with_the_name_is_left_alone_and_the_model_says_why() -> None:
    m = model("llama", replicas=1)
    users = ObservedService("ns", "vnpu-llama", "uid-users", controller_uid=None, terminating=False)
    result = run([m], [node("n1")], services=[users])
    assert result.create_services == []
    assert result.create, "the model's pods are created all the same"
    degraded = conditions(result)["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "ServiceNameTaken"
    assert "vnpu-llama" in degraded["message"] and "not this model's" in degraded["message"]
    assert "endpoint" not in result.statuses[0].status
    # Another model's Service of that name (a previous model of the same name, say) is not ours either.
    other = replace(users, controller_uid="uid-previous")
    assert conditions(run([m], [node("n1")], services=[other]))["Degraded"]["reason"] == "ServiceNameTaken"


def test_no_service_for_a_model_being_deleted_or_in_backoff() -> None:
    m = model("llama")
    assert run([replace(m, deleting=True)], [node("n1")]).create_services == []
    failing = {"ns/llama": Failure("refused", NOW.replace(hour=13))}
    assert run([m], [node("n1")], failures=failing).create_services == []


@pytest.mark.parametrize(
    "name",
    ["llama", "7b", "a" * 58, "a" * 59, "llama-3.1-8b-instruct", "x" * 253, "a.b." + "c" * 200],
)
def test_service_names_are_dns_labels_and_distinct(name: str) -> None:
    svc = service_name(name)
    assert DNS1035.match(svc), svc
    assert svc == service_name(name)
    if DNS1035.match(f"vnpu-{name}") and len(name) <= 58:
        assert svc == f"vnpu-{name}"
    else:
        assert svc != service_name(name + "x") and svc.startswith("vnpu-")


def serving_model(name: str = "chat", keep_warm: str = "Always", **spec):
    return model(
        name,
        replicas=1,
        scaling={"minReplicas": 0, "keepWarm": keep_warm},
        memory={"maxContextTokens": 4096, "maxBatch": 8},
        **spec,
    )


def test_a_model_at_zero_is_answered_by_its_holder_through_a_warm_service() -> None:
    """minReplicas 0 with keepWarm Always or Auto: the holder runs ``--serve`` (one sequence, the
    model's context, the http port), its slices hold that beside the weights, and a
    warm Service selects the group's holders, labelled for the gateway."""
    m = serving_model()
    est = replace(estimate(weights=4096), holder_serving_mib=600)
    first = run([m], [node("n1", devices=1)], estimates={m.key: est})
    (holder,) = [p for p in first.create if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_WEIGHTS]
    (container,) = holder["spec"]["containers"]
    assert container["args"][:4] == ["vnpu", "runtime", "weights-holder", "--serve"]
    assert container["ports"] == [{"name": RUNTIME_PORT_NAME, "containerPort": 8000}]
    # Ready when it holds, as before: its replicas' readiness counts on it even where it cannot serve.
    assert "readinessProbe" not in container
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VNPU_MAX_BATCH"] == "1" and env["VNPU_MAX_CONTEXT"] == "4096"
    assert holder["metadata"]["annotations"][api.ANNOTATION_SLICES] == "5"  # 4096 + 600 MiB in 1 GiB slices
    own, warm = sorted(first.create_services, key=lambda i: i.warm)
    assert (own.name, warm.name) == ("vnpu-chat", warm_service_name("chat"))
    svc = render_service(warm)
    assert svc["metadata"]["labels"][api.LABEL_MODEL] == "chat"
    assert svc["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_WEIGHTS
    selector = svc["spec"]["selector"].items()
    assert [p["metadata"]["name"] for p in first.create if selector <= p["metadata"]["labels"].items()] == [
        holder["metadata"]["name"]
    ]
    assert warm_service_name("chat") not in {service_name(n) for n in ("chat", "chat-warm", "chat.warm")}
    # Created once: the next pass has both.
    again = run([m], [node("n1", devices=1)], estimates={m.key: est}, services=created(first))
    assert again.create_services == []


def test_a_serving_holder_takes_the_longest_context_any_of_its_models_replicas_take() -> None:
    """Two models of one weights in one share group, both at zero: one holder answers for both, at the
    longer context. A spec that gives only ``kvCacheMiB`` runs at the runtime's default context, and
    its holder was sized for one sequence of it (:mod:`vnpu.memory`): the holder must not refuse that
    model's longer prompts, which its replicas take."""
    at_zero = {"minReplicas": 0, "keepWarm": "Always"}
    short = model(
        "short", 1, shareGroup="team", scaling=at_zero, memory={"maxContextTokens": 512, "maxBatch": 4}
    )
    pool = model("pool", 1, shareGroup="team", scaling=at_zero, memory={"kvCacheMiB": 2048})
    result = run([short, pool], [node("n1", devices=1)])
    (holder,) = _holders(result.create)
    env = {e["name"]: e.get("value") for e in holder["spec"]["containers"][0]["env"]}
    assert env["VNPU_MAX_CONTEXT"] == str(api.DEFAULT_MAX_CONTEXT)
    alone = run([short], [node("n1", devices=1)])
    (holder,) = _holders(alone.create)
    env = {e["name"]: e.get("value") for e in holder["spec"]["containers"][0]["env"]}
    assert env["VNPU_MAX_CONTEXT"] == "512"


def test_each_model_drains_its_own_requests_and_a_serving_holder_the_longest() -> None:
    """``runtime.drainSeconds``: a model's replicas give their requests in flight that long at SIGTERM,
    and their pods' grace follows; a serving holder answers for each of its models, so it drains as
    long as the longest of them. A holder's grace is the longest any model may set: it outlives spec
    changes, and exits as soon as no replica is attached."""
    at_zero = {"minReplicas": 0, "keepWarm": "Always"}
    quick = model("quick", 1, shareGroup="team", scaling=at_zero)
    slow = model("slow", 1, shareGroup="team", scaling=at_zero, runtime={"drainSeconds": 900})
    result = run([quick, slow], [node("n1", devices=1)])
    (holder,) = _holders(result.create)
    env = {e["name"]: e.get("value") for e in holder["spec"]["containers"][0]["env"]}
    assert env["VNPU_REQUEST_DRAIN_SECONDS"] == "900"
    assert holder["spec"]["terminationGracePeriodSeconds"] == api.HOLDER_GRACE_S > api.MAX_DRAIN_S
    replicas = {
        p["metadata"]["labels"][api.LABEL_MODEL]: p
        for p in result.create
        if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_REPLICA
    }
    for name, drain in (("quick", api.REPLICA_DRAIN_S), ("slow", 900)):
        pod = replicas[name]
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["VNPU_REQUEST_DRAIN_SECONDS"] == str(drain)
        assert pod["spec"]["terminationGracePeriodSeconds"] == drain + api.GRACE_MARGIN_S


@pytest.mark.parametrize(
    "scaling",
    [{"minReplicas": 1}, {"minReplicas": 0, "keepWarm": "Never"}],
    ids=["never-at-zero", "keep-warm-never"],
)
def test_no_serving_holder_or_warm_service_unless_min_replicas_0_keeps_its_holder(scaling) -> None:
    m = model("chat", replicas=1, scaling=scaling)
    est = replace(estimate(weights=4096), holder_serving_mib=600)
    result = run([m], [node("n1", devices=1)], estimates={m.key: est})
    (holder,) = [p for p in result.create if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_WEIGHTS]
    assert "--serve" not in holder["spec"]["containers"][0]["args"]
    assert "ports" not in holder["spec"]["containers"][0]
    assert holder["metadata"]["annotations"][api.ANNOTATION_SLICES] == "4"
    assert [i.name for i in result.create_services] == ["vnpu-chat"]


def test_turning_on_a_serving_holder_rolls_the_replicas_onto_it_without_pulling_the_old_one() -> None:
    """keepWarm Never -> Always on a running model: the serving holder is a new pod, so its replicas are
    of a new template and roll onto it (surge first), while the old replica keeps the holder it maps."""
    never = model("chat", replicas=1, scaling={"minReplicas": 0, "keepWarm": "Never"})
    nodes = [node("n1", devices=1)]
    pods = as_pods(run([never], nodes).create)
    (old_holder,) = [p for p in pods if p.role == api.ROLE_WEIGHTS]
    (old_replica,) = [p for p in pods if p.role == api.ROLE_REPLICA]
    always = replace(serving_model(), generation=2)
    rolled = run([always], nodes, pods)
    created = {p["metadata"]["labels"][api.LABEL_ROLE]: p for p in rolled.create}
    assert set(created) == {api.ROLE_WEIGHTS, api.ROLE_REPLICA}
    assert "--serve" in created[api.ROLE_WEIGHTS]["spec"]["containers"][0]["args"]
    new_holder = created[api.ROLE_WEIGHTS]["metadata"]["name"]
    assert created[api.ROLE_REPLICA]["metadata"]["annotations"][api.ANNOTATION_WEIGHT_HOLDER] == new_holder
    assert rolled.delete == [], "nothing goes before the new replica is Ready"
    # Once it is, the old replica goes, and then its holder.
    pods = [*pods, *as_pods(rolled.create)]
    done = run([always], nodes, pods)
    assert {d.name for d in done.delete} == {old_replica.name}
    pods = [p for p in pods if p.name != old_replica.name]
    assert {d.name for d in run([always], nodes, pods).delete} == {old_holder.name}


def _holders(manifests) -> list[dict]:
    return [p for p in manifests if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_WEIGHTS]


def _source(pod: dict) -> str:
    (container,) = pod["spec"]["containers"]
    return next(e["value"] for e in container["env"] if e["name"] == "VNPU_MODEL_URI")


def _two_weights_in_one_group():
    """Two models in one explicit shareGroup with different weights: a holder each (both answering)."""
    at_zero = {"minReplicas": 0, "keepWarm": "Always"}
    return [
        model(name, 1, shareGroup="team", source={"uri": f"file:///{name}.gguf"}, scaling=at_zero)
        for name in ("llama", "mistral")
    ]


def test_a_warm_service_selects_only_the_holders_of_its_models_weights() -> None:
    """A holder answers whatever model name it is asked: a warm Service selecting the share group's
    holders alone would send llama's requests at zero replicas to mistral's holder, and the client
    would get mistral's answer under llama's name."""
    models = _two_weights_in_one_group()
    result = run(models, [node("n1")])
    holders = _holders(result.create)
    assert sorted(_source(h) for h in holders) == ["file:///llama.gguf", "file:///mistral.gguf"]
    for intent in [i for i in result.create_services if i.warm]:
        selector = render_service(intent)["spec"]["selector"].items()
        selected = [_source(h) for h in holders if selector <= h["metadata"]["labels"].items()]
        assert selected == [f"file:///{intent.owner.name}.gguf"], intent.owner.name
    # A label value: at most 63 characters, whatever the weights' URI.
    assert all(len(h["metadata"]["labels"][api.LABEL_WEIGHTS]) <= 63 for h in holders)


def test_a_warm_service_from_before_the_weights_label_gets_the_selector_it_wants() -> None:
    """A Service is patched in place (its ClusterIP and EndpointSlices stay), never deleted and created
    again; one with the selector it wants, or one being created, is left alone."""
    models = _two_weights_in_one_group()
    first = run(models, [node("n1")])
    services = created(first)
    wanted = {s.name: dict(s.selector or {}) for s in services}
    old = [
        replace(s, selector={k: v for k, v in (s.selector or {}).items() if k != api.LABEL_WEIGHTS})
        for s in services
    ]
    pods = as_pods(first.create)
    again = run(models, [node("n1")], pods, services=old)
    assert again.create_services == []
    warm = {warm_service_name("llama"), warm_service_name("mistral")}
    assert {(u.name, u.owner) for u in again.update_services} == {
        (warm_service_name("llama"), "ns/llama"),
        (warm_service_name("mistral"), "ns/mistral"),
    }
    for u in again.update_services:
        assert dict(u.selector) == wanted[u.name] and api.LABEL_WEIGHTS in u.selector
    # The model's own Service, its selector changed by someone: put back too.
    own = next(s for s in services if s.name == "vnpu-llama")
    edited = [replace(own, selector={"app": "other"}), *(s for s in services if s.name != "vnpu-llama")]
    (update,) = run(models, [node("n1")], pods, services=edited).update_services
    assert (update.name, dict(update.selector)) == ("vnpu-llama", wanted["vnpu-llama"])
    assert run(models, [node("n1")], pods, services=services).update_services == []
    pending = [replace(s, selector=None, pending=True) if s.name in warm else s for s in old]
    assert run(models, [node("n1")], pods, services=pending).update_services == []


def test_a_holder_from_before_the_weights_label_gets_it_also_kept_warm_at_zero() -> None:
    """Else the new selector selects nothing, and a model at zero loses its warm route until its
    holder is replaced."""
    models = _two_weights_in_one_group()
    first = run(models, [node("n1")])
    labelled = {
        h["metadata"]["name"]: h["metadata"]["labels"][api.LABEL_WEIGHTS] for h in _holders(first.create)
    }
    unlabelled = [
        replace(p, weights=None) if p.role == api.ROLE_WEIGHTS else p for p in as_pods(first.create)
    ]
    again = run(models, [node("n1")], unlabelled)
    assert again.create == [] and again.delete == []
    assert {u.name: dict(u.labels) for u in again.set_labels} == {
        name: {api.LABEL_WEIGHTS: value} for name, value in labelled.items()
    }
    assert run(models, [node("n1")], as_pods(first.create)).set_labels == []
    # At zero replicas the holders are kept warm outside the plan: labelled all the same.
    at_zero = [replace(m, spec=replace(m.spec, replicas=0)) for m in models]
    holders_only = [p for p in unlabelled if p.role == api.ROLE_WEIGHTS]
    warm = run(at_zero, [node("n1")], holders_only)
    assert warm.delete == []
    assert {u.name for u in warm.set_labels} == set(labelled)
    assert {u.models for u in warm.set_labels} == {("ns/llama",), ("ns/mistral",)}
