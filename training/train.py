"""d2l's RNN training loop (``train_ch8``), with held-out evaluation and checkpoints.

One epoch walks the training text once with the configured sampler. With the *sequential*
sampler the recurrent state is carried from batch to batch and detached (truncated BPTT, as in
the book); with the *random* sampler every batch starts from a zero state. The loss is the mean
next-character cross-entropy; training perplexity is ``exp`` of its token-weighted mean over the
epoch (the book's figure), validation perplexity is the same on the held-out tail, read
sequentially with the state carried across windows (the same procedure as
``export.evaluate.perplexity``, so the ONNX figure can be compared with ours).

Outputs in ``out_dir``:

* ``checkpoint.pt``: best held-out perplexity so far (training perplexity when there is no
  held-out text), written atomically by :func:`training.checkpoint.save`;
* ``last.pt``: the latest epoch, for ``--resume``;
* ``metrics.json``: per-epoch train/val perplexity, tokens/s, wall time, samples;
* ``perplexity.png``: the perplexity curves.

Determinism: with the same seed, thread count and device, a CPU run is bit-for-bit repeatable,
and resuming from ``last.pt`` continues exactly as the uninterrupted run would have (the data
order of epoch ``e`` depends only on ``(seed, e)``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from contract.files import atomic_path, write_atomic
from contract.text import DEFAULT_PREPROCESS, EVAL_BATCH, EVAL_STEPS, eval_rows, preprocess

from .checkpoint import Checkpoint, save
from .config import TrainConfig, TrainError
from .data import DataError, Vocab, load_corpus, min_tokens
from .model import CharLSTM, State

__all__ = ["TrainConfig", "TrainError", "TrainResult", "evaluate", "generate", "train"]

# --- evaluation and generation -----------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: CharLSTM,
    ids: torch.Tensor,
    *,
    batch_size: int = EVAL_BATCH,
    num_steps: int = EVAL_STEPS,
) -> float:
    """Perplexity of ``ids`` with state carried: ``batch_size`` contiguous rows, windows of
    ``num_steps``; every token after the first predicted once. ``nan`` for fewer than 2 tokens."""
    if len(ids) < 2:
        return float("nan")
    was_training = model.training
    model.eval()
    device = model.output.weight.device
    rows, per_row = eval_rows(len(ids), batch_size)
    X = ids[: rows * per_row].view(rows, per_row).T.to(device)
    Y = ids[1 : rows * per_row + 1].view(rows, per_row).T.to(device)
    state = model.begin_state(rows)
    nll = 0.0
    for t in range(0, per_row, num_steps):
        logits, state = model(X[t : t + num_steps], state)
        y = Y[t : t + num_steps]
        nll += F.cross_entropy(
            logits.double().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        ).item()
    model.train(was_training)
    return math.exp(nll / (rows * per_row))


@torch.no_grad()
def generate(
    model: CharLSTM,
    vocab: Vocab | list[str],
    prefix: str,
    num_chars: int,
    *,
    rule: str = DEFAULT_PREPROCESS,
    temperature: float = 0.0,
    seed: int | None = None,
) -> str:
    """The book's ``predict_ch8``: warm the state up on ``prefix``, then emit ``num_chars``.

    ``temperature`` 0 is greedy (argmax, the book's choice); above 0 samples from
    ``softmax(logits / temperature)``. The prefix is normalised with ``rule`` first, as the
    training text was; the returned text is the normalised prefix plus the continuation.
    Raises :class:`TrainError` when nothing of the prefix survives normalisation.
    """
    if not isinstance(vocab, Vocab):
        vocab = Vocab(tuple(vocab))
    text = preprocess(prefix, rule)
    if not text:
        raise TrainError(f"prefix {prefix!r} is empty after preprocessing with {rule!r}")
    was_training = model.training
    model.eval()
    device = model.output.weight.device
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.tensor(vocab.encode(text), dtype=torch.int64, device=device)[:, None]
    logits, state = model(ids, None)
    out: list[int] = []
    last = logits[-1, 0]
    for _ in range(num_chars):
        # <unk> stands for "some character we dropped"; emitting it would print nothing.
        last = last.clone()
        last[vocab.unk_id] = -math.inf
        if temperature > 0:
            probs = torch.softmax(last.double().cpu() / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen).item())
        else:
            nxt = int(last.argmax().item())
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]], device=device), state)
        last = logits[-1, 0]
    model.train(was_training)
    return text + vocab.decode(out)


# --- the loop ----------------------------------------------------------------------------------


def _detach(state: State) -> State:
    return state[0].detach(), state[1].detach()


def _make_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_at(cfg: TrainConfig, epoch: int, elapsed_s: float = 0.0) -> float:
    """Learning rate for 0-based ``epoch``: constant, or cosine from lr to lr*min_lr_ratio.

    With a time budget (``max_minutes``) the cosine follows whichever is further along, the
    epochs or the budget, so a run cut short by the clock still ends at a low rate (at the
    price of exact repeatability, which a wall-clock budget cannot have anyway).
    """
    if cfg.schedule == "constant" or cfg.epochs <= 1:
        return cfg.lr
    frac = epoch / (cfg.epochs - 1)
    if cfg.max_minutes is not None:
        frac = min(1.0, max(frac, elapsed_s / (cfg.max_minutes * 60)))
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * frac))


def _resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise TrainError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device("cpu")


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def plot_perplexity(metrics: dict[str, Any], path: Path, title: str = "") -> None:
    """Train and held-out perplexity per epoch, log scale, as a small PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = metrics["epoch"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=90)
    ax.plot(epochs, metrics["train_ppl"], label="train")
    val = [v if v is not None and math.isfinite(v) else math.nan for v in metrics["val_ppl"]]
    if any(math.isfinite(v) for v in val):
        ax.plot(epochs, val, label="held-out")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)


