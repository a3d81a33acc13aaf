"""The allocation ledger: checkpoint round trips, re-allocation, reconcile with pod-resources."""

from __future__ import annotations

import concurrent.futures
import errno
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import pytest

import vnpu.device_plugin.ledger as ledger_module
from vnpu.device_plugin.ledger import Allocation, Ledger, PodRef

A = PodRef("ns", "a", "uid-a")
B = PodRef("ns", "b", "uid-b")


def alloc(slices: list[str], pod: PodRef | None = None, at: float = 100.0) -> Allocation:
    return Allocation(slices=tuple(slices), devices=("npu0",), pod=pod, allocated_at=at)


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "state" / "checkpoint.json"
    ledger = Ledger(path)
    ledger.record(alloc(["npu0-s0", "npu0-s1"], A))
    ledger.record(alloc(["npu0-s2"], None))
    assert len(ledger.journal.read_text().splitlines()) == 2  # allocations are journaled, not rewritten
    restored = Ledger(path)
    assert restored.load() == 3
    assert restored.held() == ledger.held()
    assert restored.held()["npu0-s0"].pod == A
    # Loading folds the journal into the snapshot: one entry per allocation, not per slice.
    assert len(json.loads(path.read_text())["allocations"]) == 2
    assert restored.journal.read_text() == ""
    assert not list(path.parent.glob(".checkpoint-*"))  # no temp files left behind


def test_a_torn_last_journal_line_is_skipped(tmp_path):
    path = tmp_path / "checkpoint.json"
    ledger = Ledger(path)
    ledger.record(alloc(["npu0-s0"], A))
    ledger.close()
    with ledger.journal.open("a") as f:
        f.write('{"record":{"slices":["npu0-s1"],"dev')  # the crash hit mid-write
    assert Ledger(path).load() == 1


def test_journal_lines_that_are_not_utf8_are_skipped_not_fatal(tmp_path, caplog):
    path = tmp_path / "checkpoint.json"
    ledger = Ledger(path)
    ledger.record(alloc(["npu0-s0"], A))
    ledger.close()
    with ledger.journal.open("ab") as f:
        f.write(b'{"record":{"slices":["npu0-s9"],"devices":["np\xb5"]}}\n')  # a bad sector mid-journal
    ledger = Ledger(path)
    ledger.record(alloc(["npu0-s1"], B))
    ledger.close()
    with ledger.journal.open("ab") as f:
        f.write(b'{"record":{"slices":["npu0-s2"],"devices":["np\xff')  # torn, and not UTF-8 either
    restored = Ledger(path)
    assert restored.load() == 2
    assert {sid: a.pod for sid, a in restored.held().items()} == {"npu0-s0": A, "npu0-s1": B}
    assert "skipping unreadable journal line" in caplog.text


def test_an_unreadable_journal_is_ignored_like_an_unreadable_snapshot(tmp_path, monkeypatch, caplog):
    path = tmp_path / "checkpoint.json"
    ledger = Ledger(path)
    ledger.record(alloc(["npu0-s0"], A))
    ledger.close()
    real_open = ledger_module._open_regular_file

    def media_error(path: Path) -> BinaryIO:
        if path == ledger.journal:  # reading fails, as on a bad disk; writing still works
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path)

    monkeypatch.setattr(ledger_module, "_open_regular_file", media_error)
    assert Ledger(path).load() == 0  # the pod-resources reconcile rebuilds what live pods hold
    assert "ignoring unreadable journal" in caplog.text


def test_the_journal_is_compacted_as_it_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "JOURNAL_COMPACT_AT", 3)
    path = tmp_path / "checkpoint.json"
    ledger = Ledger(path)
    for i in range(4):
        ledger.record(alloc([f"npu0-s{i}"], PodRef("ns", f"p{i}")))
    assert len(ledger.journal.read_text().splitlines()) == 1
    assert len(json.loads(path.read_text())["allocations"]) == 3
    assert Ledger(path).load() == 4


