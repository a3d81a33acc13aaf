"""The async-offload plan (pure, torch-free): which weight units stay resident on the device under a
budget, which stream through the prefetch ring, and where a weight-holder lays the resident ones out in
a device arena its replicas map (:class:`ResidentPart`).

A weight-holder under offload makes this plan (its limit pays for the resident part) without loading
torch on CPU; :mod:`vnpu.runtime.offload` runs it (the ring). See that module for the priority order
and why streamed blocks are spread evenly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from vnpu.runtime.arena import Arena, CpuArena, allocate
from vnpu.runtime.errors import OffloadPlanError
from vnpu.runtime.manifest import ALIGNMENT, WeightManifest
from vnpu.runtime.units import ATTN, EMBED, FFN, HEAD, NORM, Unit, model_units

#: Resident priority by unit kind (lower first): attention, then output head, then feed-forward.
PRIORITY = {ATTN: 0, HEAD: 1, FFN: 2}


@dataclass(frozen=True)
class UnitSize:
    name: str
    kind: str
    nbytes: int


@dataclass
class OffloadPlan:
    """Which units stay on the device and which stream, and the ring that streams them."""

    resident: list[str]
    streamed: list[str]  #: in execution order
    slot_bytes: int
    prefetch_depth: int
    budget_bytes: int
    resident_bytes: int
    streamed_bytes: int
    host_units: list[str] = field(default_factory=list)  #: used on the host side (the embedding gather)

    @property
    def ring_bytes(self) -> int:
        return self.slot_bytes * self.prefetch_depth if self.streamed else 0

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.ring_bytes

    @property
    def resident_fraction(self) -> float:
        total = self.resident_bytes + self.streamed_bytes
        return self.resident_bytes / total if total else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "resident": self.resident,
            "streamed": self.streamed,
            "slot_bytes": self.slot_bytes,
            "prefetch_depth": self.prefetch_depth,
            "budget_bytes": self.budget_bytes,
            "resident_bytes": self.resident_bytes,
            "streamed_bytes": self.streamed_bytes,
            "ring_bytes": self.ring_bytes,
        }


def unit_byte_range(unit: Unit, manifest: WeightManifest) -> tuple[int, int]:
    """The [start, end) byte range of ``unit`` in the arena (contiguous: the arena is packed by unit)."""
    entries = [manifest.tensors[n] for n in unit.tensors.values()]
    if unit.rows is not None:
        (e,) = entries
        row_bytes = e.nbytes // e.shape[0]
        return e.offset + unit.rows[0] * row_bytes, e.offset + unit.rows[1] * row_bytes
    return min(e.offset for e in entries), max(e.offset + e.nbytes for e in entries)


def unit_sizes(units: Sequence[Unit], manifest: WeightManifest) -> list[UnitSize]:
    """Each unit's bytes as a device arena of resident units lays them out (see
    :func:`resident_layout`): its byte range, padded to the arena's alignment."""
    sizes = []
    for u in units:
        start, end = unit_byte_range(u, manifest)
        sizes.append(UnitSize(u.name, u.kind, _aligned(end - start)))
    return sizes


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class ResidentSlot(NamedTuple):
    """Where a resident unit's bytes are: ``offset`` in the holder's resident arena, and its byte range
    ``[start, end)`` in the host arena they are copied from."""

    offset: int
    start: int
    end: int


def resident_layout(plan: OffloadPlan, manifest: WeightManifest) -> dict[str, ResidentSlot]:
    """Each resident unit's slot in a holder's resident arena: one after another in the plan's order,
    each at the alignment (tensors in a unit keep their offsets relative to its start). The arena is
    ``plan.resident_bytes`` long. Pure: holder and replica derive it alike."""
    ranges = {u.name: unit_byte_range(u, manifest) for u in model_units(manifest.config)}
    layout, cursor = {}, 0
    for name in plan.resident:
        start, end = ranges[name]
        layout[name] = ResidentSlot(cursor, start, end)
        cursor += _aligned(end - start)
    return layout


@dataclass(frozen=True)
class ResidentPart:
    """The units an offloaded model keeps resident, in one device arena of its weights-holder, which
    every replica attached to it maps instead of copying them into its own device memory (the
    holder's slices pay for them once): the arena and the units it holds, in the plan's order."""

    arena: Arena
    units: tuple[str, ...]

    def fits(self, plan: OffloadPlan) -> str | None:
        """Why this part cannot serve ``plan``'s resident units, or None when it can."""
        if list(self.units) != plan.resident:
            return f"it holds {len(self.units)} units resident, this replica's plan {len(plan.resident)}"
        if self.arena.nbytes != plan.resident_bytes:
            return f"its arena has {self.arena.nbytes} B, this replica's plan keeps {plan.resident_bytes}"
        return None


def build_resident_part(
    manifest: WeightManifest, host: CpuArena, plan: OffloadPlan, device: str
) -> ResidentPart:
    """A holder's resident part on ``device``: the resident units' bytes copied out of the host arena
    (see :func:`resident_layout`) and sealed. ``plan`` keeps at least one unit resident."""
    arena = allocate(plan.resident_bytes, device, label="vnpu-resident")
    source = host.numpy()  # the holder's arena under offload: host memory (a CpuArena)
    for slot in resident_layout(plan, manifest).values():
        arena.write(slot.offset, source[slot.start : slot.end])
    arena.seal()
    return ResidentPart(arena, tuple(plan.resident))


