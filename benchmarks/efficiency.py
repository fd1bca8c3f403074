"""Section 15: efficiency, measured against the single-process server in the same run (issue 18).

* **A/B.** The server as it was before the process split (commit :data:`BASE_COMMIT`, checked
  out into a temporary git worktree, or ``--base-src TREE``) and this tree in both topologies
  (``--topology single``: engine and gRPC in one process; ``--topology split --frontends 1``),
  each started in turn and driven by the same closed-loop load generator (StepStream, one token
  per message) at 1, 16 and 64 streams; ``rounds`` rounds, the order of the servers rotated
  every round, medians over rounds. Server CPU is summed over each server's whole process tree
  (supervisor, engine, front ends, every thread) over exactly the measured window, so "CPU per
  step" is cores x seconds / steps. The older server names its service ``lstmserve.v1.LstmServe``
  (renamed since; the messages are the same): the load generator is told the name it has.
* **p1 made fair.** Generate at 64 concurrent callers through the default topology, divided by
  the same engine driven in this process on the same mix (the load generator's prompt, tokens,
  sampling and seeds; no gRPC, no second process), measured right before it in every round.
* **The default topology.** What ``--topology auto`` resolves to on this host, and whether it is
  the faster of the two measured here.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import server_bench as sb
from .common import ROOT, SectionSkipped, ratio
from .loadgen import PROMPT, SERVICE

# The last commit before the engine moved into its own process (the single-process server).
BASE_COMMIT = "909ed69"
STREAMS = (1, 16, 64)
GENERATE_CONCURRENCY = 64
# Issue 18's targets, judged on a full run's medians.
CPU_RATIO_TARGET_16 = 0.85  # server CPU per step at 16 streams, new (default) / single-process
STEPS_RATIO_TARGET = 1.0  # steps/s new / old at every stream count
P1_MIX_TARGET = 0.9


@dataclass(frozen=True)
class Config:
    name: str
    source: Path | None  # None: this checkout
    flags: tuple[str, ...]
    service: str


@contextlib.contextmanager
def base_tree(ref: str = BASE_COMMIT) -> Iterator[Path]:
    """``ref`` checked out (detached) into a temporary git worktree, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-base-") as tmp:
        path = Path(tmp) / "tree"
        done = subprocess.run(
            ["git", "worktree", "add", "--detach", "--force", str(path), ref],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            msg = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SectionSkipped(f"cannot check out {ref} for the A/B: {msg}")
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True
            )


def service_name(tree: Path) -> str:
    """The full name of the LstmServe service in ``tree``'s proto (it was renamed once)."""
    text = (tree / "protos" / "lstmserve" / "v1" / "lstm_serve.proto").read_text()
    package = re.search(r"^package\s+([\w.]+);", text, re.M)
    service = re.search(r"^service\s+(\w+)", text, re.M)
    if not package or not service:
        return SERVICE
    return f"{package.group(1)}.{service.group(1)}"


def configs(base: Path) -> list[Config]:
    return [
        Config("single-process " + BASE_COMMIT, base, (), service_name(base)),
        Config("single", None, ("--topology", "single"), SERVICE),
        Config("split", None, ("--topology", "split", "--frontends", "1"), SERVICE),
    ]


def default_topology() -> str:
    """What ``--topology auto`` resolves to here (the rule in server/settings.py)."""
    from server.settings import Settings

    return Settings().resolved_topology()


def run(
    model_path: str,
    vocab: int,
    *,
    rounds: int,
    duration: float,
    warmup: float,
    lead: float,
    max_tokens: int,
    base: Path | None = None,
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        tree = base if base is not None else stack.enter_context(base_tree())
        cfgs = configs(tree)
        chosen = default_topology()
        raw: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cfgs}
        p1: list[dict[str, Any]] = []
        for r in range(rounds):
            # Rotate the order, so no server always runs first (warm caches) or last.
            for cfg in cfgs[r % len(cfgs) :] + cfgs[: r % len(cfgs)]:
                with sb.running_server(model_path, extra=cfg.flags, source=cfg.source) as srv:
                    for c in STREAMS:
                        spec = sb.LoadSpec(
                            "stream", c, duration, warmup, lead=lead, service=cfg.service
                        )
                        row = sb.drive(srv, spec, vocab)
                        row["round"] = r
                        row["cpu_ms_per_step"] = 1e3 * row["server_cpu_cores"] / row["steps_per_s"]
                        raw[cfg.name].append(row)
                    if cfg.name == chosen:
                        inproc = inprocess_generate(
                            model_path, GENERATE_CONCURRENCY, duration, warmup, max_tokens
                        )
                        spec = sb.LoadSpec(
                            "generate",
                            GENERATE_CONCURRENCY,
                            duration,
                            warmup,
                            max_tokens,
                            lead=lead,
                        )
                        served = sb.drive(srv, spec, vocab)
                        p1.append(
                            {
                                "round": r,
                                "server_tokens_per_s": served["tokens_per_s"],
                                "inprocess_tokens_per_s": inproc["tokens_per_s"],
                                "ratio": ratio(served["tokens_per_s"], inproc["tokens_per_s"]),
                                "errors": served["errors"],
                            }
                        )
    return summarise(cfgs, raw, p1, chosen, rounds)


