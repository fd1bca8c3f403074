"""The benchmark's one entry point: ``python -m benchmarks.run [--quick] [--out DIR]``.

Sections (each one records its figures or ``skipped`` with the reason; nothing is invented):

1. in-process ONNX Runtime decode steps (T=1), the physical limit, with the server's threads;
2. PyTorch eager ``nn.LSTM`` at the same shapes and thread count;
3. the server's ``Generate`` at several concurrencies (separate load-generator process);
4. client-driven steps over ``StepStream`` at several stream counts;
5. the same server with batching off (``--max-batch-size 1``);
6. the int8 model through the server against fp32;
7. resident memory growth for many idle sessions against their raw state bytes;
8. training throughput of our two cells against the book's own code (d2l);
9. the engine's own cost per iteration (a fake model) against the in-process model call;
10. the server with ``--frontends 1`` and ``--frontends 2`` side by side;
11. named sessions on the memory, SQLite and Redis state stores (the cost of write-through),
    and once in full runs the scale test's failover (nginx, Redis, 3 replicas, kill -9);
13. Triton's perf_analyzer over the KServe v2 protocol in sequence mode (full runs only),
    beside our own load generator's StepStream at the same concurrencies;
14. a live rollout: StepStream on sessions of version 1 while version 2 is published into the
    server's model repository (poll mode) and loads; time to the first request version 2
    serves; memory per loaded version (``benchmarks.rollout``).

Writes ``DIR/results.json`` (top-level ``summary`` of ratios, ``summary_reasons`` for any that
are null), PNG plots beside it, and on stdout the tables of ``benchmarks.report`` as plain
text. ``--quick`` runs every section tiny (the test suite uses it to check that everything
works, not how fast).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import (
    common,
    efficiency,
    engine_overhead,
    inprocess,
    report,
    rollout,
    sequence,
    state_stores,
    training_bench,
)
from . import perf_analyzer as pa
from . import server_bench as sb
from .common import SectionSkipped, ratio

SUMMARY_KEYS = (
    "p1_generate64_vs_inprocess",
    "p2_step_overhead_ms_p50",
    "p2_step_rtt_ms_p99",
    "step_stream16_steps_per_s",
    "p4_ort_vs_torch_b1",
    "p4_ort_vs_torch_onednn_off_b1",
    "p5_train_scratch_vs_d2l",
    "p5_train_torch_vs_d2l",
    "p6_session_memory_ratio",
    "batching_speedup_generate64",
    "batching_speedup_stream16",
    "int8_vs_fp32_generate64",
    "stream16_vs_grpc_floor",
    "grpc_floor_stream16_steps_per_s",
    "grpc_floor_rtt_ms_p50",
    "engine_overhead_vs_model_b1",
    "engine_overhead_vs_model_b64",
    "engine_overhead_vs_model_b256",
    "frontends2_vs_1_generate64",
    "frontends2_vs_1_stream16",
    "store_sqlite_vs_memory_stream16",
    "store_redis_vs_memory_stream16",
    "store_redis_step_p50_ms",
    "failover_s",
    "create_session_large_vs_small_p50",
    "perf_analyzer_seq_c16_infer_per_s",
    "kserve_vs_lstmserve_stream16",
    "rollout_p99_during_vs_steady",
    "rollout_steps_during_vs_steady",
    "rollout_first_v2_s",
    # Section 15 (issue 18): this tree's default topology against the single-process server.
    "ab_steps_vs_single_process_s1",
    "ab_steps_vs_single_process_s16",
    "ab_steps_vs_single_process_s64",
    "ab_cpu_per_step_vs_single_process_s1",
    "ab_cpu_per_step_vs_single_process_s16",
    "ab_cpu_per_step_vs_single_process_s64",
    "topology_single_vs_split_s16",
    "default_topology_is_fastest",
    "p1_generate64_vs_inprocess_mix",
    "kserve_mean_batch_c16",
    # Section 16 (issue 21): the bundled sequence model.
    "sequence_stream1_vs_inprocess",
    "sequence_stream16_vs_inprocess",
    "sequence_lstm_vs_seasonal_naive_mae",
)
# (key, comparison, target) from the issue. Every run records the verdicts; only a full run's
# figures are meant to be judged by them (--quick is a smoke test).
TARGETS = (
    ("p1_generate64_vs_inprocess", ">=", 0.80),
    ("p2_step_overhead_ms_p50", "<=", 0.4),
    ("p2_step_rtt_ms_p99", "<=", 2.0),
    ("step_stream16_steps_per_s", ">=", 6000.0),
    ("p4_ort_vs_torch_b1", ">=", 5.0),
    ("p5_train_scratch_vs_d2l", ">=", 1.0),
    ("p5_train_torch_vs_d2l", ">=", 1.0),
    ("p6_session_memory_ratio", "<=", 1.5),
    ("stream16_vs_grpc_floor", ">=", 1.0),
    ("batching_speedup_stream16", ">=", 1.0),
    ("engine_overhead_vs_model_b64", "<=", 0.25),
    ("engine_overhead_vs_model_b256", "<=", 0.15),
    ("create_session_large_vs_small_p50", "<=", 2.0),
    # Issue 17; its other target (no errors) and the pinning check are the section's verdicts.
    ("rollout_p99_during_vs_steady", "<=", 1.5),
    # Issue 18.
    ("ab_steps_vs_single_process_s1", ">=", efficiency.STEPS_RATIO_TARGET),
    ("ab_steps_vs_single_process_s16", ">=", efficiency.STEPS_RATIO_TARGET),
    ("ab_steps_vs_single_process_s64", ">=", efficiency.STEPS_RATIO_TARGET),
    ("ab_cpu_per_step_vs_single_process_s1", "<=", 1.0),
    ("ab_cpu_per_step_vs_single_process_s16", "<=", efficiency.CPU_RATIO_TARGET_16),
    ("ab_cpu_per_step_vs_single_process_s64", "<=", 1.0),
    ("default_topology_is_fastest", ">=", 1.0),
    ("p1_generate64_vs_inprocess_mix", ">=", efficiency.P1_MIX_TARGET),
    ("kserve_mean_batch_c16", ">=", 4.0),
    ("kserve_vs_lstmserve_stream16", ">=", 0.9),
)


class Profile:
    """Sizes of everything, full or quick."""

    def __init__(self, quick: bool, provider: str) -> None:
        self.quick = quick
        cuda = provider == "cuda"
        self.batches = [1, 8, 32, 64, 128, 256] + ([512, 1024, 2048, 4096] if cuda else [])
        self.inproc_seconds = 0.05 if quick else 2.0
        self.paired_seconds = 0.05 if quick else 0.5
        self.paired_rounds = 1 if quick else 7
        self.gen_conc = [1, 64] if quick else [1, 8, 32, 64, 128]
        self.streams = [1, 16] if quick else [1, 16, 64]
        self.nobatch_gen = [64] if quick else [1, 8, 32, 64, 128]
        self.nobatch_streams = [16] if quick else [1, 16, 64]
        self.int8_gen = [64] if quick else [1, 64]
        self.int8_streams = [] if quick else [16]
        self.lead = 1.0 if quick else 2.5
        self.warmup = 0.3 if quick else 2.0
        self.duration = 0.8 if quick else 10.0
        self.max_tokens = 32 if quick else 256
        self.sessions = 300 if quick else 10_000
        self.warm_sessions = 30 if quick else 500
        self.train_windows = 64 if quick else 10_000
        self.train_epochs = 1
        self.train_rounds = 1 if quick else 3
        self.engine_batches = [1, 64, 256]
        self.engine_seconds = 0.3 if quick else 3.0
        self.engine_rounds = 1 if quick else 3
        self.frontend_counts = (1, 2)
        self.frontend_rounds = 1 if quick else 2
        self.store_streams = [1, 16]
        # CreateSession with this many sessions held, small then large (issue 13: 1k vs 100k).
        self.create_sizes = (200, 2_000) if quick else (1_000, 100_000)
        self.create_probes = 50 if quick else 300
        self.store_rounds = 1 if quick else 2
        # scripts/scale_test.py's load (the figures); full runs only.
        self.scale_sessions = 16
        self.scale_steps = 30
        self.scale_timeout_s = 240.0
        # Section 13: perf_analyzer and StepStream at each of these concurrencies.
        self.kserve_conc = [1, 2, 4, 8, 16, 32, 64]
        self.kserve_window_ms = 5000
        # Section 14: StepStreams on v1, a steady window, then one that opens with v2's publish.
        self.rollout_streams = 16
        self.rollout_window = 3.0 if quick else 10.0
        # Streams open at the start: a second of warm-up even in quick runs, so the steady
        # window (the ratio's denominator) holds no start-up transient.
        self.rollout_warmup = 1.0 if quick else 2.0
        self.rollout_poll_s = 0.5
        # Section 15: rounds of the A/B (servers in rotated order each round).
        self.ab_rounds = 1 if quick else 3


def _default_corpus() -> Path | None:
    env = os.environ.get("LSTM_SERVE_CORPUS")
    if env:
        return Path(env) if Path(env).is_file() else None
    beside = common.ROOT.parent / "shared" / "data" / "timemachine.txt"
    return beside if beside.is_file() else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="every section tiny (smoke test)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default benchmarks/results, or .bench/quick with --quick)",
    )
    p.add_argument("--model", default=None, help="ONNX model (default: the bundled one)")
    p.add_argument("--corpus", type=Path, default=None, help="timemachine.txt for section 8")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ORT intra-op and torch threads (default: the server's intra-op setting)",
    )
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--iobinding",
        action="store_true",
        help="section 1 through IOBinding with device-resident state (implied by cuda)",
    )
    p.add_argument("--client-procs", type=int, default=1, help="load-generator processes")
    p.add_argument(
        "--sections", default=None, help="comma-separated section numbers to run (default: all)"
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--window", type=float, default=None, help="seconds measured per server load point"
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra lstm-serve flag for every server started (repeatable), e.g. "
        "--server-arg=--inline-max-rows=0, for A/B runs of engine settings",
    )
    p.add_argument(
        "--server-src",
        type=Path,
        default=None,
        help="run the server from this tree (holding server/, protos/, export/) instead of "
        "this checkout, e.g. a `git worktree` of another commit",
    )
    p.add_argument(
        "--base-src",
        type=Path,
        default=None,
        help="section 15's single-process server: this tree instead of a temporary git "
        f"worktree of {efficiency.BASE_COMMIT}",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the server at the summary's load points (Generate 64, streams 1 and 16); "
        "raw stacks under DIR/profiles, shares in the JSON. Profiled figures are not a record.",
    )
    args = p.parse_args(argv)
    if args.out is None:
        args.out = common.ROOT / (".bench/quick" if args.quick else "benchmarks/results")
    if args.sections is None:
        args.sections = set(range(1, len(SECTIONS) + 1))
    else:
        args.sections = {int(x) for x in args.sections.split(",") if x.strip()}
    if args.provider == "cuda":
        args.iobinding = True
    return args


class Context:
    """What every section reads: the settings, the sizes, the model, and the results so far."""

    def __init__(self, args: argparse.Namespace, model: common.ModelUnderTest) -> None:
        self.args = args
        self.prof = Profile(args.quick, args.provider)
        if args.window:
            self.prof.duration = args.window
        self.threads: int = args.threads or common.server_intra_op_threads()
        self.model = model
        self.sections: dict[str, Any] = {}
        # Sections 3 and 4 share one fp32 server: section 3's sweep also drives the StepStream
        # load, and section 4 reports those rows beside the gRPC floor.
        self.fp32_sweep: dict[str, Any] = {}

    @functools.cached_property
    def server_missing(self) -> str | None:
        """Why the server cannot start here (None when it can); asked once per run."""
        return sb.server_available()

    def server_flags(self) -> list[str]:
        """The flags every server of the run starts with (then the section's own)."""
        return [
            "--intra-op-threads",
            str(self.threads),
            "--provider",
            self.args.provider,
            "--max-new-tokens",
            str(max(4096, self.prof.max_tokens)),
            *self.args.server_arg,
        ]

    def run(self, number: int, key: str, fn: Section) -> None:
        """Run section ``number``; its result, or ``{"skipped": reason}``, goes under ``key``."""
        if number not in self.args.sections:
            self.sections[key] = {"skipped": f"section {number} not selected (--sections)"}
            return
        print(f"[bench] section {number}: {key} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = fn(self)
        except SectionSkipped as e:
            self.sections[key] = {"skipped": str(e)}
            print(f"[bench]   skipped: {e}", file=sys.stderr, flush=True)
            return
        except Exception as e:
            # One broken section must not lose the others' figures; it is reported as failed,
            # with the error, and its summary keys are null with this as the reason.
            first = (str(e).strip().splitlines() or [""])[0]
            msg = f"failed: {type(e).__name__}: {first}"
            self.sections[key] = {"skipped": msg, "failed": True}
            print(f"[bench]   {msg}", file=sys.stderr, flush=True)
            return
        result["elapsed_s"] = round(time.perf_counter() - t0, 2)
        # The 1-minute load average as the section ends: on a shared machine, the hint of
        # whether someone else's work ran alongside it.
        result["load_average_after"] = common.load_average()
        self.sections[key] = result

    def reason(self, *keys: str) -> str:
        for k in keys:
            sec = self.sections.get(k, {})
            if "skipped" in sec:
                return f"{k}: {sec['skipped']}"
        return "not measured"


Section = Callable[[Context], dict[str, Any]]

# --- the sections ------------------------------------------------------------------------------


def inprocess_ort(ctx: Context) -> dict[str, Any]:
    p = ctx.prof
    return inprocess.ort_decode(
        ctx.model,
        p.batches,
        ctx.threads,
        p.inproc_seconds,
        provider=ctx.args.provider,
        iobinding=ctx.args.iobinding,
    )


def torch_eager(ctx: Context) -> dict[str, Any]:
    p = ctx.prof
    batches = [b for b in p.batches if b <= 256]
    out = inprocess.torch_decode(ctx.model, batches, ctx.threads, p.inproc_seconds)
    out["paired_b1"] = inprocess.paired_b1(
        ctx.model, ctx.threads, p.paired_seconds, p.paired_rounds
    )
    return out


def generate(ctx: Context) -> dict[str, Any]:
    _need_server(ctx)
    p, flags = ctx.prof, ctx.server_flags()
    ctx.fp32_sweep = _sweep(ctx, ctx.model.path, flags, p.gen_conc, p.streams, "fp32")
    return {"server_flags": flags, "rows": ctx.fp32_sweep["generate"]}


def stream(ctx: Context) -> dict[str, Any]:
    _need_server(ctx)
    if "stream" not in ctx.fp32_sweep:
        raise SectionSkipped(ctx.reason("generate"))
    V = ctx.model.vocab_size
    # The same load against a server that answers at once: gRPC Python's own floor here.
    with sb.running_null_server(V) as null:
        floor = [
            sb.drive(null, _load(ctx, "stream", c), V, _profile_file(ctx, "null", "stream", c))
            for c in ctx.prof.streams
        ]
    return {"rows": ctx.fp32_sweep["stream"], "grpc_floor_rows": floor}


def no_batching(ctx: Context) -> dict[str, Any]:
    _need_server(ctx)
    p = ctx.prof
    flags = [*ctx.server_flags(), "--max-batch-size", "1"]
    return _sweep(ctx, ctx.model.path, flags, p.nobatch_gen, p.nobatch_streams, "nobatch")


def int8(ctx: Context) -> dict[str, Any]:
    _need_server(ctx)
    if ctx.model.int8_path is None:
        raise SectionSkipped("no int8 model beside the fp32 one and export.quantize unusable")
    if ctx.args.provider == "cuda":
        raise SectionSkipped("the int8 model's contrib ops are CPU-only")
    p = ctx.prof
    out = _sweep(ctx, ctx.model.int8_path, ctx.server_flags(), p.int8_gen, p.int8_streams, "int8")
    out["model"] = ctx.model.int8_path
    return out


def memory(ctx: Context) -> dict[str, Any]:
    _need_server(ctx)
    p = ctx.prof
    flags = [*ctx.server_flags(), "--max-sessions", str(p.sessions + p.warm_sessions)]
    with sb.running_server(ctx.model.path, extra=flags, source=ctx.args.server_src) as srv:
        return sb.memory(srv, ctx.model, p.sessions, p.warm_sessions)


def create_scaling(ctx: Context) -> dict[str, Any]:
    """CreateSession's latency with few and with many sessions held (it must not grow)."""
    _need_server(ctx)
    p = ctx.prof
    small, large = p.create_sizes
    flags = [*ctx.server_flags(), "--max-sessions", str(large + p.create_probes + 10)]
    with sb.running_server(ctx.model.path, extra=flags, source=ctx.args.server_src) as srv:
        out = sb.create_scaling(srv, small, large, p.create_probes)
    rows = out["rows"]
    if rows[0]["p50_ms"] and rows[1]["p50_ms"]:
        out["large_vs_small_p50"] = rows[1]["p50_ms"] / rows[0]["p50_ms"]
    return out


def training(ctx: Context) -> dict[str, Any]:
    p = ctx.prof
    corpus = ctx.args.corpus or _default_corpus()
    return training_bench.run(corpus, ctx.threads, p.train_windows, p.train_epochs, p.train_rounds)


def engine_overhead_section(ctx: Context) -> dict[str, Any]:
    p = ctx.prof
    return engine_overhead.run(
        ctx.model,
        p.engine_batches,
        ctx.threads,
        p.engine_seconds,
        p.engine_rounds,
        provider=ctx.args.provider,
        iobinding=ctx.args.iobinding,
    )


def frontends(ctx: Context) -> dict[str, Any]:
    """Generate at 64 and StepStream at 16 on two servers, ``--frontends 1`` and ``2``, both
    started once and loaded in turn: per mode the two run back to back, and the order flips
    every round (the idle one waits meanwhile). Ratios are taken within a round; median."""
    _need_server(ctx)
    p = ctx.prof
    points = (("generate", 64), ("stream", 16))
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = {
            n: stack.enter_context(
                sb.running_server(
                    ctx.model.path,
                    extra=[*ctx.server_flags(), "--frontends", str(n)],
                    source=ctx.args.server_src,
                )
            )
            for n in p.frontend_counts
        }
        for r in range(p.frontend_rounds):
            order = p.frontend_counts if r % 2 == 0 else p.frontend_counts[::-1]
            for mode, conc in points:
                for n in order:
                    row = sb.drive(servers[n], _load(ctx, mode, conc), ctx.model.vocab_size)
                    rows.append({"round": r, "frontends": n, "mode": mode, **row})
    one, two = p.frontend_counts

    def median_ratio(mode: str, figure: str) -> float | None:
        per_round = []
        for r in range(p.frontend_rounds):
            at = {x["frontends"]: x for x in rows if x["round"] == r and x["mode"] == mode}
            per_round.append(ratio(at[two][figure], at[one][figure]))
        vals = [v for v in per_round if v is not None]
        return float(statistics.median(vals)) if vals else None

    return {
        "frontends": list(p.frontend_counts),
        "rounds": p.frontend_rounds,
        "generate": [x for x in rows if x["mode"] == "generate"],
        "stream": [x for x in rows if x["mode"] == "stream"],
        "generate_ratio": median_ratio("generate", "tokens_per_s"),
        "stream_ratio": median_ratio("stream", "steps_per_s"),
    }


def stores(ctx: Context) -> dict[str, Any]:
    """StepStream on named sessions (loadgen ``stream-named``: with a durable store every step
    is a write-through) at each of ``store_streams``, against three servers started side by
    side, ``--state-store memory``, ``sqlite:///TMP/s.db`` and ``redis://`` a throwaway Redis,
    loaded in turn per point, the order flipped every round. Each store's steps/s ÷ memory's
    within a round, median. Then, in full runs only, ``scripts/scale_test.py`` once."""
    _need_server(ctx)
    p = ctx.prof
    out: dict[str, Any] = {"streams": p.store_streams, "rounds": p.store_rounds}
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-stores-") as tmp,
        state_stores.throwaway_redis() as (redis_url, redis_missing),
    ):
        urls = {"memory": "memory", "sqlite": f"sqlite:///{Path(tmp) / 's.db'}"}
        if redis_url is not None:
            urls["redis"] = redis_url
        else:
            out["redis_skipped"] = redis_missing
        out["stores"] = urls
        # A commit to a tmpfs costs less than one to a disk: say which this was.
        out["sqlite_fs"] = state_stores.fs_type(Path(tmp))
        with contextlib.ExitStack() as stack:
            servers = {
                name: stack.enter_context(
                    sb.running_server(
                        ctx.model.path,
                        extra=[*ctx.server_flags(), "--state-store", url],
                        source=ctx.args.server_src,
                    )
                )
                for name, url in urls.items()
            }
            names = list(urls)
            for r in range(p.store_rounds):
                order = names if r % 2 == 0 else names[::-1]
                for c in p.store_streams:
                    for name in order:
                        row = sb.drive(
                            servers[name], _load(ctx, "stream-named", c), ctx.model.vocab_size
                        )
                        rows.append({"round": r, "store": name, **row})
    out["rows"] = rows

    def at(r: int, name: str, c: int) -> dict[str, Any]:
        return next(x for x in rows if (x["round"], x["store"], x["concurrency"]) == (r, name, c))

    def median(vals: list[float | None]) -> float | None:
        known = [v for v in vals if v is not None]
        return float(statistics.median(known)) if known else None

    rounds = range(p.store_rounds)
    out["vs_memory"] = {
        name: {
            f"stream{c}": median(
                [
                    ratio(at(r, name, c)["steps_per_s"], at(r, "memory", c)["steps_per_s"])
                    for r in rounds
                ]
            )
            for c in p.store_streams
        }
        for name in urls
        if name != "memory"
    }
    out["rtt_p50_ms"] = {
        name: {
            f"stream{c}": median([at(r, name, c)["rtt"]["p50_ms"] for r in rounds])
            for c in p.store_streams
        }
        for name in urls
    }
    if ctx.args.quick:
        out["scale_test"] = {
            "skipped": "quick mode: the scale test needs nginx, Redis and three more "
            "replicas; full runs only"
        }
    else:
        # After the three servers stopped: the scale test loads both cores by itself.
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            out["scale_test"] = state_stores.scale_test(
                Path(tmp) / "scale.json", p.scale_sessions, p.scale_steps, p.scale_timeout_s
            )
    return out


def kserve(ctx: Context) -> dict[str, Any]:
    """Triton's perf_analyzer (KServe v2 gRPC, sequence mode, ModelStreamInfer; sequences of
    :data:`benchmarks.perf_analyzer.SEQUENCE_LENGTH` one-token requests) and our load
    generator (``stream``: one StepStream per caller, one token per step) against one server,
    point by point at each concurrency. Full runs only: perf_analyzer installs into ``.pa/``."""
    if ctx.args.quick:
        raise SectionSkipped(
            "quick mode: perf_analyzer installs into its own virtual environment (minutes); "
            "full runs only"
        )
    _need_server(ctx)
    binary, env = pa.ensure()
    p, V = ctx.prof, ctx.model.vocab_size
    flags = ctx.server_flags()
    pa_rows: list[dict[str, Any]] = []
    ours: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-pa-") as tmp,
        sb.running_server(
            ctx.model.path, extra=[*flags, "--metrics-port", "0"], source=ctx.args.server_src
        ) as srv,
    ):
        name = pa.model_name(srv.target)
        data = pa.write_data(Path(tmp) / "tokens.json", V)
        for c in p.kserve_conc:
            before = sb.batch_totals(srv)
            row = pa.run(binary, env, srv.target, name, c, data, window_ms=p.kserve_window_ms)
            # Rows per model call over perf_analyzer's whole run (warm-up included), from the
            # server's own histogram: whether KServe requests join one batch as StepStream's do.
            row["server_mean_batch"] = sb.mean_batch(before, sb.batch_totals(srv))
            pa_rows.append(row)
            ours.append(sb.drive(srv, _load(ctx, "stream", c), V))
    at16 = _row_at(pa_rows, "concurrency", 16) or {}
    ours16 = _row_at(ours, "concurrency", 16) or {}
    return {
        "server_flags": flags,
        "model": name,
        "sequence_length": pa.SEQUENCE_LENGTH,
        "perf_analyzer": pa_rows,
        "stream": ours,
        # perf_analyzer's infer/s over the KServe protocol ÷ our StepStream's steps/s.
        "kserve_vs_lstmserve_16": ratio(at16.get("infer_per_s"), ours16.get("steps_per_s")),
    }


