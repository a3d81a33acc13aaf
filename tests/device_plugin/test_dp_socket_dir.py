"""A device's socket directory, as a tenant's container on that device sees it: it may create its
socket there and reach a socket whose name it knows, but neither list the others' names nor remove
another user's socket."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from other_user import OTHER_TENANT_UID, TENANT_UID, needs_root, run_as

from vnpu.device_plugin import contract
from vnpu.device_plugin.plugin import ensure_socket_dir


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A device's socket directory under a short root every user may traverse, as /var/run is."""
    root = Path(tempfile.mkdtemp(prefix="vsd-", dir="/tmp"))
    root.chmod(0o755)
    yield root / "npu0"
    shutil.rmtree(root, ignore_errors=True)


def test_the_socket_dir_is_sticky_and_writable_by_all_but_not_listable(socket_dir: Path) -> None:
    ensure_socket_dir(socket_dir)
    assert socket_dir.stat().st_mode & 0o7777 == 0o1733


def test_a_listable_socket_dir_of_an_earlier_version_is_tightened(socket_dir: Path) -> None:
    socket_dir.mkdir()
    socket_dir.chmod(0o1777)
    ensure_socket_dir(socket_dir)
    assert socket_dir.stat().st_mode & 0o7777 == 0o1733


def test_plugin_start_tightens_every_device_socket_dir(run_plugin, dirs) -> None:
    for device in ("npu0", "npu1"):  # as an earlier version of the plugin left them
        old = contract.device_socket_dir(dirs.socket_root, device)
        old.mkdir(parents=True)
        old.chmod(0o1777)
    run_plugin()
    for device in ("npu0", "npu1"):
        assert contract.device_socket_dir(dirs.socket_root, device).stat().st_mode & 0o7777 == 0o1733


@needs_root
def test_a_tenant_reaches_known_names_but_cannot_learn_or_remove_others(socket_dir: Path) -> None:
    ensure_socket_dir(socket_dir)
    # Another group's holder, its socket open to all so that only the directory stands in the way.
    known = socket_dir / "w-known.sock"
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(str(known))
    known.chmod(0o666)
    os.chown(known, OTHER_TENANT_UID, OTHER_TENANT_UID)
    holder.listen(1)
    own = socket_dir / "w-own.sock"

    def tenant() -> dict[str, object]:
        seen: dict[str, object] = {}
        try:
            seen["listed"] = os.listdir(socket_dir)
        except OSError as e:
            seen["list_errno"] = e.errno
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(known))  # a name it knows (its own group's key computes it)
            seen["connected"] = True
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mine:
            mine.bind(str(own))
            seen["bound"] = True
        try:
            known.unlink()
        except OSError as e:
            seen["unlink_errno"] = e.errno
        return seen

    try:
        seen = run_as(TENANT_UID, tenant)
        assert seen == {
            "list_errno": errno.EACCES,  # no name is learnt from the directory
            "connected": True,
            "bound": True,
            "unlink_errno": errno.EPERM,  # sticky: another user's socket stays
        }, seen
        holder.settimeout(5)
        holder.accept()[0].close()
        assert known.exists() and own.stat().st_uid == TENANT_UID
    finally:
        holder.close()
