"""The delete handler waits for a deleted model's pods in memory, on the informers' cache, and hands the
wait to kopf's retry (an ERROR line and two writes to the model each) only after a window that
doubles with each retry. Against the real API server: tests/integration/test_operator_deletion.py."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from vnpu.operator import handlers
from vnpu.operator.config import OperatorConfig


class Pods:
    """What the handler asks of the reconciler: a model's pods, as the cache would answer."""

    def __init__(self, present: bool) -> None:
        self.present, self.asked, self.triggers = present, 0, 0

    def trigger(self, why: str) -> None:
        self.triggers += 1

    def has_pods(self, namespace: str, model: str) -> bool:
        self.asked += 1
        return self.present


def delete_handler() -> Any:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, OperatorConfig(placeholders=False))
    (handler,) = registry._changing.get_all_handlers()
    return handler.fn


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "POD_WAIT_FIRST_S", 0.2)
    monkeypatch.setattr(handlers, "POD_WAIT_MOST_S", 0.4)
    monkeypatch.setattr(handlers, "POD_POLL_S", 0.01)


def run(pods: Pods, retry: int, gone_after: float | None = None) -> tuple[float, BaseException | None]:
    """Call the handler: how long it took, and what it raised."""
    memo = kopf.Memo()
    memo["reconciler"] = pods

    async def scenario() -> tuple[float, BaseException | None]:
        loop = asyncio.get_running_loop()
        if gone_after is not None:
            loop.call_later(gone_after, setattr, pods, "present", False)
        handler = delete_handler()  # (a kopf registry: built outside the time measured)
        start, raised = loop.time(), None
        try:
            await handler(memo=memo, namespace="ns", name="m", retry=retry)
        except Exception as exc:
            raised = exc
        return loop.time() - start, raised

    return asyncio.run(scenario())


def test_pods_gone_while_waiting_release_the_model_without_a_retry() -> None:
    pods = Pods(present=True)
    _, raised = run(pods, retry=0, gone_after=0.05)
    assert raised is None  # kopf removes the finalizer: no retry, no ERROR line, no Event
    assert pods.asked > 1 and pods.triggers == 1


def test_no_pods_releases_at_once() -> None:
    pods = Pods(present=False)
    took, raised = run(pods, retry=0)
    assert raised is None and took < 1.0 and pods.asked == 1  # asked once: no poll, no wait


@pytest.mark.parametrize(("retry", "window"), [(0, 0.2), (1, 0.4), (5, 0.4)])
def test_pods_that_stay_hand_the_wait_to_kopf_after_a_growing_window(retry: int, window: float) -> None:
    pods = Pods(present=True)
    took, raised = run(pods, retry=retry)
    assert isinstance(raised, kopf.TemporaryError)
    assert took >= window and pods.asked > 5  # it waited, on the cache, before kopf's retry
    assert "kubectl get pods -n ns -l vnpu.io/model=m" in str(raised)