def _show_progress(cfg: TrainConfig) -> bool:
    if cfg.progress is not None:
        return cfg.progress
    return sys.stderr.isatty() and not os.environ.get("CI")


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass
class TrainResult:
    out_dir: Path
    epochs_done: int
    best_epoch: int
    best_val_ppl: float
    final_train_ppl: float
    final_val_ppl: float
    wall_s: float
    tokens_per_s: float
    sample: str
    stopped: str
    metrics: dict[str, Any]


def train(
    cfg: TrainConfig,
    *,
    resume: Checkpoint | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Run (or continue) training as ``cfg`` says; see the module docstring for what is written.

    With ``resume`` the model config, vocabulary, preprocessing rule, weights, optimizer state,
    epoch count and metrics come from the checkpoint, and ``cfg.epochs`` is the *total* number
    of epochs. Raises :class:`TrainError` / :class:`training.data.DataError` with one-line
    messages for bad settings, unusable corpora and divergence.
    """
    cfg.check()
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = _resolve_device(cfg.device)

    if resume is not None:
        if resume.preprocess != cfg.preprocess:
            cfg = replace(cfg, preprocess=resume.preprocess)
        data = load_corpus(
            cfg.corpus,
            rule=cfg.preprocess,
            val_fraction=cfg.val_fraction,
            max_tokens=cfg.max_tokens,
            vocab=Vocab(tuple(resume.vocab), resume.unk_id),
        )
        if resume.corpus_sha256 and resume.corpus_sha256 != data.corpus_sha256:
            raise TrainError(
                f"corpus {data.source} (sha256 {data.corpus_sha256[:12]}…) is not the one the "
                f"checkpoint was trained on (sha256 {resume.corpus_sha256[:12]}…)"
            )
        if resume.epoch >= cfg.epochs:
            raise TrainError(
                f"checkpoint has already done {resume.epoch} epochs; pass --epochs above that"
            )
    else:
        data = load_corpus(
            cfg.corpus,
            rule=cfg.preprocess,
            val_fraction=cfg.val_fraction,
            max_tokens=cfg.max_tokens,
        )
    need = min_tokens(cfg.batch_size, cfg.num_steps)
    if len(data.train_ids) < need:
        raise DataError(
            f"training text has {len(data.train_ids)} tokens, fewer than one batch needs "
            f"(batch_size*num_steps+num_steps+1 = {need}); use a longer corpus or smaller "
            "--batch-size/--num-steps"
        )

    torch.manual_seed(cfg.seed)
    if resume is not None:
        model = resume.build_model()
        mcfg = resume.model_config
    else:
        mcfg = cfg.model_config(len(data.vocab))
        model = CharLSTM(mcfg)
    model.to(device).train()
    optimizer = _make_optimizer(cfg, model.parameters())
    if resume is not None and resume.optimizer:
        if resume.train_config.get("optimizer", cfg.optimizer) != cfg.optimizer:
            say(
                f"lstm-train: optimizer changed from {resume.train_config.get('optimizer')} to "
                f"{cfg.optimizer}; its state starts fresh"
            )
        else:
            try:
                optimizer.load_state_dict(resume.optimizer)
            except (ValueError, KeyError) as e:
                raise TrainError(f"optimizer state in the checkpoint does not fit: {e}") from None

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("epoch", "train_ppl", "val_ppl", "tokens_per_s", "epoch_s", "wall_s", "lr")
    metrics: dict[str, Any] = {k: [] for k in keys}
    metrics["samples"] = []
    start_epoch, best_val, best_epoch, wall_base = 0, math.inf, 0, 0.0
    if resume is not None:
        old = resume.metrics or {}
        for k in (*keys, "samples"):
            if isinstance(old.get(k), list):
                metrics[k] = list(old[k])
        start_epoch = resume.epoch
        best_val = resume.best_val_ppl
        best_epoch = int(old.get("best_epoch", start_epoch))
        wall_base = float(metrics["wall_s"][-1]) if metrics["wall_s"] else 0.0

    num_params = sum(p.numel() for p in model.parameters())
    has_val = len(data.val_ids) >= 2
    say(
        f"lstm-train: {mcfg.cell} cell, {mcfg.num_layers}x{mcfg.hidden_size} {mcfg.input_mode}, "
        f"{num_params:,} parameters, vocab {len(data.vocab)}, {len(data.train_ids):,} train / "
        f"{len(data.val_ids):,} held-out tokens from {data.source}, device {device}, "
        f"{torch.get_num_threads()} threads"
    )

    def checkpoint(epoch: int) -> Checkpoint:
        return Checkpoint(
            model_config=mcfg,
            vocab=list(data.vocab.tokens),
            unk_id=data.vocab.unk_id,
            preprocess=data.preprocess,
            state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
            train_config=_jsonable(asdict(cfg)),
            optimizer=optimizer.state_dict(),
            epoch=epoch,
            best_val_ppl=best_val,
            metrics={**metrics, "best_epoch": best_epoch},
            corpus_sha256=data.corpus_sha256,
        )

    def summary(stopped: str) -> dict[str, Any]:
        return {
            "config": _jsonable(asdict(cfg)),
            "model_config": asdict(mcfg),
            "num_parameters": num_params,
            "vocab": list(data.vocab.tokens),
            "corpus": {
                "source": data.source,
                "sha256": data.corpus_sha256,
                "preprocess": data.preprocess,
                "train_tokens": len(data.train_ids),
                "val_tokens": len(data.val_ids),
            },
            "machine": {
                "device": str(device),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
            },
            "best": {"epoch": best_epoch, "val_ppl": _finite_or_none(best_val)},
            "stopped": stopped,
            "epochs": [{k: metrics[k][i] for k in keys} for i in range(len(metrics["epoch"]))],
            "samples": metrics["samples"],
        }

    from tqdm import tqdm

    bar = tqdm(
        total=cfg.epochs,
        initial=start_epoch,
        unit="epoch",
        disable=not _show_progress(cfg),
        dynamic_ncols=True,
    )
    t_run = time.perf_counter()
    stopped = "completed"
    sample = ""
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            lr = _lr_at(cfg, epoch, time.perf_counter() - t_run)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            nll_sum, n_tok = 0.0, 0
            state: State | None = None
            # Per-epoch seed: an epoch's data order never depends on how the run got there.
            batches = data.batches(
                cfg.sampler, cfg.batch_size, cfg.num_steps, cfg.seed * 1_000_003 + epoch
            )
            for X, Y in batches:
                X, Y = X.to(device), Y.to(device)
                if cfg.sampler == "random" or state is None:
                    state = model.begin_state(X.shape[1])
                else:
                    state = _detach(state)  # carry the values, cut the graph (truncated BPTT)
                logits, state = model(X, state)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                optimizer.step()
                nll_sum += loss.item() * Y.numel()
                n_tok += Y.numel()
            if not math.isfinite(nll_sum):
                raise TrainError(
                    f"training diverged in epoch {epoch + 1} (loss is not finite); "
                    "try a smaller --lr or --clip"
                )
            epoch_s = time.perf_counter() - t0
            train_ppl = math.exp(nll_sum / n_tok)
            done = epoch + 1
            eval_now = done % cfg.eval_every == 0 or done == cfg.epochs or done == 1
            if cfg.max_minutes is not None:
                over = wall_base + time.perf_counter() - t_run >= cfg.max_minutes * 60
                eval_now = eval_now or over
            val_ppl = evaluate(model, data.val_ids) if has_val and eval_now else math.nan
            wall = wall_base + time.perf_counter() - t_run
            metrics["epoch"].append(done)
            metrics["train_ppl"].append(train_ppl)
            metrics["val_ppl"].append(_finite_or_none(val_ppl))
            metrics["tokens_per_s"].append(n_tok / epoch_s)
            metrics["epoch_s"].append(epoch_s)
            metrics["wall_s"].append(wall)
            metrics["lr"].append(lr)
            score = val_ppl if has_val else train_ppl
            improved = (eval_now or not has_val) and score < best_val
            if improved:
                best_val, best_epoch = score, done
            if done % cfg.sample_every == 0 or done == cfg.epochs:
                sample = generate(
                    model, data.vocab, cfg.sample_prefix, cfg.sample_chars, rule=data.preprocess
                )
                metrics["samples"].append({"epoch": done, "text": sample})
            if improved:
                save(checkpoint(done), out / "checkpoint.pt")
            if done % cfg.save_every == 0 or done == cfg.epochs:
                save(checkpoint(done), out / "last.pt")
            _write_json(out / "metrics.json", summary("running"))
            line = (
                f"epoch {done}/{cfg.epochs} train ppl {train_ppl:.3f} "
                f"val ppl {f'{val_ppl:.3f}' if math.isfinite(val_ppl) else '-'} "
                f"{n_tok / epoch_s:,.0f} tok/s {wall:.0f}s" + (" *" if improved else "")
            )
            if bar.disable:
                say(line)
                if metrics["samples"] and metrics["samples"][-1]["epoch"] == done:
                    say(f"  sample: {sample!r}")
            else:
                bar.set_postfix_str(f"train {train_ppl:.2f} val {val_ppl:.2f}".replace("nan", "-"))
                bar.update(1)
                if metrics["samples"] and metrics["samples"][-1]["epoch"] == done:
                    bar.write(f"epoch {done}: {sample!r}")
            if cfg.max_minutes is not None and wall - wall_base >= cfg.max_minutes * 60:
                if done < cfg.epochs:
                    stopped = f"time budget of {cfg.max_minutes:g} min reached after epoch {done}"
                    save(checkpoint(done), out / "last.pt")
                break
    except KeyboardInterrupt:
        stopped = f"interrupted during epoch {epoch + 1}"
        say(f"lstm-train: {stopped}; metrics and plot written, last.pt holds the last full epoch")
    finally:
        bar.close()

    done_epochs = metrics["epoch"][-1] if metrics["epoch"] else start_epoch
    if not (out / "checkpoint.pt").exists() and metrics["epoch"]:
        # A resumed run into a fresh folder that never beat the old best still leaves a model.
        save(checkpoint(done_epochs), out / "checkpoint.pt")
    final = summary(stopped)
    _write_json(out / "metrics.json", final)
    if metrics["epoch"]:
        title = (
            f"{mcfg.cell} {mcfg.num_layers}x{mcfg.hidden_size} {mcfg.input_mode}, "
            f"{cfg.optimizer} lr {cfg.lr:g}, {cfg.sampler}"
        )
        plot_perplexity(metrics, out / "perplexity.png", title)
    n = len(metrics["epoch"])
    return TrainResult(
        out_dir=out,
        epochs_done=done_epochs,
        best_epoch=best_epoch,
        best_val_ppl=best_val,
        final_train_ppl=metrics["train_ppl"][-1] if n else math.nan,
        final_val_ppl=(metrics["val_ppl"][-1] or math.nan) if n else math.nan,
        wall_s=metrics["wall_s"][-1] if n else 0.0,
        tokens_per_s=_median(metrics["tokens_per_s"]) if n else 0.0,
        sample=sample,
        stopped=stopped,
        metrics=final,
    )


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else 0.0


def _jsonable(obj: Any) -> Any:
    """Replace non-finite floats (JSON has none) so the config stays portable."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
