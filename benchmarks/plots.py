"""PNG plots of a results dict (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the Agg backend is chosen above, before pyplot loads

DPI = 80


def _rows(sections: dict[str, Any], key: str, sub: str = "rows") -> list[dict[str, Any]]:
    sec = sections.get(key, {})
    return [] if "skipped" in sec else sec.get(sub) or []


def throughput(result: dict[str, Any], path: Path) -> bool:
    s = result["sections"]
    gen = _rows(s, "generate")
    ort = _rows(s, "inprocess_ort")
    torch = _rows(s, "torch_eager")
    if not (gen or ort):
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if ort:
        ax.plot(
            [r["batch"] for r in ort],
            [r["tokens_per_s"] for r in ort],
            "k-",
            label="in-process ORT, batch B (limit)",
        )
    if torch:
        ax.plot(
            [r["batch"] for r in torch],
            [r["tokens_per_s"] for r in torch],
            "k:",
            label="in-process PyTorch eager",
        )
    native = _rows(s, "torch_eager", "rows_onednn_off")
    if native:
        ax.plot(
            [r["batch"] for r in native],
            [r["tokens_per_s"] for r in native],
            "k-.",
            alpha=0.6,
            label="in-process PyTorch eager, oneDNN off",
        )
    for key, sub, style, label in (
        ("generate", "rows", "o-", "server Generate"),
        ("no_batching", "generate", "s--", "server Generate, max batch 1"),
        ("int8", "generate", "^-.", "server Generate, int8"),
    ):
        rows = _rows(s, key, sub)
        if rows:
            ax.plot(
                [r["concurrency"] for r in rows],
                [r["tokens_per_s"] for r in rows],
                style,
                label=label,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent generations (server) / batch size B (in process)")
    ax.set_ylabel("generated tokens/s")
    ax.set_title("Decode throughput vs concurrency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def latency(result: dict[str, Any], path: Path) -> bool:
    s = result["sections"]
    gen = _rows(s, "generate")
    stream = _rows(s, "stream")
    if not (gen or stream):
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    if gen:
        c = [r["concurrency"] for r in gen]
        a.plot(c, [r["itl"]["p50_ms"] for r in gen], "o-", label="inter-token p50")
        a.plot(c, [r["itl"]["p99_ms"] for r in gen], "o--", label="inter-token p99")
        a.plot(c, [r["ttft"]["p50_ms"] for r in gen], "s-", label="first token p50")
        a.plot(c, [r["ttft"]["p99_ms"] for r in gen], "s--", label="first token p99")
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("concurrent generations")
        a.set_ylabel("ms")
        a.set_title("Generate latency")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    if stream:
        c = [r["concurrency"] for r in stream]
        b.plot(c, [r["rtt"]["p50_ms"] for r in stream], "o-", label="round trip p50")
        b.plot(c, [r["rtt"]["p99_ms"] for r in stream], "o--", label="round trip p99")
        floor = _rows(s, "stream", "grpc_floor_rows")
        if floor:
            cf = [r["concurrency"] for r in floor]
            b.plot(
                cf, [r["rtt"]["p50_ms"] for r in floor], "k:", label="p50, null server (gRPC floor)"
            )
        nb = _rows(s, "no_batching", "stream")
        if nb:
            cn = [r["concurrency"] for r in nb]
            b.plot(cn, [r["rtt"]["p50_ms"] for r in nb], "s-", label="p50, max batch 1")
            b.plot(cn, [r["rtt"]["p99_ms"] for r in nb], "s--", label="p99, max batch 1")
        b.set_xscale("log", base=2)
        b.set_yscale("log")
        b.set_xlabel("concurrent streams")
        b.set_title("StepStream round trip")
        b.grid(True, which="both", alpha=0.3)
        b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def training(result: dict[str, Any], path: Path) -> bool:
    rows = _rows(result["sections"], "training")
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    names = [r["variant"] for r in rows]
    ax.barh(names, [r["tokens_per_s"] for r in rows], color=["C1", "C0", "C1", "C0"][: len(rows)])
    ax.set_xlabel("training tokens/s (batch 32 x 35 steps, H=256, SGD + clipping)")
    ax.set_title("Training throughput: ours vs the book's code (d2l)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def write_all(result: dict[str, Any], out: Path) -> list[str]:
    """Write every plot there is data for; return the file names written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in (
        ("throughput.png", throughput),
        ("latency.png", latency),
        ("training.png", training),
    ):
        if fn(result, out / name):
            written.append(name)
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.plots RESULTS.json``: redraw the plots beside the file."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "benchmarks/results/results.json")
    print(", ".join(write_all(json.loads(path.read_text(encoding="utf-8")), path.parent)))


if __name__ == "__main__":
    main()