def _median(rows: list[dict[str, Any]], c: int, key: str) -> float | None:
    values = [r[key] for r in rows if r["concurrency"] == c and r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(
    cfgs: list[Config],
    raw: dict[str, list[dict[str, Any]]],
    p1: list[dict[str, Any]],
    chosen: str,
    rounds: int,
) -> dict[str, Any]:
    base = cfgs[0].name
    table = []
    for cfg in cfgs:
        for c in STREAMS:
            rows = raw[cfg.name]
            table.append(
                {
                    "server": cfg.name,
                    "flags": list(cfg.flags),
                    "streams": c,
                    "steps_per_s": _median(rows, c, "steps_per_s"),
                    "cpu_ms_per_step": _median(rows, c, "cpu_ms_per_step"),
                    "server_cpu_cores": _median(rows, c, "server_cpu_cores"),
                    "rtt_p50_ms": statistics.median(
                        [r["rtt"]["p50_ms"] for r in rows if r["concurrency"] == c]
                    ),
                    "errors": sum(sum(r["errors"].values()) for r in rows if r["concurrency"] == c),
                }
            )

    def at(server: str, c: int, key: str) -> float | None:
        for row in table:
            if row["server"] == server and row["streams"] == c:
                value: float | None = row[key]
                return value
        return None

    out: dict[str, Any] = {
        "base_commit": BASE_COMMIT,
        "rounds": rounds,
        "default_topology": chosen,
        "table": table,
        "raw": raw,
        "p1_rounds": p1,
    }
    for c in STREAMS:
        out[f"steps_ratio_s{c}"] = ratio(at(chosen, c, "steps_per_s"), at(base, c, "steps_per_s"))
        out[f"cpu_ratio_s{c}"] = ratio(
            at(chosen, c, "cpu_ms_per_step"), at(base, c, "cpu_ms_per_step")
        )
        out[f"single_vs_split_s{c}"] = ratio(
            at("single", c, "steps_per_s"), at("split", c, "steps_per_s")
        )
    ratios = [p["ratio"] for p in p1 if p["ratio"] is not None]
    out["p1_mix_ratio"] = statistics.median(ratios) if ratios else None
    faster = "single" if (out["single_vs_split_s16"] or 0) >= 1.0 else "split"
    out["fastest_topology_s16"] = faster
    out["default_is_fastest"] = faster == chosen
    return out


# --- the same engine in this process, on the load generator's Generate mix ------------------


def inprocess_generate(
    model_path: str, concurrency: int, duration: float, warmup: float, max_tokens: int
) -> dict[str, Any]:
    """Tokens/s of ``concurrency`` callers each looping Generate(PROMPT, max_tokens,
    temperature 1, seed+n) on an ephemeral session, exactly as ``loadgen --mode generate``
    asks, straight on the data plane that ``lstm-serve`` builds (same settings, no gRPC)."""
    return asyncio.run(_inprocess_generate(model_path, concurrency, duration, warmup, max_tokens))


async def _inprocess_generate(
    model_path: str, concurrency: int, duration: float, warmup: float, max_tokens: int
) -> dict[str, Any]:
    from server.app import build_core
    from server.dataplane import GenerateParams
    from server.settings import Settings

    settings = Settings(model=model_path, port=0, metrics_port=-1).validate()
    core = await build_core(settings)
    start = time.monotonic()
    ws, we = start + warmup, start + warmup + duration
    tokens = 0

    async def caller(seed: int) -> None:
        nonlocal tokens
        n = 0
        while time.monotonic() < we:
            params = GenerateParams(max_tokens=max_tokens, temperature=1.0, top_k=0, seed=seed + n)
            n += 1
            chunks = core.plane.generate("", PROMPT, params)
            async with contextlib.aclosing(chunks):
                async for ch in chunks:
                    t = time.monotonic()
                    if ws <= t <= we:
                        tokens += len(ch.token_ids)
                    if t > we:
                        break

    try:
        # The load generator's seeds: caller i starts at 100,000 x i.
        await asyncio.gather(*(caller(100_000 * i) for i in range(concurrency)))
    finally:
        await core.stop()
    return {"concurrency": concurrency, "window_s": duration, "tokens_per_s": tokens / duration}
