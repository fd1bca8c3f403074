"""One session's state as the stores keep it, and its byte format.

A :class:`SessionRecord` is everything needed to resume a session in another process: the LSTM
state ``(h, c)``, the next-token logits, bookkeeping, and the identity of the model that produced
the state (a state is meaningless under a different model, so a reader compares identities).

Byte format, version 2 (all integers little-endian)::

    b"LSSR"              magic
    u16                  format version (2; version 1 is still read)
    u32                  header length N
    N bytes              msgpack map: id, steps, created, last_used, idle, owner, version,
                         model_name, model_version, model_checksum, L, H, V, has_logits,
                         requests (version 2: a list of [request id, payload digest, outcome],
                         oldest first; version 1 has none)
    4*L*H bytes          h, float32 little-endian, row-major
    4*L*H bytes          c, likewise
    4*V bytes            logits, only when has_logits
    32 bytes             SHA-256 of everything above

``requests`` are the session's recent requests that carried a request id (:class:`Request`), so
that a retry after a restart, or on another replica, gets the first attempt's outcome. The
outcome bytes are opaque here (the data plane encodes them); empty means "applied, outcome not
kept".

Where a record is kept (:func:`storage_key`): session ids are scoped per principal, so the key
is the owner and the id; for principal "" (no authentication) it is the id alone, as before.

The digest covers the whole record, so a flipped bit anywhere (a torn write, a bad disk, a value
overwritten by hand) is caught before any field is trusted. It is a corruption check, not an
authentication tag: anyone who can write the store can write a valid record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

MAGIC = b"LSSR"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_REQUEST_ID = 128  # characters (the data plane refuses longer ones)
MAX_REQUEST_DIGEST = 64  # bytes
_PREFIX = struct.Struct("<4sHI")  # magic, format version, header length
_DIGEST_LEN = 32
_F32 = np.dtype("<f4")

# Header field -> the Python types accepted for it (msgpack gives int for a float written as
# an integral value by other writers, so floats accept int too).
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "steps": (int,),
    "created": (float, int),
    "last_used": (float, int),
    "idle": (float, int),
    "owner": (str,),
    "version": (int,),
    "model_name": (str,),
    "model_version": (str,),
    "model_checksum": (str,),
    "L": (int,),
    "H": (int,),
    "V": (int,),
    "has_logits": (bool,),
}


def storage_key(owner: str, session_id: str) -> str:
    """The key a store keeps ``owner``'s session ``session_id`` under.

    Session ids are scoped per principal: two principals may both hold a session called X. For
    principal "" (authentication off) the key is the id itself, so records written before ids
    were scoped still load; otherwise it is ``OWNER/ID``. A session id never contains "/" (see
    :data:`server.sessions.SESSION_ID`), so the key splits at its last "/" one way only, and
    never equals the bare id of principal "".
    """
    return f"{owner}/{session_id}" if owner else session_id


@dataclass(frozen=True)
class Request:
    """A recent request that carried a request id: the id, a digest of its payload (a reuse of
    the id with another payload is refused) and its outcome as the data plane encoded it
    (``b""``: applied, outcome not kept)."""

    request_id: str
    digest: bytes
    outcome: bytes = b""


class RecordError(ValueError):
    """Bytes that are not a valid session record: truncated, corrupt or of an unknown format.

    The message is one line naming what is wrong.
    """


@dataclass(frozen=True)
class ModelIdentity:
    """Which model produced a state. ``checksum`` is the SHA-256 hex digest of the model file."""

    name: str
    version: str
    checksum: str


@dataclass(frozen=True)
class SessionRecord:
    """One session's state and bookkeeping, immutable; change it with :meth:`replace`.

    ``h`` and ``c`` are float32 ``[L, H]``; ``logits`` is float32 ``[V]`` (the distribution for
    the next token) or None if the session was never fed. The constructor checks shapes and
    dtypes (and that the expiry times are not NaN) and raises ValueError; it does not copy the
    arrays. ``idle_timeout_s`` may be ``inf`` (never expires). Records returned by a store have
    read-only arrays.

    ``version`` is 1 for a new session and goes up by one per committed change (the stores use
    it for compare-and-set). ``requests``: the recent requests that carried a request id, oldest
    first (:class:`Request`). The session expires at ``last_used_unix_s + idle_timeout_s``.

    Equality compares every field, arrays bit for bit (so NaNs compare equal to themselves).
    """

    session_id: str
    h: np.ndarray
    c: np.ndarray
    logits: np.ndarray | None
    steps: int
    created_unix_s: float
    last_used_unix_s: float
    idle_timeout_s: float
    owner: str
    version: int
    model: ModelIdentity
    requests: tuple[Request, ...] = ()

    def __post_init__(self) -> None:
        for name in ("h", "c"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 2:
                raise ValueError(f"{name} must be a float32 [L, H] array, got {_describe(a)}")
        if self.c.shape != self.h.shape:
            raise ValueError(f"c has shape {self.c.shape}, h has {self.h.shape}")
        lg = self.logits
        if lg is not None and (
            not isinstance(lg, np.ndarray) or lg.dtype != np.float32 or lg.ndim != 1 or not lg.size
        ):
            raise ValueError(f"logits must be None or a float32 [V>0] array, got {_describe(lg)}")
        # NaN times would make expiry compare false both ways: never found, never swept.
        if math.isnan(self.last_used_unix_s) or math.isnan(self.idle_timeout_s):
            raise ValueError("last_used_unix_s and idle_timeout_s must not be NaN")

    @property
    def key(self) -> str:
        """Where a store keeps this record (:func:`storage_key`)."""
        return storage_key(self.owner, self.session_id)

    @property
    def expires_unix_s(self) -> float:
        """Wall-clock time after which the session is gone."""
        return self.last_used_unix_s + self.idle_timeout_s

    def replace(self, **changes: Any) -> SessionRecord:
        """A copy with ``changes`` applied (the fields keep their checks)."""
        return dataclasses.replace(self, **changes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SessionRecord):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    # Arrays are mutable, so a record has no stable hash.
    __hash__ = None  # type: ignore[assignment]

    def to_bytes(self) -> bytes:
        """The record in the versioned format described in the module docstring."""
        layers, hidden = self.h.shape
        lg = self.logits
        header = {
            "id": self.session_id,
            "steps": int(self.steps),
            "created": float(self.created_unix_s),
            "last_used": float(self.last_used_unix_s),
            "idle": float(self.idle_timeout_s),
            "owner": self.owner,
            "version": int(self.version),
            "model_name": self.model.name,
            "model_version": self.model.version,
            "model_checksum": self.model.checksum,
            "L": layers,
            "H": hidden,
            "V": 0 if lg is None else lg.shape[0],
            "has_logits": lg is not None,
            "requests": [[r.request_id, r.digest, r.outcome] for r in self.requests],
        }
        head = msgpack.packb(header, use_bin_type=True)
        parts = [
            _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)),
            head,
            _le_bytes(self.h),
            _le_bytes(self.c),
        ]
        if lg is not None:
            parts.append(_le_bytes(lg))
        body = b"".join(parts)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionRecord:
        """Parse :meth:`to_bytes` output. Raises RecordError (one line) on anything invalid.

        The arrays of the result are read-only views of ``data`` (no copy).
        """
        data = bytes(data) if not isinstance(data, bytes) else data
        n = len(data)
        if n < _PREFIX.size + _DIGEST_LEN:
            raise RecordError(f"session record truncated: {n} bytes is shorter than any record")
        magic, fmt, head_len = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise RecordError(f"not a session record: magic {magic!r}, expected {MAGIC!r}")
        if fmt not in READABLE_VERSIONS:
            raise RecordError(f"unknown session record format {fmt} (this reader knows 1 and 2)")
        body = memoryview(data)[: n - _DIGEST_LEN]
        if hashlib.sha256(body).digest() != data[n - _DIGEST_LEN :]:
            raise RecordError(f"session record corrupt or truncated: SHA-256 mismatch ({n} bytes)")
        head_end = _PREFIX.size + head_len
        if head_end > len(body):
            raise RecordError(f"session record header length {head_len} runs past the data")
        try:
            header = msgpack.unpackb(body[_PREFIX.size : head_end], raw=False)
        except Exception as e:  # msgpack raises several unrelated types on bad input
            raise RecordError(f"session record header is not valid msgpack: {e}") from None
        if not isinstance(header, dict):
            raise RecordError("session record header is not a map")
        for key, types in _HEADER_TYPES.items():
            if key not in header:
                raise RecordError(f"session record header lacks {key!r}")
            value = header[key]
            # bool is an int subclass; a bool where a count belongs is an error, not 0/1.
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise RecordError(f"session record header field {key!r} is {type(value).__name__}")
        if fmt >= 2 and "requests" not in header:
            raise RecordError("session record header lacks 'requests'")
        requests = _requests(header["requests"]) if fmt >= 2 else ()
        layers, hidden, vocab = header["L"], header["H"], header["V"]
        if min(layers, hidden, vocab) < 0 or (vocab > 0) != header["has_logits"]:
            raise RecordError(
                f"session record shapes invalid: L={layers} H={hidden} V={vocab} "
                f"has_logits={header['has_logits']}"
            )
        state = layers * hidden * _F32.itemsize
        want = 2 * state + vocab * _F32.itemsize
        got = len(body) - head_end
        if got != want:
            raise RecordError(
                f"session record payload is {got} bytes, L={layers} H={hidden} V={vocab} "
                f"needs {want}"
            )
        off = head_end
        h = np.frombuffer(data, _F32, layers * hidden, off).reshape(layers, hidden)
        c = np.frombuffer(data, _F32, layers * hidden, off + state).reshape(layers, hidden)
        logits = np.frombuffer(data, _F32, vocab, off + 2 * state) if header["has_logits"] else None
        try:
            return cls(
                session_id=header["id"],
                h=_native(h),
                c=_native(c),
                logits=None if logits is None else _native(logits),
                steps=header["steps"],
                created_unix_s=float(header["created"]),
                last_used_unix_s=float(header["last_used"]),
                idle_timeout_s=float(header["idle"]),
                owner=header["owner"],
                version=header["version"],
                model=ModelIdentity(
                    header["model_name"], header["model_version"], header["model_checksum"]
                ),
                requests=requests,
            )
        except ValueError as e:  # the record's own checks (NaN times)
            raise RecordError(f"session record invalid: {e}") from None


def _requests(raw: object) -> tuple[Request, ...]:
    """The header's ``requests`` field, checked."""
    if not isinstance(raw, list):
        raise RecordError(f"session record header field 'requests' is {type(raw).__name__}")
    out = []
    for item in raw:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], bytes)
            and isinstance(item[2], bytes)
            and len(item[0]) <= MAX_REQUEST_ID
            and len(item[1]) <= MAX_REQUEST_DIGEST
        ):
            raise RecordError("session record header field 'requests' holds a malformed entry")
        out.append(Request(item[0], item[1], item[2]))
    return tuple(out)


def _le_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype=_F32).tobytes()


def _native(a: np.ndarray) -> np.ndarray:
    # "<f4" is float32 itself on little-endian hosts (no copy); a big-endian host gets a
    # converted copy, because the record's contract is plain float32.
    return a if a.dtype == np.float32 else a.astype(np.float32)


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__
