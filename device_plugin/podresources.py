"""Client of the kubelet's pod-resources API v1: which devices live pods hold.

The kubelet serves it on ``/var/lib/kubelet/pod-resources/kubelet.sock``. After a restart the plugin
asks it which slices of vnpu's per-device resources (``vnpu.io/memory-<index>``) are held, and by
whom, to rebuild its ledger.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from vnpu.api import device_resource_index
from vnpu.device_plugin.ledger import PodRef
from vnpu.device_plugin.proto import podresources_pb2, podresources_pb2_grpc

DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")


def list_held_slices(socket_path: str | Path = DEFAULT_SOCKET, timeout_s: float = 5.0) -> dict[str, PodRef]:
    """slice ID -> holding pod for every vnpu slice assigned to a live pod's container.
    Raises grpc.RpcError when the kubelet cannot be reached."""
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        stub = podresources_pb2_grpc.PodResourcesListerStub(channel)
        response = stub.List(podresources_pb2.ListPodResourcesRequest(), timeout=timeout_s)
    held: dict[str, PodRef] = {}
    for pod in response.pod_resources:
        ref = PodRef(pod.namespace, pod.name)
        for container in pod.containers:
            for devices in container.devices:
                if device_resource_index(devices.resource_name) is not None:
                    for sid in devices.device_ids:
                        held[sid] = ref
    return held
