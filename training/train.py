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
* ``metrics.json``: per-epoch train/val perplexity, tokens/s, wall time, samples
  (:class:`training.metrics_log.MetricsLog`);
* ``perplexity.png``: the perplexity curves (:func:`training.plotting.plot_perplexity`).

:func:`train` is the driver: it sets the run up, calls :func:`train_epoch` once per epoch, then
evaluates, samples, saves and logs as the settings say.

Determinism: with the same seed, thread count and device, a CPU run is bit-for-bit repeatable,
and resuming from ``last.pt`` continues exactly as the uninterrupted run would have (the data
order of epoch ``e`` depends only on ``(seed, e)``).
"""

from __future__ import annotations

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

from contract.text import DEFAULT_PREPROCESS, EVAL_BATCH, EVAL_STEPS, eval_rows, preprocess

from .checkpoint import Checkpoint, save
from .config import TrainConfig, TrainError
from .data import CorpusData, DataError, Vocab, load_corpus, min_tokens
from .metrics_log import MetricsLog, jsonable
from .model import CharLSTM, ModelConfig, State
from .plotting import plot_perplexity

__all__ = [
    "EpochStats",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "evaluate",
    "generate",
    "train",
    "train_epoch",
]

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


# --- one epoch ---------------------------------------------------------------------------------


def _detach(state: State) -> State:
    return state[0].detach(), state[1].detach()


@dataclass(frozen=True)
class EpochStats:
    """What one pass over the training text measured."""

    loss: float  # token-weighted mean next-character cross-entropy over the epoch, nats
    tokens: int  # target tokens trained on
    seconds: float  # wall time of the pass (batches, backward passes, optimizer steps)

    @property
    def ppl(self) -> float:
        """Training perplexity, the book's figure (the weights move while it is measured)."""
        return math.exp(self.loss)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def train_epoch(
    model: CharLSTM,
    optimizer: torch.optim.Optimizer,
    data: CorpusData,
    cfg: TrainConfig,
    epoch: int,
    *,
    lr: float,
    device: torch.device,
) -> EpochStats:
    """Train ``model`` on 0-based ``epoch``: one walk over the training text at rate ``lr``.

    Batches come from ``cfg.sampler`` with a seed that depends only on ``(cfg.seed, epoch)``;
    the sequential sampler carries the state across batches (detached), the random one starts
    each batch from zero. Gradients are clipped to norm ``cfg.clip`` (0: not at all). Raises
    :class:`TrainError` when the epoch's loss is not finite (divergence).
    """
    for g in optimizer.param_groups:
        g["lr"] = lr
    t0 = time.perf_counter()
    nll_sum, n_tok = 0.0, 0
    state: State | None = None
    # Per-epoch seed: an epoch's data order never depends on how the run got there.
    batches = data.batches(cfg.sampler, cfg.batch_size, cfg.num_steps, cfg.seed * 1_000_003 + epoch)
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
    return EpochStats(loss=nll_sum / n_tok, tokens=n_tok, seconds=time.perf_counter() - t0)


# --- setting a run up --------------------------------------------------------------------------


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


def _load_data(cfg: TrainConfig, resume: Checkpoint | None) -> tuple[TrainConfig, CorpusData]:
    """The corpus as the run sees it, and ``cfg`` with the checkpoint's preprocessing rule.

    A resumed run keeps the checkpoint's vocabulary. Raises :class:`TrainError` when the corpus
    is not the checkpoint's or the checkpoint has already done ``cfg.epochs``, and
    :class:`DataError` when the training text is shorter than one batch.
    """
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
    return cfg, data


def _build_model(
    cfg: TrainConfig,
    resume: Checkpoint | None,
    vocab_size: int,
    device: torch.device,
    say: Callable[[str], None],
) -> tuple[CharLSTM, ModelConfig, torch.optim.Optimizer]:
    """A fresh model seeded with ``cfg.seed``, or the checkpoint's, in training mode on
    ``device``, with its optimizer. The checkpoint's optimizer state is loaded unless the
    optimizer kind changed (then it starts fresh, and ``say`` tells why); raises
    :class:`TrainError` when that state does not fit the model."""
    torch.manual_seed(cfg.seed)
    if resume is not None:
        model = resume.build_model()
        mcfg = resume.model_config
    else:
        mcfg = cfg.model_config(vocab_size)
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
    return model, mcfg, optimizer


