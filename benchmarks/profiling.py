"""Server profiles for the benchmark (``--profile``): py-spy attached to the server process.

``py-spy record --format raw`` writes collapsed stacks (``thread;frame;frame... count``) sampled
while a load point's window runs; :func:`summarise` turns them into the shares of samples per
thread, per leaf frame (where the CPU was) and per frame inclusive (what it was doing), which
is what ``benchmarks/README.md`` quotes. py-spy samples only threads that are running (idle
threads blocked in a system call are left out), so the shares are of busy time, except that a
thread in ``epoll`` shows up as ``select`` when py-spy cannot tell it is idle.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

_PATH = re.compile(r"\s*\(/\S*?/(?:site-packages|lib/python3\.\d+|main)/")


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).is_file() else None


def start(pid: int, seconds: float, out: Path, rate: int = 200) -> subprocess.Popen[bytes] | None:
    """Begin sampling ``pid`` for ``seconds``; None when py-spy is not installed."""
    exe = py_spy()
    if exe is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "record", "-p", str(pid), "-r", str(rate), "-d", str(max(1, round(seconds)))]
    cmd += ["-f", "raw", "--threads", "--nonblocking", "-o", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _short(frame: str) -> str:
    return _PATH.sub(" (", frame)


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    """Shares (percent of samples) by thread, by leaf frame and by inclusive frame."""
    threads: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, n_s = line.rpartition(" ")
        n = int(n_s)
        frames = stack.split(";")
        total += n
        threads[re.sub(r"\s*\(\d+\)", "", frames[0])] += n
        leaf[_short(frames[-1])] += n
        for f in {_short(f) for f in frames[1:]}:
            incl[f] += n

    def share(c: collections.Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, round(100 * v / total, 1)) for name, v in c.most_common(k)] if total else []

    return {
        "samples": total,
        "threads": share(threads, 8),
        "leaf": share(leaf, top),
        "inclusive": share(incl, top * 2),
    }
