"""``vnpu device-plugin``: run the kubelet device plugin advertising each device's memory slices."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from vnpu.api import DEFAULT_SLICE_MIB, RESOURCE_PREFIX
from vnpu.argtypes import MAX_INTERVAL_S, seconds
from vnpu.device_plugin import contract
from vnpu.device_plugin.backends.ascend import DEFAULT_DRIVER_PATH, SHARED_DEVICE_FILES
from vnpu.device_plugin.backends.base import BACKEND_NAMES, FALLBACKS, Backend, create_backend
from vnpu.device_plugin.ledger import SYNC_MODES
from vnpu.device_plugin.plugin import PluginConfig, PluginRunner
from vnpu.logs import setup_logging

log = logging.getLogger("vnpu.device_plugin")

DESCRIPTION = f"""\
Advertise each accelerator's memory to the kubelet as slices, one extended resource per device:
{RESOURCE_PREFIX}<index> (one device ID per slice, <device>-s<index>; one gRPC endpoint and one
registration per device). Allocate depends on the device alone: it hands out the vendor's
visible-device variables, VNPU_DEVICE, the memory limit (slices x slice size), device nodes and the
device's socket directory. The plugin never looks at pods. It writes the node annotation
vnpu.io/devices and exports Prometheus metrics.

Backends: ascend (npu-smi), nvidia (NVML, needs nvidia-ml-py), simulated (devices from
--simulated-config FILE or --simulated-devices COUNTxMIB[:NUMA]). auto picks Ascend (npu-smi, or the
driver's DCMI library), then NVIDIA (NVML); on a node with neither it advertises nothing and logs
what it looked for, unless --fallback simulated.
"""

EPILOG = """\
environment: NODE_NAME (default of --node-name), VNPU_SIMULATED_CONFIG, VNPU_SIMULATED_DEVICES,
VNPU_BACKEND_FALLBACK (default of --fallback), KUBECONFIG (default of --kubeconfig).

examples:
  vnpu device-plugin --node-name $(hostname)                       # in a DaemonSet (in-cluster config)
  vnpu device-plugin --simulated-devices 8x65536:2 --no-api \\
      --plugin-dir /tmp/dp --state-dir /tmp/dp-state --metrics-port 0  # local try-out without a cluster
"""


def build_parser() -> argparse.ArgumentParser:
    d = PluginConfig()
    p = argparse.ArgumentParser(
        prog="vnpu device-plugin",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("kubelet")
    g.add_argument(
        "--plugin-dir",
        type=Path,
        default=d.plugin_dir,
        help="kubelet device-plugin directory holding kubelet.sock (default: %(default)s)",
    )
    g.add_argument(
        "--socket-prefix",
        default=d.socket_prefix,
        help="endpoint sockets are <prefix><device index>.sock in the plugin dir (default: %(default)s)",
    )
    g.add_argument(
        "--pod-resources-socket",
        type=Path,
        default=d.pod_resources_socket,
        help="kubelet pod-resources API socket, read to rebuild allocations (default: %(default)s)",
    )

    g = p.add_argument_group("devices")
    g.add_argument(
        "--backend", choices=BACKEND_NAMES, default=d.backend, help="device backend (default: %(default)s)"
    )
    g.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default=os.environ.get("VNPU_BACKEND_FALLBACK") or "none",
        help="what --backend auto does when it finds no accelerator: none = advertise nothing, "
        "simulated = advertise the simulated devices (default: %(default)s)",
    )
    g.add_argument(
        "--slice-mib",
        type=int,
        default=DEFAULT_SLICE_MIB,
        help="size of one slice in MiB (default: %(default)s)",
    )
    g.add_argument(
        "--simulated-config",
        type=Path,
        default=os.environ.get("VNPU_SIMULATED_CONFIG") or None,
        help="YAML/JSON file declaring simulated devices (re-read on change)",
    )
    g.add_argument(
        "--simulated-devices",
        default=os.environ.get("VNPU_SIMULATED_DEVICES") or None,
        metavar="COUNTxMIB[:NUMA]",
        help="simulated devices as a spec, e.g. 8x65536:2 (default: 2x16384)",
    )
    g.add_argument(
        "--npu-smi",
        default=d.npu_smi,
        help="npu-smi executable for the ascend backend (default: %(default)s)",
    )
    g.add_argument(
        "--ascend-driver-path",
        default=DEFAULT_DRIVER_PATH,
        help="Ascend driver folder; npu-smi runs with its libraries, and its DCMI library marks an "
        "Ascend node for --backend auto (default: %(default)s)",
    )
    g.add_argument(
        "--ascend-device-files",
        default=",".join(SHARED_DEVICE_FILES),
        metavar="PATH[,PATH...]",
        help="device files every container on an Ascend NPU gets besides its /dev/davinci<N> "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--sysfs-root",
        type=Path,
        default=d.sysfs_root,
        help="sysfs mount for NUMA lookups (default: %(default)s)",
    )
    g.add_argument(
        "--health-interval",
        type=seconds(maximum=MAX_INTERVAL_S),
        default=d.health_interval_s,
        metavar="SECONDS",
        help="backend poll interval (default: %(default)s)",
    )
    g.add_argument(
        "--backend-error-grace",
        type=seconds(zero_ok=True, maximum=MAX_INTERVAL_S),
        default=d.backend_error_grace_s,
        metavar="SECONDS",
        help="how long the backend may fail as a whole (its tool timing out, say) before every device "
        "is marked Unhealthy: one failed poll had the operator re-place every replica of the node "
        "(default: %(default)s)",
    )

    g = p.add_argument_group("allocation")
    g.add_argument(
        "--socket-root",
        type=Path,
        default=d.socket_root,
        help="host directory with one socket directory per device; a container allocated slices of a "
        f"device gets that device's directory at {contract.SOCKET_DIR_IN_CONTAINER} (default: %(default)s)",
    )
    g.add_argument(
        "--state-dir",
        type=Path,
        default=d.state_dir,
        help="where the allocation checkpoint lives (default: %(default)s)",
    )
    g.add_argument(
        "--checkpoint-sync",
        choices=SYNC_MODES,
        default=d.checkpoint_sync,
        help="how journaled allocations reach the disk: sync = fdatasync before Allocate returns; async = "
        "right after, on a thread (survives plugin crashes; pod-resources covers an OS crash); off = never "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--reconcile-interval",
        type=seconds(maximum=MAX_INTERVAL_S),
        default=d.reconcile_interval_s,
        metavar="SECONDS",
        help="how often to reconcile allocations with the pod-resources API (default: %(default)s)",
    )
    g.add_argument(
        "--release-grace",
        type=seconds(zero_ok=True),
        default=d.release_grace_s,
        metavar="SECONDS",
        help="a slice is released once every pod-resources List for this long has left it out, and "
        "none within this long of a kubelet restart (default: %(default)s)",
    )

    g = p.add_argument_group("cluster")
    g.add_argument(
        "--node-name", default=os.environ.get("NODE_NAME"), help="this node's name (default: $NODE_NAME)"
    )
    g.add_argument(
        "--kubeconfig",
        type=Path,
        default=os.environ.get("KUBECONFIG") or None,
        help="kubeconfig for the API server (default: $KUBECONFIG, else in-cluster config)",
    )
    g.add_argument(
        "--no-api",
        action="store_true",
        help="do not talk to the API server (no node annotation)",
    )

    g = p.add_argument_group("observability")
    g.add_argument(
        "--metrics-address", default=d.metrics_address, help="metrics bind address (default: %(default)s)"
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=d.metrics_port,
        help="metrics port, 0 disables (default: %(default)s)",
    )
    g.add_argument(
        "--log-format", choices=("json", "text"), default="json", help="log format (default: %(default)s)"
    )
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def config_from_args(args: argparse.Namespace) -> PluginConfig:
    return PluginConfig(
        plugin_dir=args.plugin_dir,
        socket_prefix=args.socket_prefix,
        slice_mib=args.slice_mib,
        backend=args.backend,
        simulated_config=args.simulated_config,
        simulated_spec=args.simulated_devices,
        npu_smi=args.npu_smi,
        sysfs_root=args.sysfs_root,
        health_interval_s=args.health_interval,
        backend_error_grace_s=args.backend_error_grace,
        socket_root=args.socket_root,
        state_dir=args.state_dir,
        checkpoint_sync=args.checkpoint_sync,
        pod_resources_socket=args.pod_resources_socket,
        reconcile_interval_s=args.reconcile_interval,
        release_grace_s=args.release_grace,
        node_name=args.node_name,
        kubeconfig=args.kubeconfig,
        use_api=not args.no_api,
        metrics_address=args.metrics_address,
        metrics_port=args.metrics_port,
    )


def backend_from_args(args: argparse.Namespace) -> Backend:
    """The device backend the flags select (``auto`` detects; see the module's help)."""
    return create_backend(
        args.backend,
        fallback=args.fallback,
        config_path=args.simulated_config,
        spec=args.simulated_devices,
        npu_smi=args.npu_smi,
        sysfs_root=args.sysfs_root,
        driver_path=args.ascend_driver_path,
        device_files=[f for f in args.ascend_device_files.split(",") if f],
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    if args.slice_mib < 1:
        log.error("--slice-mib must be >= 1")
        return 2
    try:
        runner = PluginRunner(config_from_args(args), backend=backend_from_args(args))
    except ValueError as exc:
        log.error("cannot start the device plugin", extra={"error": str(exc)})
        return 2
    signal.signal(signal.SIGTERM, lambda *_: runner._stop.set())
    signal.signal(signal.SIGINT, lambda *_: runner._stop.set())
    try:
        runner.start()
        runner.wait()
    finally:
        runner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
