"""Build the contract's ONNX graph directly from weights with ``onnx.helper``.

Why not ``torch.onnx.export``: with torch 2.13 the dynamo exporter silently specialises the time
axis of ``nn.LSTM`` to the example's length, and the legacy exporter is deprecated. Building the
graph from the weights gives one graph for both cells (ONNX's native ``LSTM`` operator, no
unrolled loop, T and B dynamic), needs neither exporter, and the parity check against PyTorch
proves the gate mapping.

Graph::

    tokens[T,B] -Gather(table)-> X[T,B,in]
    per layer k: LSTM(X, W_k, R_k, B_k, h0[k:k+1], c0[k:k+1]) -> Y[T,1,B,H], Y_h, Y_c
                 X = Squeeze(Y, 1)
    logits = X @ W_out^T + b_out;  hn = Concat(Y_h_k);  cn = Concat(Y_c_k)

A ``sequence`` model (:func:`build_sequence_model`) is the same graph without the table: the
float features ``[T, B, F]`` are the first layer's input, and the head gives ``outputs``
``[T, B, O]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract.model import (
    INPUT_C0,
    INPUT_FEATURES,
    INPUT_H0,
    INPUT_TOKENS,
    KIND_SEQUENCE,
    OUTPUT_CN,
    OUTPUT_HN,
    OUTPUT_LOGITS,
    OUTPUT_OUTPUTS,
    Scaling,
    make_metadata,
    make_sequence_metadata,
)

OPSET = 17

# PyTorch stores gate blocks as i, f, g, o; ONNX's LSTM wants i, o, f, c (c = PyTorch's g).
_TORCH_TO_ONNX_BLOCKS = (0, 3, 1, 2)


@dataclass(frozen=True)
class NumpyLayer:
    """One layer in ``nn.LSTM`` layout (i, f, g, o blocks).

    w_ih [4H, in], w_hh [4H, H], b_ih and b_hh [4H].
    """

    w_ih: np.ndarray
    w_hh: np.ndarray
    b_ih: np.ndarray
    b_hh: np.ndarray


@dataclass(frozen=True)
class NumpyWeights:
    """Everything the graph needs. ``input_table[V, in]`` is the identity for one-hot input."""

    input_table: np.ndarray
    layers: Sequence[NumpyLayer]
    out_w: np.ndarray  # [V, H]
    out_b: np.ndarray  # [V]

    @property
    def hidden_size(self) -> int:
        return int(self.layers[0].w_hh.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.out_w.shape[0])


def _reorder(blocks: np.ndarray, hidden: int) -> np.ndarray:
    parts = [blocks[k * hidden : (k + 1) * hidden] for k in range(4)]
    return np.concatenate([parts[k] for k in _TORCH_TO_ONNX_BLOCKS], axis=0)


def _lstm_layers(
    layers: Sequence[NumpyLayer],
    H: int,
    x: str,
    nodes: list[onnx.NodeProto],
    inits: list[TensorProto],
) -> tuple[str, list[str], list[str]]:
    """Append one ONNX ``LSTM`` per layer reading ``x``; returns the last layer's output name
    and the names of every layer's final h and c."""
    f32 = np.float32
    ys_h, ys_c = [], []
    for k, layer in enumerate(layers):
        W = _reorder(layer.w_ih, H)[None].astype(f32)
        R = _reorder(layer.w_hh, H)[None].astype(f32)
        B = np.concatenate([_reorder(layer.b_ih, H), _reorder(layer.b_hh, H)])[None].astype(f32)
        inits += [
            numpy_helper.from_array(W, f"W{k}"),
            numpy_helper.from_array(R, f"R{k}"),
            numpy_helper.from_array(B, f"B{k}"),
            numpy_helper.from_array(np.array([k], dtype=np.int64), f"start{k}"),
            numpy_helper.from_array(np.array([k + 1], dtype=np.int64), f"end{k}"),
        ]
        nodes += [
            helper.make_node("Slice", [INPUT_H0, f"start{k}", f"end{k}"], [f"h0_{k}"]),
            helper.make_node("Slice", [INPUT_C0, f"start{k}", f"end{k}"], [f"c0_{k}"]),
            helper.make_node(
                "LSTM",
                [x, f"W{k}", f"R{k}", f"B{k}", "", f"h0_{k}", f"c0_{k}"],
                [f"y{k}", f"yh{k}", f"yc{k}"],
                hidden_size=H,
                direction="forward",
            ),
            helper.make_node("Squeeze", [f"y{k}", "axis1"], [f"x{k + 1}"]),
        ]
        x = f"x{k + 1}"
        ys_h.append(f"yh{k}")
        ys_c.append(f"yc{k}")
    return x, ys_h, ys_c


