"""``lstm-serve``: serve a model (see ``lstm-serve --help``; ``LSTM_SERVE_*`` for containers)."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from .runtime import ModelLoadError
from .settings import SettingsError, from_args
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
    pids = ",".join(str(fe.pid) for fe in sup.frontends)
    print(
        f"lstm-serve: engine pid {sup.engine.pid}, {len(sup.frontends)} front end(s) pid {pids}",
        flush=True,
    )
    print(f"lstm-serve: gRPC listening on {s.host}:{sup.port}", flush=True)
    if sup.metrics_port is not None:
        print(f"lstm-serve: metrics on http://{host}:{sup.metrics_port}/metrics", flush=True)
    print(
        f"try: {_client_command()} generate --target {target} "
        '--prompt "time traveller" --max-tokens 100',
        flush=True,
    )


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
