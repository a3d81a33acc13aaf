"""``helm upgrade`` from the previous release and ``helm uninstall``, on the real node (issue 14, part 4),
following docs/upgrade-and-uninstall.md step by step.

The previous release is taken from git (:data:`PREVIOUS_COMMIT`): its chart and its image (built from
that commit's code by the same recipe, cached by content hash like this checkout's), so the operator
and the device plugin really are the previous version's until the upgrade replaces them. The model
pods' runtime image is pinned (``operator.runtimeImage``) across the upgrade, as the page says to do
when running models must stay: the runtime image is part of a weight-holder's identity.

The stages build on each other (the module's tests run in order on one release):

1. the previous release installed, two models serving (two share groups: two weight-holders, three
   replicas); the new CRDs applied, ``helm upgrade`` to this chart: the operator and the device plugin
   are replaced, and every model pod stays (same UIDs, same slices at the kubelet, same key Secrets),
   serving, with no pod created or deleted by the new operator;
2. the device plugin's own token (the one the kubelet mounted) may patch its node and no other;
3. ``helm uninstall`` removes every object of the release, and only the CRD, the release's namespace,
   the models, their pods and Secrets (and the plugin's checkpoint on the node) remain: nothing runs
   that would remove them. The models keep serving;
4. removing the CRD the documented way (models first, their finalizer released by hand as no operator
   runs) garbage-collects their pods and Secrets, and the kubelet frees their slices.

Other modules share a session-scoped install (tests/e2e/conftest.py); this one needs the node without
it, so a release found here is uninstalled first (its models deleted while its operator runs) and
installed again afterwards, as those modules expect it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_helpers import (
    Allocation,
    container_pid,
    helm,
    http_json,
    is_ready,
    kget,
    kubelet_allocations,
    metrics,
    node_memory,
    pods,
)

from vnpu import api
from vnpu.cluster import images
from vnpu.cluster.helm import (
    CHART,
    PREVIOUS_VERSION,
    RELEASE,
    RELEASE_NAMESPACE,
    PreviousReleaseMissingError,
    extract_previous_release,
    local_node_values,
)
from vnpu.cluster.node import CONTAINERD_SOCKET, SingleNodeCluster
from vnpu.cluster.nodens import _setns
from vnpu.cluster.processes import wait_until
from vnpu.cluster.volumes import ensure_local_claim
from vnpu.operator.pods import ROLE_SHARE_KEY

PREVIOUS_IMAGE = "local.test/vnpu:previous"
NS = "upgrade"
#: model -> (source, replicas); the sources differ, so two share groups: a weight-holder each.
MODELS = {"chat": ("tiny-v1", 2), "solo": ("tiny-v2", 1)}
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"
CRD = f"{api.PLURAL}.{api.GROUP}"
CHECKPOINT = "/var/lib/vnpu/device-plugin/checkpoint.json"  # the chart's devicePlugin.stateDir


# -- the previous release --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def previous_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository at :data:`PREVIOUS_COMMIT` (git archive), for its chart and its image."""
    try:
        root = extract_previous_release(tmp_path_factory.mktemp("previous"))
    except PreviousReleaseMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    chart = yaml.safe_load((root / "deploy/helm/vnpu/Chart.yaml").read_text())
    assert chart["version"] == PREVIOUS_VERSION
    current = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    assert current != PREVIOUS_VERSION, "bump the chart's version (and PREVIOUS_* here) with each release"
    return root


