"""The wire between front ends and the engine process: ZeroMQ frames holding msgpack arrays.

Front ends talk to the engine over one ZeroMQ ``DEALER`` socket each; the engine listens on a
``ROUTER`` socket (``ipc://`` in the run directory), which prefixes every message with the
front end's identity. No pickle anywhere: requests and replies are flat msgpack arrays, logits
travel as raw little-endian float32 bytes.

Request:  ``[rid, op, *args]``: ``rid`` is the front end's request number (unique per front end).
Replies:  ``[rid, kind, payload]`` with ``kind``:

* ``RESULT``: the request's only reply;
* ``CHUNK``: one item of a streamed reply (``generate``); more follow;
* ``END``: a streamed reply is complete (payload ``None``);
* ``ERROR``: ``[error class name, message]``; the request is over.

One-way messages (no reply): ``CANCEL`` (the client went away: the engine cancels the request,
which puts the session back as it was), ``HEARTBEAT`` (payload: the front end's request stats
since its last heartbeat; a front end silent for ``FRONTEND_TIMEOUT_S`` is taken as dead and its
requests and streams are ended).
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from .errors import Busy, InvalidArgument, NotFound, ResourceExhausted, ServeError, Unavailable

# Request ops.
CREATE = "create"
CLOSE = "close"
RESET = "reset"
GET = "get"
STEP = "step"
GENERATE = "generate"
STREAM_OPEN = "stream_open"
STREAM_STEP = "stream_step"
STREAM_CLOSE = "stream_close"
MODEL_INFO = "model_info"
PING = "ping"
CANCEL = "cancel"
HEARTBEAT = "heartbeat"

# Reply kinds.
RESULT = 0
CHUNK = 1
END = 2
ERROR = 3

HEARTBEAT_S = 0.5
FRONTEND_TIMEOUT_S = 3.0
ENGINE_TIMEOUT_S = 2.0  # a front end that hears nothing from the engine this long: NOT_SERVING

_ERRORS: dict[str, type[ServeError]] = {
    cls.__name__: cls for cls in (NotFound, InvalidArgument, Busy, ResourceExhausted, Unavailable)
}


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