def rollout_section(ctx: Context) -> dict[str, Any]:
    """Issue 17: a version published into a polled repository while 16 StepStreams run on
    sessions of the old one (see :mod:`benchmarks.rollout`)."""
    _need_server(ctx)
    if ctx.args.provider == "cuda":
        raise SectionSkipped("version 2 is the int8 model, whose contrib ops are CPU-only")
    p = ctx.prof
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        return rollout.run(
            ctx.model,
            ctx.server_flags(),
            Path(tmp),
            streams=p.rollout_streams,
            window=p.rollout_window,
            warmup=p.rollout_warmup,
            lead=p.lead,
            poll_s=p.rollout_poll_s,
            source=ctx.args.server_src,
        )


def efficiency_section(ctx: Context) -> dict[str, Any]:
    _need_server(ctx)
    p = ctx.prof
    return efficiency.run(
        ctx.model.path,
        ctx.model.vocab_size,
        rounds=p.ab_rounds,
        duration=p.duration,
        warmup=p.warmup,
        lead=p.lead,
        max_tokens=p.max_tokens,
        base=ctx.args.base_src,
    )


def sequence_section(ctx: Context) -> dict[str, Any]:
    _need_server(ctx)
    p = ctx.prof
    return sequence.run(
        threads=ctx.threads,
        seconds=p.inproc_seconds,
        duration=p.duration,
        warmup=p.warmup,
        lead=p.lead,
    )


