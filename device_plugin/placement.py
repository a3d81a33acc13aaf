"""Which slices to take (GetPreferredAllocation) and whether a set is acceptable (Allocate). Pure.

A request for N slices should land on one physical device: slices of two devices are two separate
memories, and a model replica cannot use both as one arena. Among the devices that can hold the
whole request the plugin prefers, in order: the device the operator chose for the pending pod (its
``vnpu.io/device`` annotation), then the best fit — the device with the fewest available slices
that still fit, which keeps large holes free for large requests. Slices the plugin's ledger believes
are still held are avoided while there is a choice (the kubelet's view wins when there is none).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from vnpu.api import parse_slice_id


class AllocationError(ValueError):
    """An Allocate request the plugin refuses (the kubelet fails the pod's admission with this text)."""


def group_by_device(ids: Iterable[str]) -> dict[str, list[tuple[int, str]]]:
    """device -> [(slice index, slice id)] sorted by index; IDs that are not vnpu slice IDs are skipped."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for sid in dict.fromkeys(ids):
        try:
            device, index = parse_slice_id(sid)
        except ValueError:
            continue
        groups.setdefault(device, []).append((index, sid))
    for members in groups.values():
        members.sort()
    return groups


def preferred_allocation(
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    *,
    preferred_device: str | None = None,
    avoid: Collection[str] = frozenset(),
    device_order: Mapping[str, int] | None = None,
) -> list[str]:
    """Up to ``size`` slice IDs from ``available`` (always including ``must_include``), on one device when
    any device can hold the whole request; otherwise spread over as few devices as possible."""
    must = list(dict.fromkeys(must_include))
    if size <= len(must):
        return must
    order = device_order or {}
    groups = group_by_device([*must, *available])
    must_devices = {d for d, members in groups.items() if any(sid in must for _, sid in members)}

    def rank(sids: list[tuple[int, str]]) -> list[str]:
        # must-include first, then free slices by index, then slices the ledger says are held
        picked = [sid for _, sid in sids if sid in must]
        picked += [sid for _, sid in sids if sid not in must and sid not in avoid]
        picked += [sid for _, sid in sids if sid not in must and sid in avoid]
        return picked

    def clean_count(device: str) -> int:
        return sum(1 for _, sid in groups[device] if sid in must or sid not in avoid)

    def sort_key(device: str) -> tuple[int, int, str]:
        return (len(groups[device]), order.get(device, 1 << 30), device)

    allowed = must_devices if len(must_devices) == 1 else set(groups)
    if len(must_devices) <= 1:
        fits_clean = [d for d in allowed if clean_count(d) >= size]
        fits_any = [d for d in allowed if len(groups[d]) >= size]
        candidates = fits_clean or fits_any
        if candidates:
            chosen = preferred_device if preferred_device in candidates else min(candidates, key=sort_key)
            return rank(groups[chosen])[:size]

    # No single device can hold the request: fewest devices first (largest first), must-include first.
    picked = list(must)
    for device in sorted(
        groups, key=lambda d: (d not in must_devices, -len(groups[d]), order.get(d, 1 << 30), d)
    ):
        for sid in rank(groups[device]):
            if len(picked) == size:
                return picked
            if sid not in picked:
                picked.append(sid)
    return picked


@dataclass(frozen=True)
class ValidatedRequest:
    """An accepted Allocate container request: slices grouped by device, in request order."""

    by_device: dict[str, list[str]]

    @property
    def devices(self) -> list[str]:
        return list(self.by_device)

    @property
    def slice_count(self) -> int:
        return sum(len(v) for v in self.by_device.values())


def validate_request(
    ids: Sequence[str],
    device_of: Mapping[str, str],
    unhealthy: Mapping[str, str],
    *,
    allow_spanning: bool,
) -> ValidatedRequest:
    """Check one container's slice IDs. ``device_of`` maps every known slice ID to its device,
    ``unhealthy`` maps unhealthy device IDs to the reason. Raises AllocationError with a clear message."""
    if not ids:
        raise AllocationError("Allocate request has no device IDs")
    if len(set(ids)) != len(ids):
        raise AllocationError(f"Allocate request repeats device IDs: {sorted(ids)}")
    by_device: dict[str, list[str]] = {}
    for sid in ids:
        device = device_of.get(sid)
        if device is None:
            raise AllocationError(f"unknown device ID {sid!r}: not a slice this plugin advertises")
        by_device.setdefault(device, []).append(sid)
    for device in by_device:
        if device in unhealthy:
            raise AllocationError(f"device {device} is unhealthy: {unhealthy[device]}")
    if len(by_device) > 1 and not allow_spanning:
        raise AllocationError(
            f"slices span {len(by_device)} physical devices ({', '.join(by_device)}); a vnpu allocation must "
            "stay on one device (start the plugin with --allow-spanning to permit this)"
        )
    return ValidatedRequest(by_device)
