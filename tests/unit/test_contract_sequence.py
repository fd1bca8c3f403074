"""contract.model for the ``sequence`` kind: validate accepts sequence models when asked for
them, refuses them where a token model is needed, and names what is wrong with a bent one.

Bent models are built here with onnx.helper: features -> MatMul -> outputs, Identity for the
states, with inputs, outputs, types and metadata bent one way per test.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from contract.model import (
    KIND_SEQUENCE,
    ContractError,
    ModelSpec,
    Scaling,
    SequenceSpec,
    make_sequence_metadata,
    model_kind,
    parse_metadata,
    validate,
)
from export.graph import random_model, random_sequence_model

F, O, L, H = 3, 2, 2, 4  # noqa: E741 - the contract's letters


def _config(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "kind": "sequence",
        "num_layers": L,
        "hidden_size": H,
        "cell": "torch",
        "num_features": F,
        "num_outputs": O,
        "feature_names": ["a", "b", "c"],
        "output_names": ["a_next", "b_next"],
        "scaling": Scaling((1.0, 2.0, 3.0), (0.5, 1.0, 2.0), (1.0, 2.0), (0.5, 1.0)).to_dict(),
    }
    cfg.update(over)
    return cfg


def make_model(
    *,
    features_name: str = "features",
    features_type: int = TensorProto.FLOAT,
    features_shape: list[Any] | None = None,
    outputs_name: str = "outputs",
    outputs_o: int = O,
    config: dict[str, Any] | None = None,
    meta: dict[str, str] | None = None,
) -> bytes:
    fshape = features_shape if features_shape is not None else ["T", "B", F]
    rows = fshape[-1] if isinstance(fshape[-1], int) else F
    w = np.ones((rows, outputs_o), np.float32)
    nodes = []
    x = features_name
    if features_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [features_name], ["f32"], to=TensorProto.FLOAT))
        x = "f32"
    nodes += [
        helper.make_node("MatMul", [x, "w"], [outputs_name]),
        helper.make_node("Identity", ["h0"], ["hn"]),
        helper.make_node("Identity", ["c0"], ["cn"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bent_sequence",
        inputs=[
            helper.make_tensor_value_info(features_name, features_type, fshape),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [L, "B", H]),
            helper.make_tensor_value_info("c0", TensorProto.FLOAT, [L, "B", H]),
        ],
        outputs=[
            helper.make_tensor_value_info(outputs_name, TensorProto.FLOAT, ["T", "B", outputs_o]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, [L, "B", H]),
            helper.make_tensor_value_info("cn", TensorProto.FLOAT, [L, "B", H]),
        ],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    if meta is None:
        meta = {"lstm_serve.config": json.dumps(config if config is not None else _config())}
    helper.set_model_props(model, meta)
    return model.SerializeToString()


def test_accepts_a_sequence_model_when_asked_for_it() -> None:
    data = make_model()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for kind in ("sequence", None):
        for source in (data, sess):
            spec = validate(source, kind=kind)  # type: ignore[call-overload]
            assert isinstance(spec, SequenceSpec)
            assert spec.kind == KIND_SEQUENCE
            assert (spec.num_layers, spec.hidden_size) == (L, H)
            assert (spec.num_features, spec.num_outputs) == (F, O)
            assert spec.feature_names == ("a", "b", "c")
            assert spec.output_names == ("a_next", "b_next")
            assert spec.state_bytes_per_session == 2 * L * H * 4


def test_the_graph_builders_sequence_model_validates_and_runs() -> None:
    data = random_sequence_model(num_features=5, num_outputs=3, hidden_size=8, num_layers=2)
    spec = validate(data.SerializeToString(), kind="sequence")
    assert (spec.num_features, spec.num_outputs, spec.num_layers, spec.hidden_size) == (5, 3, 2, 8)
    sess = ort.InferenceSession(data.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng()
    for T, B in ((1, 1), (7, 3), (20, 16)):
        h = np.zeros((2, B, 8), np.float32)
        out, hn, cn = sess.run(
            None, {"features": rng.standard_normal((T, B, 5), np.float32), "h0": h, "c0": h}
        )
        assert out.shape == (T, B, 3) and hn.shape == cn.shape == (2, B, 8)


def test_kinds_are_refused_where_the_other_is_needed() -> None:
    with pytest.raises(
        ContractError, match=r"model kind is 'sequence'.*'token_lm' model is needed"
    ):
        validate(make_model())
    token = random_model(hidden_size=8).SerializeToString()
    with pytest.raises(
        ContractError, match=r"model kind is 'token_lm'.*'sequence' model is needed"
    ):
        validate(token, kind="sequence")
    assert isinstance(validate(token, kind=None), ModelSpec)
    with pytest.raises(ContractError, match=r"kind is 'sequence', not 'token_lm'"):
        parse_metadata({"lstm_serve.config": json.dumps(_config())})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"features_name": "x"},
            r"no input named 'features' \(it has \['c0', 'h0', 'x'\]\).*for a 'sequence' model",
        ),
        ({"outputs_name": "y"}, r"no output named 'outputs'.*for a 'sequence' model"),
        (
            {"features_type": TensorProto.DOUBLE},
            r"input 'features' has type tensor\(double\), expected tensor\(float\)",
        ),
        ({"features_shape": ["T", F]}, r"input 'features' has rank 2, expected 3"),
        ({"features_shape": ["T", "B", F + 1]}, r"'features' axis 2 \(features\) is 4, metadata"),
        ({"outputs_o": O + 1}, r"'outputs' axis 2 \(outputs\) is 3, metadata says 2"),
    ],
)
def test_rejects_bent_sequence_interfaces(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ContractError, match=message):
        validate(make_model(**kwargs), kind=None)


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in _config().items() if k != key}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_without("feature_names"), r"missing required keys for a 'sequence' model: \['feature"),
        (_without("scaling"), r"missing required keys for a 'sequence' model: \['scaling'\]"),
        (_config(kind="images"), r"model kind 'images', which this build does not know"),
        (_config(num_features="3"), r"num_features must be an integer, got '3'"),
        (_config(num_outputs=0), r"num_outputs must be >= 1, got 0"),
        (_config(feature_names=["a", "b"]), r"num_features=3 but feature_names has 2 names"),
        (_config(output_names=["y", "y"]), r"output_names has duplicates"),
        (_config(feature_names="abc"), r"feature_names must be a JSON array"),
        (_config(scaling={"features": {}}), r"scaling.features.mean must be a list of 3 numbers"),
        (
            _config(scaling=Scaling((0.0,) * 3, (1.0, 0.0, 1.0), (0.0,) * 2, (1.0,) * 2).to_dict()),
            r"scaling.features.std must be > 0",
        ),
        (
            _config(scaling=Scaling((0.0,) * 3, (1.0,) * 3, (0.0,), (1.0,)).to_dict()),
            r"scaling.outputs.mean must be a list of 2 numbers",
        ),
    ],
)
def test_rejects_bad_sequence_metadata(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ContractError, match=message) as info:
        validate(make_model(config=config), kind=None)
    assert "\n" not in str(info.value)
    if config.get("kind") == "sequence":  # the writer refuses what the reader refuses
        with pytest.raises(ContractError, match=message):
            make_sequence_metadata(config)


def test_a_sequence_model_that_forgot_its_kind_gets_a_hint() -> None:
    with pytest.raises(ContractError, match=r"no input named 'tokens'.*must say \"kind\": \"seq"):
        validate(make_model(config=_without("kind")))


def test_model_kind_defaults_to_token_lm() -> None:
    assert model_kind({}) == "token_lm"
    assert model_kind({"lstm_serve.config": "{not json"}) == "token_lm"
    assert model_kind({"lstm_serve.config": json.dumps({"num_layers": 1})}) == "token_lm"
    assert model_kind({"lstm_serve.config": json.dumps(_config())}) == "sequence"


def test_scaling_round_trip_and_client_helpers() -> None:
    spec = validate(make_model(), kind="sequence")
    s = spec.scaling
    assert Scaling.from_dict(s.to_dict(), F, O) == s
    rng = np.random.default_rng()
    raw = rng.normal(5, 3, (4, 2, F))
    x = spec.scale_features(raw)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, (raw - np.array([1.0, 2.0, 3.0])) / [0.5, 1.0, 2.0], rtol=1e-6)
    y = rng.standard_normal((4, 2, O))
    np.testing.assert_allclose(spec.unscale_outputs(y), y * [0.5, 1.0] + [1.0, 2.0])
