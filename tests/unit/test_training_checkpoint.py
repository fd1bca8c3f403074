"""training.checkpoint: a round trip keeps everything; anything else is refused with one line."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from training.checkpoint import FORMAT, Checkpoint, CheckpointError, load, save
from training.model import CharLSTM, ModelConfig

VOCAB = ["<unk>", " ", *"etaoinshrdlcumwfgypbvkjxqz"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _ckpt(cell: str = "scratch", input_mode: str = "onehot") -> Checkpoint:
    cfg = ModelConfig(
        vocab_size=len(VOCAB),
        hidden_size=12,
        num_layers=2,
        cell=cell,  # type: ignore[arg-type]
        input_mode=input_mode,  # type: ignore[arg-type]
        embedding_dim=6,
    )
    model = CharLSTM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randint(0, len(VOCAB), (5, 2)))[0].sum().backward()
    opt.step()
    return Checkpoint(
        model_config=cfg,
        vocab=list(VOCAB),
        unk_id=0,
        preprocess="d2l_letters_lower",
        state_dict=model.state_dict(),
        train_config={"lr": 0.01, "optimizer": "adam", "max_tokens": None},
        optimizer=opt.state_dict(),
        epoch=7,
        best_val_ppl=3.25,
        metrics={"train_ppl": [9.0, 4.0], "val_ppl": [8.0, None], "samples": [{"epoch": 2}]},
        corpus_sha256="ab" * 32,
    )


@pytest.mark.parametrize(("cell", "mode"), [("scratch", "onehot"), ("torch", "embedding")])
def test_round_trip(tmp_path: Path, cell: str, mode: str) -> None:
    ck = _ckpt(cell, mode)
    save(ck, tmp_path / "sub" / "c.pt")
    back = load(tmp_path / "sub" / "c.pt")
    assert back.model_config == ck.model_config and back.vocab == ck.vocab
    assert (back.epoch, back.best_val_ppl, back.corpus_sha256) == (7, 3.25, "ab" * 32)
    assert back.metrics == ck.metrics and back.train_config == ck.train_config
    m1, m2 = CharLSTM(ck.model_config), back.build_model()
    m1.load_state_dict(ck.state_dict)
    tokens = torch.randint(0, len(VOCAB), (9, 3))
    assert torch.equal(m1(tokens)[0], m2(tokens)[0])
    opt = torch.optim.Adam(m2.parameters(), lr=0.01)
    assert back.optimizer is not None
    opt.load_state_dict(back.optimizer)
    assert not list(tmp_path.glob("sub/.c.pt*"))  # no temporary left behind


def _valid_bytes(tmp_path: Path) -> bytes:
    save(_ckpt(), tmp_path / "good.pt")
    return (tmp_path / "good.pt").read_bytes()


class Foreign:  # a pickled object that is not plain data: weights_only refuses it
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("missing", "not found"),
        ("random_bytes", "not a readable checkpoint"),
        ("truncated", "not a readable checkpoint"),
        ("empty", "not a readable checkpoint"),
        ("text", "not a readable checkpoint"),
        ("plain_tensor", "not an lstm-serve checkpoint"),
        ("foreign_dict", "not an lstm-serve checkpoint"),
        ("pickled_object", "not a readable checkpoint"),
        ("future_version", "format_version 99"),
        ("vocab_mismatch", "vocab has"),
        ("no_state_dict", "malformed"),
        ("bad_config", "malformed"),
    ],
)
def test_rejects(tmp_path: Path, kind: str, match: str) -> None:
    path = tmp_path / "bad.pt"
    good = _ckpt().to_dict()
    if kind == "random_bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        data = _valid_bytes(tmp_path)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif kind == "plain_tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "foreign_dict":
        torch.save({"model": {"w": torch.zeros(2)}, "iter_num": 3}, path)  # e.g. nanoGPT's
    elif kind == "pickled_object":
        with open(path, "wb") as f:
            pickle.dump({"format": FORMAT, "x": Foreign()}, f)
    elif kind == "future_version":
        torch.save({**good, "format_version": 99}, path)
    elif kind == "vocab_mismatch":
        torch.save({**good, "vocab": VOCAB[:-1]}, path)
    elif kind == "no_state_dict":
        torch.save({k: v for k, v in good.items() if k != "state_dict"}, path)
    elif kind == "bad_config":
        torch.save({**good, "model_config": {**good["model_config"], "hidden_size": 0}}, path)
    with pytest.raises(CheckpointError, match=match) as info:
        load(path)
    assert "\n" not in str(info.value)


def test_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    good = _ckpt().to_dict()
    torch.save(
        {**good, "model_config": {**good["model_config"], "hidden_size": 13}}, tmp_path / "x"
    )
    with pytest.raises(CheckpointError, match="does not fit"):
        load(tmp_path / "x").build_model()
