"""``lstm-train`` as users run it: real subprocesses, real files.

Every bad input must end with exactly one line on stderr, a non-zero exit and no traceback.
The bad-input processes start together, then each case is checked on its own. Cases that need
torch loaded anyway (checkpoints) call the same ``main()`` in this process, because starting
torch costs seconds per process on a busy machine; one real training run goes end to end.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.checkpoint import load

WORDS = [
    "the",
    "time",
    "traveller",
    "smiled",
    "round",
    "at",
    "us",
    "then",
    "still",
    "smiling",
    "faintly",
    "it",
    "was",
    "a",
    "lamp",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LSTM_SERVE_CORPUS": "", "CI": "true"}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from training.cli import main; main()", *args]


def _text(n_words: int) -> str:
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    out = {
        "good": d / "good.txt",
        "empty": d / "empty.txt",
        "short": d / "short.txt",
        "binary": d / "binary.bin",
        "foreign": d / "foreign.pt",
        "corrupt": d / "corrupt.pt",
        "dir": d,
    }
    out["good"].write_text(_text(1500), encoding="utf-8")
    out["empty"].write_text("", encoding="utf-8")
    out["short"].write_text(_text(30), encoding="utf-8")
    out["binary"].write_bytes(b"\xff\xfe\x00\x81" * 50)
    torch.save({"model": {"w": torch.zeros(2)}}, out["foreign"])
    out["corrupt"].write_bytes(os.urandom(2000))
    return out


# (case id, argv built from the files, what the one line must mention)
BAD = {
    "missing_corpus": (["--corpus", "{dir}/absent.txt"], "not found"),
    "empty_corpus": (["--corpus", "{empty}"], "empty"),
    "directory_corpus": (["--corpus", "{dir}"], "directory"),
    "binary_corpus": (["--corpus", "{binary}"], "not UTF-8"),
    "shorter_than_a_batch": (["--corpus", "{short}"], "fewer than one batch"),
    "hidden_zero": (["--corpus", "{good}", "--hidden", "0"], "--hidden"),
    "lr_zero": (["--corpus", "{good}", "--lr", "0"], "lr"),
    "lr_nan": (["--corpus", "{good}", "--lr", "nan"], "--lr"),
    "val_fraction_one": (["--corpus", "{good}", "--val-fraction", "1"], "val_fraction"),
    "negative_batch": (["--corpus", "{good}", "--batch-size", "-4"], "--batch-size"),
    "unknown_cell": (["--corpus", "{good}", "--cell", "gru"], "--cell"),
    "unknown_flag": (["--corpus", "{good}", "--hiden", "8"], "unrecognized"),
    "generate_negative": (["generate", "{foreign}", "--num-chars", "-1"], "--num-chars"),
}
IN_PROCESS = {
    "resume_foreign": (["--corpus", "{good}", "--resume", "{foreign}"], "not an lstm-serve"),
    "resume_corrupt": (["--resume", "{corrupt}"], "not a readable checkpoint"),
    "generate_missing": (["generate", "{dir}/none.pt"], "not found"),
    "generate_foreign": (["generate", "{foreign}"], "not an lstm-serve"),
    "generate_corrupt": (["generate", "{corrupt}"], "not a readable checkpoint"),
}


@pytest.fixture(scope="module")
def bad_results(
    files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, subprocess.CompletedProcess[str]]:
    names = {k: str(v) for k, v in files.items()}
    procs = {}
    for case, (argv, _) in BAD.items():
        out = tmp_path_factory.mktemp(case)
        args = [a.format(**names) for a in argv]
        if args[0] != "generate":
            args += ["--out", str(out), "--epochs", "1", "--threads", "1"]
        procs[case] = subprocess.Popen(
            _cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
        )
    results = {}
    for case, p in procs.items():
        stdout, stderr = p.communicate(timeout=240)
        results[case] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_non_zero(
    case: str, bad_results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    r = bad_results[case]
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("lstm-train"), lines[0]
    assert BAD[case][1] in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(IN_PROCESS))
def test_bad_checkpoint_in_process(
    case: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import main

    argv, want = IN_PROCESS[case]
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    if args[0] != "generate":
        args += ["--out", str(tmp_path), "--epochs", "1"]
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and want in err, err


def test_train_resume_and_generate(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import main

    out = tmp_path / "run"
    common = ["--corpus", str(files["good"]), "--out", str(out), "--threads", "1"]
    small = ["--hidden", "16", "--batch-size", "4", "--num-steps", "10", "--cell", "torch"]
    r = subprocess.run(
        _cmd(*common, *small, "--epochs", "1", "--optimizer", "adam", "--lr", "0.01"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    assert "best held-out ppl" in r.stdout and "Traceback" not in r.stderr
    assert {p.name for p in out.iterdir()} >= {
        "checkpoint.pt",
        "last.pt",
        "metrics.json",
        "perplexity.png",
    }
    # Resume (in process: same main()): model and optimizer come from the checkpoint.
    main([*common, "--resume", str(out / "last.pt"), "--epochs", "2"])
    ck = load(out / "last.pt")
    assert ck.epoch == 2 and ck.model_config.hidden_size == 16
    assert ck.train_config["optimizer"] == "adam" and ck.train_config["batch_size"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*common, "--resume", str(out / "last.pt"), "--epochs", "3", "--hidden", "32"])
    err = capsys.readouterr().err
    assert info.value.code != 0 and "conflicts" in err and len(err.strip().splitlines()) == 1
    main(
        ["generate", str(out / "checkpoint.pt"), "--prefix", "Time Traveller", "--num-chars", "25"]
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith("time traveller") and len(line) == len("time traveller") + 25
