"""The operator's informer against the real API server: an object its parser cannot read (input
nobody foresaw, or a bug) neither blinds it to every other object nor looks deleted."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Mapping
from typing import Any

from kubernetes import client

from vnpu.cluster.processes import wait_until
from vnpu.operator.cache import Informer


def parse(obj: Mapping[str, Any]) -> tuple[str, str]:
    data = obj.get("data") or {}
    if "bad" in data:
        raise ValueError("a value this parser never expected")
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}", data.get("v", "")


def test_an_unparseable_object_keeps_what_was_known_and_blinds_nothing(control_plane, namespace) -> None:
    core = client.CoreV1Api(control_plane.api_client())

    def config_map(name: str, **data: str) -> None:
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace}}
        control_plane.kubectl("apply", "-f", "-", input=json.dumps({**body, "data": data}))

    config_map("a", v="1")
    changed: list[str] = []
    informer: Informer[str] = Informer(
        "configmaps", functools.partial(core.list_namespaced_config_map, namespace), parse, changed.append
    )
    informer.start()
    try:
        assert informer.synced.wait(30)
        assert informer.get(f"{namespace}/a") == "1"
        config_map("a", v="2", bad="yes")  # the watch delivers what the parser raises on
        config_map("b", v="3")
        wait_until(lambda: informer.get(f"{namespace}/b") == "3", 30, "a later object seen past the bad one")
        assert informer.get(f"{namespace}/a") == "1", "the object the parser failed on is kept, not dropped"
    finally:
        informer.stop()
    # A fresh informer whose first list meets it: it knew nothing of it, so it keeps nothing, and syncs.
    fresh: Informer[str] = Informer(
        "configmaps", functools.partial(core.list_namespaced_config_map, namespace), parse, changed.append
    )
    fresh.start()
    try:
        assert fresh.synced.wait(30)
        # (Only this test's objects: a controller-manager, once one runs, adds kube-root-ca.crt.)
        assert fresh.get(f"{namespace}/a") is None
        assert fresh.get(f"{namespace}/b") == "3"
    finally:
        fresh.stop()


def test_stop_ends_a_quiet_watch_now(control_plane, namespace) -> None:
    """Stopping shuts the open watch's socket down, so neither stop() nor the reader thread waits for
    the server's next bytes (on a quiet watch, a bookmark a minute or more later): the operator's
    shutdown, and with it the Lease's release, is not held up by it."""
    core = client.CoreV1Api(control_plane.api_client())
    informer: Informer[str] = Informer(
        "configmaps", functools.partial(core.list_namespaced_config_map, namespace), parse, lambda _: None
    )
    informer.start()
    assert informer.synced.wait(30)
    wait_until(lambda: informer._resp is not None, 30, "the watch open")  # (the informer's own field)
    stopping = threading.Thread(target=informer.stop, daemon=True)  # (closing a TLS stream can block)
    stopping.start()
    stopping.join(10)
    assert not stopping.is_alive(), "stop() waits for the server's next bytes on the watch"
    assert informer.join(10), "the informer's thread still waits on a watch it was told to stop"
