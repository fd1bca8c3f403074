"""Section 11's helpers: the stores to start servers on, and the scale test, run as a script.

The section itself (servers, load, ratios) is in :mod:`benchmarks.run`; here are the pieces
that have nothing to do with load: a throwaway Redis (``tests.state_services``, the helper the
state-store tests use), the file system the SQLite file sits on (a tmpfs commits faster than a
disk), and ``scripts/scale_test.py`` run as a subprocess with its JSON read back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import ROOT

SCALE_TEST = ROOT / "scripts" / "scale_test.py"


@contextlib.contextmanager
def throwaway_redis() -> Iterator[tuple[str | None, str | None]]:
    """Yields ``(url, None)`` with a fresh ``redis-server`` on loopback running, or
    ``(None, reason)`` when none can be started here (the section then measures the others)."""
    url: str | None = None
    missing: str | None = None
    try:
        # The tests' helper (no persistence, a temporary folder, a free port): imported here,
        # not at module level, because it lives in tests/ (and imports pytest).
        from tests.state_services import ServiceError, redis_server
    except ImportError as e:
        missing = f"tests.state_services not importable: {e}"
    with contextlib.ExitStack() as stack:
        if missing is None:
            try:
                url = stack.enter_context(redis_server())
            except ServiceError as e:
                missing = str(e)
        yield url, missing


def fs_type(path: Path) -> str | None:
    """The file system type (``/proc/mounts``) holding ``path``: ``tmpfs``, ``ext4``, ..."""
    best, kind = "", None
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mnt = fields[1]
        inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, kind = mnt, fields[2]
    return kind


def scale_test(out: Path, sessions: int, steps: int, timeout_s: float) -> dict[str, Any]:
    """Run ``scripts/scale_test.py`` (nginx + Redis + 3 replicas, one killed with -9) once.

    Returns its JSON summary under ``"result"`` with ``returncode`` and ``passed`` (its own
    checks: no mismatch, no lost step, the kill hit sessions); ``{"skipped": reason}`` when
    nginx or the script is missing, or when it wrote no JSON (with the end of its output).
    Never installs anything (the script would, as root): a missing nginx is a reason.
    """
    if not SCALE_TEST.is_file():
        return {"skipped": f"{SCALE_TEST.relative_to(ROOT)} not in this checkout"}
    if not (shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")):
        return {"skipped": "nginx not found (Debian package nginx; `make scale-test` installs it)"}
    cmd = [
        sys.executable,
        str(SCALE_TEST),
        "--sessions",
        str(sessions),
        "--steps",
        str(steps),
        "--timeout",
        str(timeout_s),
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s + 60, env=env
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"scale test ran past {timeout_s + 60:.0f} s"}
    if not out.is_file():
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-4:])
        return {"skipped": f"scale test exited {done.returncode} without JSON: {tail}"}
    return {
        "command": " ".join(["python", str(SCALE_TEST.relative_to(ROOT)), *cmd[2:-2]]),
        "returncode": done.returncode,
        "passed": done.returncode == 0,
        "result": json.loads(out.read_text()),
    }
