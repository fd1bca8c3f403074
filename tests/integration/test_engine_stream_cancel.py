"""The engine's side of a cancelled StepStream open: a stream the front end never learnt of is
closed, so its session does not stay attached (never expiring) for the front end's lifetime."""

from __future__ import annotations

import asyncio
from pathlib import Path

from server import ipc
from server.app import build_core
from server.dataplane import ANONYMOUS
from server.engine_host import EngineHost
from server.frontend import RemotePlane, _ctx
from tests.integration.conftest import make_settings


def test_a_cancel_after_the_open_completed_closes_the_stream(model_path: Path, tmp_path: Path):
    async def scenario() -> tuple[int, int, int]:
        core = await build_core(make_settings(model_path))
        host = EngineHost(core, str(tmp_path / "engine.sock"))
        await host.start()
        plane = RemotePlane(host.path)
        await plane.connect()
        try:
            sid = (await plane.create_session()).session_id
            store = core.store
            # The open completes in the engine; its reply is read here as a front end would,
            # then the CANCEL that a front end sends when its call was cancelled meanwhile.
            rid = 10_000
            reply: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            plane._waiting[rid] = reply
            plane._send([rid, ipc.STREAM_OPEN, _ctx(ANONYMOUS), sid, "", ""])
            stream_id, _ = await reply  # type: ignore[misc]
            attached_open = store.local(sid, "").attached
            plane._send([rid, ipc.CANCEL])
            for _ in range(200):
                await asyncio.sleep(0.01)
                if store.local(sid, "").attached == 0:
                    break
            # A later, normal open and close still work.
            stream = await plane.open_stream(sid)
            await stream.close()
            return stream_id, attached_open, store.local(sid, "").attached
        finally:
            plane.close()
            await host.stop()
            await core.stop()

    stream_id, attached_open, attached_after = asyncio.run(scenario())
    assert stream_id == 10_000  # the stream's id is its open request's id
    assert attached_open == 1
    assert attached_after == 0
