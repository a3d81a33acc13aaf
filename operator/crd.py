"""Is the served InferenceModel CRD as new as this operator?

Helm installs ``crds/`` on first install only and never upgrades them, so a ``helm upgrade`` without
the documented ``kubectl apply`` of the CRD leaves the old schema served: the API server then refuses
a status phase it does not know (``Idle``) and silently drops status fields it does not know
(``status.scaling``, ``status.endpoint``), and nothing says why. The CRD carries its schema revision as
an annotation (:data:`vnpu.api.CRD_REVISION_ANNOTATION`); this check compares it with the revision
this operator was built for, at start and every :data:`CHECK_INTERVAL_S` after, and says what to do:
an error in the log (once per change), and the gauge ``vnpu_operator_crd_outdated``. The operator
keeps running: every model's failing writes stay that model's (Degraded with the server's message).
"""

from __future__ import annotations

import logging
import threading

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vnpu import api
from vnpu.operator import metrics

log = logging.getLogger(__name__)

#: How often the served CRD is read again (one small LIST), so applying the new CRD clears the gauge.
CHECK_INTERVAL_S = 300.0
APPLY_COMMAND = "kubectl apply --server-side --force-conflicts -f deploy/helm/vnpu/crds/"


def served_revision(api_client: client.ApiClient, timeout_s: float = 30.0) -> int | None:
    """The served CRD's revision (0 when it has no annotation, or one that is not a number); None
    when it cannot be read (absent, or RBAC refuses the list)."""
    try:
        crds = client.ApiextensionsV1Api(api_client).list_custom_resource_definition(
            field_selector=f"metadata.name={api.CRD_NAME}", _request_timeout=timeout_s
        )
    except (ApiException, OSError, ValueError) as exc:  # (ValueError: an answer that is not a CRD list)
        log.warning("cannot read the InferenceModel CRD to check its revision", extra={"error": str(exc)})
        return None
    if not crds.items:
        return None
    value = (crds.items[0].metadata.annotations or {}).get(api.CRD_REVISION_ANNOTATION, "0")
    return int(value) if value.isdigit() else 0


def outdated_message(served: int) -> str | None:
    """What to say when the served revision ``served`` is older than this operator's; None when not."""
    if served >= api.CRD_REVISION:
        return None
    return (
        f"the served InferenceModel CRD is revision {served}, older than this operator's "
        f"{api.CRD_REVISION}: status fields it writes are refused or dropped (Helm never upgrades crds/). "
        f"Apply the new CRD: {APPLY_COMMAND}"
    )


class CrdRevisionCheck:
    """Reads the served CRD's revision now and every ``interval_s`` on a daemon thread; logs an error
    when it turns out (or stays, at start) older than this operator's and an info line once it is
    brought up to date; keeps ``vnpu_operator_crd_outdated`` in step."""

    def __init__(self, api_client: client.ApiClient, interval_s: float = CHECK_INTERVAL_S) -> None:
        self.api_client = api_client
        self.interval_s = interval_s
        self.outdated: bool | None = None  #: None until a check could read the CRD
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> bool | None:
        served = served_revision(self.api_client)
        if served is None:
            return self.outdated  # unknown: keep what was last known
        message = outdated_message(served)
        outdated = message is not None
        if outdated and self.outdated is not True:
            log.error(message, extra={"served_revision": served, "revision": api.CRD_REVISION})
        elif not outdated and self.outdated:
            log.info("the served InferenceModel CRD is up to date again", extra={"served_revision": served})
        self.outdated = outdated
        metrics.CRD_OUTDATED.set(1 if outdated else 0)
        return outdated

    def start(self) -> None:
        self.check_once()
        self._thread = threading.Thread(target=self._run, name="vnpu-crd-check", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check_once()

    def stop(self) -> None:
        self._stop.set()
