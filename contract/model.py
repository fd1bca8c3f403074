"""The ONNX contract between export and server: names, metadata, validation, state size.

Torch-free and onnx-free on purpose: the server imports this module, and the server's runtime
has neither. Export writes models with these names and keys; the server reads them back with
:func:`validate`, which also tells a model author exactly what is wrong with a file.

Contract (fixed; clients and outside checks rely on it):

* inputs: ``tokens`` int64 ``[T, B]``, ``h0`` and ``c0`` float32 ``[L, B, H]``
* outputs: ``logits`` float32 ``[T, B, V]``, ``hn`` and ``cn`` float32 ``[L, B, H]``
* T and B dynamic; L, H, V fixed by the model
* ``metadata_props``: ``lstm_serve.vocab`` (JSON array of token strings, index = token id) and
  ``lstm_serve.config`` (JSON object with at least :data:`REQUIRED_CONFIG_KEYS`)

That is the ``token_lm`` kind, and a model whose config names no ``kind`` is one. The second
kind, ``sequence`` (``"kind": "sequence"`` in ``lstm_serve.config``), maps real-valued features
to real-valued outputs with the same explicit state:

* inputs: ``features`` float32 ``[T, B, F]``, ``h0`` and ``c0`` float32 ``[L, B, H]``
* outputs: ``outputs`` float32 ``[T, B, O]``, ``hn`` and ``cn`` float32 ``[L, B, H]``
* T and B dynamic; L, H, F, O fixed by the model
* ``metadata_props``: ``lstm_serve.config`` only, with at least
  :data:`SEQUENCE_REQUIRED_CONFIG_KEYS`: the sizes, the names of the F features and O outputs,
  and the standardisation the model was trained with (:class:`Scaling`), so a client knows what
  to send and how to read what comes back.

:func:`validate` returns a :class:`ModelSpec` for ``token_lm`` models and refuses other kinds
unless asked for them (``kind=None`` accepts any and may return a :class:`SequenceSpec`): a
caller that can only run token models gets a clear refusal, not a model it would misuse.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, overload

from .errors import ContractError
from .text import PREPROCESS_RULES, preprocess

INPUT_TOKENS = "tokens"
INPUT_H0 = "h0"
INPUT_C0 = "c0"
OUTPUT_LOGITS = "logits"
OUTPUT_HN = "hn"
OUTPUT_CN = "cn"
INPUT_NAMES = (INPUT_TOKENS, INPUT_H0, INPUT_C0)
OUTPUT_NAMES = (OUTPUT_LOGITS, OUTPUT_HN, OUTPUT_CN)

META_VOCAB = "lstm_serve.vocab"
META_CONFIG = "lstm_serve.config"
REQUIRED_CONFIG_KEYS = ("num_layers", "hidden_size", "vocab_size", "cell", "preprocess", "unk_id")

# Model kinds (``lstm_serve.config["kind"]``); a config without one is a token_lm.
KIND_KEY = "kind"
KIND_TOKEN_LM: Final = "token_lm"
KIND_SEQUENCE: Final = "sequence"
KINDS = (KIND_TOKEN_LM, KIND_SEQUENCE)

INPUT_FEATURES = "features"
OUTPUT_OUTPUTS = "outputs"
SEQUENCE_INPUT_NAMES = (INPUT_FEATURES, INPUT_H0, INPUT_C0)
SEQUENCE_OUTPUT_NAMES = (OUTPUT_OUTPUTS, OUTPUT_HN, OUTPUT_CN)
SEQUENCE_REQUIRED_CONFIG_KEYS = (
    "kind",
    "num_layers",
    "hidden_size",
    "cell",
    "num_features",
    "num_outputs",
    "feature_names",
    "output_names",
    "scaling",
)

# ONNX Runtime reports element types as these strings.
_ORT_INT64 = "tensor(int64)"
_ORT_FLOAT = "tensor(float)"


def state_bytes(num_layers: int, hidden_size: int) -> int:
    """Raw bytes of one session's recurrent state (h, c): two float32 arrays of ``[L, H]``."""
    return 2 * num_layers * hidden_size * 4


