"""A serving process's model: weights (own or attached), a paged KV pool and one continuous-batching loop.

:class:`ModelRuntime` is what the HTTP server talks to. Weights are *installed* into it — from a
local load or from a weights-holder lease — and can be *uninstalled* when the holder goes away; the
KV pool belongs to the process and survives a re-attach (:mod:`vnpu.runtime.supervisor` keeps the
lease and drives :meth:`~ModelRuntime.install`, :meth:`~ModelRuntime.uninstall` and
:meth:`~ModelRuntime.set_unavailable`).

Requests are :meth:`~ModelRuntime.submit`-ted as token ids (tokenization happens before, in the
caller's thread, outside every lock). One engine thread runs the loop: ask the
:class:`~vnpu.runtime.scheduler.Scheduler` for a step (new sequences join at every step up to
``max_batch``; prefill is chunked and interleaved with decode; the lowest-priority sequence is
preempted when blocks run out), run it as one :meth:`~vnpu.runtime.model.LlamaModel.forward_batch`
(each weight unit — and under offload each streamed layer — is fetched once per step for the whole
batch), sample, detokenize, check stop conditions, and hand each request its new text through the
callback it gave. A finished, cancelled or failed sequence returns its KV blocks at once.

Memory contract (``VNPU_MEMORY_LIMIT_MIB``): on CUDA/NPU the limit becomes torch's per-process memory
fraction; on CPU it is a checked budget. Either way the KV pool gets what the limit leaves after the
fixed costs (:mod:`vnpu.runtime.budget`), or the process refuses to start with the numbers.

A request whose logits come out not finite (NaN or inf: an overflow) fails alone; the others of its
step are sampled as usual. A step whose forward pass raises fails the requests in it, and the loop
goes on. Either way the failed requests' KV blocks are zeroed before they are handed out again (the
keys and values they wrote may not be finite, and would fail every later request given the blocks).
After ``MAX_CONSECUTIVE_STEP_FAILURES`` failed steps in a row (a device in a sticky error state fails
every step) the runtime takes itself out of service until the process restarts: every
request fails with the reason, :attr:`~ModelRuntime.ready` and :attr:`~ModelRuntime.healthy` turn
false (``/readyz`` and ``/healthz`` answer 503, so readiness takes the replica out of its Service
and its liveness probe restarts it), and ``vnpu_runtime_ready`` drops to 0.
``vnpu_runtime_step_failures_total`` counts failed steps.
"""

from __future__ import annotations

import gc
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vnpu.api import DEFAULT_MAX_BATCH, DEFAULT_MAX_CONTEXT, KV_BLOCK_SIZE
from vnpu.runtime.arena import Arena
from vnpu.runtime.budget import KVBudget
from vnpu.runtime.chat import ChatTemplate
from vnpu.runtime.errors import InvalidRequestError, RuntimeUnavailableError
from vnpu.runtime.generate import GenerationResult, check_context
from vnpu.runtime.manifest import DTYPE_BYTES, WeightManifest
from vnpu.runtime.metrics import RuntimeMetrics
from vnpu.runtime.model import LlamaModel, ResidentWeights, WeightProvider
from vnpu.runtime.offload import OffloadedWeights, ThrottledLink
from vnpu.runtime.offload_plan import OffloadPlan, ResidentPart, plan_for
from vnpu.runtime.paged import PagedKVCache, StepSequence, build_layout
from vnpu.runtime.requests import (
    GenerationRequest,
    RequestHandle,
    RequestOutput,
    RequestState,
    StopMatcher,
)
from vnpu.runtime.sampling import SamplingParams, TokenLogprob, sample_step
from vnpu.runtime.scheduler import (
    BlockAllocator,
    QueueFullError,
    Scheduler,
    SchedulerConfig,
    StepPlan,
)
from vnpu.runtime.scheduler import (
    Sequence as ScheduledSequence,
)
from vnpu.runtime.tokenizer import StreamDecoder, Tokenizer
from vnpu.runtime.units import model_units
from vnpu.signals import SIGNAL_POLL_S

__all__ = [
    "GenerationRequest",
    "ModelRuntime",
    "QueueFullError",
    "RequestHandle",
    "RequestOutput",
    "ServeOptions",
    "StopMatcher",
]