def build_previous_image(previous_tree: Path) -> Path:
    """The previous release's image, built by the previous release's own ``make image`` code (its
    recipe, its smoke test) from its tree: ``python -m vnpu.cluster.imagebuild`` with its ``vnpu``
    package first on the path. Cached by content hash like every image."""
    shim = previous_tree.parent / f"{previous_tree.name}-path"
    shim.mkdir(exist_ok=True)
    if not (shim / "vnpu").exists():
        (shim / "vnpu").symlink_to(previous_tree / "vnpu")
    proc = subprocess.run(
        [sys.executable, "-m", "vnpu.cluster.imagebuild", "--quiet"],
        env={**os.environ, "PYTHONPATH": str(shim)},
        cwd=previous_tree, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"building the previous release's image failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def import_previous_image(cluster: SingleNodeCluster, previous_tree: Path) -> None:
    """The previous version's image as ``local.test/vnpu:previous`` next to this checkout's ``:dev``
    (both archives carry the tag ``dev``: the current one is set aside while the previous one lands)."""
    assert cluster.node is not None
    # Built in a thread of its own, moved back to the host's network namespace: this one is inside the
    # node's, where PyPI and Debian's mirror cannot be reached (a new thread starts in its creator's).
    built: list[Path] = []
    failed: list[BaseException] = []

    def build() -> None:
        try:
            host = os.open(f"/proc/{os.getppid()}/ns/net", os.O_RDONLY)  # pytest's parent: the host's
            try:
                _setns(host)
            finally:
                os.close(host)
            built.append(build_previous_image(previous_tree))
        except BaseException as exc:  # handed to the test thread
            failed.append(exc)

    worker = threading.Thread(target=build, name="previous-image")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    (archive,) = built
    tag = ("-n", "k8s.io", "images", "tag", "--force")
    cluster.node.ctr(*tag, images.VNPU_IMAGE, "local.test/vnpu:current")
    try:
        ctr = [*cluster.node.ns.wrap(), "ctr", f"--address={CONTAINERD_SOCKET}"]
        images.import_image(ctr, archive, images.VNPU_IMAGE)
        cluster.node.ctr(*tag, images.VNPU_IMAGE, PREVIOUS_IMAGE)
    finally:
        cluster.node.ctr(*tag, "local.test/vnpu:current", images.VNPU_IMAGE)
        cluster.node.ctr("-n", "k8s.io", "images", "rm", "local.test/vnpu:current")


def upgrade_values(image_tag: str) -> dict[str, Any]:
    """The local node's values (the images here, the simulated backend) with the release's own image
    for the operator and the device plugin, and the model runtime pinned to the previous image."""
    values = local_node_values()
    values["image"]["tag"] = image_tag
    values["operator"]["runtimeImage"] = PREVIOUS_IMAGE
    return values


def install(cluster: SingleNodeCluster, command: str, chart: Path, values: dict[str, Any]) -> str:
    """``helm install|upgrade`` of ``chart`` with ``values``; waits for its pods."""
    path = cluster.workdir / "upgrade-values.json"
    path.write_text(json.dumps(values))
    return helm(
        cluster,
        command, RELEASE, str(chart),
        "--namespace", RELEASE_NAMESPACE, "--create-namespace",
        "--values", str(path),
        "--wait", "--timeout", "300s",
    )  # fmt: skip


def release_deployed(cluster: SingleNodeCluster) -> bool:
    listed = json.loads(helm(cluster, "list", "--namespace", RELEASE_NAMESPACE, "--output", "json"))
    return any(r["name"] == RELEASE for r in listed)


def managed_pods(cluster: SingleNodeCluster, namespace: str | None = None) -> list[dict[str, Any]]:
    selector = f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}"
    where = ["-n", namespace] if namespace else ["-A"]
    return [p for p in kget(cluster, "pods", *where, "-l", selector)["items"]
            if not p["metadata"].get("deletionTimestamp")]  # fmt: skip


@pytest.fixture(scope="module")
def bare_node(single_node: SingleNodeCluster) -> Iterator[SingleNodeCluster]:
    """The node with no vnpu release and no model; put back as the session's modules expect after."""
    cluster = single_node
    assert cluster.cp is not None
    had_release = release_deployed(cluster)
    if had_release:
        cluster.cp.kubectl("delete", "infm", "--all", "-A", "--timeout=120s", check=False)
        wait_until(lambda: not managed_pods(cluster), 120, "no model pod left by other modules")
        helm(cluster, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait")
    yield cluster
    if had_release:
        if release_deployed(cluster):  # this module stopped half-way
            cluster.cp.kubectl("delete", "infm", "--all", "-A", "--timeout=120s", check=False)
            helm(cluster, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait")
        install(cluster, "install", CHART, local_node_values())


@pytest.fixture(scope="module")
def models_dir() -> Iterator[Path]:
    """Two tiny random Llamas (tests/runtime/rt_helpers.py) every share group's user can read."""
    path = Path(__file__).resolve().parents[1] / "runtime" / "rt_helpers.py"
    spec = importlib.util.spec_from_file_location("rt_helpers_upgrade", path)
    assert spec and spec.loader
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    root = Path(f"/tmp/vnpu-e2e-upgrade-models-{os.getpid()}")
    root.mkdir(mode=0o755, exist_ok=True)
    for seed, (source, _) in enumerate(MODELS.values(), start=1):
        helpers.write_tiny_llama(root / source, seed=seed)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def model_manifest(name: str) -> dict[str, Any]:
    source, replicas = MODELS[name]
    spec = {
        "modelName": name,
        "source": {"uri": f"pvc://models/{source}"},
        "weights": {"dtype": "float32", "sizeMiB": 1},
        "modelConfig": {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "head_dim": 16},
        "replicas": replicas,
        "memory": {"maxContextTokens": 128, "maxBatch": 1},
    }  # fmt: skip
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name, "namespace": NS},
            "spec": spec}  # fmt: skip


