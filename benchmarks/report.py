"""The one place a ``results.json`` becomes tables: Markdown for the README, plain text for a run.

``python -m benchmarks.report benchmarks/results/results.json`` prints the Markdown that
``benchmarks/README.md`` records, so the README's figures are copied from the run's own file,
never typed in by hand; ``--text`` prints the plain-text form ``python -m benchmarks.run`` ends
with. Both come from one list of :class:`Part`; only the layout differs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --- rows: which figures each table shows ------------------------------------------------------
# Latencies in ms; cpu columns in cores (client: the busiest load-generator process).
INPROC_HEAD = ["B", "tokens/s", "p50 ms", "p99 ms"]
GENERATE_HEAD = [
    "conc",
    "tokens/s",
    "ITL p50",
    "ITL p99",
    "TTFT p50",
    "TTFT p99",
    "client",
    "server",
]
STREAM_HEAD = ["streams", "steps/s", "RTT p50", "RTT p99", "client", "server", "server µs/step"]


def inproc_cells(r: dict[str, Any]) -> list[Any]:
    return [r["batch"], r["tokens_per_s"], r["p50_ms"], r["p99_ms"]]


def generate_cells(r: dict[str, Any]) -> list[Any]:
    return [
        r["concurrency"],
        r["tokens_per_s"],
        r["itl"]["p50_ms"],
        r["itl"]["p99_ms"],
        r["ttft"]["p50_ms"],
        r["ttft"]["p99_ms"],
        max(x or 0 for x in r["client_cpu_fraction_per_proc"]),
        r["server_cpu_cores"],
    ]


def stream_cells(r: dict[str, Any]) -> list[Any]:
    return [
        r["concurrency"],
        r["steps_per_s"],
        r["rtt"]["p50_ms"],
        r["rtt"]["p99_ms"],
        max(x or 0 for x in r["client_cpu_fraction_per_proc"]),
        r["server_cpu_cores"],
        # The server's CPU per step: what one step costs it, whatever the load generator managed.
        r["server_cpu_cores"] / r["steps_per_s"] * 1e6 if r["steps_per_s"] else None,
    ]


ENGINE_HEAD = [
    "B",
    "µs/iteration",
    "engine thread µs",
    "loop thread µs",
    "model call µs",
    "ratio",
    "messages/iteration",
]


def engine_cells(r: dict[str, Any]) -> list[Any]:
    return [
        r["batch"],
        r["us_per_iteration"],
        r["engine_thread_us"],
        r["loop_thread_us"],
        r["model_call_us"],
        r["ratio"],
        r["messages_per_iteration"],
    ]


# --- parts: what the report says, in order -----------------------------------------------------


@dataclass(frozen=True)
class Table:
    head: list[str]
    rows: list[list[Any]]
    digits: int = 2  # decimals of numbers under 1000


@dataclass(frozen=True)
class Part:
    """One piece of the report: a title with a note after it, then a table or a paragraph.

    Text may carry Markdown emphasis (backticks, ``**``); the plain-text layout drops it.
    ``markdown_title`` False: the part sits under the README's own heading, so Markdown shows
    no title for it (plain text still does).
    """

    title: str = ""
    note: str = ""
    body: Table | str = ""
    markdown_title: bool = True
    key: str = field(default="", compare=False)


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{nd}f}"
    return str(v)


def parts(result: dict[str, Any]) -> list[Part]:
    """The report of one run, section by section; sections without figures are left out."""
    meta, s = result["meta"], result["sections"]
    m, v, mc = meta["model"], meta["versions"], meta["machine"]
    run = [
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
    ]
    out = [
        Part("lstm-serve benchmark", body="\n".join(run), markdown_title=False),
        Part("summary", body=_summary_table(result), markdown_title=False, key="summary"),
    ]

    if "rows" in s.get("inprocess_ort", {}):
        rows = [inproc_cells(r) for r in s["inprocess_ort"]["rows"]]
        out.append(
            Part(
                "1. In-process ONNX Runtime, T=1",
                " (tokens/s; ms per call)",
                Table(INPROC_HEAD, rows),
            )
        )
    te = s.get("torch_eager", {})
    if "rows" in te:
        rows = [
            [a["batch"], a["tokens_per_s"], a["p50_ms"], b["tokens_per_s"], b["p50_ms"]]
            for a, b in zip(te["rows"], te["rows_onednn_off"], strict=True)
        ]
        head = ["B", "tokens/s", "p50 ms", "tokens/s (off)", "p50 ms (off)"]
        out.append(
            Part("2. PyTorch eager, T=1", ": default (oneDNN) | oneDNN off", Table(head, rows))
        )
        pb = te.get("paired_b1")
        if pb:
            out.append(
                Part(
                    body=f"Alternating B=1 rounds ({len(pb['rounds'])}): ORT / PyTorch = "
                    f"{pb['ort_vs_torch']:.2f} (oneDNN off: {pb['ort_vs_torch_onednn_off']:.2f})."
                )
            )

    note = " (ms; client/server in cores)"
    if "rows" in s.get("generate", {}):
        out.append(Part("3. Server Generate", note, _generate(s["generate"]["rows"])))
    if "rows" in s.get("stream", {}):
        out.append(Part("4. Server StepStream steps", note, _stream(s["stream"]["rows"])))
        if s["stream"].get("grpc_floor_rows"):
            floor = _stream(s["stream"]["grpc_floor_rows"])
            out.append(Part("4b. gRPC floor: null server, same load", body=floor))
    nb = s.get("no_batching", {})
    if "generate" in nb:
        out.append(Part("5. Max batch 1: Generate", body=_generate(nb["generate"])))
        out.append(Part("5. Max batch 1: StepStream", body=_stream(nb["stream"])))
    i8 = s.get("int8", {})
    if "generate" in i8:
        out.append(Part("6. int8 model: Generate", body=_generate(i8["generate"])))
        if i8.get("stream"):
            out.append(Part("6. int8 model: StepStream", body=_stream(i8["stream"])))
    mem = s.get("memory", {})
    if "ratio" in mem:
        out.append(
            Part(
                "7. Memory",
                f": {mem['sessions']:,} sessions; RSS {mem['rss_base_bytes'] / 2**20:.1f}"
                f" MiB → {mem['rss_after_create_bytes'] / 2**20:.1f} MiB created → "
                f"{mem['rss_after_one_step_each_bytes'] / 2**20:.1f} MiB stepped once each: "
                f"+{mem['growth_bytes'] / 2**20:.1f} MiB for {mem['raw_state_bytes'] / 2**20:.1f}"
                f" MiB of raw state = **{mem['ratio']:.2f}** ({mem['bytes_per_session']:.0f} "
                f"B/session for {mem['state_bytes_per_session']} B of state).",
            )
        )
    tr = s.get("training", {})
    if "rows" in tr:
        rows = [
            [
                r["variant"],
                r["tokens_per_s"],
                r["tokens_per_s_median_round"],
                ", ".join(f"{x:,.0f}" for x in r["tokens_per_s_per_round"]),
            ]
            for r in tr["rows"]
        ]
        head = ["variant", "tokens/s", "median round", "tokens/s per round"]
        out.append(
            Part(
                "8. Training throughput",
                " (tokens/s; fastest round, median round)",
                Table(head, rows),
            )
        )
    eo = s.get("engine_overhead", {})
    if "rows" in eo:
        rows = [engine_cells(r) for r in eo["rows"]]
        out.append(
            Part(
                "9. Engine overhead",
                f" (µs per iteration without the model, fake model; median of "
                f"{len(eo['rounds'])} round(s) of {eo['window_s']:g} s)",
                Table(ENGINE_HEAD, rows, digits=3),
            )
        )
    fe = s.get("frontends", {})
    if "generate" in fe:
        gen = [[r["round"], r["frontends"], *generate_cells(r)] for r in fe["generate"]]
        st = [[r["round"], r["frontends"], *stream_cells(r)] for r in fe["stream"]]
        out.append(
            Part(
                "10. Front ends: Generate",
                f" ({' vs '.join(str(n) for n in fe['frontends'])} front-end processes; "
                "ms; client/server in cores)",
                Table(["round", "frontends", *GENERATE_HEAD], gen),
            )
        )
        out.append(
            Part("10. Front ends: StepStream", body=Table(["round", "frontends", *STREAM_HEAD], st))
        )
        out.append(
            Part(
                body=f"{fe['frontends'][1]} front ends / {fe['frontends'][0]} (median of "
                f"{fe['rounds']} round(s)): Generate 64 {_f(fe['generate_ratio'], 3)}, "
                f"StepStream 16 {_f(fe['stream_ratio'], 3)}."
            )
        )
    out.extend(_stores(s.get("state_stores", {})))
    cs = s.get("create_scaling", {})
    if "rows" in cs:
        rows = [[r["sessions"], r["fill_per_s"], r["p50_ms"], r["p99_ms"]] for r in cs["rows"]]
        out.append(
            Part(
                "12. CreateSession with many sessions held",
                f" ({cs['probes']} creates timed one by one at each size; ms)",
                Table(["sessions held", "creates/s filling", "p50 ms", "p99 ms"], rows, digits=3),
            )
        )
        out.append(
            Part(
                body=f"p50 at the larger size ÷ the smaller: {_f(cs.get('large_vs_small_p50'), 3)}."
            )
        )
    out.extend(_kserve(s.get("kserve_perf_analyzer", {})))
    out.extend(_rollout(s.get("rollout", {})))
    out.extend(_efficiency(s.get("efficiency", {})))
    out.extend(_sequence(s.get("sequence_model", {})))
    loads = ", ".join(
        f"{k} {sec.get('load_average_after', ['?'])[0]}"
        for k, sec in s.items()
        if "elapsed_s" in sec
    )
    out.append(Part(body=f"Per-section load average at its end: {loads}"))
    return out


def _kserve(kq: dict[str, Any]) -> list[Part]:
    """Section 13: perf_analyzer over KServe v2 beside our StepStream, per concurrency."""
    if "perf_analyzer" not in kq:
        return []
    ours = {r["concurrency"]: r for r in kq["stream"]}
    rows = []
    for r in kq["perf_analyzer"]:
        o = ours.get(r["concurrency"], {})
        infer = r.get("infer_per_s")
        steps = o.get("steps_per_s")
        rows.append(
            [
                r["concurrency"],
                infer if infer is not None else f"failed: {r.get('error', '?')}",
                r.get("p50_ms"),
                r.get("p99_ms"),
                steps,
                o.get("rtt", {}).get("p50_ms"),
                o.get("rtt", {}).get("p99_ms"),
                infer / steps if infer and steps else None,
                r.get("server_mean_batch"),
            ]
        )
    head = ["conc", "PA infer/s", "PA p50", "PA p99", "ours steps/s", "ours p50", "ours p99"]
    return [
        Part(
            "13. KServe v2: perf_analyzer (sequence mode) vs our StepStream",
            f" (perf_analyzer: ModelStreamInfer, sequences of {kq['sequence_length']} one-token "
            "requests; ours: benchmarks.loadgen stream, one token per step; same server; ms)",
            Table([*head, "PA ÷ ours", "PA mean batch"], rows),
        ),
        Part(
            body="perf_analyzer's infer/s ÷ our steps/s at 16: "
            f"{_f(kq.get('kserve_vs_lstmserve_16'), 3)}."
        ),
    ]


def _efficiency(ef: dict[str, Any]) -> list[Part]:
    """Section 15: the A/B against the single-process server, topologies, p1 on the same mix."""
    if "table" not in ef:
        return []
    rows = [
        [
            r["server"],
            r["streams"],
            r["steps_per_s"],
            r["cpu_ms_per_step"],
            r["server_cpu_cores"],
            r["rtt_p50_ms"],
            r["errors"],
        ]
        for r in ef["table"]
    ]
    head = ["server", "streams", "steps/s", "CPU ms/step", "server cores", "RTT p50", "errors"]
    ratios = ", ".join(
        f"{c} streams: steps/s {_f(ef.get(f'steps_ratio_s{c}'), 3)}, "
        f"CPU/step {_f(ef.get(f'cpu_ratio_s{c}'), 3)}"
        for c in (1, 16, 64)
    )
    p1 = ", ".join(
        f"{_f(r['server_tokens_per_s'], 0)} ÷ {_f(r['inprocess_tokens_per_s'], 0)}"
        for r in ef.get("p1_rounds", [])
    )
    return [
        Part(
            "15. Efficiency: A/B against the single-process server "
            f"({ef['base_commit']}), same run",
            f" (StepStream, one token per message; medians of {ef['rounds']} round(s), servers "
            "in rotated order; CPU summed over each server's whole process tree)",
            Table(head, rows, digits=3),
        ),
        Part(
            body=f"Default topology here: **{ef['default_topology']}** (fastest at 16 streams: "
            f"{ef['fastest_topology_s16']}; single ÷ split steps/s at 16: "
            f"{_f(ef.get('single_vs_split_s16'), 3)}). The default ÷ {ef['base_commit']}: "
            f"{ratios}. p1 on the same mix (Generate at 64 through the server ÷ the same engine "
            f"in process, tokens/s per round: {p1}): {_f(ef.get('p1_mix_ratio'), 3)}."
        ),
    ]


def _sequence(sq: dict[str, Any]) -> list[Part]:
    """Section 16: the bundled forecaster's held-out error and its throughput."""
    if "heldout" not in sq:
        return []
    ho = sq["heldout"]
    err = [[name, r["mae"], r["rmse"]] for name, r in ho["rows"].items()]
    base = {r["batch"]: r for r in sq.get("inprocess", [])}
    rows = [
        [
            r["concurrency"],
            r["steps_per_s"],
            r["rtt"]["p50_ms"],
            r["rtt"]["p99_ms"],
            base.get(r["concurrency"], {}).get("steps_per_s"),
            r.get("vs_inprocess"),
        ]
        for r in sq.get("stream", [])
    ]
    return [
        Part(
            "16. Sequence model: the bundled forecaster",
            f" (`{sq['model']}`, F={sq['num_features']}, O={sq['num_outputs']}; held-out "
            f"{ho['dataset']}, {ho['test_points']} points, one step ahead, data units)",
            Table(["model", "MAE", "RMSE"], err, digits=2),
        ),
        Part(
            "16b. Sequence model: StepStream against ONNX Runtime in process",
            " (one feature row per message; in process: the same batch, B = streams; ms)",
            Table(
                ["streams", "steps/s", "RTT p50", "RTT p99", "in-process steps/s", "ratio"],
                rows,
                digits=3,
            ),
        ),
    ]


