"""A status write the API server refuses (422 from a CRD rule or a webhook) backs off that model's status
and Events: it was sent again every pass, with its Warning Event counted again each time."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from test_planner import keys_for, model

from vnpu.operator import metrics
from vnpu.operator.config import OperatorConfig
from vnpu.operator.reconciler import Reconciler


@pytest.fixture(autouse=True)
def no_model_series_left() -> Iterator[None]:
    yield
    metrics.forget_models(set())


class RefusingKube:
    """Every status patch refused while ``refuse``; Events and the rest in memory."""

    api_client = None

    def __init__(self, models: list[Any]) -> None:
        self.models = models
        self.refuse = True
        self.calls: list[str] = []

    def list_secrets(self) -> list[Any]:
        return keys_for(self.models)

    def create_service(self, manifest: Any) -> bool:
        return True

    def create_budget(self, manifest: Any) -> bool:
        return True

    def delete_secret(self, namespace: str, name: str, uid: str) -> bool:
        return True

    def patch_model_status(self, m: Any, status: Any) -> None:
        self.calls.append("PATCH status")
        if self.refuse:
            exc = ApiException(status=422, reason="Unprocessable Entity")
            exc.body = json.dumps({"reason": "Invalid", "message": "status.message: Too long"})
            raise exc

    def post_event(self, m: Any, event_type: str, reason: str, message: str) -> str:
        self.calls.append(f"POST event {reason}")
        return f"ev-{reason}"

    def count_event(self, namespace: str, name: str, count: int) -> None:
        self.calls.append(f"PATCH event count={count}")


def test_a_refused_status_is_written_again_after_a_growing_backoff_with_its_event_once_a_try() -> None:
    now = [0.0]
    m = model("chat", 1, ns="team")  # its file is not read (no --model-file-root): a Warning, a flip
    kube = RefusingKube([m])
    rec = Reconciler(OperatorConfig(), kube=kube, clock=lambda: now[0])  # type: ignore[arg-type]

    def passes_at(t: float, *, of: Any = m) -> list[str]:
        now[0] = t
        kube.calls.clear()
        rec.reconcile([of], [], [])  # the informer's view never changes: the status was refused
        while rec._reports.backlog:
            key, report = rec._reports.take()  # type: ignore[misc]
            rec._write_report(report)
            rec._reports.done(key)
        return list(kube.calls)

    try:
        assert passes_at(0.0) == ["POST event InvalidSpec", "PATCH status"]
        assert passes_at(0.1) == [] and passes_at(0.9) == []  # within 1 s (the old code: every pass)
        assert passes_at(1.0) == ["PATCH event count=2", "PATCH status"]
        assert passes_at(2.9) == []  # 2 s now
        assert passes_at(3.0) == ["PATCH event count=3", "PATCH status"]
        assert passes_at(6.9) == []  # 4 s now
        # A spec change is tried at once, its own backoff from the first wait.
        changed = replace(m, generation=m.generation + 1)
        assert passes_at(7.0, of=changed) == ["PATCH event count=4", "PATCH status"]
        assert passes_at(7.5, of=changed) == []
        # Accepted once the refusal ends: written, and nothing waits any more.
        kube.refuse = False
        assert passes_at(8.0, of=changed) == ["PATCH event count=5", "PATCH status"]
        assert rec._status_refused == {} and rec._models_in_backoff() == 0
        # A model refused, then gone: nothing kept of it.
        kube.refuse = True
        other = model("other", 1, ns="team")
        passes_at(9.0, of=other)
        assert list(rec._status_refused) == [other.uid]
        now[0] = 9.5
        rec.reconcile([], [], [])
        assert rec._status_refused == {}
    finally:
        rec._estimates.close()


def test_a_pass_is_woken_when_a_refused_status_may_go_again() -> None:
    """Nothing else may change meanwhile: without a pass at the end of its backoff the status would
    wait for the next resync (a minute) whatever the backoff said."""
    rec = Reconciler(OperatorConfig(backoff_seconds=0.2))
    rec._estimates.close()

    async def refused() -> float:
        rec._loop_ref = asyncio.get_running_loop()
        start = time.monotonic()
        assert rec._status_refused_now(model("a", 1)) == pytest.approx(0.2)
        await asyncio.wait_for(rec._wake.wait(), 5)
        return time.monotonic() - start

    assert 0.15 <= asyncio.run(refused()) < 2