# -- what must survive -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    pods: dict[str, str]  # pod name -> uid (weight-holders and replicas)
    allocations: tuple[Allocation, ...]  # what the kubelet holds for them
    secrets: dict[str, str]  # key Secret name -> uid
    placements: dict[str, list[dict[str, Any]]]  # model -> status.placements


def runtime_pods(cluster: SingleNodeCluster) -> list[dict[str, Any]]:
    roles = (api.ROLE_REPLICA, api.ROLE_WEIGHTS)
    return [p for p in managed_pods(cluster, NS) if p["metadata"]["labels"].get(api.LABEL_ROLE) in roles]


def snapshot(cluster: SingleNodeCluster) -> Snapshot:
    secrets = kget(cluster, "secrets", "-n", NS, "-l", f"{api.LABEL_ROLE}={ROLE_SHARE_KEY}")["items"]
    return Snapshot(
        pods={p["metadata"]["name"]: p["metadata"]["uid"] for p in runtime_pods(cluster)},
        allocations=tuple(a for a in kubelet_allocations(cluster) if a.namespace == NS),
        secrets={s["metadata"]["name"]: s["metadata"]["uid"] for s in secrets},
        placements={
            m: kget(cluster, "infm", m, "-n", NS).get("status", {}).get("placements", []) for m in MODELS
        },
    )


