"""The gRPC ``v1beta1.DevicePlugin`` service the kubelet calls."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from vnpu.device_plugin import contract
from vnpu.device_plugin.backends.base import Backend
from vnpu.device_plugin.devices import DeviceTable
from vnpu.device_plugin.ledger import Allocation, Ledger, PodRef
from vnpu.device_plugin.metrics import PluginMetrics
from vnpu.device_plugin.placement import (
    AllocationError,
    group_by_device,
    preferred_allocation,
    validate_request,
)
from vnpu.device_plugin.pods import PodSummary, PodWatcher, match_pod, preferred_device
from vnpu.device_plugin.proto import api_pb2, api_pb2_grpc
from vnpu.inventory import HEALTHY, UNHEALTHY

log = logging.getLogger(__name__)

#: How often an idle ListAndWatch stream re-checks that its client is still there.
STREAM_POLL_S = 1.0


@dataclass(frozen=True)
class ServiceOptions:
    slice_mib: int
    allow_spanning: bool = False
    share_root: Path = Path(contract.DEFAULT_SHARE_ROOT)


def list_and_watch_response(table: DeviceTable) -> api_pb2.ListAndWatchResponse:
    """Every slice of every device, with its device's health and NUMA node."""
    devices = []
    for entry in table.entries():
        health = HEALTHY if entry.healthy else UNHEALTHY
        topology = None
        if entry.device.numa_node is not None:
            topology = api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=entry.device.numa_node)])
        for sid in entry.slice_ids():
            devices.append(api_pb2.Device(ID=sid, health=health, topology=topology))
    return api_pb2.ListAndWatchResponse(devices=devices)