def _finish(graph: onnx.GraphProto, meta: dict[str, str]) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="lstm-serve",
    )
    # ORT releases of this era accept IR version 10; newer onnx defaults higher.
    model.ir_version = 10
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def build_model(
    weights: NumpyWeights,
    vocab: Sequence[str],
    config: Mapping[str, Any],
    *,
    graph_name: str = "lstm_serve_char_lm",
) -> onnx.ModelProto:
    """Return a checked ModelProto that follows the contract, with metadata from ``config``."""
    H = weights.hidden_size
    L = len(weights.layers)
    V = weights.vocab_size
    f32 = np.float32
    inits: list[TensorProto] = [
        numpy_helper.from_array(weights.input_table.astype(f32), "input_table"),
        numpy_helper.from_array(weights.out_w.T.astype(f32).copy(), "out_w_t"),
        numpy_helper.from_array(weights.out_b.astype(f32), "out_b"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [helper.make_node("Gather", ["input_table", INPUT_TOKENS], ["x0"], axis=0)]
    x, ys_h, ys_c = _lstm_layers(weights.layers, H, "x0", nodes, inits)
    nodes += [
        helper.make_node("MatMul", [x, "out_w_t"], ["proj"]),
        helper.make_node("Add", ["proj", "out_b"], [OUTPUT_LOGITS]),
        helper.make_node("Concat", ys_h, [OUTPUT_HN], axis=0),
        helper.make_node("Concat", ys_c, [OUTPUT_CN], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        graph_name,
        inputs=[
            helper.make_tensor_value_info(INPUT_TOKENS, TensorProto.INT64, ["T", "B"]),
            helper.make_tensor_value_info(INPUT_H0, TensorProto.FLOAT, [L, "B", H]),
            helper.make_tensor_value_info(INPUT_C0, TensorProto.FLOAT, [L, "B", H]),
        ],
        outputs=[
            helper.make_tensor_value_info(OUTPUT_LOGITS, TensorProto.FLOAT, ["T", "B", V]),
            helper.make_tensor_value_info(OUTPUT_HN, TensorProto.FLOAT, [L, "B", H]),
            helper.make_tensor_value_info(OUTPUT_CN, TensorProto.FLOAT, [L, "B", H]),
        ],
        initializer=inits,
    )
    return _finish(graph, make_metadata(vocab, config))


@dataclass(frozen=True)
class SequenceWeights:
    """A sequence model's weights: the layers (the first reads the F features) and the head."""

    layers: Sequence[NumpyLayer]
    out_w: np.ndarray  # [O, H]
    out_b: np.ndarray  # [O]

    @property
    def hidden_size(self) -> int:
        return int(self.layers[0].w_hh.shape[1])

    @property
    def num_features(self) -> int:
        return int(self.layers[0].w_ih.shape[1])

    @property
    def num_outputs(self) -> int:
        return int(self.out_w.shape[0])


def build_sequence_model(
    weights: SequenceWeights,
    config: Mapping[str, Any],
    *,
    graph_name: str = "lstm_serve_sequence",
) -> onnx.ModelProto:
    """A checked ``sequence`` ModelProto, ``features, h0, c0 -> outputs, hn, cn``; ``config``
    is the ``lstm_serve.config`` metadata (checked by the contract before anything is built)."""
    meta = make_sequence_metadata(config)
    H, L = weights.hidden_size, len(weights.layers)
    F, O = weights.num_features, weights.num_outputs  # noqa: E741 - the contract's letters
    f32 = np.float32
    inits: list[TensorProto] = [
        numpy_helper.from_array(weights.out_w.T.astype(f32).copy(), "out_w_t"),
        numpy_helper.from_array(weights.out_b.astype(f32), "out_b"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes: list[onnx.NodeProto] = []
    x, ys_h, ys_c = _lstm_layers(weights.layers, H, INPUT_FEATURES, nodes, inits)
    nodes += [
        helper.make_node("MatMul", [x, "out_w_t"], ["proj"]),
        helper.make_node("Add", ["proj", "out_b"], [OUTPUT_OUTPUTS]),
        helper.make_node("Concat", ys_h, [OUTPUT_HN], axis=0),
        helper.make_node("Concat", ys_c, [OUTPUT_CN], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        graph_name,
        inputs=[
            helper.make_tensor_value_info(INPUT_FEATURES, TensorProto.FLOAT, ["T", "B", F]),
            helper.make_tensor_value_info(INPUT_H0, TensorProto.FLOAT, [L, "B", H]),
            helper.make_tensor_value_info(INPUT_C0, TensorProto.FLOAT, [L, "B", H]),
        ],
        outputs=[
            helper.make_tensor_value_info(OUTPUT_OUTPUTS, TensorProto.FLOAT, ["T", "B", O]),
            helper.make_tensor_value_info(OUTPUT_HN, TensorProto.FLOAT, [L, "B", H]),
            helper.make_tensor_value_info(OUTPUT_CN, TensorProto.FLOAT, [L, "B", H]),
        ],
        initializer=inits,
    )
    return _finish(graph, meta)


def random_sequence_model(
    num_features: int = 3,
    num_outputs: int = 2,
    hidden_size: int = 16,
    num_layers: int = 1,
    *,
    seed: int = 0,
) -> onnx.ModelProto:
    """A small ``sequence`` model with random weights (tests, benchmarks, fixtures)."""
    rng = np.random.default_rng(seed)
    base = random_weights(2, hidden_size, num_layers, seed=seed)
    first = base.layers[0]
    layers = [
        NumpyLayer(
            rng.normal(0, 0.3, (4 * hidden_size, num_features)).astype(np.float32),
            first.w_hh,
            first.b_ih,
            first.b_hh,
        ),
        *base.layers[1:],
    ]
    weights = SequenceWeights(
        layers,
        rng.normal(0, 0.3, (num_outputs, hidden_size)).astype(np.float32),
        rng.normal(0, 0.3, (num_outputs,)).astype(np.float32),
    )
    config = {
        "kind": KIND_SEQUENCE,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "cell": "random",
        "num_features": num_features,
        "num_outputs": num_outputs,
        "feature_names": [f"x{i}" for i in range(num_features)],
        "output_names": [f"y{j}" for j in range(num_outputs)],
        "scaling": Scaling(
            (0.0,) * num_features, (1.0,) * num_features, (0.0,) * num_outputs, (1.0,) * num_outputs
        ).to_dict(),
    }
    return build_sequence_model(weights, config)


def random_weights(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    *,
    seed: int = 0,
    embedding_dim: int | None = None,
    scale: float = 0.3,
) -> NumpyWeights:
    """Random weights for tests and benchmarks that need a model but not a trained one."""
    rng = np.random.default_rng(seed)
    in0 = embedding_dim or vocab_size
    table = (
        np.eye(vocab_size, dtype=np.float32)
        if embedding_dim is None
        else rng.normal(0, 1, (vocab_size, embedding_dim)).astype(np.float32)
    )
    layers = []
    for k in range(num_layers):
        n_in = in0 if k == 0 else hidden_size
        layers.append(
            NumpyLayer(
                rng.normal(0, scale, (4 * hidden_size, n_in)).astype(np.float32),
                rng.normal(0, scale, (4 * hidden_size, hidden_size)).astype(np.float32),
                rng.normal(0, scale, (4 * hidden_size,)).astype(np.float32),
                rng.normal(0, scale, (4 * hidden_size,)).astype(np.float32),
            )
        )
    return NumpyWeights(
        input_table=table,
        layers=layers,
        out_w=rng.normal(0, scale, (vocab_size, hidden_size)).astype(np.float32),
        out_b=rng.normal(0, scale, (vocab_size,)).astype(np.float32),
    )


def random_model(
    vocab: Sequence[str] | None = None,
    hidden_size: int = 16,
    num_layers: int = 1,
    *,
    seed: int = 0,
    unk_id: int = 0,
    preprocess: str = "d2l_letters_lower",
) -> onnx.ModelProto:
    """A small contract-following model with random weights (tests, benchmarks, fixtures)."""
    if vocab is None:
        vocab = ["<unk>", " ", *"abcdefghijklmnopqrstuvwxyz"]
    w = random_weights(len(vocab), hidden_size, num_layers, seed=seed)
    config = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "vocab_size": len(vocab),
        "cell": "random",
        "preprocess": preprocess,
        "unk_id": unk_id,
        "input_mode": "onehot",
    }
    return build_model(w, vocab, config)
