"""Character-level LSTM language models, as in d2l's "Long Short-Term Memory" chapter, and the
same cells as a sequence model (a forecaster) over real-valued features.

Both cells sit behind one interface::

    CharLSTM:     forward(tokens[T, B], state)      -> (logits[T, B, V],  (h[L, B, H], c[L, B, H]))
    SequenceLSTM: forward(features[T, B, F], state) -> (outputs[T, B, O], (h[L, B, H], c[L, B, H]))

time-major, with the recurrent state always shaped ``(layers, batch, hidden)`` so that either
cell exports to the same ONNX graph (see :func:`lstm_layer_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

State = tuple[torch.Tensor, torch.Tensor]
Cell = Literal["scratch", "torch"]
InputMode = Literal["onehot", "embedding"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint as ``model_config``."""

    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 1
    cell: Cell = "scratch"
    input_mode: InputMode = "onehot"  # the book feeds one-hot vectors
    embedding_dim: int = 32  # used only when input_mode == "embedding"
    # Training-time regularisation only (between layers and before the projection); a no-op in
    # eval mode, so it changes neither the weights' layout nor the exported graph.
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {self.hidden_size}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.cell not in ("scratch", "torch"):
            raise ValueError(f"cell must be 'scratch' or 'torch', got {self.cell!r}")
        if self.input_mode not in ("onehot", "embedding"):
            raise ValueError(f"input_mode must be 'onehot' or 'embedding', got {self.input_mode!r}")
        if self.input_mode == "embedding" and self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def input_size(self) -> int:
        return self.vocab_size if self.input_mode == "onehot" else self.embedding_dim


