"""The Helm chart: lint, schema validation against the pinned release, install into the real apiserver,
and the operator running under exactly the RBAC the chart grants."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_schemas import write_schemas

from vnpu import api
from vnpu.cluster.helm import CHART
from vnpu.cluster.processes import wait_until

VALUE_SETS = {
    "defaults": [],
    "two-replicas-and-monitoring": [
        "--set",
        "operator.replicas=2",
        "--set",
        "serviceMonitor.enabled=true",
        "--api-versions",
        "monitoring.coreos.com/v1",
    ],
    "nvidia-runtime-class-privileged-ascend": [
        "--set",
        "devicePlugin.nvidia.runtimeClassName=nvidia",
        "--set",
        "devicePlugin.ascend.privileged=true",
    ],
    "simulated-one-namespace": [
        "--set",
        "devicePlugin.backend=simulated",
        "--set",
        "operator.watchNamespaces={team-a,team-b}",
        "--set",
        "operator.placeholders.enabled=false",
    ],
    "device-plugin-rolling-percent": [
        "--set",
        "devicePlugin.updateStrategy.rollingUpdate.maxUnavailable=10%",
    ],
    "model-policy": [
        "--set-json",
        'modelPolicy.allowedRuntimeImages=["registry.example.com/vnpu/"]',
        "--set-json",
        'modelPolicy.allowedSources=["hf://my-org/", "pvc://"]',
    ],
}


def helm(bin_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(bin_dir / "helm"), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def render(bin_dir: Path, *args: str) -> list[dict[str, Any]]:
    out = helm(
        bin_dir, "template", "vnpu", str(CHART), "-n", "vnpu-system", "--kube-version", "1.34.4", *args
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def show_only(bin_dir: Path, release: str, namespace: str, *templates: str) -> list[dict[str, Any]]:
    """The objects ``templates`` render for ``release`` in ``namespace`` (default values)."""
    return [
        d
        for template in templates
        for d in yaml.safe_load_all(
            helm(bin_dir, "template", release, str(CHART), "-n", namespace, "--show-only", template).stdout
        )
        if d
    ]


LINT_SETS = {
    "defaults": [],
    "two-replicas": ["--set", "operator.replicas=2"],
    "two-replicas-namespaced": ["--set", "operator.replicas=2", "--set", "operator.watchNamespaces={a,b}"],
    "simulated-one-namespace": VALUE_SETS["simulated-one-namespace"],
}


@pytest.mark.parametrize("values", LINT_SETS.values(), ids=LINT_SETS.keys())
def test_lint_strict(kube_bin_dir, values) -> None:
    proc = helm(kube_bin_dir, "lint", "--strict", str(CHART), *values)
    assert "0 chart(s) failed" in proc.stdout


def test_values_schema_refuses_bad_values(kube_bin_dir) -> None:
    proc = helm(
        kube_bin_dir, "template", "x", str(CHART), "--set", "devicePlugin.backend=quantum", check=False
    )
    assert proc.returncode != 0 and "/devicePlugin/backend" in proc.stderr
    proc = helm(
        kube_bin_dir, "template", "x", str(CHART), "--set", "placeholderPriorityClass.value=-100", check=False
    )
    assert proc.returncode != 0 and "/placeholderPriorityClass/value" in proc.stderr
    proc = helm(
        kube_bin_dir, "template", "x", str(CHART), "--set", "serviceMonitor.enabled=true", check=False
    )
    assert proc.returncode != 0 and "needs the Prometheus Operator CRDs" in proc.stderr
    # Each of these rendered, and failed only at install ("roles ... already exists") or at run time
    # (two servers on one port).
    proc = helm(
        kube_bin_dir, "template", "x", str(CHART), "--set", "operator.watchNamespaces={a,a}", check=False
    )
    assert proc.returncode != 0 and "/operator/watchNamespaces" in proc.stderr
    proc = helm(kube_bin_dir, "template", "x", str(CHART), "--set", "operator.healthPort=8080", check=False)
    assert proc.returncode != 0 and "cannot share a port" in proc.stderr


def test_rendered_manifests_match_the_pinned_kubernetes_schemas(
    control_plane, kube_bin_dir, tmp_path
) -> None:
    openapi = json.loads(control_plane.kubectl("get", "--raw", "/openapi/v2").stdout)
    docs = [d for values in VALUE_SETS.values() for d in render(kube_bin_dir, *values)]
    wanted = {(d["apiVersion"], d["kind"]) for d in docs}
    written = write_schemas(openapi, wanted, tmp_path / "schemas")
    assert len(written) >= len(wanted) - 2  # ServiceMonitor/PodMonitor have no schema without their CRDs
    for name, values in VALUE_SETS.items():
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump_all(render(kube_bin_dir, *values)))
        proc = subprocess.run(
            [
                str(kube_bin_dir / "kubeconform"),
                "-summary",
                "-output",
                "json",
                "-schema-location",
                str(tmp_path / "schemas") + "/{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json",
                "-skip",
                "ServiceMonitor,PodMonitor",
                str(manifest),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        summary = json.loads(proc.stdout)["summary"]
        assert proc.returncode == 0 and summary["invalid"] == 0 and summary["errors"] == 0, proc.stdout
        assert summary["valid"] >= 8


def test_security_contexts_are_restricted_where_possible(kube_bin_dir) -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(kube_bin_dir)}
    operator = docs[("Deployment", "vnpu-operator")]["spec"]["template"]["spec"]
    assert operator["securityContext"]["runAsNonRoot"] is True
    ctx = operator["containers"][0]["securityContext"]
    assert (
        ctx["readOnlyRootFilesystem"]
        and not ctx["allowPrivilegeEscalation"]
        and ctx["capabilities"]["drop"] == ["ALL"]
    )
    plugin = docs[("DaemonSet", "vnpu-device-plugin")]["spec"]["template"]["spec"]
    pctx = plugin["containers"][0]["securityContext"]
    assert pctx["readOnlyRootFilesystem"] and pctx["capabilities"]["drop"] == ["ALL"]
    assert not pctx["allowPrivilegeEscalation"] and "privileged" not in pctx
    mounts = {m["mountPath"] for m in plugin["containers"][0]["volumeMounts"]}
    assert {"/var/lib/kubelet/device-plugins", "/var/lib/kubelet/pod-resources"} <= mounts


def test_the_gateway_outlives_the_streams_in_flight_at_sigterm(kube_bin_dir) -> None:
    """A stopping gateway gives streams in flight as long as a replica gives its own requests; its
    pod's grace period must cover that, or the kubelet's SIGKILL cuts them (Kubernetes' default is 30 s)."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(kube_bin_dir)}
    gateway = docs[("Deployment", "vnpu-gateway")]["spec"]["template"]["spec"]
    grace = api.replica_grace_s(api.REPLICA_DRAIN_S)
    assert gateway["terminationGracePeriodSeconds"] == grace > api.REPLICA_DRAIN_S
    assert f"--drain-seconds={api.REPLICA_DRAIN_S}" in gateway["containers"][0]["args"]
    # New connections are taken for the first seconds of the drain, inside the grace period.
    assert f"--shutdown-delay-seconds={api.SHUTDOWN_DELAY_S}" in gateway["containers"][0]["args"]
    # Models that answer for longer (runtime.drainSeconds) get a gateway that waits as long.
    docs = {
        (d["kind"], d["metadata"]["name"]): d
        for d in render(kube_bin_dir, "--set", "gateway.drainSeconds=900")
    }
    gateway = docs[("Deployment", "vnpu-gateway")]["spec"]["template"]["spec"]
    assert gateway["terminationGracePeriodSeconds"] == 905
    assert "--drain-seconds=900" in gateway["containers"][0]["args"]


def device_plugin(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    return dict(ds["spec"]["template"]["spec"])


def test_the_default_install_sends_no_simulated_setting_to_the_plugin(kube_bin_dir) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["devicePlugin"]
    assert (values["backend"], values["fallback"], values["simulatedDevices"]) == ("auto", "none", "")
    pod = device_plugin(render(kube_bin_dir))
    (container,) = pod["containers"]
    assert "--backend=auto" in container["args"] and "--fallback=none" in container["args"]
    rendered = yaml.safe_dump(pod)
    assert "simulated" not in rendered.lower() and "VNPU_SIMULATED" not in rendered
    # The real backends get what they need: npu-smi and the driver at the host's paths (read-only,
    # from a folder every node has, so nothing is created on a node without Ascend), and the
    # environment under which the NVIDIA container toolkit mounts NVML and the GPUs.
    args = container["args"]
    assert "--npu-smi=/usr/local/sbin/npu-smi" in args
    assert "--ascend-driver-path=/usr/local/Ascend/driver" in args
    assert "--ascend-device-files=/dev/davinci_manager,/dev/devmm_svm,/dev/hisi_hdc" in args
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["ascend-host-0"]["hostPath"] == {"path": "/usr/local", "type": "Directory"}
    assert mounts["ascend-host-0"] == {"name": "ascend-host-0", "mountPath": "/usr/local", "readOnly": True}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    assert "runtimeClassName" not in pod
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]  # not privileged by default


def test_backend_settings_reach_the_plugin_only_where_they_apply(kube_bin_dir) -> None:
    pod = device_plugin(render(kube_bin_dir, *VALUE_SETS["nvidia-runtime-class-privileged-ascend"]))
    assert pod["runtimeClassName"] == "nvidia"
    ctx = pod["containers"][0]["securityContext"]
    assert ctx["privileged"] is True and "allowPrivilegeEscalation" not in ctx  # the API refuses both
    # Simulated: no vendor mounts or environment; the devices only when given.
    pod = device_plugin(render(kube_bin_dir, "--set", "devicePlugin.backend=simulated"))
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "VNPU_SIMULATED_DEVICES" not in env and "NVIDIA_VISIBLE_DEVICES" not in env  # plugin default
    assert not any(v["name"].startswith("ascend") for v in pod["volumes"])
    assert not any(a.startswith(("--npu-smi", "--ascend")) for a in container["args"])
    pod = device_plugin(
        render(kube_bin_dir, "--set", "devicePlugin.backend=auto", "--set", "devicePlugin.fallback=simulated",
               "--set", "devicePlugin.simulatedDevices=4x8192")
    )  # fmt: skip
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["VNPU_SIMULATED_DEVICES"] == "4x8192" and env["NVIDIA_VISIBLE_DEVICES"] == "all"


@pytest.mark.parametrize(
    ("setting", "path"),
    [
        ("devicePlugin.fallback=sometimes", "/devicePlugin/fallback"),
        ("devicePlugin.simulatedDevices=two", "/devicePlugin/simulatedDevices"),
        ("devicePlugin.ascend.npuSmi=npu-smi", "/devicePlugin/ascend/npuSmi"),
        ("devicePlugin.nvidia.runtimeClassName=Not_A_Name", "/devicePlugin/nvidia/runtimeClassName"),
    ],
)
def test_values_schema_refuses_bad_backend_settings(kube_bin_dir, setting, path) -> None:
    proc = helm(kube_bin_dir, "template", "x", str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0 and path in proc.stderr, proc.stderr


def test_helm_install_into_the_real_apiserver(control_plane, kube_bin_dir) -> None:
    kc = str(control_plane.kubeconfig)
    # Other tests applied the chart's PriorityClass outside Helm (for operators they run without it);
    # Helm refuses to adopt an object it did not create (docs/troubleshooting.md): start clean.
    control_plane.kubectl("delete", "priorityclass", "vnpu-placeholder", "--ignore-not-found")
    # The chart's admission policy is on by default: an admin's vnpu pod is refused while it is installed.
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "namespace": "vnpu-chart"},
        "spec": {
            "containers": [{"name": "c", "image": "x", "resources": {"limits": {"vnpu.io/memory-0": "1"}}}]
        },
    }

    def admin_may_create() -> bool:
        out = control_plane.kubectl(
            "create", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False
        )
        return out.returncode == 0

    proc = helm(
        kube_bin_dir,
        "install",
        "vnpu-install-test",
        str(CHART),
        "-n",
        "vnpu-chart",
        "--create-namespace",
        "--kubeconfig",
        kc,
        "--set",
        "devicePlugin.backend=simulated",
        "--wait=false",
    )
    assert "STATUS: deployed" in proc.stdout
    assert "kubectl get infm" in proc.stdout  # NOTES.txt
    try:
        names = control_plane.kubectl("get", "deploy,ds,sa", "-n", "vnpu-chart", "-o", "name").stdout.split()
        assert {
            "deployment.apps/vnpu-install-test-operator",
            "daemonset.apps/vnpu-install-test-device-plugin",
        } <= set(names)
        assert "vnpu-placeholder" in control_plane.kubectl("get", "priorityclass", "-o", "name").stdout
        crd = control_plane.kubectl("get", "crd", f"{api.PLURAL}.{api.GROUP}", "-o", "name").stdout
        assert crd.strip() == f"customresourcedefinition.apiextensions.k8s.io/{api.PLURAL}.{api.GROUP}"
        wait_until(lambda: not admin_may_create(), 30, "the chart's admission policy enforced")
        policies = control_plane.kubectl("get", "validatingadmissionpolicies", "-o", "name").stdout.split()
        assert {
            "validatingadmissionpolicy.admissionregistration.k8s.io/vnpu-install-test-operator-only-pods",
            "validatingadmissionpolicy.admissionregistration.k8s.io/vnpu-install-test-device-plugin-own-node",
        } <= set(policies)
    finally:
        helm(kube_bin_dir, "uninstall", "vnpu-install-test", "-n", "vnpu-chart", "--kubeconfig", kc)
        # Gone with the release: later tests (operators running as the admin) create vnpu pods again.
        wait_until(admin_may_create, 30, "the chart's admission policy removed")


