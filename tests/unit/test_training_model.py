"""The scratch cell (the book's gate-by-gate LSTM) against ``nn.LSTM`` given the same weights.

Reference: PyTorch's own ``nn.LSTM``. Tolerance: 1e-5 absolute on outputs, final states and
gradients (float32; observed differences are ~1e-7). Fresh random weights and inputs per run,
scaled so the gates are far from their linear region and from each other.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from training.model import (
    CharLSTM,
    ModelConfig,
    ScratchLSTM,
    load_lstm_layer_weights,
    lstm_layer_weights,
)

TOL = 1e-5
V = 28


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _pair(layers: int, hidden: int, input_mode: str, seed: int) -> tuple[CharLSTM, CharLSTM]:
    """A torch-cell model with random weights and a scratch model given the same weights."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(vocab_size=V, hidden_size=hidden, num_layers=layers, input_mode=input_mode)
    ref = CharLSTM(ModelConfig(cell="torch", embedding_dim=12, **kw))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    scratch = CharLSTM(ModelConfig(cell="scratch", embedding_dim=12, **kw))  # type: ignore[arg-type]
    load_lstm_layer_weights(scratch, lstm_layer_weights(ref))
    with torch.no_grad():
        scratch.output.load_state_dict(ref.output.state_dict())
        if ref.embedding is not None:
            assert scratch.embedding is not None
            scratch.embedding.load_state_dict(ref.embedding.state_dict())
    return ref, scratch


def _random_state(layers: int, batch: int, hidden: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(layers, batch, hidden, generator=g),
        torch.randn(layers, batch, hidden, generator=g),
    )


CASES = [
    # (T, B, layers, hidden, input_mode)
    (1, 1, 1, 8, "onehot"),
    (7, 3, 1, 16, "onehot"),
    (35, 4, 2, 24, "onehot"),
    (20, 16, 3, 12, "embedding"),
    (50, 2, 2, 32, "embedding"),
]


@pytest.mark.parametrize(("T", "B", "layers", "hidden", "mode"), CASES)
def test_scratch_equals_nn_lstm_outputs_and_state(
    T: int, B: int, layers: int, hidden: int, mode: str
) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh each run, printed on failure
    ref, scratch = _pair(layers, hidden, mode, seed)
    tokens = torch.randint(0, V, (T, B))
    state = _random_state(layers, B, hidden, seed + 1)
    y_ref, (h_ref, c_ref) = ref(tokens, state)
    y_s, (h_s, c_s) = scratch(tokens, state)
    assert y_ref.shape == y_s.shape == (T, B, V)
    assert h_s.shape == c_s.shape == (layers, B, hidden)
    for name, a, b in (("logits", y_ref, y_s), ("h", h_ref, h_s), ("c", c_ref, c_s)):
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"{name}: max abs diff {diff:.2e} (seed {seed})"
    # The check must be able to fail: the state really matters at these weight scales.
    y_zero, _ = scratch(tokens, None)
    assert (y_zero - y_s).abs().max().item() > 1e-3


@pytest.mark.parametrize(("layers", "mode"), [(1, "onehot"), (2, "embedding")])
def test_scratch_equals_nn_lstm_gradients(layers: int, mode: str) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    hidden, T, B = 16, 12, 5
    ref, scratch = _pair(layers, hidden, mode, seed)
    tokens = torch.randint(0, V, (T, B))
    target = torch.randint(0, V, (T, B))
    for m in (ref, scratch):
        logits, _ = m(tokens, None)
        F.cross_entropy(logits.reshape(-1, V), target.reshape(-1)).backward()
    assert isinstance(scratch.rnn, ScratchLSTM)
    for k, layer in enumerate(scratch.rnn.layers):
        H = hidden
        w_ih = getattr(ref.rnn, f"weight_ih_l{k}").grad
        w_hh = getattr(ref.rnn, f"weight_hh_l{k}").grad
        b_ih = getattr(ref.rnn, f"bias_ih_l{k}").grad
        # PyTorch's gate blocks are i, f, g(=C~), o; the book's parameters are per gate.
        for gate, blk in (("i", 0), ("f", 1), ("c", 2), ("o", 3)):
            rows = slice(blk * H, (blk + 1) * H)
            pairs = (
                (getattr(layer, f"W_x{gate}").grad, w_ih[rows].T),
                (getattr(layer, f"W_h{gate}").grad, w_hh[rows].T),
                (getattr(layer, f"b_{gate}").grad, b_ih[rows]),
            )
            for got, want in pairs:
                diff = (got - want).abs().max().item()
                assert diff <= TOL, f"layer {k} gate {gate}: grad diff {diff:.2e} (seed {seed})"
    diff = (scratch.output.weight.grad - ref.output.weight.grad).abs().max().item()
    assert diff <= TOL


def test_weights_round_trip_scratch_to_torch() -> None:
    """The other direction: a scratch model's weights exported to nn.LSTM layout and back."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    cfg = dict(vocab_size=V, hidden_size=20, num_layers=2)
    scratch = CharLSTM(ModelConfig(cell="scratch", **cfg))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in scratch.parameters():
            p.normal_(0.0, 0.4)
    ref = CharLSTM(ModelConfig(cell="torch", **cfg))  # type: ignore[arg-type]
    load_lstm_layer_weights(ref, lstm_layer_weights(scratch))
    ref.output.load_state_dict(scratch.output.state_dict())
    tokens = torch.randint(0, V, (9, 4))
    (y1, (h1, c1)), (y2, (h2, c2)) = scratch(tokens), ref(tokens)
    assert (y1 - y2).abs().max().item() <= TOL
    assert (h1 - h2).abs().max().item() <= TOL and (c1 - c2).abs().max().item() <= TOL


def test_forward_contract_shapes_and_state_continuation() -> None:
    """forward(tokens[T,B], state) runs time-major; two halves with carried state == one pass."""
    for cell in ("scratch", "torch"):
        m = CharLSTM(ModelConfig(vocab_size=V, hidden_size=10, num_layers=2, cell=cell))  # type: ignore[arg-type]
        tokens = torch.randint(0, V, (14, 3))
        y, (h, c) = m(tokens)
        assert y.shape == (14, 3, V) and h.shape == c.shape == (2, 3, 10)
        y1, s1 = m(tokens[:6])
        y2, (h2, c2) = m(tokens[6:], s1)
        assert torch.allclose(torch.cat([y1, y2]), y, atol=1e-6)
        assert torch.allclose(h2, h, atol=1e-6) and torch.allclose(c2, c, atol=1e-6)


@pytest.mark.parametrize("cell", ["scratch", "torch"])
def test_dropout_is_training_only(cell: str) -> None:
    """Dropout changes training passes but not eval ones: export and parity are unaffected."""
    cfg = ModelConfig(vocab_size=V, hidden_size=16, num_layers=2, cell=cell, dropout=0.5)  # type: ignore[arg-type]
    m = CharLSTM(cfg)
    plain = CharLSTM(replace(cfg, dropout=0.0))
    plain.load_state_dict(m.state_dict())  # same parameters: dropout adds none
    tokens = torch.randint(0, V, (6, 3))
    m.train()
    assert not torch.equal(m(tokens)[0], m(tokens)[0])
    m.eval()
    assert torch.equal(m(tokens)[0], plain.eval()(tokens)[0])
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(vocab_size=V, dropout=1.0)
