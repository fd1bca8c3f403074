"""Shared pieces of the benchmark: timing statistics, the model under test, machine facts.

Every figure the benchmark reports is measured in the same run as the baseline it is divided by,
because the machines are shared and noisy; absolute numbers are recorded only for context.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.files import write_atomic
from contract.model import state_bytes
from contract.repository import MODEL_FILE

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = ROOT / "server" / "model_repo" / "timemachine" / "1" / MODEL_FILE
# The shape of the fallback model when the bundled one is missing: the bundled model's (two
# layers of 256 hidden units over the 28-token character vocabulary; it uses a 32-wide
# embedding where this one is one-hot, which changes only the first layer's input width).
FALLBACK_HIDDEN = 256
FALLBACK_LAYERS = 2


class SectionSkipped(Exception):
    """A section cannot run here; the message is the reason recorded in the JSON."""


def percentiles_ms(samples_ns: np.ndarray | list[int]) -> dict[str, float | None]:
    """p50/p90/p99/mean of nanosecond samples, in milliseconds (None when there are none)."""
    a = np.asarray(samples_ns, dtype=np.float64)
    if a.size == 0:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None, "n": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99]) / 1e6
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(a.mean() / 1e6),
        "n": int(a.size),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


@dataclass(frozen=True)
class ModelUnderTest:
    """The ONNX model every section uses, and where it came from."""

    path: str
    source: str  # "bundled", "given" or "random (export.graph.random_model)"
    num_layers: int
    hidden_size: int
    vocab_size: int
    int8_path: str | None
    input_mode: str = "onehot"  # how the first layer sees a token (the eager baseline copies it)
    embedding_dim: int = 32

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.num_layers, self.hidden_size)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state_bytes_per_session"] = self.state_bytes
        return d


def _spec(path: Path) -> tuple[int, int, int, str, int]:
    from contract.model import validate

    spec = validate(path)
    mode = str(spec.config.get("input_mode", "onehot"))
    dim = int(spec.config.get("embedding_dim", 32) or 32)
    return spec.num_layers, spec.hidden_size, spec.vocab_size, mode, dim


def _int8_beside(path: Path) -> Path | None:
    cand = path.with_name(f"{path.stem}.int8{path.suffix}")
    return cand if cand.is_file() else None


def resolve_model(given: str | None, workdir: Path) -> ModelUnderTest:
    """The model to benchmark: ``given``, else the bundled model, else a random one.

    The random fallback has the bundled model's shape (28 tokens, 2 x 256) and is
    written under ``workdir``; its int8 variant is made with ``export.quantize`` when that
    module is available, so the fp32-vs-int8 section can still run.
    """
    if given:
        path = Path(given)
        if not path.is_file():
            raise SystemExit(f"benchmarks: model not found: {path}")
        source = "given"
    elif BUNDLED_MODEL.is_file():
        path, source = BUNDLED_MODEL, "bundled"
    else:
        from export.graph import random_model

        path = workdir / "random" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(
            random_model(
                hidden_size=FALLBACK_HIDDEN, num_layers=FALLBACK_LAYERS, seed=0
            ).SerializeToString()
        )
        source = "random (export.graph.random_model: bundled model not present)"
    int8 = _int8_beside(path)
    if int8 is None:
        int8 = _make_int8(path, workdir)
    L, H, V, mode, dim = _spec(path)
    return ModelUnderTest(str(path), source, L, H, V, str(int8) if int8 else None, mode, dim)


def _make_int8(path: Path, workdir: Path) -> Path | None:
    try:
        from export.quantize import quantize_int8
    except Exception:  # the export extra or its quantiser is not there: section 6 says so
        return None
    out = workdir / "int8" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.write_bytes(quantize_int8(path.read_bytes()))
    except Exception:
        return None
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of everything whose speed the figures depend on (None = not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in (
        "numpy",
        "onnxruntime",
        "onnxruntime-gpu",
        "torch",
        "grpcio",
        "protobuf",
        "d2l",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict[str, Any]:
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    info: dict[str, str] = {}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model", "cpu MHz", "cache size") and key not in info:
                info[key] = val.strip()
            elif key == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        # "AMD EPYC" alone says little on a VM: family/model identify the generation (family 25
        # model 1 is Zen 3), and the SIMD flags decide which ORT/oneDNN kernels run.
        "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "cpu_mhz": info.get("cpu MHz"),
        "cache": info.get("cache size"),
        "simd": sorted(
            f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma")
        ),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
    }


def server_intra_op_threads() -> int:
    """The server's default ONNX Runtime intra-op thread count (1 when the server is absent)."""
    try:
        from server.settings import Settings

        return int(Settings().intra_op_threads) or 1
    except Exception:
        return 1


def git_commit(tree: Path) -> str | None:
    """``HEAD`` of the git tree at ``tree``, with ``+dirty`` when server/ has local edits."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "server", "protos", "export"],
            cwd=tree,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty" if dirty else "")) or None


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
