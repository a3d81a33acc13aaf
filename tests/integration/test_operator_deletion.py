"""A deleted InferenceModel keeps the operator's finalizer until its pods are gone, and the wait costs
the API server next to nothing: a pod that stays Terminating (a finalizer of its owner's, a lost node)
must not turn into a stream of writes to the model, Events and ERROR lines for as long as it lasts."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import pytest
from kubernetes import client, watch
from operator_harness import OperatorProcess

from vnpu import api
from vnpu.cluster.processes import wait_until

pytestmark = pytest.mark.integration

HOLD = "example.com/hold"
FINALIZER = "vnpu.io/finalizer"  # operator/main.py
#: How long the stuck deletion is watched; the old handler wrote to the model twice a second.
WINDOW_S = 20


def test_a_pod_stuck_terminating_costs_a_bounded_number_of_writes(control_plane, namespace, tmp_path) -> None:
    cp = control_plane
    crd = client.CustomObjectsApi(cp.api_client())
    core = client.CoreV1Api(cp.api_client())
    model = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "m", "namespace": namespace},
        "spec": {
            "modelName": "m",
            "source": {"uri": "pvc://models/m.safetensors"},
            "weights": {"sizeMiB": 1024},
            "replicas": 1,
            "memory": {"kvCacheMiB": 256, "activationMiB": 256},
        },
    }
    cp.kubectl("apply", "-f", "-", input=json.dumps(model))
    # Labelled as the model's, with a finalizer nobody removes: once deleted, it stays Terminating.
    labels = {api.LABEL_MANAGED_BY: api.MANAGED_BY_VALUE, api.LABEL_MODEL: "m"}
    labels[api.LABEL_ROLE] = api.ROLE_REPLICA
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "m-hold", "namespace": namespace, "finalizers": [HOLD], "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }
    cp.kubectl("apply", "-f", "-", input=json.dumps(pod))

    def get() -> dict[str, Any]:
        return crd.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, "m")  # type: ignore[no-any-return]

    operator = OperatorProcess(cp, namespace, tmp_path).start("--no-placeholders", "--resync-seconds", "60")
    try:
        wait_until(lambda: FINALIZER in (get()["metadata"].get("finalizers") or []), 60, "the finalizer")
        time.sleep(2)  # the first pass's writes land before the window
        version = get()["metadata"]["resourceVersion"]
        cp.kubectl("delete", "infm", "m", "-n", namespace, "--wait=false")

        # Every write to the model during the window (the deletion itself is one).
        writes, started = 0, time.monotonic()
        stream = watch.Watch()
        for event in stream.stream(
            crd.list_namespaced_custom_object,
            api.GROUP,
            api.VERSION,
            namespace,
            api.PLURAL,
            resource_version=version,
            timeout_seconds=WINDOW_S,
        ):
            writes += event["type"] == "MODIFIED"
            if time.monotonic() - started > WINDOW_S:
                stream.stop()
        held = get()
        assert FINALIZER in held["metadata"]["finalizers"], "released while its pod remained"
        assert core.read_namespaced_pod("m-hold", namespace).metadata.deletion_timestamp is not None
        assert writes <= 6, f"{writes} writes to the model in {WINDOW_S} s while its pod stayed Terminating"
        failed = operator.log().count("failed temporarily")
        assert failed <= 1, f"{failed} 'failed temporarily' lines in {WINDOW_S} s:\n{operator.log()[-3000:]}"

        # The pod goes: the model is released, without waiting out a long retry delay.
        core.patch_namespaced_pod("m-hold", namespace, {"metadata": {"finalizers": None}})

        def released() -> bool:
            try:
                get()
            except client.ApiException as exc:
                if exc.status == 404:
                    return True
                raise
            return False

        wait_until(released, 15, "the model released once its pod is gone")
    finally:
        with contextlib.suppress(client.ApiException):
            core.patch_namespaced_pod("m-hold", namespace, {"metadata": {"finalizers": None}})
        operator.stop()