def test_corrupt_or_foreign_checkpoints_are_ignored_not_fatal(tmp_path, caplog):
    path = tmp_path / "checkpoint.json"
    path.write_text("{not json")
    assert Ledger(path).load() == 0
    path.write_text(json.dumps({"version": 99, "allocations": []}))
    assert Ledger(path).load() == 0
    assert "ignoring unreadable checkpoint" in caplog.text


#: An entry whose ``allocated_at`` is an integer no float can hold: float() raised OverflowError, which
#: load() did not catch, so the plugin crash-looped on its own checkpoint.
OVERSIZED = {"slices": ["npu0-s0"], "devices": ["npu0"], "pod": None, "allocated_at": int("9" * 400)}


@pytest.mark.parametrize(
    ("checkpoint", "journal"),
    [
        pytest.param("[]", None, id="top-level-list"),
        pytest.param(json.dumps({"version": 1, "allocations": [["npu0-s0"]]}), None, id="entry-a-list"),
        pytest.param(json.dumps({"version": 1, "allocations": {"a": 1}}), None, id="allocations-a-dict"),
        pytest.param(
            json.dumps({"version": 1, "allocations": [{"slices": [], "devices": [], "pod": 1}]}),
            None,
            id="pod-not-an-object",
        ),
        pytest.param("[" * 100_000 + "]" * 100_000, None, id="deep-nesting"),
        pytest.param(None, '{"record":["npu0-s0"]}\n', id="journal-record-a-list"),
        pytest.param(None, "[]\n", id="journal-line-a-list"),
        pytest.param(None, "[" * 100_000 + "]" * 100_000 + "\n", id="journal-deep-nesting"),
        pytest.param("directory", None, id="checkpoint-a-directory"),
        pytest.param(
            json.dumps({"version": 1, "allocations": [OVERSIZED]}),
            None,
            id="allocated-at-too-large-for-a-float",
        ),
        pytest.param(None, json.dumps({"record": OVERSIZED}) + "\n", id="journal-allocated-at-too-large"),
    ],
)
def test_a_checkpoint_or_journal_of_the_wrong_shape_is_ignored_not_fatal(
    tmp_path, caplog, checkpoint, journal
):
    caplog.set_level("INFO")  # a bad last journal line is logged at INFO (it may be a torn write)
    path = tmp_path / "checkpoint.json"
    if checkpoint == "directory":
        path.mkdir()
    elif checkpoint is not None:
        path.write_text(checkpoint)
    if journal is not None:
        (tmp_path / "checkpoint.json.journal").write_text(journal)
    ledger = Ledger(path)
    assert ledger.load() == 0  # starts empty: the pod-resources reconcile rebuilds what live pods hold
    assert ledger.held() == {}
    ledger.record(alloc(["npu0-s1"], A))  # and keeps working
    ledger.close()
    assert Ledger(path).load() == 1
    if checkpoint is not None:
        (record,) = [r for r in caplog.records if r.getMessage().startswith("ignoring unreadable checkpoint")]
        assert str(path) in record.getMessage()
        assert record.path == str(path)
    else:
        assert "skipping unreadable journal line" in caplog.text
    if checkpoint == "directory":
        (aside,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        assert aside.name.startswith("checkpoint.json.corrupt-")


def test_an_unparsable_slice_id_in_a_checkpoint_is_dropped_and_counting_still_works(tmp_path, caplog):
    path = tmp_path / "checkpoint.json"
    entry = {"slices": ["bogus", "npu0-s1"], "devices": ["npu0"], "pod": None, "allocated_at": 100.0}
    only_bogus = dict(entry, slices=["bogus2"])
    path.write_text(json.dumps({"version": 1, "allocations": [entry, only_bogus]}))
    ledger = Ledger(path)
    assert ledger.load() == 1
    assert ledger.count_by_device() == {"npu0": 1}  # raised ValueError: 'bogus' is not a slice id
    assert "dropping an unparsable slice ID" in caplog.text


@pytest.mark.parametrize("at", ["NaN", "Infinity", "1e300"])
def test_a_non_finite_or_future_allocated_at_is_still_released_after_grace(tmp_path, at):
    path = tmp_path / "checkpoint.json"
    entry = '{"slices":["npu0-s0"],"devices":["npu0"],"pod":null,"allocated_at":' + at + "}"
    path.write_text('{"version":1,"allocations":[' + entry + "]}")
    ledger = Ledger(path)
    assert ledger.load() == 1
    now = time.time() + 60
    assert ledger.reconcile({}, grace_s=10, now=now) == (0, 0)  # the first List without it
    assert ledger.reconcile({}, grace_s=10, now=now + 10) == (0, 1)
    assert ledger.held() == {}


def load_within(ledger: Ledger, timeout_s: float = 10.0) -> int:
    """``ledger.load()`` run on a thread: a load that blocks (on a FIFO) fails the test, not hangs it."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(ledger.load)
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            for fifo in Path(str(ledger.checkpoint)).parent.iterdir():  # unblock the reader, then fail
                if stat.S_ISFIFO(os.lstat(fifo).st_mode):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail("load() blocked")


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_a_journal_that_is_not_a_regular_file_is_replaced_never_followed(tmp_path, kind):
    victim = tmp_path / "victim.txt"
    victim.write_text("important\n")
    path = tmp_path / "state" / "checkpoint.json"
    path.parent.mkdir()
    journal = path.with_name("checkpoint.json.journal")
    if kind == "symlink":
        journal.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(journal)
    else:
        journal.mkdir()
    ledger = Ledger(path)
    assert load_within(ledger) == 0
    assert victim.read_text() == "important\n"  # the symlink's target was truncated
    ledger.record(alloc(["npu0-s0"], A))
    ledger.close()
    assert journal.is_file() and not journal.is_symlink()
    assert Ledger(path).load() == 1


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_checkpoint_that_is_not_a_regular_file_is_never_read_through_and_is_replaced(tmp_path, kind):
    """A FIFO at the checkpoint's path blocked the plugin's start for ever (every device's endpoint
    down), and a link was read through. Now neither is read: the ledger starts empty (the pod-resources
    reconcile rebuilds it) and the path becomes a regular snapshot."""
    elsewhere = tmp_path / "elsewhere.json"
    entry = '{"slices":["npu0-s0"],"devices":["npu0"],"pod":null,"allocated_at":1}'
    elsewhere.write_text('{"version":1,"allocations":[' + entry + "]}")
    path = tmp_path / "state" / "checkpoint.json"
    path.parent.mkdir()
    if kind == "symlink":
        path.symlink_to(elsewhere)
    else:
        os.mkfifo(path)
    assert load_within(Ledger(path)) == 0
    assert path.is_file() and not path.is_symlink()
    assert json.loads(path.read_text())["allocations"] == []
    assert "npu0-s0" in elsewhere.read_text()  # left as it was


def test_a_slice_is_never_held_twice_and_a_displaced_allocation_is_released_whole(tmp_path):
    ledger = Ledger(tmp_path / "c.json")
    ledger.record(alloc(["npu0-s0", "npu0-s1"], A))
    displaced = ledger.record(alloc(["npu0-s1", "npu0-s2"], B))
    assert [d.pod for d in displaced] == [A]
    assert sorted(ledger.held()) == ["npu0-s1", "npu0-s2"]
    assert ledger.count_by_device() == {"npu0": 2}


def test_reuse_by_the_same_pod_is_not_a_displacement(tmp_path):
    ledger = Ledger(tmp_path / "c.json")
    ledger.record(alloc(["npu0-s0", "npu0-s1"], A))
    assert ledger.record(alloc(["npu0-s0"], A)) == []
    assert sorted(ledger.held()) == ["npu0-s0", "npu0-s1"]


def test_reconcile_adopts_live_holders_and_releases_the_rest_after_grace(tmp_path):
    ledger = Ledger(tmp_path / "c.json")
    ledger.record(alloc(["npu0-s0"], A, at=100.0))  # A still runs
    ledger.record(alloc(["npu0-s1"], B, at=100.0))  # B ended while the plugin was down
    ledger.record(alloc(["npu0-s2"], None, at=195.0))  # allocated a moment ago; kubelet may not list it yet
    ledger.record(alloc(["npu0-s3"], None, at=100.0))  # pod unknown to the plugin, listed by the kubelet
    live = {"npu0-s0": PodRef("ns", "a"), "npu0-s3": PodRef("ns", "c"), "npu0-s4": PodRef("ns", "d")}
    added, released = ledger.reconcile(live, grace_s=10, now=200.0)
    held = ledger.held()
    assert sorted(held) == ["npu0-s0", "npu0-s1", "npu0-s2", "npu0-s3", "npu0-s4"]
    assert held["npu0-s3"].pod == PodRef("ns", "c")  # attached to its pod, source kept
    assert held["npu0-s4"].source == "pod-resources"
    assert (added, released) == (2, 0)  # one List leaving s1 and s2 out proves nothing yet
    assert ledger.reconcile(live, grace_s=10, now=209.0) == (0, 0)
    # Once every List for the grace period has left them out, they go.
    assert ledger.reconcile(live, grace_s=10, now=210.0) == (0, 2)
    assert sorted(ledger.held()) == ["npu0-s0", "npu0-s3", "npu0-s4"]
    assert Ledger(tmp_path / "c.json").load() == 3
    # An allocation made while a List ran (after the time it was asked) keeps its own grace period.
    ledger.record(alloc(["npu0-s5"], None, at=215.0))
    assert ledger.reconcile(live, grace_s=10, now=214.0) == (0, 0)
    assert ledger.reconcile(live, grace_s=10, now=224.0) == (0, 0)
    assert ledger.reconcile(live, grace_s=10, now=225.0) == (0, 1)


def test_a_slice_is_released_only_once_every_list_for_the_grace_period_has_left_it_out(tmp_path):
    """The grace period counted from allocated_at, so one List that left out a running pod's slices
    (a kubelet just restarted serves pod-resources before it has loaded its pods) released them at
    once. Now it counts from the first List that left them out, and starts again when one names them."""
    ledger = Ledger(tmp_path / "c.json")
    ledger.record(alloc(["npu0-s0", "npu0-s1"], None, at=100.0))
    live = dict.fromkeys(["npu0-s0", "npu0-s1"], A)
    assert ledger.reconcile(live, grace_s=10, now=1000.0) == (2, 0)
    assert ledger.reconcile({}, grace_s=10, now=1001.0) == (0, 0)  # the kubelet restarted
    assert ledger.reconcile({}, grace_s=10, now=1010.5) == (0, 0)
    assert ledger.reconcile(live, grace_s=10, now=1011.0) == (0, 0)  # its pods are loaded again
    held = ledger.held()
    assert {held[s].pod for s in live} == {A} and {held[s].source for s in live} == {"allocate"}
    assert ledger.reconcile({}, grace_s=10, now=1020.0) == (0, 0)  # the pod ended: a new grace period
    assert ledger.reconcile({}, grace_s=10, now=1029.9) == (0, 0)
    assert ledger.reconcile({}, grace_s=10, now=1030.0) == (0, 2)
    assert ledger.held() == {}


def test_a_reconcile_told_not_to_release_releases_nothing_and_restarts_every_grace_period(tmp_path):
    ledger = Ledger(tmp_path / "c.json")
    ledger.record(alloc(["npu0-s0"], A, at=100.0))
    assert ledger.reconcile({}, grace_s=10, now=1000.0) == (0, 0)
    assert ledger.reconcile({"npu0-s9": B}, grace_s=10, now=1020.0, release=False) == (1, 0)
    assert sorted(ledger.held()) == ["npu0-s0", "npu0-s9"]  # it still adds what is listed
    assert ledger.reconcile({"npu0-s9": B}, grace_s=10, now=1021.0) == (0, 0)  # missing since 1021
    assert ledger.reconcile({"npu0-s9": B}, grace_s=10, now=1031.0) == (0, 1)


def test_reconcile_attaches_a_pod_to_an_allocation_as_one_allocation(tmp_path):
    path = tmp_path / "c.json"
    ledger = Ledger(path)
    slices = [f"npu0-s{i}" for i in range(6)]
    ledger.record(alloc(slices, None, at=100.0))  # Allocate never says the pod
    assert ledger.reconcile(dict.fromkeys(slices, A), grace_s=10, now=105.0) == (6, 0)
    (attached,) = ledger.allocations()
    assert (attached.slices, attached.pod) == (tuple(slices), A)
    snapshot = json.loads(path.read_text())["allocations"]
    assert [(a["slices"], a["pod"]["uid"]) for a in snapshot] == [(slices, "uid-a")]
    # The kubelet hands one of its slices to another pod: A's container is gone, all its slices go.
    assert [d.pod for d in ledger.record(alloc(["npu0-s3"], B))] == [A]
    assert sorted(ledger.held()) == ["npu0-s3"] and ledger.held()["npu0-s3"].pod == B


@pytest.mark.parametrize("mode", ["sync", "async", "off"])
def test_every_sync_mode_restores_what_was_recorded(tmp_path, mode):
    path = tmp_path / "checkpoint.json"
    ledger = Ledger(path, sync=mode)
    ledger.record(alloc(["npu0-s0", "npu0-s1"], A))
    # Written before record() returns, in every mode: a plugin crash (not an OS crash) loses nothing.
    assert Ledger(path).load() == 2
    ledger.close()
    ledger.close()  # idempotent


def test_unknown_sync_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sync mode"):
        Ledger(tmp_path / "c.json", sync="sometimes")


def test_a_checkpoint_of_an_older_plugin_still_loads(tmp_path):
    """Checkpoints written before per-device resources carried a share group per allocation."""
    path = tmp_path / "checkpoint.json"
    old = {"slices": ["npu0-s0"], "devices": ["npu0"], "pod": None, "share_group": "g1", "allocated_at": 1.0}
    path.write_text(json.dumps({"version": 1, "allocations": [old]}))
    ledger = Ledger(path)
    assert ledger.load() == 1 and ledger.held()["npu0-s0"].devices == ("npu0",)


#: Run in a child process: RLIMIT_FSIZE (a full disk, as the kernel reports it: a short write, then
#: EFBIG) must not reach the test runner's own files.
FULL_DISK_CHILD = """
import json, resource, signal, sys
from pathlib import Path
from vnpu.device_plugin.ledger import Allocation, Ledger
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
ledger = Ledger(Path(sys.argv[1]), sync=sys.argv[2])
ledger.record(Allocation(("npu0-s0",), ("npu0",)))
size = ledger.journal.stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, resource.RLIM_INFINITY))  # room for 10 bytes
try:
    ledger.record(Allocation(("npu0-s1",), ("npu0",)))
    error = None
