"""Section 8: training throughput, our two cells against the book's own code.

All four variants see the same batches: d2l's ``TimeMachine`` data module (the book's random
windows over the corpus) built once, on the corpus placed where d2l's downloader finds it. The
hyperparameters are the book's recipe that training/ reproduces: one layer of 256 hidden units,
one-hot input, batch 32, 35 steps, SGD with learning rate 1, gradient clipping at norm 1.

* ``d2l_scratch``: the chapter's ``LSTMScratch`` inside ``d2l.RNNLMScratch``, ``d2l.Trainer``.
* ``d2l_torch``: the chapter's ``LSTM`` (``nn.LSTM``) inside ``d2l.RNNLM``, ``d2l.Trainer``.
* ``ours_scratch`` / ``ours_torch``: ``training.model.CharLSTM`` with either cell, one SGD step
  per batch with the same clipping (our training loop's step when ``training.train`` provides
  one, else the minimal loop below).

The book's ``ProgressBoard`` redraws a matplotlib figure into the notebook as it trains; that is
notebook UI, not training, so it is switched off (``board.display = False``; the points are
still recorded as in the book). Validation is switched off for every variant (``num_val=0``),
so each figure is training tokens per second: ``windows x num_steps x epochs / wall time``.
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


def _our_step(model: Any, optim: Any, X: Any, Y: Any) -> None:
    import torch
    from torch.nn import functional as F

    # d2l batches are batch-major [B, T]; our models are time-major like the ONNX contract.
    logits, _ = model(X.T)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.T.reshape(-1))
    optim.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optim.step()


def _run_ours(cell: str, data: Any, vocab_size: int, epochs: int) -> float:
    import torch

    from training.model import CharLSTM, ModelConfig

    model = CharLSTM(ModelConfig(vocab_size=vocab_size, hidden_size=HIDDEN, cell=cell))
    model.train()
    optim = torch.optim.SGD(model.parameters(), lr=LR)
    loader = data.train_dataloader()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for X, Y in loader:
            _our_step(model, optim, X, Y)
    return time.perf_counter() - t0


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
    V = len(data.vocab)
    tokens = windows * NUM_STEPS * epochs
    variants = {
        "d2l_scratch": lambda: _run_d2l(d2l, LSTMScratch, d2l.RNNLMScratch, data, epochs),
        "ours_scratch": lambda: _run_ours("scratch", data, V, epochs),
        "d2l_torch": lambda: _run_d2l(d2l, LSTM, d2l.RNNLM, data, epochs),
        "ours_torch": lambda: _run_ours("torch", data, V, epochs),
    }
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            seconds[name].append(fn())
    rows = []
    tps: dict[str, float] = {}
    for name, s in seconds.items():
        # Other work on a shared machine only ever slows a round down, so the fastest round is
        # the least disturbed estimate of each variant's cost; the median is kept beside it.
        tps[name] = tokens / min(s)
        rows.append(
            {
                "variant": name,
                "tokens_per_s": tps[name],
                "tokens_per_s_median_round": tokens / statistics.median(s),
                "seconds_per_round": s,
                "tokens_per_round": tokens,
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
            "windows_per_epoch": windows,
            "epochs_per_round": epochs,
            "rounds": rounds,
            "torch_threads": torch.get_num_threads(),
            "vocab_size": V,
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