class DevicePluginService(api_pb2_grpc.DevicePluginServicer):
    """Answers the kubelet from the device table, the ledger and (when configured) the pod watcher."""

    def __init__(
        self,
        table: DeviceTable,
        ledger: Ledger,
        backend: Backend,
        options: ServiceOptions,
        *,
        pods: PodWatcher | None = None,
        metrics: PluginMetrics | None = None,
    ) -> None:
        self.table = table
        self.ledger = ledger
        self.backend = backend
        self.options = options
        self.pods = pods
        self.metrics = metrics
        self._allocate_lock = threading.Lock()

    # -- options / streams --------------------------------------------------------------------------
    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        cancelled = threading.Event()

        def on_done() -> None:
            cancelled.set()
            self.table.wake_watchers()

        context.add_callback(on_done)
        sent = -1
        log.info("ListAndWatch stream opened", extra={"peer": context.peer()})
        while not cancelled.is_set() and context.is_active():
            version = self.table.version
            if version != sent:
                sent = version
                yield list_and_watch_response(self.table)
            self.table.wait_for_change(sent, timeout=STREAM_POLL_S, stop=cancelled)
        log.info("ListAndWatch stream closed", extra={"peer": context.peer()})

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()

    # -- pod matching -------------------------------------------------------------------------------
    def _pods(self, refresh: bool) -> list[PodSummary]:
        if self.pods is None:
            return []
        if refresh:
            try:
                return self.pods.refresh()
            except Exception as exc:
                log.warning("listing pods on this node failed", extra={"error": repr(exc)[:300]})
        return self.pods.pods()

    def _claimed(self) -> list[PodRef]:
        return self.ledger.claimed_pods()

    # -- GetPreferredAllocation ---------------------------------------------------------------------
    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        order = {e.id: e.device.index for e in self.table.entries()}
        avoid = self.ledger.held_slices()
        responses = []
        for req in request.container_requests:
            available = list(req.available_deviceIDs)
            size = int(req.allocation_size)
            counts = {
                d: len(m) for d, m in group_by_device([*available, *req.must_include_deviceIDs]).items()
            }
            wanted = self._preferred_device(size, counts)
            chosen = preferred_allocation(
                available,
                list(req.must_include_deviceIDs),
                size,
                preferred_device=wanted,
                avoid=avoid,
                device_order=order,
            )
            log.info(
                "preferred allocation", extra={"size": size, "preferred_device": wanted, "slices": chosen}
            )
            responses.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return api_pb2.PreferredAllocationResponse(container_responses=responses)

    def _preferred_device(self, size: int, counts: dict[str, int]) -> str | None:
        if self.pods is None:
            return None
        claimed = self._claimed()
        device = preferred_device(self._pods(refresh=False), size, counts, claimed)
        if device is None:
            device = preferred_device(self._pods(refresh=True), size, counts, claimed)
        return device

    # -- Allocate -----------------------------------------------------------------------------------
    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        started = time.perf_counter()
        try:
            with self._allocate_lock:  # one at a time: matching a pod and recording it must not interleave
                return api_pb2.AllocateResponse(
                    container_responses=[
                        self._allocate_container(list(r.devices_ids)) for r in request.container_requests
                    ]
                )
        except AllocationError as exc:
            if self.metrics is not None:
                self.metrics.allocate_errors.inc()
            log.warning("Allocate refused", extra={"error": str(exc)})
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # not reached: abort raises
        finally:
            if self.metrics is not None:
                self.metrics.allocate_seconds.observe(time.perf_counter() - started)

    def _allocate_container(self, ids: list[str]) -> api_pb2.ContainerAllocateResponse:
        device_of: dict[str, str] = {}
        unhealthy: dict[str, str] = {}
        for sid in ids:
            entry = self.table.owner_of(sid)
            if entry is not None:
                device_of[sid] = entry.id
                if not entry.healthy:
                    unhealthy[entry.id] = entry.reason
        validated = validate_request(ids, device_of, unhealthy, allow_spanning=self.options.allow_spanning)
        pod = self._pod_for(ids, validated.devices)
        share_group = ""
        if pod is not None and pod.share_group:
            try:
                share_group = contract.validate_share_group(pod.share_group)
            except ValueError as exc:
                raise AllocationError(f"pod {pod.ref}: {exc}") from None
        response = self._response(validated.by_device, share_group)
        displaced = self.ledger.record(
            Allocation(
                slices=tuple(ids),
                devices=tuple(validated.devices),
                pod=pod.ref if pod else None,
                share_group=share_group,
            )
        )
        for old in displaced:
            # Normal when a pod ended and the kubelet re-used its slices before the plugin noticed.
            log.info(
                "slices re-allocated by the kubelet; previous holder released",
                extra={"slices": list(old.slices), "previous_pod": str(old.pod) if old.pod else None},
            )
        log.info(
            "allocated",
            extra={
                "slices": ids,
                "devices": validated.devices,
                "pod": str(pod.ref) if pod else None,
                "share_group": share_group or None,
            },
        )
        return response

    def _pod_for(self, ids: list[str], devices: list[str]) -> PodSummary | None:
        if self.pods is None:
            return None
        held = self.ledger.held()
        # Reused slices (an init container's, handed to the next container of the same pod): same pod.
        holders = {a.pod for sid in ids if (a := held.get(sid)) is not None and a.pod is not None}
        pods = self._pods(refresh=False)
        if len(holders) == 1:
            holder = next(iter(holders))
            same = [p for p in pods if p.ref.same_pod(holder) and p.pending]
            if same:
                return same[0]
        claimed = self._claimed()
        pod = match_pod(pods, devices, len(ids), claimed)
        if pod is None:
            pod = match_pod(self._pods(refresh=True), devices, len(ids), claimed)
        if pod is None:
            log.warning(
                "no pending pod on this node matches the allocation; no share group mounted",
                extra={"slices": ids, "devices": devices},
            )
        return pod

    def _response(
        self, by_device: dict[str, list[str]], share_group: str
    ) -> api_pb2.ContainerAllocateResponse:
        slice_count = sum(len(v) for v in by_device.values())
        envs: dict[str, str] = {}
        device_specs = []
        for device_id in by_device:
            entry = self.table.entry(device_id)
            assert entry is not None  # validated above
            for key, value in self.backend.container_env(entry.device).items():
                envs[key] = f"{envs[key]},{value}" if key in envs else value
            for node in self.backend.device_nodes(entry.device):
                spec = api_pb2.DeviceSpec(
                    container_path=node.container_path, host_path=node.host_path, permissions=node.permissions
                )
                if spec not in device_specs:
                    device_specs.append(spec)
        envs.update(
            {
                contract.ENV_DEVICE: ",".join(by_device),
                contract.ENV_MEMORY_LIMIT_MIB: str(slice_count * self.options.slice_mib),
                contract.ENV_SLICES: str(slice_count),
                contract.ENV_SLICE_MIB: str(self.options.slice_mib),
                contract.ENV_SHARE_GROUP: share_group,
            }
        )
        mounts = []
        if share_group:
            host_dir = contract.share_group_host_dir(self.options.share_root, share_group)
            if not host_dir.is_dir():
                # Sticky and world-writable like /tmp: the group's pods may run as any user and must
                # create their sockets here, but cannot remove each other's. Only this group mounts it.
                host_dir.mkdir(parents=True, exist_ok=True)
                host_dir.chmod(0o1777)
            mounts.append(
                api_pb2.Mount(
                    container_path=contract.SOCKET_DIR_IN_CONTAINER, host_path=str(host_dir), read_only=False
                )
            )
            envs[contract.ENV_SOCKET_DIR] = contract.SOCKET_DIR_IN_CONTAINER
        annotations: dict[str, Any] = {"vnpu.io/allocated-device": ",".join(by_device)}
        return api_pb2.ContainerAllocateResponse(
            envs=envs, mounts=mounts, devices=device_specs, annotations=annotations
        )