# Section n is SECTIONS[n - 1] (what --sections selects); the keys are results.json's.
SECTIONS: tuple[tuple[str, Section], ...] = (
    ("inprocess_ort", inprocess_ort),
    ("torch_eager", torch_eager),
    ("generate", generate),
    ("stream", stream),
    ("no_batching", no_batching),
    ("int8", int8),
    ("memory", memory),
    ("training", training),
    ("engine_overhead", engine_overhead_section),
    ("frontends", frontends),
    ("state_stores", stores),
    ("create_scaling", create_scaling),
    ("kserve_perf_analyzer", kserve),
    ("rollout", rollout_section),
    ("efficiency", efficiency_section),
    ("sequence_model", sequence_section),
)

# --- server sweeps -----------------------------------------------------------------------------

# The summary's server points: p1 and p2 divide by an in-process run measured right before them.
ADJACENT_POINTS = (("generate", 64), ("stream", 1))
# What --profile samples: the summary's points.
PROFILED_POINTS = (("generate", 64), ("stream", 1), ("stream", 16))


def _need_server(ctx: Context) -> None:
    if ctx.server_missing is not None:
        raise SectionSkipped(ctx.server_missing)


def _load(ctx: Context, mode: str, concurrency: int) -> sb.LoadSpec:
    p = ctx.prof
    return sb.LoadSpec(
        mode, concurrency, p.duration, p.warmup, p.max_tokens, ctx.args.client_procs, p.lead
    )


