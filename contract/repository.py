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
