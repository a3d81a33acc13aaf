"""The plugin's per-device gRPC endpoints over their real unix sockets, driven by a Python client (the
Go harness drives them with the kubelet's code)."""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from dp_helpers import (
    TWO_DEVICES,
    FakePodResources,
    StreamWatcher,
    allocate,
    fake_npu_smi,
    preferred,
    scrape,
    wait_for,
    write_devices,
)

from vnpu.cluster.controlplane import free_port
from vnpu.cluster.processes import wait_until
from vnpu.device_plugin import contract
from vnpu.device_plugin.backends.ascend import AscendBackend
from vnpu.device_plugin.plugin import PluginRunner
from vnpu.device_plugin.proto import api_pb2, api_pb2_grpc

NPU0 = [f"npu0-s{i}" for i in range(4)]
NPU1 = [f"npu1-s{i}" for i in range(8)]


def test_one_endpoint_per_device_each_listing_only_its_slices(run_plugin, stub_for):
    runner = run_plugin()
    assert sorted(runner.endpoints) == ["vnpu.io/memory-0", "vnpu.io/memory-1"]
    assert sorted(p.name for p in runner.config.plugin_dir.glob("*.sock")) == [
        "vnpu-memory-0.sock",
        "vnpu-memory-1.sock",
    ]
    for index, slices, numa in ((0, NPU0, 0), (1, NPU1, 1)):
        stub = stub_for(runner, index)
        options = stub.GetDevicePluginOptions(api_pb2.Empty())
        assert options.get_preferred_allocation_available and not options.pre_start_required
        watcher = StreamWatcher(stub)
        _, devices = watcher.next()
        assert list(devices) == slices and set(devices.values()) == {"Healthy"}
        first = next(iter(stub.ListAndWatch(api_pb2.Empty())))
        assert {d.topology.nodes[0].ID for d in first.devices} == {numa}
        assert stub.PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=slices[:1])) is not None
        watcher.close()


def test_health_flips_reach_listandwatch_both_ways(run_plugin, stub_for, dirs):
    # Only the flips and their content are checked here; how fast they arrive (the bar: within 1 s at
    # the default 0.5 s poll) is measured by `vnpu bench device-plugin`, not asserted in a test.
    runner = run_plugin()
    sick_stream, well_stream = StreamWatcher(stub_for(runner, 1)), StreamWatcher(stub_for(runner, 0))
    sick_stream.next()
    well_stream.next()
    sick = [dict(TWO_DEVICES[0]), dict(TWO_DEVICES[1], health="Unhealthy", reason="HBM ECC errors")]
    write_devices(dirs.devices_file, sick)
    _, devices = sick_stream.next(timeout=10)
    assert set(devices) == set(NPU1) and set(devices.values()) == {"Unhealthy"}
    write_devices(dirs.devices_file, TWO_DEVICES)
    _, devices = sick_stream.next(timeout=10)
    assert set(devices.values()) == {"Healthy"}
    # The other device's stream never re-sent: nothing about npu0 changed.
    with pytest.raises(queue.Empty):
        well_stream.next(timeout=0.5)
    sick_stream.close()
    well_stream.close()


def test_allocate_is_a_function_of_the_device_alone(run_plugin, stub_for, dirs):
    runner = run_plugin(slice_mib=1024)
    resp = allocate(stub_for(runner, 1), ["npu1-s2", "npu1-s3", "npu1-s4"])
    assert dict(resp.envs) == {
        "ASCEND_VISIBLE_DEVICES": "1",
        contract.ENV_DEVICE: "npu1",
        contract.ENV_MEMORY_LIMIT_MIB: "3072",
        contract.ENV_SLICES: "3",
        contract.ENV_SLICE_MIB: "1024",
        contract.ENV_SOCKET_DIR: contract.SOCKET_DIR_IN_CONTAINER,
    }
    # The device's own socket directory, for every container on it; no /dev for simulated devices.
    socket_dir = dirs.socket_root / "npu1"
    assert [(m.host_path, m.container_path, m.read_only) for m in resp.mounts] == [
        (str(socket_dir), contract.SOCKET_DIR_IN_CONTAINER, False)
    ]
    assert socket_dir.is_dir() and socket_dir.stat().st_mode & 0o7777 == 0o1733
    assert not resp.devices
    # Asked again for other slices of the same size: the same answer but for the IDs' own values.
    again = allocate(stub_for(runner, 1), ["npu1-s5", "npu1-s6", "npu1-s7"])
    assert dict(again.envs) == dict(resp.envs) and list(again.mounts) == list(resp.mounts)