ROLLOUT_HEAD = ["window", "steps/s", "p50 ms", "p99 ms", "max ms", "errors", "client", "server"]


def rollout_cells(name: str, r: dict[str, Any]) -> list[Any]:
    errors = r.get("errors")
    return [
        name,
        r["steps_per_s"],
        r["p50_ms"],
        r["p99_ms"],
        r.get("max_ms"),
        None if errors is None else sum(errors.values()),
        r.get("client_cpu_fraction"),
        r.get("server_cpu_cores"),
    ]


def _verdict(v: dict[str, Any]) -> str:
    return "–" if v["met"] is None else ("met" if v["met"] else "**missed**")


def _rollout(ro: dict[str, Any]) -> list[Part]:
    """Section 14: the two windows, the time to v2, memory per version, the processes' RSS."""
    if "steady" not in ro:
        return []
    rows = [rollout_cells("steady (v1 only)", ro["steady"])]
    rows.append(rollout_cells("during (publish at its start)", ro["during"]))
    if "publish_to_v2" in ro:
        rows.append(rollout_cells("  publish → v2 served", ro["publish_to_v2"]))
    if "after_v2" in ro:
        rows.append(rollout_cells("  v2 served → window end", ro["after_v2"]))
    out = [
        Part(
            "14. Live rollout: StepStream on v1 while v2 is published and loads",
            f" ({ro['streams']} streams on named sessions of v1, one token per message; "
            f"windows of {ro['window_s']:g} s; poll mode, --repository-poll-s "
            f"{ro['poll_s']:g}; v2 = `{ro['repository']['2']}`; ms; client/server in cores)",
            Table(ROLLOUT_HEAD, rows),
        )
    ]
    v = ro["verdicts"]
    load = ro.get("server_load_s")
    first = ro.get("first_v2_s")
    first_text = (
        f"**{first:.3f} s** from the publish (`os.replace`) to the first CreateSession served "
        f"by v2 ({ro['probes']} probes, one every {ro['probe_s'] * 1000:g} ms)"
        if first is not None
        else f"v2 never served: {ro.get('first_v2_missing')}"
    )
    if load is not None:
        first_text += f"; the server's own load time of v2: {load:.3f} s"
    pinned = ", ".join(f"{k}: {n}" for k, n in ro["versions_at_end"].items())
    out.append(
        Part(
            body=f"p99 during ÷ steady: **{_f(ro['p99_during_vs_steady'], 3)}** (target <= 1.5: "
            f"{_verdict(v['p99_during_vs_steady'])}); steps/s during ÷ steady "
            f"{_f(ro['steps_during_vs_steady'], 3)}; errors **{ro['errors']}** (target 0: "
            f"{_verdict(v['errors'])}); sessions' versions at the end (GetSession) {pinned} "
            f"(all on v1: {_verdict(v['sessions_stayed_on_v1'])}). {first_text}."
        )
    )
    if ro.get("worst_during"):

        def slowest(rows: list[dict[str, float]]) -> str:
            return ", ".join(f"{r['ms']:.1f} at {r['at_s']:.2f}" for r in rows)

        out.append(
            Part(
                body="Slowest 10 steps (ms at seconds since the window opened): steady "
                f"{slowest(ro['worst_steady'])}; during (since the publish) "
                f"{slowest(ro['worst_during'])}."
            )
        )
    mem_rows = []
    for moment, label in (("before_publish", "before"), ("after_v2", "v2 served")):
        for r in ro["memory"].get(moment) or []:
            numbers = [
                r["sessions"],
                r["memory_bytes"],
                r["weights_bytes"],
                r["state_bytes_per_session"],
                r["difference_bytes"],
                r["prometheus_memory_bytes"],
                r["prometheus_sessions"],
            ]
            # As floats, so that every byte count gets its thousands separators.
            mem_rows.append(
                [
                    label,
                    r["version"],
                    r["state"],
                    *(None if x is None else float(x) for x in numbers),
                ]
            )
    head = ["when", "version", "state", "sessions", "memory_bytes", "weights B", "state B/session"]
    head += ["ListModels − expected", "Prometheus bytes", "Prometheus sessions"]
    out.append(
        Part(
            "14. Memory per loaded version",
            " (ListModels' memory_bytes against the weights file + sessions × state bytes; "
            "the Prometheus gauges beside it)",
            Table(head, mem_rows, digits=0),
        )
    )
    rss = ro["rss"]
    when = ["before_publish", "after_v2", "end_of_window", "after_v1_unloaded"]
    roles = [*sorted({r for k in when if rss.get(k) for r in rss[k]} - {"total"}), "total"]
    mib = 2**20
    rss_rows = [
        [role, *(None if not rss.get(k) else rss[k].get(role, 0) / mib for k in when)]
        for role in roles
    ]
    since = ro["seconds_since_publish"]
    head = ["process"] + [
        f"{k.replace('_', ' ')} ({_f(since[k], 2)} s)" if since.get(k) is not None else k
        for k in when
    ]
    out.append(
        Part(
            "14. Server RSS (MiB)",
            " (from /proc, per process role; seconds since the publish)",
            Table(head, rss_rows, digits=1),
        )
    )
    if ro.get("rss_growth_v2_bytes") is not None:
        out.append(
            Part(
                body=f"RSS growth once v2 served: {ro['rss_growth_v2_bytes'] / mib:+.1f} MiB "
                f"(engine {ro['rss_growth_v2_engine_bytes'] / mib:+.1f} MiB) for a "
                f"{ro['weights_bytes']['2'] / mib:.2f} MiB weights file: "
                f"{_f(ro['rss_growth_v2_vs_weights'], 2)}× the file."
            )
        )
    return out