except OSError as exc:
    error = {"type": type(exc).__name__, "filename": exc.filename}
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
out = {"error": error, "held": sorted(ledger.held()), "grew": ledger.journal.stat().st_size - size}
ledger.record(Allocation(("npu0-s2",), ("npu0",)))  # space again
ledger.close()
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["sync", "off"])
def test_an_allocation_the_journal_cannot_take_is_not_recorded_and_leaves_no_torn_line(
    tmp_path, caplog, mode
):
    """The ledger took an allocation in memory before writing it, so a failed write left slices held
    that no container had; and the part of the line a full disk took stayed in the journal, where
    the next record was glued to it and lost on the next start."""
    path = tmp_path / "checkpoint.json"
    child = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CHILD, str(path), mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = json.loads(child.stdout)
    assert out["error"] == {"type": "JournalWriteError", "filename": str(path) + ".journal"}
    assert out["held"] == ["npu0-s0"]  # the failed allocation is not held
    assert out["grew"] == 0  # what the disk took of it was cut off again
    restored = Ledger(path)
    assert restored.load() == 2
    assert sorted(restored.held()) == ["npu0-s0", "npu0-s2"]
    assert "skipping unreadable journal line" not in caplog.text


def test_a_failed_compaction_fails_no_allocation_and_is_retried_with_a_backoff(tmp_path, monkeypatch, caplog):
    """Once compacting failed at the JOURNAL_COMPACT_AT-th record, every later Allocate failed, though
    the journal took each one. Now the allocation stands, the failure is logged, and compaction is
    tried again after a backoff (not on every record) until it works."""
    caplog.set_level(logging.INFO, logger="vnpu.device_plugin.ledger")
    monkeypatch.setattr(ledger_module, "JOURNAL_COMPACT_AT", 3)
    path = tmp_path / "checkpoint.json"
    ledger = Ledger(path)
    ledger.load()
    path.unlink()
    path.mkdir()  # the snapshot cannot be replaced: stands in for any snapshot write error
    for i in range(5):
        ledger.record(alloc([f"npu0-s{i}"], PodRef("ns", f"p{i}")))
    assert len(ledger.held()) == 5
    assert len(ledger.journal.read_text().splitlines()) == 5
    failures = [r for r in caplog.records if r.getMessage().startswith("cannot compact the ledger journal")]
    assert len(failures) == 1  # records 4 and 5 came within the backoff: not tried again
    assert failures[0].levelno == logging.ERROR and failures[0].path == str(path)
    # A reconcile's changes are not lost to a failed compaction either; it runs on.
    live = {**{f"npu0-s{i}": PodRef("ns", f"p{i}") for i in range(5)}, "npu0-s5": A}
    assert ledger.reconcile(live, grace_s=10, now=200.0) == (1, 0)
    path.rmdir()
    monkeypatch.setattr(ledger, "_compact_retry_at", 0.0)  # the backoff is over
    ledger.record(alloc(["npu0-s6"], B))
    assert ledger.journal.read_text() == ""  # compacted
    assert "compacting the ledger journal works again" in caplog.text
    ledger.close()
    assert Ledger(path).load() == 7


