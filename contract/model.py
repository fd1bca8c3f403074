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
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def parse_metadata(meta: Mapping[str, str]) -> ModelSpec:
    """Parse and check ``metadata_props``; raises :class:`ContractError` naming the problem."""
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
    kind: str,
    actual: Mapping[str, tuple[str, Sequence[Any]]],
    expected: Mapping[str, tuple[str, int]],
) -> None:
    for name, (etype, rank) in expected.items():
        if name not in actual:
            raise ContractError(
                f"model has no {kind} named {name!r} (it has {sorted(actual)}); "
                f"expected {kind}s {list(expected)}"
            )
        got_type, shape = actual[name]
        if got_type != etype:
            raise ContractError(f"{kind} {name!r} has type {got_type}, expected {etype}")
        if len(shape) != rank:
            raise ContractError(f"{kind} {name!r} has rank {len(shape)}, expected {rank}")


def _check_fixed_dim(name: str, shape: Sequence[Any], axis: int, want: int, what: str) -> None:
    dim = shape[axis]
    # A symbolic (string) or unknown (None) dimension is allowed; a fixed one must match.
    if isinstance(dim, int) and dim != want:
        raise ContractError(f"{name!r} axis {axis} ({what}) is {dim}, metadata says {want}")


def validate(model: str | Path | bytes | Any) -> ModelSpec:
    """Check a model against the contract and return its parsed metadata.

    ``model`` is a file path, the serialized bytes, or an ``onnxruntime.InferenceSession`` (the
    server passes its own session so the file is not loaded twice). Raises
    :class:`ContractError` with a message naming the first problem found.
    """
    if isinstance(model, str | Path | bytes):
        import onnxruntime as ort

        if isinstance(model, str | Path) and not Path(model).is_file():
            raise ContractError(f"model file not found: {model}")
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sess = ort.InferenceSession(
                model if isinstance(model, bytes) else str(model),
                sess_options=opts,
                providers=["CPUExecutionProvider"],
            )
        except Exception as e:  # ORT raises several exception types for unreadable files
            raise ContractError(f"not a loadable ONNX model: {str(e).splitlines()[0]}") from None
    else:
        sess = model
    inputs = {i.name: (i.type, i.shape) for i in sess.get_inputs()}
    outputs = {o.name: (o.type, o.shape) for o in sess.get_outputs()}
    _check_io(
        "input",
        inputs,
        {INPUT_TOKENS: (_ORT_INT64, 2), INPUT_H0: (_ORT_FLOAT, 3), INPUT_C0: (_ORT_FLOAT, 3)},
    )
    _check_io(
        "output",
        outputs,
        {OUTPUT_LOGITS: (_ORT_FLOAT, 3), OUTPUT_HN: (_ORT_FLOAT, 3), OUTPUT_CN: (_ORT_FLOAT, 3)},
    )
    spec = parse_metadata(sess.get_modelmeta().custom_metadata_map)
    for name in (INPUT_H0, INPUT_C0):
        _check_fixed_dim(name, inputs[name][1], 0, spec.num_layers, "layers")
        _check_fixed_dim(name, inputs[name][1], 2, spec.hidden_size, "hidden")
    for name in (OUTPUT_HN, OUTPUT_CN):
        _check_fixed_dim(name, outputs[name][1], 0, spec.num_layers, "layers")
        _check_fixed_dim(name, outputs[name][1], 2, spec.hidden_size, "hidden")
    _check_fixed_dim(OUTPUT_LOGITS, outputs[OUTPUT_LOGITS][1], 2, spec.vocab_size, "vocab")
    return spec
