"""A model's backoff after a refused write belongs to that model (its uid), not to its name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from test_planner import keys_for, model, node

from vnpu.operator import metrics
from vnpu.operator.config import OperatorConfig
from vnpu.operator.reconciler import Reconciler

QUOTA = "pods is forbidden: exceeded quota: compute"


@pytest.fixture(autouse=True)
def no_model_series_left() -> Iterator[None]:
    """The passes here set per-model series in the process-wide registry: gone with the test."""
    yield
    metrics.forget_models(set())


class QuotaKube:
    """In memory: refuses every pod while the namespace's quota is full."""

    api_client = None

    def __init__(self, models: list[Any]) -> None:
        self.models = models
        self.quota_full = True
        self.created: list[str] = []

    def list_secrets(self) -> list[Any]:
        return keys_for(self.models)

    def create_pod(self, manifest: dict[str, Any]) -> bool:
        if self.quota_full:
            exc = ApiException(status=403, reason="Forbidden")
            exc.body = json.dumps({"reason": "Forbidden", "message": QUOTA})
            raise exc
        self.created.append(manifest["metadata"]["name"])
        return True

    def set_secret_owners(self, namespace: str, name: str, owner_references: list[Any]) -> None:
        pass  # the key Secret changes hands to the new model


def degraded(update: Any) -> dict[str, Any]:
    return next(c for c in update.status["conditions"] if c["type"] == "Degraded")


def test_a_model_created_again_under_its_name_inherits_no_backoff() -> None:
    old = model("a", 1, weights={"sizeMiB": 4096})
    kube = QuotaKube([old])
    # 60 s stands for a model several refusals in (1 s doubling to 300 s).
    rec = Reconciler(OperatorConfig(placeholders=False, backoff_seconds=60), kube=kube)  # type: ignore[arg-type]
    first = rec.reconcile([old], [node("n1")], [])
    assert degraded(first.statuses[0])["reason"] == "Forbidden"
    # Within the minute: the same model stays backed off, no pod is tried.
    kube.quota_full = False
    again = rec.reconcile([old], [node("n1")], [])
    assert again.create == [] and kube.created == []
    assert QUOTA in degraded(again.statuses[0])["message"]
    # The user deletes it, frees the quota and creates it again: a new model, written at once.
    new = replace(old, uid="uid-a-2")
    result = rec.reconcile([new], [node("n1")], [])
    assert [i.name for i in result.create] == kube.created and len(kube.created) == 2
    # Nor the old model's message (the old model's Service, still being created, is another matter).
    assert degraded(result.statuses[0])["reason"] != "Forbidden"
    assert QUOTA not in degraded(result.statuses[0])["message"]
