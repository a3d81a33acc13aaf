"""The access log of vnpu's HTTP servers (a replica's, a serving holder's, the gateway's), without the
probes' noise.

The kubelet probes a replica's ``/readyz`` every second and its ``/healthz`` every 5 s, and the gateway
scrapes ``/metrics``: aiohttp's access log wrote a line for each, over 100,000 a day per replica,
burying the requests an on-call engineer looks for and paying log storage for nothing. Like vLLM's
``--disable-access-log-for-endpoints /health,/metrics`` (its default in OpenShift AI's llm-d), those
paths are left out; unlike it, a change of their status is still logged, once (a replica going unready
and back shows in its log once each way), and a client error on them (a scrape without the gateway's
key: 401) every time, as on any other path, since it is a caller's doing rather than the server's
state. Every other request is logged as aiohttp logs it.
"""

from __future__ import annotations

import weakref

from aiohttp import web, web_log
from aiohttp.web_request import BaseRequest

#: Paths answered many times a minute by machines: logged only when their status changes.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

#: The status last logged for each quiet path, by application. aiohttp makes an access logger per
#: connection and the kubelet opens a connection per probe, so this lives with the application.
_last_logged: weakref.WeakKeyDictionary[web.Application, dict[str, int]] = weakref.WeakKeyDictionary()


class AccessLogger(web_log.AccessLogger):
    """aiohttp's access logger, logging a :data:`QUIET_PATHS` request only when its status differs
    from the last one logged for that path by the same application, or is a client error. Pass it as
    ``access_log_class``."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        app = getattr(request, "app", None) if request.path in QUIET_PATHS else None
        if app is not None and not 400 <= response.status < 500:
            last = _last_logged.setdefault(app, {})
            if last.get(request.path) == response.status:
                return
            last[request.path] = response.status
        super().log(request, response, time)
