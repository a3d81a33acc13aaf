"""The InferenceModel CRD against the real kube-apiserver: validation, subresources, printer columns."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vnpu import api, sharing
from vnpu.cluster.helm import placeholder_priority_class
from vnpu.cluster.kwok import npu_node_manifest
from vnpu.cluster.processes import wait_until
from vnpu.memory import MemoryEstimate
from vnpu.operator.config import OperatorConfig
from vnpu.operator.planner import plan
from vnpu.operator.pods import render
from vnpu.operator.services import render_service
from vnpu.operator.state import ObservedSecret, parse_model, parse_node

CRD = Path(__file__).resolve().parents[2] / "crds" / "inferencemodel.yaml"

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
    ("negative-drain", with_changes(runtime={"drainSeconds": -1}), "spec.runtime.drainSeconds"),
    ("drain-past-an-hour", with_changes(runtime={"drainSeconds": 3601}), "spec.runtime.drainSeconds"),
    ("drain-as-text", with_changes(runtime={"drainSeconds": "60"}), "spec.runtime.drainSeconds"),
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
    # What the pod's own validation refuses: each of these was accepted, and its pods never created.
    *(
        (f"resources-{name}", with_changes(runtime={"resources": resources}), message)
        for name, resources, message in [
            ("negative", {"requests": {"cpu": "-1"}}, "a quantity must not be negative"),
            ("negative-integer", {"limits": {"memory": -1}}, "a quantity must not be negative"),
            (
                "request-above-limit",
                {"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}},
                "above its limit",
            ),
            ("unqualified-name", {"requests": {"foo": "1"}}, "a resource name is cpu, memory"),
            ("name-with-space", {"limits": {"example.com/a b": "1"}}, "a resource name is cpu, memory"),
            ("requests-prefix", {"limits": {"requests.example.com/gpu": "1"}}, "a resource name is cpu"),
            ("extended-without-limit", {"requests": {"example.com/foo": "1"}}, "cannot be overcommitted"),
            (
                "extended-below-limit",
                {"requests": {"example.com/foo": "1"}, "limits": {"example.com/foo": "2"}},
                "cannot be overcommitted",
            ),
            ("extended-fraction", {"limits": {"example.com/foo": "500m"}}, "must be an integer"),
            ("fractional-exponent", {"limits": {"memory": "1e1.5"}}, "a quantity is a number"),
            (
                "hugepages-indivisible",
                {"limits": {"hugepages-2Mi": "3Mi", "memory": "1Gi"}},
                "a whole multiple of the page size",
            ),
            ("hugepages-alone", {"limits": {"hugepages-2Mi": "4Mi"}}, "hugepages need a cpu or memory"),
        ]
    ),
    *(
        (f"toleration-{name}", with_changes(placement={"tolerations": [toleration]}), message)
        for name, toleration, message in [
            ("no-key-equal", {"effect": "NoSchedule"}, "a toleration without a key matches every taint"),
            ("empty-key-equal", {"key": "", "operator": "Equal"}, "a toleration without a key"),
            (
                "seconds-noschedule",
                {"key": "k", "value": "v", "effect": "NoSchedule", "tolerationSeconds": 5},
                "tolerationSeconds applies to effect NoExecute only",
            ),
            ("seconds-no-effect", {"key": "k", "tolerationSeconds": 5}, "tolerationSeconds applies"),
            ("bad-key", {"key": "bad key", "operator": "Exists"}, "a key is a taint key"),
            (
                "long-key-name",
                {"key": "example.com/" + "k" * 64, "operator": "Exists"},
                "a key is a taint key",
            ),
            ("bad-value", {"key": "k", "value": "a b"}, "a value is a label value"),
            ("value-ends-in-dash", {"key": "k", "value": "a-"}, "a value is a label value"),
        ]
    ),
    *(
        (f"node-selector-{name}", with_changes(placement={"nodeSelector": selector}), message)
        for name, selector, message in [
            ("bad-value", {"pool": "a b"}, "a value is a label value"),
            ("bad-key", {"bad key": "v"}, "a key is a label key"),
            ("empty-key", {"": "v"}, "a key is a label key"),
            ("long-key-name", {"k" * 64: "v"}, "a key is a label key"),
            ("long-key-prefix", {"a" * 254 + "/k": "v"}, "a key is a label key"),
            # The audit's: 32 such keys made a status message over the 32 KiB the CRD allows.
            ("key-of-1100-chars", {"example.com/" + "k" * 1088: "v"}, "a key is a label key"),
        ]
    ),
    ("image-trailing-space", with_changes(runtime={"image": "registry.example/runtime:1 "}), "whitespace"),
    ("image-leading-tab", with_changes(runtime={"image": "\tregistry.example/runtime:1"}), "whitespace"),
]


@pytest.mark.parametrize(("name", "spec", "message"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_is_refused_naming_the_field(crd_api, namespace, name, spec, message) -> None:
    with pytest.raises(ApiException) as info:
        create(crd_api, namespace, name, spec)
    assert info.value.status == 422, info.value.body
    assert message in json.loads(info.value.body)["message"]


def test_the_drain_bound_is_the_crds() -> None:
    """The CRD, the operator's spec parser, the runtime's flag and the holders' grace share one
    bound (:data:`vnpu.api.MAX_DRAIN_S`)."""
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    drain = spec["properties"]["runtime"]["properties"]["drainSeconds"]
    assert (drain["minimum"], drain["maximum"]) == (0, api.MAX_DRAIN_S)
    assert api.HOLDER_GRACE_S > api.HOLDER_DRAIN_S > api.replica_grace_s(api.MAX_DRAIN_S)


def test_bad_specs_cover_at_least_twelve_cases() -> None:
    assert len(BAD_SPECS) >= 12


def test_a_name_is_at_most_a_label_value_long(crd_api, namespace) -> None:
    """The model's name is the vnpu.io/model label value of its pods and Service: 63 characters."""
    create(crd_api, namespace, "m" * 63, GOOD_SPEC)
    with pytest.raises(ApiException) as info:
        create(crd_api, namespace, "m" * 64, GOOD_SPEC)
    assert info.value.status == 422, info.value.body
    assert "an InferenceModel's name is at most 63 characters" in json.loads(info.value.body)["message"]