class ScratchLSTMLayer(nn.Module):
    """One layer of the gated memory cell, written gate by gate as in the book.

    For input ``X_t`` and previous hidden state ``H_{t-1}``::

        I_t  = sigmoid(X_t W_xi + H_{t-1} W_hi + b_i)     input gate
        F_t  = sigmoid(X_t W_xf + H_{t-1} W_hf + b_f)     forget gate
        O_t  = sigmoid(X_t W_xo + H_{t-1} W_ho + b_o)     output gate
        C~_t = tanh(X_t W_xc + H_{t-1} W_hc + b_c)        candidate memory cell
        C_t  = F_t ⊙ C_{t-1} + I_t ⊙ C~_t
        H_t  = O_t ⊙ tanh(C_t)

    The parameters are kept per gate, like the book's ``W_xi, W_hi, b_i`` …; the forward pass
    concatenates them once so each time step costs one matrix product instead of eight.
    """

    def __init__(self, input_size: int, hidden_size: int, sigma: float = 0.01) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size

        def three() -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
            return (
                nn.Parameter(torch.randn(input_size, hidden_size) * sigma),
                nn.Parameter(torch.randn(hidden_size, hidden_size) * sigma),
                nn.Parameter(torch.zeros(hidden_size)),
            )

        self.W_xi, self.W_hi, self.b_i = three()  # input gate
        self.W_xf, self.W_hf, self.b_f = three()  # forget gate
        self.W_xo, self.W_ho, self.b_o = three()  # output gate
        self.W_xc, self.W_hc, self.b_c = three()  # candidate memory cell

    def fused(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate weights side by side in I, F, O, C~ order: ``W_x [in, 4H], W_h [H, 4H], b [4H]``."""
        W_x = torch.cat([self.W_xi, self.W_xf, self.W_xo, self.W_xc], dim=1)
        W_h = torch.cat([self.W_hi, self.W_hf, self.W_ho, self.W_hc], dim=1)
        b = torch.cat([self.b_i, self.b_f, self.b_o, self.b_c])
        return W_x, W_h, b

    def forward(self, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        H, C = state
        W_x, W_h, b = self.fused()
        # The input projection does not depend on the state, so all time steps go in one product.
        XW = torch.addmm(b, X.reshape(-1, self.input_size), W_x).view(*X.shape[:2], -1)
        outputs = []
        for xw in XW:
            gates = xw + H @ W_h
            i, f, o, c_tilde = gates.chunk(4, dim=1)
            I = torch.sigmoid(i)  # noqa: E741 - the book's name for the input gate
            Fg = torch.sigmoid(f)
            O = torch.sigmoid(o)  # noqa: E741 - the book's name for the output gate
            C_tilde = torch.tanh(c_tilde)
            C = Fg * C + I * C_tilde
            H = O * torch.tanh(C)
            outputs.append(H)
        return torch.stack(outputs), (H, C)


class ScratchLSTM(nn.Module):
    """Stacked scratch layers with the same call shape as ``nn.LSTM`` (time-major)."""

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.dropout = dropout  # on each layer's output except the last, like nn.LSTM's
        self.layers = nn.ModuleList(
            ScratchLSTMLayer(input_size if i == 0 else hidden_size, hidden_size)
            for i in range(num_layers)
        )

    def forward(self, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        h0, c0 = state
        hs, cs = [], []
        for layer_idx, layer in enumerate(self.layers):
            if layer_idx > 0 and self.dropout > 0:
                X = F.dropout(X, self.dropout, self.training)
            X, (h, c) = layer(X, (h0[layer_idx], c0[layer_idx]))
            hs.append(h)
            cs.append(c)
        return X, (torch.stack(hs), torch.stack(cs))


def make_rnn(
    cell: Cell, input_size: int, hidden_size: int, num_layers: int, dropout: float
) -> nn.Module:
    """The stacked LSTM of either cell, time-major, ``(X, (h0, c0)) -> (Y, (hn, cn))``."""
    if cell == "scratch":
        return ScratchLSTM(input_size, hidden_size, num_layers, dropout)
    # nn.LSTM warns when given dropout with one layer (it has no layer in between).
    between = dropout if num_layers > 1 else 0.0
    return nn.LSTM(input_size, hidden_size, num_layers, dropout=between)


class CharLSTM(nn.Module):
    """Input encoding (one-hot or embedding) -> LSTM cell -> projection to the vocabulary."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = (
            nn.Embedding(config.vocab_size, config.embedding_dim)
            if config.input_mode == "embedding"
            else None
        )
        p = config.dropout
        self.rnn = make_rnn(
            config.cell, config.input_size, config.hidden_size, config.num_layers, p
        )
        self.drop = nn.Dropout(p)
        self.output = nn.Linear(config.hidden_size, config.vocab_size)

    def encode_input(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            return self.embedding(tokens)
        return F.one_hot(tokens, self.config.vocab_size).to(self.output.weight.dtype)

    def begin_state(self, batch_size: int, device: torch.device | None = None) -> State:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        dtype = self.output.weight.dtype
        device = device or self.output.weight.device
        return (
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )

    def forward(
        self, tokens: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.begin_state(tokens.shape[1], tokens.device)
        Y, state = self.rnn(self.encode_input(tokens), state)
        return self.output(self.drop(Y)), state


@dataclass(frozen=True)
class SequenceConfig:
    """A sequence model (``kind`` "sequence"): F real-valued features in, O outputs out.

    Stored in a sequence checkpoint as ``model_config``.
    """

    num_features: int
    num_outputs: int
    hidden_size: int = 32
    num_layers: int = 1
    cell: Cell = "scratch"
    dropout: float = 0.0  # training-time only, as in ModelConfig

    def __post_init__(self) -> None:
        for name in ("num_features", "num_outputs", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cell not in ("scratch", "torch"):
            raise ValueError(f"cell must be 'scratch' or 'torch', got {self.cell!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class SequenceLSTM(nn.Module):
    """Features -> LSTM cell -> linear head to O outputs (e.g. the next value of a series).

    The features go straight into the cell: its input weights already are a learned linear
    projection of them, and a separate projection in front would multiply into those weights
    (one linear map) and add parameters without adding anything the model can express.
    """

    def __init__(self, config: SequenceConfig) -> None:
        super().__init__()
        self.config = config
        p = config.dropout
        self.rnn = make_rnn(
            config.cell, config.num_features, config.hidden_size, config.num_layers, p
        )
        self.drop = nn.Dropout(p)
        self.output = nn.Linear(config.hidden_size, config.num_outputs)

    def begin_state(self, batch_size: int, device: torch.device | None = None) -> State:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        dtype = self.output.weight.dtype
        device = device or self.output.weight.device
        return (
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )

    def forward(
        self, features: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.begin_state(features.shape[1], features.device)
        Y, state = self.rnn(features.to(self.output.weight.dtype), state)
        return self.output(self.drop(Y)), state


@dataclass(frozen=True)
class LayerWeights:
    """One LSTM layer in ``nn.LSTM``'s layout: gate blocks in PyTorch's i, f, g, o order.

    ``w_ih [4H, in]``, ``w_hh [4H, H]``, ``b_ih [4H]``, ``b_hh [4H]`` (g is the candidate C~).
    """

    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: torch.Tensor
    b_hh: torch.Tensor


def lstm_layer_weights(model: CharLSTM | SequenceLSTM) -> list[LayerWeights]:
    """Either cell's weights in one layout, so export builds one graph for both."""
    out: list[LayerWeights] = []
    with torch.no_grad():
        if isinstance(model.rnn, nn.LSTM):
            for k in range(model.config.num_layers):
                out.append(
                    LayerWeights(
                        getattr(model.rnn, f"weight_ih_l{k}").detach().clone(),
                        getattr(model.rnn, f"weight_hh_l{k}").detach().clone(),
                        getattr(model.rnn, f"bias_ih_l{k}").detach().clone(),
                        getattr(model.rnn, f"bias_hh_l{k}").detach().clone(),
                    )
                )
            return out
        assert isinstance(model.rnn, ScratchLSTM)
        for layer in model.rnn.layers:
            assert isinstance(layer, ScratchLSTMLayer)
            # Reorder the book's I, F, O, C~ blocks into PyTorch's i, f, g(=C~), o.
            w_x = torch.cat([layer.W_xi, layer.W_xf, layer.W_xc, layer.W_xo], dim=1)
            w_h = torch.cat([layer.W_hi, layer.W_hf, layer.W_hc, layer.W_ho], dim=1)
            b = torch.cat([layer.b_i, layer.b_f, layer.b_c, layer.b_o])
            out.append(LayerWeights(w_x.T.clone(), w_h.T.clone(), b.clone(), torch.zeros_like(b)))
    return out


def load_lstm_layer_weights(model: CharLSTM | SequenceLSTM, layers: list[LayerWeights]) -> None:
    """Inverse of :func:`lstm_layer_weights`: copy ``nn.LSTM``-layout weights into either cell.

    For the scratch cell the two biases are summed, since the book's cell has one per gate.
    """
    if len(layers) != model.config.num_layers:
        raise ValueError(f"expected {model.config.num_layers} layers, got {len(layers)}")
    with torch.no_grad():
        if isinstance(model.rnn, nn.LSTM):
            for k, lw in enumerate(layers):
                getattr(model.rnn, f"weight_ih_l{k}").copy_(lw.w_ih)
                getattr(model.rnn, f"weight_hh_l{k}").copy_(lw.w_hh)
                getattr(model.rnn, f"bias_ih_l{k}").copy_(lw.b_ih)
                getattr(model.rnn, f"bias_hh_l{k}").copy_(lw.b_hh)
            return
        assert isinstance(model.rnn, ScratchLSTM)
        for layer, lw in zip(model.rnn.layers, layers, strict=True):
            assert isinstance(layer, ScratchLSTMLayer)
            H = layer.hidden_size
            b = lw.b_ih + lw.b_hh
            for gate, blk in (("i", 0), ("f", 1), ("c", 2), ("o", 3)):
                rows = slice(blk * H, (blk + 1) * H)
                getattr(layer, f"W_x{gate}").copy_(lw.w_ih[rows].T)
                getattr(layer, f"W_h{gate}").copy_(lw.w_hh[rows].T)
                getattr(layer, f"b_{gate}").copy_(b[rows])
