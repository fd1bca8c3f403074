"""The model repository: many checkpoints exported into it, unattended, idempotent.

Repository layout (:mod:`contract.repository`; the server loads it)::

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

How one export runs (in this process, or in worker processes) is :mod:`export.workers`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from contract.files import sha256_file, write_atomic
from contract.repository import INT8_FILE, MANIFEST, MODEL_FILE, is_version, version_dir

from .common import ExportError, library_versions, one_line, utc_now
from .workers import (
    Exported,
    Failed,
    Outcome,
    Worker,
    export_into,
    new_tmp_dir,
    remove_stale_tmp,
    repo_lock,
    signals_deferred,
)

if TYPE_CHECKING:
    from .exporter import ExportOptions

MANIFEST_FORMAT = "lstm-serve-model-repo"
MANIFEST_VERSION = 1
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
_POLL_SECONDS = 0.05  # how often the parent looks for finished workers

Status = Literal["ok", "failed"]
Action = Literal["exported", "unchanged", "failed"]


@dataclass(frozen=True)
class Job:
    """One checkpoint to export under ``name``; ``error`` set when it cannot even be tried."""

    name: str
    checkpoint: Path
    error: str | None = None


@dataclass(frozen=True)
class Result:
    """What happened to one checkpoint in this run."""

    name: str
    checkpoint: str
    action: Action
    status: Status  # the manifest status after the run
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
    """Every checkpoint's :class:`Result`, in the order they finished."""

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
#
# Typed in memory, the same JSON on disk as ever (format_version 1; the README shows it): each
# to_dict writes its keys in the order the format has always had, and from_dict reads exactly
# what to_dict writes, so an entry that is loaded and saved again comes out unchanged.


def _fields(d: Any, *keys: str) -> dict[str, Any]:
    """``d`` if it is a JSON object with every one of ``keys``; else ValueError."""
    if not isinstance(d, dict):
        raise ValueError(f"expected an object, got {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return d


@dataclass(frozen=True)
class OutputFile:
    """One model file of a version: its path relative to the repository, SHA-256 and size."""

    path: str  # "<name>/<version>/model.onnx", with forward slashes
    sha256: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size_bytes": self.size_bytes}

    @classmethod
    def from_dict(cls, d: Any) -> OutputFile:
        d = _fields(d, "path", "sha256", "size_bytes")
        return cls(d["path"], d["sha256"], d["size_bytes"])


@dataclass(frozen=True)
class Source:
    """The checkpoint an entry came from (``sha256`` None when it could not be read)."""

    path: str  # absolute
    sha256: str | None
    size_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size_bytes": self.size_bytes}

    @classmethod
    def from_dict(cls, d: Any) -> Source:
        d = _fields(d, "path", "sha256", "size_bytes")
        return cls(d["path"], d["sha256"], d["size_bytes"])

    @classmethod
    def of(cls, checkpoint: Path, sha: str | None) -> Source:
        size = checkpoint.stat().st_size if checkpoint.is_file() else None
        return cls(str(checkpoint.resolve()), sha, size)


def _outputs_to_dict(outputs: dict[str, OutputFile]) -> dict[str, Any]:
    return {variant: out.to_dict() for variant, out in outputs.items()}


def _outputs_from_dict(d: Any) -> dict[str, OutputFile]:
    return {variant: OutputFile.from_dict(out) for variant, out in _fields(d).items()}


@dataclass(frozen=True)
class PreviousVersion:
    """The last good version of a model whose latest export failed (its files stay on disk)."""

    version: int
    outputs: dict[str, OutputFile]  # by variant: "fp32", "int8"
    source: Source
    exported_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "outputs": _outputs_to_dict(self.outputs),
            "source": self.source.to_dict(),
            "exported_at": self.exported_at,
        }

    @classmethod
    def from_dict(cls, d: Any) -> PreviousVersion:
        d = _fields(d, "version", "outputs", "source", "exported_at")
        return cls(
            d["version"],
            _outputs_from_dict(d["outputs"]),
            Source.from_dict(d["source"]),
            d["exported_at"],
        )


