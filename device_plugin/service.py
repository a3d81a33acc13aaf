"""The gRPC ``v1beta1.DevicePlugin`` service of one physical device, as the kubelet calls it.

The plugin registers one endpoint per device, each advertising that device's slices as its own
extended resource (``vnpu.io/memory-<index>``). ``Allocate`` is a pure function of the slice IDs it
is given (see :mod:`.allocation`); the only state it touches is the ledger, to remember what is held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from vnpu.device_plugin import contract
from vnpu.device_plugin.allocation import AllocationError, ContainerEdits, container_edits
from vnpu.device_plugin.backends.base import Backend
from vnpu.device_plugin.devices import DeviceEntry, DeviceTable
from vnpu.device_plugin.ledger import Allocation, JournalWriteError, Ledger
from vnpu.device_plugin.metrics import PluginMetrics
from vnpu.device_plugin.placement import preferred_allocation, validate_allocate
from vnpu.device_plugin.proto import api_pb2, api_pb2_grpc
from vnpu.inventory import HEALTHY, UNHEALTHY

log = logging.getLogger(__name__)

#: How often an idle ListAndWatch stream re-checks that its client is still there.
STREAM_POLL_S = 1.0
#: Annotation the kubelet passes to the container runtime: which device the container got.
ALLOCATED_DEVICE_ANNOTATION = "vnpu.io/allocated-device"


@dataclass(frozen=True)
class ServiceOptions:
    socket_root: str = contract.DEFAULT_SOCKET_ROOT


def list_and_watch_response(entry: DeviceEntry | None) -> api_pb2.ListAndWatchResponse:
    """Every slice of one device, with the device's health and NUMA node (none if it is unknown)."""
    if entry is None:
        return api_pb2.ListAndWatchResponse(devices=[])
    health = HEALTHY if entry.healthy else UNHEALTHY
    topology = None
    if entry.device.numa_node is not None:
        topology = api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=entry.device.numa_node)])
    return api_pb2.ListAndWatchResponse(
        devices=[api_pb2.Device(ID=sid, health=health, topology=topology) for sid in entry.slice_ids()]
    )


def allocate_response(edits: ContainerEdits) -> api_pb2.ContainerAllocateResponse:
    """The kubelet's form of :class:`ContainerEdits`."""
    return api_pb2.ContainerAllocateResponse(
        envs=dict(edits.env),
        mounts=[
            api_pb2.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only)
            for m in edits.mounts
        ],
        devices=[
            api_pb2.DeviceSpec(
                container_path=n.container_path, host_path=n.host_path, permissions=n.permissions
            )
            for n in edits.device_nodes
        ],
        annotations={ALLOCATED_DEVICE_ANNOTATION: edits.env[contract.ENV_DEVICE]},
    )


class DeviceService(api_pb2_grpc.DevicePluginServicer):
    """Answers the kubelet for the slices of ``device_id`` from the device table and the ledger."""

    def __init__(
        self,
        device_id: str,
        table: DeviceTable,
        ledger: Ledger,
        backend: Backend,
        options: ServiceOptions,
        *,
        metrics: PluginMetrics | None = None,
    ) -> None:
        self.device_id = device_id
        self.table = table
        self.ledger = ledger
        self.backend = backend
        self.options = options
        self.metrics = metrics

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
        sent: api_pb2.ListAndWatchResponse | None = None
        log.info("ListAndWatch stream opened", extra={"device": self.device_id, "peer": context.peer()})
        while not cancelled.is_set() and context.is_active():
            version = self.table.version
            response = list_and_watch_response(self.table.entry(self.device_id))
            if response != sent:  # another device's change wakes every stream; send only real changes
                sent = response
                yield response
            self.table.wait_for_change(version, timeout=STREAM_POLL_S, stop=cancelled)
        log.info("ListAndWatch stream closed", extra={"device": self.device_id, "peer": context.peer()})

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()

    # -- GetPreferredAllocation ---------------------------------------------------------------------
    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        held = self.ledger.held_slices()
        responses = []
        for req in request.container_requests:
            chosen = preferred_allocation(
                list(req.available_deviceIDs),
                list(req.must_include_deviceIDs),
                int(req.allocation_size),
                avoid=held,
            )
            responses.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return api_pb2.PreferredAllocationResponse(container_responses=responses)

    # -- Allocate -----------------------------------------------------------------------------------
    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        started = time.perf_counter()
        try:
            containers = [list(r.devices_ids) for r in request.container_requests]
            # Every container is checked and answered before any is recorded: a refused Allocate
            # leaves nothing in the ledger.
            responses = self._allocate_responses(containers)
            self._record(containers)
            return api_pb2.AllocateResponse(container_responses=responses)
        except AllocationError as exc:
            if self.metrics is not None:
                self.metrics.allocate_errors.inc()
            log.warning("Allocate refused", extra={"device": self.device_id, "error": str(exc)})
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # not reached: abort raises
        except JournalWriteError as exc:  # nothing was recorded
            if self.metrics is not None:
                self.metrics.allocate_errors.inc()
            log.error(
                "Allocate failed: cannot record it in the ledger's journal %s (%s); free space there or "
                "fix --state-dir",
                exc.filename,
                exc.strerror,
                extra={"device": self.device_id, "path": exc.filename, "error": repr(exc)},
            )
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"the vnpu device plugin cannot record this allocation in its journal {exc.filename}: "
                f"{exc.strerror} (free space there or fix the plugin's --state-dir)",
            )
            raise  # not reached: abort raises
        finally:
            if self.metrics is not None:
                self.metrics.allocate_seconds.observe(time.perf_counter() - started)

    def _allocate_responses(self, containers: list[list[str]]) -> list[api_pb2.ContainerAllocateResponse]:
        entry = self.table.entry(self.device_id)
        if entry is None:
            raise AllocationError(f"device {self.device_id} is not in the device table")
        device_of = {
            sid: owner.id
            for ids in containers
            for sid in ids
            if (owner := self.table.owner_of(sid)) is not None
        }
        validate_allocate(containers, device_of, self.device_id)
        return [
            allocate_response(
                container_edits(entry, len(ids), self.backend, socket_root=self.options.socket_root)
            )
            for ids in containers
        ]

    def _record(self, containers: list[list[str]]) -> None:
        """Record every container's slices, all or none (JournalWriteError: none)."""
        displaced = self.ledger.record_all(
            [Allocation(slices=tuple(ids), devices=(self.device_id,)) for ids in containers]
        )
        for old in displaced:
            # Normal when a pod ended and the kubelet re-used its slices before the plugin noticed.
            log.info(
                "slices re-allocated by the kubelet; previous holder released",
                extra={"slices": list(old.slices), "previous_pod": str(old.pod) if old.pod else None},
            )
        for ids in containers:
            log.info("allocated", extra={"device": self.device_id, "slices": ids})