def _profile_file(ctx: Context, tag: str, mode: str, concurrency: int) -> Path | None:
    if not ctx.args.profile or (mode, concurrency) not in PROFILED_POINTS:
        return None
    return ctx.args.out / "profiles" / f"{tag}-{mode}{concurrency}.txt"


def _sweep(
    ctx: Context, model_path: str, flags: list[str], gens: list[int], streams: list[int], tag: str
) -> dict[str, Any]:
    """One server started with ``flags``: Generate at each concurrency in ``gens``, then
    StepStream at each in ``streams``; rows under ``"generate"`` and ``"stream"``."""
    out: dict[str, Any] = {"server_flags": flags}
    with sb.running_server(model_path, extra=flags, source=ctx.args.server_src) as srv:
        out["generate"] = [_point(ctx, srv, tag, "generate", c) for c in gens]
        out["stream"] = [_point(ctx, srv, tag, "stream", c) for c in streams]
    return out


def _point(
    ctx: Context, srv: sb.ServerProcess, tag: str, mode: str, concurrency: int
) -> dict[str, Any]:
    # The summary's points get their in-process baseline measured right before them (the
    # server idle meanwhile), so p1 and p2 compare like with like in time.
    adjacent = None
    if tag == "fp32" and (mode, concurrency) in ADJACENT_POINTS:
        adjacent = inprocess.ort_decode(
            ctx.model, [concurrency], ctx.threads, ctx.prof.inproc_seconds
        )
    spec = _load(ctx, mode, concurrency)
    row = sb.drive(srv, spec, ctx.model.vocab_size, _profile_file(ctx, tag, mode, concurrency))
    if adjacent is not None:
        row["inprocess_adjacent"] = adjacent["rows"][0]
    return row


