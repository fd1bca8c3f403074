"""The single-process topology: the engine and gRPC (and HTTP) in one process.

Started by the supervisor as ``python -m server.single`` when ``--topology`` resolves to
``single`` (the default on hosts with at most 2 available cores: there it measured cheaper per
step and faster than the split, benchmarks/README.md section 15). It is the :class:`App` the
tests embed, run as a child of the supervisor, which holds the ports reserved and announces it;
the model call still runs off the GIL on the engine thread whenever a batch is worth it (see
:mod:`server.engine.loop`). It prints ``ENGINE READY METRICS_PORT DESCRIPTION`` as the engine
process does, so the supervisor watches it the same way: its death stops the server (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from . import ipc
from .app import App
from .settings import Settings, settings_from_json


async def run(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    stop = ipc.stop_on_signals()
    app = App(settings, reuse_port=True)
    await app.start()
    try:
        await app.ready()
    except BaseException:
        # The gRPC server is already started: stop it before the loop closes.
        await app.drain(0)
        raise
    # The supervisor forwards SIGHUP: read the tokens file again.
    loop.add_signal_handler(signal.SIGHUP, app.servicer.authenticator.reload)
    assert app.core is not None
    metrics_port = app.metrics_port if app.metrics_port is not None else -1
    print(f"ENGINE READY {metrics_port} {app.core.describe()}", flush=True)
    await stop.wait()
    await app.drain()
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.single")
    p.add_argument("--settings-json", required=True)
    a = p.parse_args(argv)
    ipc.die_with_parent()
    settings = settings_from_json(a.settings_json)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        sys.exit(ipc.run_loop(run(settings)))
    except Exception as e:  # a load failure: one line for the supervisor to repeat
        print(f"ENGINE FAILED {type(e).__name__}: {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