# --- the parsed model description ---------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What the server needs to know about a model, read from its metadata."""

    vocab: tuple[str, ...]
    num_layers: int
    hidden_size: int
    unk_id: int
    preprocess: str
    cell: str
    config: Mapping[str, Any] = field(default_factory=dict)
    kind: str = KIND_TOKEN_LM

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def state_bytes_per_session(self) -> int:
        return state_bytes(self.num_layers, self.hidden_size)

    def normalize(self, text: str) -> str:
        return preprocess(text, self.preprocess)

    def encode(self, text: str, *, normalize: bool = True) -> list[int]:
        """Text to token ids, one per character; unknown characters map to ``unk_id``."""
        if normalize:
            text = self.normalize(text)
        index = self._index
        return [index.get(ch, self.unk_id) for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] if i != self.unk_id else "" for i in ids)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {tok: i for i, tok in enumerate(self.vocab)}


@dataclass(frozen=True)
class Scaling:
    """The standardisation a ``sequence`` model was trained with, per feature and per output.

    The model reads ``(x - feature_mean) / feature_std`` and its outputs are in the same kind of
    units: ``y = output * output_std + output_mean``. Stored in the config as
    ``{"features": {"mean": [F], "std": [F]}, "outputs": {"mean": [O], "std": [O]}}``.
    """

    feature_mean: tuple[float, ...]
    feature_std: tuple[float, ...]
    output_mean: tuple[float, ...]
    output_std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": {"mean": list(self.feature_mean), "std": list(self.feature_std)},
            "outputs": {"mean": list(self.output_mean), "std": list(self.output_std)},
        }

    @classmethod
    def from_dict(cls, d: Any, num_features: int, num_outputs: int) -> Scaling:
        """Parse :meth:`to_dict`'s form; raises :class:`ContractError` naming what is wrong."""
        where = f"{META_CONFIG} scaling"
        if not isinstance(d, dict):
            raise ContractError(
                f"{where} must be an object "
                '{"features": {"mean": [...], "std": [...]}, "outputs": {...}}'
            )
        out: list[tuple[float, ...]] = []
        for part, n in (("features", num_features), ("outputs", num_outputs)):
            sub = d.get(part)
            if not isinstance(sub, dict):
                raise ContractError(f"{where} has no {part!r} object with 'mean' and 'std'")
            for stat in ("mean", "std"):
                vals = sub.get(stat)
                if not isinstance(vals, list) or len(vals) != n:
                    raise ContractError(
                        f"{where}.{part}.{stat} must be a list of {n} numbers "
                        f"(one per {part[:-1]}), got {vals!r}"
                    )
                try:
                    nums = tuple(float(v) for v in vals)
                except (TypeError, ValueError):
                    raise ContractError(f"{where}.{part}.{stat} has a non-number: {vals}") from None
                if not all(math.isfinite(v) for v in nums):
                    raise ContractError(f"{where}.{part}.{stat} must be finite, got {vals}")
                if stat == "std" and not all(v > 0 for v in nums):
                    raise ContractError(f"{where}.{part}.std must be > 0, got {vals}")
                out.append(nums)
        return cls(*out)


@dataclass(frozen=True)
class SequenceSpec:
    """What a server needs to know about a ``sequence`` model, read from its metadata."""

    num_layers: int
    hidden_size: int
    cell: str
    feature_names: tuple[str, ...]
    output_names: tuple[str, ...]
    scaling: Scaling
    config: Mapping[str, Any] = field(default_factory=dict)
    kind: str = KIND_SEQUENCE

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @property
    def num_outputs(self) -> int:
        return len(self.output_names)

    @property
    def state_bytes_per_session(self) -> int:
        return state_bytes(self.num_layers, self.hidden_size)

    def scale_features(self, x: Any) -> Any:
        """Raw feature values ``[..., F]`` (numpy array or nested lists) to the model's input
        (float32 numpy)."""
        import numpy as np

        s = self.scaling
        arr = np.asarray(x, dtype=np.float64)
        return ((arr - s.feature_mean) / s.feature_std).astype(np.float32)

    def unscale_outputs(self, y: Any) -> Any:
        """The model's ``outputs [..., O]`` back in the units of the data (float64 numpy)."""
        import numpy as np

        s = self.scaling
        return np.asarray(y, dtype=np.float64) * s.output_std + s.output_mean


def make_metadata(vocab: Sequence[str], config: Mapping[str, Any]) -> dict[str, str]:
    """The ``metadata_props`` export writes: checks required keys so a bad export fails early."""
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise ContractError(f"config is missing required keys: {missing}")
    if int(config["vocab_size"]) != len(vocab):
        raise ContractError(
            f"config vocab_size={config['vocab_size']} but the vocabulary has {len(vocab)} tokens"
        )
    return {META_VOCAB: json.dumps(list(vocab)), META_CONFIG: json.dumps(dict(config))}


