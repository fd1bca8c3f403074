"""Text rules, vocabulary, corpus reading, the held-out split and the evaluation geometry.

Training normalises the corpus with one named rule and records the name in the checkpoint and
the model's metadata, so the server normalises prompts exactly as training did. Training and
export compute held-out perplexity on the same text cut the same way:

* held-out text: the *tail* of the normalised corpus,
  ``norm[int(len(norm) * (1 - val_fraction)):]`` (:func:`split_text`);
* geometry: the token stream is cut into ``EVAL_BATCH`` contiguous rows read ``EVAL_STEPS`` at a
  time with the state carried across windows (:func:`eval_rows`), so figures are comparable
  across runs and between the PyTorch and ONNX Runtime evaluations.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ContractError
from .files import sha256_bytes

UNK_TOKEN = "<unk>"
DEFAULT_PREPROCESS = "d2l_letters_lower"
DEFAULT_VAL_FRACTION = 0.1
EVAL_BATCH = 32
EVAL_STEPS = 35


class CorpusError(ValueError):
    """A text cannot be used (missing, unreadable, empty, not UTF-8, a bad split...)."""


def _d2l_letters_lower(text: str) -> str:
    # The d2l book's rule: every run of non-letters becomes one space, then lower case.
    return re.sub("[^A-Za-z]+", " ", text).lower()


def _identity(text: str) -> str:
    return text


PREPROCESS_RULES: dict[str, Callable[[str], str]] = {
    "d2l_letters_lower": _d2l_letters_lower,
    "none": _identity,
}


def preprocess(text: str, rule: str = DEFAULT_PREPROCESS) -> str:
    """Apply the named text rule. Raises :class:`ContractError` naming the known rules."""
    try:
        fn = PREPROCESS_RULES[rule]
    except KeyError:
        raise ContractError(
            f"unknown preprocess rule {rule!r}; known: {sorted(PREPROCESS_RULES)}"
        ) from None
    return fn(text)


# --- vocabulary ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocab:
    """Token list, index = id. ``<unk>`` is id 0; characters not in the list map to it."""

    tokens: tuple[str, ...]
    unk_id: int = 0

    def __post_init__(self) -> None:
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")
        if not 0 <= self.unk_id < len(self.tokens) or self.tokens[self.unk_id] != UNK_TOKEN:
            raise ValueError(f"vocabulary must hold {UNK_TOKEN!r} at unk_id={self.unk_id}")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def encode(self, text: str) -> list[int]:
        index = self.index
        return [index.get(ch, self.unk_id) for ch in text]

    def decode(self, ids: Any) -> str:
        """Ids (a list, an array or a tensor) to text; ``<unk>`` becomes nothing."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return "".join(self.tokens[i] for i in ids if i != self.unk_id)


def build_vocab(text: str) -> Vocab:
    """``<unk>`` then every character of ``text``, most frequent first, ties by character."""
    counts = Counter(text)
    counts.pop(UNK_TOKEN, None)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return Vocab((UNK_TOKEN, *(tok for tok, _ in ordered)), unk_id=0)


# --- corpus, split, geometry -------------------------------------------------------------------


def read_corpus(path: str | Path) -> tuple[str, str]:
    """Return ``(text, sha256 of the raw bytes)``; :class:`CorpusError` if missing, a directory,
    unreadable, not UTF-8 or empty."""
    path = Path(path)
    if path.is_dir():
        raise CorpusError(f"corpus {path} is a directory, not a text file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"corpus not found: {path}") from None
    except OSError as e:
        raise CorpusError(f"cannot read corpus {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"corpus {path} is not UTF-8 text (bad byte at offset {e.start})"
        ) from None
    if not text.strip():
        raise CorpusError(f"corpus {path} is empty")
    return text, sha256_bytes(raw)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """``(train, val)``: val is the last ``val_fraction`` of ``text`` (0 gives an empty val)."""
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return text, ""
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def validation_text(text: str, rule: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """The held-out tail of ``text`` normalised with ``rule`` (``val_fraction`` in (0, 1))."""
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return split_text(preprocess(text, rule), val_fraction)[1]


def eval_rows(num_tokens: int, batch_size: int = EVAL_BATCH) -> tuple[int, int]:
    """``(rows, per_row)`` for a perplexity pass over ``num_tokens`` ids.

    Row ``r`` reads ids ``[r * per_row, (r + 1) * per_row)`` and predicts the id after each, so
    ``rows * per_row`` predictions in all; needs ``num_tokens >= 2``.
    """
    if num_tokens < 2:
        raise CorpusError(f"text too short for perplexity ({num_tokens} tokens)")
    rows = min(batch_size, num_tokens - 1)
    return rows, (num_tokens - 1) // rows
