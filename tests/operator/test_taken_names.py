"""A name the operator would create that someone else's object holds: the key Secret of a share group
(its name is computable from the group) and a pod. The operator leaves that object alone, and the
models it is for fail with the reason and back off: no create every pass, no pass after pass."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from test_planner import estimate, keys_for, model, node

from vnpu import api, sharing
from vnpu.operator import metrics
from vnpu.operator.config import OperatorConfig
from vnpu.operator.kube import SHARE_KEY_SELECTOR, Kube
from vnpu.operator.pods import ROLE_SHARE_KEY
from vnpu.operator.reconciler import KEY_SECRET_NAME_TAKEN, POD_NAME_TAKEN, Reconciler
from vnpu.operator.state import parse_pod


@pytest.fixture(autouse=True)
def no_model_series_left() -> Iterator[None]:
    """The passes here set per-model series in the process-wide registry: gone with the test."""
    yield
    metrics.forget_models(set())


def api_errors(namespace: str, name: str, reason: str) -> float | None:
    labels = {"namespace": namespace, "model": name, "reason": reason}
    return metrics.REGISTRY.get_sample_value("vnpu_operator_api_errors_total", labels)


class Response:
    def __init__(self, body: Any) -> None:
        self.data = json.dumps(body).encode()

    def release_conn(self) -> None:
        pass


def secret_object(group: str, *, ours: bool) -> dict[str, Any]:
    labels = {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE, api.LABEL_ROLE: ROLE_SHARE_KEY}
    labels[api.LABEL_SHARE_GROUP] = group
    meta = {"namespace": "team", "name": sharing.secret_name(group), "uid": "uid-secret"}
    return {"metadata": {**meta, "labels": labels} if ours else meta}


class SecretsApi:
    """CoreV1Api's Secret calls over one Secret that holds the group's key name; ``ours``: labelled as
    the operator's (its create by an earlier pass not listed yet), else a tenant's, unlabelled."""

    def __init__(self, held: dict[str, Any]) -> None:
        self.held = held
        self.calls: list[str] = []

    def list_namespaced_secret(self, namespace: str, **kwargs: Any) -> Response:
        selector = kwargs.get("field_selector")
        self.calls.append(f"LIST {selector or kwargs.get('label_selector')}")
        labels = self.held["metadata"].get("labels") or {}
        if selector == f"metadata.name={self.held['metadata']['name']}":
            return Response({"items": [self.held]})
        if kwargs.get("label_selector") == SHARE_KEY_SELECTOR and labels.get(api.LABEL_MANAGED_BY):
            return Response({"items": [self.held]})
        return Response({"items": []})  # the label selector does not match the tenant's Secret

    def create_namespaced_secret(self, namespace: str, body: Any, **kwargs: Any) -> None:
        self.calls.append("POST")
        exc = ApiException(status=409, reason="Conflict")
        exc.body = json.dumps({"reason": "AlreadyExists", "message": "secrets already exists"})
        raise exc


class SecretsKube(Kube):
    """The real Secret calls over :class:`SecretsApi`; pods, budgets and reports in memory."""

    def __init__(self, held: dict[str, Any]) -> None:
        self.namespaces = ("team",)
        self.core = SecretsApi(held)  # type: ignore[assignment]
        self.pods: list[str] = []

    def create_pod(self, manifest: Any) -> bool:
        self.pods.append(manifest["metadata"]["name"])
        return True

    def create_budget(self, manifest: Any) -> bool:
        return True

    def set_secret_owners(self, namespace: str, name: str, owner_references: Any) -> None:
        pass


def degraded(update: Any) -> dict[str, Any]:
    return next(c for c in update.status["conditions"] if c["type"] == "Degraded")


def test_a_tenants_secret_on_the_key_name_backs_the_group_off_instead_of_a_pass_every_debounce() -> None:
    """The tenant makes an unlabelled Secret of the name the group's key gets, then a model of that
    group. The list by label never showed it, so every pass planned it, its create's 409 read as
    "ours", and the early wake for a created key ran the next pass 0.2 s later: a pass, a LIST and a
    POST five times a second for ever, the model never backing off nor saying why."""
    kube = SecretsKube(secret_object("g1", ours=False))
    rec = Reconciler(OperatorConfig(resync_seconds=60, placeholders=False), kube=kube)
    m = model("chat", 1, ns="team", shareGroup="g1", weights={"sizeMiB": 1024})

    class Cache:
        def snapshot(self) -> tuple[list[Any], list[Any], list[Any]]:
            return [m], [node("n1")], []

        def services_snapshot(self) -> list[Any]:
            return []

        def budgets_snapshot(self) -> list[Any]:
            return []

    async def loop_for(seconds: float) -> None:
        rec._loop_ref = asyncio.get_running_loop()
        rec._cache = Cache()
        rec._wake.set()  # the model's creation
        task = asyncio.create_task(rec._loop())
        await asyncio.sleep(seconds)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    rec._estimates.lookup = lambda ms: {x.key: estimate() for x in ms}  # type: ignore[method-assign]
    try:
        asyncio.run(loop_for(2.0))
    finally:
        rec._estimates.close()
    posts = kube.core.calls.count("POST")
    # A pass at 0.2 s, refused; its retry after the 1 s backoff; the next after 2 s more (the old code:
    # 9 passes, 9 LISTs, 9 POSTs in these 2 s).
    assert 1 <= posts <= 2 and rec._passes <= 3, (rec._passes, kube.core.calls)
    assert kube.pods == [] and rec._models_in_backoff() == 1
    ((key, failure),) = rec._failures.items()
    assert key == "team/chat" and failure.reason == KEY_SECRET_NAME_TAKEN
    assert api_errors("team", "chat", KEY_SECRET_NAME_TAKEN) == posts  # counted as any refused write


def test_the_groups_models_say_whose_secret_holds_the_name_and_retry_after_their_backoff() -> None:
    kube = SecretsKube(secret_object("g1", ours=False))
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=kube)
    a = model("a", 1, ns="team", shareGroup="g1", weights={"sizeMiB": 1024})
    b = model("b", 1, ns="team", shareGroup="g1", weights={"sizeMiB": 1024})
    try:
        first = rec.reconcile([a, b], [node("n1")], [])
        name = sharing.secret_name("g1")
        assert kube.core.calls == [f"LIST {SHARE_KEY_SELECTOR}", "POST", f"LIST metadata.name={name}"]
        for update in first.statuses:
            condition = degraded(update)
            assert condition["status"] == "True" and condition["reason"] == KEY_SECRET_NAME_TAKEN
            assert (
                f"Secret {name} exists in team and is not the key Secret of share group g1"
                in (condition["message"])
            )
            assert "deleted or renamed" in condition["message"]
        assert KEY_SECRET_NAME_TAKEN in [e.reason for e in first.statuses[0].events]
        assert rec._models_in_backoff() == 2
        # Within the backoff: no create, and the models still say why.
        again = rec.reconcile([a, b], [node("n1")], [])
        assert again.create_secrets == [] and kube.core.calls.count("POST") == 1
        assert degraded(again.statuses[0])["reason"] == KEY_SECRET_NAME_TAKEN
    finally:
        rec._estimates.close()


def test_a_key_secret_of_ours_that_the_list_missed_is_used_not_failed() -> None:
    """AlreadyExists for the operator's own key Secret (made just before a restart, or the list is
    behind): learnt from the look at its name, and the group's pods are planned with it."""
    m = model("a", 1, ns="team", shareGroup="g1", weights={"sizeMiB": 1024})
    kube = SecretsKube(secret_object("g1", ours=True))
    rec = Reconciler(OperatorConfig(placeholders=False), kube=kube)
    rec._secrets_listed = time.monotonic()  # listed just now, before the Secret was made
    try:
        first = rec.reconcile([m], [node("n1")], [])
        assert kube.core.calls == ["POST", f"LIST metadata.name={sharing.secret_name('g1')}"]
        assert degraded(first.statuses[0])["status"] == "False" and rec._models_in_backoff() == 0
        assert kube.pods == []  # no pod before its group's key
        second = rec.reconcile([m], [node("n1")], [])
        assert second.create_secrets == [] and len(kube.core.calls) == 2
        assert sorted(i.role for i in second.create) == ["replica", "weights"] and len(kube.pods) == 2
    finally:
        rec._estimates.close()


