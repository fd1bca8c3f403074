"""Why the server sets Python's GIL switch interval: one model call beside a busy Python thread.

ONNX Runtime releases the GIL for the model call, but the calling thread needs it back to return.
If another thread is running Python at that moment (the server's event loop thread doing gRPC
work), the caller waits until that thread's switch interval runs out: Python's default is 5 ms,
far longer than a decode step. This measures one T=1 call (median) at B=1 and B=64 alone and
beside a thread that only runs Python, for several switch intervals, alternating them in rounds.

    python -m benchmarks.gil_handoff [--model M.onnx] [--out DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import ROOT, machine, resolve_model, versions, write_json
from .inprocess import ort_session

INTERVALS_US = (5000, 1000, 200)
BATCHES = (1, 64)


def _median_call_ms(sess: Any, batch: int, layers: int, hidden: int, vocab: int, n: int) -> float:
    feeds = {
        "tokens": np.random.default_rng(0).integers(0, vocab, (1, batch), dtype=np.int64),
        "h0": np.zeros((layers, batch, hidden), np.float32),
        "c0": np.zeros((layers, batch, hidden), np.float32),
    }
    times = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        _, feeds["h0"], feeds["c0"] = sess.run(None, feeds)
        times[i] = time.perf_counter() - t
    return float(np.median(times) * 1e3)


def _busy(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))  # pure Python: holds the GIL between switch requests


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gil_handoff", description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    out = Path(args.out)
    m = resolve_model(args.model, out / ".work")
    sess = ort_session(m.path, 1)
    shape = (m.num_layers, m.hidden_size, m.vocab_size)
    samples: dict[tuple[int, int, str], list[float]] = {}
    before = sys.getswitchinterval()
    try:
        for _ in range(args.rounds):
            for us in INTERVALS_US:
                sys.setswitchinterval(us / 1e6)
                for b in BATCHES:
                    alone = _median_call_ms(sess, b, *shape, args.calls)
                    stop = threading.Event()
                    th = threading.Thread(target=_busy, args=(stop,), daemon=True)
                    th.start()
                    try:
                        busy = _median_call_ms(sess, b, *shape, args.calls)
                    finally:
                        stop.set()
                        th.join()
                    samples.setdefault((us, b, "alone"), []).append(alone)
                    samples.setdefault((us, b, "busy"), []).append(busy)
    finally:
        sys.setswitchinterval(before)
    rows = []
    print(f"{'switch µs':>9} {'B':>4} {'alone ms':>9} {'beside busy thread ms':>22} {'ratio':>6}")
    for us in INTERVALS_US:
        for b in BATCHES:
            alone = float(np.median(samples[(us, b, "alone")]))
            busy = float(np.median(samples[(us, b, "busy")]))
            rows.append({"switch_interval_us": us, "batch": b, "alone_ms": alone, "busy_ms": busy})
            print(f"{us:>9} {b:>4} {alone:>9.3f} {busy:>22.3f} {busy / alone:>6.1f}")
    write_json(
        out / "gil_handoff.json",
        {
            "command": "python -m benchmarks.gil_handoff " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "machine": machine(),
            "versions": versions(),
            "rounds": args.rounds,
            "calls_per_measure": args.calls,
            "rows": rows,
        },
    )
    print(f"wrote {out / 'gil_handoff.json'}")


if __name__ == "__main__":
    main()
