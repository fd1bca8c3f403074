"""SessionRecord's byte format: exact round trips over several shapes, and every damaged input
(truncated, a byte flipped anywhere, a foreign format) refused with a one-line RecordError."""

from __future__ import annotations

import hashlib
import struct

import msgpack
import numpy as np
import pytest

from server.state.record import (
    FORMAT_VERSION,
    MAGIC,
    ModelIdentity,
    RecordError,
    Request,
    SessionRecord,
    storage_key,
)

MODEL = ModelIdentity("timemachine", "3", hashlib.sha256(b"model").hexdigest())


def make(rng: np.random.Generator, layers: int, hidden: int, vocab: int | None) -> SessionRecord:
    return SessionRecord(
        session_id=f"s-{rng.integers(1 << 30)}",
        h=rng.standard_normal((layers, hidden), dtype=np.float32),
        c=rng.standard_normal((layers, hidden), dtype=np.float32),
        logits=None if vocab is None else rng.standard_normal(vocab, dtype=np.float32),
        steps=int(rng.integers(0, 10_000)),
        created_unix_s=1.7e9 + float(rng.random()),
        last_used_unix_s=1.7e9 + 10 + float(rng.random()),
        idle_timeout_s=float(rng.choice([0.2, 300.0, np.inf])),
        owner=str(rng.choice(["", "alice", "ünïcode"])),
        version=int(rng.integers(1, 1 << 40)),
        model=MODEL,
        requests=tuple(
            Request(f"r-{i}", rng.bytes(16), rng.bytes(int(rng.integers(0, 300))))
            for i in range(int(rng.integers(0, 4)))
        ),
    )


def same(a: SessionRecord, b: SessionRecord) -> None:
    """Field by field, arrays bit for bit (the record's own == is built on to_bytes)."""
    for name in ("h", "c"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
        assert x.tobytes() == y.tobytes()
    if a.logits is None:
        assert b.logits is None
    else:
        assert b.logits is not None and a.logits.tobytes() == b.logits.tobytes()
    for name in (
        "session_id",
        "steps",
        "created_unix_s",
        "last_used_unix_s",
        "idle_timeout_s",
        "owner",
        "version",
        "model",
        "requests",
    ):
        assert getattr(a, name) == getattr(b, name), name


SHAPES = [(1, 1, 1), (1, 8, 28), (2, 64, 28), (3, 257, 1000), (4, 512, 65)]


@pytest.mark.parametrize("layers,hidden,vocab", SHAPES)
@pytest.mark.parametrize("with_logits", [True, False])
def test_round_trip_is_exact(layers: int, hidden: int, vocab: int, with_logits: bool) -> None:
    rng = np.random.default_rng()
    rec = make(rng, layers, hidden, vocab if with_logits else None)
    data = rec.to_bytes()
    assert data[:4] == MAGIC
    want = 2 * layers * hidden * 4 + (vocab * 4 if with_logits else 0)
    assert len(data) > want + 32
    back = SessionRecord.from_bytes(data)
    same(rec, back)
    assert back == rec
    assert not back.h.flags.writeable  # views of the bytes, not copies
    assert back.to_bytes() == data


def test_special_values_and_non_contiguous_arrays_round_trip() -> None:
    rng = np.random.default_rng()
    batch = rng.standard_normal((5, 3, 16), dtype=np.float32)
    h = batch[2]  # a row of a batch, as the scheduler would split it
    c = batch[:3, 1, :]  # strided across the batch, not C-contiguous
    assert not c.flags.c_contiguous
    logits = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], dtype=np.float32)
    rec = make(rng, 3, 16, None).replace(h=h, c=c, logits=logits)
    back = SessionRecord.from_bytes(rec.to_bytes())
    same(rec, back)
    assert np.array_equal(back.h, h) and np.array_equal(back.c, c)


def test_truncation_anywhere_is_refused() -> None:
    data = make(np.random.default_rng(), 1, 4, 3).to_bytes()
    for n in range(len(data)):
        with pytest.raises(RecordError) as e:
            SessionRecord.from_bytes(data[:n])
        assert "\n" not in str(e.value)


def test_a_flipped_byte_anywhere_is_refused() -> None:
    rng = np.random.default_rng()
    small = make(rng, 1, 4, 3).to_bytes()
    big = make(rng, 2, 128, 500).to_bytes()
    cases = [(small, i) for i in range(len(small))]
    cases += [(big, int(i)) for i in rng.integers(0, len(big), 200)]
    for data, i in cases:
        bad = bytearray(data)
        bad[i] ^= 1 << int(rng.integers(8))
        with pytest.raises(RecordError) as e:
            SessionRecord.from_bytes(bytes(bad))
        assert "\n" not in str(e.value)


