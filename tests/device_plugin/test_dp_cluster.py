"""The plugin against a real API server: node annotation, pending-pod lookup for placement and share
groups, release of finished pods' slices, and the RBAC the plugin needs (no kubelet: pods are bound
with spec.nodeName and stay Pending, exactly what the kubelet sees while it admits them)."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
from dp_helpers import TWO_DEVICES, allocate, preferred, wait_for, write_devices
from kubernetes import client

from vnpu.api import ANNOTATION_DEVICE, ANNOTATION_DEVICES, ANNOTATION_SHARE_GROUP, RESOURCE_MEMORY
from vnpu.device_plugin import contract
from vnpu.device_plugin.plugin import PluginRunner
from vnpu.inventory import NodeInventory

pytestmark = pytest.mark.integration

ALL_SLICES = [f"npu0-s{i}" for i in range(4)] + [f"npu1-s{i}" for i in range(8)]

#: What the plugin's ServiceAccount needs (the Helm chart's ClusterRole must grant at least this).
PLUGIN_RULES = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
]


@pytest.fixture
def core(control_plane):
    return client.CoreV1Api(control_plane.api_client())


@pytest.fixture
def node(core):
    name = f"dp-{uuid.uuid4().hex[:8]}"
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_node(name)


def make_pod(core, namespace: str, node: str, name: str, slices: int, device: str | None, group: str | None):
    annotations = {k: v for k, v in ((ANNOTATION_DEVICE, device), (ANNOTATION_SHARE_GROUP, group)) if v}
    core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name=name, annotations=annotations),
            spec=client.V1PodSpec(
                node_name=node,
                containers=[
                    client.V1Container(
                        name="main",
                        image="local.test/busybox",
                        resources=client.V1ResourceRequirements(
                            limits={RESOURCE_MEMORY: str(slices)}, requests={RESOURCE_MEMORY: str(slices)}
                        ),
                    )
                ],
            ),
        ),
    )


def annotation(core, node: str) -> str | None:
    return (core.read_node(node).metadata.annotations or {}).get(ANNOTATION_DEVICES)


def test_node_annotation_follows_the_device_table(core, node, dirs, stub_for):
    write_devices(dirs.devices_file, TWO_DEVICES)
    with PluginRunner(dirs.config(node_name=node, health_interval_s=0.1), core_api=core) as runner:
        text = wait_for(lambda: annotation(core, node), timeout=10, what="annotation")
        inventory = NodeInventory.from_json(text)
        assert [(d.id, d.slices, d.health, d.numa_node) for d in inventory.devices] == [
            ("npu0", 4, "Healthy", 0),
            ("npu1", 8, "Healthy", 1),
        ]
        assert text == runner.table.inventory().to_json()
        write_devices(
            dirs.devices_file, [TWO_DEVICES[0], dict(TWO_DEVICES[1], health="Unhealthy", reason="ECC")]
        )
        wait_for(
            lambda: '"reason":"ECC"' in (annotation(core, node) or ""),
            timeout=10,
            what="unhealthy annotation",
        )


def test_pending_pod_annotations_drive_placement_and_share_group_mounts(
    core, node, namespace, dirs, stub_for
):
    write_devices(dirs.devices_file, TWO_DEVICES)
    with PluginRunner(dirs.config(node_name=node), core_api=core) as runner:
        stub = stub_for(runner)
        # Best fit alone would pick npu0 for 2 slices; the operator asked for npu1.
        make_pod(core, namespace, node, "replica-a", 2, "npu1", "grp-a")
        chosen = preferred(stub, ALL_SLICES, 2)
        assert chosen == ["npu1-s0", "npu1-s1"]
        resp = allocate(stub, chosen)
        assert resp.envs[contract.ENV_SHARE_GROUP] == "grp-a"
        assert resp.envs[contract.ENV_SOCKET_DIR] == contract.SOCKET_DIR_IN_CONTAINER
        assert [(m.host_path, m.container_path, m.read_only) for m in resp.mounts] == [
            (str(dirs.share_root / "grp-a"), contract.SOCKET_DIR_IN_CONTAINER, False),
        ]
        assert (dirs.share_root / "grp-a").stat().st_mode & 0o7777 == 0o1777  # any pod user can make sockets
        held = runner.ledger.held()["npu1-s0"]
        assert (held.pod.name, held.share_group) == ("replica-a", "grp-a")

        # A second pod of another group on the same device gets only its own group's directory.
        make_pod(core, namespace, node, "replica-b", 2, "npu1", "grp-b")
        remaining = [s for s in ALL_SLICES if s not in chosen]
        chosen_b = preferred(stub, remaining, 2)
        assert chosen_b == ["npu1-s2", "npu1-s3"]
        resp_b = allocate(stub, chosen_b)
        assert [m.host_path for m in resp_b.mounts] == [str(dirs.share_root / "grp-b")]

        # Deleting a pod releases its slices in the ledger (watch event), the other pod keeps its own.
        core.delete_namespaced_pod("replica-a", namespace, grace_period_seconds=0)
        wait_for(
            lambda: "npu1-s0" not in runner.ledger.held(), timeout=10, what="release of replica-a's slices"
        )
        assert sorted(runner.ledger.held()) == ["npu1-s2", "npu1-s3"]


def test_a_share_group_that_could_escape_the_share_root_is_refused(core, node, namespace, dirs, stub_for):
    write_devices(dirs.devices_file, TWO_DEVICES)
    with PluginRunner(dirs.config(node_name=node), core_api=core) as runner:
        make_pod(core, namespace, node, "evil", 1, "npu0", "../../etc")
        with pytest.raises(grpc.RpcError) as err:
            allocate(stub_for(runner), ["npu0-s0"])
        assert "share group '../../etc' must be" in err.value.details()


def test_the_plugin_works_with_only_its_documented_rbac(control_plane, core, node, namespace, dirs, stub_for):
    user = f"system:serviceaccount:kube-system:vnpu-dp-{uuid.uuid4().hex[:6]}"
    role = f"vnpu-device-plugin-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [
                    {
                        "apiVersion": "rbac.authorization.k8s.io/v1",
                        "kind": "ClusterRole",
                        "metadata": {"name": role},
                        "rules": PLUGIN_RULES,
                    },
                    {
                        "apiVersion": "rbac.authorization.k8s.io/v1",
                        "kind": "ClusterRoleBinding",
                        "metadata": {"name": role},
                        "roleRef": {
                            "apiGroup": "rbac.authorization.k8s.io",
                            "kind": "ClusterRole",
                            "name": role,
                        },
                        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
                    },
                ],
            }
        ),
    )
    kubeconfig = control_plane.kubeconfig_for(role, user)
    write_devices(dirs.devices_file, TWO_DEVICES)
    make_pod(core, namespace, node, "rbac-pod", 3, "npu1", "grp-r")
    with PluginRunner(dirs.config(node_name=node, use_api=True, kubeconfig=kubeconfig)) as runner:
        wait_for(lambda: annotation(core, node), timeout=10, what="annotation written with the plugin's RBAC")
        assert runner.pods is not None and runner.pods.synced.wait(10)
        resp = allocate(stub_for(runner), ["npu1-s4", "npu1-s5", "npu1-s6"])
        assert resp.envs[contract.ENV_SHARE_GROUP] == "grp-r"
