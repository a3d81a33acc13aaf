"""The gateway's pure parts: model names, picking a replica, API keys, parsing watch objects (and the
watch loop, fed by fakes), activity annotations."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnpu import api
from vnpu.gateway.activity import ahead_of, merged_activity
from vnpu.gateway.discovery import Discovery, parse_model, parse_slice
from vnpu.gateway.keys import KeyFileError, KeyRing, parse_keys
from vnpu.gateway.routing import Endpoint, ModelKey, Route, RouteTable, pick
from vnpu.gateway.server import kv_usage_of

A, B, C = Endpoint("10.0.0.1", 8000), Endpoint("10.0.0.2", 8000), Endpoint("10.0.0.3", 8000)


def route(ns: str, name: str, model_name: str, *endpoints: Endpoint, replicas: int = 1) -> Route:
    return Route(ModelKey(ns, name), model_name, replicas, 1, tuple(endpoints))


def table(*routes: Route) -> RouteTable:
    return RouteTable({r.key: r for r in routes})


def test_a_model_answers_to_its_qualified_name_and_to_its_bare_name_when_unique() -> None:
    t = table(route("team-a", "chat", "smollm2", A), route("team-a", "coder", "qwen", B))
    assert t.resolve("smollm2", None).key == ModelKey("team-a", "chat")
    assert t.resolve("team-a/qwen", None).key == ModelKey("team-a", "coder")
    assert t.resolve("llama", None) is None and t.resolve("team-b/smollm2", None) is None
    assert t.listed(None) == ["qwen", "smollm2", "team-a/qwen", "team-a/smollm2"]


def test_a_bare_name_two_namespaces_serve_is_never_a_guess_between_tenants() -> None:
    t = table(route("team-a", "chat", "smollm2", A), route("team-b", "chat", "smollm2", B))
    assert t.resolve("smollm2", None) is None
    assert t.resolve("team-b/smollm2", None).key.namespace == "team-b"
    assert t.listed(None) == ["team-a/smollm2", "team-b/smollm2"]
    # A caller allowed only team-a's has one candidate for the bare name: it is team-a's.
    team_a = [t.routes[ModelKey("team-a", "chat")]]
    assert t.resolve("smollm2", team_a) is team_a[0]
    assert t.listed(team_a) == ["smollm2", "team-a/smollm2"]


HF = "meta-llama/Llama-3.1-8B"


def test_a_model_name_with_a_slash_answers_to_its_bare_name() -> None:
    """A Hugging Face id is a modelName the CRD allows: its bare name is not <namespace>/<name>."""
    t = table(route("team-a", "llama", HF, A))
    assert t.resolve(HF, None).key == ModelKey("team-a", "llama")
    assert t.resolve(f"team-a/{HF}", None).key == ModelKey("team-a", "llama")
    assert t.listed(None) == [HF, f"team-a/{HF}"]


def test_a_namespace_named_like_a_models_prefix_makes_the_name_ambiguous_never_captures_it() -> None:
    """Namespace meta-llama serving Llama-3.1-8B has the qualified name team-a's model has as bare name:
    no caller who may call both gets either, and each tenant's scoped key gets its own."""
    victim, squatter = route("team-a", "llama", HF, A), route("meta-llama", "x", "Llama-3.1-8B", B)
    t = table(victim, squatter)
    assert t.resolve(HF, None) is None and HF not in t.listed(None)
    assert t.resolve(f"team-a/{HF}", None) is victim
    assert t.resolve(HF, [victim]) is victim and t.listed([victim]) == [HF, f"team-a/{HF}"]
    assert t.resolve(HF, [squatter]) is squatter


def test_a_model_named_like_another_namespaces_qualified_name_never_captures_it() -> None:
    theirs, mine = route("team-b", "chat", "chat", A), route("team-a", "x", "team-b/chat", B)
    t = table(theirs, mine)
    assert t.resolve("team-b/chat", None) is None  # ambiguous: a 404, not team-a's model
    assert t.resolve("team-b/chat", [theirs]) is theirs
    assert t.resolve("team-a/team-b/chat", None) is mine