def resign(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def test_foreign_and_inconsistent_records_are_refused_by_name() -> None:
    data = make(np.random.default_rng(), 2, 8, 5).to_bytes()
    body = data[:-32]
    with pytest.raises(RecordError, match="magic"):
        SessionRecord.from_bytes(resign(b"XXXX" + body[4:]))
    with pytest.raises(RecordError, match="format 3"):
        SessionRecord.from_bytes(resign(body[:4] + struct.pack("<H", 3) + body[6:]))
    # A validly signed record whose header disagrees with its payload.
    (head_len,) = struct.unpack_from("<I", body, 6)
    header = msgpack.unpackb(body[10 : 10 + head_len])
    header["H"] = 9
    head = msgpack.packb(header)
    forged = body[:6] + struct.pack("<I", len(head)) + head + body[10 + head_len :]
    with pytest.raises(RecordError, match="payload"):
        SessionRecord.from_bytes(resign(forged))
    del header["owner"]
    head = msgpack.packb(header)
    forged = body[:6] + struct.pack("<I", len(head)) + head + body[10 + head_len :]
    with pytest.raises(RecordError, match="owner"):
        SessionRecord.from_bytes(resign(forged))
    with pytest.raises(RecordError, match="truncated"):
        SessionRecord.from_bytes(b"")


def test_constructor_checks_shapes_and_dtypes() -> None:
    rec = make(np.random.default_rng(), 2, 8, 5)
    with pytest.raises(ValueError, match="float32"):
        rec.replace(h=rec.h.astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        rec.replace(c=rec.c[:1])
    with pytest.raises(ValueError, match="logits"):
        rec.replace(logits=np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        rec.replace(idle_timeout_s=float("nan"))
    bumped = rec.replace(version=rec.version + 1, steps=rec.steps + 1)
    assert bumped.version == rec.version + 1 and bumped != rec
    assert rec.expires_unix_s == rec.last_used_unix_s + rec.idle_timeout_s


def _with_header(data: bytes, fmt: int, change) -> bytes:
    """``data`` re-signed with its header changed by ``change`` and format ``fmt``."""
    body = data[:-32]
    (head_len,) = struct.unpack_from("<I", body, 6)
    header = msgpack.unpackb(body[10 : 10 + head_len], raw=False)
    change(header)
    head = msgpack.packb(header, use_bin_type=True)
    return resign(body[:4] + struct.pack("<HI", fmt, len(head)) + head + body[10 + head_len :])


def test_format_1_records_still_load_without_request_ids() -> None:
    # What a server before format 2 wrote (and what an SQLite file or Redis may still hold).
    assert FORMAT_VERSION == 2
    rec = make(np.random.default_rng(), 2, 8, 5).replace(requests=(Request("r", b"d", b"o"),))
    old = _with_header(rec.to_bytes(), 1, lambda h: h.pop("requests"))
    back = SessionRecord.from_bytes(old)
    assert back.requests == ()
    same(rec.replace(requests=()), back)
    # Format 2 keeps them, outcome bytes and all (b"": applied, outcome not kept).
    rec = rec.replace(requests=(Request("a" * 128, b"\x00" * 16, b""), Request("b", b"d", b"x")))
    assert SessionRecord.from_bytes(rec.to_bytes()).requests == rec.requests


def test_malformed_request_lists_are_refused() -> None:
    data = make(np.random.default_rng(), 1, 4, 3).to_bytes()
    for bad in ([["r", "not bytes", b""]], [["r", b"d"]], "x", [["r" * 129, b"d", b""]]):

        def put(h, bad=bad):
            h["requests"] = bad

        with pytest.raises(RecordError, match="requests"):
            SessionRecord.from_bytes(_with_header(data, 2, put))
    with pytest.raises(RecordError, match="requests"):
        SessionRecord.from_bytes(_with_header(data, 2, lambda h: h.pop("requests")))


def test_storage_keys_are_scoped_per_principal() -> None:
    rec = make(np.random.default_rng(), 1, 4, 3)
    # Principal "" keeps the bare id (records written before ids were scoped still load).
    assert rec.replace(owner="", session_id="abc").key == "abc" == storage_key("", "abc")
    assert rec.replace(owner="alice", session_id="abc").key == "alice/abc"
    # A session id never holds "/": no (owner, id) pair shares another's key.
    assert storage_key("a/b", "c") != storage_key("a", "b") and "/" not in storage_key("", "x")