def test_allocate_refuses_other_devices_unknown_repeated_and_unhealthy(run_plugin, stub_for, dirs):
    runner = run_plugin()
    stub = stub_for(runner, 0)
    for ids, message in [
        (["npu0-s0", "npu1-s0"], "is a slice of npu1, not of npu0"),
        (["npu1-s0"], "is a slice of npu1, not of npu0"),
        (["npu7-s0"], "unknown device ID"),
        (["npu0-s1", "npu0-s1"], "repeats device IDs"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            allocate(stub, ids)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    assert runner.ledger.held() == {}  # nothing refused was recorded
    write_devices(
        dirs.devices_file, [TWO_DEVICES[0], dict(TWO_DEVICES[1], health="Unhealthy", reason="overheated")]
    )
    with pytest.raises(grpc.RpcError) as err:
        wait_for(lambda: allocate(stub_for(runner, 1), ["npu1-s0"]) and False, timeout=15)
    assert "npu1 is unhealthy: overheated" in err.value.details()


def allocate_all(stub, *containers: list[str]) -> api_pb2.AllocateResponse:
    return stub.Allocate(
        api_pb2.AllocateRequest(
            container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids) for ids in containers]
        )
    )


def test_a_slice_asked_for_by_two_containers_of_one_allocate_is_refused(run_plugin, stub_for):
    runner = run_plugin()
    stub = stub_for(runner, 0)
    with pytest.raises(grpc.RpcError) as err:
        allocate_all(stub, ["npu0-s0", "npu0-s1"], ["npu0-s1", "npu0-s2"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'npu0-s1'" in err.value.details()
    assert runner.ledger.held() == {}
    resp = allocate_all(stub, ["npu0-s0", "npu0-s1"], ["npu0-s2"])  # distinct slices: one each
    assert len(resp.container_responses) == 2
    assert {sid: a.slices for sid, a in runner.ledger.held().items()} == {
        "npu0-s0": ("npu0-s0", "npu0-s1"),
        "npu0-s1": ("npu0-s0", "npu0-s1"),
        "npu0-s2": ("npu0-s2",),
    }


def test_a_refused_allocate_records_none_of_its_containers(run_plugin, stub_for):
    runner = run_plugin()
    stub = stub_for(runner, 0)
    with pytest.raises(grpc.RpcError) as err:
        allocate_all(stub, ["npu0-s3"], ["npu1-s0"])  # the second container is refused
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert runner.ledger.held() == {}  # the first left no phantom entry


def test_preferred_allocation_prefers_free_slices_by_index(run_plugin, stub_for):
    runner = run_plugin()
    stub = stub_for(runner, 1)
    assert preferred(stub, NPU1, 3) == ["npu1-s0", "npu1-s1", "npu1-s2"]
    assert preferred(stub, NPU1, 2, must=["npu1-s7"]) == ["npu1-s7", "npu1-s0"]
    allocate(stub, ["npu1-s0", "npu1-s1"])
    # The ledger still holds s0/s1 (the kubelet offers them after a pod ended, before reconcile).
    assert preferred(stub, NPU1, 2) == ["npu1-s2", "npu1-s3"]
    assert preferred(stub, ["npu1-s0", "npu1-s1", "npu1-s2"], 3) == ["npu1-s2", "npu1-s0", "npu1-s1"]


def test_a_device_appearing_later_gets_its_own_endpoint(run_plugin, stub_for, dirs):
    runner = run_plugin(devices=[TWO_DEVICES[0]], health_interval_s=0.1)
    assert sorted(runner.endpoints) == ["vnpu.io/memory-0"]
    write_devices(dirs.devices_file, TWO_DEVICES)
    wait_for(lambda: "vnpu.io/memory-1" in runner.endpoints, timeout=5, what="an endpoint for npu1")
    assert preferred(stub_for(runner, 1), NPU1, 1) == ["npu1-s0"]


def test_two_devices_with_one_index_never_share_a_resource(run_plugin):
    clash = [dict(TWO_DEVICES[0]), dict(TWO_DEVICES[1], index=0)]
    runner = run_plugin(devices=clash)
    for _ in range(3):  # ownership must hold on every later poll of the same report, not only the first
        runner.monitor.poll_once()
        assert sorted(runner.endpoints) == ["vnpu.io/memory-0"]
        assert runner.endpoints["vnpu.io/memory-0"].device_id == "npu0"
        npu0, npu1 = runner.table.entry("npu0"), runner.table.entry("npu1")
        assert npu0 is not None and npu0.healthy
        assert npu1 is not None and not npu1.healthy and "index 0 is already npu0's" in npu1.reason


def test_a_restarted_plugin_keeps_a_contested_index_with_the_device_its_pods_hold(dirs, stub_for):
    """npu1 had index 0 alone (npu0 came later, with the same index) and a pod holds its slices: after a
    restart, vnpu.io/memory-0 must still be npu1's, not go to the device whose ID sorts first."""
    write_devices(dirs.devices_file, [dict(TWO_DEVICES[1], index=0)])
    with PluginRunner(dirs.config()) as first:
        allocate(stub_for(first), ["npu1-s0"])
    write_devices(dirs.devices_file, [dict(TWO_DEVICES[0]), dict(TWO_DEVICES[1], index=0)])
    with PluginRunner(dirs.config()) as second:
        assert second.endpoints["vnpu.io/memory-0"].device_id == "npu1"
        npu0 = second.table.entry("npu0")
        assert npu0 is not None and not npu0.healthy and "index 0 is already npu1's" in npu0.reason


def test_a_device_whose_endpoint_cannot_be_set_up_neither_stops_the_start_nor_the_others(
    run_plugin, stub_for, caplog
):
    caplog.set_level(logging.INFO, logger="vnpu.device_plugin.plugin")
    bad = {"id": "..", "index": 1, "memory_mib": 8192}  # malformed backend output: no directory name
    runner = run_plugin(devices=[TWO_DEVICES[0], bad])
    assert sorted(runner.endpoints) == ["vnpu.io/memory-0"]
    assert preferred(stub_for(runner, 0), NPU0, 1) == ["npu0-s0"]
    # The kubelet restarts and wipes the sockets: the good device is served again although the bad
    # one is still there (and still failing on every look).
    socket = runner.endpoints["vnpu.io/memory-0"].socket_path
    socket.unlink()
    wait_for(socket.exists, timeout=5, what="npu0's socket served again")
    assert preferred(stub_for(runner, 0), NPU0, 1) == ["npu0-s0"]
    assert sorted(runner.endpoints) == ["vnpu.io/memory-0"]
    failure = "serving vnpu.io/memory-1 for device '..' failed; will retry"
    assert caplog.text.count(failure) == 1  # logged once, not on every look
    assert "device id '..' cannot name a directory" in caplog.text


def test_a_device_served_later_once_its_socket_directory_can_be_made(run_plugin, stub_for, dirs):
    runner = run_plugin(devices=[TWO_DEVICES[0]], health_interval_s=0.1)
    dirs.socket_root.joinpath("npu1").write_text("stray")  # npu1's socket directory cannot be created
    write_devices(dirs.devices_file, TWO_DEVICES)
    wait_for(lambda: runner.table.entry("npu1"), timeout=5, what="npu1 in the device table")
    socket = runner.endpoints["vnpu.io/memory-0"].socket_path
    socket.unlink()
    wait_for(socket.exists, timeout=5, what="npu0's socket served again while npu1 cannot be served")
    assert sorted(runner.endpoints) == ["vnpu.io/memory-0"]
    dirs.socket_root.joinpath("npu1").unlink()
    wait_for(lambda: "vnpu.io/memory-1" in runner.endpoints, timeout=5, what="npu1 served on a later look")
    assert preferred(stub_for(runner, 1), NPU1, 1) == ["npu1-s0"]
    assert preferred(stub_for(runner, 0), NPU0, 1) == ["npu0-s0"]


class FakeNodes:
    """The two calls the node annotator makes, on one node held in memory."""

    def __init__(self) -> None:
        self.annotations: dict[str, str] = {}

    def read_node(self, name: str, **_: object) -> object:
        from types import SimpleNamespace

        return SimpleNamespace(metadata=SimpleNamespace(annotations=dict(self.annotations)))

    def patch_node(self, name: str, body: dict, **_: object) -> None:
        self.annotations.update(body["metadata"]["annotations"])

    def health(self) -> dict[str, tuple[str, str]]:
        from vnpu.api import ANNOTATION_DEVICES
        from vnpu.inventory import NodeInventory

        text = self.annotations.get(ANNOTATION_DEVICES)
        devices = NodeInventory.from_json(text).devices if text else ()
        return {d.id: (d.health, d.reason) for d in devices}


def test_a_device_the_kubelet_was_not_offered_is_annotated_unhealthy_until_it_is(dirs):
    """The operator plans from the annotation: a device whose endpoint could not be set up has no
    resource on the node, so it must not look Healthy there (its pods would only stay Pending)."""
    nodes = FakeNodes()
    dirs.socket_root.mkdir(parents=True, exist_ok=True)
    dirs.socket_root.joinpath("npu1").write_text("stray")  # npu1's socket directory cannot be created
    write_devices(dirs.devices_file, TWO_DEVICES)
    runner = PluginRunner(dirs.config(node_name="n1", health_interval_s=0.1), core_api=nodes).start()
    try:
        wait_for(
            lambda: nodes.health().get("npu1", ("",))[0] == "Unhealthy", timeout=5, what="npu1 Unhealthy"
        )
        _, reason = nodes.health()["npu1"]
        assert reason.startswith("not offered to the kubelet: FileExistsError: ") and "npu1" in reason
        assert nodes.health()["npu0"] == ("Healthy", "")
        assert sorted(runner.endpoints) == ["vnpu.io/memory-0"]
        dirs.socket_root.joinpath("npu1").unlink()
        wait_for(
            lambda: "vnpu.io/memory-1" in runner.endpoints, timeout=5, what="npu1 served on a later look"
        )
        wait_for(lambda: nodes.health()["npu1"] == ("Healthy", ""), timeout=5, what="npu1 annotated Healthy")
    finally:
        runner.stop()


def test_an_endpoint_that_cannot_be_served_again_does_not_keep_the_others_down(
    run_plugin, stub_for, monkeypatch
):
    runner = run_plugin()
    first, second = (runner.endpoints[f"vnpu.io/memory-{i}"] for i in (0, 1))

    def disk_full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(first, "serve", disk_full)
    first.socket_path.unlink()
    second.socket_path.unlink()  # a kubelet restart wipes every socket
    wait_for(second.socket_path.exists, timeout=5, what="npu1's socket served again")
    assert preferred(stub_for(runner, 1), NPU1, 1) == ["npu1-s0"]
    assert not first.socket_path.exists()
    monkeypatch.undo()  # space again: npu0 is served on a later look
    wait_for(first.socket_path.exists, timeout=5, what="npu0's socket served again")
    assert preferred(stub_for(runner, 0), NPU0, 1) == ["npu0-s0"]


def test_malformed_backend_output_marks_devices_unhealthy_and_the_plugin_keeps_serving(
    run_plugin, stub_for, dirs, caplog
):
    caplog.set_level(logging.WARNING, logger="vnpu.device_plugin.devices")
    stub = stub_for(run_plugin(health_interval_s=0.1, backend_error_grace_s=0))  # (grace: test_dp_devices)
    watcher = StreamWatcher(stub)
    watcher.next()
    dirs.devices_file.write_text("devices: [{memory_mib: lots}]\n")
    _, devices = watcher.next(timeout=3)
    assert set(devices.values()) == {"Unhealthy"} and list(devices) == NPU0  # same IDs, now unhealthy
    # The poll logs the transition right after it woke the streams: wait for the line, not only the stream.
    wait_for(lambda: "became unhealthy: simulated config device #0 is malformed" in caplog.text)
    assert stub.GetDevicePluginOptions(api_pb2.Empty()).get_preferred_allocation_available  # still serving
    write_devices(dirs.devices_file, TWO_DEVICES)
    _, devices = watcher.next(timeout=3)
    assert set(devices.values()) == {"Healthy"}
    watcher.close()


def test_ascend_payload_has_device_nodes(dirs, tmp_path, stub_for):
    backend = AscendBackend(npu_smi=str(fake_npu_smi(tmp_path, "910b-8x-info.txt")), sysfs_root=tmp_path)
    with PluginRunner(dirs.config(backend="ascend", slice_mib=4096), backend=backend) as runner:
        assert len(runner.endpoints) == 8
        stub = stub_for(runner, 6)
        first = next(iter(stub.ListAndWatch(api_pb2.Empty())))
        assert len(first.devices) == 16  # 64 GiB HBM in 4 GiB slices
        resp = allocate(stub, ["npu6-s0", "npu6-s1"])
    assert resp.envs["ASCEND_VISIBLE_DEVICES"] == "6" and resp.envs[contract.ENV_MEMORY_LIMIT_MIB] == "8192"
    assert [(d.host_path, d.container_path, d.permissions) for d in resp.devices] == [
        (p, p, "rw") for p in ("/dev/davinci6", "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc")
    ]


def test_metrics(run_plugin, stub_for, dirs):
    port = free_port()
    runner = run_plugin(devices=[dict(TWO_DEVICES[0], used_mib=100), TWO_DEVICES[1]], metrics_port=port)
    assert runner.metrics_port == port
    stub = stub_for(runner, 1)
    allocate(stub, ["npu1-s0", "npu1-s1", "npu1-s2"])
    with pytest.raises(grpc.RpcError):
        allocate(stub, ["npu0-s0", "npu1-s3"])
    m = scrape(port)
    label = '{device="npu1",model="sim-910B"}'
    assert m[f"vnpu_device_slices_total{label}"] == 8
    assert m[f"vnpu_device_slices_allocated{label}"] == 3
    assert m[f"vnpu_device_slices_free{label}"] == 5
    assert m[f"vnpu_device_healthy{label}"] == 1
    assert m['vnpu_device_memory_used_bytes{device="npu0",model="sim-910B"}'] == 100 * 1024 * 1024
    assert m['vnpu_device_memory_total_bytes{device="npu0",model="sim-910B"}'] == 4096 * 1024 * 1024
    assert m["vnpu_allocate_duration_seconds_count"] == 2
    assert m["vnpu_allocate_errors_total"] == 1


def _healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


@pytest.mark.parametrize("loop", ["kubelet watch", "device health"])
def test_healthz_fails_while_a_loop_of_the_plugin_is_hung(run_plugin, loop: str) -> None:
    """The liveness probe's endpoint: 200 while the kubelet watch loop (sockets, registration,
    reconcile) and the device health monitor make progress; 503 naming the loop once one has made none
    for ``stall_s`` (a deadlock, a driver call that never returns); 200 again when it resumes. The
    metrics endpoint alone answered 200 from its own thread whatever the loops did."""
    port = free_port()
    runner = run_plugin(metrics_port=port, stall_s=0.5, health_interval_s=0.05)
    assert _healthz(port) == (200, "ok\n")
    hung, resume = threading.Event(), threading.Event()
    owner, name = (runner, "_add_endpoints") if loop == "kubelet watch" else (runner.backend, "discover")
    works = getattr(owner, name)

    def stuck() -> object:
        hung.set()
        resume.wait(30)
        return works()

    setattr(owner, name, stuck)
    assert hung.wait(5)
    wait_until(lambda: _healthz(port)[0] == 503, 5, "/healthz to fail")
    _, text = _healthz(port)
    assert f"the {loop} " in text and "hung" in text, text
    assert "vnpu_kubelet_registrations_total" in scrape(port)  # metrics still served meanwhile
    setattr(owner, name, works)
    resume.set()
    wait_until(lambda: _healthz(port) == (200, "ok\n"), 5, "/healthz to pass again")


def test_plugin_restart_restores_allocations_from_the_checkpoint(dirs, stub_for):
    write_devices(dirs.devices_file, TWO_DEVICES)
    with PluginRunner(dirs.config()) as first:
        allocate(stub_for(first), ["npu0-s0", "npu0-s1"])
    with PluginRunner(dirs.config()) as second:
        assert sorted(second.ledger.held()) == ["npu0-s0", "npu0-s1"]
        # A new 2-slice request avoids the held slices although the (restarted) kubelet offers them.
        assert preferred(stub_for(second), NPU0, 2) == ["npu0-s2", "npu0-s3"]


def test_stop_removes_the_sockets_and_wakes_streams(run_plugin, stub_for):
    runner = run_plugin()
    watcher = StreamWatcher(stub_for(runner))
    watcher.next()
    started = time.monotonic()
    runner.stop()
    watcher.thread.join(5)
    assert not watcher.thread.is_alive() and time.monotonic() - started < 5
    assert not list(runner.config.plugin_dir.glob("*.sock"))


def test_a_removed_socket_is_served_again_once_and_stays(run_plugin, stub_for, caplog):
    # The kubelet deletes plugin sockets when it starts. gRPC unlinks a server's socket path when
    # that server stops, so the old server must be gone before the new one binds the same path.
    caplog.set_level(logging.WARNING, logger="vnpu.device_plugin.plugin")
    runner = run_plugin()
    socket = runner.endpoints["vnpu.io/memory-1"].socket_path
    socket.unlink()
    wait_for(socket.exists, timeout=5, what="socket served again")
    time.sleep(1.0)  # several watch intervals: the new socket must survive the old server's shutdown
    assert socket.exists()
    assert caplog.text.count("plugin socket disappeared") == 1
    assert stub_for(runner, 1).GetDevicePluginOptions(api_pb2.Empty()).get_preferred_allocation_available


def test_an_allocate_the_journal_cannot_take_fails_clearly_and_records_nothing(dirs, stub_for, caplog):
    """A journal write that failed (a full disk) reached the kubelet as UNKNOWN with only grpc's
    traceback in the log, vnpu_allocate_errors stayed 0, and the ledger kept the slices of the
    Allocate that failed. Now: INTERNAL naming the journal, an ERROR line, the counter, nothing held."""
    port = free_port()
    write_devices(dirs.devices_file, TWO_DEVICES)
    with PluginRunner(dirs.config(metrics_port=port)) as runner:
        stub = stub_for(runner)
        journal = runner.ledger.journal
        journal.unlink(missing_ok=True)
        journal.mkdir()  # the journal cannot be opened: stands in for any write error
        with pytest.raises(grpc.RpcError) as err:
            allocate_all(stub, ["npu0-s0"], ["npu0-s1", "npu0-s2"])
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert str(journal) in err.value.details() and "--state-dir" in err.value.details()
        assert runner.ledger.held() == {}
        assert scrape(port)["vnpu_allocate_errors_total"] == 1
        (line,) = [r for r in caplog.records if r.getMessage().startswith("Allocate failed")]
        assert line.levelno == logging.ERROR and line.path == str(journal)
        journal.rmdir()  # space again: the next Allocate is recorded
        allocate(stub, ["npu0-s3"])
        assert sorted(runner.ledger.held()) == ["npu0-s3"]
    with PluginRunner(dirs.config()) as restarted:
        assert sorted(restarted.ledger.held()) == ["npu0-s3"]


def test_a_list_that_leaves_out_running_pods_after_a_restart_releases_nothing(run_plugin, stub_for, dirs):
    """A kubelet that has just restarted serves pod-resources before it has loaded its pods: its List
    left out a pod that still ran, and the plugin released that pod's slices at once. Now a slice
    goes only once every List for the grace period has left it out, and not within a grace period
    of a new pod-resources socket (a kubelet restart)."""
    kubelet = FakePodResources(dirs.pod_resources_socket)
    try:
        runner = run_plugin(release_grace_s=1.0, reconcile_interval_s=3600)
        allocate(stub_for(runner), ["npu0-s0", "npu0-s1"])
        kubelet.holders = {"llm-0": ["npu0-s0", "npu0-s1"]}
        runner.reconcile()
        time.sleep(1.0)  # the allocation is older than the grace period
        kubelet.holders = {}  # the kubelet's pod manager is not filled yet
        runner.reconcile()
        assert sorted(runner.ledger.held()) == ["npu0-s0", "npu0-s1"]
        kubelet.holders = {"llm-0": ["npu0-s0", "npu0-s1"]}
        runner.reconcile()
        assert {a.source for a in runner.ledger.held().values()} == {"allocate"}  # the same allocation

        kubelet.holders = {}
        runner.reconcile()  # missing from now on
        time.sleep(0.6)
        kubelet.restart()  # a kubelet restart: a new socket, and a List without the pod for a while
        runner.reconcile()  # releases held for the grace period from here
        time.sleep(0.6)
        runner.reconcile()
        assert sorted(runner.ledger.held()) == ["npu0-s0", "npu0-s1"]  # missing for 1.2 s, but held
        time.sleep(0.6)
        runner.reconcile()  # the hold is over: a grace period starts
        assert sorted(runner.ledger.held()) == ["npu0-s0", "npu0-s1"]
        time.sleep(1.1)
        runner.reconcile()  # the pod is really gone
        assert runner.ledger.held() == {}
    finally:
        kubelet.stop()


def test_a_pod_resources_socket_first_seen_after_the_start_holds_releases(run_plugin, stub_for, dirs):
    """A plugin started while the kubelet restarts too (a node upgrade) saw no socket, then took the
    new kubelet's for one it knew: that kubelet's first Lists, made before it has loaded its pods,
    released the slices of a pod that still runs once the grace period was over."""
    runner = run_plugin(release_grace_s=2.0, reconcile_interval_s=3600)
    allocate(stub_for(runner), ["npu0-s0", "npu0-s1"])
    runner.reconcile()  # no socket yet: the kubelet is starting
    time.sleep(2.1)  # the allocation is older than the grace period
    kubelet = FakePodResources(dirs.pod_resources_socket)  # up, its pods not loaded yet
    try:
        for _ in range(6):  # left out for 2.5 s: past the grace period, within the hold and a grace
            runner.reconcile()
            time.sleep(0.5)
        assert sorted(runner.ledger.held()) == ["npu0-s0", "npu0-s1"]
        kubelet.holders = {"llm-0": ["npu0-s0", "npu0-s1"]}  # loaded
        runner.reconcile()
        assert sorted(runner.ledger.held()) == ["npu0-s0", "npu0-s1"]
    finally:
        kubelet.stop()


def test_a_missing_pod_resources_socket_is_logged_once_each_way_and_shows_in_the_metrics(
    run_plugin, dirs, caplog
):
    """A missing pod-resources socket (a wrong kubelet root, a missing mount) was silent: nothing was
    ever released and nothing said so. Now one warning when it goes, one line when it is back, and a
    gauge of the last reconcile's time."""
    caplog.set_level(logging.INFO, logger="vnpu.device_plugin.plugin")
    port = free_port()
    run_plugin(reconcile_interval_s=0.05, metrics_port=port)
    sock = str(dirs.pod_resources_socket)

    def lines(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if text in r.getMessage()]

    time.sleep(0.5)  # some ten reconciles
    (missing,) = lines("cannot reconcile allocations with the kubelet's pod-resources API")
    assert missing.levelno == logging.WARNING and f"its socket {sock} does not exist" in missing.getMessage()
    assert scrape(port)["vnpu_pod_resources_last_reconcile_timestamp_seconds"] == 0
    kubelet = FakePodResources(dirs.pod_resources_socket)
    try:
        wait_for(
            lambda: lines("pod-resources API answers again"), timeout=5, what="the line saying it is back"
        )
        reconciled = scrape(port)["vnpu_pod_resources_last_reconcile_timestamp_seconds"]
        assert time.time() - 5 < reconciled <= time.time()
        wait_for(lambda: kubelet.lists > 5, timeout=5, what="more reconciles")
        assert len(lines("answers again")) == 1
    finally:
        kubelet.stop()

    # A warning again. A reconcile whose List was under way when the socket went may warn first that
    # the List failed; then the missing socket, once.
    def missing_again() -> bool:
        warnings = lines("cannot reconcile allocations")
        return len(warnings) >= 2 and "does not exist" in warnings[-1].getMessage()

    wait_for(missing_again, timeout=5, what="a warning again")
    warned = len(lines("cannot reconcile allocations"))
    time.sleep(0.3)
    assert warned in (2, 3) and len(lines("cannot reconcile allocations")) == warned


class FakeRegistration(api_pb2_grpc.RegistrationServicer):
    """The kubelet's Registration service on ``kubelet.sock``: accepts every registration."""

    def __init__(self, socket_path) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.resources: list[str] = []
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        api_pb2_grpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{socket_path}")
        self.server.start()

    def Register(self, request, context) -> api_pb2.Empty:
        self.resources.append(request.resource_name)
        return api_pb2.Empty()


def test_registration_retries_back_off_and_are_logged_once_while_nothing_answers(
    run_plugin, dirs, monkeypatch, caplog
):
    """A kubelet killed with SIGKILL leaves kubelet.sock behind: each endpoint retried every 0.5 s
    and warned each time (136 warnings in 10 s for 8 devices). Now each backs off to 10 s and warns
    once; a new kubelet.sock (the kubelet started again) is still tried at once."""
    import socket as socket_module
    from collections import Counter

    from vnpu.device_plugin import registration

    caplog.set_level(logging.WARNING, logger="vnpu.device_plugin.plugin")
    kubelet_sock = dirs.plugin_dir / registration.KUBELET_SOCKET_NAME
    with socket_module.socket(socket_module.AF_UNIX) as stale:
        stale.bind(str(kubelet_sock))  # bound, never listening: connections are refused
    attempts: Counter[str] = Counter()
    real_register = registration.register

    def counted(plugin_dir, endpoint, resource_name, **kwargs):
        attempts[resource_name] += 1
        return real_register(plugin_dir, endpoint, resource_name, **kwargs)

    monkeypatch.setattr(registration, "register", counted)
    devices = [{"id": f"npu{i}", "memory_mib": 4096} for i in range(4)]
    runner = run_plugin(devices=devices)
    resources = sorted(runner.endpoints)
    time.sleep(4.0)
    assert sorted(attempts) == resources and max(attempts.values()) <= 4, attempts  # 0, 0.5, 1.5, 3.5 s
    warned = [r for r in caplog.records if r.getMessage().startswith("registration with the kubelet failed")]
    assert sorted(r.resource for r in warned) == resources  # once each

    kubelet_sock.unlink()
    kubelet = FakeRegistration(kubelet_sock)  # the kubelet is back: a new kubelet.sock
    try:
        started = time.monotonic()
        wait_for(lambda: sorted(kubelet.resources) == resources, timeout=5, what="every endpoint registered")
        assert time.monotonic() - started < 3.0  # not after the backoff (its next try: 7.5 s after the start)
        # The fake records a resource when the RPC arrives; the plugin counts it once the RPC returns.
        wait_for(lambda: runner.registrations == len(resources), timeout=5, what="registrations counted")
        time.sleep(0.5)
        assert runner.registrations == len(resources)  # and not again
    finally:
        kubelet.server.stop(0)
