"""A store in Redis: sessions survive the server process and are shared by every server that
points at the same Redis.

Layout: one hash per session at ``lstm-serve:session:<key>`` (``record.key``: the session id
for principal "", else ``OWNER/ID``) with two fields, ``v`` (the version,
decimal) and ``r`` (:meth:`SessionRecord.to_bytes`). The version is a field of its own so the
compare-and-set script can read it without parsing the record; ``get`` is one ``HGET r``. The
key's TTL is the session's expiry (``PEXPIREAT``), so Redis drops idle sessions by itself; no
sweep. Expiry is then judged by the Redis host's clock against the writer's wall time, so the two
clocks must roughly agree (NTP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from .base import StoreError, Write
from .record import RecordError, SessionRecord

KEY_PREFIX = "lstm-serve:session:"

# KEYS[1]: the session key. ARGV: expected version, new version, record bytes, expiry in unix ms
# ("" = never). Returns 1 if written, 0 if the stored version is not the expected one (a missing
# key is version 0). Writing the very same record again (same new version, same bytes) also
# returns 1: redis-py resends a MULTI/EXEC whose reply was lost on a broken connection (its
# default Retry), and the resend must not report the first attempt's own commit as a lost race.
_CAS_LUA = """
local cur = redis.call('HGET', KEYS[1], 'v')
local curv = 0
if cur then curv = tonumber(cur) end
if curv ~= tonumber(ARGV[1]) then
  if cur and curv == tonumber(ARGV[2]) and redis.call('HGET', KEYS[1], 'r') == ARGV[3] then
    return 1
  end
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'r', ARGV[3])
if ARGV[4] == '' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIREAT', KEYS[1], ARGV[4])
end
return 1
"""


class RedisStore:
    """Session records in the Redis at ``url`` (``redis://HOST:PORT/DB``, redis-py's URL form).

    Connects on first use. Each ``put`` is one MULTI/EXEC pipeline of EVALSHA calls (one round
    trip): the whole batch applies atomically, and each write is a compare-and-set in a Lua
    script that is loaded once per store (and again if Redis restarted and forgot it). Every
    Redis or socket failure becomes StoreError with a one-line message; a record that fails its
    checksum does too.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 2.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = _redact(url)
        self._client: Any = aioredis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s
        )
        self._sha: str | None = None

    async def get(self, session_id: str) -> SessionRecord | None:
        try:
            data = await self._client.hget(KEY_PREFIX + session_id, "r")
        except (RedisError, OSError) as e:
            raise self._error(e) from None
        if data is None:
            return None
        try:
            return SessionRecord.from_bytes(data)
        except RecordError as e:
            raise StoreError(f"redis store {self.url}: session {session_id!r}: {e}") from None

    async def put(self, writes: Sequence[Write]) -> list[bool]:
        if not writes:
            return []
        args = [
            (
                KEY_PREFIX + w.record.key,
                w.expected_version,
                w.record.version,
                w.record.to_bytes(),
                _expire_ms(w.record.expires_unix_s),
            )
            for w in writes
        ]
        try:
            for attempt in (1, 2):
                if self._sha is None:
                    self._sha = await self._client.script_load(_CAS_LUA)
                try:
                    results = await self._exec(self._sha, args)
                except NoScriptError:
                    results = [NoScriptError()]
                # Redis forgot the script (restart, SCRIPT FLUSH). Inside MULTI/EXEC either every
                # EVALSHA found it or none did, so nothing was written: load it and run again.
                if any(isinstance(r, NoScriptError) for r in results) and attempt == 1:
                    self._sha = None
                    continue
                break
        except (RedisError, OSError) as e:
            raise self._error(e) from None
        for r in results:
            if isinstance(r, Exception):
                raise self._error(r)
        return [r == 1 for r in results]

    async def _exec(self, sha: str, args: list[tuple[str, int, int, bytes, str]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=True)
        for key, expected, new, blob, expire in args:
            pipe.evalsha(sha, 1, key, expected, new, blob, expire)
        return list(await pipe.execute(raise_on_error=False))

    async def delete(self, session_ids: Sequence[str]) -> None:
        if not session_ids:
            return
        try:
            await self._client.delete(*(KEY_PREFIX + sid for sid in session_ids))
        except (RedisError, OSError) as e:
            raise self._error(e) from None

    async def close(self) -> None:
        # redis-py 5.0.1 renamed close() to aclose(); take whichever this version has.
        close = getattr(self._client, "aclose", None) or self._client.close
        try:
            await close()
        except (RedisError, OSError) as e:
            raise self._error(e) from None

    def _error(self, e: BaseException) -> StoreError:
        msg = " ".join(str(e).split()) or type(e).__name__
        return StoreError(f"redis store {self.url}: {type(e).__name__}: {msg}")


def _expire_ms(expires_unix_s: float) -> str:
    if math.isinf(expires_unix_s):
        return "" if expires_unix_s > 0 else "0"
    # Rounded up, so the key never disappears before the session's nominal expiry.
    return str(math.ceil(expires_unix_s * 1000))


def _redact(url: str) -> str:
    """``url`` without its password (the store's url is logged and shown)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))