_names = st.text(alphabet="ab/", min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), _names), max_size=6), st.data())
def test_a_name_resolves_only_to_one_allowed_route_answering_to_it_and_is_listed_iff_it_resolves(
    served, data
) -> None:
    """Namespaces and modelNames from one small alphabet with '/', so qualified and bare names collide."""
    t = table(*(route(ns, f"m{i}", name) for i, (ns, name) in enumerate(served)))
    every = list(t.routes.values())
    allowed = data.draw(st.none() | st.lists(st.sampled_from(every), unique=True)) if every else None
    pool = list(t.routes.values()) if allowed is None else allowed
    listed = t.listed(allowed)
    names = {n for r in t.routes.values() for n in (r.qualified_name, r.model_name)} | {"a", "a/b", "b/a"}
    for name in names:
        found = t.resolve(name, allowed)
        assert (name in listed) == (found is not None)
        if found is not None:
            assert found in pool and name in (found.qualified_name, found.model_name)
            others = [r for r in pool if r is not found and name in (r.qualified_name, r.model_name)]
            assert not others
    assert set(listed) <= names


def test_pick_prefers_fewest_outstanding_then_least_kv_then_rotates() -> None:
    assert pick([A, B, C], {A: 2, B: 1, C: 1}, {B: 0.5, C: 0.2}) == C
    assert pick([A, B, C], {A: 2, B: 1, C: 1}, {B: 0.2, C: 0.5}) == B
    assert pick([A, B], {}, {A: 0.1}) == A  # unknown usage counts as full
    assert {pick([A, B], {}, {}, turn=t) for t in range(2)} == {A, B}
    assert pick([A, B], {}, {}, exclude=[A, B]) is None
    assert pick([A, B], {B: 5}, {}, exclude=[A]) == B


@settings(max_examples=200, deadline=None)
@given(
    load=st.dictionaries(st.sampled_from([A, B, C]), st.integers(0, 5)),
    usage=st.dictionaries(st.sampled_from([A, B, C]), st.floats(0, 1)),
    turn=st.integers(0, 100),
    excluded=st.sets(st.sampled_from([A, B, C]), max_size=2),
)
def test_pick_never_chooses_a_busier_endpoint(load, usage, turn, excluded) -> None:
    chosen = pick([A, B, C], load, usage, turn=turn, exclude=excluded)
    assert chosen is not None and chosen not in excluded
    for other in {A, B, C} - excluded:
        assert (load.get(chosen, 0), usage.get(chosen, 1.0)) <= (load.get(other, 0), usage.get(other, 1.0))


def test_api_keys_are_kept_as_digests_and_match_patterns(tmp_path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        "keys:\n"
        f"  - {{name: a, sha256: {hashlib.sha256(b'team-a-secret').hexdigest()}, models: ['team-a/*']}}\n"
        "  - {name: ops, key: ops-secret-1, models: ['*']}\n"
    )
    ring = KeyRing(path)
    team_a = ring.authenticate("Bearer team-a-secret")
    assert team_a is not None and team_a.name == "a"
    assert team_a.allows(route("team-a", "chat", "smollm2")) and not team_a.allows(route("team-b", "x", "x"))
    assert ring.authenticate("Bearer ops-secret-1").name == "ops"
    # ("\udcff": a header byte that is not UTF-8, as aiohttp passes it on)
    for header in (None, "", "Bearer wrong", "Basic team-a-secret", "team-a-secret", "Bearer \udcff\udcfe"):
        assert ring.authenticate(header) is None
    assert all(len(k.digest) == 32 for k in ring._keys)  # no key in the clear in memory


def test_a_keys_priority_limit_is_its_models_own_unless_it_may_ask_for_more() -> None:
    plain, pager = parse_keys(
        {
            "keys": [
                {"name": "app", "key": "app-secret-1", "models": ["*"]},
                {"name": "pager", "key": "pager-secret", "models": ["*"], "maxPriority": 100},
            ]
        }
    )
    assert (plain.max_priority, pager.max_priority) == (None, 100)
    assert plain.priority_limit(5) == 5 and plain.priority_limit(-2) == -2
    assert pager.priority_limit(5) == 100 and pager.priority_limit(500) == 500  # never below the model's


