"""The Time Machine corpus, its character vocabulary and the book's two minibatch schemes.

Follows d2l's "Text Preprocessing" and "Language Models" sections:

* the whole text is normalised with one rule from :mod:`contract.text` (the book's
  ``re.sub('[^A-Za-z]+', ' ', text).lower()`` by default), so the server later normalises
  prompts exactly as training did;
* one token per character; the vocabulary (:class:`contract.text.Vocab`) puts ``<unk>`` at id 0
  and the other tokens after it, most frequent first (ties broken by the character);
* the held-out validation text is the *tail* of the normalised corpus:
  ``norm[int(len(norm) * (1 - val_fraction)):]`` (:func:`contract.text.split_text`, which export
  uses too);
* ``max_tokens`` keeps only the first N tokens of the training part, like the old
  ``d2l.load_data_time_machine(..., max_tokens=10000)`` that the book's LSTM figures come from;
* minibatches are time-major ``X, Y`` of shape ``[num_steps, batch_size]`` (``Y`` is ``X``
  shifted by one token), either by *sequential partitioning* (batch ``k+1`` row ``b`` continues
  exactly where batch ``k`` row ``b`` ended, so the recurrent state may be carried across
  batches) or by *random sampling* (independent windows; the state must be reset per batch).

Corpus resolution: an explicit path, else ``$LSTM_SERVE_CORPUS``, else the book's file in the
user cache directory, downloaded from the book's URL on first use and verified by SHA-1.
"""

from __future__ import annotations

import os
import random
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from contract.files import atomic_path, sha1_file
from contract.text import (
    DEFAULT_PREPROCESS,
    PREPROCESS_RULES,
    CorpusError,
    Vocab,
    build_vocab,
    preprocess,
    read_corpus,
    split_text,
)

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that make tensors, so that reading and checking a
# corpus (and the CLI's early errors) never pay for loading torch.

BOOK_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
BOOK_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
BOOK_FILENAME = "timemachine.txt"
CORPUS_ENV = "LSTM_SERVE_CORPUS"
CACHE_ENV = "LSTM_SERVE_CACHE"  # overrides the cache directory (tests, read-only homes)
SAMPLERS = ("sequential", "random")  # the same tuple as training.config.SAMPLERS


# The corpus cannot be used (missing, unreadable, empty, too short, bad checksum...): one error
# type for the contract's corpus reading and split and for this module's download.
DataError = CorpusError
__all__ = [
    "DataError",
    "Vocab",
    "build_vocab",
    "load_corpus",
    "read_corpus",
    "resolve_corpus",
    "split_text",
]


# --- corpus files ------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$LSTM_SERVE_CACHE``, else ``$XDG_CACHE_HOME/lstm-serve``, else ``~/.cache/lstm-serve``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lstm-serve"


def verify_sha1(path: str | Path, expected: str) -> None:
    """Raise :class:`DataError` unless the file's SHA-1 is ``expected``."""
    got = sha1_file(path)
    if got != expected.lower():
        raise DataError(f"{path}: SHA-1 {got} does not match the expected {expected}")


