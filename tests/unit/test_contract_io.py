"""contract.files, contract.text's split and geometry, contract.repository's layout."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from contract.files import atomic_path, sha256_file, write_atomic
from contract.repository import RepositoryError, resolve, versions
from contract.text import CorpusError, eval_rows, read_corpus, split_text, validation_text


def test_write_atomic_replaces_whole_files_with_the_usual_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.json"
    write_atomic(path, "one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "f.png"
    write_atomic(path, b"old")
    with pytest.raises(KeyboardInterrupt), atomic_path(path, suffix=".png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    data = np.random.default_rng().bytes(3 << 20)  # more than one read block
    (tmp_path / "b").write_bytes(data)
    assert sha256_file(tmp_path / "b") == hashlib.sha256(data).hexdigest()


def test_read_corpus_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("Hello")
    text, sha = read_corpus(tmp_path / "ok.txt")
    assert text == "Hello" and sha == sha256_file(tmp_path / "ok.txt")
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    (tmp_path / "empty").write_text("  \n")
    for path, match in [
        (tmp_path / "absent", "corpus not found"),
        (tmp_path, "is a directory"),
        (tmp_path / "bin", "not UTF-8"),
        (tmp_path / "empty", "is empty"),
    ]:
        with pytest.raises(CorpusError, match=match):
            read_corpus(path)


def test_split_and_validation_text_take_the_same_tail() -> None:
    text = "Hello, World! " * 7
    norm = "hello world " * 7
    for frac in (0.1, 0.25, 0.5):
        assert split_text(norm, frac)[1] == validation_text(text, "d2l_letters_lower", frac)
        train, val = split_text(norm, frac)
        assert train + val == norm and len(val) == len(norm) - int(len(norm) * (1 - frac))
    with pytest.raises(CorpusError):
        validation_text(text, "d2l_letters_lower", 0.0)


@pytest.mark.parametrize(("n", "batch"), [(2, 32), (33, 32), (1000, 32), (70, 7), (5, 1)])
def test_eval_rows_predicts_every_position_of_each_row_once(n: int, batch: int) -> None:
    rows, per_row = eval_rows(n, batch)
    assert 1 <= rows <= batch and rows * per_row <= n - 1
    # Row r reads ids [r*per_row, (r+1)*per_row) and predicts the one after each: no id past
    # the end is needed, and no more than `rows - 1` tokens are left unpredicted at the tail.
    assert (rows - 1) * per_row + per_row <= n - 1
    assert n - 1 - rows * per_row < rows
    with pytest.raises(CorpusError, match="too short"):
        eval_rows(1, batch)


def test_repository_layout(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for v in ("1", "2", "10"):
        (repo / "m" / v).mkdir(parents=True)
        (repo / "m" / v / "model.onnx").write_bytes(b"x")
    (repo / "m" / "notes").mkdir()
    assert versions(repo / "m") == [1, 2, 10] and versions(tmp_path / "none") == []
    loc = resolve(repo)
    assert (loc.name, loc.version) == ("m", "10")
    assert resolve(repo / "m" / "2").version == "2"
    assert resolve(repo / "m" / "1" / "model.onnx").name == "m"
    other = tmp_path / "other.onnx"
    other.write_bytes(b"x")
    assert (resolve(other).name, resolve(other).version) == ("other", "1")
    with pytest.raises(RepositoryError, match="not found"):
        resolve(tmp_path / "nope")
    with pytest.raises(RepositoryError, match="no numeric version folders"):
        resolve(repo / "m" / "notes")
