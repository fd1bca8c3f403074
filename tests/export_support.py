"""Checkpoints for the export tests, made here with training.checkpoint.save (no trainer needed)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch.nn import functional as F

from training.checkpoint import Checkpoint, save
from training.model import CharLSTM, ModelConfig

VOCAB = ["<unk>", " ", *"abcdefghijklmnopqrstuvwxyz"]
CELLS = ("scratch", "torch")
INPUT_MODES = ("onehot", "embedding")

_SOURCE = (
    "the time traveller for so it will be convenient to speak of him was expounding a recondite "
    "matter to us his grey eyes shone and twinkled and his usually pale face was flushed and "
    "animated fire burned brightly soft radiance of incandescent lights in lilies of silver "
    "caught the bubbles that flashed and passed in our glasses"
)
_WORDS = _SOURCE.split()


def small_text(n_words: int = 3000, seed: int = 0) -> str:
    """Deterministic English-like text from a small word list (the corpus is not needed)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


def random_model(
    cell: str = "scratch",
    input_mode: str = "onehot",
    num_layers: int = 1,
    hidden_size: int = 24,
    *,
    seed: int = 0,
    scale: float = 0.3,
    dropout: float = 0.0,
) -> CharLSTM:
    """A CharLSTM with weights large enough that gates saturate differently (a real test)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden_size,
        num_layers=num_layers,
        cell=cell,  # type: ignore[arg-type]
        input_mode=input_mode,  # type: ignore[arg-type]
        embedding_dim=8,
        dropout=dropout,
    )
    model = CharLSTM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model


def save_checkpoint(path: Path, model: CharLSTM, **extra: object) -> Path:
    ckpt = Checkpoint(
        model_config=model.config,
        vocab=list(VOCAB),
        unk_id=0,
        preprocess="d2l_letters_lower",
        state_dict=model.state_dict(),
        train_config={"note": "made by tests"},
        **extra,  # type: ignore[arg-type]
    )
    save(ckpt, path)
    return path


def train_briefly(
    text: str, *, cell: str = "torch", hidden_size: int = 32, steps: int = 150, seed: int = 0
) -> CharLSTM:
    """A few Adam steps of next-character training: enough for a perplexity well below |V|."""
    torch.manual_seed(seed)
    model = random_model(cell, "onehot", 1, hidden_size, seed=seed, scale=0.1)
    index = {c: i for i, c in enumerate(VOCAB)}
    ids = torch.tensor([index.get(c, 0) for c in text], dtype=torch.int64)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    T, B = 35, 16
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
        x = torch.stack([ids[s : s + T] for s in starts], dim=1)
        y = torch.stack([ids[s + 1 : s + T + 1] for s in starts], dim=1)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, len(VOCAB)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()
