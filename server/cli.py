"""``lstm-serve``: serve a model (see ``lstm-serve --help``; ``LSTM_SERVE_*`` for containers)."""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
from pathlib import Path

from .runtime import ModelLoadError
from .settings import Settings, SettingsError, from_args
from .supervisor import StartError, Supervisor, run


def _client_command() -> str:
    beside = Path(sys.executable).parent / "lstm-client"
    if beside.exists():
        try:
            return str(beside.relative_to(Path.cwd()))
        except ValueError:
            return str(beside)
    return shutil.which("lstm-client") or "lstm-client"


def _announce(sup: Supervisor) -> None:
    s = sup.settings
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    target = f"{host}:{sup.port}"
    assert sup.engine is not None
    print(f"lstm-serve: {sup.describe}", flush=True)
    if sup.topology == "single":
        print(f"lstm-serve: one process (engine and gRPC) pid {sup.engine.pid}", flush=True)
    else:
        pids = ",".join(str(fe.pid) for fe in sup.frontends)
        print(
            f"lstm-serve: engine pid {sup.engine.pid}, {len(sup.frontends)} front end(s) "
            f"pid {pids}",
            flush=True,
        )
    print(f"lstm-serve: gRPC listening on {s.host}:{sup.port}", flush=True)
    if sup.http_port is not None:
        scheme = "https" if s.tls_cert else "http"
        print(
            f"lstm-serve: KServe v2 HTTP/REST on {scheme}://{host}:{sup.http_port}/v2 "
            f"(readiness: {scheme}://{host}:{sup.http_port}/v2/health/ready)",
            flush=True,
        )
    if sup.metrics_port is not None:
        print(f"lstm-serve: metrics on http://{host}:{sup.metrics_port}/metrics", flush=True)
    for line in _access_notes(s):
        print(f"lstm-serve: {line}", flush=True)
    tls = f" --tls-ca {shlex.quote(s.tls_cert)}" if s.tls_cert else ""
    print(
        f"try: {_client_command()} generate --target {target}{tls} "
        '--prompt "time traveller" --max-tokens 100',
        flush=True,
    )


def _access_notes(s: Settings) -> list[str]:
    """What a client needs besides the target, for the "try:" line's reader (never a token)."""
    notes = []
    if s.tls_cert:
        notes.append(
            "TLS is on: clients need --tls-ca with the CA that signed --tls-cert (for a "
            "self-signed certificate, that is the certificate file itself, which the try: line "
            "passes)"
        )
    if s.tls_client_ca:
        notes.append(
            "mutual TLS is on: clients also need --tls-cert and --tls-key, a certificate signed "
            "by --tls-client-ca"
        )
    if s.auth_tokens:
        notes.append(
            "--auth-tokens is on: clients need one of its tokens (--token TOKEN, or "
            "LSTM_SERVE_TOKEN=TOKEN in the environment, which the try: line relies on)"
        )
    return notes


def main(argv: list[str] | None = None) -> None:
    try:
        settings = from_args(argv)
    except SettingsError as e:
        print(f"lstm-serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = run(settings, _announce)
    except (ModelLoadError, StartError) as e:
        print(f"lstm-serve: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"lstm-serve: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
