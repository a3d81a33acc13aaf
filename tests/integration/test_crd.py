"""The InferenceModel CRD against the real kube-apiserver: validation, subresources, printer columns."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vnpu import api

GOOD_SPEC: dict[str, Any] = {
    "modelName": "smollm2-135m",
    "source": {"uri": "file:///models/smollm2.gguf", "format": "gguf"},
    "replicas": 2,
    "memory": {"maxContextTokens": 2048, "maxBatch": 4, "activationMiB": 64},
}


def body(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


def with_changes(**changes: Any) -> dict[str, Any]:
    """GOOD_SPEC with dotted-path changes; a value of ... deletes the key."""
    spec = copy.deepcopy(GOOD_SPEC)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        if value is ...:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return spec


@pytest.fixture
def crd_api(control_plane) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(control_plane.api_client())


def create(crd_api: client.CustomObjectsApi, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return crd_api.create_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL, body(name, spec))


BAD_SPECS = [
    ("missing-model-name", with_changes(modelName=...), "spec.modelName: Required value"),
    ("missing-source", with_changes(source=...), "spec.source: Required value"),
    ("negative-weights", with_changes(weights__sizeMiB=-5), "spec.weights.sizeMiB"),
    ("zero-kv-slice", with_changes(memory={"kvCacheMiB": 0}), "spec.memory.kvCacheMiB"),
    ("unknown-scheme", with_changes(source__uri="s3://bucket/model"), "spec.source.uri"),
    ("pvc-traversal", with_changes(source__uri="pvc://models/../../etc/passwd"), "path traversal"),
    ("pvc-no-path", with_changes(source__uri="pvc://models"), "pvc://<claim-name>/<path"),
    ("file-relative", with_changes(source__uri="file://models/x.gguf"), "absolute path"),
    ("hf-no-org", with_changes(source__uri="hf://justaname"), "hf://<org>/<name>"),
    ("bad-format", with_changes(source__format="onnx"), "spec.source.format"),
    ("too-many-replicas", with_changes(replicas=5000), "spec.replicas"),
    ("negative-replicas", with_changes(replicas=-1), "spec.replicas"),
    ("context-without-batch", with_changes(memory={"maxContextTokens": 1024}), "given together"),
    ("kv-and-context", with_changes(memory__kvCacheMiB=512), "not both"),
    ("async-without-budget", with_changes(offload={"mode": "async"}), "offload.deviceBudgetMiB is required"),
    ("bad-offload-mode", with_changes(offload={"mode": "sometimes"}), "spec.offload.mode"),
    (
        "zero-prefetch",
        with_changes(offload={"mode": "async", "deviceBudgetMiB": 512, "prefetchDepth": 0}),
        "spec.offload.prefetchDepth",
    ),
    ("bad-share-group", with_changes(shareGroup="Not_A_Label"), "spec.shareGroup"),
    ("bad-port", with_changes(runtime={"port": 70000}), "spec.runtime.port"),
    ("priority-out-of-range", with_changes(priority=5000), "spec.priority"),
    (
        "resources-set-vnpu-memory",
        with_changes(runtime={"resources": {"limits": {"vnpu.io/memory-0": 4}}}),
        "must not set vnpu.io/ resources",
    ),
    (
        "toleration-exists-with-value",
        with_changes(placement={"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}),
        "operator Exists must not set a value",
    ),
    ("bad-dtype", with_changes(weights__dtype="float13"), "spec.weights.dtype"),
    (
        "quantized-dtype-without-its-runtime",
        with_changes(weights__dtype="q4_1"),
        "dequantises quantized files",
    ),
    (
        "kv-heads-not-divisor",
        with_changes(modelConfig={"num_attention_heads": 9, "num_key_value_heads": 4}),
        "multiple of num_key_value_heads",
    ),
    ("zero-layers", with_changes(modelConfig={"num_hidden_layers": 0}), "spec.modelConfig.num_hidden_layers"),
    ("surge-words", with_changes(rollout={"maxSurge": "lots"}), "rollout.maxSurge must be"),
    ("surge-negative", with_changes(rollout={"maxSurge": -1}), "rollout.maxSurge must be"),
    (
        "unavailable-fraction",
        with_changes(rollout={"maxUnavailable": "0.5"}),
        "rollout.maxUnavailable must be",
    ),
    (
        "recreate-with-surge",
        with_changes(rollout={"strategy": "Recreate", "maxSurge": 1}),
        "apply to the RollingUpdate strategy only",
    ),
    ("unknown-strategy", with_changes(rollout={"strategy": "BlueGreen"}), "spec.rollout.strategy"),
]


@pytest.mark.parametrize(("name", "spec", "message"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_is_refused_naming_the_field(crd_api, namespace, name, spec, message) -> None:
    with pytest.raises(ApiException) as info:
        create(crd_api, namespace, name, spec)
    assert info.value.status == 422, info.value.body
    assert message in json.loads(info.value.body)["message"]


def test_bad_specs_cover_at_least_twelve_cases() -> None:
    assert len(BAD_SPECS) >= 12


@pytest.mark.parametrize(
    "spec",
    [
        {"modelName": "m", "source": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"}},
        GOOD_SPEC,
        {
            "modelName": "llama-8b",
            "source": {"uri": "pvc://models/llama/8b.safetensors", "format": "safetensors"},
            "weights": {"sizeMiB": 15320, "dtype": "bfloat16"},
            "shareGroup": "llama-8b-bf16",
            "modelConfig": {
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "hidden_size": 4096,
            },
            "replicas": 4,
            "memory": {"kvCacheMiB": 2048, "activationMiB": 512, "overheadMiB": 300},
            "offload": {"mode": "async", "deviceBudgetMiB": 8192, "prefetchDepth": 3},
            "runtime": {
                "image": "vnpu/runtime:0.1",
                "port": 8080,
                "resources": {"requests": {"cpu": "2", "memory": "8Gi"}},
            },
            "placement": {
                "nodeSelector": {"vnpu.io/npu": "true"},
                "spreadAcrossNodes": True,
                "tolerations": [{"key": "npu", "operator": "Exists", "effect": "NoSchedule"}],
            },
            "priority": 100,
            "rollout": {"strategy": "RollingUpdate", "maxSurge": "50%", "maxUnavailable": 1},
        },
        {
            "modelName": "qwen-q4",
            "source": {"uri": "file:///models/qwen.gguf", "format": "gguf"},
            "weights": {"dtype": "q4_1"},
            "runtime": {"image": "example.com/llama-cpp-runtime:1"},
            "memory": {"kvCacheMiB": 256},
            "rollout": {"strategy": "Recreate"},
        },
    ],
    ids=["minimal", "context-sized", "everything", "quantized-with-its-runtime"],
)
def test_good_specs_are_accepted_with_defaults(crd_api, namespace, spec) -> None:
    obj = create(crd_api, namespace, "good", spec)
    assert obj["spec"]["modelName"] == spec["modelName"]
    assert obj["spec"]["replicas"] == spec.get("replicas", 1)  # defaulted by the schema
    assert obj["spec"]["priority"] == spec.get("priority", 0)
    assert obj["spec"].get("memory") == spec.get("memory"), "no field of a valid spec is pruned"
    assert obj["spec"].get("rollout", {}).get("maxSurge") == spec.get("rollout", {}).get("maxSurge")


def test_status_goes_through_the_subresource_only(crd_api, namespace) -> None:
    create(crd_api, namespace, "st", GOOD_SPEC)
    # A status written through the main resource is dropped...
    crd_api.patch_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, "st", {"status": {"phase": "Ready"}}
    )
    obj = crd_api.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, "st")
    assert "status" not in obj or obj["status"].get("phase") is None
    # ...and one written through /status is kept, while spec changes there are ignored.
    crd_api.patch_namespaced_custom_object_status(
        api.GROUP,
        api.VERSION,
        namespace,
        api.PLURAL,
        "st",
        {"spec": {"replicas": 9}, "status": {"phase": "Ready", "readyReplicas": 2, "replicas": 2}},
    )
    obj = crd_api.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, "st")
    assert obj["status"]["phase"] == "Ready"
    assert obj["spec"]["replicas"] == 2


def test_invalid_status_is_refused(crd_api, namespace) -> None:
    create(crd_api, namespace, "bad-status", GOOD_SPEC)
    with pytest.raises(ApiException) as info:
        crd_api.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, api.PLURAL, "bad-status", {"status": {"phase": "Sleeping"}}
        )
    assert info.value.status == 422 and "status.phase" in info.value.body


def test_scale_subresource_and_printer_columns(control_plane, crd_api, namespace) -> None:
    create(crd_api, namespace, "scaled", GOOD_SPEC)
    control_plane.kubectl("scale", "-n", namespace, "infm/scaled", "--replicas=5")
    obj = crd_api.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, "scaled")
    assert obj["spec"]["replicas"] == 5
    crd_api.patch_namespaced_custom_object_status(
        api.GROUP,
        api.VERSION,
        namespace,
        api.PLURAL,
        "scaled",
        {
            "status": {
                "phase": "Running",
                "replicas": 5,
                "readyReplicas": 3,
                "selector": "vnpu.io/model=scaled",
                "memory": {"weightsMiB": 100, "perReplicaMiB": 300, "savedBySharingMiB": 400},
                "endpoint": f"http://vnpu-scaled.{namespace}.svc:80",
            }
        },
    )
    scale = crd_api.get_namespaced_custom_object_scale(
        api.GROUP, api.VERSION, namespace, api.PLURAL, "scaled"
    )
    assert scale["spec"]["replicas"] == 5
    assert scale["status"] == {"replicas": 5, "selector": "vnpu.io/model=scaled"}

    out = control_plane.kubectl("get", "infm", "-n", namespace).stdout
    header, row = out.splitlines()[:2]
    assert header.split() == [
        "NAME",
        "MODEL",
        "REPLICAS",
        "READY",
        "PHASE",
        "WEIGHTS",
        "MIB",
        "SAVED",
        "MIB",
        "ENDPOINT",
        "AGE",
    ]
    assert row.split()[:8] == [
        *("scaled", "smollm2-135m", "5", "3", "Running", "100", "400"),
        f"http://vnpu-scaled.{namespace}.svc:80",
    ]