def _stores(st: dict[str, Any]) -> list[Part]:
    """Section 11: the rows per round and store, the ratios to memory, the scale test."""
    if "rows" not in st:
        return []
    rows = [[r["round"], r["store"], *stream_cells(r)] for r in st["rows"]]
    out = [
        Part(
            "11. State stores: StepStream on named sessions",
            " (every step a write-through on sqlite and redis; ms; client/server in cores)",
            Table(["round", "store", *STREAM_HEAD], rows),
        )
    ]
    ratios = "; ".join(
        f"{name} " + ", ".join(f"{_f(v, 3)} at {k.removeprefix('stream')}" for k, v in by.items())
        for name, by in st["vs_memory"].items()
    )
    text = f"Steps/s ÷ memory's at the same streams (median of {st['rounds']} round(s)): "
    text += f"{ratios or '–'}."
    text += f" SQLite file on {st.get('sqlite_fs') or 'an unknown file system'}."
    if st.get("redis_skipped"):
        text += f" No Redis: {st['redis_skipped']}."
    out.append(Part(body=text))
    sc = st.get("scale_test", {})
    if "result" in sc:
        r = sc["result"]
        text = (
            f"Scale test (`{sc['command']}`, nginx + Redis + {r['replicas']} replicas, one killed "
            f"with -9): {'passed' if sc['passed'] else '**failed**'}; failover "
            f"{_f(r['failover_s_first'], 3)} s first, **{_f(r['failover_s_last'], 3)} s** last "
            f"({r['sessions_affected_by_the_kill']} of {r['sessions']} sessions affected); "
            f"{_f(r['calls_per_s'], 1)} calls/s through the proxy; {r['retries']} retries, "
            f"{r['mismatches']} mismatches."
        )
    else:
        text = f"Scale test: not run ({sc.get('skipped', 'no result')})."
    out.append(Part(body=text))
    return out