def test_a_state_volume_that_cannot_take_the_snapshot_at_start_is_logged_not_fatal(
    tmp_path, monkeypatch, caplog
):
    """A restart folds the journal into a new snapshot; a full (or read-only) state volume made that
    raise out of load(), and the plugin crash-looped with a traceback. Now it starts with what the
    snapshot and journal hold, logs the failure and compacts once the volume takes it again."""
    caplog.set_level(logging.INFO, logger="vnpu.device_plugin.ledger")
    path = tmp_path / "checkpoint.json"
    ledger = Ledger(path)
    ledger.load()
    ledger.record(alloc(["npu0-s0"], A))
    ledger.close()

    restarted = Ledger(path)

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(restarted, "_save_snapshot_locked", full)
    assert restarted.load() == 1
    assert "cannot compact the ledger journal" in caplog.text
    assert len(restarted.journal.read_text().splitlines()) == 1  # still all there
    monkeypatch.undo()
    monkeypatch.setattr(restarted, "_compact_retry_at", 0.0)  # the backoff is over
    restarted.record(alloc(["npu0-s1"], B))
    assert restarted.journal.read_text() == ""  # compacted
    restarted.close()
    assert Ledger(path).load() == 2


def test_the_journal_is_compacted_once_it_holds_journal_compact_bytes(tmp_path, monkeypatch):
    """Compaction counted records only: with records of whole devices of thousands of slices, 1023
    of them made a journal of 50 MiB (and a restart that took 400 MiB to read it)."""
    monkeypatch.setattr(ledger_module, "JOURNAL_COMPACT_BYTES", 4096)
    path = tmp_path / "checkpoint.json"
    ledger = Ledger(path, sync="off")
    whole_device = [f"npu0-s{i}" for i in range(128)]  # one record: some 1.8 KiB
    sizes = []
    for _ in range(10):
        ledger.record(alloc(whole_device))
        sizes.append(ledger.journal.stat().st_size)
    assert max(sizes) < 4096 + 2048 and sizes.count(0) >= 3  # compacted every third record or so
    assert Ledger(path).load() == 128


