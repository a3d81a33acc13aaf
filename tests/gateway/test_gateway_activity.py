"""The gateway's writes to the API server (activity annotations, wakes) when it cannot be reached: a
closed port on loopback stands in for an API server that is restarting or partitioned away."""

from __future__ import annotations

import datetime as dt
import logging

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
