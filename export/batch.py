"""Batch export: many checkpoints into a model repository, unattended, idempotent.

Repository layout (the server loads it)::

    REPO/manifest.json
    REPO/<model-name>/<version>/model.onnx
    REPO/<model-name>/<version>/model.int8.onnx     (with --int8)

Model names come from the checkpoint paths relative to the argument (a directory, a glob's
fixed prefix, or a file's folder): ``runs/foo/checkpoint.pt`` -> ``foo``, ``runs/bar.pt`` ->
``bar``, ``runs/a/best.pt`` -> ``a-best``. Versions are integers; each successful export of a
model takes the next one, and earlier versions stay on disk.

Guarantees:

* Idempotent: a checkpoint whose SHA-256, export options and exporter version match its
  manifest entry, and whose outputs are still on disk with the recorded SHA-256, is skipped
  ("unchanged"); a changed checkpoint is exported as a new version. A checkpoint that failed
  and has not changed is not retried (the failure is deterministic) and still counts as failed.
* Failures are per model: a corrupt, truncated, foreign or wrong-version checkpoint, or a
  failed parity check, is recorded in that model's entry (``status: failed`` with a one-line
  ``error``; the last good version is kept under ``previous``) and the others still export.
* Interruption-safe: a model is exported into ``REPO/<name>/.tmp-*`` and renamed into place
  in one step when complete; the manifest is rewritten atomically after each model. Ctrl-C,
  SIGTERM or a crash leaves no partial model or manifest (stale temp folders are removed by the
  next run). One run at a time per repository (``REPO/.lock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.files import sha256_file, write_atomic
from contract.repository import INT8_FILE, MANIFEST, MODEL_FILE

from .common import ExportError, library_versions, one_line, utc_now

MANIFEST_FORMAT = "lstm-serve-model-repo"
MANIFEST_VERSION = 1
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
_TMP_PREFIX = ".tmp-"
_REPORT = ".report.json"  # a worker's report and stderr, removed before the folder is renamed
_STDERR = ".stderr.txt"


@dataclass(frozen=True)
class Job:
    """One checkpoint to export under ``name``; ``error`` set when it cannot even be tried."""

    name: str
    checkpoint: Path
    error: str | None = None


@dataclass
class Result:
    """What happened to one checkpoint in this run."""

    name: str
    checkpoint: str
    action: str  # "exported" | "unchanged" | "failed"
    status: str  # the manifest status after the run: "ok" | "failed"
    version: int | None = None
    error: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checkpoint": self.checkpoint,
            "action": self.action,
            "status": self.status,
            "version": self.version,
            "error": self.error,
            "detail": self.detail,
        }


@dataclass
class BatchSummary:
    repo: Path
    results: list[Result] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status == "ok" for r in self.results)

    def counts(self) -> dict[str, int]:
        out = {"exported": 0, "unchanged": 0, "failed": 0}
        for r in self.results:
            out["failed" if r.status != "ok" else r.action] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": str(self.repo),
            "manifest": str(self.repo / MANIFEST),
            "ok": self.ok,
            "counts": self.counts(),
            "results": [r.to_dict() for r in self.results],
        }


# --- discovery --------------------------------------------------------------------------------


def _sanitize(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".")
    return name or "model"


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def model_name(checkpoint: Path, base: Path) -> str:
    """The repository name for ``checkpoint`` found under ``base`` (see the module docstring)."""
    try:
        rel = checkpoint.resolve().relative_to(base.resolve())
    except ValueError:
        rel = Path(checkpoint.name)
    parts = list(rel.with_suffix("").parts)
    if parts and parts[-1] == "checkpoint":
        parts.pop()
    if not parts:
        parts = [base.resolve().name or "model"]
    return _sanitize("-".join(parts))


def discover(spec: str) -> list[Job]:
    """Checkpoints named by ``spec``: a directory (searched recursively), a glob, or a file.

    Hidden files and folders (such as a trainer's in-progress temp file) are skipped. Two
    checkpoints that would share a model name both become failed jobs. Raises
    :class:`ExportError` when nothing matches.
    """
    path = Path(spec)
    if path.is_dir():
        base = path
        files = [f for f in path.rglob("*") if f.suffix in CHECKPOINT_SUFFIXES]
    elif glob.has_magic(spec):
        base = _glob_base(spec)
        files = [Path(f) for f in glob.glob(spec, recursive=True)]
    elif path.is_file():
        base = path.parent
        files = [path]
    else:
        raise ExportError(f"no such checkpoint file or directory: {spec}")
    files = sorted(
        f
        for f in files
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(base).parts)
    )
    if not files:
        raise ExportError(f"no checkpoints found at {spec} (looked for {CHECKPOINT_SUFFIXES})")
    by_name: dict[str, list[Path]] = {}
    for f in files:
        by_name.setdefault(model_name(f, base), []).append(f)
    jobs = []
    for name, paths in by_name.items():
        for f in paths:
            error = None
            if len(paths) > 1:
                others = ", ".join(str(p) for p in paths)
                error = f"model name {name!r} would come from several checkpoints ({others})"
            jobs.append(Job(name, f, error))
    return sorted(jobs, key=lambda j: (j.name, str(j.checkpoint)))


# --- the manifest -----------------------------------------------------------------------------


def load_manifest(repo: Path) -> dict[str, Any]:
    """The repository's manifest, or an empty one; raises :class:`ExportError` if unreadable."""
    path = repo / MANIFEST
    if not path.exists():
        return {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "models": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(
            f"{path} is not a readable manifest ({one_line(e)}); move it away to rebuild"
        ) from None
    if (
        not isinstance(data, dict)
        or data.get("format") != MANIFEST_FORMAT
        or not isinstance(data.get("models"), dict)
    ):
        raise ExportError(f"{path} is not an lstm-serve model repository manifest")
    if data.get("format_version") != MANIFEST_VERSION:
        raise ExportError(
            f"{path} has format_version {data.get('format_version')!r}; this build writes "
            f"{MANIFEST_VERSION}"
        )
    return data


def _save_manifest(repo: Path, manifest: dict[str, Any]) -> None:
    manifest["updated_at"] = utc_now()
    data = dict(manifest, models=dict(sorted(manifest["models"].items())))
    write_atomic(repo / MANIFEST, (json.dumps(data, indent=2) + "\n").encode())


def _outputs_intact(repo: Path, entry: dict[str, Any]) -> bool:
    outputs = entry.get("outputs") or {}
    if not outputs:
        return False
    for out in outputs.values():
        path = repo / out["path"]
        if not path.is_file() or sha256_file(path) != out.get("sha256"):
            return False
    return True


def _unchanged(
    repo: Path, entry: dict[str, Any] | None, sha: str, key: dict[str, Any], exporter: Any
) -> bool:
    if not entry or entry.get("source", {}).get("sha256") != sha:
        return False
    if entry.get("options") != key or entry.get("exporter") != exporter:
        return False
    if entry.get("status") == "failed":
        return True  # same bytes, same exporter: the same failure, not worth repeating
    return entry.get("status") == "ok" and _outputs_intact(repo, entry)


def _next_version(model_dir: Path, entry: dict[str, Any] | None) -> int:
    seen = [0]
    if model_dir.is_dir():
        seen += [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    if entry:
        seen.append(int(entry.get("version") or 0))
        seen.append(int((entry.get("previous") or {}).get("version") or 0))
    return max(seen) + 1


def _last_good(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if not entry:
        return None
    if entry.get("status") == "ok":
        return {k: entry.get(k) for k in ("version", "outputs", "source", "exported_at")}
    prev = entry.get("previous")
    return prev if isinstance(prev, dict) else None


# --- one export (runs in a worker process when --jobs > 1) -------------------------------------


def _export_into(checkpoint: str, tmp_dir: str, options: Any) -> dict[str, Any]:
    """Export one checkpoint into ``tmp_dir``; never raises (errors come back as one line)."""
    from contract.model import ContractError
    from training.checkpoint import CheckpointError

    from .exporter import build_artifacts

    try:
        art = build_artifacts(checkpoint, options)
        write_atomic(Path(tmp_dir, MODEL_FILE), art.fp32)
        if art.int8 is not None:
            write_atomic(Path(tmp_dir, INT8_FILE), art.int8)
        return {"ok": True, "report": art.report}
    except (ExportError, CheckpointError, ContractError) as e:
        # The caller reports the path already; drop the copy some messages start with.
        return {"ok": False, "error": one_line(e).removeprefix(f"{checkpoint}: ")}
    except OSError as e:
        return {"ok": False, "error": f"I/O error: {one_line(e)}"}
    except Exception as e:  # a bug must fail this model only, still in one line
        return {"ok": False, "error": f"unexpected {type(e).__name__}: {one_line(e)}"}


def _worker_command(checkpoint: Path, tmp: Path, options: Any) -> list[str]:
    """The single-export CLI, writing into ``tmp`` (the --jobs > 1 worker)."""
    cmd = [
        sys.executable,
        "-m",
        "export.cli",
        str(checkpoint),
        "--out",
        str(tmp / MODEL_FILE),
        "--report",
        str(tmp / _REPORT),
        "--tolerance",
        repr(options.tolerance),
        "--int8-tolerance",
        repr(options.int8_tolerance),
        "--threads",
        str(options.threads),
    ]
    if options.int8:
        cmd.append("--int8")
        if options.per_channel:
            cmd.append("--int8-per-channel")
    if not options.measure_speed:
        cmd.append("--no-speed")
    if options.corpus is not None:
        cmd += ["--corpus", str(options.corpus)]
    if options.val_fraction is not None:
        cmd += ["--val-fraction", repr(options.val_fraction)]
    return cmd


class _Worker:
    """One export in a child process, in its own session.

    Its own session, so a Ctrl-C at the terminal reaches only this (parent) process, which then
    decides and kills its workers: a worker can never die half-way with a traceback on the
    user's terminal. Output goes to the worker's temp folder only.
    """

    def __init__(self, job: Job, sha: str, tmp: Path, options: Any) -> None:
        self.job, self.sha, self.tmp = job, sha, tmp
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # so the child imports this very code
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        with open(tmp / _STDERR, "wb") as err:
            self.proc = subprocess.Popen(
                _worker_command(job.checkpoint, tmp, options),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                start_new_session=True,
            )

    def outcome(self) -> dict[str, Any]:
        """Call after the process ended: the same shape as :func:`_export_into` returns."""
        code = self.proc.returncode
        report = self.tmp / _REPORT
        stderr = (self.tmp / _STDERR).read_text(encoding="utf-8", errors="replace").strip()
        with contextlib.suppress(OSError):
            (self.tmp / _STDERR).unlink()
        if code == 0:
            try:
                data = json.loads(report.read_text(encoding="utf-8"))
                report.unlink()
                return {"ok": True, "report": data}
            except (OSError, ValueError) as e:
                return {"ok": False, "error": f"export worker left no report: {one_line(e)}"}
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        if code is not None and code < 0:
            msg = f"export worker was killed by signal {-code}"
        elif lines:
            msg = lines[-1].removeprefix("lstm-export: error: ")
        else:
            msg = f"export worker exited with status {code}"
        return {"ok": False, "error": msg.removeprefix(f"{self.job.checkpoint}: ")}

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Record SIGINT/SIGTERM during the block and raise KeyboardInterrupt at its end.

    Starting a worker is not interruptible half-way: the parent must learn the child's pid to
    be able to stop it again.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum: int, frame: Any) -> None:
        pending.append(signum)

    handlers = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if pending:
        raise KeyboardInterrupt


# --- the run ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _repo_lock(repo: Path) -> Iterator[None]:
    with open(repo / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(
                f"another lstm-export batch is writing to {repo} (lock {repo / '.lock'})"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_tmp(repo: Path) -> None:
    for d in repo.glob(f"*/{_TMP_PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)


def run_batch(
    spec: str,
    repo: str | Path,
    options: Any = None,
    *,
    jobs: int = 1,
    progress: bool | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> BatchSummary:
    """Export every checkpoint named by ``spec`` into the repository at ``repo``.

    ``options`` is an :class:`export.exporter.ExportOptions`; ``jobs`` > 1 exports in that many
    worker processes. ``progress``: True/False forces the tqdm bar on/off, None shows it only
    on a terminal. ``on_result`` is called once per checkpoint as it finishes. Raises
    :class:`ExportError` for problems with the run as a whole (nothing found, unreadable
    manifest, repository locked); per-model failures are in the summary and the manifest.
    KeyboardInterrupt propagates after temp folders are removed.
    """
    from tqdm import tqdm

    from .exporter import ExportOptions

    options = options or ExportOptions()
    repo = Path(repo)
    found = discover(spec)  # before creating anything, so a typo leaves no empty repo
    repo.mkdir(parents=True, exist_ok=True)
    summary = BatchSummary(repo=repo)
    emit = on_result or (lambda r: None)

    def record(r: Result) -> None:
        summary.results.append(r)
        emit(r)

    with _repo_lock(repo):
        _remove_stale_tmp(repo)
        manifest = load_manifest(repo)
        models: dict[str, Any] = manifest["models"]
        key = options.key()
        if options.corpus is not None:
            # The corpus's content, not its path, decides whether the figures are still valid.
            try:
                key["corpus_sha256"] = sha256_file(options.corpus)
            except OSError as e:
                raise ExportError(f"cannot read corpus {options.corpus}: {one_line(e)}") from None
        exporter = library_versions()
        todo: list[tuple[Job, str]] = []
        for job in found:
            entry = models.get(job.name)
            if job.error is not None:
                models[job.name] = _failed_entry(job, None, key, exporter, job.error, entry)
                record(Result(job.name, str(job.checkpoint), "failed", "failed", error=job.error))
                continue
            try:
                sha = sha256_file(job.checkpoint)
            except OSError as e:
                err = f"cannot read checkpoint: {e.strerror or one_line(e)}"
                models[job.name] = _failed_entry(job, None, key, exporter, err, entry)
                record(Result(job.name, str(job.checkpoint), "failed", "failed", error=err))
                continue
            if _unchanged(repo, entry, sha, key, exporter):
                assert entry is not None
                record(
                    Result(
                        job.name,
                        str(job.checkpoint),
                        "unchanged",
                        entry["status"],
                        entry.get("version"),
                        entry.get("error"),
                    )
                )
            else:
                todo.append((job, sha))
        _save_manifest(repo, manifest)

        bar = tqdm(
            total=len(todo),
            unit="model",
            desc="lstm-export",
            file=sys.stderr,
            disable=(not progress) if progress is not None else None,
        )
        tmp_dirs: dict[str, Path] = {}

        def finish(job: Job, sha: str, outcome: dict[str, Any]) -> None:
            tmp = tmp_dirs.pop(job.name)
            entry = models.get(job.name)
            if outcome["ok"]:
                version = _next_version(repo / job.name, entry)
                os.replace(tmp, repo / job.name / str(version))
                models[job.name] = _ok_entry(job, sha, key, exporter, version, repo, outcome)
                res = Result(job.name, str(job.checkpoint), "exported", "ok", version)
                res.detail = _detail(outcome["report"])
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                _rmdir_if_empty(repo / job.name)
                err = outcome["error"]
                models[job.name] = _failed_entry(job, sha, key, exporter, err, entry)
                res = Result(job.name, str(job.checkpoint), "failed", "failed", error=err)
            _save_manifest(repo, manifest)
            bar.update(1)
            record(res)

        def new_tmp(job: Job) -> Path:
            tmp = repo / job.name / f"{_TMP_PREFIX}{uuid.uuid4().hex[:12]}"
            tmp.mkdir(parents=True)
            tmp_dirs[job.name] = tmp
            return tmp

        workers: list[_Worker] = []
        try:
            if jobs <= 1 or len(todo) <= 1:
                for job, sha in todo:
                    tmp = new_tmp(job)
                    finish(job, sha, _export_into(str(job.checkpoint), str(tmp), options))
            else:
                queue = list(todo)
                while queue or workers:
                    while queue and len(workers) < jobs:
                        job, sha = queue.pop(0)
                        tmp = new_tmp(job)
                        try:
                            with _signals_deferred():
                                workers.append(_Worker(job, sha, tmp, options))
                        except OSError as e:
                            err = f"cannot start an export worker: {one_line(e)}"
                            finish(job, sha, {"ok": False, "error": err})
                    for w in [w for w in workers if w.proc.poll() is not None]:
                        workers.remove(w)
                        finish(w.job, w.sha, w.outcome())
                    time.sleep(0.05)
        finally:
            for w in workers:  # interrupted: stop the workers before removing their folders
                w.kill()
            for name, tmp in tmp_dirs.items():
                shutil.rmtree(tmp, ignore_errors=True)
                _rmdir_if_empty(repo / name)
            bar.close()
    return summary


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def _detail(report: dict[str, Any]) -> str:
    parity = report["parity"]
    worst = max((v for v in parity["max_abs_diff"].values() if v is not None), default=0.0)
    parts = [f"parity max|diff| {worst:.1e}"]
    ppl = report.get("perplexity")
    if ppl:
        parts.append(f"val ppl {ppl['fp32']['perplexity']:.3f}")
        if ppl.get("int8_vs_fp32"):
            parts.append(f"int8 {ppl['int8_vs_fp32']['relative_change']:+.2%}")
    if report.get("int8"):
        parts.append(f"int8 {report['int8']['size_bytes'] / 1024:.0f} KiB")
    return "; ".join(parts)


def _source(job: Job, sha: str | None) -> dict[str, Any]:
    size = job.checkpoint.stat().st_size if job.checkpoint.is_file() else None
    return {"path": str(job.checkpoint.resolve()), "sha256": sha, "size_bytes": size}


def _ok_entry(
    job: Job,
    sha: str,
    key: dict[str, Any],
    exporter: Any,
    version: int,
    repo: Path,
    outcome: dict[str, Any],
) -> dict[str, Any]:
    report = outcome["report"]
    outputs = {}
    for variant, fname in (("fp32", MODEL_FILE), ("int8", INT8_FILE)):
        path = repo / job.name / str(version) / fname
        if path.is_file():
            outputs[variant] = {
                "path": f"{job.name}/{version}/{fname}",
                "sha256": sha256_file(path),
                "size_bytes": path.stat().st_size,
            }
    return {
        "name": job.name,
        "status": "ok",
        "error": None,
        "source": _source(job, sha),
        "options": key,
        "exporter": exporter,
        "version": version,
        "outputs": outputs,
        "model": report["model"],
        "training": report["training"],
        "parity": report["parity"],
        "perplexity": report["perplexity"],
        "int8": report["int8"],
        "exported_at": report["created_at"],
        "seconds": report["seconds"],
    }


def _failed_entry(
    job: Job,
    sha: str | None,
    key: dict[str, Any],
    exporter: Any,
    error: str,
    previous_entry: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "name": job.name,
        "status": "failed",
        "error": error,
        "source": _source(job, sha),
        "options": key,
        "exporter": exporter,
        "version": None,
        "outputs": {},
        "attempted_at": utc_now(),
        "previous": _last_good(previous_entry),
    }