log = logging.getLogger(__name__)
MIB = 1024 * 1024
#: Failed engine steps in a row after which the runtime is out of service until it restarts.
MAX_CONSECUTIVE_STEP_FAILURES = 3


@dataclass
class ServeOptions:
    device: str = "cpu"
    max_context: int = DEFAULT_MAX_CONTEXT
    prefill_chunk: int = 256  #: tokens per forward step, decode tokens included
    memory_limit_mib: int | None = None
    offload_budget_mib: float | None = None  #: None: everything resident
    prefetch_depth: int = 2
    #: What the group's weight-holder pays for of the resident weights (None: all the budget allows).
    offload_resident_mib: float | None = None
    link_bytes_per_s: float | None = None  #: CPU only: emulate a host-to-device link of this bandwidth
    model_name: str = ""
    #: Answer to any ``model`` a request names: a serving weight-holder answers for every model of its
    #: share group (they all use its weights), under the names the gateway forwards.
    any_model_name: bool = False
    max_batch: int = DEFAULT_MAX_BATCH  #: sequences decoded together (``spec.memory.maxBatch``)
    default_priority: int = 0  #: priority of requests that give none (``spec.priority``)
    #: Sequences waiting for a batch slot before new ones get 429 (one of higher priority takes the
    #: place of the worst waiting one instead, which gets the 429).
    max_queue: int = 64
    block_size: int = KV_BLOCK_SIZE
    #: Usable KV blocks, overriding the size the memory budget gives (vLLM's
    #: ``--num-gpu-blocks-override``: experiments and tests of preemption)
    kv_blocks: int | None = None

    @property
    def max_step_tokens(self) -> int:
        return max(self.prefill_chunk, self.max_batch)


@dataclass
class Completion:
    text: str
    result: GenerationResult
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class _Installed:
    manifest: WeightManifest
    model: LlamaModel
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    provider: WeightProvider
    shared: bool
    keep: list[Any] = field(default_factory=list)  # objects whose lifetime the views depend on

    @property
    def vocab_size(self) -> int:
        """The ids both the model and the tokenizer know. A checkpoint may pad its vocabulary past the
        tokenizer's (embedding rows rounded up for the hardware): those ids are neither accepted in a
        prompt nor sampled, since no text decodes from them."""
        return min(self.manifest.config.vocab_size, self.tokenizer.vocab_size)


def apply_device_memory_limit(device: str, limit_mib: int | None) -> float | None:
    """On CUDA/NPU, cap torch's allocator at ``limit_mib``; returns the fraction set (None on CPU)."""
    if limit_mib is None or device.startswith("cpu"):
        return None
    if device.startswith("npu"):
        import torch_npu  # noqa: F401  - registers the npu device and torch.npu
    dev = torch.device(device)
    backend = torch.cuda if dev.type == "cuda" else torch.npu  # type: ignore[attr-defined]
    index = dev.index or 0
    total = backend.get_device_properties(index).total_memory
    fraction = min(1.0, limit_mib * MIB / total)
    backend.set_per_process_memory_fraction(fraction, index)
    return fraction