def test_a_model_named_before_the_limit_can_still_be_written_and_deleted(
    control_plane, crd_api, namespace
) -> None:
    """The name rule holds on creation only (a name never changes): a model created under an older CRD
    keeps its status, scale and finalizer writes, so it can still be deleted. (Checked on an older CRD
    without the rule, applied for this test only.)"""
    crd = yaml.safe_load(CRD.read_text())
    older = copy.deepcopy(crd)
    del older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    name = "m" * 64

    def apply_crd(manifest: dict[str, Any]) -> None:
        control_plane.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(manifest)
        )

    def created(name: str, *finalizers: str) -> bool:
        meta = {"name": name, "finalizers": list(finalizers)}
        try:
            crd_api.create_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, {**body(name, GOOD_SPEC), "metadata": meta}
            )
        except ApiException as exc:
            if exc.status == 422:
                return False
            raise
        return True

    probes = (f"probe-{i}-{'p' * 60}" for i in itertools.count())
    try:
        apply_crd(older)
        wait_until(lambda: created(name, "vnpu.io/test"), 30, "the older CRD in effect")
    finally:
        apply_crd(crd)
        wait_until(lambda: not created(next(probes)), 30, "the CRD restored")
    patch = {"metadata": {"annotations": {api.ANNOTATION_REQUESTS: "1"}}}
    crd_api.patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name, patch)
    crd_api.patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": {"phase": "Failed"}}
    )
    crd_api.patch_namespaced_custom_object_scale(
        api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"spec": {"replicas": 0}}
    )
    crd_api.delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
    crd_api.patch_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"metadata": {"finalizers": None}}
    )
    with pytest.raises(ApiException) as info:
        crd_api.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
    assert info.value.status == 404


