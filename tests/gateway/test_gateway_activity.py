"""The gateway's writes to the API server (activity annotations, wakes) when it cannot be reached: a
closed port on loopback stands in for an API server that is restarting or partitioned away."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import pytest

from vnpu import api
from vnpu.gateway.activity import ActivityRecorder, WakeError, scale_from_zero


@pytest.fixture
def unreachable_api() -> object:
    from kubernetes import client

    from vnpu.cluster.controlplane import free_port

    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    return client.ApiClient(configuration)


def test_a_wake_the_api_server_cannot_be_asked_for_raises_wake_error_in_words(unreachable_api) -> None:
    """urllib3's connection error escaped scale_from_zero, into a task nobody read."""
    with pytest.raises(WakeError, match="the API server cannot be reached"):
        scale_from_zero(unreachable_api, "team-a", "chat")


def test_an_unreachable_api_server_is_one_warning_per_flush_and_the_counts_wait(
    unreachable_api, caplog
) -> None:
    """Every model's write logged an ERROR with a traceback, every flush, while the API server was down.
    Now a flush warns once, without traceback, and keeps every model's counts for the next one."""
    recorder = ActivityRecorder(unreachable_api, flush_s=3600)
    for name in ("a", "b", "c"):
        recorder.record("team-a", name)
    with caplog.at_level(logging.WARNING, logger="vnpu.gateway.activity"):
        recorder.flush()
        recorder.flush()
    ours = [r for r in caplog.records if r.name == "vnpu.gateway.activity"]  # (not urllib3's retries)
    assert [(r.levelno, r.exc_info) for r in ours] == [(logging.WARNING, None)] * 2
    assert ours[0].models == 3 and "Connection refused" in ours[0].error
    assert dict(recorder._pending) == {("team-a", name): 1 for name in ("a", "b", "c")}


class _OneModel:
    """The two calls a flush makes, on one stored model (``annotations``), recording each patch."""

    def __init__(self, annotations: dict[str, str]) -> None:
        self.meta = {"resourceVersion": "7", "annotations": annotations}
        self.patches: list[dict] = []

    def get_namespaced_custom_object(self, *args, **kwargs) -> dict:
        return {"metadata": self.meta}

    def patch_namespaced_custom_object(self, *args, **kwargs) -> None:
        self.patches.append(args[5])  # (group, version, namespace, plural, name, patch)


def test_a_flush_writes_over_a_last_request_far_ahead_and_says_so(caplog) -> None:
    """One replica whose node's clock ran a year ahead wrote its time: the others, with a right clock,
    kept it (the later one) and said nothing, and the model stayed awake until that day. Now the next
    flush writes this replica's own time over it, with a warning naming the model and how far ahead."""
    recorder = ActivityRecorder(None, flush_s=3600)
    ahead = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
    recorder.custom = stored = _OneModel(
        {api.ANNOTATION_REQUESTS: "7", api.ANNOTATION_LAST_REQUEST: api.format_time(ahead)}
    )
    recorder.record("team-a", "chat")
    with caplog.at_level(logging.WARNING, logger="vnpu.gateway.activity"):
        recorder.flush()
    (patch,) = stored.patches
    written = api.parse_time(patch["metadata"]["annotations"][api.ANNOTATION_LAST_REQUEST])
    assert patch["metadata"]["annotations"][api.ANNOTATION_REQUESTS] == "8"
    assert written is not None and abs((dt.datetime.now(dt.UTC) - written).total_seconds()) < 60
    (warned,) = [r for r in caplog.records if r.name == "vnpu.gateway.activity"]
    assert warned.model == "team-a/chat" and warned.ahead_s > 364 * 86400


class _Landing(_OneModel):
    """A model whose patches land, their answers lost (a read timeout) while ``lose`` is set; or, with
    ``block``, a patch that waits on it (an API server that stalls)."""

    def __init__(self, annotations: dict[str, str]) -> None:
        super().__init__(annotations)
        self.lose = False
        self.block: threading.Event | None = None

    def get_namespaced_custom_object(self, *args, **kwargs) -> dict:
        return {"metadata": dict(self.meta)}

    def patch_namespaced_custom_object(self, *args, **kwargs) -> None:
        from kubernetes.client.exceptions import ApiException

        block, self.block = self.block, None  # (the first patch only)
        if block is not None:
            block.wait(10)
        patch = args[5]["metadata"]
        if patch["resourceVersion"] != self.meta["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")  # as the API server, for a merge patch
        super().patch_namespaced_custom_object(*args, **kwargs)
        version = str(int(self.meta["resourceVersion"]) + 1)
        annotations = {**self.meta["annotations"], **patch["annotations"]}
        self.meta = {"resourceVersion": version, "annotations": annotations}
        if self.lose:
            import urllib3

            raise urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out")


def _stored(model: _OneModel) -> tuple[int, dt.datetime | None]:
    notes = model.meta["annotations"]
    return int(notes.get(api.ANNOTATION_REQUESTS, 0)), api.parse_time(notes.get(api.ANNOTATION_LAST_REQUEST))


def test_a_request_still_being_answered_keeps_its_model_active_at_each_flush() -> None:
    """A request was counted when it arrived, and nothing was written while a long stream went on:
    the operator took the model for idle and scaled it to zero mid-answer."""
    recorder = ActivityRecorder(None, flush_s=3600)
    recorder.custom = stored = _Landing({})
    finished = recorder.record("team-a", "chat")
    recorder.flush()
    count, first = _stored(stored)
    assert count == 1 and first is not None
    recorder.flush()  # no new request: the one in flight is activity now, its count not added again
    count, during = _stored(stored)
    assert len(stored.patches) == 2 and count == 1 and during is not None and during >= first
    finished()
    recorder.flush()  # its end
    count, ended = _stored(stored)
    assert len(stored.patches) == 3 and count == 1 and ended is not None and ended >= during
    recorder.flush()
    assert len(stored.patches) == 3  # nothing in flight, nothing new: no write


def test_a_count_whose_write_may_have_landed_is_not_added_again() -> None:
    """A patch applied while its answer timed out put its counts back, to be added again at the next
    flush with the new ones: 6 requests stored as 21 after 6 such flushes."""
    recorder = ActivityRecorder(None, flush_s=3600)
    recorder.custom = stored = _Landing({})
    stored.lose = True
    for _ in range(6):
        recorder.record("team-a", "chat")()
        recorder.flush()
    stored.lose = False
    recorder.flush()
    count, last = _stored(stored)
    assert count == 6 and last is not None


def test_a_flush_stuck_at_stop_leaves_its_models_times_for_the_last_flush() -> None:
    """stop() waited 5 s for a flush stuck on the API server, then flushed what was pending: the stuck
    flush's batch was in neither, and the process exited without it."""
    recorder = ActivityRecorder(None, flush_s=0.01)
    recorder.custom = stored = _Landing({})
    stuck = stored.block = threading.Event()
    recorder.record("team-a", "chat")()
    recorder.start()
    deadline = time.monotonic() + 10
    while not recorder._flushing and time.monotonic() < deadline:
        time.sleep(0.01)
    recorder.stop(wait_s=0.1)  # the flush is still stuck: the last flush writes its model's time
    count, last = _stored(stored)
    assert last is not None and count == 0  # (its count is the stuck write's to land, once)
    stuck.set()
    recorder._thread.join(10)
    count, last = _stored(stored)
    assert count == 1 and last is not None