def test_a_pattern_with_a_slash_names_namespaces_never_another_tenants_model_name() -> None:
    """A modelName may hold '/': matched against bare names, ``team-a/*`` took in any namespace's model
    named ``team-a/...``, which team-a's key could then call and which made team-a's names ambiguous."""
    scoped, by_name, hf = parse_keys(
        {
            "keys": [
                {"name": "a", "key": "team-a-secret", "models": ["team-a/*"]},
                {"name": "s", "key": "smollm2-any", "models": ["smollm2"]},
                {"name": "h", "key": "hf-qualified", "models": ["team-a/meta-llama/*"]},
            ]
        }
    )
    mine, squatter = route("team-a", "chat", "chat"), route("evil", "x", "team-a/chat")
    assert scoped.allows(mine) and not scoped.allows(squatter)
    assert scoped.allows(route("team-a", "llama", "meta-llama/Llama-3.1-8B"))
    t = table(mine, squatter)
    visible = [r for r in t.routes.values() if scoped.allows(r)]
    assert t.resolve("team-a/chat", visible) is mine and t.listed(visible) == ["chat", "team-a/chat"]
    # A pattern without '/' still names a bare modelName in any namespace, as before.
    assert by_name.allows(route("team-b", "c", "smollm2")) and not by_name.allows(route("x", "y", "smollm2x"))
    assert hf.allows(route("team-a", "llama", "meta-llama/Llama-3.1-8B"))
    assert not hf.allows(route("meta-llama", "x", "Llama-3.1-8B"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nope": []}, "a 'keys' list"),
        ({"keys": [{"name": "x", "models": ["*"]}]}, "exactly one of 'key' or 'sha256'"),
        ({"keys": [{"name": "x", "key": "short", "models": ["*"]}]}, "at least 8 characters"),
        ({"keys": [{"name": "x", "sha256": "zz", "models": ["*"]}]}, "64 hex characters"),
        ({"keys": [{"name": "x", "key": "long-enough", "models": []}]}, "non-empty list"),
        ({"keys": [{"name": "x", "key": "long-enough", "models": ["*"], "maxPriority": "9"}]}, "32-bit"),
        ({"keys": [{"name": "x", "key": "long-enough", "models": ["*"], "maxPriority": True}]}, "32-bit"),
        ({"keys": [{"name": "x", "key": "long-enough", "models": ["*"], "maxPriority": 2**31}]}, "32-bit"),
    ],
)
def test_a_bad_keys_file_is_refused_with_the_entry_named(data, message) -> None:
    with pytest.raises(KeyFileError, match=message):
        parse_keys(data)


def test_watch_objects_parse_into_routes() -> None:
    model = {"metadata": {"namespace": "ns", "name": "chat"},
             "spec": {"modelName": "smollm2", "replicas": 0, "scaling": {"minReplicas": 0}}}  # fmt: skip
    info = parse_model(model)
    assert info is not None and (info.model_name, info.replicas, info.min_replicas) == ("smollm2", 0, 0)
    assert parse_model({"metadata": {"namespace": "ns", "name": "x"}, "spec": {}}).min_replicas == 1
    assert (
        parse_model({"metadata": {"namespace": "ns", "name": "x"}, "spec": {}}).priority
        == api.DEFAULT_PRIORITY
    )
    assert parse_model({"metadata": {"namespace": "ns", "name": "x"}, "spec": {"priority": 7}}).priority == 7
    assert parse_model({**model, "metadata": {**model["metadata"], "deletionTimestamp": "now"}}) is None
    slice_ = {
        "metadata": {"namespace": "ns", "name": "chat-abc", "labels": controller_labels("chat")},
        "ports": [{"name": "metrics", "port": 9000}, {"name": "http", "port": 8000}],
        "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "targetRef": {"name": "chat-0"}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": True, "terminating": True}},
            {"addresses": ["10.0.0.4"]},  # unset readiness means ready
        ],
    }
    parsed = parse_slice(slice_)
    assert parsed.key == ModelKey("ns", "chat") and not parsed.warm
    assert parsed.endpoints == (Endpoint("10.0.0.1", 8000, "chat-0"), Endpoint("10.0.0.4", 8000))
    assert parse_slice({"metadata": {"name": "other", "labels": {}}}) is None
    warm_labels = controller_labels("chat", warm=True)
    assert parse_slice({**slice_, "metadata": {**slice_["metadata"], "labels": warm_labels}}).warm


def controller_labels(model: str, *, warm: bool = False) -> dict[str, str]:
    """The labels of an EndpointSlice the EndpointSlice controller made for ``model``'s Service."""
    service = api.warm_service_name(model) if warm else api.service_name(model)
    labels = {
        api.LABEL_MODEL: model,
        api.LABEL_SLICE_SERVICE: service,
        api.LABEL_SLICE_MANAGED_BY: api.SLICE_CONTROLLER,
    }
    return labels | ({api.LABEL_ROLE: api.ROLE_WEIGHTS} if warm else {})


