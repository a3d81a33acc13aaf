"""The live device table: what the plugin currently advertises, fed by polling a backend.

:func:`merge` is the pure rule that turns one poll (devices or a backend error) into the next table:

* a device whose memory cannot be read this time keeps its last known size, so its slice IDs stay stable;
* a device missing from the backend's report, or every device when the backend fails as a whole, stays
  in the table as Unhealthy with the reason: the kubelet must see it go unhealthy, not vanish;
* unhealthy devices advertise all their slices as Unhealthy;
* a device reporting more memory than :data:`MAX_SLICES_PER_DEVICE` slices can hold is unhealthy and keeps
  its last known layout (none when it has none): such a size is a bogus report (a ``0xFFFFFFFF``
  sentinel), and its slice list would not fit the kubelet's messages;
* every device is its own extended resource, ``vnpu.io/memory-<index>``: a device whose index another
  device already has (or is out of range) is unhealthy, so two devices never share one resource. An
  index stays with the device that had it; in a first table (a plugin that restarted) it goes to a
  device whose slices the ledger holds before one whose it does not, so a restart never hands a
  running pod's resource to another device;
* every device has its own socket directory, named after its ID (:func:`.contract.device_dir_name`):
  a device whose ID names the directory another device already has (``npu:0`` and ``npu_0``) is
  unhealthy, so the pods of two devices never share one directory.

:class:`DeviceTable` holds the current table behind a lock and a version number that changes only
when something the kubelet or the node annotation sees changes (not on memory-usage updates), so
ListAndWatch streams and the annotator wake exactly when they have something to send.
:class:`HealthMonitor` polls the backend on a thread. A backend that fails as a whole (the management
tool timing out under load) is applied only once it has failed for :data:`BACKEND_ERROR_GRACE_S`: one
failed poll marked every device Unhealthy, and the operator re-placed every replica of the node at once.
Until the first report is applied (devices, or an error past the grace) the table is not ``reported``,
and the node annotation is left as the plugin before this one wrote it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from vnpu.api import MAX_DEVICE_ID_LEN, MAX_DEVICE_INDEX, device_resource, slice_id
from vnpu.device_plugin import contract
from vnpu.device_plugin.backends.base import Backend, BackendError, PhysicalDevice
from vnpu.device_plugin.heartbeat import Heartbeat
from vnpu.inventory import HEALTHY, UNHEALTHY, DeviceInfo, NodeInventory

log = logging.getLogger(__name__)

#: The most slices one device advertises. One ListAndWatch message lists every slice of its device, and
#: the kubelet receives at most 4 MiB per gRPC message. A slice costs at most 93 bytes there: a 63-char
#: ID (65 bytes with tag and length), health "Unhealthy" (11), a topology with one NUMA node whose ID
#: is a 10-byte varint at worst (15), plus 2 bytes framing the Device in the response. 16384 slices are
#: at most 1.45 MiB, well under the limit, and still 1 TiB of memory in 64 MiB slices.
MAX_SLICES_PER_DEVICE = 16384


@dataclass(frozen=True)
class DeviceEntry:
    """One physical device in the table, with its slice layout."""

    device: PhysicalDevice
    total_mib: int
    slice_mib: int
    slices: int
    #: False when another device already held this device's index: ownership is read back from the
    #: previous table, so an index stays with its first device however many polls follow.
    owns_index: bool = True
    #: False when another device already held the socket directory this device's ID names (kept
    #: like ``owns_index``).
    owns_socket_dir: bool = True

    @property
    def id(self) -> str:
        return self.device.id

    @property
    def healthy(self) -> bool:
        return self.device.healthy and self.slices > 0

    @property
    def reason(self) -> str:
        if self.device.healthy and self.slices == 0:
            return f"device memory ({self.total_mib} MiB) is smaller than one slice ({self.slice_mib} MiB)"
        return self.device.reason

    @property
    def resource(self) -> str:
        """The extended resource advertising this device's slices; empty when it has none of its own:
        an index no resource can carry, or one another device holds (the device is then unhealthy and
        has no endpoint)."""
        if not self.owns_index or not 0 <= self.device.index <= MAX_DEVICE_INDEX:
            return ""
        return device_resource(self.device.index)

    def slice_ids(self) -> list[str]:
        return [slice_id(self.id, i) for i in range(self.slices)]

    def visible_key(self) -> tuple[object, ...]:
        """Everything the kubelet or the inventory annotation can see (not memory usage)."""
        d = self.device
        return (d.id, d.index, d.model, d.numa_node, self.healthy, self.reason, self.total_mib, self.slices)

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            id=self.id,
            index=self.device.index,
            model=self.device.model,
            total_mib=self.total_mib,
            slice_mib=self.slice_mib,
            slices=self.slices,
            health=HEALTHY if self.healthy else UNHEALTHY,
            numa_node=self.device.numa_node,
            reason="" if self.healthy else self.reason,
            resource=self.resource,
        )


def _socket_dir_name(device_id: str) -> str | None:
    """The socket directory name of ``device_id``; None when it cannot name one (its endpoint then
    cannot be set up, which says so)."""
    try:
        return contract.device_dir_name(device_id)
    except ValueError:
        return None


def _check_id_length(device_id: str, slices: int) -> None:
    if slices:
        slice_id(device_id, slices - 1)  # raises ValueError when the longest slice ID exceeds the limit


def merge(
    previous: dict[str, DeviceEntry],
    report: Sequence[PhysicalDevice] | BackendError,
    slice_mib: int,
    holding: Callable[[], Collection[str]] = tuple,
) -> dict[str, DeviceEntry]:
    """The next device table from the previous one and one backend poll (pure but for ``holding``).
    ``holding()``: the IDs of devices that have allocated slices, which take an index or socket
    directory no device had before; asked only when two new claimants contest one (it counts the
    ledger: about 10 ms for 8,192 held slices, and a poll comes every half second)."""
    if isinstance(report, BackendError):
        return {
            k: replace(e, device=replace(e.device, healthy=False, reason=str(report)))
            for k, e in previous.items()
        }
    table: dict[str, DeviceEntry] = {}
    # index -> the device holding it; an index stays with its first device, never with one it was refused to
    index_owner = {e.device.index: e.id for e in previous.values() if e.owns_index}
    # socket directory name -> the device holding it, kept the same way
    dir_owner = {_socket_dir_name(e.id): e.id for e in previous.values() if e.owns_socket_dir}
    held = holding() if _contested(previous, report, index_owner, dir_owner) else ()
    for dev in sorted(report, key=lambda d: (d.id not in previous, d.id not in held, d.index, d.id)):
        prev = previous.get(dev.id)
        owner = index_owner.setdefault(dev.index, dev.id)
        dir_name = _socket_dir_name(dev.id)
        dir_holder = dir_owner.setdefault(dir_name, dev.id) if dir_name is not None else dev.id
        if not 0 <= dev.index <= MAX_DEVICE_INDEX:
            dev = replace(
                dev, healthy=False, reason=f"device index {dev.index} is outside [0, {MAX_DEVICE_INDEX}]"
            )
        elif owner != dev.id:
            dev = replace(dev, healthy=False, reason=f"device index {dev.index} is already {owner}'s")
        elif dir_holder != dev.id:
            dev = replace(
                dev,
                healthy=False,
                reason=f"device id {dev.id!r} names the socket directory {dir_name!r}, which device "
                f"{dir_holder!r} already has: give one of them another ID",
            )
        total = dev.total_mib if dev.total_mib is not None else (prev.total_mib if prev else 0)
        if dev.total_mib is None and dev.healthy:
            dev = replace(dev, healthy=False, reason="device memory size unknown")
        slices = total // slice_mib
        if slices > MAX_SLICES_PER_DEVICE:
            dev = replace(
                dev,
                healthy=False,
                reason=f"device memory {total} MiB is {slices} slices of {slice_mib} MiB, more than the"
                f" {MAX_SLICES_PER_DEVICE} one device may advertise: a bogus memory report,"
                " or raise --slice-mib",
            )
            total = prev.total_mib if prev else 0  # like an unreadable size: keep the last known layout
            slices = total // slice_mib
        try:
            _check_id_length(dev.id, slices)
        except ValueError:
            dev = replace(
                dev,
                healthy=False,
                reason=f"device id {dev.id!r} too long for slice ids of at most {MAX_DEVICE_ID_LEN} chars",
            )
            slices = 0
        table[dev.id] = DeviceEntry(
            device=dev,
            total_mib=total,
            slice_mib=slice_mib,
            slices=slices,
            owns_index=owner == dev.id,
            owns_socket_dir=dir_holder == dev.id,
        )
    for key, entry in previous.items():
        if key not in table:
            table[key] = replace(
                entry,
                device=replace(
                    entry.device, healthy=False, reason="device no longer reported by the backend"
                ),
            )
    return dict(sorted(table.items(), key=lambda kv: (kv[1].device.index, kv[0])))


def _contested(
    previous: Mapping[str, DeviceEntry],
    report: Sequence[PhysicalDevice],
    index_owner: Mapping[int, str],
    dir_owner: Mapping[str | None, str],
) -> bool:
    """Whether two reported devices that are not in the previous table claim one index or socket
    directory that no device owns yet (the only case in which who holds slices decides)."""
    new = [d for d in report if d.id not in previous]
    indices = Counter(d.index for d in new if d.index not in index_owner)
    dirs = Counter(n for d in new if (n := _socket_dir_name(d.id)) is not None and n not in dir_owner)
    return any(n > 1 for n in indices.values()) or any(n > 1 for n in dirs.values())


class DeviceTable:
    """The current device table, thread-safe, versioned for watchers."""

    def __init__(self, slice_mib: int, holding: Callable[[], Collection[str]] = tuple) -> None:
        """``holding`` names the devices with allocated slices (the ledger's): see :func:`merge`."""
        if slice_mib < 1:
            raise ValueError(f"slice size must be >= 1 MiB, got {slice_mib}")
        self.slice_mib = slice_mib
        self._holding = holding
        self._entries: dict[str, DeviceEntry] = {}
        self._slice_owner: dict[str, DeviceEntry] = {}
        self._version = 0
        self._reported = False
        self._cond = threading.Condition()

    # -- writers ------------------------------------------------------------------------------------
    def update(self, report: Sequence[PhysicalDevice] | BackendError) -> list[tuple[int, str]]:
        """Apply one poll; returns health transitions as (log level, message)."""
        with self._cond:
            new = merge(self._entries, report, self.slice_mib, self._holding)
            transitions = _transitions(self._entries, new)
            changed = not self._reported or [e.visible_key() for e in self._entries.values()] != [
                e.visible_key() for e in new.values()
            ]
            self._entries, self._reported = new, True
            if changed:
                self._slice_owner = {sid: e for e in new.values() for sid in e.slice_ids()}
                self._version += 1
                self._cond.notify_all()
            return transitions

    def wake_watchers(self) -> None:
        """Wake every waiter (used when a stream is cancelled)."""
        with self._cond:
            self._cond.notify_all()

    # -- readers ------------------------------------------------------------------------------------
    @property
    def reported(self) -> bool:
        """Whether a report was applied yet (the devices, or a backend error past its grace)."""
        with self._cond:
            return self._reported

    @property
    def version(self) -> int:
        with self._cond:
            return self._version

    def wait_for_change(self, seen_version: int, timeout: float, stop: threading.Event | None = None) -> int:
        """Block until the version differs from ``seen_version``, ``stop`` is set (wake it with
        :meth:`wake_watchers`) or ``timeout`` passes; returns the current version."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._version != seen_version or (stop is not None and stop.is_set()), timeout=timeout
            )
            return self._version

    def entries(self) -> list[DeviceEntry]:
        with self._cond:
            return list(self._entries.values())

    def entry(self, device_id: str) -> DeviceEntry | None:
        with self._cond:
            return self._entries.get(device_id)

    def owner_of(self, sid: str) -> DeviceEntry | None:
        """The device a slice ID belongs to, or None for an unknown ID."""
        with self._cond:
            return self._slice_owner.get(sid)

    def inventory(self) -> NodeInventory:
        return NodeInventory(tuple(e.info() for e in self.entries()))


def _transitions(old: dict[str, DeviceEntry], new: dict[str, DeviceEntry]) -> list[tuple[int, str]]:
    out = []
    for key, entry in new.items():
        before = old.get(key)
        if before is None and entry.healthy:
            out.append((logging.INFO, f"device {key} found: {entry.slices} slices of {entry.slice_mib} MiB"))
        elif before is None:
            out.append((logging.WARNING, f"device {key} found unhealthy: {entry.reason}"))
        elif before.healthy and not entry.healthy:
            out.append((logging.WARNING, f"device {key} became unhealthy: {entry.reason}"))
        elif not before.healthy and entry.healthy:
            out.append((logging.INFO, f"device {key} is healthy again"))
        elif not entry.healthy and before.reason != entry.reason:
            out.append((logging.WARNING, f"device {key} still unhealthy: {entry.reason}"))
    return out


#: How long a backend may fail as a whole before its devices are marked Unhealthy (see the module).
BACKEND_ERROR_GRACE_S = 10.0


class HealthMonitor:
    """Polls the backend every ``interval_s`` seconds and feeds the device table; a backend failing
    as a whole counts once it has failed for ``error_grace_s``."""

    def __init__(
        self,
        backend: Backend,
        table: DeviceTable,
        interval_s: float = 0.5,
        error_grace_s: float = BACKEND_ERROR_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.table = table
        self.interval_s = interval_s
        self.error_grace_s = error_grace_s
        self._clock = clock
        self._failing_since: float | None = None  #: when the backend's current run of failures began
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = Heartbeat("device health monitor", "a backend call hung?", clock)  #: a beat per poll

    def poll_once(self) -> None:
        try:
            report: Sequence[PhysicalDevice] | BackendError = self.backend.discover()
        except BackendError as exc:
            report = exc
        except Exception as exc:  # a backend bug must not stop health reporting: mark devices unhealthy
            log.exception("backend raised unexpectedly", extra={"backend": self.backend.name})
            report = BackendError(f"{self.backend.name} backend failed: {exc!r}")
        if self._within_error_grace(report):
            return
        try:
            transitions = self.table.update(report)
        except Exception as exc:  # nor may a report the table cannot take: the health thread must live on
            log.exception("device table update failed", extra={"backend": self.backend.name})
            transitions = self.table.update(
                BackendError(f"{self.backend.name} backend report could not be applied: {exc!r}")
            )
        for level, message in transitions:
            log.log(level, message, extra={"backend": self.backend.name})

    def _within_error_grace(self, report: Sequence[PhysicalDevice] | BackendError) -> bool:
        """Whether ``report`` is a backend failure not yet failing for the grace period (not applied)."""
        now = self._clock()
        if not isinstance(report, BackendError):
            if self._failing_since is not None and now - self._failing_since < self.error_grace_s:
                log.info("the backend answers again", extra={"backend": self.backend.name})
            self._failing_since = None
            return False
        if self._failing_since is None:
            self._failing_since = now
            if self.error_grace_s > 0:
                log.warning(
                    "backend poll failed; devices keep their last reported health for up to %g s "
                    "unless it answers again",
                    self.error_grace_s,
                    extra={"backend": self.backend.name, "error": str(report)},
                )
        return now - self._failing_since < self.error_grace_s

    def start(self) -> None:
        self.poll_once()
        self.heartbeat.beat()
        self._thread = threading.Thread(target=self._run, name="vnpu-health", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll_once()
            self.heartbeat.beat()

    def stalled(self, limit_s: float) -> str | None:
        """Why the polls stopped (a backend call that never returns: a wedged driver), or None; the
        devices then keep the health last reported, right or not."""
        return self.heartbeat.stalled(self._thread, self._stop.is_set(), max(limit_s, 3 * self.interval_s))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
