"""``ExportOptions.worker_args`` against the real ``lstm-export`` parser: a lossless round trip.

The batch pipeline's worker processes get their options only through these flags, so an option
that ``worker_args`` forgets would silently export with its default in ``--jobs N`` runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from export.cli import options_from_args, single_parser
from export.exporter import ExportOptions

# One non-default value per field. Every field must be listed: a new option fails
# test_every_field_has_a_non_default_value until it is added here (and then to worker_args).
NON_DEFAULT: dict[str, Any] = {
    "int8": True,
    "corpus": Path("/data/corpus with spaces.txt"),
    "val_fraction": 0.123456789,
    "tolerance": 3.3e-5,
    "int8_tolerance": 0.0375,
    "threads": 3,
    "measure_speed": False,
    "per_channel": True,
}


def _round_trip(options: ExportOptions) -> ExportOptions:
    argv = ["ck.pt", "--out", "model.onnx", *options.worker_args()]
    return options_from_args(single_parser().parse_args(argv))


def test_every_field_has_a_non_default_value() -> None:
    fields = {f.name for f in dataclasses.fields(ExportOptions)}
    assert set(NON_DEFAULT) == fields
    default = ExportOptions()
    for name, value in NON_DEFAULT.items():
        assert getattr(default, name) != value, name


def test_default_options_round_trip() -> None:
    assert _round_trip(ExportOptions()) == ExportOptions()


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_each_non_default_option_round_trips(name: str) -> None:
    options = ExportOptions(**{name: NON_DEFAULT[name]})
    assert _round_trip(options) == options


def test_all_non_default_options_round_trip() -> None:
    options = ExportOptions(**NON_DEFAULT)
    assert _round_trip(options) == options