class PodNameKube:
    """In memory: the pod ``taken`` exists already, ``managed`` (ours, the informer behind) or not."""

    api_client = None

    def __init__(self, models: list[Any], taken: str, managed: bool) -> None:
        self.models = models
        self.taken, self.managed = taken, managed
        self.calls: list[str] = []

    def list_secrets(self) -> list[Any]:
        return keys_for(self.models)

    def create_pod(self, manifest: dict[str, Any]) -> bool:
        name = manifest["metadata"]["name"]
        self.calls.append(f"POST {name}")
        return name != self.taken

    def find_pod(self, namespace: str, name: str) -> Any:
        self.calls.append(f"LIST {name}")
        labels = {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE} if self.managed else {}
        return parse_pod({"metadata": {"namespace": namespace, "name": name, "labels": labels}}, self.managed)

    def create_budget(self, manifest: dict[str, Any]) -> bool:
        return True

    def set_secret_owners(self, namespace: str, name: str, owner_references: Any) -> None:
        pass


@pytest.mark.parametrize("managed", [False, True])
def test_a_pod_name_held_by_someone_elses_pod_fails_the_model(managed: bool) -> None:
    """The pods informer keeps no unlabelled pod that holds no device memory: a tenant's pod on a
    replica's name was planned again every pass, its 409 taken for "created", and the model waited
    for a replica that never came, saying nothing."""
    m = model("a", 1, weights={"sizeMiB": 1024})
    probe = PodNameKube([m], "", False)
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=probe)  # type: ignore[arg-type]
    try:
        replica = next(i.name for i in rec.reconcile([m], [node("n1")], []).create if i.role == "replica")
    finally:
        rec._estimates.close()
    kube = PodNameKube([m], replica, managed)
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    try:
        first = rec.reconcile([m], [node("n1")], [])
        assert f"LIST {replica}" in kube.calls
        condition = degraded(first.statuses[0])
        if managed:  # ours, not yet seen by the informer: no failure
            assert condition["status"] == "False" and rec._models_in_backoff() == 0
            return
        assert condition["status"] == "True" and condition["reason"] == POD_NAME_TAKEN
        assert f"pod {replica} exists in ns and is not labelled" in condition["message"]
        assert api_errors("ns", "a", POD_NAME_TAKEN) == 1  # counted as any refused write
        kube.calls.clear()
        again = rec.reconcile([m], [node("n1")], [])  # within its backoff: no POST
        assert kube.calls == [] and degraded(again.statuses[0])["reason"] == POD_NAME_TAKEN
    finally:
        rec._estimates.close()