def _summary_table(result: dict[str, Any]) -> Table:
    targets = {t["key"]: t for t in result["targets"]}
    rows = []
    for key, val in result["summary"].items():
        t = targets.get(key)
        verdict = ""
        if t is not None:
            verdict = "–" if t["met"] is None else ("met" if t["met"] else "**missed**")
        why = result["summary_reasons"].get(key)
        value = f"{_f(val, 3)}{' (' + why + ')' if why else ''}"
        rows.append([f"`{key}`", value, t["target"] if t else "", verdict])
    return Table(["figure", "value", "target", "verdict"], rows)


def _generate(rows: list[dict[str, Any]]) -> Table:
    return Table(GENERATE_HEAD, [generate_cells(r) for r in rows])


def _stream(rows: list[dict[str, Any]]) -> Table:
    return Table(STREAM_HEAD, [stream_cells(r) for r in rows])


# --- layouts -----------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    """The Markdown the README records: bold titles, pipe tables."""
    return "\n\n".join(_markdown(p) for p in parts(result))


def _markdown(part: Part) -> str:
    title = f"**{part.title}**{part.note}" if part.title and part.markdown_title else ""
    if isinstance(part.body, Table):
        head, rows = part.body.head, part.body.rows
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        nd = part.body.digits
        lines += ["| " + " | ".join(_f(c, nd) for c in row) + " |" for row in rows]
        body = "\n".join(lines)
    else:
        body = part.body
    return "\n\n".join(x for x in (title, body) if x)