def pods_and_services(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """What the operator would create for the model ``obj``: its weight-holder, replicas and Service
    on a node with room, and its placeholders where there is none."""
    config = OperatorConfig()
    model = parse_model(obj)
    assert model.spec is not None, model.spec_error
    group = model.spec.share_group
    secrets = [ObservedSecret(model.namespace, sharing.secret_name(group), "uid-key", group, (), False)]
    estimate = MemoryEstimate(
        weights_mib=1024,
        device_weights_mib=1024,
        kv_cache_mib=512,
        activation_mib=0,
        overhead_mib=0,
        staging_mib=0,
    )
    manifest = npu_node_manifest("npu-0", devices=1, device_mib=16 * 1024)
    manifest["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    manifest["metadata"].setdefault("labels", {}).update(model.spec.placement.node_selector)
    out = []
    for nodes in ([parse_node(manifest)], []):
        result = plan([model], nodes, [], {model.key: estimate}, config, secrets=secrets)
        out += [render(intent, config) for intent in result.create]
        out += [render_service(intent) for intent in result.create_services]
    return out


#: Specs at the limits of what the CRD accepts: the API server must accept every pod they give too.
EDGE_SPECS = {
    "resources": with_changes(
        runtime={
            "image": "registry.example/runtime:1",
            "resources": {
                "requests": {
                    "cpu": "500m",
                    "memory": 1073741824,
                    "ephemeral-storage": "0",
                    "example.com/foo": 2,
                    "hugepages-2Mi": "4Mi",
                    "kubernetes.io/bar": "1.5",  # native: may be overcommitted, and fractional
                },
                "limits": {"cpu": "1", "memory": "1Gi", "example.com/foo": "2", "hugepages-2Mi": "4Mi"},
            },
        }
    ),
    "extended-limit-only": with_changes(runtime={"resources": {"limits": {"a.b-c.example/x_y.z": "1e3"}}}),
    # The longest drain: a replica's grace past it, a holder's past that (the pod's own limits).
    "longest-drain": with_changes(runtime={"drainSeconds": 3600}, scaling={"minReplicas": 0}),
    "placement": with_changes(
        placement={
            "nodeSelector": {"a" * 253 + "/" + "k" * 63: "v" * 63, "k" * 63: "", "pool": "a.b_c-d"},
            "tolerations": [
                {"operator": "Exists"},
                {
                    "key": "a" * 189 + "/" + "k" * 63,
                    "operator": "Equal",
                    "value": "v" * 63,
                    "effect": "NoExecute",
                    "tolerationSeconds": 0,
                },
                {"key": "k", "effect": "NoSchedule"},
            ],
        }
    ),
}


@pytest.mark.parametrize("spec", EDGE_SPECS.values(), ids=EDGE_SPECS.keys())
def test_a_spec_the_crd_accepts_gives_pods_the_api_server_accepts(
    control_plane, kube_bin_dir, crd_api, namespace, spec
) -> None:
    control_plane.kubectl("apply", "-f", "-", input=placeholder_priority_class(kube_bin_dir))
    obj = create(crd_api, namespace, "m" * 63, spec)
    manifests = pods_and_services(obj)
    roles = [m["metadata"]["labels"].get(api.LABEL_ROLE, m["kind"]) for m in manifests]
    assert {"weights", "replica", "placeholder", "Service"} <= set(roles), roles
    core = client.CoreV1Api(control_plane.api_client())
    for manifest in manifests:
        create_object = (
            core.create_namespaced_pod if manifest["kind"] == "Pod" else core.create_namespaced_service
        )
        create_object(namespace, manifest, dry_run="All")


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
