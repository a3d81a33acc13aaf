"""The pure decisions of `vnpu up` on a real node: where each example goes, the host kubeconfig, the
chart values; and the loopback forwarder's byte pumping (the namespace hop is exercised end to end by
tests/e2e/test_main_job_up.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import yaml
from hypothesis import given
from hypothesis import strategies as st

from vnpu.cluster.forward import LoopbackForwarder
from vnpu.cluster.helm import local_node_values
from vnpu.cluster.up import (
    KWOK_TAINT,
    REPO_ROOT,
    choose_real_node,
    host_kubeconfig,
    route_to_nodes,
    weights_here,
)


def model(uri: str, placement: dict | None = None) -> dict:
    spec: dict = {"modelName": "m", "source": {"uri": uri}}
    if placement is not None:
        spec["placement"] = placement
    return {
        "apiVersion": "vnpu.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": "m"},
        "spec": spec,
    }


def test_weights_here_looks_in_the_local_claims_and_on_the_host(tmp_path: Path) -> None:
    (tmp_path / "pvc" / "models" / "a").mkdir(parents=True)
    (tmp_path / "pvc" / "models" / "a" / "w.gguf").write_bytes(b"x")
    assert weights_here("pvc://models/a/w.gguf", tmp_path / "pvc")
    assert not weights_here("pvc://models/a/missing.gguf", tmp_path / "pvc")
    assert not weights_here("pvc://models/a", tmp_path / "pvc")  # a directory is not a weights file
    assert weights_here(f"file://{tmp_path}/pvc/models/a/w.gguf", tmp_path / "pvc")
    assert not weights_here("hf://org/model@main", tmp_path / "pvc")  # up downloads nothing
    assert not weights_here("pvc://models/../../../etc/passwd", tmp_path / "pvc")  # escapes the claim


def test_models_with_local_weights_go_to_the_real_node_others_to_kwok(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.gguf").write_bytes(b"x")
    here = route_to_nodes(model("pvc://m/w.gguf", {"spreadAcrossNodes": True}), tmp_path, "vnpu-node")
    assert here["spec"]["placement"] == {
        "spreadAcrossNodes": True,
        "nodeSelector": {"kubernetes.io/hostname": "vnpu-node"},
    }
    away = route_to_nodes(model("hf://org/big@main"), tmp_path, "vnpu-node")
    assert away["spec"]["placement"]["nodeSelector"] == {"type": "kwok"}
    assert away["spec"]["placement"]["tolerations"] == [{**KWOK_TAINT, "operator": "Equal"}]


@given(
    selector=st.dictionaries(st.sampled_from(["zone", "team", "pool"]), st.text(min_size=1, max_size=5)),
    local=st.booleans(),
)
def test_routing_keeps_the_users_placement_and_never_mutates_the_input(selector: dict, local: bool) -> None:
    root = Path(REPO_ROOT)  # pyproject.toml is a file here: "pvc://pyproject.toml" counts as local
    original = model(
        "pvc://pyproject.toml" if local else "pvc://nothing/here", {"nodeSelector": dict(selector)}
    )
    before = yaml.safe_dump(original)
    routed = route_to_nodes(original, root, "vnpu-node")
    assert yaml.safe_dump(original) == before
    assert selector.items() <= routed["spec"]["placement"]["nodeSelector"].items()


def test_the_host_kubeconfig_points_at_the_loopback_forward() -> None:
    original = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "vnpu-local",
                "cluster": {"server": "https://10.0.0.1:443", "certificate-authority-data": "Q0E="},
            }
        ],
        "users": [{"name": "admin", "user": {"client-certificate-data": "Y2VydA=="}}],
    }
    rewritten = yaml.safe_load(host_kubeconfig(yaml.safe_dump(original), 40123))
    assert rewritten["clusters"][0]["cluster"] == {
        "server": "https://127.0.0.1:40123",
        "certificate-authority-data": "Q0E=",
    }
    assert rewritten["users"] == original["users"]


def test_kwok_is_chosen_when_asked() -> None:
    real, why = choose_real_node("kwok")
    assert not real and "as asked" in why


def test_local_node_values_are_the_defaults_plus_local_images_and_the_simulated_backend() -> None:
    values = local_node_values()
    assert values == {
        "image": {"repository": "local.test/vnpu", "tag": "dev", "pullPolicy": "Never"},
        "operator": {"placeholders": {"image": "local.test/pause:1"}},
        "devicePlugin": {"backend": "simulated"},
    }
    up = local_node_values(simulated_devices="3x8192", resync_seconds=10)  # vnpu up's node
    assert up["devicePlugin"] == {"backend": "simulated", "simulatedDevices": "3x8192"}
    assert up["operator"]["resyncSeconds"] == 10


def test_the_forwarder_copies_both_ways_and_closes() -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def echo_upper() -> None:
        conn, _ = upstream.accept()
        with conn:
            while data := conn.recv(4096):
                received.append(data)
                conn.sendall(data.upper())

    threading.Thread(target=echo_upper, daemon=True).start()
    forwarder = LoopbackForwarder().start(upstream.getsockname(), contextlib.nullcontext)
    try:
        with socket.create_connection(("127.0.0.1", forwarder.port), timeout=5) as client:
            client.sendall(b"hello through the node")
            reply = b""
            while len(reply) < len(b"hello through the node"):
                reply += client.recv(4096)
        assert reply == b"HELLO THROUGH THE NODE"
    finally:
        forwarder.close()
        upstream.close()
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", forwarder.port), timeout=1):
        raise AssertionError("the forwarder still accepts after close()")
