"""Fake NPU nodes for scale tests and demos: kwok keeps them Ready and "runs" pods bound to them.

Each node carries what a real node with vnpu's device plugin would show: one allocatable extended
resource per device (``vnpu.io/memory-<index>``) and the ``vnpu.io/devices`` inventory annotation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vnpu import api
from vnpu.inventory import DeviceInfo, NodeInventory

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
NPU_NODE_LABEL = "vnpu.io/npu"


def simulated_inventory(node: str, devices: int, device_mib: int, slice_mib: int) -> NodeInventory:
    """The inventory the device plugin's simulated backend would publish for ``devices`` equal devices."""
    return NodeInventory(
        tuple(
            DeviceInfo(
                id=f"{node}-npu{i}",
                index=i,
                model="simulated-npu",
                total_mib=device_mib,
                slice_mib=slice_mib,
                slices=device_mib // slice_mib,
                numa_node=0,
                resource=api.device_resource(i),
            )
            for i in range(devices)
        )
    )


def npu_node_manifest(
    name: str,
    *,
    devices: int = 8,
    device_mib: int = 64 * 1024,
    slice_mib: int = api.DEFAULT_SLICE_MIB,
    labels: Mapping[str, str] | None = None,
    taints: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    inventory = simulated_inventory(name, devices, device_mib, slice_mib)
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "250"}
    capacity.update({d.resource: str(d.slices) for d in inventory.devices})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: "fake", api.ANNOTATION_DEVICES: inventory.to_json()},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                NPU_NODE_LABEL: "true",
                **(labels or {}),
            },
        },
        "spec": {"taints": [dict(t) for t in taints]},
        "status": {"capacity": capacity, "allocatable": capacity, "phase": "Running"},
    }


def create_npu_nodes(api_client: Any, count: int, *, prefix: str = "npu", **kwargs: Any) -> list[str]:
    """Create ``count`` kwok nodes named ``<prefix>-<i>``; returns their names."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    names = [f"{prefix}-{i}" for i in range(count)]
    for name in names:
        core.create_node(npu_node_manifest(name, **kwargs))
    return names


def delete_nodes(api_client: Any, names: Iterable[str]) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)
    for name in names:
        try:
            core.delete_node(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
