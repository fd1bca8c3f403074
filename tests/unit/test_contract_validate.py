"""contract.model.validate: accepts contract-following files, rejects others by name.

Bad models are built here with onnx.helper: a minimal graph (Gather for logits, Identity for
the states) whose inputs, outputs, types and metadata each test bends in one way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from contract.model import ContractError, ModelSpec, validate
from export.graph import random_model

VOCAB = ["<unk>", " ", "a", "b", "c"]
L, H = 2, 4


def _config(**over: Any) -> dict[str, Any]:
    cfg = {
        "num_layers": L,
        "hidden_size": H,
        "vocab_size": len(VOCAB),
        "cell": "torch",
        "preprocess": "d2l_letters_lower",
        "unk_id": 0,
    }
    cfg.update(over)
    return cfg


def make_model(
    *,
    tokens_name: str = "tokens",
    tokens_type: int = TensorProto.INT64,
    h0_name: str = "h0",
    state_type: int = TensorProto.FLOAT,
    h_shape: list[Any] | None = None,
    logits_name: str = "logits",
    logits_v: int = len(VOCAB),
    drop_output: str | None = None,
    meta: dict[str, str] | None = None,
) -> bytes:
    """A tiny graph with the contract's interface (or a bent version of it)."""
    V = len(VOCAB)
    h_shape = h_shape if h_shape is not None else [L, "B", H]
    table = np.arange(V * logits_v, dtype=np.float32).reshape(V, logits_v)
    nodes = []
    tok = tokens_name
    if tokens_type != TensorProto.INT64:
        nodes.append(helper.make_node("Cast", [tokens_name], ["tok64"], to=TensorProto.INT64))
        tok = "tok64"
    nodes += [
        helper.make_node("Gather", ["table", tok], [logits_name], axis=0),
        helper.make_node("Identity", [h0_name], ["hn"]),
        helper.make_node("Identity", ["c0"], ["cn"]),
    ]
    outputs = [
        helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, ["T", "B", logits_v]),
        helper.make_tensor_value_info("hn", state_type, h_shape),
        helper.make_tensor_value_info("cn", TensorProto.FLOAT, [L, "B", H]),
    ]
    outputs = [o for o in outputs if o.name != drop_output]
    graph = helper.make_graph(
        nodes,
        "bent",
        inputs=[
            helper.make_tensor_value_info(tokens_name, tokens_type, ["T", "B"]),
            helper.make_tensor_value_info(h0_name, state_type, h_shape),
            helper.make_tensor_value_info("c0", TensorProto.FLOAT, [L, "B", H]),
        ],
        outputs=outputs,
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    if meta is None:
        meta = {"lstm_serve.vocab": json.dumps(VOCAB), "lstm_serve.config": json.dumps(_config())}
    helper.set_model_props(model, meta)
    return model.SerializeToString()


def _meta(**over: Any) -> dict[str, str]:
    return {"lstm_serve.vocab": json.dumps(VOCAB), "lstm_serve.config": json.dumps(_config(**over))}


def test_accepts_a_good_model_as_bytes_path_and_session(tmp_path: Path) -> None:
    data = make_model()
    path = tmp_path / "good.onnx"
    path.write_bytes(data)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for source in (data, path, str(path), sess):
        spec = validate(source)
        assert isinstance(spec, ModelSpec)
        assert (spec.num_layers, spec.hidden_size, spec.vocab_size) == (L, H, len(VOCAB))
        assert spec.vocab == tuple(VOCAB)
        assert spec.unk_id == 0 and spec.cell == "torch"
        assert spec.encode("A-b c!") == [2, 1, 3, 1, 4, 1]


def test_accepts_the_graph_builders_model() -> None:
    spec = validate(random_model(hidden_size=8, num_layers=2).SerializeToString())
    assert (spec.num_layers, spec.hidden_size) == (2, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokens_name": "ids"}, r"no input named 'tokens'.*it has \['c0', 'h0', 'ids'\]"),
        ({"h0_name": "state"}, r"no input named 'h0'"),
        ({"logits_name": "scores"}, r"no output named 'logits'"),
        ({"drop_output": "cn"}, r"no output named 'cn'"),
        ({"tokens_type": TensorProto.INT32}, r"input 'tokens' has type tensor\(int32\)"),
        ({"state_type": TensorProto.DOUBLE}, r"input 'h0' has type tensor\(double\)"),
        ({"h_shape": ["B", H]}, r"input 'h0' has rank 2, expected 3"),
        ({"h_shape": [L, "B", H + 1]}, r"'h0' axis 2 \(hidden\) is 5, metadata says 4"),
        ({"h_shape": [L + 1, "B", H]}, r"'h0' axis 0 \(layers\) is 3, metadata says 2"),
        ({"logits_v": len(VOCAB) + 2}, r"'logits' axis 2 \(vocab\) is 7, metadata says 5"),
    ],
)
def test_rejects_bent_interfaces(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ContractError, match=message):
        validate(make_model(**kwargs))


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({}, r"no 'lstm_serve.vocab' entry \(is this an lstm-serve model\?\)"),
        ({"lstm_serve.vocab": json.dumps(VOCAB)}, r"no 'lstm_serve.config' entry"),
        (
            {"lstm_serve.vocab": "[not json", "lstm_serve.config": json.dumps(_config())},
            r"lstm_serve.vocab is not valid JSON",
        ),
        (
            {"lstm_serve.vocab": json.dumps({"a": 1}), "lstm_serve.config": json.dumps(_config())},
            r"must be a non-empty JSON array of strings",
        ),
        (
            {"lstm_serve.vocab": json.dumps(VOCAB), "lstm_serve.config": "{oops"},
            r"lstm_serve.config is not valid JSON",
        ),
        (
            {"lstm_serve.vocab": json.dumps(VOCAB), "lstm_serve.config": "[1, 2]"},
            r"must be a JSON object",
        ),
        (
            {
                "lstm_serve.vocab": json.dumps(VOCAB),
                "lstm_serve.config": json.dumps(
                    {k: v for k, v in _config().items() if k != "unk_id"}
                ),
            },
            r"missing required keys: \['unk_id'\]",
        ),
        (_meta(vocab_size=9), r"vocab_size=9 but lstm_serve.vocab has 5 tokens"),
        (_meta(unk_id=5), r"unk_id=5 is outside the vocabulary of 5"),
        (_meta(hidden_size="four"), r"non-integer size"),
        (_meta(num_layers=0), r"num_layers and hidden_size must be >= 1"),
        (_meta(preprocess="stem_words"), r"unknown preprocess rule 'stem_words'"),
    ],
)
def test_rejects_missing_or_invalid_metadata(meta: dict[str, str], message: str) -> None:
    with pytest.raises(ContractError, match=message):
        validate(make_model(meta=meta))


def test_rejects_missing_and_unloadable_files(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="model file not found"):
        validate(tmp_path / "absent.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not protobuf")
    with pytest.raises(ContractError, match="not a loadable ONNX model"):
        validate(junk)
    with pytest.raises(ContractError, match="not a loadable ONNX model"):
        validate(make_model()[:50])


def test_error_messages_are_one_line() -> None:
    for kwargs in ({"tokens_name": "ids"}, {"meta": {}}, {"tokens_type": TensorProto.INT32}):
        with pytest.raises(ContractError) as info:
            validate(make_model(**kwargs))  # type: ignore[arg-type]
        assert "\n" not in str(info.value)


def test_the_bent_models_differ_from_good_only_where_intended() -> None:
    # Guards the tests above: the baseline built by make_model loads and is valid ONNX.
    onnx.checker.check_model(onnx.load_from_string(make_model()), full_check=True)
