"""``vnpu cluster``: build the Kubernetes binaries, or run a bare local control plane for poking at."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from vnpu.cluster.binaries import ensure_binaries


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vnpu cluster",
        description="Build (or reuse) the Kubernetes binaries vnpu tests against, or run a local control "
        "plane made of them (etcd, kube-apiserver, scheduler, controller-manager, kwok) on 127.0.0.1.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "build", help="build missing binaries into the version-keyed cache and print the directory"
    )
    run = sub.add_parser("run", help="start a control plane with CRDs and N kwok NPU nodes until Ctrl-C")
    run.add_argument("--nodes", type=int, default=3, help="simulated NPU nodes to create (default 3)")
    run.add_argument("--devices-per-node", type=int, default=8)
    run.add_argument("--workdir", type=Path, default=None, help="where to keep PKI, kubeconfig and logs")
    args = parser.parse_args(argv)

    bin_dir = ensure_binaries()
    if args.command == "build":
        print(bin_dir)
        return 0

    from vnpu.cluster.controlplane import ControlPlane
    from vnpu.cluster.kwok import create_npu_nodes

    crds = Path(__file__).resolve().parents[2] / "crds"
    with ControlPlane(bin_dir, args.workdir) as cp:
        cp.start_scheduler()
        cp.start_controller_manager()
        cp.start_kwok()
        if crds.is_dir():
            cp.kubectl("apply", "--server-side", "-f", str(crds))
        create_npu_nodes(cp.api_client(), args.nodes, devices=args.devices_per_node)
        print(f"control plane ready: export KUBECONFIG={cp.kubeconfig}  (Ctrl-C stops it)", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