# The keys each status writes, in the order the format writes them.
_COMMON_KEYS = ("name", "status", "error", "source", "options", "exporter", "version", "outputs")
_OK_KEYS = ("model", "training", "parity", "perplexity", "int8", "exported_at", "seconds")
_FAILED_KEYS = ("attempted_at", "previous")


@dataclass(frozen=True)
class ManifestEntry:
    """One model's latest outcome.

    ``status == "ok"``: ``version`` and ``outputs`` name the files, and the export report's
    sections (``model`` … ``seconds``) are set. ``status == "failed"``: ``error`` is one line,
    ``version`` is None, ``outputs`` is empty, ``attempted_at`` is set and ``previous`` names the
    last good version, if any. ``options`` and ``exporter`` are the idempotence key (see
    :func:`_unchanged`).
    """

    name: str
    status: Status
    error: str | None
    source: Source
    options: dict[str, Any]  # ExportOptions.key(), plus the corpus's SHA-256 when one is used
    exporter: dict[str, str | None]  # library versions
    version: int | None
    outputs: dict[str, OutputFile]  # by variant: "fp32", "int8"
    # status "ok": sections of the export report, free-form JSON as the report has them
    model: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    perplexity: dict[str, Any] | None = None
    int8: dict[str, Any] | None = None
    exported_at: str | None = None
    seconds: float | None = None
    # status "ok", sequence models only (written only when set, so token entries read and
    # write exactly as before): the held-out one-step-ahead errors, fp32 and int8
    heldout: dict[str, Any] | None = None
    # status "failed"
    attempted_at: str | None = None
    previous: PreviousVersion | None = None

    @classmethod
    def exported(
        cls,
        name: str,
        source: Source,
        key: dict[str, Any],
        exporter: dict[str, str | None],
        version: int,
        outputs: dict[str, OutputFile],
        report: dict[str, Any],
    ) -> ManifestEntry:
        """The entry for a version just written, with the figures of its export report."""
        return cls(
            name=name,
            status="ok",
            error=None,
            source=source,
            options=key,
            exporter=exporter,
            version=version,
            outputs=outputs,
            model=report["model"],
            training=report["training"],
            parity=report["parity"],
            perplexity=report["perplexity"],
            int8=report["int8"],
            exported_at=report["created_at"],
            seconds=report["seconds"],
            heldout=report.get("heldout"),
        )

    @classmethod
    def failed(
        cls,
        name: str,
        source: Source,
        key: dict[str, Any],
        exporter: dict[str, str | None],
        error: str,
        replaces: ManifestEntry | None,
    ) -> ManifestEntry:
        """The entry for a failure; it keeps the last good version that ``replaces`` knew of."""
        return cls(
            name=name,
            status="failed",
            error=error,
            source=source,
            options=key,
            exporter=exporter,
            version=None,
            outputs={},
            attempted_at=utc_now(),
            previous=replaces.last_good() if replaces is not None else None,
        )

    def last_good(self) -> PreviousVersion | None:
        """This entry's good version: its own when ok, else the one it kept."""
        if self.status != "ok":
            return self.previous
        assert self.version is not None and self.exported_at is not None  # from_dict checks
        return PreviousVersion(self.version, self.outputs, self.source, self.exported_at)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "status": self.status,
            "error": self.error,
            "source": self.source.to_dict(),
            "options": self.options,
            "exporter": self.exporter,
            "version": self.version,
            "outputs": _outputs_to_dict(self.outputs),
        }
        if self.status == "ok":
            d |= {k: getattr(self, k) for k in _OK_KEYS}
            if self.heldout is not None:
                d["heldout"] = self.heldout
        else:
            d["attempted_at"] = self.attempted_at
            d["previous"] = self.previous.to_dict() if self.previous is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ManifestEntry:
        """Read what :meth:`to_dict` writes; raises ValueError (or TypeError) for anything else."""
        d = _fields(d, *_COMMON_KEYS)
        if d["status"] not in ("ok", "failed"):
            raise ValueError(f"unknown status {d['status']!r}")
        common = {
            "name": d["name"],
            "status": d["status"],
            "error": d["error"],
            "source": Source.from_dict(d["source"]),
            "options": _fields(d["options"]),
            "exporter": _fields(d["exporter"]),
            "version": d["version"],
            "outputs": _outputs_from_dict(d["outputs"]),
        }
        if d["status"] == "ok":
            _fields(d, *_OK_KEYS)
            if not isinstance(d["version"], int) or not isinstance(d["exported_at"], str):
                raise ValueError("an ok entry needs an integer version and exported_at")
            return cls(**common, **{k: d[k] for k in _OK_KEYS}, heldout=d.get("heldout"))
        _fields(d, *_FAILED_KEYS)
        previous = d["previous"]
        return cls(
            **common,
            attempted_at=d["attempted_at"],
            previous=PreviousVersion.from_dict(previous) if previous is not None else None,
        )