# --- the summary -------------------------------------------------------------------------------


def _row_at(rows: list[dict[str, Any]] | None, key: str, value: int) -> dict[str, Any] | None:
    for row in rows or []:
        if row.get(key) == value:
            return row
    return None


def summarise(ctx: Context) -> tuple[dict[str, Any], dict[str, str]]:
    s = ctx.sections
    summary: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)
    reasons: dict[str, str] = {}

    ort_rows = s.get("inprocess_ort", {}).get("rows")
    torch_rows = s.get("torch_eager", {}).get("rows")
    ort64 = _row_at(ort_rows, "batch", 64)
    ort1 = _row_at(ort_rows, "batch", 1)
    torch1 = _row_at(torch_rows, "batch", 1)
    torch1_native = _row_at(s.get("torch_eager", {}).get("rows_onednn_off"), "batch", 1)
    gen64 = _row_at(s.get("generate", {}).get("rows"), "concurrency", 64)
    st1 = _row_at(s.get("stream", {}).get("rows"), "concurrency", 1)
    st16 = _row_at(s.get("stream", {}).get("rows"), "concurrency", 16)
    nb = s.get("no_batching", {})
    nb_gen64 = _row_at(nb.get("generate"), "concurrency", 64)
    nb_st16 = _row_at(nb.get("stream"), "concurrency", 16)
    i8_gen64 = _row_at(s.get("int8", {}).get("generate"), "concurrency", 64)

    def put(key: str, value: float | None, *why_sections: str) -> None:
        summary[key] = value
        if value is None:
            reasons[key] = ctx.reason(*why_sections)

    # p1 and p2 use the in-process baseline measured right before the server point when there
    # is one (see _point), else section 1's.
    base64 = (gen64 or {}).get("inprocess_adjacent") or ort64
    base1 = (st1 or {}).get("inprocess_adjacent") or ort1
    put(
        "p1_generate64_vs_inprocess",
        ratio(gen64 and gen64["tokens_per_s"], base64 and base64["tokens_per_s"]),
        "generate",
        "inprocess_ort",
    )
    overhead = None
    if st1 and base1 and st1["rtt"]["p50_ms"] is not None:
        overhead = st1["rtt"]["p50_ms"] - base1["p50_ms"]
    put("p2_step_overhead_ms_p50", overhead, "stream", "inprocess_ort")
    put("p2_step_rtt_ms_p99", st1 and st1["rtt"]["p99_ms"], "stream")
    put("step_stream16_steps_per_s", st16 and st16["steps_per_s"], "stream")
    # p4 from the rounds that alternate the two engines (robust to load that comes and goes);
    # the sections' own B=1 rows, measured minutes apart, are the fallback.
    paired = s.get("torch_eager", {}).get("paired_b1") or {}
    put(
        "p4_ort_vs_torch_b1",
        paired.get("ort_vs_torch")
        or ratio(ort1 and ort1["tokens_per_s"], torch1 and torch1["tokens_per_s"]),
        "inprocess_ort",
        "torch_eager",
    )
    put(
        "p4_ort_vs_torch_onednn_off_b1",
        paired.get("ort_vs_torch_onednn_off")
        or ratio(ort1 and ort1["tokens_per_s"], torch1_native and torch1_native["tokens_per_s"]),
        "inprocess_ort",
        "torch_eager",
    )
    tr = s.get("training", {})
    put("p5_train_scratch_vs_d2l", tr.get("scratch_vs_d2l"), "training")
    put("p5_train_torch_vs_d2l", tr.get("torch_vs_d2l"), "training")
    put("p6_session_memory_ratio", s.get("memory", {}).get("ratio"), "memory")
    put(
        "batching_speedup_generate64",
        ratio(gen64 and gen64["tokens_per_s"], nb_gen64 and nb_gen64["tokens_per_s"]),
        "no_batching",
        "generate",
    )
    put(
        "batching_speedup_stream16",
        ratio(st16 and st16["steps_per_s"], nb_st16 and nb_st16["steps_per_s"]),
        "no_batching",
        "stream",
    )
    floor = s.get("stream", {}).get("grpc_floor_rows")
    fl16 = _row_at(floor, "concurrency", 16)
    fl1 = _row_at(floor, "concurrency", 1)
    put(
        "stream16_vs_grpc_floor",
        ratio(st16 and st16["steps_per_s"], fl16 and fl16["steps_per_s"]),
        "stream",
    )
    put("grpc_floor_stream16_steps_per_s", fl16 and fl16["steps_per_s"], "stream")
    put("grpc_floor_rtt_ms_p50", fl1 and fl1["rtt"]["p50_ms"], "stream")
    put(
        "int8_vs_fp32_generate64",
        ratio(i8_gen64 and i8_gen64["tokens_per_s"], gen64 and gen64["tokens_per_s"]),
        "int8",
        "generate",
    )
    # The engine's own µs per iteration ÷ the model call's, at the same B (medians of rounds).
    eng_rows = s.get("engine_overhead", {}).get("rows")
    for B in (1, 64, 256):
        row = _row_at(eng_rows, "batch", B)
        put(f"engine_overhead_vs_model_b{B}", row and row["ratio"], "engine_overhead")
    fe = s.get("frontends", {})
    put("frontends2_vs_1_generate64", fe.get("generate_ratio"), "frontends")
    put("frontends2_vs_1_stream16", fe.get("stream_ratio"), "frontends")
    _summarise_stores(ctx, summary, reasons)
    put(
        "create_session_large_vs_small_p50",
        s.get("create_scaling", {}).get("large_vs_small_p50"),
        "create_scaling",
    )
    kq = s.get("kserve_perf_analyzer", {})
    pa16 = _row_at(kq.get("perf_analyzer"), "concurrency", 16)
    put(
        "perf_analyzer_seq_c16_infer_per_s",
        pa16 and pa16.get("infer_per_s"),
        "kserve_perf_analyzer",
    )
    put("kserve_vs_lstmserve_stream16", kq.get("kserve_vs_lstmserve_16"), "kserve_perf_analyzer")
    if pa16 and "error" in pa16:
        for key in ("perf_analyzer_seq_c16_infer_per_s", "kserve_vs_lstmserve_stream16"):
            reasons[key] = f"kserve_perf_analyzer: perf_analyzer at 16: {pa16['error']}"
    ef = s.get("efficiency", {})
    for c in efficiency.STREAMS:
        put(f"ab_steps_vs_single_process_s{c}", ef.get(f"steps_ratio_s{c}"), "efficiency")
        put(f"ab_cpu_per_step_vs_single_process_s{c}", ef.get(f"cpu_ratio_s{c}"), "efficiency")
    put("topology_single_vs_split_s16", ef.get("single_vs_split_s16"), "efficiency")
    fastest = ef.get("default_is_fastest")
    put("default_topology_is_fastest", None if fastest is None else float(fastest), "efficiency")
    put("p1_generate64_vs_inprocess_mix", ef.get("p1_mix_ratio"), "efficiency")
    put("kserve_mean_batch_c16", pa16 and pa16.get("server_mean_batch"), "kserve_perf_analyzer")
    sq = s.get("sequence_model", {})
    for c in sequence.STREAMS:
        put(f"sequence_stream{c}_vs_inprocess", sq.get(f"stream{c}_vs_inprocess"), "sequence_model")
    put(
        "sequence_lstm_vs_seasonal_naive_mae",
        sq.get("heldout", {}).get("lstm_vs_seasonal_naive_mae"),
        "sequence_model",
    )
    ro = s.get("rollout", {})
    put("rollout_p99_during_vs_steady", ro.get("p99_during_vs_steady"), "rollout")
    put("rollout_steps_during_vs_steady", ro.get("steps_during_vs_steady"), "rollout")
    put("rollout_first_v2_s", ro.get("first_v2_s"), "rollout")
    if "first_v2_missing" in ro:
        reasons["rollout_first_v2_s"] = f"rollout: {ro['first_v2_missing']}"
    return summary, reasons


