"""``lstm-train``: train a character LSTM, or generate text from a checkpoint.

    lstm-train --corpus PATH --cell scratch --hidden 256 --layers 1 --epochs 500 --out DIR ...
    lstm-train --resume DIR/last.pt --epochs 800 --out DIR
    lstm-train generate DIR/checkpoint.pt --prefix "time traveller" --num-chars 50
    lstm-train forecast --dataset sunspots --out runs/sunspots      (an LSTM forecaster)

Every failure the user can cause (missing, empty or too short corpus, unreadable or foreign
checkpoint, nonsensical settings) ends with one line on stderr and a non-zero exit, never a
traceback. Set ``LSTM_SERVE_DEBUG=1`` to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from dataclasses import asdict, fields, replace
from typing import NoReturn

from contract.args import missing_module, positive_int

PROG = "lstm-train"
EXIT_USAGE = 2
EXIT_FAIL = 1
# The train extra: main() looks for these before anything else (a server-only install has none).
EXTRA_MODULES = ("torch",)
_EXTRA_PACKAGES = {"torch", "tqdm", "matplotlib"}
INSTALL_HINT = "pip install 'lstm-serve[train]'"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (its default prints the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {s!r}")
    return v


# Flag -> TrainConfig field. Defaults are left to TrainConfig (or to the checkpoint when
# resuming), so argparse uses SUPPRESS and only flags the user typed show up.
_TRAIN_FLAGS: dict[str, str] = {
    "corpus": "corpus",
    "out": "out_dir",
    "cell": "cell",
    "hidden": "hidden_size",
    "layers": "num_layers",
    "input": "input_mode",
    "embedding_dim": "embedding_dim",
    "dropout": "dropout",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "num_steps": "num_steps",
    "lr": "lr",
    "optimizer": "optimizer",
    "weight_decay": "weight_decay",
    "schedule": "schedule",
    "min_lr_ratio": "min_lr_ratio",
    "clip": "clip",
    "sampler": "sampler",
    "max_tokens": "max_tokens",
    "val_fraction": "val_fraction",
    "preprocess": "preprocess",
    "seed": "seed",
    "threads": "threads",
    "device": "device",
    "eval_every": "eval_every",
    "sample_every": "sample_every",
    "prefix": "sample_prefix",
    "sample_chars": "sample_chars",
    "save_every": "save_every",
    "max_minutes": "max_minutes",
    "progress": "progress",
}
_MODEL_FIELDS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_layers",
    "cell": "cell",
    "input_mode": "input_mode",
    "embedding_dim": "embedding_dim",
    "dropout": "dropout",
}


def _train_parser() -> argparse.ArgumentParser:
    from contract.text import PREPROCESS_RULES

    from .config import DEVICES, OPTIMIZERS, SAMPLERS, SCHEDULES, TrainConfig
    from .data import CORPUS_ENV

    d = TrainConfig()
    p = _Parser(
        prog=PROG,
        description="Train a character-level LSTM language model (d2l's LSTM chapter). "
        "Defaults are the book's recipe. Other mode: `lstm-train generate CKPT ...`.",
        argument_default=argparse.SUPPRESS,
    )
    a = p.add_argument
    a(
        "--corpus",
        metavar="PATH",
        help=f"UTF-8 text to train on (default: ${CORPUS_ENV}, else the book's Time Machine, "
        "downloaded once into the user cache and SHA-1 checked)",
    )
    a("--out", metavar="DIR", help=f"output folder (default {d.out_dir})")
    a("--cell", choices=("scratch", "torch"), help=f"LSTM implementation (default {d.cell})")
    a("--hidden", type=positive_int, metavar="N", help=f"hidden units (default {d.hidden_size})")
    a("--layers", type=positive_int, metavar="N", help=f"LSTM layers (default {d.num_layers})")
    a("--input", choices=("onehot", "embedding"), help=f"input encoding (default {d.input_mode})")
    a("--embedding-dim", type=positive_int, metavar="N", help=f"(default {d.embedding_dim})")
    a("--dropout", type=_float, metavar="P", help="training-time dropout (default 0)")
    a("--epochs", type=positive_int, metavar="N", help=f"total epochs (default {d.epochs})")
    a("--batch-size", type=positive_int, metavar="N", help=f"(default {d.batch_size})")
    a("--num-steps", type=positive_int, metavar="N", help=f"BPTT window (default {d.num_steps})")
    a("--lr", type=_float, help=f"learning rate (default {d.lr:g})")
    a("--optimizer", choices=OPTIMIZERS, help=f"(default {d.optimizer})")
    a("--weight-decay", type=_float, metavar="X", help=f"(default {d.weight_decay:g})")
    a("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default {d.schedule})")
    a(
        "--min-lr-ratio",
        type=_float,
        metavar="X",
        help=f"cosine ends at lr*X (default {d.min_lr_ratio:g})",
    )
    a("--clip", type=_float, metavar="THETA", help=f"grad-norm clip, 0=off (default {d.clip:g})")
    a("--sampler", choices=SAMPLERS, help=f"minibatch scheme (default {d.sampler})")
    a(
        "--max-tokens",
        type=positive_int,
        metavar="N",
        help="train on the first N tokens only (the book: 10000; default: all)",
    )
    a(
        "--val-fraction",
        type=_float,
        metavar="F",
        help=f"held-out tail of the text (default {d.val_fraction:g})",
    )
    a("--preprocess", choices=sorted(PREPROCESS_RULES), help=f"text rule (default {d.preprocess})")
    a("--seed", type=int, help=f"(default {d.seed})")
    a("--threads", type=positive_int, metavar="N", help="torch CPU threads (default: torch's)")
    a("--device", choices=DEVICES, help=f"(default {d.device}; auto = cuda when available)")
    a("--eval-every", type=positive_int, metavar="N", help="epochs between held-out evals")
    a("--sample-every", type=positive_int, metavar="N", help=f"(default {d.sample_every})")
    a("--prefix", metavar="TEXT", help=f"sample prefix (default {d.sample_prefix!r})")
    a("--sample-chars", type=int, metavar="N", help=f"(default {d.sample_chars})")
    a("--save-every", type=positive_int, metavar="N", help="epochs between last.pt writes")
    a("--max-minutes", type=_float, metavar="M", help="stop after the epoch that crosses M min")
    a(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="tqdm bar (default: only on a terminal and outside CI)",
    )
    a("--resume", metavar="CKPT", help="continue from a checkpoint (e.g. DIR/last.pt)")
    return p


def _generate_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} generate",
        description="Continue a prefix with a trained checkpoint (greedy unless --temperature).",
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--prefix", default="time traveller")
    p.add_argument("--num-chars", type=int, default=50, metavar="N")
    p.add_argument("--temperature", type=_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=positive_int, default=1, metavar="N")
    return p


def _forecast_parser() -> argparse.ArgumentParser:
    from .config import ForecastConfig
    from .series import DATASETS

    d = ForecastConfig()
    p = _Parser(
        prog=f"{PROG} forecast",
        description="Train an LSTM forecaster (kind 'sequence': features in, next values out) "
        "on a time series shipped inside a package, one step ahead, with a held-out tail and "
        "naive baselines measured in the same run. Defaults are the bundled model's recipe.",
        argument_default=argparse.SUPPRESS,
    )
    a = p.add_argument
    a("--dataset", choices=sorted(DATASETS), help=f"(default {d.dataset})")
    a("--out", metavar="DIR", help=f"output folder (default {d.out_dir})")
    a("--cell", choices=("scratch", "torch"), help=f"LSTM implementation (default {d.cell})")
    a("--hidden", type=positive_int, metavar="N", help=f"hidden units (default {d.hidden_size})")
    a("--layers", type=positive_int, metavar="N", help=f"LSTM layers (default {d.num_layers})")
    a("--dropout", type=_float, metavar="P", help=f"training-time dropout (default {d.dropout:g})")
    a("--epochs", type=positive_int, metavar="N", help=f"(default {d.epochs})")
    a(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help=f"windows per step (default {d.batch_size})",
    )
    a("--num-steps", type=positive_int, metavar="N", help=f"window length (default {d.num_steps})")
    a("--lr", type=_float, help=f"Adam learning rate (default {d.lr:g})")
    a("--weight-decay", type=_float, metavar="X", help=f"(default {d.weight_decay:g})")
    a("--clip", type=_float, metavar="THETA", help=f"grad-norm clip, 0=off (default {d.clip:g})")
    a(
        "--test-fraction",
        type=_float,
        metavar="F",
        help=f"held-out tail (default {d.test_fraction:g})",
    )
    a(
        "--val-fraction",
        type=_float,
        metavar="F",
        help=f"validation tail of the rest, picks the best epoch (default {d.val_fraction:g})",
    )
    a("--seed", type=int, help=f"(default {d.seed})")
    a("--threads", type=positive_int, metavar="N", help="torch CPU threads (default: torch's)")
    a("--eval-every", type=positive_int, metavar="N", help="epochs between validations")
    a(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="tqdm bar (default: only on a terminal and outside CI)",
    )
    return p


_FORECAST_FLAGS = {"out": "out_dir", "hidden": "hidden_size", "layers": "num_layers"}


def _forecast(argv: list[str]) -> None:
    from .config import ForecastConfig

    ns = vars(_forecast_parser().parse_args(argv))
    cfg = replace(ForecastConfig(), **{_FORECAST_FLAGS.get(k, k): v for k, v in ns.items()})
    cfg.check()

    from .forecast import train_forecaster

    r = train_forecaster(cfg)
    rows = "; ".join(
        f"{name} MAE {e['mae']:.2f} RMSE {e['rmse']:.2f}"
        for name, e in r.heldout.items()
        if e.get("mae") is not None
    )
    print(
        f"best validation MSE {r.best_val_mse:.4f} at epoch {r.best_epoch} ({r.stopped}, "
        f"{r.wall_s:.0f} s); held-out one step ahead: {rows}; wrote {r.out_dir}/checkpoint.pt"
    )
    if r.stopped.startswith("interrupted"):
        sys.exit(130)


def _train(argv: list[str]) -> None:
    from .config import TrainConfig, TrainError

    ns = vars(_train_parser().parse_args(argv))
    given = {_TRAIN_FLAGS[k]: v for k, v in ns.items() if k in _TRAIN_FLAGS}
    resume = None
    known = {f.name for f in fields(TrainConfig)}
    if "resume" in ns:
        from .checkpoint import load

        resume = load(ns["resume"])
        mc = asdict(resume.model_config)
        flag_of = {f: k.replace("_", "-") for k, f in _TRAIN_FLAGS.items()}
        for field, key in _MODEL_FIELDS.items():
            if field in given and given[field] != mc[key]:
                raise TrainError(
                    f"--{flag_of[field]} {given[field]} conflicts with the checkpoint's "
                    f"{key}={mc[key]} (the model's shape comes from the checkpoint)"
                )
        # The checkpoint's settings, then anything typed now; the model shape always from it.
        base = {k: v for k, v in (resume.train_config or {}).items() if k in known}
        base.update({k: mc[v] for k, v in _MODEL_FIELDS.items()})
        base.update(given)
        cfg = replace(TrainConfig(), **base)
    else:
        cfg = replace(TrainConfig(), **given)
    cfg.check()
    if resume is None:
        # Refuse an unusable corpus before paying for torch's import (seconds on a busy box).
        from .data import read_corpus, resolve_corpus

        read_corpus(resolve_corpus(cfg.corpus))

    from .train import train

    result = train(cfg, resume=resume)
    print(
        f"best held-out ppl {result.best_val_ppl:.3f} at epoch {result.best_epoch}; "
        f"final train ppl {result.final_train_ppl:.3f}, held-out {result.final_val_ppl:.3f}; "
        f"{result.epochs_done} epochs, {result.wall_s:.0f} s, {result.tokens_per_s:,.0f} tok/s "
        f"({result.stopped}); wrote {result.out_dir}/checkpoint.pt"
    )
    print(f"sample: {result.sample}")
    if result.stopped.startswith("interrupted"):
        sys.exit(130)


def _generate(argv: list[str]) -> None:
    from .config import TrainError

    args = _generate_parser().parse_args(argv)
    if args.num_chars < 0:
        raise TrainError(f"--num-chars must be >= 0, got {args.num_chars}")
    if args.temperature < 0:
        raise TrainError(f"--temperature must be >= 0, got {args.temperature}")

    import torch

    from .checkpoint import load
    from .data import Vocab
    from .train import generate

    torch.set_num_threads(args.threads)
    ckpt = load(args.checkpoint)
    model = ckpt.build_model()
    text = generate(
        model,
        Vocab(tuple(ckpt.vocab), ckpt.unk_id),
        args.prefix,
        args.num_chars,
        rule=ckpt.preprocess,
        temperature=args.temperature,
        seed=args.seed,
    )
    print(text)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg or type(e).__name__


def _extra_missing(module: str) -> NoReturn:
    _fail(f"the train extra is not installed (no module {module!r}): {INSTALL_HINT}", EXIT_USAGE)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before parsing, so `--help` on a server-only install says what to install, too.
    if (missing := missing_module(EXTRA_MODULES)) is not None:
        _extra_missing(missing)
    _stop_on_sigterm()
    # Every error a user can cause is a ValueError subclass (DataError, TrainError,
    # CheckpointError, ContractError): caught by base class, so nothing imports torch early.
    try:
        if argv and argv[0] == "generate":
            _generate(argv[1:])
        elif argv and argv[0] == "forecast":
            _forecast(argv[1:])
        else:
            _train(argv[1:] if argv and argv[0] == "train" else argv)
    except ValueError as e:
        _fail(_one_line(e))
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root in _EXTRA_PACKAGES:
            _extra_missing(root)
        if os.environ.get("LSTM_SERVE_DEBUG"):
            raise
        _fail(f"unexpected {type(e).__name__}: {_one_line(e)} (LSTM_SERVE_DEBUG=1 shows more)")
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        _fail(f"{e.strerror or _one_line(e)}{where}")
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    except Exception as e:
        if os.environ.get("LSTM_SERVE_DEBUG"):
            raise
        _fail(f"unexpected {type(e).__name__}: {_one_line(e)} (LSTM_SERVE_DEBUG=1 shows more)")


def _stop_on_sigterm() -> None:
    """`kill` (SIGTERM) stops a run like Ctrl-C: metrics, plot and last.pt stay consistent."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread (e.g. an embedding caller)
        signal.signal(signal.SIGTERM, handler)


def _fail(msg: str, code: int = EXIT_FAIL) -> NoReturn:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    sys.exit(code)
