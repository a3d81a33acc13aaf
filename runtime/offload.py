"""Async offload: keep what fits resident, stream the rest through a ring of prefetch buffers.

Two parts:

* :func:`plan_offload` (pure): under a device budget, choose resident units by priority — every
  block's attention, then the output head, then the feed-forward blocks (the pipelined-sharding
  order) — reserving ``prefetch_depth`` slots of the largest streamed unit. Everything else streams.
* :class:`OffloadedWeights`: a :class:`~vnpu.runtime.model.WeightProvider` that copies streamed units
  into the ring ahead of compute. The copy for the streamed unit ``g + depth`` starts as soon as the
  compute of unit ``g`` has released its slot, so copies run ``depth`` units ahead. On CPU a copy
  thread does the copies (optionally through a bandwidth-throttled link emulating a host-to-device
  bus); on CUDA a dedicated copy stream, per-slot events and pinned host memory do.

The sequence of streamed units repeats every forward pass, so prefetching runs across step
boundaries: the first units of the next token are copied while the last ones of this token compute.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vnpu.runtime.arena import Arena
from vnpu.runtime.errors import OffloadPlanError
from vnpu.runtime.manifest import ALIGNMENT, WeightManifest
from vnpu.runtime.model import with_stacks
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


def resident_layout(plan: OffloadPlan, manifest: WeightManifest) -> dict[str, int]:
    """Where each resident unit's byte range starts in a holder's resident arena: one after another in
    the plan's order, each at the alignment (tensors in a unit keep their offsets relative to its
    start). The arena is ``plan.resident_bytes`` long. Pure: holder and replica derive it alike."""
    ranges = {u.name: unit_byte_range(u, manifest) for u in model_units(manifest.config)}
    layout, cursor = {}, 0
    for name in plan.resident:
        start, end = ranges[name]
        layout[name] = cursor
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
    manifest: WeightManifest, host: Arena, plan: OffloadPlan, device: str
) -> ResidentPart:
    """A holder's resident part on ``device``: the resident units' bytes copied out of the host arena
    (see :func:`resident_layout`) and sealed. ``plan`` keeps at least one unit resident."""
    from vnpu.runtime.arena import allocate

    ranges = {u.name: unit_byte_range(u, manifest) for u in model_units(manifest.config)}
    arena = allocate(plan.resident_bytes, device, label="vnpu-resident")
    source = host.byte_tensor()
    for name, offset in resident_layout(plan, manifest).items():
        start, end = ranges[name]
        arena.write(offset, source[start:end].numpy())
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


class ThrottledLink:
    """A host-to-device "bus" of fixed bandwidth for CPU runs: copies in chunks, sleeping to hold a
    token-bucket rate. It models a DMA engine (costs almost no CPU) so copy and compute can overlap."""

    def __init__(self, bytes_per_second: float | None, chunk_bytes: int = 1 << 20) -> None:
        self.bytes_per_second = bytes_per_second
        self.chunk_bytes = chunk_bytes

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if not self.bytes_per_second:
            dst.copy_(src)
            return
        start = time.perf_counter()
        total = src.numel()
        for begin in range(0, total, self.chunk_bytes):
            end = min(begin + self.chunk_bytes, total)
            dst[begin:end].copy_(src[begin:end])
            delay = start + end / self.bytes_per_second - time.perf_counter()
            if delay > 0:
                time.sleep(delay)


@dataclass
class OffloadStats:
    copies: int = 0
    bytes_copied: int = 0
    copy_seconds: float = 0.0
    stall_seconds: float = 0.0  #: compute waiting for a copy (the exposed part of the copy time)


class OffloadedWeights:
    """Weight provider streaming the plan's units through a ring of ``prefetch_depth`` slots."""

    def __init__(
        self,
        units: Sequence[Unit],
        manifest: WeightManifest,
        host_bytes: torch.Tensor,
        plan: OffloadPlan,
        device: str | torch.device = "cpu",
        link: ThrottledLink | None = None,
        synchronous: bool = False,
        resident_part: ResidentPart | None = None,
    ) -> None:
        """``synchronous=True`` is the baseline accelerate's ``cpu_offload`` implements: each streamed
        unit is copied right before its compute, nothing overlaps (one slot is used).
        ``resident_part``: the holder's arena of ``plan``'s resident units (checked by the caller with
        :meth:`ResidentPart.fits`), viewed in place; without it they are copied to ``device``."""
        self.plan = plan
        self.synchronous = synchronous
        self.device = torch.device(device)
        self.stats = OffloadStats()
        self._link = link or ThrottledLink(None)
        self._units = {u.name: u for u in units}
        self._manifest = manifest
        self._cuda = self.device.type == "cuda"
        # Where each unit's tensors live inside its contiguous byte range [start, end) of the arena.
        self._ranges: dict[str, tuple[int, int]] = {}
        for u in units:
            self._ranges[u.name] = unit_byte_range(u, manifest)
        self._host = host_bytes
        self._resident: dict[str, dict[str, torch.Tensor]] = {}
        mapped = resident_layout(plan, manifest) if resident_part is not None else {}
        for name in plan.resident + plan.host_units:
            if name in mapped:
                assert resident_part is not None
                start, end = self._ranges[name]
                offset = mapped[name]
                buffer = resident_part.arena.byte_tensor()[offset : offset + end - start]
            else:
                where = self.device if name in plan.resident else host_bytes.device
                buffer = self._unit_bytes(name, where)
            self._resident[name] = self._views(buffer, name)
        self._streamed = list(plan.streamed)
        self._index = {name: i for i, name in enumerate(self._streamed)}
        depth = plan.prefetch_depth
        self._slots = [
            torch.empty(plan.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(depth)
        ]
        self._sources = [self._host_source(n) for n in self._streamed]
        self._consumed = 0  # global index of the next streamed unit the forward pass will use
        self._cond = threading.Condition()
        self._ready = 0  # streamed units [0, _ready) have been copied
        self._stop = False
        self._error: BaseException | None = None
        self._worker: threading.Thread | None = None
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._ready_events = [torch.cuda.Event() for _ in range(depth)]
            self._free_events = [torch.cuda.Event() for _ in range(depth)]
            self._issued = 0
        if self._streamed and not synchronous:
            self._start()

    # --- layout helpers ---------------------------------------------------------------------

    def _unit_bytes(self, name: str, device: torch.device) -> torch.Tensor:
        start, end = self._ranges[name]
        data = self._host[start:end]
        return data if data.device == device else data.to(device)

    def _host_source(self, name: str) -> torch.Tensor:
        start, end = self._ranges[name]
        data = self._host[start:end]
        if self._cuda and not data.is_pinned():
            data = data.pin_memory()  # pinned once, ahead of time: async H2D needs page-locked memory
        return data

    def _views(self, buffer: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        unit = self._units[name]
        base, end = self._ranges[name]
        out = {}
        for key, tensor_name in unit.tensors.items():
            e = self._manifest.tensors[tensor_name]
            if unit.rows is not None:  # a row chunk: the whole range is this tensor's rows
                shape = (unit.rows[1] - unit.rows[0], *e.shape[1:])
                out[key] = buffer[: end - base].view(getattr(torch, e.dtype)).view(shape)
            else:
                flat = buffer[e.offset - base : e.offset - base + e.nbytes]
                out[key] = flat.view(getattr(torch, e.dtype)).view(e.shape)
        return with_stacks(out)  # a slot keeps the arena's layout, so the same stacks apply

    # --- the ring ---------------------------------------------------------------------------

    def _start(self) -> None:
        if self._cuda:
            for g in range(min(self.plan.prefetch_depth, len(self._streamed))):
                self._issue_cuda(g)
        else:
            self._worker = threading.Thread(target=self._copy_loop, name="offload-copy", daemon=True)
            self._worker.start()

    def _copy_loop(self) -> None:
        depth, n = self.plan.prefetch_depth, len(self._streamed)
        g = self._ready
        while True:
            with self._cond:
                # Slot g % depth last held unit g - depth: wait until compute has released it.
                while not self._stop and self._consumed <= g - depth:
                    self._cond.wait()
                if self._stop:
                    return
            src = self._sources[g % n]
            begin = time.perf_counter()
            try:
                self._link.copy(self._slots[g % depth][: src.numel()], src)
            except BaseException as e:  # surface it in the compute thread instead of hanging it
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self.stats.copies += 1
                self.stats.bytes_copied += src.numel()
                self.stats.copy_seconds += time.perf_counter() - begin
                self._ready = g + 1
                self._cond.notify_all()
            g += 1

    def _issue_cuda(self, g: int) -> None:
        depth, n = self.plan.prefetch_depth, len(self._streamed)
        slot = g % depth
        src = self._sources[g % n]
        with torch.cuda.stream(self._copy_stream):
            if g >= depth:  # the slot's previous unit must be done computing before we overwrite it
                self._copy_stream.wait_event(self._free_events[slot])
            self._slots[slot][: src.numel()].copy_(src, non_blocking=True)
            self._ready_events[slot].record(self._copy_stream)
        self.stats.copies += 1
        self.stats.bytes_copied += src.numel()
        self._issued = g + 1

    @contextlib.contextmanager
    def unit(self, unit: Unit) -> Iterator[Mapping[str, torch.Tensor]]:
        resident = self._resident.get(unit.name)
        if resident is not None:
            yield resident
            return
        g = self._consumed
        n = len(self._streamed)
        if self._streamed[g % n] != unit.name:
            raise RuntimeError(
                f"offload ring out of order: expected {self._streamed[g % n]}, got a request for {unit.name}"
            )
        if self.synchronous:
            yield self._copy_now(self._sources[g % n])
            self._consumed = g + 1
            return
        slot = g % self.plan.prefetch_depth
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._ready_events[slot])
        else:
            begin = time.perf_counter()
            with self._cond:
                while self._ready <= g and self._error is None:
                    self._cond.wait()
                if self._ready <= g:
                    raise RuntimeError(
                        f"offload copy of {unit.name} failed: {self._error!r}"
                    ) from self._error
            self.stats.stall_seconds += time.perf_counter() - begin
        try:
            yield self._views(self._slots[slot], unit.name)
        finally:
            if self._cuda:
                self._free_events[slot].record(torch.cuda.current_stream(self.device))
                self._consumed = g + 1
                self._issue_cuda(g + self.plan.prefetch_depth)
            else:
                with self._cond:
                    self._consumed = g + 1
                    self._cond.notify_all()

    def _copy_now(self, src: torch.Tensor) -> dict[str, torch.Tensor]:
        """Synchronous baseline: copy into slot 0 and wait for the copy before computing."""
        g = self._consumed
        name = self._streamed[g % len(self._streamed)]
        begin = time.perf_counter()
        slot = self._slots[0]
        if self._cuda:
            slot[: src.numel()].copy_(src, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        else:
            self._link.copy(slot[: src.numel()], src)
        elapsed = time.perf_counter() - begin
        self.stats.copies += 1
        self.stats.bytes_copied += src.numel()
        self.stats.copy_seconds += elapsed
        self.stats.stall_seconds += elapsed
        return self._views(slot, name)

    def begin_pass(self) -> None:
        """Re-align the ring with the start of a forward pass (after a pass was interrupted)."""
        n = len(self._streamed)
        if not n or self._consumed % n == 0:
            return
        if self.synchronous:
            self._consumed = 0
            return
        self.close()
        self._consumed = self._ready = 0
        self._stop = False
        self._error = None
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self._issued = 0
        self._start()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