def plan_for(
    manifest: WeightManifest, budget_mib: float, prefetch_depth: int, resident_mib: float | None
) -> OffloadPlan:
    """The plan of ``manifest``'s units under ``--offload-budget-mib`` and ``--offload-resident-mib``:
    the one a weight-holder checks against its limit and each of its replicas installs."""
    cap = None if resident_mib is None else int(resident_mib * 2**20)
    return plan_offload(
        unit_sizes(model_units(manifest.config), manifest), int(budget_mib * 2**20), prefetch_depth, cap
    )


def plan_offload(
    units: Sequence[UnitSize],
    budget_bytes: int,
    prefetch_depth: int = 2,
    resident_cap: int | None = None,
) -> OffloadPlan:
    """Choose resident units under ``budget_bytes`` (see module docstring); deterministic.

    The embedding table is gathered on the host (only the rows of the current tokens are needed), so
    it is neither resident nor streamed; the final norm is always resident (it is tiny). Candidates
    are tried in priority order and each is kept if it fits next to the ring the still-streamed units
    need; one that does not fit streams and smaller ones after it may still fit. When only some
    blocks of a kind fit, the streamed ones are spread evenly over the layers (see
    :func:`_spread_streamed`).

    ``resident_cap`` (bytes): what the weight-holder's slices pay for
    (the operator's estimate, which reserves a ring of its largest whole layer: more than the largest
    unit this ring holds). The resident units stay within it as well, so the holder and every replica
    of the group make the same plan and the holder's limit always holds it.
    """
    if prefetch_depth < 1:
        raise OffloadPlanError(f"prefetch depth must be at least 1, got {prefetch_depth}")
    host = [u.name for u in units if u.kind == EMBED]
    fixed = [u for u in units if u.kind == NORM]
    order = {u.name: i for i, u in enumerate(units)}
    candidates = sorted(
        (u for u in units if u.kind in PRIORITY), key=lambda u: (PRIORITY[u.kind], order[u.name])
    )
    cap = budget_bytes if resident_cap is None else min(budget_bytes, resident_cap)
    used = sum(u.nbytes for u in fixed)
    if used > cap:
        raise OffloadPlanError(f"a resident cap of {cap} B cannot hold the {used} B of norms")
    if used + sum(u.nbytes for u in candidates) <= cap:
        resident = fixed + candidates
        streamed: list[UnitSize] = []
    else:
        biggest = max(u.nbytes for u in candidates)
        if used + prefetch_depth * biggest > budget_bytes:
            raise OffloadPlanError(
                f"device budget {budget_bytes} B cannot hold a prefetch ring of {prefetch_depth} x "
                f"{biggest} B (largest unit) plus {used} B of norms"
            )
        resident = list(fixed)
        remaining = list(candidates)
        for unit in candidates:
            rest = [u for u in remaining if u is not unit]
            ring = prefetch_depth * max((u.nbytes for u in rest), default=0)
            if used + unit.nbytes + ring <= budget_bytes and used + unit.nbytes <= cap:
                resident.append(unit)
                used += unit.nbytes
                remaining = rest
        resident, remaining = _spread_streamed(resident, remaining)
        streamed = sorted(remaining, key=lambda u: order[u.name])
    resident_names = {u.name for u in resident}
    return OffloadPlan(
        resident=[u.name for u in units if u.name in resident_names],
        streamed=[u.name for u in streamed],
        slot_bytes=max((u.nbytes for u in streamed), default=0),
        prefetch_depth=prefetch_depth,
        budget_bytes=budget_bytes,
        resident_bytes=sum(u.nbytes for u in resident),
        streamed_bytes=sum(u.nbytes for u in streamed),
        host_units=host,
    )


def _spread_streamed(
    resident: list[UnitSize], streamed: list[UnitSize]
) -> tuple[list[UnitSize], list[UnitSize]]:
    """Among equal-sized units of one kind, stream evenly spaced ones instead of the last ones.

    The priority order decides *how many* FFN (or attention) blocks stay resident; which ones is free,
    since they are the same size. Clustering the streamed blocks at the end of the model leaves the
    link idle while the resident half computes and then makes the streamed half copy-bound; spacing
    them evenly gives every copy the resident compute around it to hide behind.
    """
    for kind in (ATTN, FFN):
        same = [u for u in resident + streamed if u.kind == kind]
        moving = [u for u in streamed if u.kind == kind]
        if not moving or len(moving) == len(same) or len({u.nbytes for u in same}) != 1:
            continue
        ordered = sorted(same, key=lambda u: _layer_of(u.name))
        n, k = len(ordered), len(moving)
        chosen = {ordered[int((j + 0.5) * n / k)].name for j in range(k)}
        resident = [u for u in resident if u.kind != kind] + [u for u in ordered if u.name not in chosen]
        streamed = [u for u in streamed if u.kind != kind] + [u for u in ordered if u.name in chosen]
    return resident, streamed


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else -1
