"""The front end <-> engine wire: errors keep their class and message, stats add up exactly."""

from __future__ import annotations

import numpy as np
import pytest

from server import ipc
from server.errors import Busy, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from server.metrics import RequestStats


@pytest.mark.parametrize("cls", [NotFound, InvalidArgument, Busy, ResourceExhausted, Unavailable])
def test_domain_errors_cross_the_wire_as_themselves(cls):
    payload = ipc.unpack(ipc.pack([7, ipc.ERROR, ipc.error_payload(cls("why: x"))]))[2]
    e = ipc.error_from(payload)
    assert type(e) is cls and str(e) == "why: x"


def test_other_errors_become_internal_without_their_message():
    payload = ipc.error_payload(KeyError("secret detail"))
    e = ipc.error_from(payload)
    assert isinstance(e, RuntimeError) and "secret" not in str(e) and "KeyError" in str(e)


def test_logits_travel_as_raw_float32():
    a = np.random.default_rng().standard_normal((3, 28)).astype(np.float32)
    back = ipc.from_f32(ipc.unpack(ipc.pack(ipc.f32(a))), a.shape)
    np.testing.assert_array_equal(back, a)


def test_request_stats_shipped_in_deltas_add_up_to_the_whole():
    rng = np.random.default_rng()
    whole, merged = RequestStats(), RequestStats()
    for _ in range(5):  # five heartbeats' worth
        delta = RequestStats()
        for _ in range(int(rng.integers(0, 50))):
            method = str(rng.choice(["Step", "Generate"]))
            code = str(rng.choice(["OK", "NOT_FOUND"]))
            secs = float(rng.exponential(0.01))
            delta.record(method, code, secs)
            whole.record(method, code, secs)
        merged.merge(RequestStats.from_wire(ipc.unpack(ipc.pack(delta.to_wire()))))
    assert dict(merged.counts) == dict(whole.counts)
    for m, h in whole.durations.items():
        np.testing.assert_array_equal(merged.durations[m].counts, h.counts)
        assert merged.durations[m].total == pytest.approx(h.total)
