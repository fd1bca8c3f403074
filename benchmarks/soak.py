"""A bounded soak: many sessions stepping for minutes against a real ``lstm-serve``, with abuse.

``python -m benchmarks.soak [--minutes M] [--sessions N] [--out FILE] [--model M.onnx]``

The server is started as :mod:`benchmarks.server_bench` starts it (a subprocess on 127.0.0.1,
port 0, CPU provider). N sessions, one ``grpc.aio`` coroutine each, run for M minutes, each
picking at random one of:

* ``step``: a unary ``Step`` of a random chunk (1-40 tokens), every position's logits;
* ``stream``: a ``StepStream`` attached to the session, 2-6 chunks; a third are cancelled
  mid-flight (a client that dies with a message in the air);
* ``generate``: a greedy ``Generate`` (1-3 words of prompt, 1-32 tokens); a third cancelled
  after a random delay;
* ``kill``: a ``Step`` cancelled 0-3 ms after it was sent;
* ``deadline``: a ``Step`` with a 0.2-5 ms deadline;
* ``oversized``: a ``Step`` over ``max_prompt_tokens`` (tokens, or ~100 KB of text), which must
  be refused (INVALID_ARGUMENT) and change nothing.

Each session's expected state is carried by in-process ONNX Runtime (one session at a time, as
the integration tests' ``Reference`` does). Every acknowledged step's logits must equal the
reference's within ``ATOL`` and every greedy token must be the reference's argmax. A call that
failed may or may not have been applied (there are no request ids yet): the client waits until
``GetSession`` says the session is idle and reads its step count, which must be one of the
outcomes the failure allows (nothing, or the whole call); the reference follows it. Anything
else counts as ``lost_or_extra`` and the session is reset.

The RSS of the server's process tree is sampled every 0.5 s; it is "flat" when the mean of the
last quarter of the run is within 10 % of the second quarter's (the first quarter is warm-up).
Prints a table, writes ``--out`` (JSON), exits 0 only when there are 0 mismatches, nothing lost,
no status outside the expected set, RSS flat, and the server still up. Bounded: every call has a
deadline and the run stops waiting ``GRACE_S`` after its window.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from contract.model import ModelSpec, validate
from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.reference import Reference, State

from .common import BUNDLED_MODEL, load_average, machine, versions, write_json
from .server_bench import ServerProcess, running_server

ATOL = 1e-4  # float32 logits of a 2x256 LSTM, batched vs alone (the scale test's tolerance)
MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 64
CALL_TIMEOUT_S = 10.0
SETTLE_TIMEOUT_S = 5.0
GRACE_S = 60.0
CHUNKS = [1, 1, 1, 2, 3, 5, 8, 16, 40]
ACTIONS = {"step": 40, "stream": 15, "generate": 10, "kill": 12, "deadline": 13, "oversized": 10}
PROMPT_TEXT = "the time traveller for so it will be convenient to speak of him was expounding"
WORDS = PROMPT_TEXT.split()  # greedy Generate prompts: 1-3 of these words
# Statuses the abuse above may draw; anything else (UNKNOWN, INTERNAL, UNAVAILABLE, ...) is a
# finding.
EXPECTED = {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "FAILED_PRECONDITION"}


@dataclass
class Tally:
    """What every session saw, added up."""

    calls: int = 0
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    codes_by_action: dict[str, collections.Counter[str]] = field(default_factory=dict)
    actions: collections.Counter[str] = field(default_factory=collections.Counter)
    steps_acknowledged: int = 0
    rows_compared: int = 0
    tokens_compared: int = 0
    mismatches: int = 0
    mismatch_examples: list[str] = field(default_factory=list)
    applied_after_failure: int = 0
    not_applied_after_failure: int = 0
    lost_or_extra: int = 0
    lost_examples: list[str] = field(default_factory=list)
    oversized_accepted: int = 0
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected_examples: list[str] = field(default_factory=list)

    def code(self, action: str, code: str, detail: str = "") -> None:
        self.calls += 1
        self.codes[code] += 1
        self.codes_by_action.setdefault(action, collections.Counter())[code] += 1
        if code not in EXPECTED:
            self.unexpected[code] += 1
            if len(self.unexpected_examples) < 10:
                self.unexpected_examples.append(f"{action}: {code} {detail[:200]}")

    def mismatch(self, what: str) -> None:
        self.mismatches += 1
        if len(self.mismatch_examples) < 10:
            self.mismatch_examples.append(what)


def _code_of(call: Any, exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name, exc.details() or ""
    if isinstance(exc, asyncio.CancelledError) and call is not None and call.cancelled():
        return "CANCELLED", "cancelled by the client"
    raise exc


class Driver:
    """One session: its id, its reference state, and the client that abuses it."""

    def __init__(
        self,
        stub: Any,
        sid: str,
        ref: Reference,
        spec: ModelSpec,
        tally: Tally,
        rng: random.Random,
    ) -> None:
        self.stub, self.sid, self.ref, self.spec = stub, sid, ref, spec
        self.tally, self.rng = tally, rng
        self.state = ref.zeros()
        self.steps = 0
        self.pending_reset: Any = None  # a ResetSessionRequest after steps went astray

    def chunk(self) -> list[int]:
        return [self.rng.randrange(self.spec.vocab_size) for _ in range(self.rng.choice(CHUNKS))]

    def compare(self, logits: Any, chunk: list[int], want: np.ndarray) -> None:
        got = np.asarray(logits, np.float32).reshape(len(chunk), -1)
        self.tally.rows_compared += len(chunk)
        err = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
        if not err <= ATOL:
            self.tally.mismatch(f"{self.sid[:8]} at step {self.steps}: max |diff| {err:.2e}")

    def advance(self, n: int, state: State) -> None:
        self.steps += n
        self.state = state
        self.tally.steps_acknowledged += n

    async def settle(self, outcomes: dict[int, State], what: str) -> None:
        """After a failed call: wait until the session is idle, read its step count, follow it
        when it is one of ``outcomes`` (steps added -> state), else count it and reset."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        seen: list[int] = []
        while time.monotonic() < deadline:
            try:
                info = await self.stub.GetSession(
                    pb.GetSessionRequest(session_id=self.sid), timeout=CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as e:
                self.tally.code("settle", e.code().name, e.details() or "")
                await asyncio.sleep(0.01)
                continue
            self.tally.code("settle", "OK")
            # Idle twice in a row with the same count: nothing of the failed call is still on
            # its way to the engine.
            seen = [*seen, int(info.steps)] if not info.busy else []
            if len(seen) >= 2 and seen[-1] == seen[-2]:
                break
            await asyncio.sleep(0.005)
        else:
            self.lost(f"{what}: the session never settled (seen {seen})")
            return
        delta = seen[-1] - self.steps
        if delta in outcomes:
            if delta:
                self.tally.applied_after_failure += 1
                self.advance(delta, outcomes[delta])
            else:
                self.tally.not_applied_after_failure += 1
            return
        self.lost(f"{what}: steps went {self.steps} -> {seen[-1]}, allowed +{sorted(outcomes)}")

    def lost(self, what: str) -> None:
        self.tally.lost_or_extra += 1
        if len(self.tally.lost_examples) < 10:
            self.tally.lost_examples.append(f"{self.sid[:8]} {what}")
        self.pending_reset = pb.ResetSessionRequest(session_id=self.sid)

    async def run(self, until: float) -> None:
        names, weights = list(ACTIONS), list(ACTIONS.values())
        while time.monotonic() < until:
            if self.pending_reset is not None:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self.stub.ResetSession(self.pending_reset, timeout=CALL_TIMEOUT_S)
                    self.pending_reset = None
                    self.state, self.steps = self.ref.zeros(), 0
                await asyncio.sleep(0.01)
                continue
            action = self.rng.choices(names, weights)[0]
            self.tally.actions[action] += 1
            await getattr(self, "do_" + action)()

    async def _step(self, action: str, timeout: float, cancel_after: float | None) -> None:
        chunk = self.chunk()
        want, after = self.ref.feed(chunk, self.state)
        req = pb.StepRequest(session_id=self.sid, token_ids=chunk, output=pb.STEP_OUTPUT_ALL_LOGITS)
        call = self.stub.Step(req, timeout=timeout)
        if cancel_after is not None:
            await asyncio.sleep(cancel_after)
            call.cancel()
        try:
            r = await call
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
            code, detail = _code_of(call, e)
            self.tally.code(action, code, detail)
            await self.settle({0: self.state, len(chunk): after}, f"{action} of {len(chunk)}")
            return
        self.tally.code(action, "OK")
        self.compare(r.logits, chunk, want)
        self.advance(len(chunk), after)

    async def do_step(self) -> None:
        await self._step("step", CALL_TIMEOUT_S, None)

    async def do_kill(self) -> None:
        await self._step("kill", CALL_TIMEOUT_S, self.rng.uniform(0, 0.003))

    async def do_deadline(self) -> None:
        await self._step("deadline", self.rng.uniform(0.0002, 0.005), None)

    async def do_oversized(self) -> None:
        if self.rng.random() < 0.5:
            n = self.rng.randint(MAX_PROMPT_TOKENS + 1, 8 * MAX_PROMPT_TOKENS)
            req = pb.StepRequest(session_id=self.sid, token_ids=[1] * n)
        else:
            req = pb.StepRequest(session_id=self.sid, text="ab " * 34_000)
        try:
            await self.stub.Step(req, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            self.tally.code("oversized", e.code().name, e.details() or "")
            await self.settle({0: self.state}, "oversized step")
            return
        self.tally.code("oversized", "OK")
        self.tally.oversized_accepted += 1
        await self.settle({0: self.state}, "oversized step accepted")

    async def do_stream(self) -> None:
        n = self.rng.randint(2, 6)
        cancel_at = self.rng.randrange(n) if self.rng.random() < 1 / 3 else None
        call = self.stub.StepStream(timeout=CALL_TIMEOUT_S)
        inflight: dict[int, State] = {}  # what the message in the air would add, if anything
        try:
            for i in range(n):
                chunk = self.chunk()
                want, after = self.ref.feed(chunk, self.state)
                inflight = {len(chunk): after}
                await call.write(
                    pb.StepStreamRequest(
                        session_id=self.sid if i == 0 else "",
                        token_ids=chunk,
                        output=pb.STEP_OUTPUT_ALL_LOGITS,
                    )
                )
                if i == cancel_at:
                    # The message is in the air: it may or may not be applied.
                    await asyncio.sleep(self.rng.uniform(0, 0.002))
                    call.cancel()
                r = await call.read()
                if r is grpc.aio.EOF:
                    break
                self.compare(r.logits, chunk, want)
                self.advance(len(chunk), after)
                inflight = {}
            else:
                await call.done_writing()
            code = (await call.code()).name
            self.tally.code("stream", code, await call.details() or "")
            if code != "OK":
                await self.settle({0: self.state, **inflight}, "stream message")
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
            code, detail = _code_of(call, e)
            self.tally.code("stream", code, detail)
            await self.settle({0: self.state, **inflight}, "stream message")

    async def do_generate(self) -> None:
        prompt = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 3)))
        n = self.rng.randint(1, 32)
        want, after = self.ref.greedy_with_state(self.spec.encode(prompt), n, self.state)
        applied = len(self.spec.encode(prompt)) + n
        req = pb.GenerateRequest(session_id=self.sid, prompt=prompt, max_tokens=n, temperature=0)
        call = self.stub.Generate(req, timeout=CALL_TIMEOUT_S)
        killer = None
        if self.rng.random() < 1 / 3:
            killer = asyncio.get_running_loop().call_later(self.rng.uniform(0, 0.01), call.cancel)
        got: list[int] = []
        try:
            async for m in call:
                got.extend(m.token_ids)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
            code, detail = _code_of(call, e)
            self.tally.code("generate", code, detail)
            if got != want[: len(got)]:
                self.tally.mismatch(f"{self.sid[:8]} generate: {got} vs {want[: len(got)]}")
            await self.settle({0: self.state, applied: after}, "generate")
            return
        finally:
            if killer is not None:
                killer.cancel()
        self.tally.code("generate", "OK")
        self.tally.tokens_compared += len(got)
        if got != want:
            self.tally.mismatch(f"{self.sid[:8]} generate {prompt!r}: {got} vs {want}")
        self.advance(applied, after)

    async def finish(self) -> None:
        """The end: the step count must be ours, and one last step must still match."""
        await self.settle({0: self.state}, "final check")
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._step("step", CALL_TIMEOUT_S, None)
            await self.stub.CloseSession(
                pb.CloseSessionRequest(session_id=self.sid), timeout=CALL_TIMEOUT_S
            )


