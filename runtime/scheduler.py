"""Continuous batching with KV priority: which sequences run in the next step, and who gives way.

Pure logic (no torch, no threads): the engine (:mod:`vnpu.runtime.engine`) calls :meth:`Scheduler.schedule`
before every forward step and reports the step's results back; the paged KV cache
(:mod:`vnpu.runtime.paged`) holds the tensors whose blocks :class:`BlockAllocator` hands out.

One step, in the order vLLM's scheduler uses (``vllm/v1/core/sched/scheduler.py``), scaled down:

1. **Priority preemption for admission.** While the best waiting sequence outranks the worst running
   one and cannot be admitted (the batch is at ``max_batch``, or the free blocks do not hold its next
   chunk), the worst running sequence is preempted. This is vLLM V0's ``_schedule_priority_preemption``;
   it is what keeps a high-priority request's time to first token close to its idle value on a replica
   saturated by low-priority work (the issue's "keep KV for high-priority agents").
2. **Decode**: every running sequence past its prompt gets one token, best first. When a sequence
   needs a block and none is free, the worst running sequence — possibly itself — is preempted, as
   vLLM V1 does.
3. **Prefill chunks, by rank**: running sequences still prefilling their prompt (or recomputing after
   a preemption) and waiting sequences share what is left of the step's token budget, best first, so
   chunked prefill interleaves with decode (no decode waits for a long prompt) and a high-priority
   newcomer is not queued behind a low-priority prompt's remaining chunks. A prefilling sequence short
   of blocks preempts as in decode; a worse victim that decode already put into the step leaves it
   (its token goes back to the budget), as vLLM V1 unschedules it. Waiting sequences are
   admitted while batch slots and blocks last (not in a step that had to preempt for blocks: the pool
   is full), and no waiting sequence jumps ahead of a better one that does not fit.

Rank: higher ``priority`` first (as a Kubernetes PriorityClass; the model's ``spec.priority`` is the
default), then earlier arrival. Equal priorities never preempt each other for admission, so there is
no thrashing among peers.

**Preemption is by recompute, not swap.** A preempted sequence frees all its blocks at once and goes
back to the waiting queue with its tokens (prompt + what it generated so far, which the client already
has); when re-admitted, its whole context is prefilled again in chunks and generation continues where
it stopped (a seeded sampler keeps its state, so the continuation is the same stream). Reasons, as in
vLLM V1 (which dropped swapping): recompute needs no second memory tier or copy path; a prefill of a
few hundred tokens costs about one decode step of a full batch here (weights dominate, not attention),
so recompute is cheap for this runtime's small models; and on CPU — the device every test machine has —
"host memory" *is* the device memory, so a swap would only copy the KV within the same budget. The
cost is compute for long contexts, which the priority order confines to low-priority work.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit (answered with HTTP 429)."""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int  #: running sequences at most (``spec.memory.maxBatch``)
    max_step_tokens: int  #: tokens per forward step: decode tokens plus prefill chunks
    block_size: int
    max_waiting: int  #: sequences waiting beyond the free batch slots at most; more are refused (429)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.block_size < 1 or self.max_waiting < 0:
            raise ValueError(f"invalid scheduler config {self}")
        if self.max_step_tokens < self.max_batch:
            raise ValueError(
                f"a step must fit one token per running sequence: max_step_tokens {self.max_step_tokens} "
                f"< max_batch {self.max_batch}"
            )


class BlockAllocator:
    """Free list of KV blocks ``first..num_blocks-1`` (block 0 is the paged cache's null block)."""

    def __init__(self, num_blocks: int, first: int = 1) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, first - 1, -1))  # pop() hands out low ids first
        self.total = len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.total - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"{count} blocks requested, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: Iterable[int]) -> None:
        self._free.extend(blocks)


@dataclass(eq=False)
class Sequence:
    """A request's state as the scheduler sees it. ``tokens`` = prompt + generated."""

    id: str
    tokens: list[int]
    prompt_len: int
    priority: int
    arrival: int  #: admission order among equals (a counter, not a clock)
    num_computed: int = 0  #: leading tokens whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    preemptions: int = 0
    aborted: bool = False
    in_step: bool = False  #: part of the step being computed (its blocks are in use)

    @property
    def num_pending(self) -> int:
        """Tokens to run before the next one can be sampled (1 while decoding)."""
        return len(self.tokens) - self.num_computed

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def rank(self) -> tuple[int, int]:
        """Larger ranks first: higher priority, then earlier arrival."""
        return (self.priority, -self.arrival)


@dataclass(frozen=True)
class ScheduledChunk:
    sequence: Sequence
    start: int  #: first position run this step (== sequence.num_computed when scheduled)
    count: int  #: tokens run this step
    #: The chunk reaches the end of the sequence's tokens: its last logits give the next token.
    samples: bool


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.count for c in self.chunks)


