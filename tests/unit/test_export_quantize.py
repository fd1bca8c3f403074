"""The int8 variant and the held-out perplexity it is judged by.

A small model is trained briefly on text made here, so that perplexity means something (far
below the vocabulary size); int8 must stay within +-2% of float32 on the held-out tail.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnx
import pytest
import torch
from torch.nn import functional as F

from contract.model import validate
from contract.text import CorpusError, preprocess, read_corpus, validation_text
from export.common import ExportError
from export.evaluate import Perplexity, perplexity
from export.exporter import ExportOptions, export_checkpoint, int8_path_for
from export.parity import cpu_session
from export.quantize import QUANTIZED_LSTM_OP, compare_perplexity
from tests.export_support import VOCAB, save_checkpoint, small_text, train_briefly


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("int8")
    text = small_text(4000)
    corpus = d / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    norm = preprocess(text)
    head = norm[: int(len(norm) * 0.9)]  # train on the head only: the tail is held out
    model = train_briefly(head, hidden_size=48, steps=200)
    return save_checkpoint(d / "ck.pt", model), corpus, model


def test_int8_within_perplexity_tolerance(
    tmp_path: Path, trained: tuple[Path, Path, torch.nn.Module]
) -> None:
    ckpt, corpus, _ = trained
    out = tmp_path / "model.onnx"
    report = export_checkpoint(
        ckpt, out, ExportOptions(int8=True, corpus=corpus, measure_speed=False)
    )
    q8 = int8_path_for(out)
    assert q8.name == "model.int8.onnx" and q8.is_file()

    ppl = report["perplexity"]
    assert ppl["fp32"]["perplexity"] < 0.5 * len(VOCAB)  # the model learned something
    cmp_ = ppl["int8_vs_fp32"]
    assert cmp_["within_tolerance"] and cmp_["tolerance"] == 0.02
    assert abs(cmp_["relative_change"]) <= 0.02
    assert ppl["val_fraction"] == 0.1
    assert ppl["int8"]["tokens"] == ppl["fp32"]["tokens"] > 500

    ops = {n.op_type for n in onnx.load(str(q8)).graph.node}
    assert QUANTIZED_LSTM_OP in ops and "LSTM" not in ops
    assert report["int8"]["size_bytes"] < report["fp32"]["size_bytes"]
    assert report["int8"]["drift_vs_fp32"]["top1_agreement"] > 0.8

    spec = validate(q8)  # the int8 file follows the same contract
    assert spec.config["variant"] == "int8"
    assert spec.config["quantization"]["weight_type"] == "QInt8"
    assert validate(out).config["variant"] == "fp32"
    assert spec.vocab == validate(out).vocab


def test_speed_table_has_the_reported_batches(
    tmp_path: Path, trained: tuple[Path, Path, torch.nn.Module]
) -> None:
    ckpt, _, _ = trained
    report = export_checkpoint(ckpt, tmp_path / "m.onnx", ExportOptions(int8=True))
    rows = report["int8"]["speed"]["rows"]
    assert {(r["T"], r["B"]) for r in rows} == {(t, b) for t in (1, 35) for b in (1, 32, 128)}
    assert all(r["fp32_ms"] > 0 and r["int8_ms"] > 0 for r in rows)
    assert report["perplexity"] is None  # no corpus, no perplexity claims


def test_perplexity_helper_matches_torch(trained: tuple[Path, Path, torch.nn.Module]) -> None:
    """ORT streaming perplexity == the same computation in PyTorch (independent reference)."""
    ckpt, corpus, model = trained
    from export.exporter import build_artifacts

    art = build_artifacts(ckpt)
    sess = cpu_session(art.fp32)
    spec = validate(art.fp32)
    text = validation_text(corpus.read_text(), spec.preprocess, 0.1)
    got = perplexity(sess, spec, text, batch_size=8, num_steps=20)

    ids = torch.tensor(spec.encode(text, normalize=False))
    rows, per = 8, (len(ids) - 1) // 8
    x = ids[: rows * per].reshape(rows, per).T
    y = ids[1 : rows * per + 1].reshape(rows, per).T
    with torch.no_grad():
        logits, _ = model.double()(x)  # float64, whole sequence at once
        nll = F.cross_entropy(logits.reshape(-1, len(VOCAB)), y.reshape(-1), reduction="mean")
    model.float()
    assert got.tokens == rows * per
    assert math.isclose(got.perplexity, math.exp(nll.item()), rel_tol=1e-4)


def test_compare_perplexity_enforces_the_tolerance() -> None:
    def p(v: float) -> Perplexity:
        return Perplexity(v, 100, 1, 35, 0.0)

    assert compare_perplexity(p(5.0), p(5.05))["relative_change"] == pytest.approx(0.01)
    with pytest.raises(ExportError, match=r"int8 held-out perplexity 5.2000 is \+4.00%"):
        compare_perplexity(p(5.0), p(5.2))
    with pytest.raises(ExportError, match=r"-4.00%"):
        compare_perplexity(p(5.0), p(4.8))  # two-sided: a different model, even if "better"
    assert compare_perplexity(p(5.0), p(5.2), tolerance=0.05)["within_tolerance"]


def test_validation_split_is_the_normalised_tail(tmp_path: Path) -> None:
    text = "Hello,  World!\n" * 10  # normalises to "hello world " * 10 = 120 chars
    assert validation_text(text, "d2l_letters_lower", 0.1) == "hello world "
    assert validation_text(text, "d2l_letters_lower", 0.25) == "world " + "hello world " * 2
    with pytest.raises(CorpusError, match="val_fraction"):
        validation_text(text, "d2l_letters_lower", 1.0)
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(CorpusError, match="not UTF-8"):
        read_corpus(bad)
    with pytest.raises(CorpusError, match="corpus not found"):
        read_corpus(tmp_path / "absent.txt")


@pytest.mark.corpus
def test_validation_split_on_the_corpus_matches_training() -> None:
    path = os.environ.get("LSTM_SERVE_CORPUS")
    if not path:
        pytest.skip("LSTM_SERVE_CORPUS not set")
    text, _ = read_corpus(path)
    val = validation_text(text, "d2l_letters_lower", 0.1)
    norm = preprocess(text)
    assert norm.endswith(val) and abs(len(val) - len(norm) / 10) <= 1
    # Training's held-out ids are the same text (its vocabulary covers every letter and space).
    from training.data import load_corpus

    data = load_corpus(path, val_fraction=0.1)
    assert data.vocab.decode(data.val_ids) == val