def download(url: str, dest: Path, sha1: str, *, timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest`` (atomically), verify its SHA-1, return ``dest``.

    A file already at ``dest`` with the right checksum is reused without touching the network;
    one with the wrong checksum is fetched again. A download whose checksum does not match is
    deleted and raises :class:`DataError`, so a bad file never lands in the cache.
    """
    if dest.is_file():
        try:
            verify_sha1(dest, sha1)
            return dest
        except DataError:
            pass
    with atomic_path(dest, suffix=".part") as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                while chunk := resp.read(1 << 16):
                    f.write(chunk)
        except OSError as e:  # URLError, timeouts and HTTP errors all derive from OSError
            raise DataError(f"cannot download {url}: {getattr(e, 'reason', None) or e}") from None
        try:
            verify_sha1(tmp, sha1)
        except DataError as e:
            raise DataError(f"downloaded file from {url} is corrupt: {e}") from None
    return dest


def resolve_corpus(path: str | Path | None = None, *, allow_download: bool = True) -> Path:
    """Where the corpus comes from: ``path``, else ``$LSTM_SERVE_CORPUS``, else the cache.

    The cached book is downloaded (and SHA-1 checked) on first use when ``allow_download``.
    """
    if path:
        return Path(path)
    if os.environ.get(CORPUS_ENV):
        return Path(os.environ[CORPUS_ENV])
    cached = cache_dir() / BOOK_FILENAME
    if cached.is_file() or allow_download:
        return download(BOOK_URL, cached, BOOK_SHA1)
    raise DataError(f"no corpus: pass --corpus PATH or set {CORPUS_ENV}")


# --- minibatches -------------------------------------------------------------------------------


def min_tokens(batch_size: int, num_steps: int) -> int:
    """Fewest tokens with which both samplers yield at least one full batch at any offset."""
    return batch_size * num_steps + num_steps + 1


def seq_data_iter_sequential(
    corpus: torch.Tensor, batch_size: int, num_steps: int, rng: random.Random
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The book's sequential partitioning, time-major.

    A random offset in ``[0, num_steps]`` (the book's) shifts the windows each epoch; the rest
    is cut into ``batch_size`` contiguous rows read ``num_steps`` at a time, so row ``b`` of
    one batch continues exactly where row ``b`` of the previous batch ended.
    """
    offset = rng.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = corpus[offset : offset + num_tokens].view(batch_size, -1)
    Ys = corpus[offset + 1 : offset + 1 + num_tokens].view(batch_size, -1)
    num_batches = Xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        yield Xs[:, i : i + num_steps].T.contiguous(), Ys[:, i : i + num_steps].T.contiguous()


def seq_data_iter_random(
    corpus: torch.Tensor, batch_size: int, num_steps: int, rng: random.Random
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The book's random sampling, time-major: non-overlapping windows in shuffled order.

    A random offset in ``[0, num_steps - 1]`` starts the windows; adjacent batches are not
    adjacent in the text, so the state must start fresh for every batch.
    """
    corpus = corpus[rng.randint(0, num_steps - 1) :]
    num_subseqs = (len(corpus) - 1) // num_steps
    starts = list(range(0, num_subseqs * num_steps, num_steps))
    rng.shuffle(starts)
    num_batches = num_subseqs // batch_size
    import torch

    for i in range(0, batch_size * num_batches, batch_size):
        idx = torch.tensor(starts[i : i + batch_size])
        cols = idx[None, :] + torch.arange(num_steps)[:, None]  # [T, B]
        yield corpus[cols], corpus[cols + 1]


@dataclass(frozen=True)
class CorpusData:
    """A corpus ready for training: ids of the training and held-out parts, and provenance."""

    vocab: Vocab
    train_ids: torch.Tensor  # int64 [N]
    val_ids: torch.Tensor  # int64 [M], may be empty when val_fraction == 0
    corpus_sha256: str
    preprocess: str
    source: str

    def batches(
        self, sampler: str, batch_size: int, num_steps: int, seed: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of training minibatches; ``seed`` fixes offset and order (per epoch)."""
        rng = random.Random(seed)
        if sampler == "sequential":
            return seq_data_iter_sequential(self.train_ids, batch_size, num_steps, rng)
        if sampler == "random":
            return seq_data_iter_random(self.train_ids, batch_size, num_steps, rng)
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")

    def num_batches(self, sampler: str, batch_size: int, num_steps: int) -> int:
        """Batches per epoch at the smallest offset (an epoch may yield one fewer)."""
        n = len(self.train_ids)
        if sampler == "sequential":
            return ((n - 1) // batch_size) // num_steps
        return ((n - 1) // num_steps) // batch_size


def load_corpus(
    path: str | Path | None,
    *,
    rule: str = DEFAULT_PREPROCESS,
    val_fraction: float = 0.1,
    max_tokens: int | None = None,
    vocab: Vocab | None = None,
) -> CorpusData:
    """Read, normalise, split and encode a corpus (see the module docstring for each rule).

    ``vocab`` (e.g. from a checkpoint being resumed) replaces the one built from the training
    text. Raises :class:`DataError` for any unusable input.
    """
    import torch

    if rule not in PREPROCESS_RULES:
        raise DataError(f"unknown preprocess rule {rule!r}; known: {sorted(PREPROCESS_RULES)}")
    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"max_tokens must be >= 2, got {max_tokens}")
    src = resolve_corpus(path)
    text, sha = read_corpus(src)
    norm = preprocess(text, rule)
    if not norm.strip():
        raise DataError(f"corpus {src} has no text left after preprocessing with {rule!r}")
    train, val = split_text(norm, val_fraction)
    if vocab is None:
        vocab = build_vocab(train)
    if max_tokens is not None:
        train = train[:max_tokens]
    return CorpusData(
        vocab=vocab,
        train_ids=torch.tensor(vocab.encode(train), dtype=torch.int64),
        val_ids=torch.tensor(vocab.encode(val), dtype=torch.int64),
        corpus_sha256=sha,
        preprocess=rule,
        source=str(src),
    )
