"""``vnpu gateway``: one OpenAI endpoint for every InferenceModel of the cluster."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vnpu.api import MAX_DRAIN_S, REPLICA_DRAIN_S, SHUTDOWN_DELAY_S, shutdown_delay_s
from vnpu.argtypes import seconds
from vnpu.logs import setup_logging

if TYPE_CHECKING:
    from vnpu.gateway.server import Gateway

log = logging.getLogger("vnpu.gateway")

DESCRIPTION = """\
Serve the OpenAI API for every model of the cluster: /v1/models lists them, /v1/completions and
/v1/chat/completions go to a ready replica of the model the request's `model` names (the one with the
fewest requests outstanding, then the least KV cache in use), streaming answers pass through
unbuffered, and a connect failure is retried once on another replica. Models are found by watching
InferenceModels and the EndpointSlices of their Services (never by polling).

A model answers to <namespace>/<modelName> and to its bare <modelName> (which may hold '/'), looked up
among the models the caller may call: a name several of them answer to is a 404, never a guess
between tenants. A model scaled to zero (spec.scaling.minReplicas: 0) is woken through its scale
subresource; the request waits until a replica is ready or gets a 503 with Retry-After.

Credentials: in-cluster service account, else --kubeconfig / $KUBECONFIG / ~/.kube/config.
"""

EPILOG = """\
examples:
  vnpu gateway --port 8080                                   # in a pod (the chart runs this)
  vnpu gateway --kubeconfig ~/.kube/config --host 127.0.0.1  # on a workstation against a cluster
  vnpu gateway --api-keys /etc/vnpu/keys/keys.yaml           # keys from a mounted Secret
