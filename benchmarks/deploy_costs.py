"""Deployment costs: Redis memory per session, Redis cost per commit, nginx per unary Step.

What deploy/README.md's "Capacity" paragraphs quote, measured on loopback with Debian's
``redis-server`` and ``nginx`` and a real ``lstm-serve``. Not a section of ``benchmarks.run``
(it needs nginx and two Redis servers); run on its own::

    .venv/bin/python -m benchmarks.deploy_costs [--records 20000] [--commit-s 3]
        [--bench-requests 100000] [--rounds 5] [--calls 1000] [--server-src TREE]
        [--out benchmarks/results/deploy_costs.json]

Three parts, each printed as a table and written to the JSON:

1. **The record and nginx.** A throwaway Redis (``tests.state_services.redis_server``), one
   ``lstm-serve --state-store redis://... --frontends 1`` (``benchmarks.server_bench``) and nginx
   with ``deploy/nginx/render.py scale`` in front of it, unprivileged from a temporary folder
   (as ``scripts/scale_test.py`` runs it). A session created with a server-chosen id and stepped
   8 tokens is read back from Redis as the server wrote it (its record's bytes, ``MEMORY USAGE``
   of its key): that record is the template for part 2. Then unary ``Step`` calls (one token,
   last-position logits, every call a write-through commit) on two named sessions, one called
   directly and one through nginx, ``--calls`` per path per round, ``--rounds`` rounds that
   alternate which path goes first; p50/p99 per round and path.
2. **Redis memory per session.** A second, fresh Redis. ``INFO memory`` ``used_memory`` before
   and after ``--records`` records written through the project's own store
   (``server.state.redis.RedisStore.put``, batches of 100, the compare-and-set EVALSHA in one
   MULTI/EXEC per batch): copies of the template under fresh 32-hex ids, with the server's
   TTL. Bytes per record = the growth / records.
3. **Redis cost per commit.** ``CONFIG RESETSTAT``, then for ``--commit-s`` seconds 8 asyncio
   tasks of one process commit new versions of those records through ``RedisStore.put`` in
   batches of 16 (what one engine tick sends); then ``redis-benchmark`` (8 connections,
   pipelines of 16) sends the same EVALSHA with a same-sized value to keys prepared at version
   1, so that every call writes. For each: commits/s, ``INFO commandstats`` usec_per_call of
   EVALSHA (and EXEC's time per commit: it includes the EVALSHAs it runs), and Redis's whole
   CPU time (``INFO cpu``: protocol, networking, everything) per commit.

The machine's other load is recorded (load average before and after); the figures are for the
machine that ran them, the client and the servers sharing its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import io
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import common
from . import server_bench as sb

KEY_PREFIX = "lstm-serve:session:"  # server.state.redis.KEY_PREFIX
BATCH_WRITE = 100  # records per put() while filling Redis
BATCH_COMMIT = 16  # records per put() in the commit phase (one engine tick's worth)
COMMIT_TASKS = 8
BENCH_CONNECTIONS = 8
BENCH_PIPELINE = 16
TEMPLATE_STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str:
    from tests.state_services import ServiceError, find_program

    try:
        return find_program(name, install=False)
    except ServiceError as e:
        raise SystemExit(f"deploy-costs: {e}") from None


def _version(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    return " ".join((p.stdout + p.stderr).split())


def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def _redis_cpu_s(r: Any) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _cmdstats(r: Any) -> dict[str, dict[str, float]]:
    stats = r.info("commandstats")
    return {
        name: {
            "calls": int(stats[f"cmdstat_{name}"]["calls"]),
            "usec": int(stats[f"cmdstat_{name}"]["usec"]),
            "usec_per_call": float(stats[f"cmdstat_{name}"]["usec_per_call"]),
        }
        for name in ("evalsha", "exec", "multi")
        if f"cmdstat_{name}" in stats
    }


# --- part 1: the record as the server writes it, and nginx's overhead ---------------------------


def _timed_steps(client: Any, sid: str, calls: int, rng: np.random.Generator) -> np.ndarray:
    tokens = rng.integers(1, 28, size=calls)
    out = np.empty(calls, dtype=np.int64)
    for i, tok in enumerate(tokens):
        t0 = time.perf_counter_ns()
        client.step(sid, token_ids=[int(tok)])
        out[i] = time.perf_counter_ns() - t0
    return out


def record_and_nginx(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from server.client import LstmClient
    from tests.state_services import nginx_proxy, redis_server

    model = str(common.BUNDLED_MODEL)
    rng = np.random.default_rng(0)
    with redis_server() as url:
        flags = ["--state-store", url, "--frontends", "1"]
        with (
            sb.running_server(model, extra=flags, source=args.server_src) as srv,
            nginx_proxy([srv.target], workdir) as proxy,
            LstmClient(srv.target, timeout=10) as direct,
            LstmClient(proxy, timeout=10) as via,
        ):
            sid = direct.create_session()
            direct.step(sid, token_ids=list(range(1, TEMPLATE_STEPS + 1)))
            r = _redis(url)
            key = KEY_PREFIX + sid
            blob = bytes(r.hget(key, "r"))
            record = {
                "session_id_chars": len(sid),
                "steps": TEMPLATE_STEPS,
                "record_bytes": len(blob),
                "key_bytes": len(key),
                "memory_usage_key_bytes": int(r.memory_usage(key, samples=0)),
                "ttl_s": int(r.ttl(key)),
                "template_hex": blob.hex(),
            }
            paths = {
                "direct": (direct, direct.create_session()),
                "nginx": (via, via.create_session()),
            }
            for client, s in paths.values():  # warm-up: channels, nginx's upstream keepalive
                _timed_steps(client, s, 100, rng)
            rounds = []
            for i in range(args.rounds):
                order = ["direct", "nginx"] if i % 2 == 0 else ["nginx", "direct"]
                for name in order:
                    client, s = paths[name]
                    t0 = time.perf_counter()
                    lat = _timed_steps(client, s, args.calls, rng)
                    wall = time.perf_counter() - t0
                    pct = common.percentiles_ms(lat)
                    rounds.append(
                        {
                            "round": i,
                            "path": name,
                            "calls": args.calls,
                            "calls_per_s": args.calls / wall,
                            "p50_ms": pct["p50_ms"],
                            "p99_ms": pct["p99_ms"],
                            "mean_ms": pct["mean_ms"],
                        }
                    )
            steps = {name: int(c.get_session(s).steps) for name, (c, s) in paths.items()}
    added = []
    for i in range(args.rounds):
        by = {row["path"]: row for row in rounds if row["round"] == i}
        added.append(by["nginx"]["p50_ms"] - by["direct"]["p50_ms"])
    p50 = {
        name: float(np.median([row["p50_ms"] for row in rounds if row["path"] == name]))
        for name in ("direct", "nginx")
    }
    nginx = {
        "rounds": rounds,
        "steps_read_back": steps,
        "p50_ms_median": p50,
        "added_p50_ms_per_round": added,
        "added_p50_ms_median": float(np.median(added)),
    }
    return {"record": record, "nginx": nginx}


# --- parts 2 and 3: Redis memory and cost per commit, through the store's own code --------------


async def _fill(store: Any, template: Any, ids: list[str]) -> None:
    from server.state.base import Write

    now = time.time()
    for i in range(0, len(ids), BATCH_WRITE):
        writes = [
            Write(
                template.replace(
                    session_id=sid, version=1, created_unix_s=now, last_used_unix_s=now
                ),
                0,
            )
            for sid in ids[i : i + BATCH_WRITE]
        ]
        ok = await store.put(writes)
        if not all(ok):
            raise SystemExit("deploy-costs: a fresh record's compare-and-set failed")


async def _commit_load(store: Any, template: Any, ids: list[str], seconds: float) -> int:
    """COMMIT_TASKS tasks, each over its own share of ``ids``, commit version + 1 in batches of
    BATCH_COMMIT until ``seconds`` pass; returns the commits made."""
    from server.state.base import Write

    versions = dict.fromkeys(ids, 1)
    shares = [ids[k::COMMIT_TASKS] for k in range(COMMIT_TASKS)]
    deadline = time.monotonic() + seconds
    done = [0] * COMMIT_TASKS

    async def task(k: int) -> None:
        mine, pos = shares[k], 0
        while time.monotonic() < deadline:
            batch = [mine[(pos + j) % len(mine)] for j in range(BATCH_COMMIT)]
            pos += BATCH_COMMIT
            now = time.time()
            writes = [
                Write(
                    template.replace(
                        session_id=sid, version=versions[sid] + 1, last_used_unix_s=now
                    ),
                    versions[sid],
                )
                for sid in batch
            ]
            ok = await store.put(writes)
            if not all(ok):
                raise SystemExit("deploy-costs: a commit lost its compare-and-set")
            for sid in batch:
                versions[sid] += 1
            done[k] += len(batch)

    await asyncio.gather(*(task(k) for k in range(COMMIT_TASKS)))
    return sum(done)


def redis_costs(args: argparse.Namespace, template_bytes: bytes) -> dict[str, Any]:
    from server.state.record import SessionRecord
    from server.state.redis import _CAS_LUA, RedisStore
    from tests.state_services import redis_server

    template = SessionRecord.from_bytes(template_bytes)
    ids = [secrets.token_hex(16) for _ in range(args.records)]
    with redis_server() as url:
        r = _redis(url)
        store = RedisStore(url)
        loop = asyncio.new_event_loop()
        try:
            before = r.info("memory")
            t0 = time.perf_counter()
            loop.run_until_complete(_fill(store, template, ids))
            fill_s = time.perf_counter() - t0
            after = r.info("memory")
            sample = ids[:: max(1, len(ids) // 200)]
            usage = [int(r.memory_usage(KEY_PREFIX + sid, samples=0)) for sid in sample]
            grown = int(after["used_memory"]) - int(before["used_memory"])
            memory = {
                "records": len(ids),
                "record_bytes": len(template_bytes),
                "used_memory_before": int(before["used_memory"]),
                "used_memory_after": int(after["used_memory"]),
                "bytes_per_record": grown / len(ids),
                "used_memory_rss_after": int(after["used_memory_rss"]),
                "mem_fragmentation_ratio_after": float(after["mem_fragmentation_ratio"]),
                "memory_usage_per_key_mean": float(np.mean(usage)),
                "allocator": str(after.get("mem_allocator")),
                "fill_s": fill_s,
                "fill_records_per_s": len(ids) / fill_s,
            }

            # Part 3a: the store's own code, one process, 8 tasks, batches of 16.
            r.config_resetstat()
            cpu0 = _redis_cpu_s(r)
            t0 = time.perf_counter()
            commits = loop.run_until_complete(_commit_load(store, template, ids, args.commit_s))
            wall = time.perf_counter() - t0
            cpu = _redis_cpu_s(r) - cpu0
            stats = _cmdstats(r)
            store_phase = {
                "client": f"RedisStore.put, {COMMIT_TASKS} asyncio tasks in one process, "
                f"batches of {BATCH_COMMIT} (one MULTI/EXEC each)",
                "seconds": wall,
                "commits": commits,
                "commits_per_s": commits / wall,
                "commandstats": stats,
                # EXEC's time includes the EVALSHAs it runs: Redis's command time per commit.
                "exec_usec_per_commit": stats.get("exec", {}).get("usec", 0) / commits,
                "redis_cpu_us_per_commit": cpu * 1e6 / commits,
                "redis_cpu_cores": cpu / wall,
            }
            loop.run_until_complete(store.close())
        finally:
            loop.close()

        # Part 3b: redis-benchmark, the same script and value size, keys at version 1.
        n_keys = 10_000
        bench_ids = [f"bench-{i:012d}" for i in range(n_keys)]  # = __rand_int__ below
        loop = asyncio.new_event_loop()
        try:
            store = RedisStore(url)
            loop.run_until_complete(_fill(store, template, bench_ids))
            loop.run_until_complete(store.close())
        finally:
            loop.close()
        sha = hashlib.sha1(_CAS_LUA.encode()).hexdigest()
        r.script_load(_CAS_LUA)
        expire_ms = str(int((time.time() + 3600) * 1000))
        port = url.rsplit(":", 1)[1].split("/")[0]
        # The value is the record's length in ASCII (argv cannot carry its bytes); the script
        # never parses it. Expected version 1, new version 1: every call passes the check and
        # writes (HSET of both fields, PEXPIREAT).
        cmd = [_binary("redis-benchmark"), "-h", "127.0.0.1", "-p", port]
        cmd += ["-c", str(BENCH_CONNECTIONS), "-P", str(BENCH_PIPELINE)]
        cmd += ["-n", str(args.bench_requests), "-r", str(n_keys), "--csv"]
        cmd += ["EVALSHA", sha, "1", KEY_PREFIX + "bench-__rand_int__", "1", "1"]
        cmd += ["x" * len(template_bytes), expire_ms]
        r.config_resetstat()
        cpu0 = _redis_cpu_s(r)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        cpu = _redis_cpu_s(r) - cpu0
        stats = _cmdstats(r)
        rows = list(csv.DictReader(io.StringIO(proc.stdout)))
        if proc.returncode != 0 or not rows:
            raise SystemExit(f"deploy-costs: redis-benchmark failed: {proc.stderr.strip()[-400:]}")
        row = rows[-1]
        # Every call wrote: the sampled keys hold the benchmark's value, no longer the record.
        probe = [bytes(r.hget(KEY_PREFIX + sid, "r") or b"") for sid in bench_ids[::100]]
        replaced = sum(1 for v in probe if v == b"x" * len(template_bytes)) / len(probe)
        calls = stats.get("evalsha", {}).get("calls", 0)
        bench_phase = {
            "client": f"redis-benchmark -c {BENCH_CONNECTIONS} -P {BENCH_PIPELINE} -n "
            f"{args.bench_requests} -r {n_keys} EVALSHA <cas> 1 KEY 1 1 <{len(template_bytes)} B> "
            "<expiry>",
            "commits_per_s": float(row["rps"]),
            "p50_ms": float(row.get("p50_latency_ms") or "nan"),
            "wall_s": wall,
            "commandstats": stats,
            "redis_cpu_us_per_commit": cpu * 1e6 / calls if calls else None,
            "redis_cpu_cores": cpu / wall,
            "sampled_keys_written": replaced,
        }
    return {"memory": memory, "commits_store": store_phase, "commits_redis_benchmark": bench_phase}


# --- output ---------------------------------------------------------------------------------------


def _commit() -> str:
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=common.ROOT, capture_output=True, text=True
    ).stdout.strip()
    return head + (" + uncommitted changes" if dirty else "")


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report(res: dict[str, Any]) -> str:
    rec, mem = res["record"], res["redis"]["memory"]
    st, rb = res["redis"]["commits_store"], res["redis"]["commits_redis_benchmark"]
    ng = res["nginx"]
    out = [
        _table(
            "Redis memory per session",
            [
                "records",
                "record B",
                "key B",
                "used_memory growth B/record",
                "MEMORY USAGE B/key",
                "fragmentation",
                "TTL s",
            ],
            [
                [
                    f"{mem['records']:,}",
                    f"{mem['record_bytes']:,}",
                    str(rec["key_bytes"]),
                    f"{mem['bytes_per_record']:,.0f}",
                    f"{mem['memory_usage_per_key_mean']:,.0f}",
                    f"{mem['mem_fragmentation_ratio_after']:.2f}",
                    str(rec["ttl_s"]),
                ]
            ],
        ),
        _table(
            "Redis cost per commit (compare-and-set EVALSHA)",
            [
                "client",
                "commits/s",
                "EVALSHA µs/call",
                "EXEC µs/commit",
                "Redis CPU µs/commit",
                "Redis cores",
            ],
            [
                [
                    "RedisStore.put (8 tasks, batches of 16)",
                    f"{st['commits_per_s']:,.0f}",
                    f"{st['commandstats']['evalsha']['usec_per_call']:.2f}",
                    f"{st['exec_usec_per_commit']:.2f}",
                    f"{st['redis_cpu_us_per_commit']:.1f}",
                    f"{st['redis_cpu_cores']:.2f}",
                ],
                [
                    "redis-benchmark (-c 8 -P 16)",
                    f"{rb['commits_per_s']:,.0f}",
                    f"{rb['commandstats']['evalsha']['usec_per_call']:.2f}",
                    "–",
                    f"{rb['redis_cpu_us_per_commit']:.1f}",
                    f"{rb['redis_cpu_cores']:.2f}",
                ],
            ],
        ),
        _table(
            "Unary Step, direct vs through nginx (write-through to Redis; ms)",
            ["round", "path", "calls", "calls/s", "p50", "p99"],
            [
                [
                    str(r["round"]),
                    r["path"],
                    f"{r['calls']:,}",
                    f"{r['calls_per_s']:,.0f}",
                    f"{r['p50_ms']:.3f}",
                    f"{r['p99_ms']:.3f}",
                ]
                for r in ng["rounds"]
            ],
        ),
        f"nginx adds {ng['added_p50_ms_median']:.3f} ms to the p50 (median of the rounds; per "
        f"round {', '.join(f'{a:.3f}' for a in ng['added_p50_ms_per_round'])}).",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deploy-costs", description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=20_000, help="records for the memory figure")
    p.add_argument("--commit-s", type=float, default=3.0, help="seconds of store commits")
    p.add_argument("--bench-requests", type=int, default=100_000, help="redis-benchmark -n")
    p.add_argument("--rounds", type=int, default=5, help="direct/nginx rounds")
    p.add_argument("--calls", type=int, default=1000, help="Step calls per path per round")
    p.add_argument("--server-src", type=Path, default=None, help="run lstm-serve from this tree")
    p.add_argument("--out", type=Path, default=common.ROOT / "benchmarks/results/deploy_costs.json")
    args = p.parse_args(argv)
    for name in ("redis-server", "redis-benchmark", "nginx"):
        _binary(name)
    meta = {
        "command": " ".join(
            ["python -m benchmarks.deploy_costs", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "server_commit": common.git_commit(args.server_src or common.ROOT),
        "machine": common.machine(),
        "versions": {
            **common.versions(),
            "redis-server": _version([_binary("redis-server"), "--version"]),
            "nginx": _version([_binary("nginx"), "-v"]),
        },
        "load_average_before": common.load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="deploy-costs-") as tmp:
        part1 = record_and_nginx(args, Path(tmp))
    redis = redis_costs(args, bytes.fromhex(part1["record"]["template_hex"]))
    meta["load_average_after"] = common.load_average()
    res = {"meta": meta, "record": part1["record"], "nginx": part1["nginx"], "redis": redis}
    print(report(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out, res)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
