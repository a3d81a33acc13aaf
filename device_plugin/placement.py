"""Which slices of one device to take (GetPreferredAllocation) and whether a set is acceptable
(Allocate). Pure.

Every physical device is its own extended resource (``vnpu.io/memory-<index>``), so the scheduler and
the kubelet already chose the device; within it all slices are equal memory. The plugin only prefers
slices its ledger believes free (an Allocate can precede the kubelet's own bookkeeping of a finished
pod by a moment), lowest index first so allocations read naturally in logs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from vnpu.api import parse_slice_id
from vnpu.device_plugin.allocation import AllocationError


def _index(sid: str) -> tuple[int, str]:
    try:
        return (parse_slice_id(sid)[1], sid)
    except ValueError:
        return (1 << 30, sid)


def preferred_allocation(
    available: Sequence[str], must_include: Sequence[str], size: int, *, avoid: Collection[str] = frozenset()
) -> list[str]:
    """Up to ``size`` IDs: every ``must_include`` first, then free slices by index, then slices the
    ledger says are held (the kubelet's view wins when there is no other choice)."""
    picked = list(dict.fromkeys(must_include))
    if size <= len(picked):
        return picked
    rest = sorted((sid for sid in dict.fromkeys(available) if sid not in picked), key=_index)
    picked += [sid for sid in rest if sid not in avoid]
    picked += [sid for sid in rest if sid in avoid]
    return picked[:size]


def validate_allocate(
    containers: Sequence[Sequence[str]], device_of: Mapping[str, str], device_id: str
) -> None:
    """Check every container request of one Allocate (:func:`validate_request`), and that no slice ID
    is asked for by two of them: each container would get a memory limit for it, more than the
    device's slices hold. Raises AllocationError naming the ID."""
    seen: dict[str, int] = {}
    for n, ids in enumerate(containers):
        validate_request(ids, device_of, device_id)
        for sid in ids:
            if (first := seen.setdefault(sid, n)) != n:
                raise AllocationError(
                    f"device ID {sid!r} is requested by container requests #{first} and #{n} of one "
                    "Allocate: a slice goes to one container"
                )


def validate_request(ids: Sequence[str], device_of: Mapping[str, str], device_id: str) -> None:
    """Check one container's slice IDs for the endpoint of ``device_id``: non-empty, no repeats, every
    ID a slice of that device. ``device_of`` maps every known slice ID to its device. Raises
    AllocationError with a clear message."""
    if not ids:
        raise AllocationError("Allocate request has no device IDs")
    if len(set(ids)) != len(ids):
        raise AllocationError(f"Allocate request repeats device IDs: {sorted(ids)}")
    for sid in ids:
        owner = device_of.get(sid)
        if owner is None:
            raise AllocationError(f"unknown device ID {sid!r}: not a slice this plugin advertises")
        if owner != device_id:
            raise AllocationError(
                f"device ID {sid!r} is a slice of {owner}, not of {device_id} "
                "(the device whose resource this endpoint serves)"
            )