def _summarise_stores(ctx: Context, summary: dict[str, Any], reasons: dict[str, str]) -> None:
    st = ctx.sections.get("state_stores", {})
    vs, p50 = st.get("vs_memory", {}), st.get("rtt_p50_ms", {})

    def why(store: str) -> str:
        if "skipped" in st:
            return ctx.reason("state_stores")
        if store == "redis" and st.get("redis_skipped"):
            return f"state_stores: no Redis: {st['redis_skipped']}"
        return "not measured"

    figures = (
        ("store_sqlite_vs_memory_stream16", "sqlite", vs.get("sqlite", {}).get("stream16")),
        ("store_redis_vs_memory_stream16", "redis", vs.get("redis", {}).get("stream16")),
        ("store_redis_step_p50_ms", "redis", p50.get("redis", {}).get("stream1")),
    )
    for key, store, value in figures:
        summary[key] = value
        if value is None:
            reasons[key] = why(store)
    scale = st.get("scale_test", {})
    failover = (scale.get("result") or {}).get("failover_s_last")
    summary["failover_s"] = None if failover is None else float(failover)
    if failover is None:
        if "skipped" in st:
            reasons["failover_s"] = ctx.reason("state_stores")
        elif "skipped" in scale:
            reasons["failover_s"] = f"state_stores: scale test skipped: {scale['skipped']}"
        else:
            reasons["failover_s"] = (
                "the scale test reported no failover (no session hit by the kill)"
            )