def operator_args(kube_bin_dir, *values: str) -> list[str]:
    """The operator container's arguments, as the chart renders them with ``values``."""
    (deployment,) = [
        d
        for d in render(kube_bin_dir, *values)
        if d["kind"] == "Deployment" and "operator" in d["metadata"]["name"]
    ]
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_defragmentation_reaches_the_operator_with_its_batch_size(kube_bin_dir) -> None:
    assert not any(a.startswith("--defragment") for a in operator_args(kube_bin_dir))  # sticky by default
    args = operator_args(
        kube_bin_dir, "--set", "operator.defragment=true", "--set", "operator.defragmentMaxMoves=3"
    )
    assert "--defragment" in args and "--defragment-max-moves=3" in args
    proc = helm(
        kube_bin_dir, "template", "x", str(CHART), "--set", "operator.defragmentMaxMoves=0", check=False
    )
    assert proc.returncode != 0 and "/operator/defragmentMaxMoves" in proc.stderr


def test_preemption_scope_reaches_the_operator_and_defaults_to_the_namespace(kube_bin_dir) -> None:
    assert "--preemption=namespace" in operator_args(kube_bin_dir)
    assert "--preemption=cluster" in operator_args(kube_bin_dir, "--set", "operator.preemption=cluster")
    proc = helm(kube_bin_dir, "template", "x", str(CHART), "--set", "operator.preemption=anyone", check=False)
    assert proc.returncode != 0 and "/operator/preemption" in proc.stderr


