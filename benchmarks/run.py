"""The benchmark's one entry point: ``python -m benchmarks.run [--quick] [--out DIR]``.

Sections (each one records its figures or ``skipped`` with the reason; nothing is invented):

1. in-process ONNX Runtime decode steps (T=1), the physical limit, with the server's threads;
2. PyTorch eager ``nn.LSTM`` at the same shapes and thread count;
3. the server's ``Generate`` at several concurrencies (separate load-generator process);
4. client-driven steps over ``StepStream`` at several stream counts;
5. the same server with batching off (``--max-batch-size 1``);
6. the int8 model through the server against fp32;
7. resident memory growth for many idle sessions against their raw state bytes;
8. training throughput of our two cells against the book's own code (d2l).

Writes ``DIR/results.json`` (top-level ``summary`` of ratios, ``summary_reasons`` for any that
are null), PNG plots beside it, and a table on stdout. ``--quick`` runs every section tiny (the
test suite uses it to check that everything works, not how fast).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import common
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
)
# (key, comparison, target) from the issue; checked in full mode only.
TARGETS = (
    ("p1_generate64_vs_inprocess", ">=", 0.80),
    ("p2_step_overhead_ms_p50", "<=", 0.4),
    ("p2_step_rtt_ms_p99", "<=", 2.0),
    ("step_stream16_steps_per_s", ">=", 6000.0),
    ("p4_ort_vs_torch_b1", ">=", 5.0),
    ("p5_train_scratch_vs_d2l", ">=", 1.0),
    ("p5_train_torch_vs_d2l", ">=", 1.0),
    ("p6_session_memory_ratio", "<=", 1.5),
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
        "--sections", default="1,2,3,4,5,6,7,8", help="comma-separated section numbers to run"
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
        "--profile",
        action="store_true",
        help="py-spy the server at the summary's load points (Generate 64, streams 1 and 16); "
        "raw stacks under DIR/profiles, shares in the JSON. Profiled figures are not a record.",
    )
    args = p.parse_args(argv)
    if args.out is None:
        args.out = common.ROOT / (".bench/quick" if args.quick else "benchmarks/results")
    args.sections = {int(x) for x in args.sections.split(",") if x.strip()}
    if args.provider == "cuda":
        args.iobinding = True
    return args


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prof = Profile(args.quick, args.provider)
        if args.window:
            self.prof.duration = args.window
        self.sections: dict[str, Any] = {}
        self.threads = args.threads or common.server_intra_op_threads()

    def section(self, key: str, number: int, fn: Callable[[], Any]) -> Any:
        """Run one section; a SectionSkipped becomes ``{"skipped": reason}``."""
        if number not in self.args.sections:
            self.sections[key] = {"skipped": f"section {number} not selected (--sections)"}
            return None
        print(f"[bench] section {number}: {key} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = fn()
        except SectionSkipped as e:
            self.sections[key] = {"skipped": str(e)}
            print(f"[bench]   skipped: {e}", file=sys.stderr, flush=True)
            return None
        except Exception as e:
            # One broken section must not lose the others' figures; it is reported as failed,
            # with the error, and its summary keys are null with this as the reason.
            first = (str(e).strip().splitlines() or [""])[0]
            msg = f"failed: {type(e).__name__}: {first}"
            self.sections[key] = {"skipped": msg, "failed": True}
            print(f"[bench]   {msg}", file=sys.stderr, flush=True)
            return None
        result["elapsed_s"] = round(time.perf_counter() - t0, 2)
        # The 1-minute load average as the section ends: on a shared machine, the hint of
        # whether someone else's work ran alongside it.
        result["load_average_after"] = common.load_average()
        self.sections[key] = result
        return result

    def reason(self, *keys: str) -> str:
        for k in keys:
            sec = self.sections.get(k, {})
            if "skipped" in sec:
                return f"{k}: {sec['skipped']}"
        return "not measured"


def _server_sections(r: Runner, model: common.ModelUnderTest) -> None:
    from . import server_bench as sb

    prof, args = r.prof, r.args
    why = sb.server_available()
    server_keys = [
        ("generate", 3),
        ("stream", 4),
        ("no_batching", 5),
        ("int8", 6),
        ("memory", 7),
    ]
    if why is not None:
        for key, n in server_keys:
            r.section(key, n, lambda why=why: (_ for _ in ()).throw(SectionSkipped(why)))
        return
    common_flags = [
        "--intra-op-threads",
        str(r.threads),
        "--provider",
        args.provider,
        "--max-new-tokens",
        str(max(4096, prof.max_tokens)),
        *args.server_arg,
    ]

    def spec(mode: str, c: int) -> sb.LoadSpec:
        return sb.LoadSpec(
            mode, c, prof.duration, prof.warmup, prof.max_tokens, args.client_procs, prof.lead
        )

    def prof_file(tag: str, mode: str, c: int) -> Path | None:
        if not args.profile or (mode, c) not in (("generate", 64), ("stream", 1), ("stream", 16)):
            return None
        return args.out / "profiles" / f"{tag}-{mode}{c}.txt"

    def sweep(
        model_path: str, flags: list[str], gens: list[int], streams: list[int], tag: str
    ) -> Any:
        out: dict[str, Any] = {"server_flags": flags}
        V = model.vocab_size

        def point(srv: sb.ServerProcess, mode: str, c: int) -> dict[str, Any]:
            # The summary's points get their in-process baseline measured right before them
            # (the server idle meanwhile), so p1 and p2 compare like with like in time.
            adjacent = None
            if tag == "fp32" and (mode, c) in (("generate", 64), ("stream", 1)):
                from . import inprocess

                adjacent = inprocess.ort_decode(model, [c], r.threads, prof.inproc_seconds)
            row = sb.drive(srv, spec(mode, c), V, prof_file(tag, mode, c))
            if adjacent is not None:
                row["inprocess_adjacent"] = adjacent["rows"][0]
            return row

        with sb.running_server(model_path, extra=flags, source=args.server_src) as srv:
            out["generate"] = [point(srv, "generate", c) for c in gens]
            out["stream"] = [point(srv, "stream", c) for c in streams]
        return out

    main: dict[str, Any] = {}

    def batched() -> dict[str, Any]:
        main.update(sweep(model.path, common_flags, prof.gen_conc, prof.streams, "fp32"))
        return {"server_flags": common_flags, "rows": main["generate"]}

    r.section("generate", 3, batched)

    def stream() -> dict[str, Any]:
        if "stream" not in main:
            raise SectionSkipped(r.reason("generate"))
        # The same load against a server that answers at once: gRPC Python's own floor here.
        with sb.running_null_server(model.vocab_size) as null:
            floor = [
                sb.drive(null, spec("stream", c), model.vocab_size, prof_file("null", "stream", c))
                for c in prof.streams
            ]
        return {"rows": main["stream"], "grpc_floor_rows": floor}

    r.section("stream", 4, stream)
    r.section(
        "no_batching",
        5,
        lambda: sweep(
            model.path,
            [*common_flags, "--max-batch-size", "1"],
            prof.nobatch_gen,
            prof.nobatch_streams,
            "nobatch",
        ),
    )

    def int8() -> dict[str, Any]:
        if model.int8_path is None:
            raise SectionSkipped("no int8 model beside the fp32 one and export.quantize unusable")
        if args.provider == "cuda":
            raise SectionSkipped("the int8 model's contrib ops are CPU-only")
        out = sweep(model.int8_path, common_flags, prof.int8_gen, prof.int8_streams, "int8")
        out["model"] = model.int8_path
        return out

    r.section("int8", 6, int8)

    def mem() -> dict[str, Any]:
        flags = [*common_flags, "--max-sessions", str(prof.sessions + prof.warm_sessions)]
        with sb.running_server(model.path, extra=flags, source=args.server_src) as srv:
            return sb.memory(srv, model, prof.sessions, prof.warm_sessions)

    r.section("memory", 7, mem)


def _row_at(rows: list[dict[str, Any]] | None, key: str, value: int) -> dict[str, Any] | None:
    for row in rows or []:
        if row.get(key) == value:
            return row
    return None


def summarise(r: Runner) -> tuple[dict[str, Any], dict[str, str]]:
    s = r.sections
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
            reasons[key] = r.reason(*why_sections)

    # p1 and p2 use the in-process baseline measured right before the server point when there
    # is one (see _server_sections), else section 1's.
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
    return summary, reasons


def check_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, op, target in TARGETS:
        v = summary.get(key)
        met = None if v is None else (v >= target if op == ">=" else v <= target)
        out.append({"key": key, "target": f"{op} {target:g}", "value": v, "met": met})
    return out


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    return str(v)


def print_table(result: dict[str, Any]) -> None:
    s = result["sections"]
    meta = result["meta"]
    m = meta["model"]
    print(
        f"\nlstm-serve benchmark ({meta['mode']}) {meta['date']}  {meta['machine']['cores']} cores "
        f"{meta['machine']['cpu_model']}\nmodel: {m['source']}  L={m['num_layers']} "
        f"H={m['hidden_size']} V={m['vocab_size']}  threads={meta['threads']}"
    )

    def table(title: str, head: list[str], rows: list[list[Any]]) -> None:
        print(f"\n## {title}")
        widths = (
            [
                max(len(h), *(len(_fmt(c)) for c in col))
                for h, col in zip(head, zip(*rows, strict=False), strict=False)
            ]
            if rows
            else [len(h) for h in head]
        )
        print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=False)))
        for row in rows:
            print("  ".join(_fmt(c).rjust(w) for c, w in zip(row, widths, strict=False)))

    for key, title in (
        ("inprocess_ort", "1. in-process ONNX Runtime, T=1"),
        ("torch_eager", "2. PyTorch eager nn.LSTM, T=1"),
    ):
        sec = s.get(key, {})
        if "skipped" in sec:
            print(f"\n## {title}: skipped ({sec['skipped']})")
            continue
        table(title, common.INPROC_HEAD, [common.inproc_cells(r) for r in sec["rows"]])
        if sec.get("rows_onednn_off"):
            table(
                title + ", oneDNN off (native kernels)",
                common.INPROC_HEAD,
                [common.inproc_cells(r) for r in sec["rows_onednn_off"]],
            )

    def gen_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
        return [[*common.generate_cells(r), sum(r["errors"].values())] for r in rows]

    def stream_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
        return [[*common.stream_cells(r), sum(r["errors"].values())] for r in rows]

    gh = [*common.GENERATE_HEAD, "errs"]
    sh = [*common.STREAM_HEAD, "errs"]
    for key, title, sub in (
        ("generate", "3. server Generate", None),
        ("stream", "4. server StepStream steps", None),
        ("no_batching", "5. server, max batch 1", "both"),
        ("int8", "6. server, int8 model", "both"),
    ):
        sec = s.get(key, {})
        if "skipped" in sec:
            print(f"\n## {title}: skipped ({sec['skipped']})")
            continue
        if sub == "both":
            if sec.get("generate"):
                table(title + ": Generate", gh, gen_rows(sec["generate"]))
            if sec.get("stream"):
                table(title + ": StepStream", sh, stream_rows(sec["stream"]))
        elif key == "generate":
            table(title, gh, gen_rows(sec["rows"]))
        else:
            table(title, sh, stream_rows(sec["rows"]))
            if sec.get("grpc_floor_rows"):
                table(
                    "4b. gRPC floor: same load, null server (no model)",
                    sh,
                    stream_rows(sec["grpc_floor_rows"]),
                )
    mem = s.get("memory", {})
    if "skipped" in mem:
        print(f"\n## 7. memory: skipped ({mem['skipped']})")
    else:
        print(
            f"\n## 7. memory: {mem['sessions']} sessions,"
            f" RSS +{mem['growth_bytes'] / 2**20:.1f} MiB"
            f" for {mem['raw_state_bytes'] / 2**20:.1f} MiB of raw state: ratio {mem['ratio']:.2f}"
            f" (after create only: {mem['ratio_after_create']:.2f}),"
            f" {mem['bytes_per_session']:.0f} B/session"
        )
    tr = s.get("training", {})
    if "skipped" in tr:
        print(f"\n## 8. training: skipped ({tr['skipped']})")
    else:
        table(
            "8. training throughput",
            ["variant", "tokens/s"],
            [[r["variant"], r["tokens_per_s"]] for r in tr["rows"]],
        )
    for key in ("generate", "stream", "no_batching", "int8"):
        sec = s.get(key, {})
        for sub in ("rows", "generate", "stream", "grpc_floor_rows"):
            for row in sec.get(sub) or []:
                prof = row.get("profile")
                if not isinstance(prof, dict):
                    continue
                print(
                    f"\n## profile: {key}/{sub} at {row['concurrency']} ({prof['samples']} samples)"
                )
                print("  threads: " + ", ".join(f"{n} {v}%" for n, v in prof["threads"]))
                for name, v in prof["leaf"][:10]:
                    print(f"  {v:5.1f}%  {name}")
    print("\n## summary")
    targets = {t["key"]: t for t in result["targets"]}
    for k, v in result["summary"].items():
        t = targets.get(k)
        verdict = ""
        if t is not None and v is not None:
            verdict = f"  target {t['target']}: {'met' if t['met'] else 'MISSED'}"
        why = result["summary_reasons"].get(k, "")
        print(f"{k:32s} {_fmt(v, 3):>12s}{verdict}{'  (' + why + ')' if why else ''}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    r = Runner(args)
    load_before = common.load_average()
    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="lstm-bench-") as tmp:
        model = common.resolve_model(args.model, Path(tmp))
        from . import inprocess

        prof = r.prof
        r.section(
            "inprocess_ort",
            1,
            lambda: inprocess.ort_decode(
                model,
                prof.batches,
                r.threads,
                prof.inproc_seconds,
                provider=args.provider,
                iobinding=args.iobinding,
            ),
        )

        def torch_eager() -> dict[str, Any]:
            out = inprocess.torch_decode(
                model, [b for b in prof.batches if b <= 256], r.threads, prof.inproc_seconds
            )
            out["paired_b1"] = inprocess.paired_b1(
                model, r.threads, prof.paired_seconds, prof.paired_rounds
            )
            return out

        r.section("torch_eager", 2, torch_eager)
        _server_sections(r, model)

        def training() -> dict[str, Any]:
            from . import training_bench

            return training_bench.run(
                args.corpus or _default_corpus(),
                r.threads,
                prof.train_windows,
                prof.train_epochs,
                prof.train_rounds,
            )

        r.section("training", 8, training)
        summary, reasons = summarise(r)
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
                "threads": r.threads,
                "provider": args.provider,
                "client_procs": args.client_procs,
                "profiled": args.profile,
                "server_source": str(args.server_src or common.ROOT),
                "server_commit": common.git_commit(args.server_src or common.ROOT),
                "model": model.as_dict(),
                "gpu": "none in this run" if args.provider == "cpu" else args.provider,
            },
            "sections": r.sections,
        }
        out: Path = args.out
        common.write_json(out / "results.json", result)
        if not args.no_plots:
            from . import plots

            result["meta"]["plots"] = plots.write_all(result, out)
            common.write_json(out / "results.json", result)
    print_table(result)
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