@dataclass
class _Run:
    """The pieces one run's checkpoints, metrics header and log lines are made from."""

    cfg: TrainConfig
    data: CorpusData
    model: CharLSTM
    mcfg: ModelConfig
    optimizer: torch.optim.Optimizer
    device: torch.device
    out: Path

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def headline(self) -> str:
        mcfg, data = self.mcfg, self.data
        return (
            f"lstm-train: {mcfg.cell} cell, {mcfg.num_layers}x{mcfg.hidden_size} "
            f"{mcfg.input_mode}, {self.num_params:,} parameters, vocab {len(data.vocab)}, "
            f"{len(data.train_ids):,} train / {len(data.val_ids):,} held-out tokens from "
            f"{data.source}, device {self.device}, {torch.get_num_threads()} threads"
        )

    def describe(self) -> dict[str, Any]:
        """What is being trained, on what, where: the head of ``metrics.json``."""
        data = self.data
        return {
            "config": jsonable(asdict(self.cfg)),
            "model_config": asdict(self.mcfg),
            "num_parameters": self.num_params,
            "vocab": list(data.vocab.tokens),
            "corpus": {
                "source": data.source,
                "sha256": data.corpus_sha256,
                "preprocess": data.preprocess,
                "train_tokens": len(data.train_ids),
                "val_tokens": len(data.val_ids),
            },
            "machine": {
                "device": str(self.device),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
            },
        }

    def plot_title(self) -> str:
        mcfg, cfg = self.mcfg, self.cfg
        return (
            f"{mcfg.cell} {mcfg.num_layers}x{mcfg.hidden_size} {mcfg.input_mode}, "
            f"{cfg.optimizer} lr {cfg.lr:g}, {cfg.sampler}"
        )

    def save(self, log: MetricsLog, epoch: int, name: str) -> None:
        """Write the model as of 1-based ``epoch`` to ``out/name`` (atomically)."""
        ckpt = Checkpoint(
            model_config=self.mcfg,
            vocab=list(self.data.vocab.tokens),
            unk_id=self.data.vocab.unk_id,
            preprocess=self.data.preprocess,
            state_dict={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            train_config=jsonable(asdict(self.cfg)),
            optimizer=self.optimizer.state_dict(),
            epoch=epoch,
            best_val_ppl=log.best_val,
            metrics=log.for_checkpoint(),
            corpus_sha256=self.data.corpus_sha256,
        )
        save(ckpt, self.out / name)


def _show_progress(cfg: TrainConfig) -> bool:
    if cfg.progress is not None:
        return cfg.progress
    return sys.stderr.isatty() and not os.environ.get("CI")


class _Progress:
    """Per-epoch reporting: a tqdm bar on a terminal, else one log line per epoch (CI, files)."""

    def __init__(self, cfg: TrainConfig, start_epoch: int, say: Callable[[str], None]) -> None:
        from tqdm import tqdm

        self._say = say
        self._epochs = cfg.epochs
        self._bar = tqdm(
            total=cfg.epochs,
            initial=start_epoch,
            unit="epoch",
            disable=not _show_progress(cfg),
            dynamic_ncols=True,
        )

    def epoch(
        self,
        done: int,
        stats: EpochStats,
        val_ppl: float,
        wall: float,
        improved: bool,
        sample: str | None,
    ) -> None:
        """Report 1-based epoch ``done``; ``sample`` is the text generated after it, if any."""
        if self._bar.disable:
            self._say(
                f"epoch {done}/{self._epochs} train ppl {stats.ppl:.3f} "
                f"val ppl {f'{val_ppl:.3f}' if math.isfinite(val_ppl) else '-'} "
                f"{stats.tokens_per_s:,.0f} tok/s {wall:.0f}s" + (" *" if improved else "")
            )
            if sample is not None:
                self._say(f"  sample: {sample!r}")
        else:
            self._bar.set_postfix_str(
                f"train {stats.ppl:.2f} val {val_ppl:.2f}".replace("nan", "-")
            )
            self._bar.update(1)
            if sample is not None:
                self._bar.write(f"epoch {done}: {sample!r}")

    def close(self) -> None:
        self._bar.close()


# --- the driver --------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` reports; ``metrics`` is the final ``metrics.json``. Perplexities are
    ``nan`` and rates 0 when no epoch was recorded."""

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
    cfg, data = _load_data(cfg, resume)
    model, mcfg, optimizer = _build_model(cfg, resume, len(data.vocab), device, say)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, data, model, mcfg, optimizer, device, out)
    if resume is None:
        start_epoch, metrics = 0, MetricsLog(run.describe())
    else:
        start_epoch = resume.epoch
        metrics = MetricsLog.resumed(
            run.describe(), resume.metrics, epoch=resume.epoch, best_val=resume.best_val_ppl
        )
    # Wall time counts across resumes: this run's clock starts where the checkpoint's stopped.
    wall_base = float(metrics.last("wall_s", 0.0))
    has_val = len(data.val_ids) >= 2
    say(run.headline())

    progress = _Progress(cfg, start_epoch, say)
    t_run = time.perf_counter()
    stopped = "completed"
    sample = ""
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            lr = _lr_at(cfg, epoch, time.perf_counter() - t_run)
            stats = train_epoch(model, optimizer, data, cfg, epoch, lr=lr, device=device)
            done = epoch + 1
            eval_now = done % cfg.eval_every == 0 or done == cfg.epochs or done == 1
            if cfg.max_minutes is not None:
                over = wall_base + time.perf_counter() - t_run >= cfg.max_minutes * 60
                eval_now = eval_now or over
            val_ppl = evaluate(model, data.val_ids) if has_val and eval_now else math.nan
            wall = wall_base + time.perf_counter() - t_run
            metrics.append(
                epoch=done,
                train_ppl=stats.ppl,
                val_ppl=val_ppl,
                tokens_per_s=stats.tokens_per_s,
                epoch_s=stats.seconds,
                wall_s=wall,
                lr=lr,
            )
            # Without held-out text the best checkpoint is chosen by training perplexity.
            score = val_ppl if has_val else stats.ppl
            improved = (eval_now or not has_val) and score < metrics.best_val
            if improved:
                metrics.best_val, metrics.best_epoch = score, done
            new_sample = None
            if done % cfg.sample_every == 0 or done == cfg.epochs:
                sample = new_sample = generate(
                    model, data.vocab, cfg.sample_prefix, cfg.sample_chars, rule=data.preprocess
                )
                metrics.add_sample(done, sample)
            if improved:
                run.save(metrics, done, "checkpoint.pt")
            if done % cfg.save_every == 0 or done == cfg.epochs:
                run.save(metrics, done, "last.pt")
            metrics.write(out / "metrics.json", "running")
            progress.epoch(done, stats, val_ppl, wall, improved, new_sample)
            if cfg.max_minutes is not None and wall - wall_base >= cfg.max_minutes * 60:
                if done < cfg.epochs:
                    stopped = f"time budget of {cfg.max_minutes:g} min reached after epoch {done}"
                    run.save(metrics, done, "last.pt")
                break
    except KeyboardInterrupt:
        stopped = f"interrupted during epoch {epoch + 1}"
        say(f"lstm-train: {stopped}; metrics and plot written, last.pt holds the last full epoch")
    finally:
        progress.close()

    done_epochs = metrics.last("epoch", start_epoch)
    if not (out / "checkpoint.pt").exists() and len(metrics):
        # A resumed run into a fresh folder that never beat the old best still leaves a model.
        run.save(metrics, done_epochs, "checkpoint.pt")
    final = metrics.write(out / "metrics.json", stopped)
    if len(metrics):
        plot_perplexity(metrics.columns, out / "perplexity.png", run.plot_title())
    return TrainResult(
        out_dir=out,
        epochs_done=done_epochs,
        best_epoch=metrics.best_epoch,
        best_val_ppl=metrics.best_val,
        final_train_ppl=metrics.last("train_ppl", math.nan),
        final_val_ppl=metrics.last("val_ppl", None) or math.nan,
        wall_s=metrics.last("wall_s", 0.0),
        tokens_per_s=metrics.median_tokens_per_s(),
        sample=sample,
        stopped=stopped,
        metrics=final,
    )