def serving(cluster: SingleNodeCluster) -> bool:
    """Every model Ready with its replicas, a weight-holder per group, every pod Ready."""
    for name, (_, replicas) in MODELS.items():
        status = kget(cluster, "infm", name, "-n", NS).get("status", {})
        if status.get("phase") != "Ready" or status.get("readyReplicas") != replicas:
            return False
    live = runtime_pods(cluster)
    holders = [p for p in live if p["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_WEIGHTS]
    return (
        len(live) == len(MODELS) + sum(r for _, r in MODELS.values())
        and len(holders) == len(MODELS)
        and all(map(is_ready, live))
    )


def wait_serving(cluster: SingleNodeCluster, timeout: float = 240) -> None:
    try:
        wait_until(lambda: serving(cluster), timeout, "both models Ready", interval=1)
    except TimeoutError as e:
        assert cluster.cp is not None
        out = cluster.cp.kubectl("get", "infm,pods", "-A", "-o", "wide", check=False).stdout
        raise TimeoutError(f"{e}\n{out}") from None


def check_completions(cluster: SingleNodeCluster) -> None:
    for pod in runtime_pods(cluster):
        if pod["metadata"]["labels"][api.LABEL_ROLE] == api.ROLE_REPLICA:
            model = pod["metadata"]["labels"][api.LABEL_MODEL]
            url = f"http://{pod['status']['podIP']}:8000/v1/completions"
            answer = http_json(url, {"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0})
            assert answer["model"] == model


def component_pod(cluster: SingleNodeCluster, component: str) -> dict[str, Any]:
    live = [p for p in pods(cluster, RELEASE_NAMESPACE, f"app.kubernetes.io/component={component}")
            if not p["metadata"].get("deletionTimestamp")]  # fmt: skip
    assert len(live) == 1, [p["metadata"]["name"] for p in live]
    return live[0]


@dataclass(frozen=True)
class Stage:
    cluster: SingleNodeCluster
    before: Snapshot


@pytest.fixture(scope="module")
def previous_release(bare_node: SingleNodeCluster, previous_tree: Path, models_dir: Path) -> Stage:
    """The previous release installed, its image running the operator and the device plugin, both
    models serving."""
    cluster = bare_node
    assert cluster.cp is not None
    import_previous_image(cluster, previous_tree)
    install(cluster, "install", previous_tree / "deploy/helm/vnpu", upgrade_values("previous"))
    ds = kget(cluster, "daemonset", "-n", RELEASE_NAMESPACE, "-l", INSTANCE)["items"][0]
    assert ds["metadata"]["labels"]["helm.sh/chart"] == f"vnpu-{PREVIOUS_VERSION}"
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == PREVIOUS_IMAGE
    cluster.cp.kubectl("create", "namespace", NS)
    ensure_local_claim(cluster.cp, NS, "models", models_dir)
    items = [model_manifest(name) for name in MODELS]
    cluster.cp.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )
    wait_serving(cluster)
    check_completions(cluster)
    return Stage(cluster, snapshot(cluster))


# -- 1. upgrade ------------------------------------------------------------------------------------------
def test_upgrade_from_the_previous_release_keeps_every_model_pod(previous_release: Stage) -> None:
    cluster, before = previous_release.cluster, previous_release.before
    assert cluster.cp is not None
    assert len(before.pods) == 5 and len(before.secrets) == 2 and before.allocations
    old_operator = component_pod(cluster, "operator")["metadata"]["uid"]
    old_plugin = component_pod(cluster, "device-plugin")["metadata"]["uid"]

    # The documented upgrade: CRDs first (Helm never upgrades crds/), then the chart.
    cluster.cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str((CHART / "crds").resolve()))
    install(cluster, "upgrade", CHART, upgrade_values("dev"))

    ds = kget(cluster, "daemonset", "-n", RELEASE_NAMESPACE, "-l", INSTANCE)["items"][0]
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    assert ds["metadata"]["labels"]["helm.sh/chart"] == f"vnpu-{version}"
    wait_until(lambda: is_ready(component_pod(cluster, "device-plugin")), 120, "the new device plugin Ready")
    wait_until(lambda: is_ready(component_pod(cluster, "operator")), 120, "the new operator Ready")
    operator, plugin = component_pod(cluster, "operator"), component_pod(cluster, "device-plugin")
    assert operator["metadata"]["uid"] != old_operator and plugin["metadata"]["uid"] != old_plugin
    assert operator["spec"]["containers"][0]["image"] == images.VNPU_IMAGE  # this checkout's code
    # The new operator took over: two full passes over the cluster, and it created and deleted nothing.
    operator_metrics = f"http://{operator['status']['podIP']}:8080/metrics"
    wait_until(
        lambda: metrics(operator_metrics).get("vnpu_operator_reconcile_duration_seconds_count", 0) >= 2,
        120,
        "two reconcile passes of the new operator",
    )
    actions = {
        k: v for k, v in metrics(operator_metrics).items() if k.startswith("vnpu_operator_pod_actions")
    }
    assert not any(actions.values()), actions
    # The new plugin re-registered every device and took over the allocations from its checkpoint.
    wait_until(
        lambda: node_memory(cluster) == {api.device_resource(i): (16, 16) for i in (0, 1)},
        120,
        "both devices advertised by the new plugin",
    )
    wait_serving(cluster)
    wait_until(lambda: snapshot(cluster) == before, 60, "the same pods, slices, Secrets and placements")
    check_completions(cluster)


# -- 2. the plugin's own token ---------------------------------------------------------------------------
def test_the_plugins_own_token_patches_its_node_and_no_other(previous_release: Stage, tmp_path: Path) -> None:
    """The token the kubelet mounted into the (upgraded) device plugin, used as the plugin uses it."""
    cluster = previous_release.cluster
    assert cluster.cp is not None and cluster.node is not None
    plugin = component_pod(cluster, "device-plugin")
    # As the plugin reads it: its container's view (the kubelet mounts it on a tmpfs of the node's own
    # mount namespace, which the host's view of the kubelet's folder does not show).
    pid = container_pid(cluster, plugin, plugin["spec"]["containers"][0]["name"])
    # (/run, not /var/run: an absolute symlink under /proc/<pid>/root resolves against our own root.)
    token = Path(f"/proc/{pid}/root/run/secrets/kubernetes.io/serviceaccount/token").read_text()
    config = yaml.safe_load(cluster.cp.kubeconfig.read_text())
    config["users"] = [{"name": "plugin", "user": {"token": token.strip()}}]
    config["contexts"][0]["context"]["user"] = "plugin"
    kubeconfig = tmp_path / "plugin.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    # Another Node (an object only) the plugin must not touch; tainted so no DaemonSet pod goes there.
    other = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "not-the-plugins-node"},
             "spec": {"taints": [{"key": "vnpu.test/no-kubelet", "effect": "NoExecute"}]}}  # fmt: skip
    cluster.cp.kubectl("apply", "-f", "-", input=json.dumps(other))
    try:
        current = kget(cluster, "node", cluster.node_name)["metadata"]["annotations"][api.ANNOTATION_DEVICES]
        patch = json.dumps({"metadata": {"annotations": {api.ANNOTATION_DEVICES: current}}})
        mine = cluster.cp.kubectl(
            "patch", "node", cluster.node_name, "-p", patch, kubeconfig=kubeconfig, check=False
        )
        assert mine.returncode == 0, mine.stderr
        theirs = cluster.cp.kubectl(
            "patch", "node", "not-the-plugins-node", "-p", patch, kubeconfig=kubeconfig, check=False
        )
        assert theirs.returncode != 0
        assert f"ValidatingAdmissionPolicy '{RELEASE}-device-plugin-own-node'" in theirs.stderr, theirs.stderr
        assert f"on node {cluster.node_name} may not change node not-the-plugins-node" in theirs.stderr
    finally:
        cluster.cp.kubectl("delete", "node", "not-the-plugins-node", "--wait=false", check=False)


