"""The model repository layout, shared by the batch export (writer) and the server (reader)::

REPO/manifest.json                        (written by ``lstm-export --batch``)
REPO/NAME/VERSION/model.onnx              VERSION: a positive integer; the highest wins
REPO/NAME/VERSION/model.int8.onnx         (optional)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MANIFEST = "manifest.json"
_VERSION = re.compile(r"^\d+$")


class RepositoryError(ValueError):
    """A path names no model under the layout; the message is one line."""


@dataclass(frozen=True)
class ModelLocation:
    path: Path
    name: str
    version: str


def is_version(name: str) -> bool:
    return bool(_VERSION.match(name))


def versions(model_dir: Path) -> list[int]:
    """The numeric version folders of ``model_dir``, ascending (empty if none or absent)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and is_version(p.name))


def version_dir(repo: Path, name: str, version: int) -> Path:
    return repo / name / str(version)


def resolve(path: Path) -> ModelLocation:
    """Turn a path into a model file plus a name and version.

    Accepts a file (``…/NAME/VERSION/model.onnx`` names itself; any other file is named by its
    stem, version ``1``), a version folder holding ``model.onnx``, a model folder whose numeric
    subfolders are versions (highest wins), or a repository holding exactly one model folder.
    Raises :class:`RepositoryError`.
    """
    if not path.exists():
        raise RepositoryError(f"model not found: {path}")
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            path = path / MODEL_FILE
        else:
            found = versions(path)
            if not found:
                models = [p for p in path.iterdir() if p.is_dir()]
                if len(models) == 1:
                    return resolve(models[0])
                raise RepositoryError(
                    f"{path} holds no {MODEL_FILE}, no numeric version folders and not exactly "
                    "one model folder"
                )
            path = path / str(found[-1]) / MODEL_FILE
            if not path.is_file():
                raise RepositoryError(f"model not found: {path}")
    if is_version(path.parent.name) and path.name == MODEL_FILE:
        return ModelLocation(path, path.parent.parent.name, path.parent.name)
    return ModelLocation(path, path.stem, "1")


# --- serving a whole repository ----------------------------------------------------------------

CONFIG_FILE = "config.json"
"""``REPO/NAME/config.json``: the model's serving config, Triton's ``version_policy`` in JSON::

    {"version_policy": {"latest": {"num_versions": 2}}}    # the newest N (default: latest 1)
    {"version_policy": {"all": {}}}                         # every version
    {"version_policy": {"specific": {"versions": [1, 3]}}}  # exactly these
"""


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions are served: ``latest`` N, ``all`` or ``specific``."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of ``available``, ascending."""
        ordered = sorted(set(available))
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions :]

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "specific":
            return "specific " + ",".join(str(v) for v in self.versions)
        return "all"


DEFAULT_POLICY = VersionPolicy()


def read_policy(model_dir: Path) -> VersionPolicy:
    """The version policy in ``model_dir/config.json`` (latest 1 when there is no file).

    Raises :class:`RepositoryError` naming the file and what is wrong.
    """
    import json

    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return DEFAULT_POLICY
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RepositoryError(f"{path}: not readable JSON ({e})") from None
    policy = doc.get("version_policy", {}) if isinstance(doc, dict) else None
    if not isinstance(policy, dict) or len(policy) > 1:
        raise RepositoryError(
            f"{path}: version_policy must be one of {{'latest': {{'num_versions': N}}}}, "
            "{'all': {}}, {'specific': {'versions': [...]}}"
        )
    if not policy:
        return DEFAULT_POLICY
    ((kind, body),) = policy.items()
    if not isinstance(body, dict):
        raise RepositoryError(f"{path}: version_policy.{kind} must be an object")
    if kind == "all":
        return VersionPolicy("all")
    if kind == "latest":
        n = body.get("num_versions", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise RepositoryError(f"{path}: latest.num_versions must be an integer >= 1, got {n!r}")
        return VersionPolicy("latest", num_versions=n)
    if kind == "specific":
        vs = body.get("versions")
        if (
            not isinstance(vs, list)
            or not vs
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vs)
        ):
            raise RepositoryError(
                f"{path}: specific.versions must be a non-empty list of version numbers, got {vs!r}"
            )
        return VersionPolicy("specific", versions=tuple(sorted(set(vs))))
    raise RepositoryError(f"{path}: unknown version_policy {kind!r} (latest, all or specific)")


def model_names(repo: Path) -> list[str]:
    """The model folders of ``repo`` (those holding at least one numeric version folder), sorted.

    Folders whose names start with a dot (an exporter's temporary folders) are not models.
    """
    if not repo.is_dir():
        return []
    return sorted(
        p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".") and versions(p)
    )


def is_repository(path: Path) -> bool:
    """``path`` is a folder of model folders (not a model or a version folder itself)."""
    return path.is_dir() and not (path / MODEL_FILE).is_file() and not versions(path)
