"""Running exports for the model repository: in this process or in worker processes.

What :mod:`export.repository` needs to turn one checkpoint into files without ever leaving a
partial model behind: a temp folder per export (``REPO/<name>/.tmp-*``, renamed into place by
the caller when complete, removed by the next run after a crash), one export in this process
(:func:`export_into`) or in a child ``lstm-export`` process (:class:`Worker`), signal deferral
while a child starts, and the one-run-per-repository lock (``REPO/.lock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from contract.files import write_atomic
from contract.repository import INT8_FILE, MODEL_FILE

from .common import ExportError, one_line

if TYPE_CHECKING:
    from .exporter import ExportOptions

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
_REPORT = ".report.json"  # a worker's report and stderr, removed before the folder is renamed
_STDERR = ".stderr.txt"


@dataclass(frozen=True)
class Exported:
    """An export that wrote its model files: the export report (JSON-able)."""

    report: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    """An export that wrote nothing usable: one line, without the checkpoint's path."""

    error: str


Outcome = Exported | Failed


def new_tmp_dir(model_dir: Path) -> Path:
    """A fresh, empty temp folder under ``model_dir`` (created with its parents)."""
    tmp = model_dir / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    return tmp


def remove_stale_tmp(repo: Path) -> None:
    """Remove the temp folders a killed run left behind (call only while holding the lock)."""
    for d in repo.glob(f"*/{TMP_PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def repo_lock(repo: Path) -> Iterator[None]:
    """Hold ``REPO/.lock`` for the block; raises :class:`ExportError` if another run holds it."""
    lock = repo / LOCK_FILE
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(
                f"another lstm-export batch is writing to {repo} (lock {lock})"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def export_into(checkpoint: Path, tmp_dir: Path, options: ExportOptions) -> Outcome:
    """Export one checkpoint into ``tmp_dir`` in this process.

    Never raises an exception (KeyboardInterrupt aside): every failure, a bug included, comes
    back as a one-line error so that it fails this model only.
    """
    from contract.model import ContractError
    from training.checkpoint import CheckpointError

    from .exporter import build_artifacts

    try:
        art = build_artifacts(checkpoint, options)
        write_atomic(tmp_dir / MODEL_FILE, art.fp32)
        if art.int8 is not None:
            write_atomic(tmp_dir / INT8_FILE, art.int8)
        return Exported(art.report)
    except (ExportError, CheckpointError, ContractError) as e:
        # The caller reports the path already; drop the copy some messages start with.
        return Failed(one_line(e).removeprefix(f"{checkpoint}: "))
    except OSError as e:
        return Failed(f"I/O error: {one_line(e)}")
    except Exception as e:  # a bug must fail this model only, still in one line
        return Failed(f"unexpected {type(e).__name__}: {one_line(e)}")


class Worker:
    """One export in a child ``lstm-export`` process, in its own session, writing to ``tmp``.

    Its own session, so a Ctrl-C at the terminal reaches only this (parent) process, which then
    decides and kills its workers: a worker can never die half-way with a traceback on the
    user's terminal. Output goes to the worker's temp folder only. Raises ``OSError`` when the
    process cannot be started; start it inside :func:`signals_deferred`.
    """

    def __init__(self, checkpoint: Path, tmp: Path, options: ExportOptions) -> None:
        self.checkpoint, self.tmp = checkpoint, tmp
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # so the child imports this very code
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        command = [
            sys.executable,
            "-m",
            "export.cli",
            str(checkpoint),
            "--out",
            str(tmp / MODEL_FILE),
            "--report",
            str(tmp / _REPORT),
            *options.worker_args(),
        ]
        with open(tmp / _STDERR, "wb") as err:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                start_new_session=True,
            )

    def done(self) -> bool:
        return self.proc.poll() is not None

    def outcome(self) -> Outcome:
        """Call once :meth:`done`: the report, or the child's last stderr line as the error.

        Leaves only the model files in ``tmp`` (the report and stderr files are removed).
        """
        code = self.proc.returncode
        report = self.tmp / _REPORT
        stderr = (self.tmp / _STDERR).read_text(encoding="utf-8", errors="replace").strip()
        with contextlib.suppress(OSError):
            (self.tmp / _STDERR).unlink()
        if code == 0:
            try:
                data = json.loads(report.read_text(encoding="utf-8"))
                report.unlink()
                return Exported(data)
            except (OSError, ValueError) as e:
                return Failed(f"export worker left no report: {one_line(e)}")
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        if code is not None and code < 0:
            msg = f"export worker was killed by signal {-code}"
        elif lines:
            msg = lines[-1].removeprefix("lstm-export: error: ")
        else:
            msg = f"export worker exited with status {code}"
        return Failed(msg.removeprefix(f"{self.checkpoint}: "))

    def kill(self) -> None:
        """Stop the child and wait for it (up to 10 s), so its folder can be removed."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Record SIGINT/SIGTERM during the block and raise KeyboardInterrupt at its end.

    Starting a worker is not interruptible half-way: the parent must learn the child's pid to
    be able to stop it again. Off the main thread (where handlers cannot be set) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    handlers = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if pending:
        raise KeyboardInterrupt
