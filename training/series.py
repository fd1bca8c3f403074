"""Time series for the forecaster: a dataset shipped inside a package, its split, its scaling,
and the naive baselines the LSTM is measured against. Torch-free (numpy).

Framing (one step ahead): the model reads the standardised features at time ``t`` and its output
at ``t`` is the standardised value of the target columns at ``t + 1``. It reads a series from
its start with the state carried, exactly as a served session would, so evaluation is one pass
over the whole series from a zero state, and the figures for a part of the series are the
predictions whose *targets* fall in it.

Split, in time order, by target time: ``[0, fit_end)`` fits the weights and the scaling,
``[fit_end, train_end)`` picks the best epoch (validation), ``[train_end, n)`` is held out and
only reported (the test). Nothing of the held-out part is used to fit or pick anything.

The data is read from the installed package's own file (``importlib.resources``): no download
at run time, and the file's SHA-256 goes into the checkpoint with the values themselves, so an
export can measure held-out errors without the package.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.resources
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract.model import Scaling


class SeriesError(ValueError):
    """A dataset cannot be read or a series cannot be split as asked; one-line message."""


@dataclass(frozen=True)
class DatasetSource:
    """A CSV file inside an installed package: a time column and one or more value columns."""

    name: str
    package: str  # the distribution that ships the file (for its version and the hint)
    module: str  # the module folder holding the file
    filename: str
    time_column: str
    value_columns: tuple[str, ...]
    feature_names: tuple[str, ...]
    period: int  # the seasonal naive baseline's lag, in steps
    unit: str  # one step of the series
    description: str


DATASETS: dict[str, DatasetSource] = {
    "sunspots": DatasetSource(
        name="sunspots",
        package="statsmodels",
        module="statsmodels.datasets.sunspots",
        filename="sunspots.csv",
        time_column="YEAR",
        value_columns=("SUNACTIVITY",),
        feature_names=("sunspots",),
        period=11,
        unit="year",
        description="yearly mean sunspot numbers 1700-2008 (statsmodels.datasets.sunspots)",
    ),
}


@dataclass(frozen=True)
class Series:
    """A raw series: ``times [N]`` and ``values [N, F]`` (float64), with where it came from."""

    name: str
    times: np.ndarray
    values: np.ndarray
    feature_names: tuple[str, ...]
    period: int
    unit: str
    source: str
    sha256: str


def load_dataset(name: str) -> Series:
    """Read a dataset of :data:`DATASETS` from the package that ships it.

    Raises :class:`SeriesError` for an unknown name, a package that is not installed, or a file
    that does not parse as expected.
    """
    src = DATASETS.get(name)
    if src is None:
        raise SeriesError(f"unknown dataset {name!r} (known: {sorted(DATASETS)})")
    try:
        data = importlib.resources.files(src.module).joinpath(src.filename).read_bytes()
        version = importlib.metadata.version(src.package)
    except ModuleNotFoundError:
        raise SeriesError(
            f"the dataset {name!r} ships with {src.package}, which is not installed: "
            "pip install 'lstm-serve[train]'"
        ) from None
    except OSError as e:
        raise SeriesError(f"cannot read {src.filename} from {src.module}: {e}") from None
    try:
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
        times = np.array([float(r[src.time_column]) for r in rows])
        values = np.array([[float(r[c]) for c in src.value_columns] for r in rows])
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise SeriesError(f"{src.module}/{src.filename} does not parse as expected: {e}") from None
    if len(rows) < 3 or not np.isfinite(values).all():
        raise SeriesError(f"{src.module}/{src.filename}: too short or not all values finite")
    return Series(
        name=name,
        times=times,
        values=values,
        feature_names=src.feature_names,
        period=src.period,
        unit=src.unit,
        source=f"{src.package} {version}: {src.module.replace('.', '/')}/{src.filename}",
        sha256=hashlib.sha256(data).hexdigest(),
    )


def make_series(
    values: np.ndarray | Sequence[Sequence[float]],
    feature_names: Sequence[str],
    *,
    name: str = "series",
    period: int = 1,
    unit: str = "step",
) -> Series:
    """A :class:`Series` from arrays (tests, other data); ``values [N, F]``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] != len(feature_names):
        raise SeriesError(f"values must be [N, {len(feature_names)}], got {arr.shape}")
    digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
    return Series(
        name, np.arange(len(arr), dtype=np.float64), arr, tuple(feature_names), period, unit,
        "arrays", digest,
    )  # fmt: skip


