"""Keeps a serving replica attached to its share group's weights-holder.

Attach, install the weights into the :class:`~vnpu.runtime.engine.ModelRuntime`, notice the holder's
loss (EOF on the lease), mark the runtime unavailable (clients get a clear 503), retry with backoff,
re-install. The KV cache belongs to the runtime and survives a re-attach.

A replica planned to attach never loads weights of its own: its slices are sized for its KV cache.
While no holder it can trust answers (none yet, one that fails authentication, one serving other
weights) it stays unready with the reason on ``/readyz`` and in its log, and keeps trying.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from vnpu import sharing
from vnpu.api import REPLICA_DRAIN_S
from vnpu.runtime.attach import (
    AttachRefusedError,
    Expected,
    HolderUnavailableError,
    NoHolderListeningError,
    attach,
)
from vnpu.runtime.engine import ModelRuntime

log = logging.getLogger("vnpu.runtime.supervisor")

#: How long a replica that has never attached waits for its holder before each failed try is a
#: warning. Replicas usually start beside a holder still loading the weights (seconds for a small
#: model, a minute or two for a large one from network storage): an expected wait, logged once at
#: INFO, so that warnings mean something to whoever reads the log.
QUIET_START_S = 120.0


class SharedWeightsSupervisor:
    """Keeps a replica attached to its weights-holder: attach, serve, notice loss, retry, re-attach."""

    def __init__(
        self,
        runtime: ModelRuntime,
        socket_path: str | Path,
        identity: sharing.ShareIdentity,
        key: bytes,
        device: str = "cpu",
        expected: Expected | None = None,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        drain_s: float = REPLICA_DRAIN_S,
    ) -> None:
        """``drain_s``: how long this replica gives its requests in flight at SIGTERM, announced to the
        holder at attach (it keeps the weights that long when both stop)."""
        self.runtime = runtime
        self.drain_s = drain_s
        self.socket_path = Path(socket_path)
        self.identity = identity
        self._key = key
        self.expected = expected
        self.device = device
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weights-supervisor", daemon=True)
        self.fatal: str | None = None  #: the attached model cannot be used at all
        #: the last attach was refused (authentication, identity, other weights): not a holder to use
        self.refused = False
        self._attached_once = False
        self._waiting_since = time.monotonic()
        self._said_waiting = False

    def start(self) -> None:
        i = self.identity
        self.runtime.metrics.share_info.labels(i.namespace, i.group, i.weights_id, self.device).set(1)
        self._thread.start()

    def stop(self) -> None:
        """Stop, and wait for the thread: it alone closes the lease. Closed from here, a lease the thread
        was still receiving (invisible here) stayed open, and one it was installing failed the install
        as if the weights were unusable."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        """Attach and serve until stopped. No error ends this loop, an unforeseen one included: with
        this thread gone the replica would stay unready for good, even once its holder is back."""
        delay = self.retry_initial
        while not self._stop.is_set():
            try:
                if self._attach_and_serve():
                    return
                delay = self.retry_initial
                continue
            except Exception as e:
                self._attach_failed(e, delay)
            self._stop.wait(delay)
            delay = min(delay * 2, self.retry_max)

    def _attach_failed(self, e: Exception, delay: float) -> None:
        self.refused = isinstance(e, AttachRefusedError)
        expected = isinstance(e, HolderUnavailableError | AttachRefusedError)
        failure = "refused" if self.refused else "unavailable"
        self.runtime.metrics.attach_failures.labels(failure).inc()
        if self.refused:
            what = "weights-holder refused or untrusted"
        elif expected:
            what = "weights-holder unavailable"
        else:
            what = "weights-holder unusable (unexpected error)"
        self.runtime.set_unavailable(f"{what}: {e}")
        extra = {"reason": str(e), "share": str(self.identity), "retry_s": round(delay, 2)}
        if self._starting_up(e):
            # Most likely the holder is still loading: said once; /readyz and the metric keep the detail.
            level = logging.DEBUG if self._said_waiting else logging.INFO
            self._said_waiting = True
            log.log(level, "waiting for the weights-holder", extra=extra)
            return
        level = logging.ERROR if self.refused or not expected else logging.WARNING
        log.log(level, "attach failed", extra=extra, exc_info=not expected)

    def _starting_up(self, e: Exception) -> bool:
        """Nothing listening on the holder's socket yet, before this replica ever attached, within
        :data:`QUIET_START_S` of its start. A holder that answers badly, a refusal, a bug, or any failure
        after a lost lease is logged as before."""
        return (
            isinstance(e, NoHolderListeningError)
            and not self._attached_once
            and time.monotonic() - self._waiting_since < QUIET_START_S
        )

    def _attach_and_serve(self) -> bool:
        """Attach, install the weights, serve until the lease is lost. True when this supervisor is
        done: stopped, or the attached model cannot be used at all."""
        lease = attach(
            self.socket_path,
            self.identity,
            self._key,
            self.device,
            expected=self.expected,
            drain_s=self.drain_s,
        )
        if self._stop.is_set():
            lease.close()
            return True
        self.refused = False
        self._attached_once = True
        self.runtime.metrics.attaches.inc()  # before install makes the runtime ready: counted once seen
        try:
            self.runtime.install(
                lease.manifest,
                lease.arena,
                shared=True,
                seconds=lease.attach_seconds,
                keep=lease,
                resident=lease.resident,
            )
        except Exception as e:  # a holder serving an unusable model / budget error: stay down, loudly
            self.fatal = str(e)
            self.runtime.set_unavailable(f"cannot use the attached weights: {e}")
            log.error("install failed", extra={"reason": str(e)})
            lease.close()
            return True
        try:
            while not lease.wait_lost(0.5):
                if self._stop.is_set():
                    lease.close()
                    return True
            reason = f"weights-holder at {self.socket_path} went away ({lease.lost_reason}); reconnecting"
            self.runtime.uninstall(reason)
        except BaseException:
            lease.close()
            raise
        lease.close()
        time.sleep(0)  # let views die before the next attach maps a new arena
        return False
