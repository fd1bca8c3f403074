"""The engine's inline-or-batch decision for one-token steps (server/engine/loop.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.graph import random_model
from server.batch import StatePool
from server.engine.loop import COMPANY_S, Engine
from server.runtime import ModelRuntime


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    path = Path(tmp_path_factory.mktemp("m")) / "model.onnx"
    onnx.save(random_model(hidden_size=8, num_layers=1, seed=3), str(path))
    return ModelRuntime(str(path), provider="cpu")


def test_a_step_with_company_waits_for_the_tick_and_shares_one_model_call(runtime):
    """Requests that are not open between their calls (KServe sequences, unary Steps on named
    sessions: ``open_requests`` is 1) still share a model call when another session's step
    arrived within COMPANY_S; a lone session's steps, and steps after a longer gap, run at
    once on the calling thread."""
    spec = runtime.spec

    async def scenario() -> None:
        now = [100.0]
        pool = StatePool(spec.num_layers, spec.hidden_size, spec.vocab_size, 8)
        engine = Engine(runtime, pool, open_requests=lambda: 1, clock=lambda: now[0])
        engine.start()
        try:
            token = np.array([1], np.int64)
            calls = engine.stats.batch_size

            # Alone: done before submit_step returns (ran inline), one call of one row.
            a = engine.submit_step(0, token)
            assert a.future.done()
            # The same session again at once: still alone (its own previous step).
            now[0] += COMPANY_S / 4
            assert engine.submit_step(0, token).future.done()
            assert (calls.total, int(calls.counts.sum())) == (2, 2)

            # Another session within COMPANY_S: company, so it waits for the end of the tick,
            # and a third that arrives in the same tick joins it: one call of two rows.
            now[0] += COMPANY_S / 4
            b = engine.submit_step(1, token)
            c = engine.submit_step(2, token)
            assert not b.future.done() and not c.future.done()
            await asyncio.gather(b.future, c.future)
            assert (calls.total, int(calls.counts.sum())) == (4, 3)

            # After a longer gap the next step is alone again.
            now[0] += 10 * COMPANY_S
            assert engine.submit_step(3, token).future.done()
        finally:
            await engine.stop()

    asyncio.run(scenario())
