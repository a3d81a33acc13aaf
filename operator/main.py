"""``vnpu operator``: run the InferenceModel operator (kopf) against the current cluster."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

from vnpu.logs import setup_logging
from vnpu.operator.config import DEFAULT_PLACEHOLDER_IMAGE, DEFAULT_RUNTIME_IMAGE, OperatorConfig

DESCRIPTION = """\
Reconcile vnpu.io/v1alpha1 InferenceModel resources: pack replicas onto (node, device) pairs by
memory (a share group's weights are paid once per device), run one weight-holder pod per
(node, device, share group), launch the replica pods pinned to their node with the chosen device in
the vnpu.io/device annotation, and report status, events and Prometheus metrics. Demand that fits
nowhere becomes low-priority placeholder pods so a Cluster Autoscaler adds nodes.

Credentials: in-cluster service account, else --kubeconfig / $KUBECONFIG / ~/.kube/config.
"""


def build_parser() -> argparse.ArgumentParser:
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
        "--standalone",
        action="store_true",
        help="run without kopf peering (a single replica; otherwise replicas elect one active)",
    )
    p.add_argument(
        "--peering", default="vnpu-operator", help="kopf peering object name (default %(default)s)"
    )
    p.add_argument("--priority", type=int, default=0, help="kopf peering priority of this instance")
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
    p.add_argument("--no-placeholders", action="store_true", help="do not create autoscaler placeholder pods")
    p.add_argument(
        "--defragment",
        action="store_true",
        help="allow moving running replicas when that frees devices (default: placements are sticky)",
    )
    p.add_argument("--resync-seconds", type=float, default=60.0, help="full re-plan at least this often")
    p.add_argument("--log-format", choices=["json", "text"], default="json")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = str(args.kubeconfig)

    import kopf

    from vnpu.operator import handlers
    from vnpu.operator.metrics import REGISTRY

    config = OperatorConfig(
        runtime_image=args.runtime_image,
        placeholder_image=args.placeholder_image,
        image_pull_policy=args.image_pull_policy,
        placeholders=not args.no_placeholders,
        resync_seconds=args.resync_seconds,
        namespaces=tuple(args.namespace),
        defragment=args.defragment,
    )
    registry = kopf.OperatorRegistry()
    handlers.register(registry, config)

    settings = kopf.OperatorSettings()
    # Our own keys for kopf's bookkeeping, in annotations: status stays ours and is never pruned.
    settings.persistence.finalizer = "vnpu.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="vnpu.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="vnpu.io")
    settings.posting.level = logging.WARNING  # only problems become Events; placement events are ours
    settings.execution.max_workers = 4
    settings.watching.server_timeout = 120
    settings.networking.error_backoffs = [1, 2, 5, 10]

    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_host, registry=REGISTRY)

    asyncio.run(
        kopf.operator(
            registry=registry,
            settings=settings,
            standalone=args.standalone,
            priority=args.priority,
            # A peering name makes peering mandatory in kopf, even next to standalone=True.
            peering_name=None if args.standalone else args.peering,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness,
            # kopf would derive this from getpass.getuser(), which fails for a UID without a passwd
            # entry (OpenShift-style random UIDs).
            identity=f"{socket.gethostname()}@{os.getpid()}",  # type: ignore[arg-type]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