async def _sample_rss(
    srv: ServerProcess, out: list[tuple[float, int]], stop: asyncio.Event
) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        out.append((time.monotonic() - t0, srv.rss_bytes()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


def rss_verdict(samples: list[tuple[float, int]]) -> dict[str, Any]:
    """Mean RSS of the second and last quarters of the run, and whether it stayed flat."""
    if len(samples) < 8:
        return {"flat": None, "reason": f"only {len(samples)} samples"}
    end = samples[-1][0]
    q = [
        [r for t, r in samples if k * end / 4 <= t < (k + 1) * end / 4 or (k == 3 and t == end)]
        for k in range(4)
    ]
    q2, q4 = float(np.mean(q[1])), float(np.mean(q[3]))
    return {
        "q2_mean_bytes": q2,
        "q4_mean_bytes": q4,
        "change": (q4 - q2) / q2,
        "flat": abs(q4 - q2) <= 0.10 * q2,
        "min_bytes": min(r for _, r in samples),
        "max_bytes": max(r for _, r in samples),
    }


async def soak(
    srv: ServerProcess, path: str, spec: ModelSpec, minutes: float, sessions: int, seed: int
) -> dict[str, Any]:
    ref = Reference(path)
    tally = Tally()
    rss: list[tuple[float, int]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(srv, rss, stop))
    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        drivers = []
        for i in range(sessions):
            r = await stub.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT_S)
            drivers.append(Driver(stub, r.session_id, ref, spec, tally, random.Random(seed + i)))
        t0 = time.monotonic()
        until = t0 + minutes * 60
        tasks = [asyncio.create_task(d.run(until)) for d in drivers]
        done, pending = await asyncio.wait(tasks, timeout=minutes * 60 + GRACE_S)
        window = time.monotonic() - t0
        for t in pending:
            t.cancel()
        failed = [repr(t.exception()) for t in done if not t.cancelled() and t.exception()]
        failed += ["a driver was cancelled"] * sum(t.cancelled() for t in done)
        calls_in_window = tally.calls
        if not pending:
            await asyncio.wait_for(asyncio.gather(*(d.finish() for d in drivers)), GRACE_S)
    stop.set()
    await sampler
    return {
        "window_s": window,
        "calls": calls_in_window,
        "calls_per_s": calls_in_window / window,
        "steps_acknowledged": tally.steps_acknowledged,
        "steps_per_s": tally.steps_acknowledged / window,
        "rows_compared": tally.rows_compared,
        "tokens_compared": tally.tokens_compared,
        "mismatches": tally.mismatches,
        "mismatch_examples": tally.mismatch_examples,
        "applied_after_failure": tally.applied_after_failure,
        "not_applied_after_failure": tally.not_applied_after_failure,
        "lost_or_extra": tally.lost_or_extra,
        "lost_examples": tally.lost_examples,
        "oversized_accepted": tally.oversized_accepted,
        "actions": dict(tally.actions),
        "codes": dict(tally.codes),
        "codes_by_action": {k: dict(v) for k, v in sorted(tally.codes_by_action.items())},
        "unexpected_codes": dict(tally.unexpected),
        "unexpected_examples": tally.unexpected_examples,
        "stuck_sessions": len(pending),
        "driver_errors": failed,
        "rss": rss_verdict(rss),
        "rss_samples": [[round(t, 2), r] for t, r in rss],
    }


def _table(r: dict[str, Any]) -> str:
    rss = r["rss"]
    mib = 2**20
    rows = [
        ("window", f"{r['window_s']:.1f} s"),
        ("calls / s (all RPCs)", f"{r['calls_per_s']:,.0f}  ({r['calls']:,} calls)"),
        ("acknowledged steps / s", f"{r['steps_per_s']:,.0f}  ({r['steps_acknowledged']:,})"),
        (
            "logits rows / greedy tokens compared",
            f"{r['rows_compared']:,} / {r['tokens_compared']:,}",
        ),
        ("mismatches", str(r["mismatches"])),
        (
            "failed calls applied / not applied",
            f"{r['applied_after_failure']} / {r['not_applied_after_failure']}",
        ),
        ("lost or extra steps", str(r["lost_or_extra"])),
        ("oversized inputs accepted", str(r["oversized_accepted"])),
        ("stuck sessions / driver errors", f"{r['stuck_sessions']} / {len(r['driver_errors'])}"),
    ]
    if rss.get("flat") is not None:
        rows.append(
            (
                "server RSS q2 -> q4 mean",
                f"{rss['q2_mean_bytes'] / mib:.1f} -> {rss['q4_mean_bytes'] / mib:.1f} MiB "
                f"({rss['change']:+.1%}, {'flat' if rss['flat'] else 'NOT flat'}; "
                f"max {rss['max_bytes'] / mib:.1f})",
            )
        )
    else:
        rows.append(("server RSS", rss["reason"]))
    codes = ", ".join(f"{k} {v:,}" for k, v in sorted(r["codes"].items(), key=lambda kv: -kv[1]))
    rows.append(("status codes", codes))
    rows.append(("unexpected codes", str(r["unexpected_codes"] or "none")))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path(".bench/soak.json"))
    p.add_argument("--model", help="an .onnx model (default: the bundled one, else a random one)")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2**31)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        if a.model:
            path, source = a.model, "given"
        elif BUNDLED_MODEL.is_file():
            path, source = str(BUNDLED_MODEL), "bundled"
        else:
            from export.graph import random_model

            path, source = str(Path(tmp, "model.onnx")), "random (export.graph.random_model)"
            Path(path).write_bytes(
                random_model(hidden_size=256, num_layers=2, seed=0).SerializeToString()
            )
        spec = validate(path)
        extra = [
            "--provider", "cpu",
            "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
            "--max-new-tokens", str(MAX_NEW_TOKENS),
        ]  # fmt: skip
        load_before = load_average()
        with running_server(path, extra=extra) as srv:
            result = asyncio.run(soak(srv, path, spec, a.minutes, a.sessions, seed))
            alive = srv.proc.poll() is None
            tracebacks = sum("Traceback" in line for line in srv.log)
            # The server logs at WARNING: what it said, for the JSON (the first 200 lines).
            log = list(srv.log[:200])
    result.update(server_alive=alive, server_log_tracebacks=tracebacks, server_log=log)
    ok = (
        result["mismatches"] == 0
        and result["lost_or_extra"] == 0
        and result["oversized_accepted"] == 0
        and not result["unexpected_codes"]
        and result["rss"].get("flat") is True
        and not result["stuck_sessions"]
        and not result["driver_errors"]
        and alive
    )
    meta = {
        "command": "python -m benchmarks.soak " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "minutes": a.minutes,
        "sessions": a.sessions,
        "seed": seed,
        "atol": ATOL,
        "model": {
            "path": path,
            "source": source,
            "layers": spec.num_layers,
            "hidden": spec.hidden_size,
        },
        "server_args": extra,
        "machine": machine(),
        "versions": versions(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    print(_table(result))
    print(f"server alive: {alive}; tracebacks in its log: {tracebacks}; seed {seed}")
    for key in ("mismatch_examples", "lost_examples", "unexpected_examples", "driver_errors"):
        for line in result[key]:
            print(f"  {key}: {line}")
    print("PASS" if ok else "FAIL")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, {"meta": meta, "passed": ok, "result": result})
    print(f"wrote {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
