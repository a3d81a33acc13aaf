"""The operator's Lease against the real API server: what it writes is what the server accepts, at
every instant, and its counts are client-go's."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from vnpu.operator.leader import LeaderElector, LeaseConfig


def _lease(
    namespace: str, holder: str | None, acquired: str, renewed: str, transitions: int
) -> dict[str, Any]:
    spec = {"leaseDurationSeconds": 15, "acquireTime": acquired, "renewTime": renewed}
    spec |= {"leaseTransitions": transitions} | ({"holderIdentity": holder} if holder else {})
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "vnpu-operator", "namespace": namespace},
        "spec": spec,
    }


def _create(control_plane: Any, body: dict[str, Any]) -> None:
    namespace = body["metadata"]["namespace"]
    client.CustomObjectsApi(control_plane.api_client()).create_namespaced_custom_object(
        "coordination.k8s.io", "v1", namespace, "leases", body
    )


def _read(control_plane: Any, namespace: str) -> client.V1Lease:
    return client.CoordinationV1Api(control_plane.api_client()).read_namespaced_lease(
        "vnpu-operator", namespace
    )


def test_a_leadership_acquired_on_a_whole_second_is_renewed(control_plane: Any, namespace: str) -> None:
    """The client writes MicroTime with isoformat(), which drops a zero fraction, and the API server
    wants six digits: a Lease acquired on a whole second (one in a million) could never be renewed,
    and its leader stepped down at the renew deadline."""
    _create(
        control_plane,
        _lease(namespace, "me", "2026-12-06T12:00:00.000000Z", "2026-12-06T12:00:00.000000Z", 1),
    )
    elector = LeaderElector(control_plane.api_client(), LeaseConfig(namespace, "vnpu-operator", "me"))

    assert elector._try_acquire_or_renew() is True
    lease = _read(control_plane, namespace)
    assert lease.spec.holder_identity == "me" and lease.spec.lease_transitions == 1  # a renewal
    assert abs(lease.spec.acquire_time.timestamp() - 1796558400) < 1e-5  # kept (1 µs later at most)


def test_an_acquisition_after_a_release_counts_as_a_transition(control_plane: Any, namespace: str) -> None:
    """client-go counts every acquisition, a released Lease's included (its record keeps the count)."""
    _create(
        control_plane,
        _lease(namespace, None, "2026-12-06T12:00:00.500000Z", "2026-12-06T12:00:01.500000Z", 3),
    )
    elector = LeaderElector(control_plane.api_client(), LeaseConfig(namespace, "vnpu-operator", "me"))

    assert elector._try_acquire_or_renew() is True
    lease = _read(control_plane, namespace)
    assert lease.spec.holder_identity == "me" and lease.spec.lease_transitions == 4
