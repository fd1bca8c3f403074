"""Section 9: what one engine iteration costs besides the model call, against that model call.

The real :class:`server.engine.Engine` (its thread, its lock, the planner's gather, scatter and
greedy sampling, delivery to the event loop through ``call_soon_threadsafe``) runs over a real
:class:`server.batch.StatePool` with ``B`` generations that never end, but its model is
:class:`FakeRuntime`, which returns preallocated outputs at once. Every microsecond of an
iteration is then the engine's own. One consumer coroutine per generation does what the server
does per message: await ``gen.event``, clear it, ``gen.drain()``.

The cost is divided by the in-process ONNX Runtime decode call at the same ``B`` (section 1's
loop, same model and threads), timed right before or after it; rounds alternate which goes first,
and the medians of the rounds are reported, because the machines are shared and noisy.

The fake model never releases the GIL, so the event loop's share (waking consumers, draining)
runs between iterations instead of beside a model call; the iteration time is therefore the whole
Python cost per iteration, engine thread and event loop together. Both threads' CPU is recorded
too (``engine_thread_us``, ``loop_thread_us``), to show where it goes.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import inprocess
from .common import ModelUnderTest, SectionSkipped

# A generation's token budget: the window ends long before it.
ENDLESS = 1 << 40
ENGINE_THREAD = "lstm-engine"  # the name server.engine.Engine gives its thread


class FakeRuntime:
    """Stands in for :class:`server.runtime.ModelRuntime`: no model, preallocated outputs.

    ``run(tokens[T, B], h, c)`` returns ``(logits[T, B, V], hn[L, B, H], cn[L, B, H])``, the same
    arrays for every call of the same ``(T, B)`` (allocated on first use; logits are fixed random
    values, so greedy sampling picks a real token). ``run_into`` (outputs written into buffers
    the caller owns, which it reuses call after call) does nothing per call: the first time it
    sees a logits buffer it fills it with those fixed values, so sampling behaves the same on
    both paths (the engine allocates its buffers with ``np.empty``). ``calls`` counts both.
    """

    def __init__(self, num_layers: int, hidden_size: int, vocab_size: int, seed: int = 0) -> None:
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.calls = 0
        self._rng = np.random.default_rng(seed)
        self._outputs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        # Logits buffers run_into has filled, by id; held so that an id is not reused meanwhile.
        self._filled: dict[int, np.ndarray] = {}

    def outputs(self, T: int, B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self._outputs.get((T, B))
        if out is None:
            L, H, V = self.num_layers, self.hidden_size, self.vocab_size
            rnd = self._rng.standard_normal
            out = (
                rnd((T, B, V), dtype=np.float32),
                rnd((L, B, H), dtype=np.float32),
                rnd((L, B, H), dtype=np.float32),
            )
            self._outputs[(T, B)] = out
        return out

    def run(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.calls += 1
        return self.outputs(*tokens.shape)

    def run_into(
        self,
        tokens: np.ndarray,
        h: np.ndarray,
        c: np.ndarray,
        logits: np.ndarray,
        hn: np.ndarray,
        cn: np.ndarray,
    ) -> None:
        self.calls += 1
        if id(logits) not in self._filled:
            if len(self._filled) >= 8:
                self._filled.clear()  # membership changed: those buffers are gone
            logits[...] = self.outputs(*tokens.shape)[0]
            self._filled[id(logits)] = logits


def _thread_cpu_s(thread: threading.Thread | None) -> float | None:
    """CPU seconds of ``thread`` so far (None where the platform cannot say)."""
    if thread is None or thread.ident is None:
        return None
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (AttributeError, OSError):
        return None


def engine_iterations(
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    batch: int,
    seconds: float,
    *,
    table: Sequence[str] = (),
    warmup: float | None = None,
) -> dict[str, Any]:
    """Run the engine over ``batch`` endless greedy generations for ``seconds`` (after
    ``warmup``, default a tenth of it) and report what one iteration cost.

    ``us_per_iteration`` is the window's wall time minus the fake model's own time, per
    iteration. Raises :class:`RuntimeError` when the engine made no iteration in the window.
    """
    return asyncio.run(
        _engine_iterations(
            num_layers,
            hidden_size,
            vocab_size,
            batch,
            seconds,
            table or [chr(ord("a") + i % 26) for i in range(vocab_size)],
            seconds / 10 if warmup is None else warmup,
        )
    )


async def _engine_iterations(
    L: int, H: int, V: int, B: int, seconds: float, table: Sequence[str], warmup: float
) -> dict[str, Any]:
    # The server's own engine, configured as the server configures it by default.
    from server.batch import StatePool
    from server.engine import Engine, Generation
    from server.metrics import SchedulerStats
    from server.settings import Settings

    s = Settings()
    runtime = FakeRuntime(L, H, V)
    pool = StatePool(L, H, V, B)
    engine = Engine(
        runtime,  # duck-typed: what the engine calls (run, run_into) is there
        pool,
        max_batch_size=max(B, s.max_batch_size),
        max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
        max_queue_size=s.max_queue_size,
        prefill_chunk_tokens=s.prefill_chunk_tokens,
        inline_max_rows=s.inline_max_rows,
        stream_chunk_tokens=s.stream_chunk_tokens,
        stats=SchedulerStats(),
    )
    stats = engine.stats
    drained = [0] * B
    messages = [0]

    async def consume(i: int, gen: Generation) -> None:
        # What the server does for each Generate message.
        while True:
            await gen.event.wait()
            gen.event.clear()
            delta = gen.drain()
            if delta is not None:
                drained[i] += len(delta.token_ids)
                messages[0] += 1

    def snapshot() -> dict[str, Any]:
        with engine.lock:
            out = {
                "t": time.perf_counter(),
                "iterations": stats.batch_size.count,
                "rows": stats.tokens["decode"],
                "model_s": stats.model_call.total,
                "messages": messages[0],
            }
        thread = next((t for t in threading.enumerate() if t.name == ENGINE_THREAD), None)
        out["engine_cpu"] = _thread_cpu_s(thread)
        out["loop_cpu"] = time.thread_time()  # this coroutine runs on the event loop's thread
        return out

    engine.start()
    gens: list[Generation] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        first = runtime.outputs(1, B)[0][0]
        for i in range(B):
            gen = Generation(
                pool.alloc(),
                max_tokens=ENDLESS,
                temperature=0.0,
                top_k=0,
                top_p=0.0,
                seed=i,
                table=table,
            )
            gens.append(gen)
            tasks.append(asyncio.create_task(consume(i, gen)))
            engine.start_generation(gen, first[i])
        await asyncio.sleep(warmup)
        a = snapshot()
        await asyncio.sleep(seconds)
        b = snapshot()
    finally:
        for gen in gens:
            engine.abandon(gen)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.stop()

    def d(key: str) -> float:
        return float(b[key] - a[key])

    n = d("iterations")
    if n <= 0:
        raise RuntimeError(f"the engine made no iteration in {seconds} s at B={B}")
    wall = d("t")

    def per_iteration_us(key: str) -> float | None:
        return None if a[key] is None or b[key] is None else d(key) / n * 1e6

    return {
        "batch": B,
        "window_s": wall,
        "iterations": int(n),
        "rows_per_iteration": d("rows") / n,
        "us_per_iteration": (wall - d("model_s")) / n * 1e6,
        "fake_model_us_per_iteration": d("model_s") / n * 1e6,
        "engine_thread_us": per_iteration_us("engine_cpu"),
        "loop_thread_us": per_iteration_us("loop_cpu"),
        "messages_per_iteration": d("messages") / n,
        "fake_runtime_calls": runtime.calls,
        "tokens_min_per_generation": min(len(g.tokens) for g in gens),
        "drained_min_per_generation": min(drained),
    }


def run(
    model: ModelUnderTest,
    batches: Sequence[int],
    threads: int,
    seconds: float,
    rounds: int,
    *,
    provider: str = "cpu",
    iobinding: bool = False,
) -> dict[str, Any]:
    """Section 9: per ``B``, the engine's µs per iteration (model excluded) ÷ the in-process
    model call's mean µs, from ``rounds`` rounds that alternate which of the two runs first."""
    try:
        import server.engine
    except Exception as e:
        raise SectionSkipped(f"server.engine not importable: {type(e).__name__}: {e}") from None
    from contract.model import validate

    spec = validate(model.path)
    table = ["" if i == spec.unk_id else t for i, t in enumerate(spec.vocab)]
    sess = inprocess.ort_session(model.path, threads, provider)
    L, H, V = model.num_layers, model.hidden_size, model.vocab_size

    def model_call(B: int) -> dict[str, float]:
        step = inprocess.decode_stepper(sess, model, B, provider=provider, iobinding=iobinding)
        ns = inprocess.time_loop(step, seconds, 20, 10)
        return {
            "model_call_us": float(ns.mean()) / 1e3,
            "model_call_p50_us": float(np.median(ns)) / 1e3,
        }

    per_round: list[list[dict[str, Any]]] = []
    for r in range(rounds):
        rows = []
        for B in batches:
            if r % 2 == 0:
                m = model_call(B)
                e = engine_iterations(L, H, V, B, seconds, table=table)
            else:
                e = engine_iterations(L, H, V, B, seconds, table=table)
                m = model_call(B)
            rows.append({**e, **m, "ratio": e["us_per_iteration"] / m["model_call_us"]})
        per_round.append(rows)

    def median(B: int, key: str) -> float | None:
        vals = [row[key] for rows in per_round for row in rows if row["batch"] == B]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    keys = (
        "us_per_iteration",
        "engine_thread_us",
        "loop_thread_us",
        "model_call_us",
        "ratio",
        "messages_per_iteration",
        "rows_per_iteration",
    )
    return {
        # In process: always this checkout's engine, whatever --server-src says.
        "engine_module": server.engine.__file__,
        "window_s": seconds,
        "rounds": per_round,
        "model_call": "mean µs per in-process ORT decode call (T=1), section 1's loop",
        "rows": [{"batch": B, **{k: median(B, k) for k in keys}} for B in batches],
    }
