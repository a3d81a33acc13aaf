"""The operator's informers LIST in pages against the real API server: every object of a list longer
than a page is seen, the pages are one snapshot, and the watch starts from it, so nothing changed while
the pages were read is missed (operator/cache.py ``list_pages``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from kubernetes import client

from vnpu import api
from vnpu.cluster.processes import wait_until
from vnpu.operator import cache, metrics
from vnpu.operator.cache import ClusterCache, Informer

SPEC = {
    "modelName": "m",
    "source": {"uri": "file:///models/m.gguf", "format": "gguf"},
    "replicas": 1,
    "memory": {"maxContextTokens": 2048, "maxBatch": 4, "activationMiB": 64},
}


def test_a_list_of_three_pages_is_one_snapshot_and_the_watch_misses_nothing_after_it(
    control_plane, namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "LIST_PAGE_SIZE", 5)
    core = client.CoreV1Api(control_plane.api_client())

    def put(name: str, value: str) -> None:
        core.create_namespaced_config_map(namespace, {"metadata": {"name": name}, "data": {"v": value}})

    for i in range(15):
        put(f"cm-{i:02d}", str(i))
    lists: list[dict[str, Any]] = []

    def list_call(**kwargs: Any) -> Any:
        if not kwargs.get("watch"):
            lists.append(kwargs)
            if len(lists) == 2:  # after the first page: the snapshot is taken, these come after it
                put("cm-late", "late")
                core.patch_namespaced_config_map("cm-14", namespace, {"data": {"v": "changed"}})
        return core.list_namespaced_config_map(namespace, **kwargs)

    listed: dict[str, str] = {}  # what the informer parsed before it was synced: its first list

    def parse(obj: Mapping[str, Any]) -> tuple[str, str] | None:
        name, value = obj["metadata"]["name"], (obj.get("data") or {}).get("v", "")
        if not name.startswith("cm-"):  # (kube-root-ca.crt, once a controller-manager runs)
            return None
        if not informer.synced.is_set():
            listed[name] = value
        return name, value

    informer: Informer[str] = Informer("configmaps", list_call, parse, lambda _: None)
    informer.start()
    try:
        assert informer.synced.wait(30)
        assert listed == {f"cm-{i:02d}": str(i) for i in range(15)}, "the pages are one snapshot"
        assert len(lists) >= 3, "15 objects in pages of 5"
        assert all(kwargs["limit"] == 5 for kwargs in lists)
        assert not lists[0].get("_continue") and all(kwargs.get("_continue") for kwargs in lists[1:])
        # What changed while the pages were read comes by the watch, from the snapshot's version.
        wait_until(lambda: informer.get("cm-late") == "late", 30, "an object created during the list")
        wait_until(lambda: informer.get("cm-14") == "changed", 30, "an object changed during the list")
        put("cm-after", "after")
        wait_until(lambda: informer.get("cm-after") == "after", 30, "an object created after the list")
        assert len(informer.snapshot()) == 17
    finally:
        informer.stop()
        assert informer.join(10)


def test_the_cluster_caches_read_pods_services_and_models_in_pages(
    control_plane, namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "LIST_PAGE_SIZE", 2)
    api_client = control_plane.api_client()
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    labels = {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE}
    for i in range(5):
        meta = {"name": f"m{i}", "labels": labels}
        core.create_namespaced_pod(
            namespace, {"metadata": meta, "spec": {"containers": [{"name": "c", "image": "x"}]}}
        )
        core.create_namespaced_service(namespace, {"metadata": meta, "spec": {"ports": [{"port": 80}]}})
        model = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": f"m{i}"}, "spec": SPEC}
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, model)

    def lists(resource: str) -> float:
        return (
            metrics.REGISTRY.get_sample_value(
                "vnpu_operator_api_requests_total", {"verb": "list", "resource": resource}
            )
            or 0.0
        )

    before = {resource: lists(resource) for resource in ("pods", "services", "inferencemodels")}
    caches = ClusterCache(api_client, (namespace,), lambda _: None)
    caches.start()
    try:
        assert caches.wait_synced(30)
        models, _, pods = caches.snapshot()
        assert sorted(m.name for m in models) == [f"m{i}" for i in range(5)]
        assert sorted(p.name for p in pods if p.namespace == namespace) == [f"m{i}" for i in range(5)]
        assert sorted(s.name for s in caches.services_snapshot()) == [f"m{i}" for i in range(5)]
        # Every informer's watch opens: none of the stores is behind (ClusterCache.stale_for is 0).
        wait_until(lambda: caches.stale_for() == 0, 30, "every informer watching")
        stale = metrics.REGISTRY.get_sample_value(
            "vnpu_operator_informer_stale_seconds", {"resource": "pods"}
        )
        assert stale == 0
    finally:
        assert caches.stop()
    for resource, count in before.items():
        assert lists(resource) - count >= 3, f"{resource}: 5 objects in pages of 2"