def test_network_policy_reaches_the_operator_with_the_gateways_pods_as_a_peer(kube_bin_dir) -> None:
    from vnpu.operator.main import build_parser, config_from_args

    assert not any(a.startswith("--network-policy") for a in operator_args(kube_bin_dir))  # off by default
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    args = operator_args(
        kube_bin_dir, "--set", "operator.networkPolicy.enabled=true",
        "--set-json", f"operator.networkPolicy.from=[{json.dumps(monitoring)}]",
    )  # fmt: skip
    # The chart's arguments are the operator's own: parsed by its command line as the pod would be.
    assert args[:2] == ["vnpu", "operator"]
    config = config_from_args(build_parser().parse_args(args[2:]))
    (gateway,) = [
        d for d in render(kube_bin_dir) if d["kind"] == "Deployment" and "gateway" in d["metadata"]["name"]
    ]
    assert config.network_policy and config.network_policy_peers == (
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vnpu-system"}},
            "podSelector": {"matchLabels": gateway["spec"]["selector"]["matchLabels"]},  # its pods
        },
        monitoring,
    )
    no_gateway = operator_args(
        kube_bin_dir, "--set", "operator.networkPolicy.enabled=true", "--set", "gateway.enabled=false"
    )
    assert [a for a in no_gateway if a.startswith("--network-policy")] == ["--network-policy"]
    bad = '{"podSelector": {}, "ports": [80]}'
    proc = helm(
        kube_bin_dir,
        "template",
        "x",
        str(CHART),
        "--set-json",
        f"operator.networkPolicy.from=[{bad}]",
        check=False,
    )
    assert proc.returncode != 0 and "/operator/networkPolicy/from/0" in proc.stderr


