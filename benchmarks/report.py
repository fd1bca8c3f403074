"""Render a ``results.json`` as the Markdown tables ``benchmarks/README.md`` records.

``python -m benchmarks.report benchmarks/results/results.json`` prints them, so the README's
figures are copied from the run's own file, never typed in by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .common import (
    GENERATE_HEAD,
    INPROC_HEAD,
    STREAM_HEAD,
    generate_cells,
    inproc_cells,
    stream_cells,
)


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{nd}f}"
    return str(v)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def render(result: dict[str, Any]) -> str:
    meta, s = result["meta"], result["sections"]
    m, v, mc = meta["model"], meta["versions"], meta["machine"]
    parts = [
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']} (wall {meta['wall_s']:.0f} s); mode {meta['mode']}",
        f"- machine: {mc['cores']} cores, {mc['cpu_model']} (family/model "
        f"{mc.get('cpu_family_model')}, {mc.get('cpu_mhz')} MHz, {', '.join(mc.get('simd', []))})"
        f", {mc['memory_gib']} GiB; {mc['platform']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- model: {m['source']}, L={m['num_layers']} H={m['hidden_size']} V={m['vocab_size']} "
        f"({m['input_mode']} input), state {m['state_bytes_per_session']} B/session; "
        f"server `{meta.get('server_commit')}`; ORT intra-op / torch threads {meta['threads']}",
        f"- load average (1, 5, 15 min) before {meta['load_average_before']}, "
        f"after {meta['load_average_after']}",
        "",
        "| figure | value | target | verdict |",
        "|---|---|---|---|",
    ]
    targets = {t["key"]: t for t in result["targets"]}
    for key, val in result["summary"].items():
        t = targets.get(key)
        verdict = ""
        if t is not None:
            verdict = "–" if t["met"] is None else ("met" if t["met"] else "**missed**")
        why = result["summary_reasons"].get(key)
        parts.append(
            f"| `{key}` | {_f(val, 3)}{' (' + why + ')' if why else ''} | "
            f"{t['target'] if t else ''} | {verdict} |"
        )

    if "rows" in s.get("inprocess_ort", {}):
        parts += ["", "**1. In-process ONNX Runtime, T=1** (tokens/s; ms per call)", ""]
        parts.append(_table(INPROC_HEAD, [inproc_cells(r) for r in s["inprocess_ort"]["rows"]]))
    te = s.get("torch_eager", {})
    if "rows" in te:
        parts += ["", "**2. PyTorch eager, T=1**: default (oneDNN) | oneDNN off", ""]
        rows = [
            [a["batch"], a["tokens_per_s"], a["p50_ms"], b["tokens_per_s"], b["p50_ms"]]
            for a, b in zip(te["rows"], te["rows_onednn_off"], strict=True)
        ]
        parts.append(_table(["B", "tokens/s", "p50 ms", "tokens/s (off)", "p50 ms (off)"], rows))
        pb = te.get("paired_b1")
        if pb:
            parts.append(
                f"\nAlternating B=1 rounds ({len(pb['rounds'])}): ORT / PyTorch = "
                f"{pb['ort_vs_torch']:.2f} (oneDNN off: {pb['ort_vs_torch_onednn_off']:.2f})."
            )

    def gen(rows: list[dict[str, Any]]) -> str:
        return _table(GENERATE_HEAD, [generate_cells(r) for r in rows])

    def stream(rows: list[dict[str, Any]]) -> str:
        return _table(
            [*STREAM_HEAD, "server µs/step"],
            [[*stream_cells(r), r["server_cpu_cores"] / r["steps_per_s"] * 1e6] for r in rows],
        )

    note = " (ms; client/server in cores)"
    if "rows" in s.get("generate", {}):
        parts += ["", f"**3. Server Generate**{note}", "", gen(s["generate"]["rows"])]
    if "rows" in s.get("stream", {}):
        parts += ["", f"**4. Server StepStream steps**{note}", "", stream(s["stream"]["rows"])]
        if s["stream"].get("grpc_floor_rows"):
            parts += ["", "**4b. gRPC floor: null server, same load**", ""]
            parts.append(stream(s["stream"]["grpc_floor_rows"]))
    nb = s.get("no_batching", {})
    if "generate" in nb:
        parts += ["", "**5. Max batch 1: Generate**", "", gen(nb["generate"])]
        parts += ["", "**5. Max batch 1: StepStream**", "", stream(nb["stream"])]
    i8 = s.get("int8", {})
    if "generate" in i8:
        parts += ["", "**6. int8 model: Generate**", "", gen(i8["generate"])]
        if i8.get("stream"):
            parts += ["", "**6. int8 model: StepStream**", "", stream(i8["stream"])]
    mem = s.get("memory", {})
    if "ratio" in mem:
        parts += [
            "",
            f"**7. Memory**: {mem['sessions']:,} sessions; RSS {mem['rss_base_bytes'] / 2**20:.1f}"
            f" MiB → {mem['rss_after_create_bytes'] / 2**20:.1f} MiB created → "
            f"{mem['rss_after_one_step_each_bytes'] / 2**20:.1f} MiB stepped once each: "
            f"+{mem['growth_bytes'] / 2**20:.1f} MiB for {mem['raw_state_bytes'] / 2**20:.1f} MiB"
            f" of raw state = **{mem['ratio']:.2f}** ({mem['bytes_per_session']:.0f} B/session"
            f" for {mem['state_bytes_per_session']} B of state).",
        ]
    tr = s.get("training", {})
    if "rows" in tr:
        parts += ["", "**8. Training throughput** (tokens/s; fastest round, median round)", ""]
        parts.append(
            _table(
                ["variant", "tokens/s", "median round", "tokens/s per round"],
                [
                    [
                        r["variant"],
                        r["tokens_per_s"],
                        r["tokens_per_s_median_round"],
                        ", ".join(f"{x:,.0f}" for x in r["tokens_per_s_per_round"]),
                    ]
                    for r in tr["rows"]
                ],
            )
        )
    parts += [
        "",
        "Per-section load average at its end: "
        + ", ".join(
            f"{k} {sec.get('load_average_after', ['?'])[0]}"
            for k, sec in s.items()
            if "elapsed_s" in sec
        ),
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "benchmarks/results/results.json")
    print(render(json.loads(path.read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main()
