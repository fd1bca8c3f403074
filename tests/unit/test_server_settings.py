"""Settings: defaults, LSTM_SERVE_* variables, flags over variables, errors naming the setting."""

from __future__ import annotations

import dataclasses

import pytest

from server.settings import Settings, SettingsError, from_args, from_env, settings_table


def test_defaults_are_valid_and_documented():
    s = from_env({})
    assert s == Settings()
    assert s.host == "127.0.0.1" and s.provider == "auto" and s.idle_timeout_s == 600
    for f in dataclasses.fields(Settings):
        assert f.metadata["help"].endswith((".", ")")), f.name
    table = settings_table()
    assert "`LSTM_SERVE_MAX_BATCH_SIZE`" in table and "`--drain-grace-s`" in table


def test_environment_variables_are_parsed_by_type():
    env = {
        "LSTM_SERVE_HOST": "0.0.0.0",
        "LSTM_SERVE_PORT": "0",
        "LSTM_SERVE_MAX_QUEUE_DELAY_MS": "0.5",
        "LSTM_SERVE_EVICTION": "lru",
        "LSTM_SERVE_MODEL": "/m/x.onnx",
        "LSTM_SERVE_MAX_SESSIONS": "",  # empty = unset
        "OTHER": "ignored",
    }
    s = from_env(env)
    assert (s.host, s.port, s.max_queue_delay_ms, s.eviction) == ("0.0.0.0", 0, 0.5, "lru")
    assert s.model == "/m/x.onnx" and s.max_sessions == Settings().max_sessions


def test_flags_override_environment():
    s = from_args(["--port", "7000", "--max-batch-size", "1"], {"LSTM_SERVE_PORT": "6000"})
    assert s.port == 7000 and s.max_batch_size == 1
    assert from_args([], {"LSTM_SERVE_PORT": "6000"}).port == 6000


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"LSTM_SERVE_PORT": "abc"}, "LSTM_SERVE_PORT"),
        ({"LSTM_SERVE_PORT": "70000"}, "LSTM_SERVE_PORT"),
        ({"LSTM_SERVE_PROVIDER": "tpu"}, "--provider"),
        ({"LSTM_SERVE_EVICTION": "random"}, "LSTM_SERVE_EVICTION"),
        ({"LSTM_SERVE_MAX_SESSIONS": "0"}, "max-sessions"),
        ({"LSTM_SERVE_IDLE_TIMEOUT_S": "0"}, "idle-timeout-s"),
        ({"LSTM_SERVE_MAX_QUEUE_DELAY_MS": "-1"}, "max-queue-delay-ms"),
        ({"LSTM_SERVE_METRICS_PORT": "-2"}, "metrics-port"),
    ],
)
def test_bad_values_name_the_setting(env, needle):
    with pytest.raises(SettingsError, match=needle):
        from_env(env)


def test_switches_take_a_value_or_none():
    s = Settings()
    assert (s.reflection, s.expose_build_info) == (False, False)
    assert from_args(["--reflection"], {}).reflection is True
    assert from_args(["--reflection", "false"], {"LSTM_SERVE_REFLECTION": "1"}).reflection is False
    assert from_args([], {"LSTM_SERVE_EXPOSE_BUILD_INFO": "yes"}).expose_build_info is True
    s = from_args(["--expose-build-info", "--port", "7000"], {})
    assert s.expose_build_info is True and s.port == 7000
    with pytest.raises(SettingsError, match="LSTM_SERVE_REFLECTION"):
        from_env({"LSTM_SERVE_REFLECTION": "maybe"})


def test_message_size_limit_covers_the_largest_valid_request():
    s = Settings()
    # A prompt of max_prompt_tokens tokens as text (at most 8 characters of up to 4 UTF-8
    # bytes each) or as token ids (at most 10 bytes each), or a record of max_record_bytes.
    assert s.max_message_bytes() >= 8 * 4 * s.max_prompt_tokens
    assert s.max_message_bytes() >= 10 * s.max_prompt_tokens
    assert s.max_message_bytes() > s.max_record_bytes
    assert s.max_message_bytes() <= 512 << 10  # a few hundred KB, not the 16 MiB it was
    big = Settings(max_prompt_tokens=100_000, max_record_bytes=1 << 20)
    assert big.max_message_bytes() >= 32 * 100_000 > Settings().max_message_bytes()
    assert Settings(max_record_bytes=8 << 20).max_message_bytes() > 8 << 20
    with pytest.raises(SettingsError, match="max-record-bytes"):
        from_env({"LSTM_SERVE_MAX_RECORD_BYTES": "0"})


def test_bad_flag_value_names_the_flag():
    with pytest.raises(SettingsError, match="--max-new-tokens"):
        from_args(["--max-new-tokens", "many"], {})


def test_settings_travel_to_child_processes_as_json_unchanged():
    from server.settings import settings_from_json

    s = from_args(["--frontends", "3", "--max-queue-delay-ms", "0.7", "--eviction", "lru"], {})
    assert settings_from_json(s.to_json()) == s
    with pytest.raises(SettingsError, match="frontends"):
        settings_from_json(dataclasses.replace(s, frontends=-1).to_json())


def test_frontend_count_follows_the_cores(monkeypatch):
    import os

    assert Settings(frontends=5).frontend_count() == 5
    for cores, want in [(1, 1), (2, 1), (3, 2), (16, 8), (64, 8)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert Settings().frontend_count() == want, cores


def test_topology_auto_is_single_on_at_most_two_cores_else_split(monkeypatch):
    import server.settings as st

    for cores, want in ((1, "single"), (2, "single"), (3, "split"), (16, "split")):
        monkeypatch.setattr(st.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert Settings().resolved_topology() == want, cores
        # Asking for front ends asks for the split; an explicit topology is kept.
        assert Settings(frontends=2).resolved_topology() == "split"
        assert Settings(topology="single").resolved_topology() == "single"
        assert Settings(topology="split").resolved_topology() == "split"
    with pytest.raises(SettingsError, match="--topology"):
        Settings(topology="single", frontends=2).validate()
    with pytest.raises(SettingsError, match="topology"):
        Settings(topology="both").validate()
