"""The Dockerfile lints clean and stays consistent with what it packages.

These are the fast, static checks. The image itself is built and run for real by
`make container-test` (scripts/container-test.sh).
"""

import importlib.metadata
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: it comes with the dev extra (make install)")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, args = (buf + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def test_hadolint_clean_at_warning_level():
    result = _lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_threshold_catches_warnings(tmp_path):
    # The check above is only worth something if a warning fails it.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\n")
    result = _lint(bad)
    assert result.returncode != 0
    assert "DL3008" in result.stdout


def test_final_stage_is_a_non_root_server_that_drains_and_reports_health():
    stage = _final_stage()
    keywords = dict(stage)  # the last of each instruction is the one that counts
    env = _env(stage)

    user = keywords["USER"]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"USER must be a numeric non-root uid: {user}"
    assert env["LSTM_SERVE_HOST"] == "0.0.0.0"
    exposed = set(keywords["EXPOSE"].split())
    assert {env["LSTM_SERVE_PORT"], env["LSTM_SERVE_METRICS_PORT"]} <= exposed
    assert keywords["STOPSIGNAL"] == "SIGTERM"
    health = keywords["HEALTHCHECK"]
    assert "lstm-client health" in health
    assert "${LSTM_SERVE_PORT}" in health, "the health check must follow the configured port"
    assert keywords["ENTRYPOINT"] == '["lstm-serve"]'


def test_base_image_matches_the_pinned_onnxruntime_gpu_build():
    default = next(
        args.partition("=")[2]
        for keyword, args in _instructions(DOCKERFILE.read_text(encoding="utf-8"))
        if keyword == "ARG" and args.startswith("BASE_IMAGE=")
    )
    tag = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu\d+\.\d+", default)
    assert tag, f"BASE_IMAGE default is not an nvidia/cuda cuDNN runtime image: {default}"
    base_major, base_minor = int(tag[1]), int(tag[2])

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("onnxruntime-gpu==")]
    assert len(pins) == 1, pins
    pinned = re.match(r"onnxruntime-gpu==([\w.]+)", pins[0])[1]  # type: ignore[index]
    try:
        dist = importlib.metadata.distribution("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed here (not Linux x86_64)")
    if dist.version != pinned:
        pytest.skip(f"installed onnxruntime-gpu {dist.version} is not the pinned {pinned}")

    info = Path(str(dist.locate_file("onnxruntime/capi/build_and_package_info.py")))
    built = re.search(r"cuda_version\s*=\s*'(\d+)\.(\d+)", info.read_text(encoding="utf-8"))
    assert built, "onnxruntime-gpu does not say which CUDA it was built with"
    ort_major, ort_minor = int(built[1]), int(built[2])
    # CUDA minor-version compatibility: same major, a runtime at least as new as the build.
    assert (base_major, base_minor) >= (ort_major, ort_minor) and base_major == ort_major, (
        f"onnxruntime-gpu {pinned} is a CUDA {ort_major}.{ort_minor} build; base is {default}"
    )
    cudnn = [r for r in dist.requires or [] if r.startswith("nvidia-cudnn-cu")]
    assert cudnn, "onnxruntime-gpu no longer names its cuDNN"
    assert all(r.startswith(f"nvidia-cudnn-cu{base_major}") for r in cudnn), cudnn


def test_proxy_ca_bundle_is_lent_to_the_build_not_copied_into_it():
    instructions = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    for keyword, args in instructions:
        if keyword in {"COPY", "ADD"}:
            assert not re.search(r"ca-cert|\.crt|\.pem|ca_bundle", args), args
    pip_runs = [a for k, a in instructions if k == "RUN" and "pip " in a]
    assert pip_runs
    assert all("--mount=type=secret,id=ca_bundle" in a for a in pip_runs)


def test_container_configuration_names_real_server_settings():
    # A misspelt variable is silently ignored by the server, so check every name we set.
    import dataclasses

    from server.settings import ENV_PREFIX, Settings

    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    for path in [DOCKERFILE, *sorted((ROOT / "deploy").glob("compose*.yaml"))]:
        used = set(re.findall(r"\b(LSTM_SERVE_[A-Z0-9_]+)", path.read_text(encoding="utf-8")))
        assert used, path
        assert used <= known, f"{path.name}: not server settings: {sorted(used - known)}"
