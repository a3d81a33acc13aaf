"""Backend selection on real nodes: ``auto`` finds Ascend (npu-smi, or the driver's DCMI library),
then NVIDIA (NVML), and otherwise advertises nothing and says why; simulated devices only on request.
The Ascend backend runs a fake ``npu-smi`` the test writes (the real one needs Ascend hardware)."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from dp_helpers import FIXTURES

from vnpu.device_plugin.backends.ascend import DRIVER_LIBRARY_DIRS, AscendBackend, npu_smi_environment
from vnpu.device_plugin.backends.base import create_backend, detect
from vnpu.device_plugin.main import backend_from_args, build_parser

RECORDED = FIXTURES / "npu-smi"


def write_npu_smi(path: Path, env_log: Path) -> Path:
    """A stand-in npu-smi at ``path``: prints recorded 910B output and logs its LD_LIBRARY_PATH."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        f'echo "$LD_LIBRARY_PATH" >> {env_log}\n'
        f'if [ "$2" = "-m" ]; then cat {RECORDED / "910b-8x-info-m.txt"}; exit 0; fi\n'
        f"cat {RECORDED / '910b-8x-info.txt'}\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def bare_node(monkeypatch, tmp_path) -> Path:
    """PATH without npu-smi (system folders only); NVML says what it says here (no driver)."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    return tmp_path


def test_auto_finds_npu_smi_at_the_configured_host_path_and_runs_it_with_the_driver_libraries(bare_node):
    driver = bare_node / "usr/local/Ascend/driver"
    npu_smi = write_npu_smi(bare_node / "usr/local/sbin/npu-smi", bare_node / "env.log")
    backend = create_backend("auto", npu_smi=str(npu_smi), driver_path=str(driver), sysfs_root=bare_node)
    assert isinstance(backend, AscendBackend)
    devices = backend.discover()
    assert [d.id for d in devices] == [f"npu{i}" for i in range(8)]
    assert all(d.healthy and d.total_mib == 65536 for d in devices)
    seen = (bare_node / "env.log").read_text().splitlines()[0].split(":")
    assert seen[: len(DRIVER_LIBRARY_DIRS)] == [str(driver / d) for d in DRIVER_LIBRARY_DIRS]


def test_configured_device_files_go_to_every_container(bare_node):
    npu_smi = write_npu_smi(bare_node / "npu-smi", bare_node / "env.log")
    backend = AscendBackend(npu_smi=str(npu_smi), device_files=["/dev/davinci_manager", "/dev/extra"])
    device = backend.discover()[2]
    assert [n.host_path for n in backend.device_nodes(device)] == [
        "/dev/davinci2",
        "/dev/davinci_manager",
        "/dev/extra",
    ]


def test_npu_smi_environment_prepends_the_driver_folders_once():
    env = npu_smi_environment({"LD_LIBRARY_PATH": "/opt/x:/drv/lib64", "HOME": "/root"}, "/drv")
    assert env["LD_LIBRARY_PATH"] == "/drv/lib64:/drv/lib64/common:/drv/lib64/driver:/opt/x"
    assert env["HOME"] == "/root"


def test_the_dcmi_library_marks_an_ascend_node_whose_npu_smi_is_missing(bare_node):
    driver = bare_node / "driver"
    (driver / "lib64/driver").mkdir(parents=True)
    (driver / "lib64/driver/libdcmi.so").write_bytes(b"\x7fELF")
    found = detect(str(bare_node / "sbin/npu-smi"), driver, lambda: "unused")
    assert found.backend == "ascend" and "npu-smi not found" in found.reasons[0]
    backend = create_backend("auto", npu_smi=str(bare_node / "sbin/npu-smi"), driver_path=str(driver))
    assert backend.name == "ascend"
    with pytest.raises(Exception, match="sbin/npu-smi"):  # every poll says which npu-smi is missing
        backend.discover()


def test_nvidia_comes_after_ascend():
    assert detect("no-such-npu-smi", "/nonexistent", lambda: "").backend == "nvidia"
    found = detect("no-such-npu-smi", "/nonexistent", lambda: "NVML did not initialise: no driver")
    assert found.backend is None
    assert found.reasons == (
        "Ascend: no npu-smi at 'no-such-npu-smi' and no DCMI library at /nonexistent/lib64/driver/libdcmi.so",
        "NVIDIA: NVML did not initialise: no driver",
    )


def test_a_node_without_accelerators_advertises_nothing_and_says_why(bare_node, caplog):
    caplog.set_level(logging.WARNING, logger="vnpu.device_plugin.backends.base")
    # What the chart used to pass on every node: simulated devices with backend auto.
    backend = create_backend("auto", spec="2x16384", npu_smi="npu-smi")
    assert backend.name == "none" and backend.discover() == []
    (record,) = [r for r in caplog.records if "no accelerator found" in r.getMessage()]
    assert "--backend simulated" in record.getMessage()
    assert any(r.startswith("Ascend: no npu-smi") for r in record.reasons)  # type: ignore[attr-defined]
    assert any(r.startswith("NVIDIA: ") for r in record.reasons)  # type: ignore[attr-defined]
    assert record.ignored_simulated_options == ["spec"]  # type: ignore[attr-defined]


def test_the_command_line_selects_like_the_chart(bare_node, monkeypatch):
    monkeypatch.setenv("VNPU_SIMULATED_DEVICES", "2x16384")
    monkeypatch.delenv("VNPU_BACKEND_FALLBACK", raising=False)
    parse = build_parser().parse_args
    assert backend_from_args(parse(["--backend", "auto"])).name == "none"
    assert backend_from_args(parse(["--backend", "auto", "--fallback", "simulated"])).name == "simulated"
    assert backend_from_args(parse(["--backend", "simulated"])).discover()[1].total_mib == 16384
    monkeypatch.setenv("VNPU_BACKEND_FALLBACK", "simulated")  # read when the parser is built
    assert backend_from_args(build_parser().parse_args(["--backend", "auto"])).name == "simulated"
    with pytest.raises(SystemExit):
        parse(["--fallback", "sometimes"])
