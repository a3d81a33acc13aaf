"""All of the operator's Kubernetes API calls (sync ``kubernetes`` client; the async reconciler runs
them in a worker thread). Kept in one module so the planner stays pure and RBAC needs are visible
in one place — deploy/helm/vnpu/templates/operator-rbac.yaml grants exactly what this module uses.

Every call passes :data:`vnpu.kubeclient.REQUEST_TIMEOUT`: a call on a dead or half-open connection
fails (and the pass with it, retried by the next) instead of blocking the reconcile loop for good. The
informers' watches keep their own, longer timeouts (:mod:`vnpu.operator.cache`)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vnpu import api
from vnpu.kubeclient import REQUEST_TIMEOUT
from vnpu.operator import metrics, network_policy
from vnpu.operator.config import PLACEHOLDER_PRIORITY_CLASS
from vnpu.operator.pods import ROLE_SHARE_KEY
from vnpu.operator.state import (
    ObservedBudget,
    ObservedModel,
    ObservedPod,
    ObservedSecret,
    ObservedService,
    labelled_managed,
    parse_budget,
    parse_pod,
    parse_secret,
    parse_service,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
MANAGED_SELECTOR = f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}"
SHARE_KEY_SELECTOR = f"{MANAGED_SELECTOR},{api.LABEL_ROLE}={ROLE_SHARE_KEY}"
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
#: Content types of the patches the operator sends.
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class Kube:
    """Thin, typed wrapper over the API calls the reconciler makes."""

    def __init__(self, api_client: client.ApiClient, namespaces: tuple[str, ...] = ()) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.scheduling = client.SchedulingV1Api(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self.policy = client.PolicyV1Api(api_client)
        self.namespaces = namespaces

    # -- reading (nodes, pods and models come from the watch-fed cache: vnpu.operator.cache) -------------
    def list_secrets(self) -> list[ObservedSecret]:
        """The share groups' key Secrets, as metadata only (PartialObjectMetadataList): the keys never
        reach the operator's memory, and there is no watch of Secrets at all (the reconciler keeps
        what it creates and deletes, and lists again on resync)."""
        kwargs: dict[str, Any] = {
            "label_selector": SHARE_KEY_SELECTOR,
            "_headers": {"Accept": METADATA_ONLY},
            "_preload_content": False,
            "_request_timeout": REQUEST_TIMEOUT,
        }
        if not self.namespaces:
            responses = [self.core.list_secret_for_all_namespaces(**kwargs)]
        else:
            responses = [self.core.list_namespaced_secret(ns, **kwargs) for ns in self.namespaces]
        metrics.API_REQUESTS.labels("list", "secrets").inc(len(responses))
        return [parse_secret(item) for r in responses for item in _body(r).get("items") or []]

    def find_service(self, namespace: str, name: str) -> ObservedService | None:
        """The Service ``namespace/name`` whatever its labels (the informer sees only the operator's)."""
        return self._find("services", self.core.list_namespaced_service, namespace, name, parse_service)

    def find_budget(self, namespace: str, name: str) -> ObservedBudget | None:
        """The PodDisruptionBudget ``namespace/name`` whatever its labels (the informer sees only the
        operator's)."""
        return self._find(
            "poddisruptionbudgets",
            self.policy.list_namespaced_pod_disruption_budget,
            namespace,
            name,
            parse_budget,
        )

    def find_secret(self, namespace: str, name: str) -> ObservedSecret | None:
        """The Secret ``namespace/name`` whatever its labels, as metadata only (its data never reaches
        the operator). Its ``share_group`` is "" unless it is labelled as the operator's key Secret
        (what :meth:`list_secrets` selects): one of that name that is not is someone else's."""
        return self._find(
            "secrets",
            self.core.list_namespaced_secret,
            namespace,
            name,
            _parse_key_secret,
            _headers={"Accept": METADATA_ONLY},
        )

    def find_pod(self, namespace: str, name: str) -> ObservedPod | None:
        """The pod ``namespace/name`` whatever its labels; ``managed`` when it carries the operator's
        label (the pods informer keeps no other pod that holds no device memory)."""
        return self._find("pods", self.core.list_namespaced_pod, namespace, name, _parse_any_pod)

    def _find(
        self,
        resource: str,
        list_call: Callable[..., Any],
        namespace: str,
        name: str,
        parse: Callable[[Mapping[str, Any]], T],
        **kwargs: Any,
    ) -> T | None:
        """One object by a list with a field selector on its name: the operator's RBAC grants ``list``
        (its informers need it), not ``get``."""
        metrics.API_REQUESTS.labels("list", resource).inc()
        resp = list_call(
            namespace,
            field_selector=f"metadata.name={name}",
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
            **kwargs,
        )
        items = _body(resp).get("items") or []
        return parse(items[0]) if items else None

    # -- writing -----------------------------------------------------------------------------------------
    def create_service(self, manifest: Mapping[str, Any]) -> bool:
        """Create a Service; False if one of that name already exists (ours or not: the caller looks)."""
        return self._create("services", self.core.create_namespaced_service, manifest)

    def create_budget(self, manifest: Mapping[str, Any]) -> bool:
        """Create a PodDisruptionBudget; False if one of that name already exists (ours or not: the
        caller looks)."""
        return self._create(
            "poddisruptionbudgets", self.policy.create_namespaced_pod_disruption_budget, manifest
        )

    def set_budget_spec(self, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
        """Make a PodDisruptionBudget's spec exactly ``spec`` (a JSON patch of the whole spec: a merge
        patch would keep a ``minAvailable`` or ``matchExpressions`` someone added)."""
        body = [{"op": "add", "path": "/spec", "value": dict(spec)}]
        self._patch(
            "poddisruptionbudgets",
            self.policy.patch_namespaced_pod_disruption_budget,
            namespace,
            name,
            body,
            JSON_PATCH,
        )

    def create_pod(self, manifest: Mapping[str, Any]) -> bool:
        """Create a pod; False if one of that name already exists (ours after a crash, not yet seen by
        the informer, or someone else's: the caller looks, :meth:`find_pod`)."""
        return self._create("pods", self.core.create_namespaced_pod, manifest)

    def _create(self, resource: str, create: Callable[..., Any], manifest: Mapping[str, Any]) -> bool:
        """A namespaced create, counted; False on 409 (the name is taken), other errors raised."""
        metrics.API_REQUESTS.labels("create", resource).inc()
        try:
            _release(
                create(
                    manifest["metadata"]["namespace"],
                    manifest,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def keep_network_policy(self, manifest: Mapping[str, Any]) -> str:
        """Make the NetworkPolicy exist as ``manifest`` says: read it; create it when there is none,
        or, when there is one, put back its spec when it differs in anything (an added selector term
        could leave pods unprotected) and our labels when missing. The rest of its metadata is others'
        and stays as it is (labels, annotations, ownerReferences, finalizers). Returns what was done:
        "created", "updated" or "kept".

        Read before any create: quota admission runs before the API server looks for the name
        (kubernetes/kubernetes#106842), so where a ResourceQuota on networkpolicies is filled by ours,
        a create of the existing policy is refused 403 "exceeded quota", not 409."""
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        current = self._read_network_policy(namespace, name)
        if current is None:
            if self._create("networkpolicies", self.networking.create_namespaced_network_policy, manifest):
                return "created"
            # Made meanwhile (another writer won the race): compare what is there now. Gone again, the
            # 404 fails this keep and the next pass creates it.
            current = self._read_network_policy(namespace, name, missing_ok=False)
        labels = (current.get("metadata") or {}).get("labels") or {}
        ours = manifest["metadata"]["labels"]
        same = network_policy.canonical(current.get("spec")) == network_policy.canonical(manifest["spec"])
        if same and labels.items() >= ours.items():
            return "kept"
        # The object as read, at its resourceVersion (a 409 if changed meanwhile), with our spec.
        body = {
            **current,
            "metadata": {**current["metadata"], "labels": {**labels, **ours}},
            "spec": manifest["spec"],
        }
        metrics.API_REQUESTS.labels("update", "networkpolicies").inc()
        _release(
            self.networking.replace_namespaced_network_policy(
                name, namespace, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
        )
        return "updated"

    def _read_network_policy(self, namespace: str, name: str, *, missing_ok: bool = True) -> Any:
        """The NetworkPolicy as the API server has it; None when there is none (and ``missing_ok``)."""
        metrics.API_REQUESTS.labels("get", "networkpolicies").inc()
        try:
            return _body(
                self.networking.read_namespaced_network_policy(
                    name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                )
            )
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return None
            raise

    def create_secret(self, manifest: Mapping[str, Any]) -> ObservedSecret | None:
        """Create a Secret and return it (metadata only); None if one of that name already exists (its
        key stays: pods may already mount it; ours or not, the caller looks: :meth:`find_secret`)."""
        metrics.API_REQUESTS.labels("create", "secrets").inc()
        try:
            resp = self.core.create_namespaced_secret(
                manifest["metadata"]["namespace"],
                manifest,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise
        created = _body(resp)
        created.pop("data", None)  # the key is not the operator's to keep
        return parse_secret(created)

    def delete_secret(self, namespace: str, name: str, uid: str) -> bool:
        """Delete the Secret if it is still the one of ``uid`` (a precondition: one made again since,
        by a new leader say, stays). False when it is gone, or is another (409)."""
        metrics.API_REQUESTS.labels("delete", "secrets").inc()
        try:
            _release(
                self.core.delete_namespaced_secret(
                    name,
                    namespace,
                    body=_delete_options(uid),
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    def set_secret_owners(self, namespace: str, name: str, owner_references: list[dict[str, Any]]) -> None:
        """Replace a Secret's ownerReferences (metadata stays mutable on an immutable Secret)."""
        body = {"metadata": {"ownerReferences": owner_references}}
        self._patch("secrets", self.core.patch_namespaced_secret, namespace, name, body)

    def delete_pod(self, namespace: str, name: str, *, force: bool = False, uid: str = "") -> bool:
        """Delete a pod; ``force`` skips the grace period (its node is gone and cannot confirm); with
        ``uid``, only while it is still that pod (a precondition: one made again under its name since
        stays). False when it is gone, or is another (409)."""
        metrics.API_REQUESTS.labels("delete", "pods").inc()
        try:
            resp = self.core.delete_namespaced_pod(
                name,
                namespace,
                body=_delete_options(uid, grace_period_seconds=0 if force else None),
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
            _release(resp)
        except ApiException as exc:
            if exc.status == 404 or (uid and exc.status == 409):
                return False
            raise
        return True

    def set_pod_owners(self, namespace: str, name: str, owner_references: list[dict[str, Any]]) -> None:
        """Replace a pod's ownerReferences (a JSON merge patch replaces the list; a strategic merge
        would only add to it)."""
        body = {"metadata": {"ownerReferences": owner_references}}
        self._patch("pods", self.core.patch_namespaced_pod, namespace, name, body)

    def set_pod_labels(self, namespace: str, name: str, labels: Mapping[str, str]) -> None:
        """Add (or change) labels on a pod, the others left as they are (a JSON merge patch)."""
        self._patch(
            "pods", self.core.patch_namespaced_pod, namespace, name, {"metadata": {"labels": dict(labels)}}
        )

    def set_service_selector(self, namespace: str, name: str, selector: Mapping[str, str]) -> None:
        """Make a Service's spec.selector exactly ``selector`` (a JSON patch: a merge patch would keep
        keys it no longer has), in place: its ClusterIP and EndpointSlices stay."""
        body = [{"op": "add", "path": "/spec/selector", "value": dict(selector)}]
        self._patch("services", self.core.patch_namespaced_service, namespace, name, body, JSON_PATCH)

    def _patch(
        self,
        resource: str,
        patch: Callable[..., Any],
        namespace: str,
        name: str,
        body: Any,
        content_type: str = MERGE_PATCH,
    ) -> None:
        """One patch of an object; an object already gone is no error (the next pass sees it gone)."""
        metrics.API_REQUESTS.labels("patch", resource).inc()
        try:
            resp = patch(
                name,
                namespace,
                body,
                _content_type=content_type,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
            _release(resp)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch_model_status(self, model: ObservedModel, status: Mapping[str, Any]) -> None:
        metrics.API_REQUESTS.labels("patch", "inferencemodels/status").inc()
        try:
            resp = self.custom.patch_namespaced_custom_object_status(
                api.GROUP,
                api.VERSION,
                model.namespace,
                api.PLURAL,
                model.name,
                {"status": dict(status)},
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
            _release(resp)
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile
                raise

    def scale_model(self, namespace: str, name: str, replicas: int, resource_version: str) -> bool:
        """Set the model's replicas through its scale subresource, as ``kubectl scale
        --resource-version`` does: only if the model is still at ``resource_version``. False when it
        changed meanwhile (409: a wake or a user's scale won) or is gone (404)."""
        metrics.API_REQUESTS.labels("update", "inferencemodels/scale").inc()
        body = {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": resource_version},
            "spec": {"replicas": replicas},
        }
        try:
            resp = self.custom.replace_namespaced_custom_object_scale(
                api.GROUP,
                api.VERSION,
                namespace,
                api.PLURAL,
                name,
                body,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
            _release(resp)
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    def placeholder_priority_class_missing(self) -> bool:
        """True when the API server says the placeholder PriorityClass does not exist (the chart ships
        it; the operator never creates one). Read once at start so a missing class is named clearly:
        the API server refuses every placeholder pod without it. A refused read says nothing."""
        try:
            self.scheduling.read_priority_class(PLACEHOLDER_PRIORITY_CLASS, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return True
            if exc.status != 403:
                raise
        return False

    def post_event(self, model: ObservedModel, event_type: str, reason: str, message: str) -> str:
        """A core/v1 Event on the InferenceModel (shown by ``kubectl describe infm``); its name, or ""
        when it could not be posted."""
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
        metrics.API_REQUESTS.labels("create", "events").inc()
        try:
            created = _body(
                self.core.create_namespaced_event(
                    model.namespace, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                )
            )
        except ApiException as exc:  # events are best effort: never fail a reconcile over one
            log.warning(
                "could not post event %s on %s/%s: %s", reason, model.namespace, model.name, exc.reason
            )
            return ""
        return str(((created or {}).get("metadata") or {}).get("name") or "")

    def count_event(self, namespace: str, name: str, count: int) -> None:
        """An Event seen again: its count and lastTimestamp (as client-go's recorder counts repeats)."""
        body = {"count": count, "lastTimestamp": dt.datetime.now(dt.UTC).isoformat()}
        try:
            self._patch("events", self.core.patch_namespaced_event, namespace, name, body)
        except ApiException as exc:  # best effort, like posting it
            log.warning("could not count event %s/%s: %s", namespace, name, exc.reason)


def _delete_options(uid: str = "", *, grace_period_seconds: int | None = None) -> Any:
    """Delete options: with ``uid``, delete the object only while it is still that one (else a 409);
    with ``grace_period_seconds``, that grace period. Both go in the body: the API server reads a DELETE's
    options from its body when it has one and then ignores the query (a ``gracePeriodSeconds=0`` query
    next to a precondition body is dropped, and the pod waits out its grace period)."""
    preconditions = client.V1Preconditions(uid=uid) if uid else None
    return client.V1DeleteOptions(preconditions=preconditions, grace_period_seconds=grace_period_seconds)


def _parse_key_secret(obj: Mapping[str, Any]) -> ObservedSecret:
    """A Secret found by name: its share group only when labelled as the operator's key Secret."""
    meta = obj.get("metadata") or {}
    secret = parse_secret(obj)
    if labelled_managed(meta) and (meta.get("labels") or {}).get(api.LABEL_ROLE) == ROLE_SHARE_KEY:
        return secret
    return replace(secret, share_group="")


def _parse_any_pod(obj: Mapping[str, Any]) -> ObservedPod:
    return parse_pod(obj, managed=labelled_managed(obj.get("metadata") or {}))


def _body(resp: Any) -> Any:
    """The JSON of a response read raw (``_preload_content=False``); its connection goes back to the pool."""
    try:
        return json.loads(resp.data)
    finally:
        resp.release_conn()


def _release(resp: Any) -> None:
    """Discard a raw response's body and hand its connection back to the pool: unread, the connection
    stays checked out and the next call opens a new TCP (and TLS) connection."""
    resp.drain_conn()
    resp.release_conn()


def names(pods: Iterable[ObservedPod]) -> list[str]:
    return sorted(f"{p.namespace}/{p.name}" for p in pods)


def api_error(exc: ApiException) -> tuple[str, str]:
    """(reason, message) of a refused request in the API server's own words: the Status object's
    ``reason`` (Forbidden, Invalid, AlreadyExists, ...) and ``message``."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    reason = body.get("reason") or exc.reason or "ApiError"
    message = body.get("message") or f"{exc.status} {exc.reason}"
    return str(reason).replace(" ", ""), str(message)
