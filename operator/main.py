"""``vnpu operator``: run the InferenceModel operator (kopf) against the current cluster."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import sys
import threading
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from vnpu.argtypes import MAX_INTERVAL_S, seconds
from vnpu.logs import setup_logging
from vnpu.operator import network_policy
from vnpu.operator.config import (
    DEFAULT_PLACEHOLDER_IMAGE,
    DEFAULT_RUNTIME_IMAGE,
    PREEMPTION_SCOPES,
    OperatorConfig,
)

log = logging.getLogger(__name__)

DESCRIPTION = """\
Reconcile vnpu.io/v1alpha1 InferenceModel resources: pack replicas onto (node, device) pairs by
memory (a share group's weights are paid once per device), run one weight-holder pod per
(node, device, share group), launch the replica pods pinned to their node with the chosen device in
the vnpu.io/device annotation, and report status, events and Prometheus metrics. Demand that fits
nowhere becomes low-priority placeholder pods so a Cluster Autoscaler adds nodes.

With --leader-elect, replicas elect one leader through a coordination.k8s.io Lease: only the leader
watches, plans and writes; a standby takes over within lease duration + retry period (17 s by
default) of the leader's death, at once when the leader shuts down cleanly.

Credentials: in-cluster service account, else --kubeconfig / $KUBECONFIG / ~/.kube/config.
"""


def build_parser() -> argparse.ArgumentParser:
    d = OperatorConfig()
    interval = seconds(maximum=MAX_INTERVAL_S)
    p = argparse.ArgumentParser(
        prog="vnpu operator", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: all namespaces",
    )
    p.add_argument(
        "--leader-elect",
        action="store_true",
        help="elect one active replica through a Lease (run this with more than one replica, and "
        "for rolling updates of a single one)",
    )
    p.add_argument(
        "--leader-election-namespace",
        default=None,
        help="namespace of the Lease (default: the pod's namespace, else 'default')",
    )
    p.add_argument(
        "--leader-election-id", default="vnpu-operator", help="name of the Lease (default %(default)s)"
    )
    p.add_argument("--lease-duration", type=interval, default=15.0, help="seconds (default %(default)s)")
    p.add_argument("--renew-deadline", type=interval, default=10.0, help="seconds (default %(default)s)")
    p.add_argument("--retry-period", type=interval, default=2.0, help="seconds (default %(default)s)")
    p.add_argument(
        "--standalone", action="store_true", help="accepted for compatibility (kopf peering is not used)"
    )
    p.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)"
    )
    p.add_argument("--metrics-host", default="127.0.0.1", help="metrics bind address (default %(default)s)")
    p.add_argument(
        "--liveness", default=None, help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    p.add_argument(
        "--runtime-image",
        default=DEFAULT_RUNTIME_IMAGE,
        help="image of weight-holder and replica pods when a model sets none (default %(default)s)",
    )
    p.add_argument("--placeholder-image", default=DEFAULT_PLACEHOLDER_IMAGE, help="image of placeholder pods")
    p.add_argument("--image-pull-policy", default="IfNotPresent", choices=["Always", "IfNotPresent", "Never"])
    p.add_argument(
        "--image-pull-secret",
        action="append",
        default=[],
        type=_secret_name,
        metavar="NAME",
        help="a Secret (kubernetes.io/dockerconfigjson) the kubelet pulls model pods' images with; it must "
        "exist in every namespace with models, as a pod names only Secrets of its own namespace (repeatable)",
    )
    p.add_argument("--no-placeholders", action="store_true", help="do not create autoscaler placeholder pods")
    p.add_argument(
        "--defragment",
        action="store_true",
        help="move running replicas when that frees devices (default: placements are sticky): one "
        "batch at a time, only while every model pod is Ready and nothing else changes, each new pod "
        "started beside the one it replaces, which goes once the new one is Ready",
    )
    p.add_argument(
        "--defragment-max-moves",
        type=_positive_int,
        default=10,
        help="the most running replicas one defragmentation batch moves (default %(default)s)",
    )
    p.add_argument(
        "--preemption",
        choices=PREEMPTION_SCOPES,
        default="namespace",
        help="whose running replicas a model of higher spec.priority may evict when it fits nowhere: "
        "its own namespace's (default), any namespace's (cluster: for clusters where whoever may write "
        "an InferenceModel is trusted), or none (never)",
    )
    p.add_argument("--resync-seconds", type=interval, default=60.0, help="full re-plan at least this often")
    p.add_argument(
        "--node-grace-seconds",
        type=int,
        default=300,
        help="seconds a NotReady node keeps its pods before they are re-placed (default %(default)s, "
        "as Kubernetes' taint-based eviction)",
    )
    p.add_argument(
        "--model-cache-dir",
        default=None,
        help="local HF hub cache or mirror where hf:// sources are found to size them",
    )
    p.add_argument(
        "--model-file-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory whose file:// sources the operator may read to size models (repeatable; "
        "default none: a file:// model declares spec.weights.sizeMiB and its KV size or modelConfig, "
        "so no tenant's spec can make the operator read a file of its own)",
    )
    p.add_argument(
        "--estimate-workers",
        type=_positive_int,
        default=d.estimate_workers,
        help="threads that read models' files to size them, away from the reconcile pass, each in a child "
        "process (default %(default)s); a namespace reads one model at a time, so one tenant's slow files "
        "hold one worker at most",
    )
    p.add_argument(
        "--estimate-timeout",
        type=seconds(maximum=3600),
        default=d.estimate_timeout_seconds,
        metavar="SECONDS",
        help="the longest one model's files may take to read; past it the read is killed and the model "
        "retried with backoff (default %(default)s)",
    )
    p.add_argument(
        "--pool-label",
        default="vnpu.io/pool",
        help="node label naming a node's pool; keep-warm budgets are per pool (default %(default)s; "
        "nodes without it form the pool 'default')",
    )
    p.add_argument(
        "--keep-warm-fraction",
        type=_fraction,
        default=0.2,
        help="fraction of a pool's device memory that weight-holders of models scaled to zero may keep "
        "when their keepWarm is Auto, chosen by the demand forecast (default %(default)s)",
    )
    p.add_argument(
        "--network-policy",
        action="store_true",
        help="keep a NetworkPolicy 'vnpu-model-pods' in each namespace with models: model pods then take "
        "traffic only from pods of their own namespace and from the --network-policy-from peers (where "
        "the CNI enforces NetworkPolicy); a namespace whose policy is refused gets no new pods",
    )
    p.add_argument(
        "--network-policy-from",
        action="append",
        default=[],
        type=_network_policy_peer,
        metavar="JSON",
        help="a NetworkPolicyPeer that may also reach model pods, as JSON (repeatable), e.g. the "
        'gateway\'s pods: \'{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": '
        '"vnpu-system"}}, "podSelector": {"matchLabels": {"app.kubernetes.io/component": '
        '"gateway"}}}\'',
    )
    p.add_argument("--log-format", choices=["json", "text"], default="json")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _fraction(value: str) -> float:
    """A number in [0, 1] (NaN and infinities refused: the keep-warm budget is computed from it)."""
    number = float(value)
    if not 0.0 <= number <= 1.0:  # (False for NaN too)
        raise argparse.ArgumentTypeError(f"{value!r} is not a fraction between 0 and 1")
    return number


def _network_policy_peer(value: str) -> dict[str, Any]:
    try:
        return network_policy.parse_peer(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


#: A Secret's name: a DNS-1123 subdomain (lower-case alphanumerics, '-' and '.'; at most 253).
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _secret_name(value: str) -> str:
    """Refused at start, not as every model pod's 422 later."""
    if len(value) > 253 or not _SECRET_NAME.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Secret name (a DNS-1123 subdomain)")
    return value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def _lease_namespace(args: argparse.Namespace) -> str:
    if args.leader_election_namespace:
        return str(args.leader_election_namespace)
    own = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return own.read_text().strip() if own.exists() else "default"


async def _standby_health(liveness: str | None) -> asyncio.AbstractServer | None:
    """While waiting to lead, answer the liveness endpoint (kopf serves it once this replica leads)."""
    if not liveness:
        return None
    url = urllib.parse.urlsplit(liveness)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        body = b'{"standby": true}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, url.hostname, url.port, reuse_address=True)


async def run(args: argparse.Namespace, config: OperatorConfig) -> int:
    import kopf

    from vnpu.kubeclient import api_client_from_env
    from vnpu.operator import handlers
    from vnpu.operator.leader import LeaderElector, LeaseConfig

    stop, lost = threading.Event(), threading.Event()
    # kopf installs its own SIGTERM/SIGINT handlers once it runs. Until then (a standby waiting to lead,
    # possibly for days, or a start-up) the default action would end the process mid-request, exit -15.
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    elector = None
    if args.leader_elect:
        lease = LeaseConfig(
            _lease_namespace(args),
            args.leader_election_id,
            f"{socket.gethostname()}_{uuid.uuid4()}",
            args.lease_duration,
            args.renew_deadline,
            args.retry_period,
        )
        elector = LeaderElector(api_client_from_env(), lease)
        standby = await _standby_health(args.liveness)
        try:
            leading = await asyncio.to_thread(elector.acquire, stop)
        finally:
            if standby is not None:
                standby.close()
                await standby.wait_closed()
        if not leading:  # told to stop while standing by: nothing to hand over
            log.info("stopped while waiting to lead")
            return 0

        def on_lost() -> None:
            lost.set()
            stop.set()

        elector.keep_leading(on_lost)

    registry = kopf.OperatorRegistry()
    handlers.register(registry, config, elector.is_leader if elector else lambda: True)
    settings = kopf.OperatorSettings()
    # Our own keys for kopf's bookkeeping, in annotations: status stays ours and is never pruned.
    settings.persistence.finalizer = "vnpu.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="vnpu.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="vnpu.io")
    settings.posting.level = logging.WARNING  # only problems become Events; placement events are ours
    settings.execution.max_workers = 4
    settings.watching.server_timeout = 120
    settings.networking.error_backoffs = [1, 2, 5, 10]
    try:
        await kopf.operator(
            registry=registry,
            settings=settings,
            # One active replica is the Lease's business: kopf peering stays off.
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness,
            stop_flag=stop,
            # kopf would derive this from getpass.getuser(), which fails for a UID without a passwd
            # entry (OpenShift-style random UIDs).
            identity=f"{socket.gethostname()}@{os.getpid()}",  # type: ignore[arg-type]
        )
    finally:
        # kopf waits for a threading stop flag in a thread of the default executor, and asyncio.run
        # waits for that executor's threads before it returns: unset, the flag kept the process alive
        # after SIGTERM until the kubelet's SIGKILL.
        stop.set()
        if elector is not None:
            elector.release()
    return 1 if lost.is_set() else 0


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    """The settings the command line gives (parsed and checked by :func:`build_parser`)."""
    return OperatorConfig(
        runtime_image=args.runtime_image,
        image_pull_secrets=tuple(args.image_pull_secret),
        placeholder_image=args.placeholder_image,
        image_pull_policy=args.image_pull_policy,
        placeholders=not args.no_placeholders,
        resync_seconds=args.resync_seconds,
        namespaces=tuple(args.namespace),
        defragment=args.defragment,
        defragment_max_moves=args.defragment_max_moves,
        preemption=args.preemption,
        node_grace_seconds=args.node_grace_seconds,
        model_cache_dir=args.model_cache_dir,
        model_file_roots=tuple(args.model_file_root),
        estimate_workers=args.estimate_workers,
        estimate_timeout_seconds=args.estimate_timeout,
        pool_label=args.pool_label,
        keep_warm_fraction=args.keep_warm_fraction,
        network_policy=args.network_policy,
        network_policy_peers=tuple(args.network_policy_from),
    )


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.lease_duration > args.renew_deadline > args.retry_period:
        # client-go's rule: a leader must renew before its Lease runs out, with retries in between.
        parser.error("--lease-duration must exceed --renew-deadline, which must exceed --retry-period")
    setup_logging(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = str(args.kubeconfig)

    from vnpu.operator.metrics import REGISTRY

    config = config_from_args(args)
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_host, registry=REGISTRY)
    return asyncio.run(run(args, config))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
