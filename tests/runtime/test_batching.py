"""Continuous batching in the engine: batched greedy output equals each sequence alone (and
transformers'), with resident, offloaded and attached weights; priority admission and preemption;
cancellation and weight loss free the KV blocks."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from rt_helpers import load_tiny_llama
from test_model import hf_greedy, hf_model

from vnpu import sharing
from vnpu.runtime.engine import GenerationRequest, ModelRuntime, RequestOutput, ServeOptions
from vnpu.runtime.errors import MemoryBudgetError, RuntimeUnavailableError
from vnpu.runtime.holder import WeightsHolder
from vnpu.runtime.offload_plan import build_resident_part, plan_for
from vnpu.runtime.sampling import SamplingParams
from vnpu.runtime.supervisor import SharedWeightsSupervisor
from vnpu.runtime.tokenizer import Tokenizer

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain recursion to a child in two sentences.",
    "def fibonacci(n):",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Name a famous painting by Leonardo da Vinci and say where it hangs today.",
]


def wait_until(condition: Callable[[], Any], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@contextmanager
def engine_paused(runtime: ModelRuntime) -> Iterator[None]:
    """Hold the engine between two steps (it takes the model lock for every step), so that what is
    submitted meanwhile is scheduled together at the next step."""
    with runtime._lock:
        yield


class Collector:
    """A request's outputs as the engine delivers them, with when each came."""

    def __init__(self) -> None:
        self.outputs: queue.SimpleQueue[tuple[float, RequestOutput]] = queue.SimpleQueue()
        self.seen: list[tuple[float, RequestOutput]] = []

    def __call__(self, output: RequestOutput) -> None:
        self.outputs.put((time.monotonic(), output))

    def wait(self, timeout: float = 120.0) -> RequestOutput:
        while not self.seen or self.seen[-1][1].finish_reason is None:
            self.seen.append(self.outputs.get(timeout=timeout))
        return self.seen[-1][1]

    @property
    def tokens(self) -> list[int]:
        return [t for _, out in self.seen for t in out.token_ids]

    @property
    def first_token_at(self) -> float:
        return next(at for at, out in self.seen if out.token_ids)

    @property
    def finished_at(self) -> float:
        return self.seen[-1][0]


def greedy(max_tokens: int, ignore_eos: bool = True) -> SamplingParams:
    return SamplingParams(max_tokens, temperature=0.0, ignore_eos=ignore_eos)


def submit_all(
    runtime: ModelRuntime,
    prompts: list[list[int]],
    params: SamplingParams,
    priorities: list[int] | None = None,
) -> list[Collector]:
    collectors = []
    with engine_paused(runtime):
        for i, ids in enumerate(prompts):
            c = Collector()
            priority = priorities[i] if priorities else None
            runtime.submit(GenerationRequest(tuple(ids), params, priority), c)
            collectors.append(c)
    for c in collectors:
        c.wait()
    return collectors


def step_count(runtime: ModelRuntime) -> float:
    return next(
        s.value for m in runtime.metrics.batch_size.collect() for s in m.samples if s.name.endswith("_count")
    )


def steps_with_more_than(runtime: ModelRuntime, sequences: int) -> float:
    """How many forward steps ran more than ``sequences`` sequences (from the batch-size histogram)."""
    total = below = 0.0
    for metric in runtime.metrics.batch_size.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                total = sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == sequences:
                below = sample.value
    return total - below


# --- the real model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_weights: Any) -> Iterator[ModelRuntime]:
    runtime = ModelRuntime(ServeOptions(max_context=256, max_batch=8, prefill_chunk=64, model_name="smol"))
    runtime.install(smollm2_weights.manifest, smollm2_weights.arena, shared=False, seconds=0)
    yield runtime
    runtime.close()


def chat_ids(runtime: ModelRuntime, text: str) -> list[int]:
    template = runtime.chat_template
    assert template is not None
    return runtime.tokenize(template.render([{"role": "user", "content": text}]))


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_eight_concurrent_prompts_match_each_alone_and_transformers(
    smol: ModelRuntime, smollm2_weights: Any
) -> None:
    steps = 16
    prompts = [chat_ids(smol, text) for text in CHAT_PROMPTS]
    assert len({len(p) for p in prompts}) > 3  # different lengths: padding and masks are exercised
    batched = submit_all(smol, prompts, greedy(steps))
    assert steps_with_more_than(smol, 4) >= 1  # the eight really ran in one batch
    alone = [submit_all(smol, [p], greedy(steps))[0] for p in prompts]
    reference = hf_model(smollm2_weights)
    for i, prompt in enumerate(prompts):
        expected, _ = hf_greedy(reference, prompt, steps)
        assert alone[i].tokens == expected, CHAT_PROMPTS[i]
        assert batched[i].tokens == expected, CHAT_PROMPTS[i]
    assert smol.stats()["blocks_used"] == 0  # every finished sequence gave its blocks back


