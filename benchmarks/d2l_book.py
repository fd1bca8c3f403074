"""The book's own code for the LSTM chapter, as the baseline for training throughput.

The ``d2l`` package (1.0.x) ships the chapter's building blocks (``d2l.Module``, ``d2l.RNN``,
``d2l.RNNLMScratch``, ``d2l.RNNLM``, ``d2l.Trainer``, ``d2l.TimeMachine``) but not the two LSTM
classes the chapter defines in its text, so those two are transcribed below from
"Long Short-Term Memory (LSTM)" (d2l-en, ``chapter_recurrent-modern/lstm.md``, PyTorch tab; the
book's code is MIT-0). They are kept as the book writes them, eight matrix products per step
included: that is the baseline being measured.

Installing d2l: its metadata pins 2023 releases (numpy 1.23, pandas 2.0, matplotlib 3.7, jupyter)
that cannot coexist with this project's numpy 2 and torch 2.13, so it is installed with
``--no-deps`` (``make bench`` does this) plus the modules it imports at module level, which the
``bench`` extra lists: pandas, requests, scipy, ipython, matplotlib-inline. One of its module-level
imports is ``torchvision``, used only by image chapters; the PyPI torchvision wheels are built
against other torch releases and fail to load beside torch 2.13 (and installing one could pull
another torch), so :func:`load_d2l` puts an empty stand-in module in ``sys.modules`` for it
before importing d2l. Nothing on the LSTM chapter's path touches it.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import types
from pathlib import Path
from typing import Any

CORPUS_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"


class D2LUnavailable(RuntimeError):
    """d2l (or a module it imports) is missing; the message says what to install."""


def _stub_torchvision() -> None:
    if "torchvision" in sys.modules:
        return
    tv = types.ModuleType("torchvision")
    tv.__doc__ = "lstm-serve benchmark stand-in: d2l imports torchvision only for image chapters"
    transforms = types.ModuleType("torchvision.transforms")
    tv.transforms = transforms  # type: ignore[attr-defined]
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.transforms"] = transforms


def load_d2l() -> Any:
    """Import ``d2l.torch`` (with the torchvision stand-in); raise D2LUnavailable if missing."""
    _stub_torchvision()
    try:
        from d2l import torch as d2l
    except ImportError as e:
        raise D2LUnavailable(
            f"d2l not importable ({e}); install it with `make bench` "
            "(pip install -c constraints.txt -e '.[bench]' && pip install --no-deps d2l==1.0.3)"
        ) from None
    return d2l


def place_corpus(corpus: Path, root: Path) -> Path:
    """Put the corpus where ``d2l.TimeMachine(root=...)`` looks, after checking its SHA-1.

    d2l's downloader returns the cached file without any network access when
    ``root/timemachine.txt`` exists with the expected SHA-1; any other content would make it
    try to download, so a mismatch is refused here instead.
    """
    digest = hashlib.sha1(corpus.read_bytes()).hexdigest()
    if digest != CORPUS_SHA1:
        raise D2LUnavailable(
            f"{corpus} has SHA-1 {digest}, not the book's {CORPUS_SHA1}: d2l would download"
        )
    root.mkdir(parents=True, exist_ok=True)
    dst = root / "timemachine.txt"
    if not dst.exists():
        shutil.copyfile(corpus, dst)
    return root


def book_classes(d2l: Any) -> tuple[type, type]:
    """``(LSTMScratch, LSTM)`` exactly as the chapter defines them."""
    import torch
    from torch import nn

    class LSTMScratch(d2l.Module):  # type: ignore[name-defined,misc]
        def __init__(self, num_inputs: int, num_hiddens: int, sigma: float = 0.01) -> None:
            super().__init__()
            self.save_hyperparameters()

            def init_weight(*shape: int) -> nn.Parameter:
                return nn.Parameter(torch.randn(*shape) * sigma)

            def triple() -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
                return (
                    init_weight(num_inputs, num_hiddens),
                    init_weight(num_hiddens, num_hiddens),
                    nn.Parameter(torch.zeros(num_hiddens)),
                )

            self.W_xi, self.W_hi, self.b_i = triple()  # Input gate
            self.W_xf, self.W_hf, self.b_f = triple()  # Forget gate
            self.W_xo, self.W_ho, self.b_o = triple()  # Output gate
            self.W_xc, self.W_hc, self.b_c = triple()  # Input node

        def forward(self, inputs: Any, H_C: Any = None) -> Any:
            if H_C is None:
                # Initial state with shape: (batch_size, num_hiddens)
                H = torch.zeros((inputs.shape[1], self.num_hiddens), device=inputs.device)
                C = torch.zeros((inputs.shape[1], self.num_hiddens), device=inputs.device)
            else:
                H, C = H_C
            outputs = []
            for X in inputs:
                I = torch.sigmoid(  # noqa: E741 - the book's name
                    torch.matmul(X, self.W_xi) + torch.matmul(H, self.W_hi) + self.b_i
                )
                F = torch.sigmoid(
                    torch.matmul(X, self.W_xf) + torch.matmul(H, self.W_hf) + self.b_f
                )
                O = torch.sigmoid(  # noqa: E741 - the book's name
                    torch.matmul(X, self.W_xo) + torch.matmul(H, self.W_ho) + self.b_o
                )
                C_tilde = torch.tanh(
                    torch.matmul(X, self.W_xc) + torch.matmul(H, self.W_hc) + self.b_c
                )
                C = F * C + I * C_tilde
                H = O * torch.tanh(C)
                outputs.append(H)
            return outputs, (H, C)

    class LSTM(d2l.RNN):  # type: ignore[name-defined,misc]
        def __init__(self, num_inputs: int, num_hiddens: int) -> None:
            d2l.Module.__init__(self)
            self.save_hyperparameters()
            self.rnn = nn.LSTM(num_inputs, num_hiddens)

        def forward(self, inputs: Any, H_C: Any = None) -> Any:
            return self.rnn(inputs, H_C)

    return LSTMScratch, LSTM