def test_a_long_journal_of_large_records_is_applied_as_it_is_read(tmp_path):
    """load() read the whole journal, split it into lines and parsed every record into a list before
    applying any: a 51 MiB journal (1023 records of 4096 slices) took 406 MiB on every restart.
    Records are applied one at a time now, so reading needs about one record's memory."""
    import tracemalloc

    path = tmp_path / "checkpoint.json"
    whole_device = [f"npu0-s{i}" for i in range(4096)]
    line = json.dumps({"record": alloc(whole_device).to_json()}, separators=(",", ":")) + "\n"
    path.with_name("checkpoint.json.journal").write_text(line * 64)  # 3.7 MiB: the pod came and went
    ledger = Ledger(path, sync="off")
    tracemalloc.start()
    try:
        assert ledger.load() == 4096
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"load() peaked at {peak / 2**20:.0f} MiB"


def test_a_failed_background_sync_writes_the_ledger_whole_to_a_new_snapshot(tmp_path, monkeypatch, caplog):
    """``async`` mode fdatasyncs the journal on a thread; an EIO there was swallowed. On Linux the
    failed pages may be marked clean, so no later sync writes them: the allocation lived only in the
    page cache. Now the failure is logged and the next record (or reconcile) compacts: the whole
    ledger goes to a new, synced snapshot."""
    caplog.set_level(logging.INFO, logger="vnpu.device_plugin.ledger")
    path = tmp_path / "checkpoint.json"
    ledger = Ledger(path, sync="async")
    ledger.load()
    real_fdatasync, failed = os.fdatasync, []

    def lost_write(fd: int) -> None:
        if not failed:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real_fdatasync(fd)

    monkeypatch.setattr(ledger_module.os, "fdatasync", lost_write)
    ledger.record(alloc(["npu0-s0"], A))
    deadline = time.monotonic() + 30
    while "syncing the ledger journal to disk failed" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert failed and "syncing the ledger journal to disk failed" in caplog.text
    ledger.record(alloc(["npu0-s1"], B))
    assert ledger.journal.read_text() == ""  # compacted at once, not after JOURNAL_COMPACT_AT records
    snapshot = json.loads(path.read_text())["allocations"]
    assert sorted(s for a in snapshot for s in a["slices"]) == ["npu0-s0", "npu0-s1"]
    ledger.close()


def test_a_record_after_a_torn_line_is_not_lost_with_it(tmp_path, monkeypatch):
    """A crash mid-write leaves a torn last line; a restart whose compaction fails (a full volume)
    keeps the journal, and the next record was appended onto that torn line: the load after skipped
    both, losing an allocation the kubelet was told had succeeded. The torn tail is cut first."""
    path = tmp_path / "checkpoint.json"
    ledger = Ledger(path)
    ledger.load()
    ledger.record(alloc(["npu0-s0"], A))
    ledger.close()
    with ledger.journal.open("a") as f:
        f.write('{"record":{"slices":["npu0-s1"],"dev')  # the crash, mid-record

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    restarted = Ledger(path)
    monkeypatch.setattr(restarted, "_save_snapshot_locked", full)
    assert restarted.load() == 1
    restarted.record(alloc(["npu0-s2", "npu0-s3"], B))
    restarted.close()
    assert all(line.endswith("}") for line in ledger.journal.read_text().splitlines())
    again = Ledger(path)
    monkeypatch.setattr(again, "_save_snapshot_locked", full)
    again.load()
    assert sorted(again.held()) == ["npu0-s0", "npu0-s2", "npu0-s3"]
