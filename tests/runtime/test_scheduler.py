"""The continuous-batching scheduler on its own (pure: no model): admission, chunked prefill, blocks,
priority and preemption by recompute."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnpu.runtime.scheduler import (
    BlockAllocator,
    QueueFullError,
    Scheduler,
    SchedulerConfig,
    Sequence,
    SequenceStatus,
    StepPlan,
)

BLOCK = 4
_ids = itertools.count()


def make(max_batch: int = 4, step_tokens: int = 16, blocks: int = 64, waiting: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch, step_tokens, BLOCK, waiting), BlockAllocator(blocks))


def seq(prompt: int, priority: int = 0) -> Sequence:
    n = next(_ids)
    return Sequence(f"s{n}", list(range(1, prompt + 1)), prompt, priority, arrival=n)


def run(s: Scheduler, plan: StepPlan, token: int = 7) -> None:
    """What the engine does after a step: mark it computed, append a token to sampling sequences."""
    s.complete_step(plan)
    for chunk in plan.chunks:
        if chunk.samples:
            chunk.sequence.tokens.append(token)


def step(s: Scheduler) -> StepPlan:
    plan = s.schedule()
    run(s, plan)
    return plan


def counts(plan: StepPlan) -> dict[str, int]:
    return {c.sequence.id: c.count for c in plan.chunks}


def test_new_sequences_join_at_every_step_up_to_max_batch() -> None:
    s = make(max_batch=3)
    a, b = seq(5), seq(6)
    s.add(a)
    s.add(b)
    assert counts(step(s)) == {a.id: 5, b.id: 6}  # both prefilled in the first step
    c, d = seq(3), seq(3)
    s.add(c)
    s.add(d)
    plan = step(s)  # a and b decode one token each; c joins; d waits for a slot
    assert counts(plan) == {a.id: 1, b.id: 1, c.id: 3}
    assert [x.id for x in s.waiting] == [d.id]
    s.finish(a)  # a finished: d takes its slot at the next step
    assert counts(step(s)) == {b.id: 1, c.id: 1, d.id: 3}


def test_long_prompts_are_prefilled_in_chunks_interleaved_with_decode() -> None:
    s = make(step_tokens=8)
    short = seq(2)
    s.add(short)
    step(s)
    long = seq(20)
    s.add(long)
    plans = [step(s) for _ in range(3)]
    # The decoding sequence runs every step; the long prompt takes what the budget leaves.
    assert [counts(p) for p in plans] == [
        {short.id: 1, long.id: 7},
        {short.id: 1, long.id: 7},
        {short.id: 1, long.id: 6},
    ]
    assert [c.samples for c in plans[2].chunks] == [True, True]  # the last chunk yields a token
    assert not plans[0].chunks[1].samples
    assert long.num_computed == 20 and long.num_pending == 1


def test_blocks_follow_the_context_and_come_back_at_once() -> None:
    s = make(blocks=10)  # 9 usable (block 0 is the null block)
    a = seq(5)
    s.add(a)
    step(s)
    assert len(a.blocks) == 2 and s.allocator.used == 2 and 0 not in a.blocks
    for _ in range(3):  # 3 decode steps: 8 tokens in the cache fill 2 blocks exactly
        step(s)
    assert len(a.blocks) == 2 and a.num_computed == 8
    step(s)  # the 9th token needs a third block
    assert len(a.blocks) == 3
    s.finish(a)
    assert s.allocator.used == 0 and a.status is SequenceStatus.FINISHED


def test_abort_frees_now_or_right_after_the_step_in_flight() -> None:
    s = make()
    waiting, running, in_step = seq(3), seq(3), seq(3)
    s.add(running)
    s.add(in_step)
    step(s)
    s.add(waiting)
    assert s.abort(waiting) and waiting not in s.waiting
    assert s.abort(running) and running.status is SequenceStatus.FINISHED and running.blocks == []
    plan = s.schedule()  # in_step is being computed: its blocks stay until the step ends
    assert s.abort(in_step) and in_step.blocks and in_step.aborted
    s.complete_step(plan)
    s.finish(in_step)
    assert s.allocator.used == 0 and not s.has_work()


def test_queue_limit_counts_only_what_waits() -> None:
    s = make(max_batch=2, waiting=2)
    for _ in range(2):
        s.add(seq(2))
    step(s)  # both running: the queue is empty again
    s.add(seq(2))
    s.add(seq(2))
    with pytest.raises(QueueFullError, match="limit 2"):
        s.add(seq(2))
    assert len(s.waiting) == 2 and len(s.running) == 2


def test_a_full_queue_gives_the_worst_waiting_place_to_a_better_newcomer() -> None:
    """A replica saturated by low-priority work takes a high-priority request, which it would run (and
    preempt for) first: the worst waiting sequence is refused in its place. A newcomer of the worst's
    priority or lower is still refused, and so is one whose only worse peer already had output. The
    queue limit refused every newcomer alike, the high-priority one included."""
    s = make(max_batch=1, waiting=2)
    s.add(seq(2))
    step(s)  # the batch's one slot is taken
    early, late = seq(2), seq(2)
    s.add(early)
    s.add(late)
    used = s.allocator.used
    high = seq(2, priority=5)
    assert s.add(high) is late  # the later of the two lowest
    assert late.status is SequenceStatus.FINISHED and late.blocks == []
    assert s.waiting == [high, early] and s.allocator.used == used
    for equal_or_worse in (seq(2), seq(2, priority=-1)):
        with pytest.raises(QueueFullError, match="limit 2"):
            s.add(equal_or_worse)
    assert s.waiting == [high, early]

    s = make(max_batch=1, waiting=1)
    low = seq(2)
    s.add(low)
    step(s)
    step(s)  # low has streamed a token
    s.add(seq(2, priority=9))
    step(s)  # ... and is preempted by the better one: it waits again, with output
    assert s.waiting == [low] and low.num_generated > 0
    with pytest.raises(QueueFullError):
        s.add(seq(2, priority=3))
    assert s.waiting == [low]


def test_higher_priority_is_admitted_first() -> None:
    s = make(max_batch=1)
    first = seq(2, priority=0)
    s.add(first)
    step(s)
    low, high, mid = seq(2, priority=1), seq(2, priority=9), seq(2, priority=5)
    for x in (low, high, mid):
        s.add(x)
    assert [x.id for x in s.waiting] == [high.id, mid.id, low.id]


def test_a_better_waiting_sequence_preempts_the_worst_running_one() -> None:
    s = make(max_batch=2)
    old_low, new_low = seq(3, priority=0), seq(3, priority=0)
    s.add(old_low)
    s.add(new_low)
    step(s)
    step(s)
    high = seq(3, priority=10)
    s.add(high)
    plan = step(s)
    # Among equal priorities the latest arrival gives way; its blocks are freed and it is requeued
    # with its tokens (prompt + generated) to be recomputed.
    assert plan.preempted == (new_low,)
    assert counts(plan) == {old_low.id: 1, high.id: 3}
    assert new_low.status is SequenceStatus.WAITING and new_low.num_computed == 0 and not new_low.blocks
    assert new_low.tokens[:3] == [1, 2, 3] and len(new_low.tokens) == 5
    assert s.preemptions == 1


def test_equal_priorities_never_preempt_for_admission() -> None:
    s = make(max_batch=1)
    a, b = seq(3, priority=5), seq(3, priority=5)
    s.add(a)
    step(s)
    s.add(b)
    for _ in range(3):
        plan = step(s)
        assert not plan.preempted and counts(plan) == {a.id: 1}


def test_when_blocks_run_out_the_lowest_priority_sequence_is_recomputed() -> None:
    s = make(max_batch=4, blocks=5)  # 4 usable blocks of 4 tokens
    high, low = seq(4, priority=2), seq(4, priority=1)
    s.add(high)
    s.add(low)
    step(s)  # 1 block each, both sampled a 5th token
    plan = step(s)  # both need a second block: 4 used
    assert not plan.preempted and s.allocator.used == 4
    for _ in range(3):
        step(s)  # both at 8 tokens computed + 1 pending: the next step needs a third block each
    plan = step(s)
    assert plan.preempted == (low,) and counts(plan) == {high.id: 1}
    assert low in s.waiting and low.num_computed == 0 and low.preemptions == 1
    # Once the high-priority sequence is done, the low one is recomputed from all its tokens.
    s.finish(high)
    plan = step(s)
    assert counts(plan) == {low.id: 9} and plan.chunks[0].samples


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_the_worst() -> None:
    s = make(max_batch=4, blocks=3)  # 2 usable blocks
    high, low = seq(4, priority=2), seq(4, priority=1)
    s.add(high)
    s.add(low)
    step(s)
    plan = s.schedule()  # both need a second block; only high gets one, low gives its own back
    assert plan.preempted == (low,) and counts(plan) == {high.id: 1}
    run(s, plan)


def test_config_must_fit_one_token_per_running_sequence() -> None:
    with pytest.raises(ValueError, match="max_step_tokens"):
        SchedulerConfig(max_batch=8, max_step_tokens=4, block_size=16, max_waiting=1)


def test_a_better_newcomer_prefills_before_a_worse_prompt_in_progress() -> None:
    s = make(step_tokens=8)
    low = seq(30, priority=0)
    s.add(low)
    assert counts(step(s)) == {low.id: 8}  # its prompt takes several steps
    high = seq(6, priority=5)
    s.add(high)
    plan = step(s)
    # The newcomer's whole prompt runs first; the low prompt continues with what is left.
    assert counts(plan) == {high.id: 6, low.id: 2}
    assert [c.sequence for c in plan.chunks] == [high, low]
    plan = step(s)
    assert counts(plan) == {high.id: 1, low.id: 7}  # decode first, then prefill


def test_a_prefill_that_needs_blocks_takes_a_worse_sequence_out_of_the_step() -> None:
    """The decode pass put the low-priority sequence into the step; the high-priority prompt's next chunk
    then needs its blocks. The low one is preempted and its chunk leaves the step with it: a chunk
    whose blocks were freed cannot be run (the engine would fail the whole step)."""
    s = make(step_tokens=8, blocks=5)  # 4 usable blocks
    low = seq(3, priority=0)
    s.add(low)
    step(s)  # low is decoding from now on
    high = seq(16, priority=1)
    s.add(high)
    assert counts(step(s)) == {low.id: 1, high.id: 7}
    plan = s.schedule()  # high's next 7 tokens need 2 more blocks: only low's 2 can give them
    assert plan.preempted == (low,) and low.status is SequenceStatus.WAITING and not low.blocks
    assert counts(plan) == {high.id: 7}
    assert len(high.blocks) == 4 and s.allocator.free == 0
    run(s, plan)
    assert high.num_computed == 14 and low.num_computed == 0 and len(low.tokens) == 5


def test_no_newcomer_is_admitted_in_a_step_that_preempted_for_blocks_later_on() -> None:
    """The prefill pass preempts the low sequence for the high prompt's blocks; a newcomer of low's
    priority that arrived after it must not take the blocks that are left in that step: low, the
    earlier of the two, would wait behind it (the pool is full: admission waits for the next step)."""
    s = make(step_tokens=8, blocks=6)  # 5 usable blocks
    low = seq(3, priority=0)
    s.add(low)
    step(s)
    high = seq(16, priority=1)
    s.add(high)
    step(s)
    newcomer = seq(1, priority=0)
    s.add(newcomer)
    plan = s.schedule()
    assert plan.preempted == (low,) and counts(plan) == {high.id: 7}
    assert newcomer.status is SequenceStatus.WAITING and s.waiting == [low, newcomer]
    run(s, plan)


def check_plan(s: Scheduler, plan: StepPlan) -> None:
    """What the engine relies on: every chunk belongs to a running sequence, continues its cache and
    fits its blocks; the blocks in use are exactly those the running sequences hold."""
    cfg = s.config
    seqs = [c.sequence for c in plan.chunks]
    assert len(set(map(id, seqs))) == len(seqs)
    assert plan.num_tokens <= cfg.max_step_tokens and len(s.running) <= cfg.max_batch
    for chunk in plan.chunks:
        q = chunk.sequence
        assert q.status is SequenceStatus.RUNNING and q in s.running
        assert chunk.start == q.num_computed and chunk.count >= 1
        assert chunk.start + chunk.count <= min(len(q.tokens), len(q.blocks) * cfg.block_size)
        assert chunk.samples == (chunk.start + chunk.count == len(q.tokens))
    held = [b for q in s.running for b in q.blocks]
    assert len(set(held)) == len(held) == s.allocator.used and 0 not in held
    assert all(not q.blocks for q in s.waiting)


@settings(max_examples=300, deadline=None)
@given(
    max_batch=st.integers(1, 4),
    extra_step_tokens=st.integers(0, 12),
    blocks=st.integers(4, 12),
    events=st.lists(
        st.one_of(
            st.none(),  # a step with no arrival
            st.tuples(st.integers(1, 20), st.sampled_from([0, 0, 0, 5]), st.integers(1, 12)),
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_every_plan_fits_under_mixed_priorities_and_a_small_pool(
    max_batch: int,
    extra_step_tokens: int,
    blocks: int,
    events: list[tuple[int, int, int] | None],
) -> None:
    """Random arrivals (prompt, priority, tokens to generate) under a small block pool, one step after
    each event and then until every sequence is done: each plan satisfies :func:`check_plan`, and
    every sequence finishes with the tokens it asked for."""
    s = make(max_batch, max_batch + extra_step_tokens, blocks, waiting=64)
    capacity = (blocks - 1) * BLOCK  # a sequence never outgrows the pool (the engine's max_context)
    wanted: dict[str, int] = {}  # sequence id -> tokens it generates
    done: list[Sequence] = []

    def one_step() -> None:
        plan = s.schedule()
        check_plan(s, plan)
        run(s, plan)
        for chunk in plan.chunks:
            q = chunk.sequence
            if chunk.samples and q.num_generated == wanted[q.id]:
                s.finish(q)
                done.append(q)

    for event in events:
        if event is not None:
            prompt, priority, generate = event
            q = seq(min(prompt, capacity), priority)
            wanted[q.id] = min(generate, capacity - q.prompt_len + 1)
            s.add(q)
        if s.has_work():
            one_step()
    for _ in range(10_000):
        if not s.has_work():
            break
        one_step()
    assert not s.has_work() and s.allocator.used == 0
    assert {q.id: q.num_generated for q in done} == wanted


def test_a_burst_below_the_free_slots_is_not_refused() -> None:
    """A burst arrives before any step: what the next step admits into free slots is not queued."""
    s = make(max_batch=4, waiting=0)
    burst = [seq(2) for _ in range(4)]
    for sequence in burst:
        s.add(sequence)  # no step in between: all four wait, but each has a free slot
    with pytest.raises(QueueFullError, match="limit 0"):
        s.add(seq(2))
    assert counts(step(s)) == {sequence.id: 2 for sequence in burst}  # all admitted at once
    with pytest.raises(QueueFullError):
        s.add(seq(2))  # the batch is full: nothing may wait
