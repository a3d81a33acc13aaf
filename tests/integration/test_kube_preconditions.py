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


def test_a_forced_delete_with_a_precondition_removes_a_bound_pod_at_once(
    control_plane: Any, namespace: str
) -> None:
    """A pod bound to a lost node: no kubelet will ever confirm its end, so the operator forces the
    delete. The grace period must travel in the body with the uid precondition: the API server reads a
    DELETE's options from the body when there is one and ignores the query, and a query's
    ``gracePeriodSeconds=0`` left the pod Terminating for its 30 s (until the pod GC took it)."""
    core = client.CoreV1Api(control_plane.api_client())
    kube = Kube(control_plane.api_client(), (namespace,))
    bound = {**_pod("r-0"), "spec": {**_pod("r-0")["spec"], "nodeName": "a-lost-node"}}
    uid = core.create_namespaced_pod(namespace, bound).metadata.uid

    assert kube.delete_pod(namespace, "r-0", force=True, uid=uid) is True
    names = [p.metadata.name for p in core.list_namespaced_pod(namespace).items]
    assert "r-0" not in names  # gone, not Terminating


def test_an_unforced_delete_of_a_bound_pod_waits_for_its_kubelet(control_plane: Any, namespace: str) -> None:
    core = client.CoreV1Api(control_plane.api_client())
    kube = Kube(control_plane.api_client(), (namespace,))
    bound = {**_pod("r-1"), "spec": {**_pod("r-1")["spec"], "nodeName": "a-node"}}
    uid = core.create_namespaced_pod(namespace, bound).metadata.uid

    assert kube.delete_pod(namespace, "r-1", uid=uid) is True
    pod = core.read_namespaced_pod("r-1", namespace)
    assert pod.metadata.deletion_timestamp is not None and pod.metadata.deletion_grace_period_seconds == 30
    core.delete_namespaced_pod("r-1", namespace, grace_period_seconds=0)
