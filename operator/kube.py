"""All of the operator's Kubernetes API calls (sync ``kubernetes`` client; the async reconciler runs
them in a worker thread). Kept in one module so the planner stays pure and RBAC needs are visible
in one place — deploy/helm/vnpu/templates/operator-rbac.yaml grants exactly what this module uses."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vnpu import api
from vnpu.operator.config import PLACEHOLDER_PRIORITY_CLASS
from vnpu.operator.pods import ROLE_SHARE_KEY
from vnpu.operator.state import (
    ObservedModel,
    ObservedNode,
    ObservedPod,
    ObservedSecret,
    parse_model,
    parse_node,
    parse_pod,
    parse_secret,
)

log = logging.getLogger(__name__)
MANAGED_SELECTOR = f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}"
SHARE_KEY_SELECTOR = f"{MANAGED_SELECTOR},{api.LABEL_ROLE}={ROLE_SHARE_KEY}"
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


class Kube:
    """Thin, typed wrapper over the API calls the reconciler makes."""

    def __init__(self, api_client: client.ApiClient, namespaces: tuple[str, ...] = ()) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.scheduling = client.SchedulingV1Api(api_client)
        self.namespaces = namespaces

    # -- reading -----------------------------------------------------------------------------------------
    def _raw(self, obj: Any) -> dict[str, Any]:
        return self.api_client.sanitize_for_serialization(obj)  # type: ignore[no-any-return]

    def list_nodes(self) -> list[ObservedNode]:
        return [parse_node(self._raw(n)) for n in self.core.list_node().items]

    def list_pods(self) -> list[ObservedPod]:
        if not self.namespaces:
            items = self.core.list_pod_for_all_namespaces(label_selector=MANAGED_SELECTOR).items
        else:
            items = [
                p
                for ns in self.namespaces
                for p in self.core.list_namespaced_pod(ns, label_selector=MANAGED_SELECTOR).items
            ]
        return [parse_pod(self._raw(p)) for p in items]

    def list_secrets(self) -> list[ObservedSecret]:
        """The share groups' key Secrets, as metadata only (PartialObjectMetadataList): the keys never
        reach the operator's memory, and there is no watch of Secrets at all."""
        kwargs: dict[str, Any] = {
            "label_selector": SHARE_KEY_SELECTOR,
            "_headers": {"Accept": METADATA_ONLY},
            "_preload_content": False,
        }
        if not self.namespaces:
            responses = [self.core.list_secret_for_all_namespaces(**kwargs)]
        else:
            responses = [self.core.list_namespaced_secret(ns, **kwargs) for ns in self.namespaces]
        return [parse_secret(item) for r in responses for item in json.loads(r.data).get("items") or []]

    def list_models(self) -> list[ObservedModel]:
        if not self.namespaces:
            items = self.custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL)["items"]
        else:
            items = [
                o
                for ns in self.namespaces
                for o in self.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL)[
                    "items"
                ]
            ]
        return [parse_model(o) for o in items]

    # -- writing -----------------------------------------------------------------------------------------
    def create_pod(self, manifest: Mapping[str, Any]) -> bool:
        """Create a pod; False if it already exists (a retry after a crash is not an error)."""
        try:
            self.core.create_namespaced_pod(manifest["metadata"]["namespace"], manifest)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def create_secret(self, manifest: Mapping[str, Any]) -> bool:
        """Create a Secret; False if it already exists (its key stays: pods may already mount it)."""
        try:
            self.core.create_namespaced_secret(manifest["metadata"]["namespace"], manifest)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete_secret(self, namespace: str, name: str) -> bool:
        try:
            self.core.delete_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def set_secret_owners(self, namespace: str, name: str, owner_references: list[dict[str, Any]]) -> None:
        """Replace a Secret's ownerReferences (metadata stays mutable on an immutable Secret)."""
        try:
            self.core.patch_namespaced_secret(
                name,
                namespace,
                {"metadata": {"ownerReferences": owner_references}},
                _content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_pod(self, namespace: str, name: str, *, force: bool = False) -> bool:
        """Delete a pod; ``force`` skips the grace period (its node is gone and cannot confirm)."""
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0 if force else None)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def set_pod_owners(self, namespace: str, name: str, owner_references: list[dict[str, Any]]) -> None:
        """Replace a pod's ownerReferences (a JSON merge patch replaces the list; a strategic merge
        would only add to it)."""
        try:
            self.core.patch_namespaced_pod(
                name,
                namespace,
                {"metadata": {"ownerReferences": owner_references}},
                _content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch_model_status(self, model: ObservedModel, status: Mapping[str, Any]) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, model.namespace, api.PLURAL, model.name, {"status": dict(status)}
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile
                raise

    def placeholder_priority_class_missing(self) -> bool:
        """True when the API server says the placeholder PriorityClass does not exist (the chart ships
        it; the operator never creates one). Read once at start so a missing class is named clearly:
        the API server refuses every placeholder pod without it. A refused read says nothing."""
        try:
            self.scheduling.read_priority_class(PLACEHOLDER_PRIORITY_CLASS)
        except ApiException as exc:
            if exc.status == 404:
                return True
            if exc.status != 403:
                raise
        return False

    def post_event(self, model: ObservedModel, event_type: str, reason: str, message: str) -> None:
        """A core/v1 Event on the InferenceModel (shown by ``kubectl describe infm``)."""
        now = dt.datetime.now(dt.UTC)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{model.name}.", "namespace": model.namespace},
            "involvedObject": {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": model.name,
                "namespace": model.namespace,
                "uid": model.uid,
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": api.MANAGED_BY_VALUE},
            "reportingComponent": api.MANAGED_BY_VALUE,
            "reportingInstance": api.MANAGED_BY_VALUE,
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(model.namespace, body)
        except ApiException as exc:  # events are best effort: never fail a reconcile over one
            log.warning(
                "could not post event %s on %s/%s: %s", reason, model.namespace, model.name, exc.reason
            )


def names(pods: Iterable[ObservedPod]) -> list[str]:
    return sorted(f"{p.namespace}/{p.name}" for p in pods)
