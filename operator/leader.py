"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection does it.

Exactly one operator replica plans and writes. A replica that is not the leader does nothing at all
(no kopf handlers, no informers, no writes): it retries the Lease every ``retry_period`` seconds.
The leader renews every ``retry_period``; if it cannot renew for ``renew_deadline`` seconds it stops
leading and the process exits (controller-runtime's behaviour: a fresh start as a candidate is the
only state known to be clean). On a clean shutdown the leader releases the Lease, so a standby takes
over at its next retry; when the leader dies without releasing, a standby takes over once the Lease
has not been renewed for ``lease_duration`` seconds as measured on the standby's own clock (the
holder's timestamps are never compared with ours, so clock skew does not matter). Hence the stated
bound: a standby leads within ``lease_duration + retry_period`` (15 + 2 s by default) of the
leader's death.

Leadership lapses on time, not only when a renewal fails: :meth:`LeaderElector.is_leader` is true only
while the last successful renewal began less than ``renew_deadline`` ago, so a renewal stuck on a dead
connection cannot keep a writer alive past the point where a standby may take over (``renew_deadline <
lease_duration``, and a standby counts ``lease_duration`` from when it sees our last write, which is
after that write began). Every Lease call also carries a ``_request_timeout`` of ``retry_period``
(connect, read, per attempt of the client's retries), so a stuck renewal fails in bounded time and
``on_lost`` is called.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vnpu.operator import metrics

log = logging.getLogger(__name__)

LEASE_DURATION = 15.0
RENEW_DEADLINE = 10.0
RETRY_PERIOD = 2.0


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str
    identity: str
    lease_duration: float = LEASE_DURATION
    renew_deadline: float = RENEW_DEADLINE
    retry_period: float = RETRY_PERIOD

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline > self.retry_period > 0:
            raise ValueError("need lease duration > renew deadline > retry period > 0")


def _micro_time(t: dt.datetime) -> dt.datetime:
    """``t`` for a Lease's MicroTime field, never on a whole second. The client writes a datetime (and a
    string, which it parses first) with ``isoformat()``, which leaves the fraction out on a whole
    second, and the API server reads MicroTime with exactly six fractional digits: such a write was a
    400, and a leadership acquired on a whole second could never be renewed. A whole second is sent
    1 µs later."""
    t = t.astimezone(dt.UTC)
    return t if t.microsecond else t.replace(microsecond=1)


class LeaderElector:
    """Acquire, hold and release one Lease. Thread-safe: :meth:`is_leader` may be called anywhere."""

    def __init__(
        self,
        api_client: client.ApiClient,
        config: LeaseConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._api = client.CoordinationV1Api(api_client)
        self._clock = clock
        self._leading = threading.Event()
        self._stop = threading.Event()
        # What we last saw of the Lease, and when (on our clock): expiry is judged from this.
        self._observed: tuple[str, str, int] | None = None  # (holder, renewTime, transitions)
        self._observed_at = 0.0
        self._last_renew = 0.0
        self._thread: threading.Thread | None = None

    def is_leader(self) -> bool:
        """Leading, and the last renewal began less than ``renew_deadline`` ago on our clock."""
        return self._leading.is_set() and self._clock() - self._last_renew < self.config.renew_deadline

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until this replica leads (True) or ``stop`` is set (False)."""
        stop = stop or self._stop
        log.info("waiting to lead: Lease %s/%s", self.config.namespace, self.config.name)
        while not stop.is_set():
            began = self._clock()
            if self._attempt():
                self._last_renew = began
                self._leading.set()
                metrics.IS_LEADER.set(1)
                log.info("leading: Lease %s/%s", self.config.namespace, self.config.name)
                return True
            stop.wait(self.config.retry_period)
        return False

    def keep_leading(self, on_lost: Callable[[], None]) -> None:
        """Renew in a daemon thread; call ``on_lost`` once no renewal went through for ``renew_deadline``
        seconds. A renewal that comes back only after the deadline does not restore leadership:
        :meth:`is_leader` has been false meanwhile, and a fresh start is the only state known to be clean."""

        def renew() -> None:
            while not self._stop.wait(self.config.retry_period):
                began = self._clock()
                renewed = self._attempt()
                if self._stop.is_set():
                    return  # released meanwhile: not a loss
                if not self.is_leader():
                    self._leading.clear()
                    metrics.IS_LEADER.set(0)
                    log.error("lost the Lease %s/%s: stopping", self.config.namespace, self.config.name)
                    on_lost()
                    return
                if renewed:
                    self._last_renew = began

        self._thread = threading.Thread(target=renew, name="leader-renew", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and give the Lease up (a standby takes over at its next retry)."""
        self._stop.set()
        if not self._leading.is_set():
            return
        self._leading.clear()
        metrics.IS_LEADER.set(0)
        try:
            timeout = self._request_timeout()
            lease = self._api.read_namespaced_lease(
                self.config.name, self.config.namespace, _request_timeout=timeout
            )
            if lease.spec.holder_identity != self.config.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = _micro_time(dt.datetime.now(dt.UTC))
            self._api.replace_namespaced_lease(
                self.config.name, self.config.namespace, lease, _request_timeout=timeout
            )
            log.info("released the Lease %s/%s", self.config.namespace, self.config.name)
        except ApiException as exc:
            log.warning("could not release the Lease: %s %s", exc.status, exc.reason)
        except Exception as exc:  # a timeout or a broken connection: the Lease expires on its own
            log.warning("could not release the Lease: %r", exc)

    # -- one attempt -----------------------------------------------------------------------------------
    def _request_timeout(self) -> tuple[float, float]:
        """(connect, read) seconds for one Lease call: a dead connection fails within a retry period."""
        return (self.config.retry_period, self.config.retry_period)

    def _attempt(self) -> bool:
        """One try; a timeout or a broken connection (not an ApiException) counts as a failed try."""
        try:
            return self._try_acquire_or_renew()
        except Exception as exc:
            log.warning("reaching the Lease %s/%s: %r", self.config.namespace, self.config.name, exc)
            return False

    def _try_acquire_or_renew(self) -> bool:
        cfg = self.config
        now = dt.datetime.now(dt.UTC)
        timeout = self._request_timeout()
        try:
            lease = self._api.read_namespaced_lease(cfg.name, cfg.namespace, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("reading the Lease: %s %s", exc.status, exc.reason)
                return False
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=cfg.name, namespace=cfg.namespace),
                spec=self._spec(now, now, 0),
            )
            try:
                self._api.create_namespaced_lease(cfg.namespace, body, _request_timeout=timeout)
            except ApiException as exc2:
                log.info("creating the Lease: %s %s", exc2.status, exc2.reason)
                return False
            return True
        spec = lease.spec
        holder = spec.holder_identity or ""
        seen = (holder, str(spec.renew_time), int(spec.lease_transitions or 0))
        if seen != self._observed:
            self._observed, self._observed_at = seen, self._clock()
        duration = float(spec.lease_duration_seconds or cfg.lease_duration)
        held_by_other = holder and holder != cfg.identity
        if held_by_other and self._observed_at + duration > self._clock():
            return False
        transitions = int(spec.lease_transitions or 0)
        acquired = spec.acquire_time
        if holder != cfg.identity:  # an acquisition: counted after a release too, as client-go counts
            transitions += 1
            acquired = now
        lease.spec = self._spec(acquired or now, now, transitions)
        try:
            # The resourceVersion in metadata makes this a compare-and-swap: of two candidates, one wins.
            self._api.replace_namespaced_lease(cfg.name, cfg.namespace, lease, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status != 409:
                log.warning("updating the Lease: %s %s", exc.status, exc.reason)
            return False
        return True

    def _spec(
        self, acquired: dt.datetime | str, renewed: dt.datetime, transitions: int
    ) -> client.V1LeaseSpec:
        return client.V1LeaseSpec(
            holder_identity=self.config.identity,
            lease_duration_seconds=int(self.config.lease_duration),
            acquire_time=_micro_time(acquired) if isinstance(acquired, dt.datetime) else acquired,
            renew_time=_micro_time(renewed),
            lease_transitions=transitions,
        )