def test_chunked_prefill_of_a_long_prompt_interleaves_with_decode(smol: ModelRuntime) -> None:
    """A prompt longer than the step budget is prefilled over several steps while others decode; the
    result does not depend on how the prompt was split."""
    long_prompt = chat_ids(smol, " ".join(CHAT_PROMPTS) * 2)
    assert len(long_prompt) > 2 * smol.options.prefill_chunk
    short = chat_ids(smol, CHAT_PROMPTS[2])
    together = submit_all(smol, [short, long_prompt], greedy(8))
    alone = submit_all(smol, [long_prompt], greedy(8))[0]
    assert together[1].tokens == alone.tokens
    # The short one decoded while the long one was still being prefilled.
    assert together[0].first_token_at < together[1].first_token_at


# --- the tiny model: engine mechanics -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", layers=4)


def runtime_for(weights: Any, **options: Any) -> ModelRuntime:
    runtime = ModelRuntime(ServeOptions(**{"max_context": 96, "max_batch": 4, **options}))
    runtime.install(weights.manifest, weights.arena, shared=False, seconds=0)
    return runtime


def tiny_prompts(n: int) -> list[list[int]]:
    return [[(7 * i + j) % 250 + 3 for j in range(5 + 6 * i)] for i in range(n)]


def alone_tokens(runtime: ModelRuntime, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [submit_all(runtime, [p], params)[0].tokens for p in prompts]


def test_offloaded_weights_stream_each_layer_once_per_step_for_the_whole_batch(tiny: Any) -> None:
    resident = runtime_for(tiny)
    offloaded = runtime_for(tiny, offload_budget_mib=0.25, prefetch_depth=2)
    try:
        plan = offloaded.plan
        assert plan is not None and plan.streamed
        prompts = tiny_prompts(4)
        expected = alone_tokens(resident, prompts, greedy(20))
        provider = offloaded._installed.provider  # type: ignore[union-attr]
        copies_before = provider.stats.copies
        batched = submit_all(offloaded, prompts, greedy(20))
        assert [c.tokens for c in batched] == expected
        steps = step_count(offloaded)
        assert steps_with_more_than(offloaded, 2) >= 1
        copies = provider.stats.copies - copies_before
        n = len(plan.streamed)
        # One pass of the ring per step, whatever the batch size (plus at most a ring's prefetch).
        assert steps * n <= copies + plan.prefetch_depth and copies <= (steps + 1) * n + plan.prefetch_depth
        assert steps < 4 * 20  # far fewer steps than sequences x tokens: the batch shared them
    finally:
        resident.close()
        offloaded.uninstall("done")
        offloaded.close()


@contextmanager
def attached_to(holder: WeightsHolder, **options: Any) -> Iterator[ModelRuntime]:
    """A replica attached to ``holder`` (started here), ready; stops both at the end."""
    holder.start()
    attached = ModelRuntime(ServeOptions(**{"max_context": 96, "max_batch": 4, **options}))
    supervisor = SharedWeightsSupervisor(
        attached, holder.socket_path, holder.identity, SHARE_KEY, retry_initial=0.05
    )
    supervisor.start()
    try:
        wait_until(lambda: attached.ready)
        yield attached
    finally:
        supervisor.stop()
        holder.stop()
        attached.close()


SHARE_KEY = b"b" * 32  #: the key of the share groups of this module's holders


def assert_answers_as_loaded(runtime: ModelRuntime, weights: Any) -> None:
    """Four prompts batched on ``runtime`` give each the tokens it gets alone on ``weights`` loaded."""
    standalone = runtime_for(weights)
    try:
        prompts = tiny_prompts(4)
        expected = alone_tokens(standalone, prompts, greedy(12))
        assert [c.tokens for c in submit_all(runtime, prompts, greedy(12))] == expected
    finally:
        standalone.close()


def test_batching_over_weights_attached_from_a_holder(tiny: Any, short_tmp: Path) -> None:
    own = load_tiny_llama(short_tmp / "m", layers=4)  # the same weights; the holder closes its arena
    identity = sharing.ShareIdentity("ns", "group-b", "w1")
    holder = WeightsHolder(own, identity, SHARE_KEY, short_tmp / "s" / "weights.sock")
    with attached_to(holder) as attached:
        assert_answers_as_loaded(attached, tiny)


@pytest.mark.parametrize("same_plan", [True, False], ids=["same-plan", "other-plan"])
def test_offloaded_replicas_map_the_holders_resident_units(
    tiny: Any, short_tmp: Path, same_plan: bool
) -> None:
    """Under async offload on a device the holder keeps the resident units in a device arena of its own
    (its slices pay for them) and grants it beside the host arena; a replica of the same plan maps
    those units there instead of copying them into its own device memory, which its slices do not
    pay for. One of another plan cannot use them: it copies (from the host arena here, on CPU) and
    answers the same. A CPU arena stands in for the device one: the grant and the views are the same."""
    own = load_tiny_llama(short_tmp / "m", layers=4)
    holder_plan = plan_for(own.manifest, 0.25, 2, None)
    assert holder_plan.resident and holder_plan.streamed
    part = build_resident_part(own.manifest, own.arena, holder_plan, "cpu")
    assert part.arena.nbytes == holder_plan.resident_bytes
    identity = sharing.ShareIdentity("ns", "group-r", "w1")
    path = short_tmp / "s" / "weights.sock"
    holder = WeightsHolder(own, identity, SHARE_KEY, path, resident=part)
    with attached_to(holder, offload_budget_mib=0.25 if same_plan else 0.2) as attached:
        assert holder.info()["resident_bytes"] == holder_plan.resident_bytes
        installed = attached._installed
        assert installed is not None
        lease = installed.keep[1]
        assert lease.resident is not None and list(lease.resident.units) == holder_plan.resident
        assert (attached.plan == holder_plan) is same_plan
        provider = installed.provider
        resident_span = _span(lease.resident.arena.byte_tensor())
        host_span = _span(lease.arena.byte_tensor())
        for name in attached.plan.resident:
            for tensor in provider._resident[name].values():
                start = tensor.data_ptr()
                inside = resident_span[0] <= start < resident_span[1]
                assert inside is same_plan
                assert (host_span[0] <= start < host_span[1]) is not same_plan
        assert_answers_as_loaded(attached, tiny)


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()


def test_a_replica_that_copies_the_resident_units_counts_them_as_its_own(tiny: Any) -> None:
    """Attached under offload, a replica pays for no weight it maps; the resident units it copies to
    its device (no resident part granted, or one of another plan) it does pay for: left out, it
    reserved a KV pool its limit could not hold beside them."""
    runtime = ModelRuntime(ServeOptions(max_context=96, offload_budget_mib=0.25))
    plan = plan_for(tiny.manifest, 0.25, 2, None)
    mapped = runtime.budget(tiny.manifest, True, plan.ring_bytes, plan).required()
    copied = runtime.budget(tiny.manifest, True, plan.ring_bytes, plan, resident_copied=True).required()
    own = runtime.budget(tiny.manifest, False, plan.ring_bytes, plan).required()
    assert mapped["weights"] == 0
    assert copied["weights"] == own["weights"] == plan.resident_bytes


def test_preemption_when_blocks_run_out_keeps_greedy_outputs(tiny: Any) -> None:
    """Four sequences that need 4 blocks each share a pool of 6: the lowest-priority ones are
    preempted and recomputed, and every output is still the one it has alone."""
    runtime = runtime_for(tiny, max_context=64, kv_blocks=6)
    try:
        prompts = [[(5 * i + j) % 250 + 3 for j in range(12)] for i in range(4)]
        expected = alone_tokens(runtime, prompts, greedy(40))
        before = runtime.stats()["preemptions"]
        batched = submit_all(runtime, prompts, greedy(40), priorities=[0, 1, 2, 3])
        assert [c.tokens for c in batched] == expected
        assert runtime.stats()["preemptions"] > before
        assert runtime.metrics.preemptions._value.get() > 0
        # The most important sequence is never the one preempted: it finishes first.
        assert min(batched, key=lambda c: c.finished_at) is batched[3]
        assert runtime.stats()["blocks_used"] == 0
    finally:
        runtime.close()


def test_a_prefill_that_preempts_a_sequence_already_in_the_step_fails_no_request(tiny: Any) -> None:
    """A long high-priority prompt, prefilled in chunks, needs the blocks of a low-priority sequence the
    decode pass already put into the step: the low one leaves the step and is recomputed later; no
    request ends with an error and both outputs are the ones each has alone."""
    options = {"max_context": 16, "max_batch": 4, "prefill_chunk": 8, "block_size": 4}
    alone = runtime_for(tiny, **options)
    runtime = ModelRuntime(ServeOptions(**options, kv_blocks=4), engine_thread=False)
    runtime.install(tiny.manifest, tiny.arena, shared=False, seconds=0)
    try:
        prompts = [[5, 6, 7], list(range(10, 24))]
        expected = [
            alone_tokens(alone, [prompts[0]], greedy(12))[0],
            alone_tokens(alone, [prompts[1]], greedy(2))[0],
        ]
        low, high = Collector(), Collector()
        runtime.submit(GenerationRequest(tuple(prompts[0]), greedy(12), priority=0), low)
        runtime._step()  # low is prefilled and decodes from now on
        runtime.submit(GenerationRequest(tuple(prompts[1]), greedy(2), priority=1), high)
        runtime._step()  # low decodes; high prefills 7 of its 14 tokens
        runtime._step()  # high's next chunk needs low's blocks
        assert runtime.stats()["preemptions"] == 1
        while runtime.stats()["running"] or runtime.stats()["waiting"]:
            runtime._step()
        assert [c.wait(timeout=1).finish_reason for c in (low, high)] == ["length", "length"]
        assert [low.tokens, high.tokens] == expected
        assert runtime.stats()["blocks_used"] == 0
    finally:
        alone.close()
        runtime.close()


def test_higher_priority_requests_are_admitted_first(tiny: Any) -> None:
    runtime = runtime_for(tiny, max_batch=1)
    try:
        prompts = tiny_prompts(3)
        order = submit_all(runtime, prompts, greedy(6), priorities=[0, 0, 7])
        assert order[2].first_token_at < order[0].first_token_at < order[1].first_token_at
    finally:
        runtime.close()


def test_a_high_priority_arrival_preempts_the_lowest_running_sequence(tiny: Any) -> None:
    runtime = runtime_for(tiny, max_batch=2, max_context=96)
    try:
        prompts = tiny_prompts(3)
        expected = alone_tokens(runtime, prompts, greedy(60))
        low = [Collector(), Collector()]
        with engine_paused(runtime):
            for ids, c in zip(prompts[:2], low, strict=True):
                runtime.submit(GenerationRequest(tuple(ids), greedy(60), priority=0), c)
        wait_until(lambda: len(low[1].seen) or not low[1].outputs.empty())  # both are decoding
        high = Collector()
        with engine_paused(runtime):
            assert runtime.stats()["running"] == 2
            runtime.submit(GenerationRequest(tuple(prompts[2]), greedy(60), priority=5), high)
        for c in (*low, high):
            c.wait()
        assert runtime.stats()["preemptions"] >= 1
        # The batch was full: the high-priority request got a slot at once, not after a low one ended.
        assert high.first_token_at < min(c.finished_at for c in low)
        assert [c.tokens for c in (*low, high)] == expected
    finally:
        runtime.close()


def test_cancelling_frees_the_blocks_at_once(tiny: Any) -> None:
    runtime = runtime_for(tiny, max_context=96, link_bytes_per_s=2e6, offload_budget_mib=0.25)
    try:
        collector = Collector()
        handle = runtime.submit(GenerationRequest(tuple(tiny_prompts(1)[0]), greedy(80)), collector)
        wait_until(lambda: runtime.stats()["blocks_used"] > 0 and not collector.outputs.empty())
        assert handle.abort()
        wait_until(lambda: runtime.stats()["blocks_used"] == 0)  # at most the step in flight later
        last = collector.wait()
        assert last.finish_reason == "cancelled" and len(collector.tokens) < 80
        assert runtime.stats() | {"preemptions": 0} == {
            "running": 0,
            "waiting": 0,
            "blocks_used": 0,
            "blocks_total": runtime.stats()["blocks_total"],
            "preemptions": 0,
        }
        assert not handle.abort()  # a second cancel is a no-op
    finally:
        runtime.uninstall("done")
        runtime.close()


def test_losing_the_weights_ends_running_requests_with_the_reason(tiny: Any) -> None:
    runtime = runtime_for(tiny, link_bytes_per_s=2e6, offload_budget_mib=0.25)
    try:
        collector = Collector()
        runtime.submit(GenerationRequest(tuple(tiny_prompts(1)[0]), greedy(80)), collector)
        wait_until(lambda: not collector.outputs.empty())
        runtime.uninstall("weights-holder went away")
        last = collector.wait()
        assert last.finish_reason == "error" and isinstance(last.error, RuntimeUnavailableError)
        assert "went away" in str(last.error)
        assert runtime.stats()["blocks_used"] == 0
        with pytest.raises(RuntimeUnavailableError, match="went away"):
            runtime.submit(GenerationRequest((5, 6), greedy(2)), Collector())
    finally:
        runtime.close()


def test_seeded_sampling_does_not_depend_on_the_batch(tiny: Any) -> None:
    runtime = runtime_for(tiny)
    try:
        prompts = tiny_prompts(3)
        params = SamplingParams(16, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)
        alone = alone_tokens(runtime, prompts, params)
        assert [c.tokens for c in submit_all(runtime, prompts, params)] == alone
    finally:
        runtime.close()


# --- the KV pool and the memory budget --------------------------------------------------------------


def test_kv_pool_is_sized_by_the_memory_budget(tiny: Any) -> None:
    manifest = tiny.manifest
    unlimited = ModelRuntime(ServeOptions(max_context=96, max_batch=4))
    assert unlimited.kv_blocks(manifest, False, 0) == 4 * 6  # maxBatch x maxContext, in blocks
    block = 16 * manifest.config.kv_bytes_per_token(4)  # one 16-token block of float32 keys and values
    limited = ModelRuntime(ServeOptions(max_context=96, max_batch=64, memory_limit_mib=2))
    blocks = limited.kv_blocks(manifest, False, 0)
    assert 6 <= blocks < 64 * 6  # what the limit leaves, not maxBatch x maxContext
    needs = limited.required_bytes(manifest, False, 0)
    assert needs["kv_cache"] == (blocks + 1) * block  # + the null block
    # The most the limit buys: one more block (its keys and values, and its share of a step's context
    # gather) would not fit.
    one_more = ModelRuntime(
        ServeOptions(max_context=96, max_batch=64, memory_limit_mib=2, kv_blocks=blocks + 1)
    )
    assert sum(needs.values()) <= 2 * 1024 * 1024 < sum(one_more.required_bytes(manifest, False, 0).values())
    attached = ModelRuntime(ServeOptions(max_context=96, max_batch=64, memory_limit_mib=2))
    assert attached.kv_blocks(manifest, True, 0) > blocks  # the holder pays for the weights
    with pytest.raises(MemoryBudgetError, match="one sequence of --max-context 4096"):
        ModelRuntime(ServeOptions(max_context=4096, memory_limit_mib=2)).kv_blocks(manifest, False, 0)
    with pytest.raises(MemoryBudgetError, match="cannot hold one sequence"):
        ModelRuntime(ServeOptions(max_context=96, kv_blocks=3)).kv_blocks(manifest, False, 0)


def test_tokenizer_builds_outside_the_model_lock(tiny: Any) -> None:
    """Installing (which builds the tokenizer) never blocks on a step in flight until the swap."""
    runtime = runtime_for(tiny)
    try:
        built = threading.Event()
        original = Tokenizer.__init__

        def spy(self: Tokenizer, spec: Any) -> None:
            assert not runtime._lock.locked()
            original(self, spec)
            built.set()

        Tokenizer.__init__ = spy  # type: ignore[method-assign]
        try:
            runtime.install(tiny.manifest, tiny.arena, shared=False, seconds=0)
        finally:
            Tokenizer.__init__ = original  # type: ignore[method-assign]
        assert built.is_set() and runtime.ready
        assert torch.equal(torch.tensor(runtime.tokenize("ab")), torch.tensor([97, 98]))
    finally:
        runtime.close()


def test_nonfinite_logits_fail_only_their_request(tiny: Any) -> None:
    """One request's logits overflow to NaN (the forward pass is patched to do it to the row of the
    request whose prompt holds a marker token). That request alone ends with an error; its neighbours
    in the same step, greedy and seeded, finish with the tokens they get alone. torch.multinomial
    raised on the NaN row for the whole batch, failing every request of the step."""
    marker = 2  # in no prompt of tiny_prompts (their ids are from 3)
    runtime = runtime_for(tiny)
    try:
        neighbours = tiny_prompts(2)
        seeded = SamplingParams(12, temperature=0.8, seed=99, ignore_eos=True)
        alone = [submit_all(runtime, [neighbours[0]], greedy(12))[0].tokens]
        alone.append(submit_all(runtime, [neighbours[1]], seeded)[0].tokens)
        assert runtime._installed is not None
        model = runtime._installed.model
        forward = model.forward_batch

        def overflowing(layout: Any, cache: Any) -> torch.Tensor:
            logits = forward(layout, cache).clone()
            ids, start = layout.input_ids.tolist(), 0
            for row, end in enumerate(layout.sample_rows.tolist()):  # every chunk samples here
                if marker in ids[start : end + 1]:
                    logits[row] = float("nan")
                start = end + 1
            return logits

        model.forward_batch = overflowing
        for poisoned in (SamplingParams(12, temperature=1.0, seed=5), greedy(12)):
            collectors = []
            with engine_paused(runtime):  # all three in one step
                for ids, params in (
                    (neighbours[0], greedy(12)),
                    ([marker, 5, 6, 7], poisoned),
                    (neighbours[1], seeded),
                ):
                    collectors.append(Collector())
                    runtime.submit(GenerationRequest(tuple(ids), params), collectors[-1])
            ends = [c.wait() for c in collectors]
            assert [e.finish_reason for e in (ends[0], ends[2])] == ["length", "length"]
            assert [collectors[0].tokens, collectors[2].tokens] == alone
            assert ends[1].finish_reason == "error" and "not finite" in str(ends[1].error)
            assert collectors[1].tokens == []
            wait_until(lambda: runtime.stats()["blocks_used"] == 0)
    finally:
        runtime.close()


@pytest.mark.parametrize("failure", ["nonfinite logits", "step raises"])
def test_a_request_whose_kv_went_nonfinite_leaves_its_blocks_clean(tiny: Any, failure: str) -> None:
    """An overflow reaches a request's keys and values (inf, NaN) as well as its logits, or the step
    fails after writing them. The request fails; the next one, which gets its freed blocks (the free
    list is LIFO) and reads their unused slots masked, still answers as before, and no non-finite value
    is left in the pool. The blocks went back as they were: NaN + -inf is NaN, so every later request
    failed with non-finite logits while the replica stayed ready."""
    marker = 2  # in no prompt of tiny_prompts (their ids are from 3)
    runtime = runtime_for(tiny)
    try:
        normal = tiny_prompts(1)[0]  # 5 tokens: its decode reads the block's 11 unused slots
        before = submit_all(runtime, [normal], greedy(8))[0].tokens
        assert runtime._installed is not None and runtime._cache is not None
        model = runtime._installed.model
        forward = model.forward_batch

        def overflowing(layout: Any, cache: Any) -> torch.Tensor:
            logits = forward(layout, cache).clone()
            ids, start = layout.input_ids.tolist(), 0
            for row, end in enumerate(layout.sample_rows.tolist()):
                if marker in ids[start : end + 1]:
                    slots = layout.slots[start : end + 1]
                    for layer in range(len(cache.keys)):
                        cache.keys[layer][slots] = float("inf")
                        cache.values[layer][slots] = float("nan")
                    if failure == "step raises":
                        raise RuntimeError("device error after the keys and values were written")
                    logits[row] = float("nan")
                start = end + 1
            return logits

        model.forward_batch = overflowing
        poisoned = Collector()
        runtime.submit(GenerationRequest((marker, *range(20, 34)), greedy(8)), poisoned)
        assert poisoned.wait().finish_reason == "error"
        wait_until(lambda: runtime.stats()["blocks_used"] == 0)
        assert torch.isfinite(runtime._cache.storage).all()
        later = [submit_all(runtime, [normal], greedy(8))[0] for _ in range(3)]
        assert [c.seen[-1][1].finish_reason for c in later] == ["length"] * 3
        assert [c.tokens for c in later] == [before] * 3
        assert runtime.ready and runtime.healthy
    finally:
        runtime.close()