@pytest.mark.parametrize(
    "labels",
    [
        # Written by hand (anyone granted EndpointSlice writes), or mirrored from a selector-less Service.
        {api.LABEL_MODEL: "chat", api.LABEL_SLICE_SERVICE: "vnpu-chat"},
        controller_labels("chat") | {api.LABEL_SLICE_MANAGED_BY: "endpointslicemirroring-controller.k8s.io"},
        # The controller's, of a Service that is not the model's (any Service labelled with its name).
        controller_labels("chat") | {api.LABEL_SLICE_SERVICE: "my-own-service"},
        controller_labels("chat") | {api.LABEL_SLICE_SERVICE: api.service_name("other")},
    ],
)
def test_only_the_controllers_slices_of_the_models_own_services_give_it_endpoints(labels) -> None:
    """The gateway passes every NetworkPolicy the operator writes: a slice pointing at another
    namespace's pods would make it their proxy."""
    slice_ = {
        "metadata": {"namespace": "team-a", "name": "chat-x", "labels": labels},
        "ports": [{"name": "http", "port": 8000}],
        "endpoints": [
            {"addresses": ["10.9.9.9"], "targetRef": {"name": "team-b-pod", "namespace": "team-b"}}
        ],
    }
    assert parse_slice(slice_) is None


@pytest.mark.parametrize(
    ("scaling", "serves"),
    [
        ({"minReplicas": 0}, True),  # keepWarm defaults to Auto
        ({"minReplicas": 0, "keepWarm": "Always"}, True),
        ({"minReplicas": 0, "keepWarm": "Never"}, False),
        ({}, False),  # minReplicas defaults to 1: never at zero
    ],
)
def test_a_models_holders_serve_it_only_while_no_replica_is_ready(scaling, serves) -> None:
    """The operator and the gateway ask vnpu.api.holder_serves alike; a route's targets are its ready
    replicas, and its warm holders only while it has none and its spec lets them answer."""
    info = parse_model({"metadata": {"namespace": "ns", "name": "chat"}, "spec": {"scaling": scaling}})
    assert info.holder_serves is serves
    replica, holder = Endpoint("10.0.0.1", 8000, "chat-0"), Endpoint("10.0.0.9", 8000, "holder")
    route = Route(ModelKey("ns", "chat"), "chat", 0, 0, warm=(holder,), holder_serves=serves)
    assert route.targets == ((holder,) if serves else ())
    assert replace(route, endpoints=(replica,)).targets == (replica,)


def test_activity_annotations_add_and_keep_the_latest_time() -> None:
    t1 = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)
    first = merged_activity({}, 3, t1, t1)
    assert first == {api.ANNOTATION_REQUESTS: "3", api.ANNOTATION_LAST_REQUEST: "2026-12-01T10:00:00Z"}
    # Another gateway's flush with an older request time: counts add, the time stays the latest.
    second = merged_activity(first, 2, t1 - dt.timedelta(minutes=5), t1)
    assert second == {api.ANNOTATION_REQUESTS: "5", api.ANNOTATION_LAST_REQUEST: "2026-12-01T10:00:00Z"}
    garbled = merged_activity({api.ANNOTATION_REQUESTS: "lots"}, 1, t1, t1)
    assert garbled[api.ANNOTATION_REQUESTS] == "1"
    # A hand-written time without a zone is read as UTC (not compared naive against aware), junk ignored.
    later = t1 + dt.timedelta(hours=2)
    naive = merged_activity({api.ANNOTATION_LAST_REQUEST: "2026-12-01T11:00:00"}, 1, t1, later)
    assert naive[api.ANNOTATION_LAST_REQUEST] == "2026-12-01T11:00:00Z"
    junk = merged_activity({api.ANNOTATION_LAST_REQUEST: "yesterday"}, 1, t1, t1)
    assert junk[api.ANNOTATION_LAST_REQUEST] == "2026-12-01T10:00:00Z"
    # Values anyone who may edit the model can write: a superscript digit and 5,000 digits (int() raises),
    # a time in the year 10000 once in UTC (formatting raised and ended the flush thread for every model).
    for hostile in ({api.ANNOTATION_REQUESTS: "²"}, {api.ANNOTATION_REQUESTS: "9" * 5000}):
        assert merged_activity(hostile, 1, t1, t1)[api.ANNOTATION_REQUESTS] == "1"
    beyond = merged_activity({api.ANNOTATION_LAST_REQUEST: "9999-12-31T23:59:59-23:59"}, 1, t1, t1)
    assert beyond[api.ANNOTATION_LAST_REQUEST] == "2026-12-01T10:00:00Z"


