"""training.data: preprocessing, vocabulary, split, both samplers, corpus files and download."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from pathlib import Path

import pytest
import torch

from contract.text import UNK_TOKEN, preprocess
from training import data as D


def test_preprocess_is_the_books_rule() -> None:
    text = "The Time-Traveller (for so it will be\nconvenient to speak of him) 42 Über!"
    assert preprocess(text, "d2l_letters_lower") == (
        "the time traveller for so it will be convenient to speak of him ber "
    )


def test_vocab_unk_first_then_by_frequency() -> None:
    v = D.build_vocab("aaabbc  c")  # a:3, b:2, c:2, ' ':2
    assert v.tokens[0] == UNK_TOKEN and v.unk_id == 0
    assert v.tokens[1:] == ("a", " ", "b", "c")  # ties broken by character
    assert v.encode("abz c") == [1, 3, 0, 2, 4]
    assert v.decode(v.encode("abz c")) == "ab c"  # <unk> decodes to nothing
    with pytest.raises(ValueError):
        D.Vocab(("a", UNK_TOKEN))  # <unk> must sit at unk_id


def test_split_is_the_tail() -> None:
    text = "".join(chr(97 + i % 26) for i in range(1000))
    train, val = D.split_text(text, 0.1)
    assert train + val == text and len(val) == 100 and val == text[900:]
    assert D.split_text(text, 0.0) == (text, "")
    assert D.split_text("abcdefg", 0.5) == ("abc", "defg")  # cut = int(len * (1 - f))
    for bad in (1.0, -0.1, 2.0):
        with pytest.raises(D.DataError):
            D.split_text(text, bad)


def _corpus(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64)  # token i == position i: windows are easy to read


@pytest.mark.parametrize(("n", "B", "T"), [(1000, 4, 7), (5000, 32, 35), (400, 3, 10)])
def test_sequential_batches_are_contiguous_across_batches(n: int, B: int, T: int) -> None:
    seed = random.randrange(1 << 30)
    batches = list(D.seq_data_iter_sequential(_corpus(n), B, T, random.Random(seed)))
    assert len(batches) >= 1
    for X, Y in batches:
        assert X.shape == Y.shape == (T, B)  # time-major
        assert torch.equal(Y, X + 1)  # Y is X shifted by one token
        assert torch.equal(X[1:] - X[:-1], torch.ones(T - 1, B, dtype=torch.int64))
    for (X0, _), (X1, _) in itertools.pairwise(batches):
        # Row b of the next batch starts right after row b of this one: state may be carried.
        assert torch.equal(X1[0], X0[-1] + 1)
    rows = torch.stack([X[0] for X, _ in batches])  # the rows are disjoint slices
    assert len(set(rows.flatten().tolist())) == rows.numel()


@pytest.mark.parametrize(("n", "B", "T"), [(1000, 4, 7), (5000, 32, 35)])
def test_random_sampling_windows(n: int, B: int, T: int) -> None:
    seed = random.randrange(1 << 30)
    batches = list(D.seq_data_iter_random(_corpus(n), B, T, random.Random(seed)))
    starts = []
    for X, Y in batches:
        assert X.shape == Y.shape == (T, B)
        assert torch.equal(Y, X + 1)
        assert torch.equal(X[1:] - X[:-1], torch.ones(T - 1, B, dtype=torch.int64))
        starts += X[0].tolist()
    assert len(set(starts)) == len(starts)  # non-overlapping windows
    offset = starts[0] % T  # the random start, in [0, T)
    assert all((s - offset) % T == 0 for s in starts)
    assert len(batches) == ((n - offset - 1) // T) // B
    again = [X for X, _ in D.seq_data_iter_random(_corpus(n), B, T, random.Random(seed))]
    assert all(torch.equal(a, b) for a, (b, _) in zip(again, batches, strict=True))
    other = [X for X, _ in D.seq_data_iter_random(_corpus(n), B, T, random.Random(seed + 1))]
    assert not all(torch.equal(a, b) for a, (b, _) in zip(other, batches, strict=False))
    # Shuffled: consecutive batches are not neighbours in the text (unlike sequential).
    assert starts != sorted(starts)


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_min_tokens_gives_a_batch_at_every_offset(sampler: str) -> None:
    B, T = 5, 6
    cd = D.CorpusData(
        D.build_vocab("ab"), _corpus(D.min_tokens(B, T)), _corpus(0), "", "none", "mem"
    )
    for seed in range(40):
        assert len(list(cd.batches(sampler, B, T, seed))) >= 1
    short = D.CorpusData(cd.vocab, _corpus(B * T), _corpus(0), "", "none", "mem")
    assert min(len(list(short.batches(sampler, B, T, s))) for s in range(40)) == 0


def test_load_corpus_split_vocab_and_max_tokens(tmp_path: Path) -> None:
    raw = "The Time Machine, by H. G. Wells!\n" * 40 + "zzz QQQ"
    path = tmp_path / "c.txt"
    path.write_text(raw, encoding="utf-8")
    cd = D.load_corpus(path, val_fraction=0.1)
    norm = preprocess(raw)
    train, val = D.split_text(norm, 0.1)
    assert cd.corpus_sha256 == hashlib.sha256(raw.encode()).hexdigest()
    assert cd.vocab.decode(cd.train_ids) == train
    assert len(cd.val_ids) == len(val)
    # The vocabulary comes from the training part: 'z' and 'q' only occur in the tail.
    assert "z" not in cd.vocab.tokens and cd.val_ids[-2].item() == cd.vocab.unk_id
    small = D.load_corpus(path, val_fraction=0.1, max_tokens=50)
    assert small.vocab.decode(small.train_ids) == train[:50]
    assert torch.equal(small.val_ids, cd.val_ids)  # the held-out tail does not move
    assert small.vocab == cd.vocab


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"  \n\t", "empty"),
        (b"\xff\xfe\x00a", "not UTF-8"),
        (b"1234 !!", "no text"),
    ],
)
def test_unusable_corpora(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(content)
    with pytest.raises(D.DataError, match=match):
        D.load_corpus(path)


def test_missing_and_directory_corpus(tmp_path: Path) -> None:
    with pytest.raises(D.DataError, match="not found"):
        D.load_corpus(tmp_path / "absent.txt")
    with pytest.raises(D.DataError, match="directory"):
        D.load_corpus(tmp_path)


# --- download and cache: a file:// URL stands in for the network ---------------------------------


def _source(tmp_path: Path) -> tuple[str, str, bytes]:
    body = os.urandom(3000)
    src = tmp_path / "remote.txt"
    src.write_bytes(body)
    return src.as_uri(), hashlib.sha1(body).hexdigest(), body


def test_download_verifies_sha1(tmp_path: Path) -> None:
    url, sha1, body = _source(tmp_path)
    dest = tmp_path / "cache" / "book.txt"
    assert D.download(url, dest, sha1) == dest and dest.read_bytes() == body
    bad = tmp_path / "cache" / "bad.txt"
    with pytest.raises(D.DataError, match="corrupt"):
        D.download(url, bad, "0" * 40)
    assert not bad.exists() and not list(bad.parent.glob(".bad*"))  # nothing half-written


def test_download_reuses_a_good_cache_and_replaces_a_bad_one(tmp_path: Path) -> None:
    url, sha1, body = _source(tmp_path)
    dest = tmp_path / "book.txt"
    dest.write_bytes(body)
    # A good cached file is used as is: an unreachable URL is never tried.
    assert D.download((tmp_path / "nowhere").as_uri(), dest, sha1) == dest
    dest.write_bytes(body[:-1] + b"!")  # corrupted cache
    D.download(url, dest, sha1)
    assert dest.read_bytes() == body
    with pytest.raises(D.DataError, match="cannot download"):
        dest.unlink()
        D.download((tmp_path / "nowhere").as_uri(), dest, sha1)


def test_resolve_corpus_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, sha1, body = _source(tmp_path)
    monkeypatch.setattr(D, "BOOK_URL", url)
    monkeypatch.setattr(D, "BOOK_SHA1", sha1)
    monkeypatch.setenv(D.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(D.CORPUS_ENV, str(tmp_path / "env.txt"))
    assert D.resolve_corpus(tmp_path / "flag.txt") == tmp_path / "flag.txt"
    assert D.resolve_corpus(None) == tmp_path / "env.txt"
    monkeypatch.delenv(D.CORPUS_ENV)
    got = D.resolve_corpus(None)
    assert got == tmp_path / "cache" / D.BOOK_FILENAME and got.read_bytes() == body


@pytest.mark.corpus
def test_the_books_corpus() -> None:
    path = os.environ.get(D.CORPUS_ENV)
    if not path:
        pytest.skip(f"{D.CORPUS_ENV} not set")
    D.verify_sha1(path, D.BOOK_SHA1)
    cd = D.load_corpus(path, max_tokens=10_000)
    assert len(cd.vocab) == 28 and cd.vocab.tokens[:3] == (UNK_TOKEN, " ", "e")
    assert len(cd.train_ids) == 10_000
    norm = preprocess(Path(path).read_text(encoding="utf-8"))
    assert cd.vocab.decode(cd.val_ids) == norm[int(len(norm) * 0.9) :]
