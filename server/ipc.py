"""The wire between front ends and the engine process: msgpack over a Unix domain socket.

Each front end holds one connection to the engine's socket (in the supervisor's private run
directory). Messages are msgpack arrays written back to back; msgpack's streaming unpacker
splits them, so there is no framing of our own. No pickle anywhere; logits (and a sequence
model's features and outputs) travel as raw little-endian float32 bytes.

Why not ZeroMQ: measured on the 2-core machine this project is tuned on, a request/reply round
trip between two processes took 121 us with blocking ZeroMQ sockets and 146-209 us with
``zmq.asyncio`` (its I/O threads add two thread hand-offs each way), against 74 us for an
asyncio Unix-socket protocol and 10 us for blocking Unix sockets; a client's step costs about
0.5 ms end to end, so ZeroMQ alone would have added a third. A connection per front end also
tells the engine at once when a front end dies (the kernel closes its socket), and tells a
front end at once when the engine dies.

Request:  ``[rid, op, ctx, *args]``: ``rid`` is the front end's request number (unique per front
end); ``ctx`` is ``[principal, seconds left before the client's deadline or None]``.
Replies:  ``[rid, kind, payload]`` with ``kind``:

* ``RESULT``: the request's only reply;
* ``CHUNK``: one item of a streamed reply (``generate``); more follow;
* ``END``: a streamed reply is complete (payload ``None``);
* ``ERROR``: ``[error class name, message]``; the request is over.

One-way messages (no reply): ``CANCEL`` (the client went away: the engine cancels the request,
which puts the session back as it was), ``HEARTBEAT`` (payload: the front end's request stats
since its last heartbeat, its KServe inference counts per model version, and its index and pid).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import msgpack
import numpy as np

from .errors import ServeError

T = TypeVar("T")

# Request ops.
CREATE = "create"
CLOSE = "close"
RESET = "reset"
GET = "get"
LIST_SESSIONS = "list_sessions"
STEP = "step"
GENERATE = "generate"
STREAM_OPEN = "stream_open"
STREAM_STEP = "stream_step"
STREAM_CLOSE = "stream_close"
MODEL_INFO = "model_info"
EXPORT = "export"
IMPORT = "import"
FORK = "fork"
LIST_MODELS = "list_models"
LOAD_MODEL = "load_model"
UNLOAD_MODEL = "unload_model"
PING = "ping"
INFER_STATS = "infer_stats"
CANCEL = "cancel"
HEARTBEAT = "heartbeat"

# Reply kinds.
RESULT = 0
CHUNK = 1
END = 2
ERROR = 3

HEARTBEAT_S = 0.5
ENGINE_TIMEOUT_S = 2.0  # a front end waits this long for the engine's first answer, then retries

# Every domain error crosses the wire as itself: all of them are defined in server/errors.py.
_ERRORS: dict[str, type[ServeError]] = {cls.__name__: cls for cls in ServeError.__subclasses__()}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True)


def error_payload(e: BaseException) -> list[str]:
    """``[class name, message]`` of a domain error; anything else travels as an internal one."""
    if isinstance(e, ServeError):
        for cls in type(e).__mro__:
            if cls.__name__ in _ERRORS:
                return [cls.__name__, str(e)]
    return ["Internal", f"{type(e).__name__}"]


def error_from(payload: list[str]) -> Exception:
    """The exception a reply's ``ERROR`` payload stands for."""
    name, message = payload
    cls = _ERRORS.get(name)
    if cls is None:
        return RuntimeError(f"engine error: {message}")
    return cls(message)


def f32(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, np.float32).tobytes()


def from_f32(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(data, np.float32).reshape(shape)


def features_payload(features: np.ndarray | None) -> list[Any] | None:
    """A step's features (a sequence model's input) on the wire: ``[shape, raw float32]``."""
    return None if features is None else [list(features.shape), f32(features)]


class Connection(asyncio.Protocol):
    """One end of a front end <-> engine connection: whole messages in, whole messages out.

    ``on_message`` gets each decoded message; ``on_lost`` is called once when the connection
    ends (the peer died or closed it).
    """

    def __init__(
        self, on_message: Callable[[Any], None], on_lost: Callable[[], None] | None = None
    ) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._unpacker = msgpack.Unpacker(raw=False, use_list=True, max_buffer_size=64 << 20)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not necessarily an asyncio.Transport subclass (uvloop's).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._unpacker.feed(data)
        for msg in self._unpacker:
            self.on_message(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.on_lost is not None:
            self.on_lost()

    def send(self, msg: Any) -> None:
        """Queue ``msg``; dropped if the connection is gone (its reader is gone too)."""
        if self.transport is not None and not self.closed:
            self.transport.write(pack(msg))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent (the supervisor) dies.

    A supervisor killed with -9 cannot stop its children; without this they would run on
    orphaned, holding the port and the engine's memory. Linux only (prctl PR_SET_PDEATHSIG);
    elsewhere a no-op.
    """
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call: do it now
        os.kill(os.getpid(), signal.SIGKILL)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (a server process's cue to drain), on the running
    loop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop where it is installed (Linux, macOS), else on asyncio's
    own loop; ``LSTM_SERVE_EVENT_LOOP=asyncio`` in the environment asks for asyncio's anyway
    (an escape hatch, and the other arm of the A/B in benchmarks/README.md, section 15)."""
    import os

    if os.environ.get("LSTM_SERVE_EVENT_LOOP", "uvloop") == "asyncio":
        return asyncio.run(main)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def status_payload(m: Any) -> list[Any]:
    """A :class:`~server.dataplane.ModelStatus` on the wire."""
    rows = [[v.version, v.state, v.reason, v.sessions, v.memory_bytes] for v in m.versions]
    return [m.name, m.version_policy, rows, m.is_default]
