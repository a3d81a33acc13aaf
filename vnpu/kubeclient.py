"""How vnpu's components reach the Kubernetes API server: the client, and how long any call may wait.

The ``kubernetes`` client waits for ever unless a call passes ``_request_timeout``. On a connection
that went half-open (the API server's node died, a control-plane failover, a load balancer that drops
packets instead of resetting) such a call blocks its thread for good, and nothing is logged: the
operator's reconcile pass, the gateway's watches (its route table froze: it kept routing to replicas
that were gone and never saw new ones), its wakes and its activity flushes all ran on such threads. So
every call the operator (:mod:`vnpu.operator.kube`, :mod:`vnpu.operator.cache`) and the gateway
(:mod:`vnpu.gateway.discovery`, :mod:`vnpu.gateway.activity`) make passes one of the timeouts below,
and a call that runs out of time fails as an unreachable API server does (urllib3's
``ConnectTimeoutError``, ``ReadTimeoutError`` or ``MaxRetryError``, all ``urllib3.exceptions.HTTPError``),
for the caller's loop to try again.

A timeout is urllib3's: ``(connect, read)`` seconds, where read bounds each wait for the next bytes,
not the whole answer; a plain number bounds the connect, and each read by what the connect left of it.
urllib3's default retries (3) send a GET again after a connect or read timeout, so a GET to a server
that takes the connection and never answers fails after four of its read timeouts (a write, at once).

TCP keepalive on the client's connections (client-go's timings) makes an idle connection to a peer
that is gone fail sooner; the timeouts bound every call whatever the network does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Seconds to open a connection to the API server.
CONNECT_SECONDS = 5.0
#: (connect, read) seconds of one ordinary call: a get, a write, a small list.
REQUEST_TIMEOUT = (CONNECT_SECONDS, 30.0)
#: Seconds one LIST request (a page of the operator's informers, a gateway's list read whole) may wait
#: for its answer: the API server reads a large one from etcd before it sends anything.
LIST_TIMEOUT_SECONDS = 60
#: (connect, read) seconds of a LIST.
LIST_TIMEOUT = (CONNECT_SECONDS, float(LIST_TIMEOUT_SECONDS))
#: Seconds a watch may stay silent beyond its ``timeout_seconds`` (when the API server ends it) before
#: the client gives up on it: by then its connection is dead.
WATCH_MARGIN_SECONDS = 30


def unreachable_errors() -> tuple[type[Exception], ...]:
    """What the kubernetes client raises when the API server cannot be reached (refused, reset, timed
    out, a half-open connection past its timeout): urllib3's errors, and the OSErrors beneath them. A
    refusal is an ``ApiException`` instead. (urllib3 is imported late, as kubernetes is.)"""
    import urllib3

    return (urllib3.exceptions.HTTPError, OSError)


def watch_timeout(seconds: float) -> tuple[float, float]:
    """(connect, read) seconds of a watch the API server ends after ``seconds`` (its ``timeout_seconds``)."""
    return (CONNECT_SECONDS, seconds + WATCH_MARGIN_SECONDS)


def api_client_from_env(kubeconfig: Path | None = None) -> Any:
    """A ``kubernetes.client.ApiClient``: from ``kubeconfig`` when given; else, in a pod, its service
    account; else $KUBECONFIG or ~/.kube/config. TCP keepalive is on (client-go's timings), so a
    connection the network dropped silently is noticed, watches included."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    configuration.keep_alive = True
    return client.ApiClient(configuration)
