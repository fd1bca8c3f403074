"""Version policies (REPO/NAME/config.json) and the repository settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.repository import RepositoryError, VersionPolicy, model_names, read_policy
from server.settings import Settings, SettingsError


@pytest.mark.parametrize(
    ("body", "available", "chosen", "described"),
    [
        (None, [1, 3, 2], [3], "latest 1"),
        ({"latest": {"num_versions": 2}}, [1, 3, 2], [2, 3], "latest 2"),
        ({"latest": {}}, [5, 4], [5], "latest 1"),
        ({"all": {}}, [3, 1], [1, 3], "all"),
        ({"specific": {"versions": [3, 1, 9]}}, [1, 2, 3], [1, 3], "specific 1,3,9"),
        ({}, [1, 2], [2], "latest 1"),
    ],
)
def test_policies_choose_versions(tmp_path: Path, body, available, chosen, described):
    if body is not None:
        (tmp_path / "config.json").write_text(json.dumps({"version_policy": body}))
    policy = read_policy(tmp_path)
    assert policy.select(available) == chosen
    assert policy.describe() == described


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{", "not readable JSON"),
        ('{"version_policy": {"newest": {}}}', "unknown version_policy 'newest'"),
        ('{"version_policy": {"latest": {"num_versions": 0}}}', "num_versions must be"),
        ('{"version_policy": {"latest": {"num_versions": true}}}', "num_versions must be"),
        ('{"version_policy": {"specific": {"versions": []}}}', "non-empty list"),
        ('{"version_policy": {"all": {}, "latest": {}}}', "must be one of"),
        ('{"version_policy": {"all": 1}}', "must be an object"),
    ],
)
def test_bad_policies_name_the_file_and_the_problem(tmp_path: Path, text, needle):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(RepositoryError) as e:
        read_policy(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and needle in str(e.value)


def test_model_names_skip_temporary_and_empty_folders(tmp_path: Path):
    for d in ("b/1", "a/2", ".tmp-x/1", "empty", "c/notaversion"):
        (tmp_path / d).mkdir(parents=True)
    assert model_names(tmp_path) == ["a", "b"]
    assert VersionPolicy().select([]) == []


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"model": "x.onnx", "model_repository": "repo"}, "not both"),
        ({"model": "x.onnx", "model_control_mode": "poll"}, "need --model-repository"),
        ({"model_control_mode": "sometimes"}, "--model-control-mode"),
        ({"repository_poll_s": 0.0}, "--repository-poll-s"),
        ({"version_drain_s": -1.0}, "--version-drain-s"),
    ],
)
def test_repository_settings_are_checked(fields, needle):
    with pytest.raises(SettingsError) as e:
        Settings(**fields).validate()
    assert needle in str(e.value)


def test_admin_principals_are_a_comma_list():
    assert Settings(admin_principals=" ops, alice ,,").admins() == frozenset({"ops", "alice"})