def test_a_last_request_far_ahead_of_the_clock_is_written_over_never_kept() -> None:
    """A replica whose clock ran a year ahead wrote its time once: max(stored, ours) kept it, so every
    gateway with a right clock left it there, and the model stayed awake (holding its device memory)
    until the clocks reached it. Now a stored time more than the allowed skew ahead is written over;
    one within it (two nodes' clocks a few seconds apart) still counts as the latest."""
    now = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)
    ours = now - dt.timedelta(seconds=5)
    skew = dt.timedelta(seconds=api.LAST_REQUEST_MAX_AHEAD_S)
    a_year_ahead = {api.ANNOTATION_REQUESTS: "7", api.ANNOTATION_LAST_REQUEST: "2027-12-01T10:00:00Z"}
    merged = merged_activity(a_year_ahead, 2, ours, now)
    assert merged == {api.ANNOTATION_REQUESTS: "9", api.ANNOTATION_LAST_REQUEST: "2026-12-01T09:59:55Z"}
    assert ahead_of(a_year_ahead, now) == 365 * 86400
    just_past = {api.ANNOTATION_LAST_REQUEST: api.format_time(now + skew + dt.timedelta(seconds=1))}
    assert merged_activity(just_past, 1, ours, now)[api.ANNOTATION_LAST_REQUEST] == "2026-12-01T09:59:55Z"
    within = {api.ANNOTATION_LAST_REQUEST: api.format_time(now + skew)}
    assert merged_activity(within, 1, ours, now)[api.ANNOTATION_LAST_REQUEST] == api.format_time(now + skew)
    assert ahead_of(within, now) is None and ahead_of({}, now) is None
    # Our own request time is never written past our clock (it stepped back since the request came).
    stepped_back = merged_activity({}, 1, now + dt.timedelta(hours=1), now)
    assert stepped_back[api.ANNOTATION_LAST_REQUEST] == "2026-12-01T10:00:00Z"


def test_kv_usage_is_read_from_the_runtime_metrics() -> None:
    text = "# HELP x\nvnpu_runtime_kv_cache_usage_ratio 0.25\nvnpu_runtime_ready 1.0\n"
    assert kv_usage_of(text) == 0.25 and kv_usage_of("nothing 1") is None


def test_an_object_the_gateway_cannot_parse_keeps_what_was_known_and_blocks_no_sync() -> None:
    """An InferenceModel stored under an older, looser schema is not validated again until written: one
    whose replicas is not a number made every list fail, so the gateway never synced (503 for all)."""

    def model(name: str, replicas: object) -> dict[str, object]:
        return {
            "metadata": {"namespace": "ns", "name": name},
            "spec": {"modelName": name, "replicas": replicas},
        }

    discovery = Discovery(api_client=None)
    discovery.replace_all("models", [model("good", 2), model("odd", "lots")])
    assert discovery.synced["models"].is_set()
    assert sorted(discovery.table.routes) == [ModelKey("ns", "good")]
    # A later change the parser fails on keeps the route it had; a good one replaces it; a relist too.
    discovery.apply_model("MODIFIED", model("good", "lots"))
    assert discovery.table.routes[ModelKey("ns", "good")].replicas == 2
    discovery.replace_all("models", [model("good", "lots")])
    assert discovery.table.routes[ModelKey("ns", "good")].replicas == 2
    discovery.apply_model("MODIFIED", model("good", 3))
    assert discovery.table.routes[ModelKey("ns", "good")].replicas == 3
    discovery.apply_model("DELETED", model("good", 3))
    assert not discovery.table.routes


