"""The `vnpu up` placement table from nodes and pods (pure)."""

from __future__ import annotations

from typing import Any

from vnpu import api
from vnpu.cluster.kwok import npu_node_manifest
from vnpu.cluster.placement_view import device_rows, render_table


def pod(role: str, node: str, device: str, slices: int, group: str, model: str = "m") -> dict[str, Any]:
    return {
        "metadata": {
            "labels": {api.LABEL_ROLE: role, api.LABEL_MODEL: model, api.LABEL_SHARE_GROUP: group},
            "annotations": {api.ANNOTATION_DEVICE: device, api.ANNOTATION_SLICES: str(slices)},
        },
        "spec": {"nodeName": node},
    }


def test_rows_count_slices_models_and_sharing() -> None:
    nodes = [npu_node_manifest("n1", devices=2, device_mib=16 * 1024)]
    pods = [
        pod(api.ROLE_WEIGHTS, "n1", "n1-npu0", 4, "g"),
        pod(api.ROLE_REPLICA, "n1", "n1-npu0", 1, "g", "a"),
        pod(api.ROLE_REPLICA, "n1", "n1-npu0", 1, "g", "a"),
        pod(api.ROLE_REPLICA, "n1", "n1-npu0", 1, "g", "b"),
        pod(api.ROLE_WEIGHTS, "n1", "n1-npu0", 2, "h"),
        pod(api.ROLE_REPLICA, "n1", "n1-npu0", 2, "h", "c"),
    ]
    (row,) = device_rows(nodes, pods)
    assert (row.used_slices, row.total_slices, row.weight_slices) == (11, 16, 6)
    assert row.replicas == {"a": 2, "b": 1, "c": 1}
    assert row.saved_mib() == 2 * 4 * 1024  # group g: 3 replicas on one 4-slice copy; h: no saving
    table = render_table([row])
    assert "n1-npu0" in table and "11/16" in table and "a×2, b×1, c×1" in table and "8192" in table


def test_devices_without_vnpu_pods_are_left_out() -> None:
    nodes = [npu_node_manifest("n1", devices=2)]
    assert device_rows(nodes, []) == []


def test_saving_counts_the_holders_weight_mib_when_it_says() -> None:
    nodes = [npu_node_manifest("n1", devices=1, device_mib=16 * 1024)]
    holder = pod(api.ROLE_WEIGHTS, "n1", "n1-npu0", 1, "g")
    holder["metadata"]["annotations"][api.ANNOTATION_WEIGHTS_MIB] = "94"
    replicas = [pod(api.ROLE_REPLICA, "n1", "n1-npu0", 1, "g", m) for m in ("a", "a", "b", "b")]
    (row,) = device_rows(nodes, [holder, *replicas])
    # Four replicas on one 94 MiB copy: three copies not made (not three whole slices).
    assert row.saved_mib() == 3 * 94
