"""Deletes carry the uid the operator saw, against the real API server: a pod made again under the same
name since (by a new leader after a failover, or by a pass whose create the cache has not shown yet)
is not the one the plan meant, and stays."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from vnpu.operator.kube import Kube


def _pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}]},
    }


def test_a_pod_delete_spares_a_pod_made_again_under_its_name(control_plane: Any, namespace: str) -> None:
    core = client.CoreV1Api(control_plane.api_client())
    kube = Kube(control_plane.api_client(), (namespace,))
    seen = core.create_namespaced_pod(namespace, _pod("r-0")).metadata.uid
    core.delete_namespaced_pod("r-0", namespace, grace_period_seconds=0)  # unbound: gone at once
    again = core.create_namespaced_pod(namespace, _pod("r-0")).metadata.uid
    assert again != seen

    assert kube.delete_pod(namespace, "r-0", uid=seen) is False  # 409: another pod now
    assert core.read_namespaced_pod("r-0", namespace).metadata.uid == again
    assert kube.delete_pod(namespace, "r-0", force=True, uid=again) is True
    assert kube.delete_pod(namespace, "r-0", uid=again) is False  # 404: gone