def test_a_gateway_of_several_namespaces_syncs_once_all_are_listed_and_a_relist_drops_what_went() -> None:
    """Ready after its first namespace's list, the gateway answered 404 for the other namespaces' models;
    and a namespace listed again after a broken watch kept the models deleted meanwhile, routing to them."""

    def model(namespace: str, name: str) -> dict[str, object]:
        return {"metadata": {"namespace": namespace, "name": name}, "spec": {"modelName": name}}

    discovery = Discovery(api_client=None, namespaces=("team-a", "team-b"))
    discovery.replace_all("models", [model("team-a", "chat")], "team-a")
    assert not discovery.synced["models"].is_set()  # team-b not listed yet
    discovery.replace_all("models", [model("team-b", "chat"), model("team-b", "code")], "team-b")
    assert discovery.synced["models"].is_set()
    # team-b's watch broke; meanwhile "code" was deleted. Its relist drops it and leaves team-a alone.
    discovery.replace_all("models", [model("team-b", "chat")], "team-b")
    assert set(discovery.table.routes) == {ModelKey("team-a", "chat"), ModelKey("team-b", "chat")}
    slice_ = {
        "metadata": {"namespace": "team-a", "name": "chat-x", "labels": controller_labels("chat")},
        "ports": [{"name": "http", "port": 8000}],
        "endpoints": [{"addresses": ["10.0.0.1"], "targetRef": {"name": "chat-0"}}],
    }
    discovery.replace_all("slices", [slice_], "team-a")
    discovery.replace_all("slices", [], "team-b")
    assert discovery.synced["slices"].is_set()
    assert [e.address for e in discovery.table.routes[ModelKey("team-a", "chat")].endpoints] == ["10.0.0.1"]
    discovery.replace_all("slices", [], "team-a")  # the slice went while team-a's watch was down
    assert discovery.table.routes[ModelKey("team-a", "chat")].endpoints == ()


def test_a_watch_loop_keeps_only_its_current_watch_however_often_it_relists(monkeypatch, caplog) -> None:
    """Every relist (a watch ends every 5 minutes, or on 410 Gone) appended its Watch to a list that
    nothing emptied: a slow leak for the gateway's lifetime. A loop now holds its current watch only,
    and stop() still reaches it. A 410 is routine: relisted at once, and no warning."""
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    discovery = Discovery(api_client=None)
    made: list[Any] = []
    relists = 5

    class OneEventWatch:
        def __init__(self) -> None:
            made.append(self)
            self.stopped = False

        def stream(self, list_fn: Any, **_: Any) -> Any:
            if len(made) == relists:
                discovery._stop.set()  # (ends the loop after this watch)
            yield {"type": "BOOKMARK", "raw_object": {}}
            # The client raises an ERROR event (a 410 here: Gone, list again) when given timeout_seconds.
            raise ApiException(status=410, reason="Expired: too old resource version")

        def stop(self) -> None:
            self.stopped = True

    def list_models(**_: Any) -> SimpleNamespace:
        return SimpleNamespace(data=json.dumps({"items": [], "metadata": {"resourceVersion": "1"}}))

    monkeypatch.setattr(watch, "Watch", OneEventWatch)
    caplog.set_level(logging.INFO, logger="vnpu.gateway.discovery")
    discovery._watch("models", "team-a", list_models, discovery.apply_model)
    assert len(made) == relists
    assert [r.getMessage() for r in caplog.records] == ["watch expired; listing again"] * (relists - 1)
    assert len(discovery._watches) == 1
    discovery.stop()
    assert made[-1].stopped


# --- relaying server-sent events -------------------------------------------------------------------------

_EVENTS = st.lists(
    st.tuples(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")), st.booleans()),
    max_size=8,
)


@given(events=_EVENTS, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
@settings(max_examples=300, deadline=None)
def test_a_relayed_stream_goes_out_whole_and_only_at_event_ends(
    events: list[tuple[bytes, bool]], cuts: list[int]
) -> None:
    """However the replica's bytes are chunked, the framer passes on exactly what came, each piece
    ending where an event ends (LF or CRLF blank lines, the SSE specification's both), and holds only
    the start of an event whose end has not come."""
    from vnpu.sse import EventFramer

    stream = b"".join(b"data: " + data + (b"\r\n\r\n" if crlf else b"\n\n") for data, crlf in events)
    stream += b"data: unended"
    framer, sent = EventFramer(), b""
    bounds = sorted({min(c, len(stream)) for c in cuts} | {len(stream)})
    start = 0
    for end in bounds:
        piece = framer.feed(stream[start:end])
        assert not piece or piece.endswith((b"\n\n", b"\r\n\r\n")), piece
        sent += piece
        start = end
    assert sent + framer.held == stream
    assert framer.held == b"data: unended"


def test_a_stream_that_never_ends_an_event_is_passed_on_past_the_bound() -> None:
    """A replica (a tenant's own image) that never frames its events cannot make the gateway hold its
    whole answer: past MAX_HELD_BYTES what came goes out as it is."""
    from vnpu.sse import EventFramer

    framer = EventFramer(max_held=100)
    assert framer.feed(b"x" * 100) == b""
    assert framer.feed(b"y") == b"x" * 100 + b"y" and framer.held == b""
    assert framer.feed(b"data: a\n") == b"" and framer.feed(b"\ndata: b") == b"data: a\n\n"
    assert framer.held == b"data: b"