@dataclass(frozen=True)
class SeriesData:
    """A series ready for the model: the split, the scaling and the targets.

    ``targets`` are indices into the feature columns; output ``j`` is column ``targets[j]`` one
    step ahead (``horizon`` 1).
    """

    series: Series
    targets: tuple[int, ...]
    fit_end: int
    train_end: int
    scaling: Scaling
    horizon: int = 1

    @property
    def n(self) -> int:
        return len(self.series.values)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.series.feature_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(f"{self.series.feature_names[j]}_next" for j in self.targets)

    def inputs(self) -> np.ndarray:
        """Standardised features of every time step but the last, ``[N - 1, F]`` float32 (the
        last step has no next value to be judged against)."""
        s = self.scaling
        x = (self.series.values[:-1] - s.feature_mean) / s.feature_std
        return x.astype(np.float32)

    def scaled_targets(self) -> np.ndarray:
        """``[N - 1, O]`` float32: row ``t`` is what the output at ``t`` should be."""
        s = self.scaling
        y = (self.series.values[1:, list(self.targets)] - s.output_mean) / s.output_std
        return y.astype(np.float32)

    def raw_targets(self) -> np.ndarray:
        """``[N - 1, O]`` float64 in the data's units."""
        return self.series.values[1:, list(self.targets)]

    def unscale(self, outputs: np.ndarray) -> np.ndarray:
        s = self.scaling
        return np.asarray(outputs, dtype=np.float64) * s.output_std + s.output_mean

    def part(self, which: str) -> slice:
        """Rows of :meth:`inputs` and the targets whose target time is in ``fit``, ``val``,
        ``test``."""
        bounds = {
            "fit": (0, self.fit_end),
            "val": (self.fit_end, self.train_end),
            "test": (self.train_end, self.n),
        }
        a, b = bounds[which]
        return slice(max(a, 1) - 1, b - 1)  # row t predicts time t + 1

    def years(self, which: str) -> tuple[float, float]:
        """First and last time of a part's targets (for the record)."""
        sl = self.part(which)
        t = self.series.times[1:][sl]
        return (float(t[0]), float(t[-1])) if len(t) else (math.nan, math.nan)

    def to_record(self) -> dict[str, Any]:
        """The checkpoint's ``series`` entry: everything to rebuild this object, values included."""
        s = self.series
        return {
            "dataset": s.name,
            "source": s.source,
            "sha256": s.sha256,
            "unit": s.unit,
            "period": s.period,
            "times": s.times.tolist(),
            "values": s.values.tolist(),
            "feature_names": list(s.feature_names),
            "output_names": list(self.output_names),
            "targets": list(self.targets),
            "horizon": self.horizon,
            "fit_end": self.fit_end,
            "train_end": self.train_end,
            "scaling": self.scaling.to_dict(),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SeriesData:
        """Inverse of :meth:`to_record`; raises :class:`SeriesError` for a malformed record."""
        try:
            values = np.asarray(record["values"], dtype=np.float64)
            series = Series(
                name=str(record["dataset"]),
                times=np.asarray(record["times"], dtype=np.float64),
                values=values,
                feature_names=tuple(record["feature_names"]),
                period=int(record["period"]),
                unit=str(record["unit"]),
                source=str(record["source"]),
                sha256=str(record["sha256"]),
            )
            targets = tuple(int(j) for j in record["targets"])
            scaling = Scaling.from_dict(record["scaling"], values.shape[1], len(targets))
            return cls(
                series,
                targets,
                int(record["fit_end"]),
                int(record["train_end"]),
                scaling,
                int(record.get("horizon", 1)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SeriesError(f"malformed series record ({type(e).__name__}: {e})") from None


def prepare(
    series: Series,
    *,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    targets: Sequence[int] | None = None,
) -> SeriesData:
    """Split ``series`` in time order and fit the scaling on the fitting part.

    The last ``test_fraction`` of the points is held out; the last ``val_fraction`` of the rest
    picks the best epoch. Targets default to every column. Raises :class:`SeriesError` when a
    part would be too short to use.
    """
    n, f = series.values.shape
    if not 0.0 < test_fraction < 1.0 or not 0.0 <= val_fraction < 1.0:
        raise SeriesError(
            f"test_fraction must be in (0, 1) and val_fraction in [0, 1), got {test_fraction} "
            f"and {val_fraction}"
        )
    train_end = int(n * (1.0 - test_fraction))
    fit_end = int(train_end * (1.0 - val_fraction))
    if fit_end < 3 or n - train_end < 1 or (val_fraction > 0 and train_end - fit_end < 1):
        raise SeriesError(
            f"{n} points cannot be split into fit ({fit_end}), validation "
            f"({train_end - fit_end}) and held-out ({n - train_end}) parts"
        )
    cols = tuple(range(f)) if targets is None else tuple(int(j) for j in targets)
    if not cols or any(not 0 <= j < f for j in cols):
        raise SeriesError(f"targets must be column indices in [0, {f}), got {list(cols)}")
    fit = series.values[:fit_end]
    mean = fit.mean(axis=0)
    std = fit.std(axis=0)
    if not (std > 0).all():
        raise SeriesError(f"a feature is constant over the fitting part (std {std.tolist()})")
    scaling = Scaling(
        tuple(mean.tolist()),
        tuple(std.tolist()),
        tuple(mean[list(cols)].tolist()),
        tuple(std[list(cols)].tolist()),
    )
    return SeriesData(series, cols, fit_end, train_end, scaling)


# --- baselines and errors ----------------------------------------------------------------------


def errors(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """MAE and RMSE over every value (all outputs together), in the data's units."""
    d = np.asarray(pred, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    return {"mae": float(np.mean(np.abs(d))), "rmse": float(np.sqrt(np.mean(d * d)))}


def baseline_predictions(data: SeriesData, ar_order: int | None = None) -> dict[str, np.ndarray]:
    """One-step-ahead predictions ``[N - 1, O]`` of the baselines, row ``t`` for time ``t + 1``:

    * ``last_value``: the value at ``t`` (persistence);
    * ``seasonal_naive``: the value one period before the target, ``t + 1 - period`` (NaN where
      the series has no such point);
    * ``ar``: a linear autoregression of order ``ar_order`` (default: the period) per target,
      least squares with an intercept on the fitting part only (NaN before ``ar_order`` points).
    """
    v = data.series.values[:, list(data.targets)]
    n = len(v)
    period = data.series.period
    p = ar_order or period
    last = v[:-1].copy()
    seasonal = np.full_like(last, np.nan)
    if period < n:
        seasonal[period - 1 :] = v[: n - period]
    ar = np.full_like(last, np.nan)
    for j in range(v.shape[1]):
        x = v[:, j]
        rows = range(p, data.fit_end)
        if len(rows) <= p + 1:
            continue
        A = np.array([[1.0, *x[t - p : t][::-1]] for t in rows])
        coef, *_ = np.linalg.lstsq(A, x[p : data.fit_end], rcond=None)
        for t in range(p, n):
            ar[t - 1, j] = coef[0] + coef[1:] @ x[t - p : t][::-1]
    return {"last_value": last, "seasonal_naive": seasonal, "ar": ar}