"""


def build_parser() -> argparse.ArgumentParser:
    from vnpu.gateway.server import (  # (these import aiohttp)
        MAX_WAITING,
        MAX_WAITING_PER_MODEL,
        MAX_WAITING_PER_NAMESPACE,
    )
    from vnpu.jsonbody import BODY_TIMEOUT_S, IDLE_CONNECTION_TIMEOUT_S

    p = argparse.ArgumentParser(
        prog="vnpu gateway",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="serve only the models of this namespace (repeatable); default: all namespaces",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="listen address (default %(default)s; 0.0.0.0 in a pod)"
    )
    p.add_argument("--port", type=int, default=8080, help="listen port (default %(default)s)")
    p.add_argument(
        "--api-keys",
        type=Path,
        help="YAML file of API keys and the models each may call "
        "(see vnpu.gateway.keys); without it requests need no key",
    )
    p.add_argument(
        "--wake-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long a request waits for a model to wake from zero (default %(default)s)",
    )
    p.add_argument("--no-wake", action="store_true", help="never scale a model up from zero")
    p.add_argument(
        "--max-waiting",
        type=int,
        default=MAX_WAITING,
        metavar="N",
        help="most requests held at once while their models wake or start; past it a 503 with "
        "Retry-After (default %(default)s)",
    )
    p.add_argument(
        "--max-waiting-per-model",
        type=int,
        default=MAX_WAITING_PER_MODEL,
        metavar="N",
        help="most of those held for one model, so a model that never gets ready cannot hold every "
        "slot and turn away the other models' wakes; past it a 503 with Retry-After (default %(default)s)",
    )
    p.add_argument(
        "--max-waiting-per-namespace",
        type=int,
        default=MAX_WAITING_PER_NAMESPACE,
        metavar="N",
        help="most of those held for one namespace's models, so one tenant's models that never get "
        "ready cannot hold every slot; past it a 503 with Retry-After (default %(default)s)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=BODY_TIMEOUT_S,
        metavar="SECONDS",
        help="how long a client may take to send a request body; then a 408 (default %(default)s)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=IDLE_CONNECTION_TIMEOUT_S,
        metavar="SECONDS",
        help="close a connection that has not sent a whole request head for this long: idle "
        "keep-alives and clients that trickle their headers (default %(default)s)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=float(REPLICA_DRAIN_S),
        metavar="SECONDS",
        help="at SIGTERM, give the requests and streams in flight this long, counted from the signal "
        "(inside the pod's grace period; the chart's gateway.drainSeconds: as long as the longest "
        "runtime.drainSeconds of the models behind it) (default %(default)s)",
    )
    p.add_argument(
        "--shutdown-delay-seconds",
        type=seconds(zero_ok=True, maximum=MAX_DRAIN_S),
        default=float(SHUTDOWN_DELAY_S),
        metavar="SECONDS",
        help="at SIGTERM, /readyz turns 503 at once but new connections are still taken this long, the "
        "first part of the drain, while Kubernetes takes the gateway out of its Service (a connection "
        "to a closed listener is refused); a second signal ends it (default %(default)s)",
    )
    p.add_argument(
        "--activity-flush",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how often request counts go onto the models' annotations (default %(default)s)",
    )
    p.add_argument("--log-format", choices=("json", "text"), default="json", help="(default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    from aiohttp import web

    from vnpu.accesslog import AccessLogger
    from vnpu.gateway.activity import ActivityRecorder, scale_from_zero
    from vnpu.gateway.discovery import Discovery
    from vnpu.gateway.keys import KeyFileError, KeyRing
    from vnpu.gateway.server import Gateway, GatewayConfig, make_app
    from vnpu.jsonbody import shutdown_timeout
    from vnpu.kubeclient import api_client_from_env

    try:
        keys = KeyRing(args.api_keys)
    except (OSError, KeyFileError) as exc:
        log.error("cannot read the API keys", extra={"error": str(exc)})
        return 2
    client = api_client_from_env(args.kubeconfig)
    recorder = ActivityRecorder(client, flush_s=args.activity_flush)
    gateway = Gateway(
        discovery=Discovery(client, tuple(args.namespace)),
        keys=keys,
        config=GatewayConfig(
            wake_timeout_s=args.wake_timeout,
            body_timeout_s=args.body_timeout,
            max_waiting=args.max_waiting,
            max_waiting_per_model=args.max_waiting_per_model,
            max_waiting_per_namespace=args.max_waiting_per_namespace,
        ),
        wake=None if args.no_wake else (lambda ns, name: scale_from_zero(client, ns, name)),
        record=recorder.record,
    )
    recorder.start()
    log.info("gateway serving", extra={"host": args.host, "port": args.port, "keys": keys.enabled})
    listen_s = shutdown_delay_s(args.shutdown_delay_seconds, args.drain_seconds)
    app = make_app(gateway, drain_s=args.drain_seconds - listen_s)
    app.on_startup.append(lambda app: _stop_on_signals(gateway, listen_s))
    try:
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            print=None,
            handle_signals=False,  # _stop_on_signals
            handler_cancellation=True,
            access_log_class=AccessLogger,  # probes and scrapes only when their status changes
            keepalive_timeout=args.idle_timeout,
            # Streams in flight at SIGTERM, as a replica gives its own.
            shutdown_timeout=shutdown_timeout(args.drain_seconds),
        )
    finally:
        recorder.stop()
    return 0


async def _stop_on_signals(gateway: Gateway, listen_s: float) -> None:
    """At SIGTERM or SIGINT, turn /readyz to 503 and stop ``listen_s`` later (aiohttp's own handlers
    stop at once, closing the listener while the Service still sends connections here); a second
    signal stops at once."""
    import asyncio
    import signal

    from aiohttp.web import GracefulExit

    loop = asyncio.get_running_loop()

    def graceful_exit() -> None:
        raise GracefulExit  # out of the loop, as aiohttp's own handler: run_app then cleans up

    def stop(signame: str) -> None:
        if gateway.leaving:
            graceful_exit()
        gateway.leaving = True
        log.info("stopping: not ready, still accepting", extra={"signal": signame, "seconds": listen_s})
        loop.call_later(listen_s, graceful_exit)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum.name)


if __name__ == "__main__":
    sys.exit(main())