class ModelRuntime:
    def __init__(
        self, options: ServeOptions, metrics: RuntimeMetrics | None = None, *, engine_thread: bool = True
    ) -> None:
        """``engine_thread=False``: the caller runs the engine loop itself, with :meth:`run_engine`."""
        self.options = options
        self._engine_thread = engine_thread
        self.metrics = metrics or RuntimeMetrics()
        self._lock = threading.Lock()  # the model: a step, install and uninstall exclude each other
        self._cond = threading.Condition()  # the scheduler and the active requests
        self._installed: _Installed | None = None
        self._cache: PagedKVCache | None = None
        self._scheduler: Scheduler | None = None
        self._active: dict[str, RequestState] = {}  # keyed by request id
        self._arrivals = itertools.count()
        self._unavailable = "weights are not loaded yet"
        self._broken: str | None = None  # why the engine is out of service for good (see the module doc)
        self._step_failures = 0  # failed steps in a row (the engine thread's own)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.plan: OffloadPlan | None = None  #: the offload plan in use, if any

    # --- state ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._unavailable is None and self._broken is None

    @property
    def unavailable_reason(self) -> str | None:
        return self._broken or self._unavailable

    @property
    def healthy(self) -> bool:
        """False once the engine is out of service for good (its steps kept failing): only a restart
        helps, which is what ``/healthz`` failing asks of the kubelet."""
        return self._broken is None

    @property
    def model_name(self) -> str:
        installed = self._installed
        return self.options.model_name or (installed.manifest.config.name if installed else "")

    @property
    def tokenizer(self) -> Tokenizer:
        installed = self._installed
        if installed is None:
            raise RuntimeUnavailableError(self.unavailable_reason or "not ready")
        return installed.tokenizer

    @property
    def chat_template(self) -> ChatTemplate | None:
        installed = self._installed
        if installed is None:
            raise RuntimeUnavailableError(self.unavailable_reason or "not ready")
        return installed.chat_template

    def stats(self) -> dict[str, int]:
        """Running and waiting sequences and KV blocks in use (what tests and /metrics read)."""
        with self._cond:
            sched = self._scheduler
            if sched is None:
                return {"running": 0, "waiting": 0, "blocks_used": 0, "blocks_total": 0, "preemptions": 0}
            return {
                "running": len(sched.running),
                "waiting": len(sched.waiting),
                "blocks_used": sched.allocator.used,
                "blocks_total": sched.allocator.total,
                "preemptions": sched.preemptions,
            }

    # --- memory ---------------------------------------------------------------------------------

    def budget(
        self,
        manifest: WeightManifest,
        shared: bool,
        ring_bytes: int,
        plan: OffloadPlan | None = None,
        resident_copied: bool = False,
    ) -> KVBudget:
        """This process's memory budget (see :mod:`vnpu.runtime.budget`). Weights: none when attached
        (the holder's slices pay for them), the resident part under offload, else all of them; attached
        under offload, the resident part when this process copies it to its device
        (``resident_copied``: the holder offers none to map, or one of another plan)."""
        opts = self.options
        if plan is not None:
            own = plan.resident_bytes if not shared or resident_copied else 0
        else:
            own = 0 if shared else manifest.total_bytes
        return KVBudget.for_config(
            manifest.config.to_modelfile_config(),
            DTYPE_BYTES[manifest.dtype],
            own_weight_bytes=own,
            ring_bytes=ring_bytes,
            max_context=opts.max_context,
            max_batch=opts.max_batch,
            block_size=opts.block_size,
            limit_mib=opts.memory_limit_mib,
            override=opts.kv_blocks,
        )

    def kv_blocks(
        self, manifest: WeightManifest, shared: bool, ring_bytes: int, plan: OffloadPlan | None = None
    ) -> int:
        """Usable KV blocks; raises MemoryBudgetError when one ``max_context`` sequence does not fit."""
        return self.budget(manifest, shared, ring_bytes, plan).blocks()

    def required_bytes(
        self, manifest: WeightManifest, shared: bool, ring_bytes: int, plan: OffloadPlan | None = None
    ) -> dict[str, int]:
        """What this process needs on its device under its memory limit, term by term."""
        return self.budget(manifest, shared, ring_bytes, plan).required()

    def check_budget(
        self, manifest: WeightManifest, shared: bool, ring_bytes: int, plan: OffloadPlan | None = None
    ) -> None:
        self.kv_blocks(manifest, shared, ring_bytes, plan)  # raises MemoryBudgetError with the numbers

    # --- install / uninstall --------------------------------------------------------------------

    def install(
        self,
        manifest: WeightManifest,
        arena: Arena,
        *,
        shared: bool,
        seconds: float,
        keep: Any = None,
        resident: ResidentPart | None = None,
    ) -> None:
        """Build the model over ``arena`` (views, no copy) and become ready. ``resident``: under async
        offload, the holder's device arena of the units its plan keeps resident, mapped when this
        replica's plan is the same (else they are copied from ``arena``, and counted as its own)."""
        opts = self.options
        config = manifest.config
        units = model_units(config)
        dtype = getattr(torch, manifest.dtype)
        provider: WeightProvider
        ring = 0
        plan: OffloadPlan | None = None
        offload = opts.offload_budget_mib is not None
        if offload and arena.backend != "cpu":
            # Attached to a device arena: every weight is already resident on the device.
            log.warning("offload budget ignored: the weights-holder's arena is on the device already")
            offload = False
        if offload:
            plan = plan_for(
                manifest, opts.offload_budget_mib or 0, opts.prefetch_depth, opts.offload_resident_mib
            )
            ring = plan.ring_bytes
        mapped: ResidentPart | None = None
        if plan is not None and resident is not None:
            problem = resident.fits(plan)
            if problem is None:
                mapped = resident
            else:
                log.warning(
                    "not mapping the weights-holder's resident units: copying them",
                    extra={"reason": problem},
                )
        copied = plan is not None and shared and mapped is None and not opts.device.startswith("cpu")
        # Refuse (MemoryBudgetError) before allocating anything.
        blocks = self.budget(manifest, shared, ring, plan, copied).blocks()
        tokenizer = Tokenizer(manifest.tokenizer)  # outside the lock: requests keep flowing meanwhile
        template = None
        if tokenizer.chat_template:
            template = ChatTemplate(
                tokenizer.chat_template,
                tokenizer.special_token_text(tokenizer.bos_id),
                tokenizer.special_token_text(tokenizer.eos_id),
            )
        if plan is not None:
            link = ThrottledLink(opts.link_bytes_per_s) if opts.device.startswith("cpu") else None
            provider = OffloadedWeights(
                units, manifest, arena.byte_tensor(), plan, opts.device, link, resident_part=mapped
            )
            log.info(
                "offload plan",
                extra={k: v for k, v in plan.to_dict().items() if k not in ("resident", "streamed")}
                | {"resident_from": "holder" if mapped else ("copy" if copied else "arena")},
            )
        else:
            tensors = {name: arena.view(entry) for name, entry in manifest.tensors.items()}
            if arena.backend == "cpu" and not opts.device.startswith("cpu"):
                tensors = {name: t.to(opts.device) for name, t in tensors.items()}
            provider = ResidentWeights(tensors)
        with self._lock:
            self.plan = plan
            previous = self._installed
            if previous is not None and isinstance(previous.provider, OffloadedWeights):
                previous.provider.close()
            cache = self._cache
            if (
                cache is None
                or not cache.compatible(config, dtype, opts.device)
                or cache.usable_blocks != blocks
            ):
                if cache is not None:
                    self._cache = cache = None
                    gc.collect()  # free the old pool before allocating the new one
                cache = PagedKVCache(config, blocks + 1, opts.block_size, dtype, opts.device)
                self._cache = cache
            with self._cond:
                if self._scheduler is not None and self._scheduler.allocator.num_blocks != cache.num_blocks:
                    self._fail_all(RuntimeUnavailableError("the model was replaced"))
                    self._scheduler = None
                if self._scheduler is None:
                    sched_config = SchedulerConfig(
                        opts.max_batch, opts.max_step_tokens, opts.block_size, opts.max_queue
                    )
                    self._scheduler = Scheduler(sched_config, BlockAllocator(cache.num_blocks))
                else:  # new weights: what is cached was computed by the old ones; recompute it
                    self._scheduler.preempt_all()
            model = LlamaModel(config, provider, opts.device, dtype, max_positions=opts.max_context)
            self._installed = _Installed(
                manifest, model, tokenizer, template, provider, shared, [arena, keep]
            )
        self._start_loop()
        m = self.metrics
        m.kv_cache_bytes.set(cache.nbytes)
        m.kv_cache_blocks.set(blocks)
        m.weights_bytes.labels("shared" if shared else "own").set(manifest.total_bytes)
        m.weights_bytes.labels("own" if shared else "shared").set(0)
        m.attach_seconds.labels("attach" if shared else "load").set(seconds)
        # Ready last: whoever sees /readyz answer 200 finds the loop running and the metrics set.
        self._unavailable = None
        m.ready.set(1 if self.ready else 0)  # an engine out of service stays so with new weights
        log.info(
            "model ready",
            extra={
                "model": self.model_name,
                "shared": shared,
                "seconds": round(seconds, 4),
                "kv_cache_bytes": cache.nbytes,
                "kv_blocks": blocks,
                "max_batch": opts.max_batch,
                "weights_bytes": manifest.total_bytes,
            },
        )

    def set_unavailable(self, reason: str) -> None:
        """Record why the model cannot serve (only while nothing is installed)."""
        if self._installed is None:
            self._unavailable = reason
            self.metrics.ready.set(0)

    def uninstall(self, reason: str) -> None:
        """Stop serving (new requests fail with ``reason`` at once; running ones end with it after the
        step in flight), then drop the weight views."""
        self._unavailable = reason
        self.metrics.ready.set(0)
        with self._lock:
            installed, self._installed = self._installed, None
            with self._cond:
                self._fail_all(RuntimeUnavailableError(reason))
        if installed is not None and isinstance(installed.provider, OffloadedWeights):
            installed.provider.close()
        del installed
        gc.collect()
        log.warning("model unavailable", extra={"reason": reason})

    def stop(self) -> None:
        """Fail every request still inside with "the server is shutting down" and take no new one; the
        engine loop ends after the step in flight, which frees the blocks of the requests in it. Does
        not wait (an event loop calls it when a drain is over)."""
        with self._cond:
            self._stopping = True
            self._fail_all(RuntimeUnavailableError("the server is shutting down"))
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the engine thread (requests still inside fail)."""
        self.stop()
        if self._engine_thread and self._thread is not None:  # run_engine's caller returns by itself
            self._thread.join(timeout=30)
            self._thread = None

    # --- requests -----------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def validate_prompt(self, ids: Sequence[int], max_tokens: int, param: str | None = None) -> None:
        """Refuse ids outside the vocabulary and prompts that do not fit the context (HTTP 400, naming
        the request's field ``param``)."""
        installed = self._installed
        if installed is None:
            raise RuntimeUnavailableError(self.unavailable_reason or "not ready")
        vocab = installed.vocab_size
        if any(i < 0 or i >= vocab for i in ids):
            raise InvalidRequestError(f"prompt token ids must be in the vocabulary [0, {vocab})")
        check_context(len(ids), max_tokens, self.options.max_context, param)

    def submit(self, request: GenerationRequest, sink: Callable[[RequestOutput], None]) -> RequestHandle:
        """Queue ``request``; ``sink`` gets its outputs from the engine thread (it must not block).

        Raises InvalidRequestError / ContextLengthError (400), QueueFullError (429) or
        RuntimeUnavailableError (503) at once. On a full queue, a request that outranks a waiting one
        with no output yet is queued, and that one ends with QueueFullError through its ``sink``.
        """
        self.validate_prompt(request.prompt_ids, request.params.max_tokens)
        installed = self._installed
        if installed is None:
            raise RuntimeUnavailableError(self.unavailable_reason or "not ready")
        tokenizer = installed.tokenizer
        eos = installed.manifest.config.eos_token_id
        stop_ids = (
            frozenset()
            if request.params.ignore_eos
            else frozenset(i for i in (eos, tokenizer.eos_id) if i is not None)
        )
        priority = self.options.default_priority if request.priority is None else request.priority
        with self._cond:
            # Not ready (being installed, or uninstalling: readiness goes first) takes no new work.
            if self._scheduler is None or self._stopping or self._installed is None or not self.ready:
                raise RuntimeUnavailableError(self.unavailable_reason or "not ready")
            seq = ScheduledSequence(
                id=uuid.uuid4().hex,
                tokens=list(request.prompt_ids),
                prompt_len=len(request.prompt_ids),
                priority=priority,
                arrival=next(self._arrivals),
            )
            active = RequestState(
                seq=seq,
                params=request.params,
                sink=sink,
                decoder=StreamDecoder(tokenizer),
                matcher=StopMatcher(request.params.stop),
                generator=request.params.generator(),
                stop_ids=stop_ids,
                submitted=time.perf_counter(),
            )
            # QueueFullError when the queue is full of requests as good as this one; else the worst
            # waiting one may give its place up and is refused instead.
            displaced = self._scheduler.add(seq)
            self._active[seq.id] = active
            refused = self._active.pop(displaced.id, None) if displaced is not None else None
            if refused is not None:
                refused.closed = True
            self._update_queue_metrics()
            self._cond.notify_all()
        if refused is not None:
            error = QueueFullError(
                f"too many queued requests (limit {self.options.max_queue}): a request of higher "
                "priority took this one's place"
            )
            refused.sink(RequestOutput("", (), finish_reason="error", error=error, completion_tokens=0))
            log.info(
                "queued request refused for a higher-priority one",
                extra={"request": refused.seq.id, "priority": refused.seq.priority, "by": seq.id},
            )
        return RequestHandle(active, self.abort)

    def abort(self, handle: RequestHandle) -> bool:
        """Cancel a request: it gets a last "cancelled" output; its blocks are free at once (or right
        after the step in flight, which is still using them)."""
        with self._cond:
            active = self._active.get(handle.id)
            if active is None or active.closed or self._scheduler is None:
                return False
            active.closed = True
            self._scheduler.abort(active.seq)
            if not active.seq.in_step:
                del self._active[handle.id]
            self._update_queue_metrics()
            completion = active.seq.num_generated
        active.sink(RequestOutput("", (), finish_reason="cancelled", completion_tokens=completion))
        log.info("request cancelled", extra={"request": handle.id, "generated": completion})
        return True

    def complete(
        self,
        prompt: str | Sequence[int],
        max_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        priority: int | None = None,
        logprobs: int | None = None,
        ignore_eos: bool = False,
    ) -> Completion:
        """Run one completion to its end (blocking); raises like :meth:`submit`."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        params = SamplingParams(
            max_tokens, temperature, top_p, seed, tuple(stop), ignore_eos=ignore_eos, logprobs=logprobs
        )
        outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        start = time.perf_counter()
        handle = self.submit(GenerationRequest(tuple(ids), params, priority), outputs.put)
        pieces: list[str] = []
        tokens: list[int] = []
        probs: list[TokenLogprob] = []
        first = 0.0
        while True:
            try:
                out = outputs.get(timeout=0.05)
            except queue.Empty:
                if cancelled is not None and cancelled():
                    handle.abort()
                continue
            if out.token_ids and not tokens:
                first = time.perf_counter() - start
            tokens += out.token_ids
            probs += out.logprobs
            if out.text:
                pieces.append(out.text)
                if on_text is not None:
                    on_text(out.text)
            if cancelled is not None and cancelled():
                handle.abort()
            if out.finish_reason is not None:
                if out.error is not None:
                    raise out.error
                break
        finish = "stop" if out.finish_reason == "cancelled" else out.finish_reason
        result = GenerationResult(len(ids), tokens, finish, first, time.perf_counter() - start)
        return Completion("".join(pieces), result, finish, len(ids), probs)

    # --- the engine loop ------------------------------------------------------------------------

    def run_engine(self) -> None:
        """Run the engine loop in the calling thread until :meth:`close` (needs ``engine_thread=False``).

        Why: on CPU, PyTorch's GEMMs (MKL under GNU OpenMP) run about 2x slower when called from any
        thread but the process's initial one (measured here: a transformers decode step 42-53 ms on the
        main thread, 88-105 ms on another), so ``vnpu runtime serve`` runs the model on its main thread
        and the HTTP server on another."""
        with self._cond:
            if self._engine_thread or self._thread is not None:
                raise RuntimeError("the engine loop is already running in its own thread")
            self._thread = threading.current_thread()
        self._loop()

    def _start_loop(self) -> None:
        with self._cond:
            if self._thread is not None or self._stopping or not self._engine_thread:
                return
            self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (self._scheduler and self._scheduler.has_work()):
                    self._cond.wait(SIGNAL_POLL_S)  # on the main thread: see vnpu.signals
                if self._stopping:
                    return
            try:
                self._step()
            except Exception as e:  # never let the loop die: fail what was in the step, keep serving
                log.exception("engine step failed")
                if self._step_failed(e):
                    with self._cond:
                        self._fail_all(RuntimeUnavailableError(self.unavailable_reason or "not ready"))

    def _step_failed(self, error: Exception) -> bool:
        """Count a failed step; the ``MAX_CONSECUTIVE_STEP_FAILURES``-th in a row puts the runtime out
        of service until the process restarts (see the module docstring), before the step's requests
        hear of their failure. Returns whether it did; the caller then fails every other request."""
        self.metrics.step_failures.inc()
        self._step_failures += 1
        if self._step_failures < MAX_CONSECUTIVE_STEP_FAILURES or self._broken is not None:
            return False
        reason = (
            f"the engine failed {self._step_failures} steps in a row ({type(error).__name__}; the log has "
            "the details): out of service until the process restarts"
        )
        self._broken = reason
        self.metrics.ready.set(0)
        log.error("engine out of service", extra={"reason": reason})
        return True

    def _fail_all(self, error: Exception) -> None:
        """End every request with ``error`` (caller holds ``_cond``; sinks never block)."""
        sched = self._scheduler
        for active in list(self._active.values()):
            if sched is not None and not active.seq.in_step:
                sched.finish(active.seq)
            elif sched is not None:
                active.seq.aborted = True  # finished right after the step in flight
            if not active.closed:
                active.closed = True
                active.sink(
                    RequestOutput(
                        "", (), finish_reason="error", error=error, completion_tokens=active.seq.num_generated
                    )
                )
            if not active.seq.in_step:
                self._active.pop(active.seq.id, None)
        self._update_queue_metrics()

    def _step(self) -> None:
        began = time.perf_counter()
        with self._lock:
            installed, cache = self._installed, self._cache
            with self._cond:
                if installed is None or cache is None or self._scheduler is None:
                    self._fail_all(RuntimeUnavailableError(self.unavailable_reason or "not ready"))
                    return
                plan = self._scheduler.schedule()
                actives = [self._active[c.sequence.id] for c in plan.chunks]
                if plan.preempted:
                    self.metrics.preemptions.inc(len(plan.preempted))
                    log.info(
                        "preempted",
                        extra={
                            "sequences": [s.id for s in plan.preempted],
                            "priorities": [s.priority for s in plan.preempted],
                        },
                    )
            if plan.chunks:
                try:
                    tokens, logprobs, nonfinite = self._run(installed, cache, plan, actives)
                except Exception as e:
                    log.exception("forward step failed", extra={"sequences": len(plan.chunks)})
                    out_of_service = self._step_failed(e)
                    self._scrub(cache, [c.sequence for c in plan.chunks])
                    with self._cond:
                        self._scheduler.complete_step(plan)
                        for active in actives:
                            active.seq.aborted = True
                        self._finish_step(plan, actives, [], error=e)
                        if out_of_service:
                            self._fail_all(RuntimeUnavailableError(self.unavailable_reason or "not ready"))
                    return
                self._step_failures = 0
                self._scrub(cache, [plan.chunks[i].sequence for i in sorted(nonfinite)])
        if not plan.chunks:  # nothing fits this step (blocks are being given back): look again soon
            with self._cond:
                self._cond.wait(0.01)
            return
        now = time.perf_counter()
        self.metrics.step_seconds.observe(now - began)
        with self._cond:
            self._scheduler.complete_step(plan)
            sampled = list(zip(tokens, logprobs, strict=True))
            self._finish_step(plan, actives, sampled, now=now, nonfinite=nonfinite)

    def _scrub(self, cache: PagedKVCache, failed: list[ScheduledSequence]) -> None:
        """Zero the blocks of the step's ``failed`` sequences before they go back to the free list: a
        non-finite logit (or a failed step) means their keys and values may not be finite, and whoever
        gets the blocks next would read them (:mod:`vnpu.runtime.paged`). Caller holds ``_lock``; the
        blocks are stable (in the step). If zeroing fails too, the blocks still go back: the next
        sequence to read a non-finite value fails alone and its own blocks are zeroed then."""
        blocks = [b for seq in failed for b in seq.blocks]
        if not blocks:
            return
        try:
            cache.scrub(blocks)
        except Exception:
            log.exception("could not zero the KV blocks of failed requests", extra={"blocks": len(blocks)})

    def _run(
        self, installed: _Installed, cache: PagedKVCache, plan: StepPlan, actives: list[RequestState]
    ) -> tuple[list[int | None], list[TokenLogprob | None], set[int]]:
        """One forward step and the sampled token of every chunk that ends its sequence's tokens; and
        the chunks whose logits were not finite (nothing sampled: those requests fail alone)."""
        steps = [
            StepSequence(
                c.sequence.tokens[c.start : c.start + c.count], c.start, list(c.sequence.blocks), c.samples
            )
            for c in plan.chunks
        ]
        stats = getattr(installed.provider, "stats", None)
        before = (stats.bytes_copied, stats.stall_seconds) if stats else (0, 0.0)
        layout, rows = build_layout(steps, cache.block_size, cache.device)
        logits = installed.model.forward_batch(layout, cache)[:, : installed.vocab_size]
        # Logit rows come in layout order (decode sequences first): map each back to its chunk.
        sampling = sorted((i for i, row in enumerate(rows) if row >= 0), key=rows.__getitem__)
        picked, probs = sample_step(
            logits,
            [actives[i].params for i in sampling],
            [actives[i].generator for i in sampling],
        )
        tokens: list[int | None] = [None] * len(steps)
        logprobs: list[TokenLogprob | None] = [None] * len(steps)
        nonfinite: set[int] = set()
        for j, i in enumerate(sampling):
            tokens[i], logprobs[i] = picked[j], probs[j]
            if picked[j] is None:
                nonfinite.add(i)
        if stats:
            self.metrics.offload_bytes.inc(stats.bytes_copied - before[0])
            self.metrics.offload_stall_seconds.inc(stats.stall_seconds - before[1])
        m = self.metrics
        m.batch_size.observe(len(steps))
        m.step_tokens.observe(layout.num_tokens)
        return tokens, logprobs, nonfinite

    def _finish_step(
        self,
        plan: StepPlan,
        actives: list[RequestState],
        sampled: list[tuple[int | None, TokenLogprob | None]],
        error: Exception | None = None,
        now: float = 0.0,
        nonfinite: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        """Append sampled tokens, emit text, end finished sequences and those of the chunks in
        ``nonfinite``, whose logits were not finite (caller holds ``_cond``)."""
        sched = self._scheduler
        assert sched is not None
        deliveries: list[tuple[RequestState, RequestOutput]] = []

        def end_with(active: RequestState, failure: Exception) -> None:
            seq = active.seq
            sched.finish(seq)
            self._active.pop(seq.id, None)
            if not active.closed:
                active.closed = True
                output = RequestOutput(
                    "", (), finish_reason="error", error=failure, completion_tokens=seq.num_generated
                )
                deliveries.append((active, output))

        for index, (chunk, active) in enumerate(zip(plan.chunks, actives, strict=True)):
            seq = chunk.sequence
            if seq.aborted or error is not None:
                end_with(active, error or RuntimeUnavailableError(self.unavailable_reason or "not ready"))
                continue
            if index in nonfinite:
                log.warning("request failed: its logits are not finite", extra={"request": seq.id})
                end_with(
                    active, RuntimeError("the model's logits for this request were not finite (NaN or inf)")
                )
                continue
            token, logprob = sampled[index]
            if token is None:
                continue  # a prefill chunk that does not reach the end of the prompt yet
            first = active.first_token_at is None
            try:
                output = active.advance(token, logprob, now, self.options.max_context)
            except Exception as exc:  # a bug in one request's detokenizing or stop matching ends it alone
                log.exception("request failed", extra={"request": seq.id})
                end_with(active, RuntimeError(f"the request failed while its token was processed: {exc!r}"))
                continue
            self.metrics.generated_tokens.inc()
            if first:
                self.metrics.time_to_first_token.observe(now - active.submitted)
            if output.finish_reason is not None:
                sched.finish(seq)
                self._active.pop(seq.id, None)
                active.closed = True
                self._observe_finished(active)
            if output.text or output.finish_reason is not None or output.logprobs or output.token_ids:
                deliveries.append((active, output))
        self._update_queue_metrics()
        for active, output in deliveries:
            active.sink(output)

    def _observe_finished(self, active: RequestState) -> None:
        m = self.metrics
        m.prompt_tokens.inc(active.seq.prompt_len)
        if active.first_token_at is not None and active.last_token_at is not None:
            decode = active.last_token_at - active.first_token_at
            if active.seq.num_generated > 1 and decode > 0:
                m.tokens_per_second.set((active.seq.num_generated - 1) / decode)

    def _update_queue_metrics(self) -> None:
        sched = self._scheduler
        if sched is None:
            return
        m = self.metrics
        m.requests_waiting.set(len(sched.waiting))
        m.requests_running.set(len(sched.running))
        m.requests_in_flight.set(len(sched.waiting) + len(sched.running))
        m.kv_cache_usage.set(sched.allocator.used / sched.allocator.total if sched.allocator.total else 0)
