"""Leader election against an in-memory coordination API and a fake clock: leadership lapses on time
even while a renewal hangs, and every Lease call carries a request timeout."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vnpu.operator import leader
from vnpu.operator.leader import LeaderElector, LeaseConfig

# Real seconds between renewals (the renew thread waits on a real Event); the deadlines are on the fake
# clock, which moves only when a test moves it.
CONFIG = LeaseConfig(
    "vnpu-system", "vnpu-operator", "me", lease_duration=15, renew_deadline=10, retry_period=0.02
)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeLeases:
    """The Lease calls of CoordinationV1Api; ``hang`` makes the next read block until ``unblock``."""

    def __init__(self) -> None:
        self.lease: client.V1Lease | None = None
        self.timeouts: list[tuple[str, Any]] = []  # (call, _request_timeout)
        self.hang = threading.Event()
        self.hung = threading.Event()  # a read is blocked now
        self.unblock = threading.Event()
        self.late_outcome: str = "timeout"  # what the blocked read does once unblocked

    def read_namespaced_lease(self, name: str, namespace: str, **kw: Any) -> client.V1Lease:
        self.timeouts.append(("read", kw.get("_request_timeout")))
        if self.hang.is_set():
            self.hung.set()
            self.unblock.wait()
            if self.late_outcome == "timeout":
                raise urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out.")
        if self.lease is None:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace: str, body: client.V1Lease, **kw: Any) -> None:
        self.timeouts.append(("create", kw.get("_request_timeout")))
        self.lease = copy.deepcopy(body)

    def replace_namespaced_lease(self, name: str, namespace: str, body: client.V1Lease, **kw: Any) -> None:
        self.timeouts.append(("replace", kw.get("_request_timeout")))
        self.lease = copy.deepcopy(body)


@pytest.fixture
def leases(monkeypatch: pytest.MonkeyPatch) -> FakeLeases:
    fake = FakeLeases()
    monkeypatch.setattr(leader.client, "CoordinationV1Api", lambda api_client: fake)
    return fake


@pytest.mark.parametrize("late_outcome", ["timeout", "renewed"])
def test_a_hung_renewal_ends_leadership_at_the_renew_deadline(leases: FakeLeases, late_outcome: str) -> None:
    clock = Clock(1000.0)
    elector = LeaderElector(client.ApiClient(), CONFIG, clock=clock)
    lost = threading.Event()
    assert elector.acquire()
    elector.keep_leading(lost.set)
    try:
        leases.late_outcome = late_outcome
        leases.hang.set()
        assert leases.hung.wait(10)  # the renew thread is stuck in a read, as on a half-open connection
        # The last renewal began at 1000 (the clock has not moved): the lease is ours until 1010.
        clock.now = 1009.9
        assert elector.is_leader()
        # At the deadline leadership ends, with the renew thread still stuck. A standby may take over
        # only lease_duration after it saw our last write, 1015 at the earliest: never two writers.
        clock.now = 1000.0 + CONFIG.renew_deadline
        assert not elector.is_leader()
        assert not lost.is_set()
        # The read comes back (its timeout fires, or it renewed after all): lost for good.
        leases.unblock.set()
        assert lost.wait(10)
        assert not elector.is_leader()
    finally:
        leases.unblock.set()
        elector._stop.set()


def test_every_lease_call_carries_a_request_timeout(leases: FakeLeases) -> None:
    assert LeaderElector(client.ApiClient(), CONFIG, clock=Clock(50.0)).acquire()  # read (404), create
    elector = LeaderElector(client.ApiClient(), CONFIG, clock=Clock(60.0))
    assert elector.acquire()  # read, replace (the Lease is already this identity's)
    elector.release()  # read, replace
    assert leases.timeouts == [
        (call, (CONFIG.retry_period, CONFIG.retry_period))
        for call in ["read", "create", "read", "replace", "read", "replace"]
    ]
    assert leases.lease is not None and leases.lease.spec.holder_identity is None


def test_a_connection_error_while_acquiring_is_retried(leases: FakeLeases) -> None:
    real_read = leases.read_namespaced_lease
    failures = iter([urllib3.exceptions.ProtocolError("Connection aborted.")])

    def flaky_read(name: str, namespace: str, **kw: Any) -> client.V1Lease:
        for exc in failures:
            raise exc
        return real_read(name, namespace, **kw)

    leases.read_namespaced_lease = flaky_read  # type: ignore[method-assign]
    elector = LeaderElector(client.ApiClient(), CONFIG, clock=Clock(0.0))
    assert elector.acquire()
    assert elector.is_leader()


def test_a_micro_time_is_never_on_a_whole_second() -> None:
    """The client drops a zero fraction, and the API server wants six digits (see leader._micro_time)."""
    import datetime as dt

    whole = dt.datetime(2026, 12, 6, 12, 0, 0, tzinfo=dt.UTC)
    assert leader._micro_time(whole) == whole.replace(microsecond=1)
    assert leader._micro_time(whole.replace(microsecond=250)) == whole.replace(microsecond=250)
    assert client.ApiClient().sanitize_for_serialization(leader._micro_time(whole)) == (
        "2026-12-06T12:00:00.000001+00:00"
    )
