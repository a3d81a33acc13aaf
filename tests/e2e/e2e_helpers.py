"""Observations of the real node for tests/e2e: what the API server holds, what the kubelet allocated
(its pod-resources API), and what the container processes actually received (their environment,
mounts and memory maps, read from /proc — no exec into containers)."""

from __future__ import annotations

import base64
import json
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from vnpu import api, sharing
from vnpu.bench import probes
from vnpu.cluster import helm as vnpu_helm
from vnpu.cluster.node import KUBELET_ROOT, SingleNodeCluster
from vnpu.device_plugin import contract
from vnpu.device_plugin.proto import podresources_pb2, podresources_pb2_grpc


def helm(cluster: SingleNodeCluster, *args: str, timeout: float = 300) -> str:
    assert cluster.cp is not None
    return vnpu_helm.helm(
        cluster.bin_dir, cluster.cp.kubeconfig, cluster.workdir / "helm", *args, timeout=timeout
    )


def kget(cluster: SingleNodeCluster, *args: str) -> Any:
    """``kubectl get ... -o json`` as a dict."""
    assert cluster.cp is not None
    return json.loads(cluster.cp.kubectl("get", *args, "-o", "json").stdout)


def pods(cluster: SingleNodeCluster, namespace: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["pods", "-n", namespace] + (["-l", selector] if selector else [])
    return list(kget(cluster, *args)["items"])


def is_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp") or pod.get("status", {}).get("phase") != "Running":
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def node_memory(cluster: SingleNodeCluster) -> dict[str, tuple[int, int]]:
    """Per vnpu resource of the node (one per device): (capacity, allocatable)."""
    status = kget(cluster, "node", cluster.node_name)["status"]
    return {
        name: (int(value), int(status["allocatable"].get(name, 0)))
        for name, value in status["capacity"].items()
        if api.is_vnpu_resource(name)
    }


# -- the kubelet's view ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Allocation:
    namespace: str
    pod: str
    container: str
    device_ids: tuple[str, ...]


def kubelet_allocations(cluster: SingleNodeCluster) -> list[Allocation]:
    """Every vnpu allocation (``vnpu.io/memory-<index>``) the kubelet holds, per container, from its
    pod-resources API (v1 List)."""
    assert cluster.node is not None
    socket = cluster.node.host_path(f"{KUBELET_ROOT}/pod-resources/kubelet.sock")
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = podresources_pb2_grpc.PodResourcesListerStub(channel)
        response = stub.List(podresources_pb2.ListPodResourcesRequest(), timeout=10)
    found = []
    for pod in response.pod_resources:
        for container in pod.containers:
            ids = [
                i
                for d in container.devices
                if api.device_resource_index(d.resource_name) is not None
                for i in d.device_ids
            ]
            if ids:
                found.append(Allocation(pod.namespace, pod.name, container.name, tuple(sorted(ids))))
    return sorted(found, key=lambda a: (a.namespace, a.pod, a.container))


def double_allocated(allocations: list[Allocation]) -> dict[str, int]:
    """Slice IDs handed to more than one container (must be empty)."""
    counts = Counter(i for a in allocations for i in a.device_ids)
    return {i: n for i, n in counts.items() if n > 1}


# -- what a container process received -------------------------------------------------------------------
def container_pid(cluster: SingleNodeCluster, pod: dict[str, Any], container: str) -> int:
    """Host PID of a running container's first process (containerd's task list)."""
    assert cluster.node is not None
    status = next(s for s in pod["status"]["containerStatuses"] if s["name"] == container)
    cid = status["containerID"].removeprefix("containerd://")
    for line in cluster.node.ctr("-n", "k8s.io", "tasks", "ls").stdout.splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == cid:
            return int(pid)
    raise LookupError(f"no task for container {container} of pod {pod['metadata']['name']}")


def workload_pid(pid: int) -> int:
    """The ``vnpu`` process of a container: the first process itself, or its only child when the image's
    launcher stays PID 1 to forward signals."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if len(children) == 1 else pid


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def process_uid(pid: int) -> int:
    """The real user id a process runs as."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise LookupError(f"no Uid in /proc/{pid}/status")


def process_mounts(pid: int) -> dict[str, str]:
    """Mount point in the container -> mounted path inside its source file system (mountinfo fields)."""
    mounts = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        mounts[fields[4]] = fields[3]
    return mounts


def shared_weight_mappings(pid: int) -> set[tuple[str, str]]:
    """(device, inode) of the memfd arenas a process maps (the CPU backend's shared weights)."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/memfd:vnpu-weights"):
            found.add((fields[3], fields[4]))
    return found


# -- HTTP to a replica (the calling thread is in the node's network namespace) ---------------------------
def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> Any:
    """The JSON answer of a request that must succeed."""
    status, answer = probes.http_json(url, body, timeout)
    assert status == 200, f"{url}: HTTP {status} {answer}"
    return answer


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


# -- share groups ----------------------------------------------------------------------------------------
def share_key(cluster: SingleNodeCluster, namespace: str, group: str) -> bytes:
    """A share group's key, from the Secret the operator keeps in its namespace."""
    secret = kget(cluster, "secret", sharing.secret_name(group), "-n", namespace)
    return base64.b64decode(secret["data"][sharing.SECRET_KEY_FIELD])


def holder_socket(
    cluster: SingleNodeCluster, holder: dict[str, Any]
) -> tuple[Path, sharing.ShareIdentity, bytes]:
    """Where a weight-holder pod listens on the host, its identity and its group's key (what a replica
    of its group computes: the name comes from the key)."""
    assert cluster.node is not None
    meta = holder["metadata"]
    env = {e["name"]: e.get("value") for e in holder["spec"]["containers"][0]["env"]}
    identity = sharing.ShareIdentity(
        meta["namespace"], env[sharing.ENV_SHARE_GROUP], env[sharing.ENV_WEIGHTS_ID]
    )
    key = share_key(cluster, meta["namespace"], identity.group)
    device = meta["annotations"][api.ANNOTATION_DEVICE]
    directory = cluster.node.host_path(str(contract.device_socket_dir(contract.DEFAULT_SOCKET_ROOT, device)))
    return directory / sharing.socket_name(key, identity, device), identity, key