class Scheduler:
    """Waiting queue, running set and block pool of one replica (see module docstring)."""

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: list[Sequence] = []  #: best first
        self.running: list[Sequence] = []
        self.preemptions = 0

    # --- queue -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> Sequence | None:
        """Queue a new sequence when fewer than ``max_waiting`` sequences wait for a batch slot.
        Sequences that the next step admits straight into a free slot do not count: a burst on an idle
        replica is refused only past its free slots plus ``max_waiting`` (counting them made an idle
        ``max_batch`` 16, ``max_queue`` 4 replica refuse 8 of 12 requests).

        On a full queue a newcomer that outranks the worst waiting sequence with no output yet takes
        its place: that one is returned, finished, and its request fails as refused (the engine answers
        it with QueueFullError), since the newcomer is what the scheduler would run, and preempt for,
        first. A full queue of better or equal ranks raises QueueFullError."""
        blocks_needed = -(-len(seq.tokens) // self.config.block_size)
        if blocks_needed > self.allocator.total:
            raise ValueError(f"a sequence of {len(seq.tokens)} tokens can never fit the KV pool")
        displaced = None
        free_slots = max(0, self.config.max_batch - len(self.running))
        if len(self.waiting) >= self.config.max_waiting + free_slots:
            displaced = self._displaceable(seq)
            if displaced is None:
                raise QueueFullError(f"too many queued requests (limit {self.config.max_waiting})")
            self.waiting.remove(displaced)
            self._release(displaced)
        self._enqueue(seq)
        return displaced

    def _displaceable(self, newcomer: Sequence) -> Sequence | None:
        """The worst waiting sequence ``newcomer`` outranks whose client has had no output (a
        preempted sequence that already streamed tokens is not refused after the fact), if any."""
        for seq in reversed(self.waiting):  # worst first
            if seq.rank >= newcomer.rank:
                return None
            if seq.num_generated == 0 and not seq.in_step:
                return seq
        return None

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: (-s.priority, s.arrival))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> bool:
        """Stop ``seq``: its blocks go back now unless the step in flight uses them (then :meth:`finish`
        after the step). Returns whether it was still queued or running."""
        if seq.status is SequenceStatus.FINISHED:
            return False
        seq.aborted = True
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self._release(seq)
        elif not seq.in_step:
            self.finish(seq)
        return True

    def finish(self, seq: Sequence) -> None:
        """The sequence is done (stopped, cancelled or failed): free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.release(seq.blocks)
        seq.blocks = []
        seq.status = SequenceStatus.FINISHED

    # --- one step ----------------------------------------------------------------------------

    def _blocks_for(self, seq: Sequence, count: int) -> int:
        needed = -(-(seq.num_computed + count) // self.config.block_size)
        return max(0, needed - len(seq.blocks))

    def _worst_running(self) -> Sequence:
        return min(self.running, key=lambda s: s.rank)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self._enqueue(seq)

    def preempt_all(self) -> None:
        """Send every running sequence back to the queue (its cache must be recomputed)."""
        for seq in list(self.running):
            self._preempt(seq)

    def schedule(self) -> StepPlan:
        cfg = self.config
        budget = cfg.max_step_tokens
        preempted: list[Sequence] = []
        # 1. A better waiting sequence takes the place of the worst running one.
        while self.waiting and self.running:
            top, worst = self.waiting[0], self._worst_running()
            if top.priority <= worst.priority:
                break
            first_chunk = min(top.num_pending, budget)
            if len(self.running) < cfg.max_batch and self.allocator.free >= self._blocks_for(
                top, first_chunk
            ):
                break
            self._preempt(worst)
            preempted.append(worst)
        chunks: list[ScheduledChunk] = []
        short_of_blocks = False

        def grow(seq: Sequence, count: int) -> bool:
            """Blocks for ``count`` more tokens of running ``seq``, preempting the worst running
            sequences while none are free; False when ``seq`` itself had to give way.

            A prefilling sequence can outrank one the decode pass already put into this step: that
            victim's chunk leaves the step and its tokens go back to the budget (as vLLM V1 unschedules
            a preempted request), since a chunk whose blocks were freed cannot be run."""
            nonlocal short_of_blocks, budget
            while self.allocator.free < self._blocks_for(seq, count):
                victim = self._worst_running()
                self._preempt(victim)
                preempted.append(victim)
                short_of_blocks = True
                if victim is seq:
                    return False
                for i, chunk in enumerate(chunks):
                    if chunk.sequence is victim:
                        budget += chunks.pop(i).count
                        break
            seq.blocks += self.allocator.allocate(self._blocks_for(seq, count))
            return True

        # 2. Decode: one token for every running sequence past its prompt, best first.
        for seq in sorted(self.running, key=lambda s: s.rank, reverse=True):
            if budget and seq.status is SequenceStatus.RUNNING and seq.num_pending == 1 and grow(seq, 1):
                chunks.append(ScheduledChunk(seq, seq.num_computed, 1, True))
                budget -= 1
        # 3. Prefill chunks in rank order: running sequences still prefilling (or recomputing after a
        #    preemption) and waiting ones, admitted while batch slots and blocks last. A newcomer that
        #    outranks a sequence in the middle of a long prefill gets the step's budget first.
        admitting = True  # and no preemption for blocks in this step (the pool is full), even a later one
        prefilling = [s for s in self.running if s.num_pending > 1]
        for seq in sorted(prefilling + self.waiting, key=lambda s: s.rank, reverse=True):
            if budget == 0:
                break
            count = min(seq.num_pending, budget)
            if seq.status is SequenceStatus.RUNNING:
                if not grow(seq, count):
                    admitting = False
                    continue
            elif (
                seq.status is SequenceStatus.WAITING
                and admitting
                and not short_of_blocks
                and seq in self.waiting
            ):
                needed = self._blocks_for(seq, count)
                if len(self.running) >= cfg.max_batch or self.allocator.free < needed:
                    admitting = False  # no later (lower-ranked) waiting sequence jumps ahead of it
                    continue
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                seq.blocks += self.allocator.allocate(needed)
            else:
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed, count, count == seq.num_pending))
            budget -= count
        for chunk in chunks:
            chunk.sequence.in_step = True
        return StepPlan(tuple(chunks), tuple(preempted))

    def complete_step(self, plan: StepPlan) -> None:
        """The step ran: its tokens are in the cache. (Sampled tokens are appended by the caller.)"""
        for chunk in plan.chunks:
            seq = chunk.sequence
            seq.in_step = False
            if seq.status is SequenceStatus.RUNNING:
                seq.num_computed = chunk.start + chunk.count
