"""Async offload: keep what fits resident, stream the rest through a ring of prefetch buffers.

Two parts:

* :func:`vnpu.runtime.offload_plan.plan_offload` (pure, torch-free): under a device budget, choose
  resident units by priority — every block's attention, then the output head, then the feed-forward
  blocks (the pipelined-sharding order) — reserving ``prefetch_depth`` slots of the largest streamed
  unit. Everything else streams.
* :class:`OffloadedWeights` (here): a :class:`~vnpu.runtime.model.WeightProvider` that copies streamed units
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
from dataclasses import dataclass

import torch

from vnpu.runtime.manifest import WeightManifest
from vnpu.runtime.model import with_stacks
from vnpu.runtime.offload_plan import OffloadPlan, ResidentPart, resident_layout, unit_byte_range
from vnpu.runtime.units import Unit


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
                slot = mapped[name]
                buffer = resident_part.arena.byte_tensor()[slot.offset : slot.offset + slot.end - slot.start]
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
