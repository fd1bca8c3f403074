"""Load generator: a separate process that drives the server over loopback with ``grpc.aio``.

``python -m benchmarks.loadgen --target 127.0.0.1:PORT --mode MODE ...`` (modes below) runs
``--concurrency`` concurrent callers on one event loop, all starting at ``--start-ns`` (a
``time.monotonic_ns()`` value, which is system-wide on Linux, so several loadgen processes share
one measurement window). Only events inside the window ``[start + warmup, start + warmup +
duration]`` are counted; at its end every call is cancelled, so a run is bounded in time however
the server behaves. Raw samples go to ``--out`` (``.npz``) and a one-line JSON summary to stdout,
including the process's own CPU use over the window so the harness can tell whether the client
was the bottleneck.

Modes:

* ``generate``: each caller loops ``Generate(prompt, max_tokens)`` on an ephemeral session and
  records time to first token and inter-token latency (a message carrying k tokens after a gap g
  counts k tokens of g/k each: the server coalesces tokens for slow readers).
* ``stream``: each caller holds one ``StepStream`` (an ephemeral session) and does client-driven
  steps, one token in and one distribution (last logits) out, recording each round trip.
* ``stream-features``: as ``stream`` on a sequence model (``--model``): each message is one row of
  ``--features`` numbers, each answer that row's outputs.
* ``stream-named``: as ``stream``, but each caller first creates a named session
  (``CreateSession``) and attaches its ``StepStream`` to it (the first message carries the id),
  so with a durable ``--state-store`` every step is a write-through (ephemeral sessions are
  never written). A stream rather than unary ``Step`` calls: the transport is then the same as
  ``stream``'s, so the two modes differ only by the commit, and the cost of write-through is
  not mixed with the cost of one RPC per step. After the window each caller reads the
  session back (``GetSession``, which reads the store when there is one) and counts an error
  ``STEPS_MISMATCH`` unless it holds every acknowledged step; then it closes the session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from server.client import SESSION_HEADER

PROMPT = "the time traveller for so it will be convenient to speak of him "


@dataclass
class Samples:
    """What one loadgen process measured inside the window."""

    ttft_ns: list[int] = field(default_factory=list)
    itl_ns: list[float] = field(default_factory=list)
    rtt_ns: list[int] = field(default_factory=list)
    tokens: int = 0  # generated tokens (generate) or steps (stream) that arrived in the window
    calls_done: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _generate_worker(
    stub: Any, s: Samples, win: tuple[int, int], max_tokens: int, seed: int
) -> None:
    ws, we = win
    clock = time.monotonic_ns
    n = 0
    while clock() < we:
        req = pb.GenerateRequest(
            prompt=PROMPT, max_tokens=max_tokens, temperature=1.0, top_k=0, seed=seed + n
        )
        n += 1
        t_call = clock()
        prev = t_call
        first = True
        call = stub.Generate(req)
        try:
            async for msg in call:
                t = clock()
                k = len(msg.token_ids)
                if k == 0:
                    continue
                if ws <= t <= we:
                    s.tokens += k
                    if first:
                        if t_call >= ws:
                            s.ttft_ns.append(t - t_call)
                        if k > 1:
                            s.itl_ns.extend([0.0] * (k - 1))
                    else:
                        s.itl_ns.extend([(t - prev) / k] * k)
                first = False
                prev = t
                if t > we:
                    call.cancel()
                    break
            if ws <= clock() <= we:
                s.calls_done += 1
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                s.error(e.code().name)
                await asyncio.sleep(0.01)


async def _stream_worker(stub: Any, s: Samples, win: tuple[int, int], vocab: int) -> None:
    await _stream_steps(stub.StepStream(), "", s, win, vocab)


async def _named_stream_worker(stub: Any, s: Samples, win: tuple[int, int], vocab: int) -> None:
    try:
        sid = (await stub.CreateSession(pb.CreateSessionRequest())).session_id
    except grpc.aio.AioRpcError as e:
        s.error(f"create:{e.code().name}")
        return
    # The id as metadata too, as clients send it (a proxy in front of replicas routes on it).
    route = ((SESSION_HEADER, sid),)
    try:
        acked = await _stream_steps(stub.StepStream(metadata=route), sid, s, win, vocab)
        if acked is not None:
            info = await stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=route)
            if info.steps != acked:
                s.error("STEPS_MISMATCH")
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            s.error(f"check:{e.code().name}")
    finally:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=route)


async def _features_worker(
    stub: Any, s: Samples, win: tuple[int, int], features: int, model: str
) -> None:
    await _stream_steps(stub.StepStream(), "", s, win, 0, features=features, model=model)


async def _stream_steps(
    call: Any,
    session_id: str,
    s: Samples,
    win: tuple[int, int],
    vocab: int,
    *,
    features: int = 0,
    model: str = "",
) -> int | None:
    """Client-driven steps on ``call`` until the window closes; the first message names
    ``session_id`` (empty: the stream's own ephemeral session). Returns the session's step
    count from the last answer, or None when the stream failed."""
    ws, we = win
    clock = time.monotonic_ns
    rng = random.Random()
    steps: int | None = None
    try:
        first = True
        while True:
            if features:
                # A sequence model: one row of F scaled features (about standard normal).
                row = [rng.gauss(0.0, 1.0) for _ in range(features)]
                req = pb.StepStreamRequest(features=pb.FloatTensor(shape=[1, features], values=row))
            else:
                req = pb.StepStreamRequest(token_ids=[rng.randrange(1, vocab)])
            if first and session_id:
                req.session_id = session_id
            if first and model:
                req.model_name = model
            first = False
            t0 = clock()
            await call.write(req)
            resp = await call.read()
            t = clock()
            if resp is grpc.aio.EOF:
                s.error("EOF")
                return None
            steps = resp.steps
            if t0 >= ws and t <= we:
                s.rtt_ns.append(t - t0)
                s.tokens += 1
            if t > we:
                break
        await call.done_writing()
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            s.error(e.code().name)
        return None
    finally:
        call.cancel()
    return steps


SERVICE = "lstmserve.v1.LstmServeService"


class _Renamed:
    """A channel whose method paths name ``service`` instead of today's service: the messages
    are unchanged since the service was renamed (from ``lstmserve.v1.LstmServe``), so the same
    load generator can drive an older server in an A/B run."""

    def __init__(self, channel: grpc.aio.Channel, service: str) -> None:
        self._channel, self._prefix = channel, f"/{service}/"

    def __getattr__(self, kind: str) -> Any:
        make = getattr(self._channel, kind)

        def renamed(path: str, *args: Any, **kwargs: Any) -> Any:
            return make(path.replace(f"/{SERVICE}/", self._prefix), *args, **kwargs)

        return renamed


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    start = args.start_ns or time.monotonic_ns() + int(0.2e9)
    ws = start + int(args.warmup * 1e9)
    we = ws + int(args.duration * 1e9)
    s = Samples()
    options = [("grpc.max_receive_message_length", 16 << 20)]
    # Several connections (a local subchannel pool per channel, or gRPC would share one TCP
    # connection between identical channels) keep one HTTP/2 connection's flow control and
    # ordering from serialising every caller.
    options.append(("grpc.use_local_subchannel_pool", 1))
    channels = [
        grpc.aio.insecure_channel(args.target, options=options)
        for _ in range(max(1, min(args.channels, args.concurrency)))
    ]
    stubs = [pb_grpc.LstmServeServiceStub(_Renamed(ch, args.service)) for ch in channels]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), timeout=10)
    delay = (start - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)
    workers = []
    for i in range(args.concurrency):
        stub = stubs[i % len(stubs)]
        if args.mode == "generate":
            coro = _generate_worker(stub, s, (ws, we), args.max_tokens, args.seed + 100_000 * i)
        elif args.mode == "stream-features":
            coro = _features_worker(stub, s, (ws, we), args.features, args.model)
        elif args.mode == "stream-named":
            coro = _named_stream_worker(stub, s, (ws, we), args.vocab)
        else:
            coro = _stream_worker(stub, s, (ws, we), args.vocab)
        workers.append(asyncio.ensure_future(coro))

    # CPU over exactly the window: sample when it opens and when it closes.
    await asyncio.sleep(max(0.0, (ws - time.monotonic_ns()) / 1e9))
    cpu0, t0 = _cpu_s(), time.monotonic_ns()
    await asyncio.sleep(max(0.0, (we - time.monotonic_ns()) / 1e9))
    cpu1, t1 = _cpu_s(), time.monotonic_ns()
    # Give in-flight calls a moment to notice the window closed, then cut them off.
    _done, pending = await asyncio.wait(workers, timeout=args.grace)
    for w in pending:
        w.cancel()
    for w in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await w
    for ch in channels:
        await ch.close()
    if args.out:
        np.savez(
            args.out,
            ttft_ns=np.asarray(s.ttft_ns, np.int64),
            itl_ns=np.asarray(s.itl_ns, np.float64),
            rtt_ns=np.asarray(s.rtt_ns, np.int64),
        )
    return {
        "mode": args.mode,
        "concurrency": args.concurrency,
        "window_s": (we - ws) / 1e9,
        "tokens": s.tokens,
        "calls_done": s.calls_done,
        "errors": s.errors,
        "client_cpu_fraction": (cpu1 - cpu0) / ((t1 - t0) / 1e9) if t1 > t0 else None,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    p.add_argument("--target", required=True)
    p.add_argument(
        "--mode", choices=("generate", "stream", "stream-named", "stream-features"), required=True
    )
    p.add_argument("--features", type=int, default=1, help="stream-features: F per row")
    p.add_argument("--model", default="", help="stream-features: the model to open streams on")
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--duration", type=float, default=5.0, help="measured window, seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before the window")
    p.add_argument("--grace", type=float, default=2.0, help="seconds to finish after the window")
    p.add_argument("--start-ns", type=int, default=0, help="time.monotonic_ns() to start at")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, default=28)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--service", default=SERVICE, help="the server's full service name")
    p.add_argument("--out", default="", help=".npz file for the raw samples")
    args = p.parse_args(argv)
    try:
        result = asyncio.run(_run(args))
    except (TimeoutError, grpc.aio.AioRpcError) as e:
        print(f"loadgen: cannot reach {args.target}: {type(e).__name__}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