def render_text(result: dict[str, Any]) -> str:
    """Plain text for a terminal: ``## title`` lines, aligned columns, the summary last (where
    the end of a run leaves it in view)."""
    ps = parts(result)
    ps = [p for p in ps if p.key != "summary"] + [p for p in ps if p.key == "summary"]
    return "\n\n".join(_text(p) for p in ps)


def _plain(s: str) -> str:
    return s.replace("**", "").replace("`", "")


def _text(part: Part) -> str:
    lines = [f"## {_plain(part.title + part.note)}"] if part.title else []
    if isinstance(part.body, Table):
        head, rows = part.body.head, part.body.rows
        cells = [[_plain(_f(c, part.body.digits)) for c in row] for row in rows]
        widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(head)]
        # Numbers right-aligned so their digits line up; words and lists left-aligned.
        right = [
            all(isinstance(row[i], int | float) or row[i] is None for row in rows)
            for i in range(len(head))
        ]
        for row in [head, *cells]:
            lines.append(
                "  ".join(
                    c.rjust(w) if r else c.ljust(w)
                    for c, w, r in zip(row, widths, right, strict=True)
                ).rstrip()
            )
    elif part.body:
        lines.append(_plain(part.body))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    text = "--text" in args
    paths = [a for a in args if a != "--text"]
    path = Path(paths[0] if paths else "benchmarks/results/results.json")
    result = json.loads(path.read_text(encoding="utf-8"))
    print(render_text(result) if text else render(result))


if __name__ == "__main__":
    main()