def check_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, op, target in TARGETS:
        v = summary.get(key)
        met = None if v is None else (v >= target if op == ">=" else v <= target)
        out.append({"key": key, "target": f"{op} {target:g}", "value": v, "met": met})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = common.load_average()
    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="lstm-bench-") as tmp:
        ctx = Context(args, common.resolve_model(args.model, Path(tmp)))
        for number, (key, fn) in enumerate(SECTIONS, start=1):
            ctx.run(number, key, fn)
        summary, reasons = summarise(ctx)
        result: dict[str, Any] = {
            "summary": summary,
            "summary_reasons": reasons,
            "targets": check_targets(summary),
            "meta": {
                "command": "python -m benchmarks.run "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "mode": "quick" if args.quick else "full",
                "date": started.isoformat(timespec="seconds"),
                "wall_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
                "machine": common.machine(),
                "versions": common.versions(),
                "load_average_before": load_before,
                "load_average_after": common.load_average(),
                "threads": ctx.threads,
                "provider": args.provider,
                "client_procs": args.client_procs,
                "profiled": args.profile,
                "server_source": str(args.server_src or common.ROOT),
                "server_commit": common.git_commit(args.server_src or common.ROOT),
                "model": ctx.model.as_dict(),
                "gpu": "none in this run" if args.provider == "cpu" else args.provider,
            },
            "sections": ctx.sections,
        }
        out: Path = args.out
        common.write_json(out / "results.json", result)
        if not args.no_plots:
            from . import plots  # matplotlib: only when plots are drawn

            result["meta"]["plots"] = plots.write_all(result, out)
            common.write_json(out / "results.json", result)
    print()
    print(report.render_text(result))
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
