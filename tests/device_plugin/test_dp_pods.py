"""Matching allocations to the pending pods on the node (pure part)."""

from __future__ import annotations

from vnpu.api import ANNOTATION_DEVICE, ANNOTATION_SHARE_GROUP, RESOURCE_MEMORY
from vnpu.device_plugin.ledger import PodRef
from vnpu.device_plugin.pods import match_pod, preferred_device, summarize


def pod(
    name: str,
    slices: int,
    *,
    device: str | None = None,
    group: str | None = None,
    created: str = "2026-01-01T00:00:00Z",
    phase: str = "Pending",
    init_slices: int | None = None,
) -> dict:
    annotations = {}
    if device:
        annotations[ANNOTATION_DEVICE] = device
    if group:
        annotations[ANNOTATION_SHARE_GROUP] = group
    spec: dict = {
        "containers": [
            {"name": "main", "resources": {"limits": {RESOURCE_MEMORY: str(slices)}}},
            {"name": "sidecar", "resources": {}},
        ]
    }
    if init_slices is not None:
        spec["initContainers"] = [
            {"name": "init", "resources": {"requests": {RESOURCE_MEMORY: str(init_slices)}}}
        ]
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "annotations": annotations,
            "creationTimestamp": created,
        },
        "spec": spec,
        "status": {"phase": phase},
    }


def test_summarize_reads_requests_annotations_and_phase():
    s = summarize(pod("a", 3, device="npu1", group="g", init_slices=1))
    assert s.requests == (1, 3, 0)
    assert (s.device, s.share_group, s.pending, s.ref) == ("npu1", "g", True, PodRef("ns", "a", "uid-a"))
    assert summarize(pod("b", 1, phase="Succeeded")).finished


def test_match_prefers_the_oldest_unclaimed_pod_annotated_with_the_device():
    pods = [
        summarize(pod("late", 2, device="npu0", created="2026-01-01T00:00:09Z")),
        summarize(pod("early", 2, device="npu0", created="2026-01-01T00:00:01Z")),
        summarize(pod("other-device", 2, device="npu1", created="2026-01-01T00:00:00Z")),
        summarize(pod("other-size", 3, device="npu0", created="2026-01-01T00:00:00Z")),
        summarize(pod("running", 2, device="npu0", phase="Running", created="2026-01-01T00:00:00Z")),
    ]
    assert match_pod(pods, ["npu0"], 2, claimed=[]).ref.name == "early"
    assert match_pod(pods, ["npu0"], 2, claimed=[PodRef("ns", "early", "uid-early")]).ref.name == "late"
    assert match_pod(pods, ["npu2"], 2, claimed=[]) is None  # annotated for other devices only


def test_unannotated_pods_match_any_device():
    pods = [summarize(pod("plain", 2))]
    assert match_pod(pods, ["npu5"], 2, claimed=[]).ref.name == "plain"


def test_preferred_device_needs_room_on_the_annotated_device():
    pods = [summarize(pod("a", 4, device="npu1"))]
    assert preferred_device(pods, 4, {"npu0": 8, "npu1": 4}, claimed=[]) == "npu1"
    assert preferred_device(pods, 4, {"npu0": 8, "npu1": 3}, claimed=[]) is None
    assert preferred_device(pods, 2, {"npu1": 8}, claimed=[]) is None  # no pod asks for 2
