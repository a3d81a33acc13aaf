"""Device backends: npu-smi parsing on recorded outputs, the simulated backend, NVML mapping, selection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dp_helpers import FIXTURES, fake_npu_smi

from vnpu.device_plugin.backends import BackendError, create_backend
from vnpu.device_plugin.backends.ascend import AscendBackend, parse_chip_map, parse_info, to_devices
from vnpu.device_plugin.backends.base import PhysicalDevice, read_numa_node
from vnpu.device_plugin.backends.nvidia import GpuReport, NvidiaBackend, to_device
from vnpu.device_plugin.backends.simulated import SimulatedBackend, parse_config, parse_spec
from vnpu.device_plugin.devices import DeviceTable
from vnpu.device_plugin.service import list_and_watch_response

NPU_SMI = FIXTURES / "npu-smi"


def fake_sysfs(root: Path, numa: dict[str, int]) -> Path:
    for bus_id, node in numa.items():
        d = root / "bus" / "pci" / "devices" / bus_id
        d.mkdir(parents=True)
        (d / "numa_node").write_text(f"{node}\n")
    return root


# --- ascend ------------------------------------------------------------------------------------------


def test_910b_info_gives_one_device_per_chip_with_hbm_size_and_logic_ids(tmp_path):
    chips = parse_info((NPU_SMI / "910b-8x-info.txt").read_text())
    chip_map = parse_chip_map((NPU_SMI / "910b-8x-info-m.txt").read_text())
    sysfs = fake_sysfs(tmp_path, {"0000:c1:00.0": 0, "0000:81:00.0": 1, "0000:c2:00.0": -1})
    devices = to_devices(chips, chip_map, sysfs)

    assert [d.id for d in devices] == [f"npu{i}" for i in range(8)]
    assert all(d.total_mib == 65536 and d.healthy and d.model == "Ascend 910B3" for d in devices)
    assert devices[2].used_mib == 24811  # HBM usage, not the 0/0 on-chip memory column
    assert [d.numa_node for d in devices[:3]] == [0, None, 1]  # -1 in sysfs means unknown
    assert chip_map[(3, 0)] == 3 and (3, 1) not in chip_map  # the MCU row has no logic id


def test_310p_duo_cards_use_the_device_column_and_memory_usage():
    chips = parse_info((NPU_SMI / "310p-duo-info.txt").read_text())
    devices = to_devices(chips, {}, "/nonexistent")
    assert [(d.id, d.total_mib, d.used_mib) for d in devices] == [
        ("npu0", 44280, 1725),
        ("npu1", 43693, 1588),
        ("npu2", 44280, 1690),
        ("npu3", 43693, 1566),
    ]
    assert {c.npu_id for c in chips} == {1, 2}


def test_alarm_and_unparseable_memory_make_only_those_devices_unhealthy_with_reasons():
    chips = parse_info((NPU_SMI / "910b-8x-info-degraded.txt").read_text())
    devices = {d.id: d for d in to_devices(chips, {}, "/nonexistent")}
    assert not devices["npu5"].healthy and "'Alarm'" in devices["npu5"].reason
    assert not devices["npu3"].healthy and devices["npu3"].total_mib is None
    assert "unparseable memory usage 'NA'" in devices["npu3"].reason
    assert sum(d.healthy for d in devices.values()) == 6


@pytest.mark.parametrize("text", ["", "command not found\n", (NPU_SMI / "garbled-info.txt").read_text()])
def test_output_without_a_device_table_raises(text):
    with pytest.raises(BackendError, match="npu-smi info"):
        parse_info(text)


def test_ascend_backend_runs_the_tool_and_describes_container_needs(tmp_path):
    backend = AscendBackend(npu_smi=str(fake_npu_smi(tmp_path, "910b-8x-info.txt")), sysfs_root=tmp_path)
    devices = backend.discover()
    assert len(devices) == 8
    assert backend.container_env(devices[3]) == {"ASCEND_VISIBLE_DEVICES": "3"}
    nodes = [(n.host_path, n.container_path) for n in backend.device_nodes(devices[3])]
    assert nodes == [
        (p, p) for p in ("/dev/davinci3", "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc")
    ]


def test_ascend_backend_reports_tool_failures(tmp_path):
    with pytest.raises(BackendError, match="exited 3: npu-smi: simulated failure"):
        AscendBackend(npu_smi=str(fake_npu_smi(tmp_path, "910b-8x-info.txt", exit_code=3))).discover()
    with pytest.raises(BackendError, match="failed"):
        AscendBackend(npu_smi=str(tmp_path / "missing-npu-smi")).discover()


def test_non_utf8_process_name_in_npu_smi_output_leaves_every_chip_healthy(tmp_path):
    # Any tenant can set its process name to arbitrary bytes; npu-smi prints it in the process table.
    recorded = (NPU_SMI / "910b-8x-info.txt").read_bytes()
    garbled = recorded.replace(b"python3.9               ", b"python3.9\xff\xfe             ")
    assert garbled != recorded
    info = tmp_path / "info-with-bytes.txt"
    info.write_bytes(garbled)
    devices = AscendBackend(npu_smi=str(fake_npu_smi(tmp_path, info)), sysfs_root=tmp_path).discover()
    assert [(d.id, d.healthy, d.reason) for d in devices] == [(f"npu{i}", True, "") for i in range(8)]


def test_numa_lookup_accepts_nvml_style_bus_ids(tmp_path):
    sysfs = fake_sysfs(tmp_path, {"0000:17:00.0": 1})
    assert read_numa_node("00000000:17:00.0", sysfs) == 1
    assert read_numa_node("0000:17:00.0", sysfs) == 1
    assert read_numa_node("0000:99:00.0", sysfs) is None


@pytest.mark.parametrize("node", [1024, 2**63, 99999999999999999999])
def test_a_numa_node_out_of_range_is_unknown_and_listandwatch_still_builds(tmp_path, caplog, node):
    sysfs = fake_sysfs(tmp_path, {"0000:17:00.0": node})
    from_sysfs = read_numa_node("0000:17:00.0", sysfs)
    (from_config,) = parse_config({"devices": [{"memory_mib": 1024, "numa_node": node}]})
    assert from_sysfs is None and from_config.numa_node is None
    assert "out of range" in caplog.text
    table = DeviceTable(512)
    table.update([PhysicalDevice("npu0", 0, "m", 1024, numa_node=from_sysfs), from_config])
    for device_id in ("npu0", from_config.id):
        response = list_and_watch_response(table.entry(device_id))  # raised ValueError: int64 overflow
        assert response.devices and not any(d.HasField("topology") for d in response.devices)
    assert read_numa_node("0000:17:00.0", fake_sysfs(tmp_path / "in-range", {"0000:17:00.0": 1023})) == 1023


# --- simulated -----------------------------------------------------------------------------------------


def test_spec_declares_equal_devices_spread_over_numa_nodes():
    devices = parse_spec("8x65536:2")
    assert [d.numa_node for d in devices] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert {d.total_mib for d in devices} == {65536}
    assert parse_spec("3x1024")[2].numa_node is None
    for bad in ("8", "0x1024", "2x1024:0", "ax3"):
        with pytest.raises(BackendError, match="spec"):
            parse_spec(bad)


def test_config_declares_ids_health_and_reasons():
    devices = parse_config(
        {
            "devices": [
                {"memory_mib": 1024},
                {
                    "id": "card-b",
                    "memory_mib": 2048,
                    "numa_node": 1,
                    "health": "Unhealthy",
                    "reason": "ECC storm",
                },
            ]
        }
    )
    assert devices[0].id == "npu0" and devices[0].healthy
    assert devices[1].id == "card-b" and not devices[1].healthy and devices[1].reason == "ECC storm"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "non-empty 'devices'"),
        ({"devices": [{"id": "x"}]}, "device #0 is malformed"),
        ({"devices": [{"memory_mib": 1, "health": "Meh"}]}, "health must be"),
        ({"devices": [{"memory_mib": 1, "id": "a"}, {"memory_mib": 1, "id": "a"}]}, "duplicate"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(doc, message):
    with pytest.raises(BackendError, match=message):
        parse_config(doc)


def test_simulated_backend_rereads_its_file_when_it_changes(tmp_path):
    path = tmp_path / "devices.yaml"
    path.write_text("devices:\n  - memory_mib: 2048\n")
    backend = SimulatedBackend(config_path=path)
    assert backend.discover()[0].healthy
    path.write_text("devices:\n  - memory_mib: 2048\n    health: Unhealthy\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert not backend.discover()[0].healthy
    path.write_text("devices: [unclosed\n")
    with pytest.raises(BackendError, match="not valid YAML"):
        backend.discover()
    path.unlink()
    with pytest.raises(BackendError, match="cannot read"):
        backend.discover()


# --- nvidia ----------------------------------------------------------------------------------------------


def test_nvml_reports_map_to_devices_and_errors_to_unhealthy(tmp_path):
    sysfs = fake_sysfs(tmp_path, {"0000:17:00.0": 0})
    ok = to_device(
        GpuReport(
            index=1,
            name="NVIDIA H100 80GB HBM3",
            uuid="GPU-1234",
            pci_bus_id="00000000:17:00.0",
            total_bytes=81559 * 1024 * 1024,
            used_bytes=512 * 1024 * 1024,
        ),
        sysfs,
    )
    assert (ok.id, ok.total_mib, ok.used_mib, ok.numa_node, ok.healthy) == ("gpu1", 81559, 512, 0, True)
    assert NvidiaBackend().container_env(ok) == {
        "NVIDIA_VISIBLE_DEVICES": "GPU-1234",
        "CUDA_VISIBLE_DEVICES": "GPU-1234",
    }
    bad = to_device(GpuReport(index=2, error="GPU is lost"))
    assert not bad.healthy and bad.reason == "NVML query failed: GPU is lost" and bad.total_mib is None


def test_nvidia_backend_without_nvml_fails_clearly():
    # This machine has no NVIDIA driver (and usually no nvidia-ml-py): discovery must say so, not crash.
    assert not NvidiaBackend.available()
    with pytest.raises(BackendError, match=r"nvidia-ml-py|NVML"):
        NvidiaBackend().discover()


def test_auto_never_selects_simulated_devices_unless_told(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npu-smi
    assert create_backend("auto").name == "none"
    assert create_backend("auto", spec="2x1024").discover() == []  # simulated options are not a request
    assert create_backend("auto", fallback="simulated", spec="2x1024").discover()[1].id == "npu1"
    monkeypatch.setenv("PATH", f"{fake_npu_smi(tmp_path, '910b-8x-info.txt').parent}:{os.environ['PATH']}")
    assert create_backend("auto").name == "ascend"
    with pytest.raises(ValueError, match="unknown backend"):
        create_backend("tpu")
    with pytest.raises(ValueError, match="unknown fallback"):
        create_backend("auto", fallback="maybe")