def make_sequence_metadata(config: Mapping[str, Any]) -> dict[str, str]:
    """The ``metadata_props`` of a ``sequence`` model (no vocabulary): checks the config the
    way :func:`validate` will, so a bad export fails before a file exists."""
    meta = {META_CONFIG: json.dumps(dict(config))}
    parse_sequence_metadata(meta)
    return meta


def model_kind(meta: Mapping[str, str]) -> str:
    """The kind named by ``metadata_props`` (``token_lm`` when the config names none, or when
    the config cannot be read: :func:`parse_metadata` then says what is wrong with it)."""
    try:
        config = json.loads(meta.get(META_CONFIG, "{}"))
    except json.JSONDecodeError:
        return KIND_TOKEN_LM
    if not isinstance(config, dict):
        return KIND_TOKEN_LM
    return str(config.get(KIND_KEY, KIND_TOKEN_LM))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ContractError(
            f"{META_CONFIG} names model kind {kind!r}, which this build does not know "
            f"(known: {list(KINDS)})"
        )


def _config_object(meta: Mapping[str, str]) -> dict[str, Any]:
    if META_CONFIG not in meta:
        raise ContractError(
            f"model metadata has no {META_CONFIG!r} entry (is this an lstm-serve model?)"
        )
    try:
        config = json.loads(meta[META_CONFIG])
    except json.JSONDecodeError as e:
        raise ContractError(f"{META_CONFIG} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ContractError(f"{META_CONFIG} must be a JSON object")
    return config


def _names(config: Mapping[str, Any], key: str, count_key: str) -> tuple[str, ...]:
    names = config[key]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ContractError(f"{META_CONFIG} {key} must be a JSON array of non-empty strings")
    if len(names) != config[count_key]:
        raise ContractError(
            f"{count_key}={config[count_key]} but {key} has {len(names)} names: {names}"
        )
    if len(set(names)) != len(names):
        raise ContractError(f"{META_CONFIG} {key} has duplicates: {names}")
    return tuple(names)


def parse_sequence_metadata(meta: Mapping[str, str]) -> SequenceSpec:
    """Parse and check a ``sequence`` model's ``metadata_props``; raises :class:`ContractError`."""
    config = _config_object(meta)
    kind = str(config.get(KIND_KEY, KIND_TOKEN_LM))
    if kind != KIND_SEQUENCE:
        raise ContractError(f"{META_CONFIG} kind is {kind!r}, expected {KIND_SEQUENCE!r}")
    missing = [k for k in SEQUENCE_REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise ContractError(
            f"{META_CONFIG} is missing required keys for a {KIND_SEQUENCE!r} model: {missing}"
        )
    sizes = {}
    for key in ("num_layers", "hidden_size", "num_features", "num_outputs"):
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ContractError(f"{META_CONFIG} {key} must be an integer, got {v!r}")
        if v < 1:
            raise ContractError(f"{META_CONFIG} {key} must be >= 1, got {v}")
        sizes[key] = v
    features = _names(config, "feature_names", "num_features")
    outputs = _names(config, "output_names", "num_outputs")
    scaling = Scaling.from_dict(config["scaling"], len(features), len(outputs))
    return SequenceSpec(
        num_layers=sizes["num_layers"],
        hidden_size=sizes["hidden_size"],
        cell=str(config["cell"]),
        feature_names=features,
        output_names=outputs,
        scaling=scaling,
        config=config,
    )


def parse_metadata(meta: Mapping[str, str]) -> ModelSpec:
    """Parse and check ``metadata_props``; raises :class:`ContractError` naming the problem."""
    kind = model_kind(meta)
    if kind != KIND_TOKEN_LM:
        _check_kind(kind)
        raise ContractError(
            f"model kind is {kind!r}, not {KIND_TOKEN_LM!r}: read it with "
            "parse_sequence_metadata (or validate(..., kind=None))"
        )
    for key in (META_VOCAB, META_CONFIG):
        if key not in meta:
            raise ContractError(
                f"model metadata has no {key!r} entry (is this an lstm-serve model?)"
            )
    try:
        vocab = json.loads(meta[META_VOCAB])
    except json.JSONDecodeError as e:
        raise ContractError(f"{META_VOCAB} is not valid JSON: {e}") from None
    if not isinstance(vocab, list) or not vocab or not all(isinstance(t, str) for t in vocab):
        raise ContractError(f"{META_VOCAB} must be a non-empty JSON array of strings")
    try:
        config = json.loads(meta[META_CONFIG])
    except json.JSONDecodeError as e:
        raise ContractError(f"{META_CONFIG} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ContractError(f"{META_CONFIG} must be a JSON object")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise ContractError(f"{META_CONFIG} is missing required keys: {missing}")
    try:
        num_layers = int(config["num_layers"])
        hidden = int(config["hidden_size"])
        vocab_size = int(config["vocab_size"])
        unk_id = int(config["unk_id"])
    except (TypeError, ValueError) as e:
        raise ContractError(f"{META_CONFIG} has a non-integer size: {e}") from None
    if num_layers < 1 or hidden < 1:
        raise ContractError(f"num_layers and hidden_size must be >= 1, got {num_layers}, {hidden}")
    if vocab_size != len(vocab):
        raise ContractError(f"vocab_size={vocab_size} but {META_VOCAB} has {len(vocab)} tokens")
    if not 0 <= unk_id < vocab_size:
        raise ContractError(f"unk_id={unk_id} is outside the vocabulary of {vocab_size}")
    rule = str(config["preprocess"])
    if rule not in PREPROCESS_RULES:
        raise ContractError(f"unknown preprocess rule {rule!r}; known: {sorted(PREPROCESS_RULES)}")
    return ModelSpec(
        vocab=tuple(vocab),
        num_layers=num_layers,
        hidden_size=hidden,
        unk_id=unk_id,
        preprocess=rule,
        cell=str(config["cell"]),
        config=config,
    )


def _check_io(
    what: str,
    actual: Mapping[str, tuple[str, Sequence[Any]]],
    expected: Mapping[str, tuple[str, int]],
    *,
    kind: str = KIND_TOKEN_LM,
) -> None:
    for name, (etype, rank) in expected.items():
        if name not in actual:
            for_kind = f" for a {kind!r} model" if kind != KIND_TOKEN_LM else ""
            raise ContractError(
                f"model has no {what} named {name!r} (it has {sorted(actual)}); "
                f"expected {what}s {list(expected)}{for_kind}"
            )
        got_type, shape = actual[name]
        if got_type != etype:
            raise ContractError(f"{what} {name!r} has type {got_type}, expected {etype}")
        if len(shape) != rank:
            raise ContractError(f"{what} {name!r} has rank {len(shape)}, expected {rank}")


def _check_fixed_dim(name: str, shape: Sequence[Any], axis: int, want: int, what: str) -> None:
    dim = shape[axis]
    # A symbolic (string) or unknown (None) dimension is allowed; a fixed one must match.
    if isinstance(dim, int) and dim != want:
        raise ContractError(f"{name!r} axis {axis} ({what}) is {dim}, metadata says {want}")


def _session(model: str | Path | bytes | Any) -> Any:
    if not isinstance(model, str | Path | bytes):
        return model
    import onnxruntime as ort

    if isinstance(model, str | Path) and not Path(model).is_file():
        raise ContractError(f"model file not found: {model}")
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model),
            sess_options=opts,
            providers=["CPUExecutionProvider"],
        )
    except Exception as e:  # ORT raises several exception types for unreadable files
        raise ContractError(f"not a loadable ONNX model: {str(e).splitlines()[0]}") from None


def _check_state_dims(
    inputs: Mapping[str, tuple[str, Sequence[Any]]],
    outputs: Mapping[str, tuple[str, Sequence[Any]]],
    num_layers: int,
    hidden_size: int,
) -> None:
    for name in (INPUT_H0, INPUT_C0):
        _check_fixed_dim(name, inputs[name][1], 0, num_layers, "layers")
        _check_fixed_dim(name, inputs[name][1], 2, hidden_size, "hidden")
    for name in (OUTPUT_HN, OUTPUT_CN):
        _check_fixed_dim(name, outputs[name][1], 0, num_layers, "layers")
        _check_fixed_dim(name, outputs[name][1], 2, hidden_size, "hidden")


def _validate_token_lm(
    inputs: Mapping[str, tuple[str, Sequence[Any]]],
    outputs: Mapping[str, tuple[str, Sequence[Any]]],
    meta: Mapping[str, str],
) -> ModelSpec:
    try:
        _check_io(
            "input",
            inputs,
            {INPUT_TOKENS: (_ORT_INT64, 2), INPUT_H0: (_ORT_FLOAT, 3), INPUT_C0: (_ORT_FLOAT, 3)},
        )
    except ContractError as e:
        if INPUT_FEATURES in inputs and INPUT_TOKENS not in inputs:
            # The likeliest cause: a sequence model whose config forgot to say so.
            raise ContractError(
                f"{e} (a model with a {INPUT_FEATURES!r} input must say "
                f'"{KIND_KEY}": "{KIND_SEQUENCE}" in {META_CONFIG})'
            ) from None
        raise
    _check_io(
        "output",
        outputs,
        {OUTPUT_LOGITS: (_ORT_FLOAT, 3), OUTPUT_HN: (_ORT_FLOAT, 3), OUTPUT_CN: (_ORT_FLOAT, 3)},
    )
    spec = parse_metadata(meta)
    _check_state_dims(inputs, outputs, spec.num_layers, spec.hidden_size)
    _check_fixed_dim(OUTPUT_LOGITS, outputs[OUTPUT_LOGITS][1], 2, spec.vocab_size, "vocab")
    return spec


def _validate_sequence(
    inputs: Mapping[str, tuple[str, Sequence[Any]]],
    outputs: Mapping[str, tuple[str, Sequence[Any]]],
    meta: Mapping[str, str],
) -> SequenceSpec:
    _check_io(
        "input",
        inputs,
        {INPUT_FEATURES: (_ORT_FLOAT, 3), INPUT_H0: (_ORT_FLOAT, 3), INPUT_C0: (_ORT_FLOAT, 3)},
        kind=KIND_SEQUENCE,
    )
    _check_io(
        "output",
        outputs,
        {OUTPUT_OUTPUTS: (_ORT_FLOAT, 3), OUTPUT_HN: (_ORT_FLOAT, 3), OUTPUT_CN: (_ORT_FLOAT, 3)},
        kind=KIND_SEQUENCE,
    )
    spec = parse_sequence_metadata(meta)
    _check_state_dims(inputs, outputs, spec.num_layers, spec.hidden_size)
    _check_fixed_dim(INPUT_FEATURES, inputs[INPUT_FEATURES][1], 2, spec.num_features, "features")
    _check_fixed_dim(OUTPUT_OUTPUTS, outputs[OUTPUT_OUTPUTS][1], 2, spec.num_outputs, "outputs")
    return spec


@overload
def validate(
    model: str | Path | bytes | Any, *, kind: Literal["token_lm"] = "token_lm"
) -> ModelSpec: ...
@overload
def validate(model: str | Path | bytes | Any, *, kind: Literal["sequence"]) -> SequenceSpec: ...
@overload
def validate(model: str | Path | bytes | Any, *, kind: None) -> ModelSpec | SequenceSpec: ...
def validate(
    model: str | Path | bytes | Any, *, kind: str | None = KIND_TOKEN_LM
) -> ModelSpec | SequenceSpec:
    """Check a model against the contract and return its parsed metadata.

    ``model`` is a file path, the serialized bytes, or an ``onnxruntime.InferenceSession`` (the
    server passes its own session so the file is not loaded twice). ``kind`` is the model kind
    the caller can use: ``"token_lm"`` (the default, returns a :class:`ModelSpec`),
    ``"sequence"`` (returns a :class:`SequenceSpec`) or None for either, as the model's metadata
    says. Raises :class:`ContractError` with a message naming the first problem found, including
    a model of another kind than the one asked for.
    """
    sess = _session(model)
    inputs = {i.name: (i.type, i.shape) for i in sess.get_inputs()}
    outputs = {o.name: (o.type, o.shape) for o in sess.get_outputs()}
    meta = sess.get_modelmeta().custom_metadata_map
    found = model_kind(meta)
    _check_kind(found)
    if kind is not None and found != kind:
        raise ContractError(
            f"model kind is {found!r} (inputs {sorted(inputs)}), but a {kind!r} model is "
            f"needed here"
        )
    if found == KIND_SEQUENCE:
        return _validate_sequence(inputs, outputs, meta)
    return _validate_token_lm(inputs, outputs, meta)
