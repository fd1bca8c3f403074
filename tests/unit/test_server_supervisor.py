"""The supervisor's child processes (server/supervisor.py)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from server import supervisor as sv


def test_a_child_that_never_reports_ready_does_not_hold_the_supervisor(monkeypatch):
    """A child that prints nothing (a front end stuck before its ready line) is given up on at
    the start timeout, or at once when a stop is asked for (SIGTERM during start-up)."""
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(sv, "START_TIMEOUT_S", 0.5)
    child = sv._Child("front end 0", silent)
    t0 = time.monotonic()
    with pytest.raises(sv.StartError, match="did not report ready within"):
        child.start("FRONTEND READY", "FRONTEND FAILED")
    assert time.monotonic() - t0 < 5 and child.poll() is not None
    monkeypatch.setattr(sv, "START_TIMEOUT_S", 60.0)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    child = sv._Child("front end 0", silent)
    t0 = time.monotonic()
    with pytest.raises(sv.StartError, match="stopped while front end 0 was starting"):
        child.start("FRONTEND READY", "FRONTEND FAILED", stop)
    assert time.monotonic() - t0 < 5 and child.poll() is not None
    # The ready line still works, and what follows it is forwarded.
    talks = [sys.executable, "-c", "print('noise'); print('FRONTEND READY 123', flush=True)"]
    assert sv._Child("front end 0", talks).start("FRONTEND READY", "FRONTEND FAILED") == ["123"]