# -- 3. uninstall ----------------------------------------------------------------------------------------
def test_uninstall_removes_the_release_and_leaves_the_crd_and_the_models(previous_release: Stage) -> None:
    cluster, before = previous_release.cluster, previous_release.before
    assert cluster.cp is not None and cluster.node is not None
    manifest = cluster.workdir / "release-manifest.yaml"
    manifest.write_text(helm(cluster, "get", "manifest", RELEASE, "--namespace", RELEASE_NAMESPACE))
    released = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(manifest.read_text()) if d}
    assert {("DaemonSet", f"{RELEASE}-device-plugin"), ("Deployment", f"{RELEASE}-operator"),
            ("PriorityClass", "vnpu-placeholder")} <= released  # fmt: skip

    helm(cluster, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait")

    left = cluster.cp.kubectl("get", "-f", str(manifest), "--ignore-not-found", "-o", "name").stdout
    assert left.strip() == "", f"objects of the release still there:\n{left}"
    kinds = ",".join([
        "all", "serviceaccounts", "secrets", "configmaps", "roles", "rolebindings", "clusterroles",
        "clusterrolebindings", "priorityclasses", "validatingadmissionpolicies",
        "validatingadmissionpolicybindings", "endpointslices",
    ])  # fmt: skip

    def labelled() -> str:
        return str(cluster.cp.kubectl("get", kinds, "-A", "-l", INSTANCE, "-o", "name").stdout.strip())

    wait_until(
        lambda: labelled() == "", 120, "nothing labelled with the release (its pods garbage-collected)"
    )
    history = cluster.cp.kubectl(
        "get", "secrets", "-n", RELEASE_NAMESPACE, "-l", f"owner=helm,name={RELEASE}"
    )
    assert "No resources" in history.stderr or not history.stdout.strip()

    # What stays: Helm keeps CRDs (crds/) and the namespace it created; nothing removes the models, and
    # with the operator gone nothing removes their pods and Secrets either: they keep serving.
    assert cluster.cp.kubectl("get", "crd", CRD, "-o", "name").stdout.strip()
    assert cluster.cp.kubectl("get", "namespace", RELEASE_NAMESPACE, "-o", "name").stdout.strip()
    for name in MODELS:
        assert kget(cluster, "infm", name, "-n", NS)["metadata"]["finalizers"] == ["vnpu.io/finalizer"]
    after = snapshot(cluster)
    assert (after.pods, after.secrets, after.allocations) == (before.pods, before.secrets, before.allocations)
    assert all(map(is_ready, runtime_pods(cluster)))
    check_completions(cluster)
    assert cluster.node.host_path(CHECKPOINT).is_file()  # the plugin's host state stays on the node


# -- 4. removing the CRD ---------------------------------------------------------------------------------
def test_removing_the_crd_the_documented_way_removes_the_models_and_what_they_own(
    previous_release: Stage,
) -> None:
    cluster = previous_release.cluster
    assert cluster.cp is not None
    # No operator runs to release its finalizer: release it by hand, delete the models while the CRD is
    # still there (the garbage collector resolves their kind to remove what they own), then the CRD.
    for model in kget(cluster, "infm", "-A")["items"]:
        meta = model["metadata"]
        cluster.cp.kubectl("patch", "infm", meta["name"], "-n", meta["namespace"], "--type=merge",
                           "-p", '{"metadata":{"finalizers":null}}')  # fmt: skip
    cluster.cp.kubectl("delete", "infm", "--all", "-A", "--timeout=60s")
    wait_until(lambda: not managed_pods(cluster, NS), 120, "the models' pods garbage-collected")
    wait_until(
        lambda: not kget(cluster, "secrets", "-n", NS, "-l", f"{api.LABEL_ROLE}={ROLE_SHARE_KEY}")["items"],
        60,
        "the key Secrets garbage-collected",
    )
    wait_until(
        lambda: not [a for a in kubelet_allocations(cluster) if a.namespace == NS], 60, "the slices freed"
    )
    cluster.cp.kubectl("delete", "crd", CRD, "--timeout=60s")
    gone = cluster.cp.kubectl("get", "crd", CRD, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    cluster.cp.kubectl("delete", "namespace", NS, "--wait=false")
