"""A real node end to end (issue 6, item 2): containerd + runc + kubelet registered with the local
control plane, inside a network and mount namespace the test creates (see vnpu/cluster/node.py).

Stage 1 — the node itself: it registers and becomes Ready, runs a pod from a locally built image on
the locally built pause sandbox, and the container's output is on the node's disk and behind
``kubectl logs``.
"""

from __future__ import annotations

import json
import uuid

from vnpu.cluster import images
from vnpu.cluster.processes import wait_until


def test_node_is_ready_and_runs_a_pod_from_a_local_image(single_node) -> None:
    cp, node = single_node.cp, single_node.node
    nodes = json.loads(cp.kubectl("get", "nodes", "-o", "json").stdout)["items"]
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
                    # The node-provided Python runs inside the image: `vnpu --version` proves it.
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
    assert marker in on_disk and "vnpu 0.1.0" in on_disk
    via_api = cp.kubectl("logs", "hello", "-n", ns).stdout  # API server -> kubelet, inside the namespace
    assert via_api.splitlines()[0] == marker
    sandbox = json.loads(cp.kubectl("get", "pod", "hello", "-n", ns, "-o", "json").stdout)
    assert sandbox["status"]["podIP"].startswith("10.214.")
    cp.kubectl("delete", "namespace", ns, "--wait=false")