@dataclass
class Manifest:
    """``REPO/manifest.json``: one :class:`ManifestEntry` per model name."""

    models: dict[str, ManifestEntry] = field(default_factory=dict)
    updated_at: str | None = None  # set by each save

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "models": {name: e.to_dict() for name, e in sorted(self.models.items())},
        }
        if self.updated_at is not None:
            d["updated_at"] = self.updated_at
        return d


def load_manifest(repo: Path) -> Manifest:
    """The repository's manifest, or an empty one; raises :class:`ExportError` if unreadable."""
    path = repo / MANIFEST
    if not path.exists():
        return Manifest()
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
    models = {}
    for name, raw in data["models"].items():
        try:
            models[name] = ManifestEntry.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise ExportError(
                f"{path}: entry {name!r} is not a manifest entry ({one_line(e)}); move the "
                "manifest away to rebuild"
            ) from None
    return Manifest(models, data.get("updated_at"))


def _save_manifest(repo: Path, manifest: Manifest) -> None:
    """Stamp ``updated_at`` and replace ``REPO/manifest.json`` in one step."""
    manifest.updated_at = utc_now()
    write_atomic(repo / MANIFEST, (json.dumps(manifest.to_dict(), indent=2) + "\n").encode())


def _outputs_intact(repo: Path, entry: ManifestEntry) -> bool:
    """Whether every file the entry names is on disk with its recorded SHA-256."""
    if not entry.outputs:
        return False
    for out in entry.outputs.values():
        path = repo / out.path
        if not path.is_file() or sha256_file(path) != out.sha256:
            return False
    return True


def _unchanged(
    repo: Path,
    entry: ManifestEntry | None,
    sha: str,
    key: dict[str, Any],
    exporter: dict[str, str | None],
) -> bool:
    """Whether exporting the checkpoint with SHA-256 ``sha`` again would repeat ``entry``."""
    if entry is None or entry.source.sha256 != sha:
        return False
    if entry.options != key or entry.exporter != exporter:
        return False
    if entry.status == "failed":
        return True  # same bytes, same exporter: the same failure, not worth repeating
    return _outputs_intact(repo, entry)


def _next_version(model_dir: Path, entry: ManifestEntry | None) -> int:
    """One above any version on disk or in the entry (a version number is never reused)."""
    seen = [0]
    if model_dir.is_dir():
        seen += [int(p.name) for p in model_dir.iterdir() if is_version(p.name)]
    if entry is not None:
        seen.append(entry.version or 0)
        seen.append(entry.previous.version if entry.previous is not None else 0)
    return max(seen) + 1


def _written_outputs(repo: Path, name: str, version: int) -> dict[str, OutputFile]:
    outputs = {}
    for variant, fname in (("fp32", MODEL_FILE), ("int8", INT8_FILE)):
        path = version_dir(repo, name, version) / fname
        if path.is_file():
            outputs[variant] = OutputFile(
                f"{name}/{version}/{fname}", sha256_file(path), path.stat().st_size
            )
    return outputs


