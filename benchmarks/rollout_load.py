"""Section 14's load: ``python -m benchmarks.rollout_load --target HOST:PORT ...``.

A separate process, like :mod:`benchmarks.loadgen`, driving the same closed-loop client steps
(``loadgen._stream_steps``: one token in, the last logits out, the next step as soon as the
answer arrives). Before its start time it creates ``--streams`` named sessions
(``CreateSession``, recording the version each is pinned to). Then each session runs one
``StepStream`` through window 1 (steady state) and a second one through window 2 (the harness
publishes a new version as it opens)::

    start --warmup-- [ws1 ---window--- we1] --gap-- [ws2 ---window--- we2]

Steps in the warm-up and the gap run but are not counted (the gap holds the switch from the
first stream to the second). Every counted round trip is recorded with the monotonic time it
completed (``time.monotonic_ns()`` is system-wide on Linux), so the harness can place it against
the publish and the moment the new version first served. After the windows every session is
read back (``GetSession``: the version it is pinned to now, and its steps against the last
acknowledged count: ``STEPS_MISMATCH`` otherwise), then closed.

Raw samples go to ``--out`` (``.npz``: ``rtt1``/``at1``, ``rtt2``/``at2`` in ns), a one-line
JSON summary to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import grpc
import numpy as np

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from server.client import SESSION_HEADER

from .loadgen import Samples, _cpu_s, _stream_steps


class StampedList(list[int]):
    """Round trips that also remember when each was recorded (``at``, monotonic ns).

    Handed to :func:`benchmarks.loadgen._stream_steps` as ``Samples.rtt_ns``, which appends a
    round trip as soon as its answer arrived: the stamp is then the step's completion time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.at: list[int] = []

    def append(self, value: int) -> None:
        self.at.append(time.monotonic_ns())
        super().append(value)


def stamped_samples() -> Samples:
    return Samples(rtt_ns=StampedList())


def windows(start_ns: int, warmup: float, window: float, gap: float) -> list[tuple[int, int]]:
    """The two measured windows ``[(ws1, we1), (ws2, we2)]`` in monotonic ns."""
    ws1 = start_ns + int(warmup * 1e9)
    we1 = ws1 + int(window * 1e9)
    ws2 = we1 + int(gap * 1e9)
    return [(ws1, we1), (ws2, ws2 + int(window * 1e9))]


async def _session(
    stub: Any, sid: str, wins: list[tuple[int, int]], samples: list[Samples], vocab: int
) -> int | None:
    """Window 1 then window 2 on session ``sid``, one stream each; the last acknowledged step
    count (None when the last stream failed)."""
    route = ((SESSION_HEADER, sid),)
    acked: int | None = None
    for win, s in zip(wins, samples, strict=True):
        if time.monotonic_ns() > win[1]:
            continue  # a window already over (the first stream overran): nothing to count
        acked = await _stream_steps(stub.StepStream(metadata=route), sid, s, win, vocab)
    return acked


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    options = [
        ("grpc.max_receive_message_length", 16 << 20),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [
        grpc.aio.insecure_channel(args.target, options=options)
        for _ in range(max(1, min(args.channels, args.streams)))
    ]
    stubs = [pb_grpc.LstmServeServiceStub(ch) for ch in channels]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), timeout=10)
    created: list[tuple[str, str]] = []
    for i in range(args.streams):
        r = await stubs[i % len(stubs)].CreateSession(pb.CreateSessionRequest(), timeout=10)
        created.append((r.session_id, r.model_version))
    wins = windows(args.start_ns, args.warmup, args.window, args.gap)
    samples = [stamped_samples(), stamped_samples()]
    await asyncio.sleep(max(0.0, (args.start_ns - time.monotonic_ns()) / 1e9))
    workers = [
        asyncio.ensure_future(_session(stubs[i % len(stubs)], sid, wins, samples, args.vocab))
        for i, (sid, _) in enumerate(created)
    ]
    # This process's CPU over each window, sampled at its edges.
    cpu: list[float | None] = []
    for ws, we in wins:
        await asyncio.sleep(max(0.0, (ws - time.monotonic_ns()) / 1e9))
        c0, t0 = _cpu_s(), time.monotonic_ns()
        await asyncio.sleep(max(0.0, (we - time.monotonic_ns()) / 1e9))
        c1, t1 = _cpu_s(), time.monotonic_ns()
        cpu.append((c1 - c0) / ((t1 - t0) / 1e9) if t1 > t0 else None)
    done, pending = await asyncio.wait(workers, timeout=args.grace)
    for w in pending:
        w.cancel()
    for w in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await w
    acked = [w.result() if w in done and not w.exception() else None for w in workers]

    # Read every session back: still pinned to the version it was created on, holding every
    # acknowledged step; then close it.
    ended: list[str | None] = []
    check_errors: dict[str, int] = {}
    for i, (sid, _) in enumerate(created):
        stub = stubs[i % len(stubs)]
        route = ((SESSION_HEADER, sid),)
        try:
            info = await stub.GetSession(
                pb.GetSessionRequest(session_id=sid), metadata=route, timeout=10
            )
            ended.append(info.model_version)
            if acked[i] is not None and info.steps != acked[i]:
                check_errors["STEPS_MISMATCH"] = check_errors.get("STEPS_MISMATCH", 0) + 1
        except grpc.aio.AioRpcError as e:
            ended.append(None)
            key = f"check:{e.code().name}"
            check_errors[key] = check_errors.get(key, 0) + 1
        finally:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.CloseSession(
                    pb.CloseSessionRequest(session_id=sid), metadata=route, timeout=10
                )
    for ch in channels:
        await ch.close()
    arrays: dict[str, np.ndarray] = {}
    for n, s in enumerate(samples, start=1):
        assert isinstance(s.rtt_ns, StampedList)
        arrays[f"rtt{n}"] = np.asarray(s.rtt_ns, np.int64)
        arrays[f"at{n}"] = np.asarray(s.rtt_ns.at, np.int64)
    if args.out:
        np.savez(args.out, **arrays)  # type: ignore[arg-type]
    return {
        "streams": args.streams,
        "windows_ns": wins,
        "window_s": args.window,
        "windows": [
            {"steps": s.tokens, "errors": s.errors, "client_cpu_fraction": c}
            for s, c in zip(samples, cpu, strict=True)
        ],
        "versions_created": [v for _, v in created],
        "versions_at_end": ended,
        "check_errors": check_errors,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rollout_load")
    p.add_argument("--target", required=True)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--start-ns", type=int, required=True, help="time.monotonic_ns() to start at")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before window 1")
    p.add_argument("--window", type=float, default=5.0, help="seconds per measured window")
    p.add_argument("--gap", type=float, default=0.5, help="seconds between the two windows")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to finish after window 2")
    p.add_argument("--vocab", type=int, default=28)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--out", default="", help=".npz file for the raw samples")
    args = p.parse_args(argv)
    try:
        result = asyncio.run(_run(args))
    except (TimeoutError, grpc.aio.AioRpcError) as e:
        print(f"rollout_load: {args.target}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
