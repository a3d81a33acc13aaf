"""The plugin against a real API server: the node annotation (with each device's resource), Allocate
that never depends on pods even when pods carry vnpu annotations, and the RBAC the plugin needs (no
kubelet: pods are bound with spec.nodeName and stay Pending, exactly what the kubelet sees while it
admits them)."""

from __future__ import annotations

import json
import uuid

import pytest
from dp_helpers import TWO_DEVICES, allocate, wait_for, write_devices
from kubernetes import client

from vnpu.api import ANNOTATION_DEVICE, ANNOTATION_DEVICES, ANNOTATION_SHARE_GROUP, device_resource
from vnpu.device_plugin.plugin import PluginRunner
from vnpu.inventory import NodeInventory

pytestmark = pytest.mark.integration

#: What the plugin's ServiceAccount needs (the Helm chart's ClusterRole must grant at least this).
PLUGIN_RULES = [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]


@pytest.fixture
def core(control_plane):
    return client.CoreV1Api(control_plane.api_client())


@pytest.fixture
def node(core):
    name = f"dp-{uuid.uuid4().hex[:8]}"
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_node(name)


def make_pod(core, namespace: str, node: str, name: str, slices: int, device: str, group: str) -> None:
    index = int(device.removeprefix("npu"))
    core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(
                name=name, annotations={ANNOTATION_DEVICE: device, ANNOTATION_SHARE_GROUP: group}
            ),
            spec=client.V1PodSpec(
                node_name=node,
                containers=[
                    client.V1Container(
                        name="main",
                        image="local.test/busybox",
                        resources=client.V1ResourceRequirements(
                            limits={device_resource(index): str(slices)},
                            requests={device_resource(index): str(slices)},
                        ),
                    )
                ],
            ),
        ),
    )


def annotation(core, node: str) -> str | None:
    return (core.read_node(node).metadata.annotations or {}).get(ANNOTATION_DEVICES)


def test_node_annotation_follows_the_device_table(core, node, dirs):
    write_devices(dirs.devices_file, TWO_DEVICES)
    with PluginRunner(dirs.config(node_name=node, health_interval_s=0.1), core_api=core) as runner:
        text = wait_for(lambda: annotation(core, node), timeout=10, what="annotation")
        inventory = NodeInventory.from_json(text)
        assert [(d.id, d.slices, d.health, d.numa_node, d.resource) for d in inventory.devices] == [
            ("npu0", 4, "Healthy", 0, "vnpu.io/memory-0"),
            ("npu1", 8, "Healthy", 1, "vnpu.io/memory-1"),
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


def test_allocate_ignores_pods_and_their_annotations(core, node, namespace, dirs, stub_for):
    """Pending pods of two groups on one device, created in the same second, one even claiming a group
    that would escape a directory: Allocate answers the same for any of them — the device's envs and
    socket directory, nothing of a pod — so no pod can be handed another's group."""
    write_devices(dirs.devices_file, TWO_DEVICES)
    with PluginRunner(dirs.config(node_name=node), core_api=core) as runner:
        make_pod(core, namespace, node, "replica-a", 2, "npu1", "grp-a")
        make_pod(core, namespace, node, "replica-b", 2, "npu1", "grp-b")
        make_pod(core, namespace, node, "evil", 2, "npu1", "../../etc")
        stub = stub_for(runner, 1)
        answers = [allocate(stub, [f"npu1-s{i}", f"npu1-s{i + 1}"]) for i in (0, 2, 4)]
        assert [dict(a.envs) for a in answers] == [dict(answers[0].envs)] * 3
        assert [list(a.mounts) for a in answers] == [list(answers[0].mounts)] * 3
        assert [m.host_path for m in answers[0].mounts] == [str(dirs.socket_root / "npu1")]
        assert not any("grp" in v or "etc" in v for v in answers[0].envs.values())
        assert {a.pod for a in runner.ledger.allocations()} == {None}  # pod-resources names holders later


def test_the_plugin_works_with_only_its_documented_rbac(control_plane, core, node, dirs, stub_for):
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
    with PluginRunner(dirs.config(node_name=node, use_api=True, kubeconfig=kubeconfig)) as runner:
        wait_for(lambda: annotation(core, node), timeout=10, what="annotation written with the plugin's RBAC")
        resp = allocate(stub_for(runner, 1), ["npu1-s4", "npu1-s5", "npu1-s6"])
        assert resp.envs["VNPU_DEVICE"] == "npu1"