def _options_key(options: ExportOptions) -> dict[str, Any]:
    """The idempotence key: the options that change what is written, and the corpus's bytes."""
    key = options.key()
    if options.corpus is not None:
        # The corpus's content, not its path, decides whether the figures are still valid.
        try:
            key["corpus_sha256"] = sha256_file(options.corpus)
        except OSError as e:
            raise ExportError(f"cannot read corpus {options.corpus}: {one_line(e)}") from None
    return key


def _detail(report: dict[str, Any]) -> str:
    """The figures of an export report, in one line for the per-model output."""
    parity = report["parity"]
    worst = max((v for v in parity["max_abs_diff"].values() if v is not None), default=0.0)
    parts = [f"parity max|diff| {worst:.1e}"]
    held = report.get("heldout")
    if held:
        parts.append(f"held-out MAE {held['fp32']['test']['mae']:.4g}")
        if held.get("int8_vs_fp32"):
            parts.append(f"int8 {held['int8_vs_fp32']['relative_change']:+.2%}")
    ppl = report.get("perplexity")
    if ppl:
        parts.append(f"val ppl {ppl['fp32']['perplexity']:.3f}")
        if ppl.get("int8_vs_fp32"):
            parts.append(f"int8 {ppl['int8_vs_fp32']['relative_change']:+.2%}")
    if report.get("int8"):
        parts.append(f"int8 {report['int8']['size_bytes'] / 1024:.0f} KiB")
    return "; ".join(parts)


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


# --- the run ----------------------------------------------------------------------------------


