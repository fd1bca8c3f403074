"""Section 8: training throughput, our two cells against the book's own code.

Same corpus, same hyperparameters (the book's recipe that training/ reproduces: one layer of
256 hidden units, one-hot input, batch 32, 35 steps, SGD with learning rate 1, gradient
clipping at norm 1), each side with its own data pipeline and loop:

* ``d2l_scratch``: the chapter's ``LSTMScratch`` inside ``d2l.RNNLMScratch``, ``d2l.Trainer``,
  on ``d2l.TimeMachine`` (the book's random windows; the corpus placed where d2l's downloader
  finds it).
* ``d2l_torch``: the chapter's ``LSTM`` (``nn.LSTM``) inside ``d2l.RNNLM``, the same way.
* ``ours_scratch`` / ``ours_torch``: ``training.train.train`` (what ``lstm-train`` runs) with
  either cell and the random sampler (fresh state per batch, as the book's windows), one epoch
  per round; its own tokens/s figure for the epoch.

The book's ``ProgressBoard`` redraws a matplotlib figure into the notebook as it trains; that is
notebook UI, not training, so it is switched off (``board.display = False``; the points are
still recorded as in the book). The book's validation pass is switched off (``num_val=0``), so
its figure is training tokens per second, ``windows x num_steps x epochs / fit time``, like
ours (whose held-out evaluation runs after the timed epoch).
Variants run interleaved, round by round, to spread the noise of a shared machine over all of
them alike; each variant's fastest round is its figure (the median round is recorded too).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import SectionSkipped
from .d2l_book import D2LUnavailable, book_classes, load_d2l, place_corpus

HIDDEN = 256
BATCH = 32
NUM_STEPS = 35
LR = 1.0
CLIP = 1.0


def _run_ours(cell: str, corpus: Path, threads: int, max_tokens: int | None, tmp: Path) -> float:
    """One epoch of our own training loop (``training.train.train``); its tokens/s.

    The loop's own figure: training tokens of the epoch over the epoch's training time (held-out
    evaluation, samples and checkpoints come after the epoch and are not in it).
    """
    from training.config import TrainConfig
    from training.train import train

    cfg = TrainConfig(
        corpus=str(corpus),
        out_dir=str(tmp / f"ours-{cell}"),
        cell=cell,
        hidden_size=HIDDEN,
        num_layers=1,
        input_mode="onehot",
        epochs=1,
        batch_size=BATCH,
        num_steps=NUM_STEPS,
        lr=LR,
        optimizer="sgd",
        clip=CLIP,
        sampler="random",  # fresh state per batch, like d2l's random windows
        max_tokens=max_tokens,
        threads=threads,
        progress=False,
    )
    result = train(cfg, log=lambda _msg: None)
    return float(result.metrics["epochs"][0]["tokens_per_s"])


def _run_d2l(d2l: Any, cls: type, lm: Any, data: Any, epochs: int) -> float:
    rnn = cls(num_inputs=len(data.vocab), num_hiddens=HIDDEN)
    model = lm(rnn, vocab_size=len(data.vocab), lr=LR)
    model.board.display = False
    trainer = d2l.Trainer(max_epochs=epochs, gradient_clip_val=CLIP, num_gpus=0)
    t0 = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - t0


def run(
    corpus: Path | None, threads: int, windows: int, epochs: int, rounds: int
) -> dict[str, Any]:
    """Tokens/s of each variant (median over ``rounds``), and our-vs-book ratios."""
    if corpus is None:
        raise SectionSkipped("no corpus: set LSTM_SERVE_CORPUS or pass --corpus")
    try:
        import torch
    except ImportError:
        raise SectionSkipped("torch not installed (train extra)") from None
    try:
        d2l = load_d2l()
    except D2LUnavailable as e:
        raise SectionSkipped(str(e)) from None
    torch.set_num_threads(threads)
    LSTMScratch, LSTM = book_classes(d2l)
    with tempfile.TemporaryDirectory(prefix="bench-d2l-") as tmp:
        try:
            root = place_corpus(corpus, Path(tmp))
        except D2LUnavailable as e:
            raise SectionSkipped(str(e)) from None
        data = _time_machine(d2l, root, windows)
        tokens = windows * NUM_STEPS * epochs
        # Ours reads the corpus with its own data module; in quick mode only the first tokens,
        # so that an epoch is a few batches like the book's there.
        max_tokens = None if windows >= 10_000 else windows * NUM_STEPS + NUM_STEPS + 1
        work = Path(tmp)
        variants = {
            "d2l_scratch": lambda: (
                tokens / _run_d2l(d2l, LSTMScratch, d2l.RNNLMScratch, data, epochs)
            ),
            "ours_scratch": lambda: _run_ours("scratch", corpus, threads, max_tokens, work),
            "d2l_torch": lambda: tokens / _run_d2l(d2l, LSTM, d2l.RNNLM, data, epochs),
            "ours_torch": lambda: _run_ours("torch", corpus, threads, max_tokens, work),
        }
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                rates[name].append(fn())
    rows = []
    tps: dict[str, float] = {}
    for name, r in rates.items():
        # Other work on a shared machine only ever slows a round down, so the fastest round is
        # the least disturbed estimate of each variant's speed; the median is kept beside it.
        tps[name] = max(r)
        rows.append(
            {
                "variant": name,
                "tokens_per_s": tps[name],
                "tokens_per_s_median_round": statistics.median(r),
                "tokens_per_s_per_round": r,
            }
        )
    return {
        "hyperparameters": {
            "hidden": HIDDEN,
            "layers": 1,
            "batch": BATCH,
            "num_steps": NUM_STEPS,
            "lr": LR,
            "clip": CLIP,
            "input": "one-hot",
            "d2l_windows_per_epoch": windows,
            "ours": "training.train.train, sampler random, one epoch per round",
            "epochs_per_round": epochs,
            "rounds": rounds,
            "torch_threads": torch.get_num_threads(),
            "vocab_size": len(data.vocab),
        },
        "rows": rows,
        "scratch_vs_d2l": tps["ours_scratch"] / tps["d2l_scratch"],
        "torch_vs_d2l": tps["ours_torch"] / tps["d2l_torch"],
    }


def _time_machine(d2l: Any, root: Path, windows: int) -> Any:
    # d2l.TimeMachine takes no root (it reads DataModule's default '../data', relative to the
    # working directory), so the subclass repeats the book's _download with our folder: the
    # same d2l.download call, which returns the cached file when its SHA-1 matches.
    from .d2l_book import CORPUS_SHA1

    class RootedTimeMachine(d2l.TimeMachine):  # type: ignore[misc,name-defined]
        def _download(self) -> str:
            fname = d2l.download(d2l.DATA_URL + "timemachine.txt", str(root), CORPUS_SHA1)
            with open(fname) as f:
                return f.read()

    return RootedTimeMachine(batch_size=BATCH, num_steps=NUM_STEPS, num_train=windows, num_val=0)
