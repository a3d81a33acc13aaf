"""What the benchmarks and the tests read from running processes: memory as the kernel accounts it
(``/proc/<pid>/smaps*``) and JSON over HTTP. One copy, so a benchmark's figure and a test's bound are
measured the same way."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def _rollup(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(f"no {field} in /proc/{pid}/smaps_rollup")


def pss_kib(pid: int) -> int:
    """Proportional set size of a process (shared pages divided among their users), in KiB."""
    return _rollup(pid, "Pss")


def rss_kib(pid: int) -> int:
    """Resident set size of a process (every mapped page counted in full), in KiB."""
    return _rollup(pid, "Rss")


def peak_rss_kib(pid: int) -> int:
    """The highest resident set size the process has had so far (``VmHWM``), in KiB: what a
    container's memory limit must leave room for."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise LookupError(f"no VmHWM in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process (all its threads) has used so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def mapping_kib(pid: int, needle: str) -> tuple[int, int]:
    """(Rss, Pss) in KiB of the mappings of ``pid`` whose path contains ``needle``."""
    rss = pss = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = needle in line
        elif inside and fields[0] == "Rss:":
            rss += int(fields[1])
        elif inside and fields[0] == "Pss:":
            pss += int(fields[1])
    return rss, pss


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> tuple[int, Any]:
    """GET (or POST ``body`` as JSON) and return (status, JSON body), HTTP errors included; connection
    errors raise OSError."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def gpu_memory_mib(index: int = 0) -> tuple[float, dict[int, float]]:
    """Device memory in use on GPU ``index`` (MiB, every process), and per process where NVML can tell.

    Read through NVML (``nvidia-ml-py``), so the reading process creates no CUDA context of its own.
    A virtualised GPU may not report per-process figures: the dict is then empty.
    """
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
        per_process = {
            p.pid: p.usedGpuMemory / 2**20
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.usedGpuMemory is not None
        }
    finally:
        pynvml.nvmlShutdown()
    return used, per_process