def run_batch(
    spec: str,
    repo: str | Path,
    options: ExportOptions | None = None,
    *,
    jobs: int = 1,
    progress: bool | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> BatchSummary:
    """Export every checkpoint named by ``spec`` into the repository at ``repo``.

    ``jobs`` > 1 exports in that many worker processes. ``progress``: True/False forces the
    tqdm bar on/off, None shows it only on a terminal. ``on_result`` is called once per
    checkpoint as it finishes. Raises :class:`ExportError` for problems with the run as a whole
    (nothing found, unreadable manifest, repository locked, unreadable corpus); per-model
    failures are in the summary and the manifest. KeyboardInterrupt propagates after the
    workers are stopped and the temp folders removed.
    """
    from tqdm import tqdm

    from .exporter import ExportOptions

    options = options or ExportOptions()
    repo = Path(repo)
    found = discover(spec)  # before creating anything, so a typo leaves no empty repo
    repo.mkdir(parents=True, exist_ok=True)
    with repo_lock(repo):
        remove_stale_tmp(repo)
        run = _BatchRun(repo, load_manifest(repo), _options_key(options), on_result)
        todo = run.triage(found)
        bar = tqdm(
            total=len(todo),
            unit="model",
            desc="lstm-export",
            file=sys.stderr,
            disable=(not progress) if progress is not None else None,
        )
        try:
            run.export(todo, options, jobs, advance=bar.update)
        finally:
            bar.close()
    return run.summary


class _BatchRun:
    """One run over a locked repository: what to export, the exports, and their records.

    The manifest is saved after the triage and after every finished export, so whatever
    finished is recorded even if the run is interrupted.
    """

    def __init__(
        self,
        repo: Path,
        manifest: Manifest,
        key: dict[str, Any],
        on_result: Callable[[Result], None] | None,
    ) -> None:
        self.repo = repo
        self.manifest = manifest
        self.key = key
        self.exporter = library_versions()
        self.summary = BatchSummary(repo=repo)
        self._on_result = on_result
        self._tmp_dirs: dict[str, Path] = {}  # by model name, until renamed or removed
        self._workers: list[tuple[Worker, Job, str]] = []
        self._advance: Callable[[int], object] = lambda n: None

    def triage(self, found: list[Job]) -> list[tuple[Job, str]]:
        """Record the jobs that fail before starting and those unchanged; save the manifest.

        Returns the jobs to export, each with its checkpoint's SHA-256.
        """
        todo = []
        for job in found:
            if job.error is not None:
                self._record(self._failure(job, None, job.error))
                continue
            try:
                sha = sha256_file(job.checkpoint)
            except OSError as e:
                err = f"cannot read checkpoint: {e.strerror or one_line(e)}"
                self._record(self._failure(job, None, err))
                continue
            entry = self.manifest.models.get(job.name)
            if entry is not None and _unchanged(self.repo, entry, sha, self.key, self.exporter):
                self._record(
                    Result(
                        job.name,
                        str(job.checkpoint),
                        "unchanged",
                        entry.status,
                        entry.version,
                        entry.error,
                    )
                )
            else:
                todo.append((job, sha))
        _save_manifest(self.repo, self.manifest)
        return todo

    def export(
        self,
        todo: list[tuple[Job, str]],
        options: ExportOptions,
        jobs: int,
        advance: Callable[[int], object],
    ) -> None:
        """Export ``todo``, in this process or in up to ``jobs`` workers; ``advance(1)`` each.

        However it ends, no worker is left running and no temp folder is left behind.
        """
        self._advance = advance
        try:
            if jobs <= 1 or len(todo) <= 1:
                for job, sha in todo:
                    tmp = self._new_tmp(job)
                    self._finish(job, sha, export_into(job.checkpoint, tmp, options))
            else:
                self._export_in_workers(todo, options, jobs)
        finally:
            for worker, _, _ in self._workers:  # interrupted: stop them before removing folders
                worker.kill()
            for name, tmp in self._tmp_dirs.items():
                shutil.rmtree(tmp, ignore_errors=True)
                _rmdir_if_empty(self.repo / name)

    def _export_in_workers(
        self, todo: list[tuple[Job, str]], options: ExportOptions, jobs: int
    ) -> None:
        queue = list(todo)
        while queue or self._workers:
            while queue and len(self._workers) < jobs:
                job, sha = queue.pop(0)
                tmp = self._new_tmp(job)
                try:
                    with signals_deferred():
                        self._workers.append((Worker(job.checkpoint, tmp, options), job, sha))
                except OSError as e:
                    self._finish(job, sha, Failed(f"cannot start an export worker: {one_line(e)}"))
            for running in [r for r in self._workers if r[0].done()]:
                self._workers.remove(running)
                worker, job, sha = running
                self._finish(job, sha, worker.outcome())
            time.sleep(_POLL_SECONDS)

    def _new_tmp(self, job: Job) -> Path:
        tmp = new_tmp_dir(self.repo / job.name)
        self._tmp_dirs[job.name] = tmp
        return tmp

    def _finish(self, job: Job, sha: str, outcome: Outcome) -> None:
        """Move a finished export into place (or clean it away), record it, save the manifest."""
        tmp = self._tmp_dirs.pop(job.name)
        if isinstance(outcome, Exported):
            version = _next_version(self.repo / job.name, self.manifest.models.get(job.name))
            os.replace(tmp, version_dir(self.repo, job.name, version))
            self.manifest.models[job.name] = ManifestEntry.exported(
                job.name,
                Source.of(job.checkpoint, sha),
                self.key,
                self.exporter,
                version,
                _written_outputs(self.repo, job.name, version),
                outcome.report,
            )
            result = Result(
                job.name,
                str(job.checkpoint),
                "exported",
                "ok",
                version,
                detail=_detail(outcome.report),
            )
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            _rmdir_if_empty(self.repo / job.name)
            result = self._failure(job, sha, outcome.error)
        _save_manifest(self.repo, self.manifest)
        self._advance(1)
        self._record(result)

    def _failure(self, job: Job, sha: str | None, error: str) -> Result:
        """Record a failed entry for ``job`` (keeping its last good version) in the manifest."""
        self.manifest.models[job.name] = ManifestEntry.failed(
            job.name,
            Source.of(job.checkpoint, sha),
            self.key,
            self.exporter,
            error,
            replaces=self.manifest.models.get(job.name),
        )
        return Result(job.name, str(job.checkpoint), "failed", "failed", error=error)

    def _record(self, result: Result) -> None:
        self.summary.results.append(result)
        if self._on_result is not None:
            self._on_result(result)