def test_image_pull_secrets_reach_the_charts_pods_and_the_model_pods(kube_bin_dir) -> None:
    workloads = ("Deployment", "DaemonSet")
    plain = [d for d in render(kube_bin_dir) if d["kind"] in workloads]
    assert plain and all("imagePullSecrets" not in d["spec"]["template"]["spec"] for d in plain)
    assert not any(a.startswith("--image-pull-secret") for a in operator_args(kube_bin_dir))
    values = ("--set", "imagePullSecrets[0].name=regcred", "--set", "imagePullSecrets[1].name=mirror")
    pulled = [d for d in render(kube_bin_dir, *values) if d["kind"] in workloads]
    assert {d["metadata"]["name"] for d in pulled} == {d["metadata"]["name"] for d in plain}
    for d in pulled:
        assert d["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    args = operator_args(kube_bin_dir, *values)
    assert "--image-pull-secret=regcred" in args and "--image-pull-secret=mirror" in args
    proc = helm(
        kube_bin_dir, "template", "x", str(CHART), "--set", "imagePullSecrets[0].name=Reg_Cred", check=False
    )
    assert proc.returncode != 0 and "/imagePullSecrets/0/name" in proc.stderr, proc.stderr


def test_the_device_plugin_runs_on_tainted_accelerator_pools(kube_bin_dir) -> None:
    """GKE and AKS taint GPU pools nvidia.com/gpu: NoSchedule; a plugin that does not tolerate it never
    runs there, and no node advertises a slice."""
    (plugin,) = [d for d in render(kube_bin_dir) if d["kind"] == "DaemonSet"]
    tolerated = {(t["key"], t.get("effect")) for t in plugin["spec"]["template"]["spec"]["tolerations"]}
    assert {("vnpu.io/npu", "NoSchedule"), ("nvidia.com/gpu", "NoSchedule")} <= tolerated


def test_the_device_plugin_update_strategy_is_a_value(kube_bin_dir) -> None:
    """Operators of accelerator nodes update each node's plugin when they choose (OnDelete), as NVIDIA's
    and HAMi's charts let them. The default renders what the chart always did, so an upgrade leaves the
    DaemonSet of an existing install as it was."""

    def strategy(*values: str) -> dict[str, Any]:
        (ds,) = [d for d in render(kube_bin_dir, *values) if d["kind"] == "DaemonSet"]
        return dict(ds["spec"]["updateStrategy"])

    assert strategy() == {"type": "RollingUpdate"}
    assert strategy("--set", "devicePlugin.updateStrategy.type=OnDelete") == {"type": "OnDelete"}
    assert strategy("--set", "devicePlugin.updateStrategy.rollingUpdate.maxUnavailable=10%") == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "10%"},
    }
    for setting, refusal in [
        ("devicePlugin.updateStrategy.type=Recreate", "/devicePlugin/updateStrategy/type"),
        ("devicePlugin.updateStrategy.rollingUpdate.maxUnavailable=150%", "/rollingUpdate/maxUnavailable"),
        ("devicePlugin.updateStrategy.rollingUpdate.maxUnavailable=-1", "/rollingUpdate/maxUnavailable"),
        ("devicePlugin.updateStrategy.rollingUpdate.maxUnavailable=one", "/rollingUpdate/maxUnavailable"),
        # Two plugins on a node would bind the same sockets and write one checkpoint.
        ("devicePlugin.updateStrategy.rollingUpdate.maxSurge=1", "a surge starts a node's new plugin"),
    ]:
        proc = helm(kube_bin_dir, "template", "x", str(CHART), "--set", setting, check=False)
        assert proc.returncode != 0 and refusal in proc.stderr, (setting, proc.stderr)


def test_the_kubelet_probes_the_device_plugins_healthz_on_its_metrics_port(kube_bin_dir) -> None:
    """The plugin's /healthz fails once its kubelet watch loop or its device health monitor has made no
    progress for a minute (tests/device_plugin: test_healthz_fails_while_a_loop_of_the_plugin_is_hung);
    the kubelet probes it on the metrics port, the only port the plugin serves."""
    (plugin,) = [d for d in render(kube_bin_dir) if d["kind"] == "DaemonSet"]
    (container,) = plugin["spec"]["template"]["spec"]["containers"]
    probe = container["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {"name": "metrics", "containerPort": 9465} in container["ports"]
    # Three misses 20 s apart: a plugin starting (journal load, first reconcile) is not killed.
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 60
