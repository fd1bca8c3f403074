"""training.train on small generated text: perplexity falls, runs repeat, resume continues exactly,
the held-out figure is computed right, and the output folder holds what it promises."""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training import checkpoint as ckpt_mod
from training.data import Vocab
from training.model import CharLSTM, ModelConfig
from training.train import TrainConfig, TrainError, evaluate, generate, train

WORDS = [
    "the",
    "time",
    "traveller",
    "for",
    "so",
    "it",
    "will",
    "be",
    "convenient",
    "to",
    "speak",
    "of",
    "him",
    "was",
    "expounding",
    "a",
    "recondite",
    "matter",
    "to",
    "us",
    "his",
    "grey",
    "eyes",
    "shone",
    "and",
    "twinkled",
    "and",
    "his",
    "usually",
    "pale",
    "face",
    "was",
    "flushed",
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def small_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(small_text(3000), encoding="utf-8")
    return path


def _cfg(corpus: Path, out: Path, **kw: object) -> TrainConfig:
    base = TrainConfig(
        corpus=str(corpus),
        out_dir=str(out),
        cell="torch",
        hidden_size=32,
        epochs=4,
        batch_size=8,
        num_steps=16,
        lr=0.01,
        optimizer="adam",
        sample_every=2,
        sample_chars=20,
        threads=1,
        progress=False,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def _quiet(_: str) -> None:
    pass


@pytest.mark.parametrize(
    ("cell", "sampler", "optimizer", "lr"),
    [("scratch", "sequential", "sgd", 1.0), ("torch", "random", "adam", 0.01)],
)
def test_perplexity_falls_and_outputs_are_written(
    corpus: Path, tmp_path: Path, cell: str, sampler: str, optimizer: str, lr: float
) -> None:
    cfg = _cfg(corpus, tmp_path, cell=cell, sampler=sampler, optimizer=optimizer, lr=lr)
    res = train(cfg, log=_quiet)
    m = json.loads((tmp_path / "metrics.json").read_text())
    train_ppl = [e["train_ppl"] for e in m["epochs"]]
    val_ppl = [e["val_ppl"] for e in m["epochs"]]
    assert len(train_ppl) == 4 and m["stopped"] == "completed"
    # Uniform guessing over the vocabulary would be |V| (~25 here); the model must learn.
    assert train_ppl[-1] < 0.75 * train_ppl[0], train_ppl
    assert val_ppl[-1] < val_ppl[0] and val_ppl[-1] < 0.5 * len(m["vocab"]), val_ppl
    assert all(e["tokens_per_s"] > 0 and e["wall_s"] > 0 for e in m["epochs"])
    assert [s["epoch"] for s in m["samples"]] == [2, 4]
    assert m["samples"][-1]["text"].startswith("time traveller")
    assert (tmp_path / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # checkpoint.pt is the best epoch by held-out perplexity, and says so about itself.
    best = ckpt_mod.load(tmp_path / "checkpoint.pt")
    assert best.best_val_ppl == pytest.approx(min(val_ppl))
    assert best.epoch == 1 + int(np.argmin(val_ppl)) == m["best"]["epoch"] == res.best_epoch
    assert best.preprocess == "d2l_letters_lower" and best.vocab[best.unk_id] == "<unk>"
    assert best.corpus_sha256 == m["corpus"]["sha256"] and len(best.corpus_sha256) == 64
    assert best.train_config["sampler"] == sampler and best.optimizer is not None
    assert best.model_config.cell == cell
    # Its weights reproduce the recorded held-out figure.
    data_val = _val_ids(corpus, best)
    assert evaluate(best.build_model(), data_val) == pytest.approx(best.best_val_ppl, rel=1e-6)


def _val_ids(corpus: Path, ck: ckpt_mod.Checkpoint) -> torch.Tensor:
    from training.data import load_corpus

    return load_corpus(corpus, vocab=Vocab(tuple(ck.vocab), ck.unk_id)).val_ids


def test_same_seed_same_run_and_resume_continues_exactly(tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(small_text(800, seed=2), encoding="utf-8")
    full = train(_cfg(corpus, tmp_path / "full", cell="scratch", epochs=3), log=_quiet)
    again = train(_cfg(corpus, tmp_path / "again", cell="scratch", epochs=3), log=_quiet)
    a = ckpt_mod.load(tmp_path / "full" / "last.pt")
    b = ckpt_mod.load(tmp_path / "again" / "last.pt")
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert full.metrics["epochs"][-1]["train_ppl"] == again.metrics["epochs"][-1]["train_ppl"]

    train(_cfg(corpus, tmp_path / "half", cell="scratch", epochs=2), log=_quiet)
    half = ckpt_mod.load(tmp_path / "half" / "last.pt")
    assert half.epoch == 2
    res = train(_cfg(corpus, tmp_path / "half", cell="scratch", epochs=3), resume=half, log=_quiet)
    c = ckpt_mod.load(tmp_path / "half" / "last.pt")
    assert c.epoch == 3 and res.epochs_done == 3
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], c.state_dict[k]), k
    assert [e["train_ppl"] for e in res.metrics["epochs"]] == [
        e["train_ppl"] for e in full.metrics["epochs"]
    ]
    # A different seed is a different run.
    other = train(_cfg(corpus, tmp_path / "o", cell="scratch", seed=1, epochs=1), log=_quiet)
    assert other.metrics["epochs"][0]["train_ppl"] != full.metrics["epochs"][0]["train_ppl"]


def test_resume_refuses_another_corpus_and_finished_runs(corpus: Path, tmp_path: Path) -> None:
    train(_cfg(corpus, tmp_path / "r", epochs=1), log=_quiet)
    ck = ckpt_mod.load(tmp_path / "r" / "last.pt")
    other = tmp_path / "other.txt"
    other.write_text(small_text(3000, seed=5), encoding="utf-8")
    with pytest.raises(TrainError, match="not the one the checkpoint was trained on"):
        train(_cfg(other, tmp_path / "r2", epochs=2), resume=ck, log=_quiet)
    with pytest.raises(TrainError, match="already done 1 epochs"):
        train(_cfg(corpus, tmp_path / "r3", epochs=1), resume=ck, log=_quiet)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", 0),
        ("epochs", 0),
        ("lr", 0.0),
        ("lr", math.nan),
        ("clip", -1.0),
        ("val_fraction", 1.0),
        ("batch_size", -3),
        ("sampler", "shuffled"),
        ("optimizer", "rmsprop"),
        ("max_tokens", 1),
    ],
)
def test_nonsensical_settings_are_refused(
    corpus: Path, tmp_path: Path, field: str, value: object
) -> None:
    with pytest.raises(TrainError, match=field):
        train(_cfg(corpus, tmp_path, **{field: value}), log=_quiet)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_evaluate_matches_an_independent_float64_computation() -> None:
    """Windowed evaluation with carried state == one pass over each row, scored in numpy."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    model = CharLSTM(ModelConfig(vocab_size=11, hidden_size=12, num_layers=2, cell="torch"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    for n, B, T in ((500, 4, 7), (97, 32, 35), (3, 32, 35)):
        ids = torch.randint(0, 11, (n,))
        got = evaluate(model, ids, batch_size=B, num_steps=T)
        rows = min(B, n - 1)
        per_row = (n - 1) // rows
        X = ids[: rows * per_row].view(rows, per_row).T
        Y = ids[1 : rows * per_row + 1].view(rows, per_row).T.numpy()
        with torch.no_grad():
            logits = model(X)[0].double().numpy()  # whole rows at once, zero initial state
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        want = math.exp(-np.take_along_axis(logp, Y[..., None], -1).mean())
        assert got == pytest.approx(want, rel=1e-5)
    assert math.isnan(evaluate(model, torch.tensor([3])))


def test_generate_greedy_and_sampled() -> None:
    torch.manual_seed(0)
    vocab = Vocab(("<unk>", " ", *"abcdefghijklmnopqrstuvwxyz"))
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), hidden_size=16))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    g1 = generate(model, vocab, "Time Traveller!", 30)
    assert g1.startswith("time traveller ") and len(g1) == len("time traveller ") + 30
    assert g1 == generate(model, vocab, "time traveller ", 30)  # greedy: same every time
    s1 = generate(model, vocab, "time", 40, temperature=1.0, seed=3)
    assert s1 == generate(model, vocab, "time", 40, temperature=1.0, seed=3)
    assert s1 != generate(model, vocab, "time", 40, temperature=1.0, seed=4)
    with pytest.raises(TrainError, match="empty after preprocessing"):
        generate(model, vocab, "", 5)


def test_cosine_schedule_ends_low_and_follows_the_clock() -> None:
    from training.train import _lr_at

    cfg = TrainConfig(lr=2.0, epochs=11, schedule="cosine", min_lr_ratio=0.1)
    lrs = [_lr_at(cfg, e) for e in range(11)]
    assert lrs[0] == pytest.approx(2.0) and lrs[-1] == pytest.approx(0.2)
    assert lrs[5] == pytest.approx(1.1) and all(a > b for a, b in itertools.pairwise(lrs))
    assert _lr_at(replace(cfg, schedule="constant"), 7) == 2.0
    timed = replace(cfg, max_minutes=1.0)
    assert _lr_at(timed, 1, elapsed_s=60.0) == pytest.approx(0.2)  # budget spent: the floor
    assert _lr_at(timed, 5, elapsed_s=6.0) == pytest.approx(lrs[5])  # epochs further along
