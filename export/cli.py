"""``lstm-export``: checkpoints to contract-following ONNX models.

Two forms::

    lstm-export CHECKPOINT --out MODEL.onnx [--int8] [--corpus PATH] [--report R.json] [--json]
    lstm-export batch --checkpoints DIR_OR_GLOB --out REPO_DIR [--int8] [--jobs N] [--json]

Exit codes: 0 success; 1 an export failed (for batch: any model failed); 2 bad usage or a
problem with the run as a whole (nothing found, repository locked, unreadable manifest);
130 interrupted. Errors are one line on stderr, never a traceback (``LSTM_SERVE_DEBUG=1``
shows one for bug reports).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from contract.args import missing_module, positive_int
from contract.repository import MANIFEST

# Nothing here imports torch or onnx at module level: on a server-only install `lstm-export`
# (even `--help`) must get as far as main() to say which extra is missing.
from .common import ExportError, one_line

if TYPE_CHECKING:
    from .exporter import ExportOptions

PROG = "lstm-export"
# The modules of the export extra that main() looks for before anything else.
EXTRA_MODULES = ("torch", "onnx", "onnxscript")
INSTALL_HINT = "pip install 'lstm-serve[export]'"


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    from .parity import DEFAULT_TOLERANCE
    from .quantize import DEFAULT_PPL_TOLERANCE  # imports onnx: only after main()'s check

    p.add_argument(
        "--int8",
        action="store_true",
        help="also write a dynamically quantised int8 CPU variant (model.int8.onnx)",
    )
    p.add_argument(
        "--corpus",
        type=Path,
        help="text for held-out perplexity figures (its validation tail; needed to check int8)",
    )
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        help="validation tail of the corpus (default: the checkpoint's setting, else 0.1)",
    )
    p.add_argument(
        "--tolerance",
        type=_positive_float,
        default=DEFAULT_TOLERANCE,
        help=f"parity: max abs diff ORT vs PyTorch (default {DEFAULT_TOLERANCE:g})",
    )
    p.add_argument(
        "--int8-tolerance",
        type=_positive_float,
        default=DEFAULT_PPL_TOLERANCE,
        help=f"int8: max relative perplexity change (default {DEFAULT_PPL_TOLERANCE:g})",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch/ORT threads for parity and figures (default 1)",
    )
    p.add_argument(
        "--int8-per-channel",
        action="store_true",
        help="int8: one weight scale per output channel instead of per tensor",
    )
    p.add_argument("--no-speed", action="store_true", help="skip the int8 speed-up measurement")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")


def single_parser() -> argparse.ArgumentParser:
    """The parser of the single form, ``lstm-export CHECKPOINT --out MODEL.onnx ...``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export a training checkpoint to an ONNX model (see also: "
        f"'{PROG} batch --help'). Parity with PyTorch is checked before anything is written.",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by lstm-train")
    p.add_argument("--out", type=Path, required=True, help="the model file to write (.onnx)")
    p.add_argument("--report", type=Path, help="also write the JSON report to this file")
    _add_common(p)
    return p


def batch_parser() -> argparse.ArgumentParser:
    """The parser of ``lstm-export batch ...`` (after the word ``batch``)."""
    p = argparse.ArgumentParser(
        prog=f"{PROG} batch",
        description="Export many checkpoints into a model repository "
        "REPO/<name>/<version>/model.onnx with REPO/manifest.json; idempotent.",
    )
    p.add_argument(
        "--checkpoints",
        required=True,
        help="a directory (searched recursively for *.pt), a glob (quote it), or one file",
    )
    p.add_argument("--out", type=Path, required=True, help="the model repository directory")
    p.add_argument(
        "--jobs", type=positive_int, default=1, help="parallel export processes (default 1)"
    )
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None)
    bar.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="progress bar on/off (default: only on a terminal)",
    )
    _add_common(p)
    return p


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    """The export options of parsed arguments (the inverse of ``ExportOptions.worker_args``)."""
    from .exporter import ExportOptions

    return ExportOptions(
        int8=args.int8,
        corpus=args.corpus,
        val_fraction=args.val_fraction,
        tolerance=args.tolerance,
        int8_tolerance=args.int8_tolerance,
        threads=args.threads,
        measure_speed=not args.no_speed,
        per_channel=args.int8_per_channel,
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _print_single(report: dict[str, Any]) -> None:
    fp = report["fp32"]
    print(f"wrote {fp['path']} ({_mib(fp['size_bytes'])}, sha256 {fp['sha256'][:16]}…)")
    par = report["parity"]
    worst = max(v for v in par["max_abs_diff"].values() if v is not None)
    chain = ", ".join(f"{t}x{b}" for t, b in par["chaining"]["cases"])
    print(
        f"parity ok: max|diff| {worst:.2e} <= {par['tolerance']:g} over T {par['T']} x "
        f"B {par['B']}; chaining {chain} (steps and chunks) ok; seed {par['seed']}"
    )
    q = report.get("int8")
    if q:
        print(
            f"int8: wrote {q['path']} ({_mib(q['size_bytes'])}, {q['size_ratio']:.2f}x size), "
            f"ops {', '.join(q['ops'])}"
        )
        if q.get("speed"):
            rows = "; ".join(
                f"T={r['T']} B={r['B']} {r['speedup']:.2f}x" for r in q["speed"]["rows"]
            )
            print(f"int8 speed-up (ORT, {q['speed']['threads']} thread): {rows}")
    held = report.get("heldout")
    if held:
        t = held["fp32"]["test"]
        line = (
            f"held-out one step ahead ({t['points']} points): "
            f"fp32 MAE {t['mae']:.4g} RMSE {t['rmse']:.4g}"
        )
        cmp_ = held.get("int8_vs_fp32")
        if cmp_:
            line += (
                f", int8 MAE {cmp_['int8']:.4g} ({cmp_['relative_change']:+.2%}, "
                f"tolerance ±{cmp_['tolerance']:.0%})"
            )
        print(line)
    ppl = report.get("perplexity")
    if ppl:
        line = (
            f"held-out perplexity ({ppl['split']}, {ppl['val_chars']} chars): "
            f"fp32 {ppl['fp32']['perplexity']:.4f}"
        )
        cmp_ = ppl.get("int8_vs_fp32")
        if cmp_:
            line += (
                f", int8 {cmp_['int8']:.4f} ({cmp_['relative_change']:+.2%}, "
                f"tolerance ±{cmp_['tolerance']:.0%})"
            )
        print(line)
    elif q and not held:
        print("int8 perplexity not checked: pass --corpus PATH for held-out figures")


def _run_single(argv: Sequence[str]) -> int:
    args = single_parser().parse_args(argv)
    from .exporter import export_checkpoint

    report = export_checkpoint(
        args.checkpoint, args.out, options_from_args(args), report_out=args.report
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_single(report)
    return 0


def _run_batch(argv: Sequence[str]) -> int:
    args = batch_parser().parse_args(argv)
    from tqdm import tqdm

    from .repository import Result, run_batch

    def on_result(r: Result) -> None:
        if r.status != "ok":
            # Failures always reach stderr, also with --json (CI logs show them).
            again = ", unchanged since the last run" if r.action == "unchanged" else ""
            tqdm.write(
                f"{PROG}: FAILED {r.name} ({r.checkpoint}{again}): {r.error}", file=sys.stderr
            )
        elif not args.json:
            detail = f" ({r.detail})" if r.detail else ""
            tqdm.write(f"{r.action:9s} {r.name} v{r.version}{detail}", file=sys.stdout)

    try:
        summary = run_batch(
            args.checkpoints,
            args.out,
            options_from_args(args),
            jobs=args.jobs,
            progress=args.progress,
            on_result=on_result,
        )
    except ExportError as e:
        _fail(str(e), 2)
    counts = summary.counts()
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        total = len(summary.results)
        if counts["exported"] == 0 and counts["failed"] == 0:
            print(f"nothing to do: all {total} checkpoint(s) unchanged ({summary.repo})")
        else:
            print(
                f"{total} checkpoint(s): {counts['exported']} exported, "
                f"{counts['unchanged']} unchanged, {counts['failed']} failed; "
                f"manifest {summary.repo / MANIFEST}"
            )
    return 0 if summary.ok else 1


def _fail(message: str, code: int) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


def _on_sigterm(signum: int, frame: Any) -> None:
    # Treated like Ctrl-C so the same clean-up runs (temp files removed, no partial output).
    raise KeyboardInterrupt


def _is_checkpoint_error(exc: BaseException) -> bool:
    # training.checkpoint imports torch; if it was never imported it raised nothing.
    mod = sys.modules.get("training.checkpoint")
    return mod is not None and isinstance(exc, mod.CheckpointError)


_EXTRA_PACKAGES = {"torch", "onnx", "onnxscript", "onnxruntime", "tqdm", "numpy"}


def _extra_missing(module: str) -> NoReturn:
    _fail(f"the export extra is not installed (no module {module!r}): {INSTALL_HINT}", 2)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before parsing, so `--help` on a server-only install says what to install, too.
    if (missing := missing_module(EXTRA_MODULES)) is not None:
        _extra_missing(missing)
    signal.signal(signal.SIGTERM, _on_sigterm)
    from contract.model import ContractError

    try:
        code = _run_batch(argv[1:]) if argv and argv[0] == "batch" else _run_single(argv)
    except KeyboardInterrupt:
        _fail("interrupted; nothing partial was left behind", 130)
    except (ExportError, ContractError) as e:
        _fail(one_line(e), 1)
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root not in _EXTRA_PACKAGES:
            raise
        _extra_missing(root)
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _fail(f"{e.strerror or one_line(e)}{where}", 1)
    except Exception as e:
        if _is_checkpoint_error(e):
            _fail(one_line(e), 1)
        if os.environ.get("LSTM_SERVE_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {one_line(e)}", 1)
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # `lstm-export ... | head` must not end in a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


if __name__ == "__main__":
    main()
