"""Session table: ids, slots in the state pool, timestamps, busy flags, eviction, accounting.

Not thread-safe: used only from the event loop thread. Idle time is measured with an injectable
monotonic clock (tests move it by hand); creation and last-use times are reported as wall time.

Session ids are scoped per principal: the table is keyed by ``(owner, id)``, so two principals may
each hold a session called X, and one principal's ids neither collide with nor reveal another's.
Every lookup names the principal (``owner``; "" without authentication).
"""

from __future__ import annotations

import heapq
import itertools
import re
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .batch import StatePool
from .errors import AlreadyExists, Busy, NotFound, ResourceExhausted

END_REASONS = ("closed", "expired", "evicted", "disconnected", "superseded")
# Client-chosen ids: long enough not to be guessed by accident, safe in URLs, logs and headers.
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
# How many ended sessions, and for how long, NOT_FOUND can still explain (evicted or expired).
GONE_MAX = 10_000
GONE_TTL_S = 600.0
QUOTE = 64  # characters of a client's id quoted back in a message
RECENT_REQUESTS = 16  # request ids remembered per session

Key = tuple[str, str]  # (owner, session id)


def quote(sid: str) -> str:
    return repr(sid[:QUOTE]) + ("..." if len(sid) > QUOTE else "")


class Session:
    """One session's bookkeeping (its state lives in the pool at ``slot``)."""

    __slots__ = (
        "attached",
        "busy",
        "created_mono",
        "created_wall",
        "ephemeral",
        "id",
        "idle_timeout_s",
        "key",
        "last_used_mono",
        "owner",
        "recent",
        "slot",
        "steps",
        "version",
    )

    def __init__(
        self, sid: str, slot: int, now: float, wall: float, idle_s: float, ephemeral: bool
    ) -> None:
        self.id = sid
        self.slot = slot
        self.created_mono = now
        self.created_wall = wall
        self.last_used_mono = now
        self.idle_timeout_s = idle_s
        self.steps = 0
        self.busy = False
        self.ephemeral = ephemeral
        self.version = 1  # of its record in a durable state store (committed changes + 1)
        self.attached = 0  # open streams attached to it: never evicted or expired meanwhile
        self.owner = ""  # the principal that created it ("" without authentication)
        self.key: Key = ("", sid)  # (owner, id): what the table is keyed by
        # The last RECENT_REQUESTS completed requests that carried a request id, so a retry
        # gets the first attempt's outcome instead of feeding its tokens twice.
        self.recent: OrderedDict[str, Remembered] | None = None

    def last_used_wall(self) -> float:
        return self.created_wall + (self.last_used_mono - self.created_mono)


class Remembered:
    """A completed request that carried a request id: a digest of its payload (the same id with
    another payload is refused), its outcome (None when it came from a durable record and is not
    decoded yet, or was not kept) and the outcome's encoding for the durable record (None: not
    encoded yet; ``b""``: not kept)."""

    __slots__ = ("blob", "digest", "outcome")

    def __init__(self, digest: bytes, outcome: object | None, blob: bytes | None = None) -> None:
        self.digest = digest
        self.outcome = outcome
        self.blob = blob


@dataclass
class SessionStats:
    """Counters the metrics layer reads."""

    ended: dict[str, int] = field(default_factory=lambda: dict.fromkeys(END_REASONS, 0))


class SessionStore:
    """Creates, finds, expires and evicts sessions; owns their pool slots.

    ``eviction="refuse"`` makes :meth:`create` raise :class:`ResourceExhausted` when full;
    ``"lru"`` first evicts the least recently used session that is neither in a request nor
    attached to an open stream.

    Cost: every operation is O(log n) or better in the number of sessions (a heap of idle
    deadlines, lazily pruned, instead of a scan), so CreateSession costs the same at 100k
    sessions as at 1k. An id that was evicted or expired answers NOT_FOUND saying so for
    ``GONE_TTL_S`` (at most ``GONE_MAX`` ids remembered).
    """

    def __init__(
        self,
        pool: StatePool,
        *,
        max_sessions: int,
        idle_timeout_s: float,
        eviction: str = "refuse",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        durable: bool = False,
    ) -> None:
        self.pool = pool
        self.max_sessions = min(max_sessions, pool.capacity)
        self.idle_timeout_s = idle_timeout_s
        self.eviction = eviction
        self.durable = durable
        self.clock = clock
        self.wall_clock = wall_clock
        # Insertion order = least recently used first (moved to the end on every use).
        self._sessions: OrderedDict[Key, Session] = OrderedDict()
        # (deadline, tie-break, session): one entry per touch; stale entries are skipped.
        self._deadlines: list[tuple[float, int, Session]] = []
        self._tie = itertools.count()
        self._gone: OrderedDict[Key, tuple[str, float]] = OrderedDict()
        self._owned: Counter[str] = Counter()  # sessions held per principal
        # Each principal's sessions by id (ListSessions reads one principal's without a scan).
        self._by_owner: dict[str, dict[str, Session]] = {}
        self.stats = SessionStats()

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def state_bytes(self) -> int:
        return len(self._sessions) * self.pool.state_bytes_per_slot

    def create(
        self,
        idle_timeout_s: float | None = None,
        *,
        ephemeral: bool = False,
        held: bool = False,
        session_id: str = "",
        created_wall: float | None = None,
        owner: str = "",
    ) -> Session:
        """A new session with zero state. ``idle_timeout_s`` is capped at the store's default.

        ``held``: the caller holds it (busy) from the start, as :meth:`acquire` would.
        ``session_id``: the id to use (checked by the caller); :class:`AlreadyExists` if
        ``owner`` holds one of that id here (another principal's sessions do not count).
        """
        if session_id and (owner, session_id) in self._sessions:
            raise AlreadyExists(f"session id {quote(session_id)} is taken")
        self.expire_idle()
        if len(self._sessions) >= self.max_sessions and not self._evict_one():
            raise ResourceExhausted(
                f"session table is full (max_sessions={self.max_sessions}); close sessions or "
                "retry later"
            )
        timeout = self.idle_timeout_s
        if idle_timeout_s is not None and 0 < idle_timeout_s < timeout:
            timeout = idle_timeout_s
        slot = self.pool.alloc()
        now = self.clock()
        sid = session_id or secrets.token_hex(16)
        wall = self.wall_clock() if created_wall is None else created_wall
        session = Session(sid, slot, now, wall, timeout, ephemeral)
        session.busy = held
        session.owner = owner
        session.key = (owner, sid)
        self._sessions[session.key] = session
        self._owned[owner] += 1
        self._by_owner.setdefault(owner, {})[sid] = session
        self._gone.pop(session.key, None)
        self._push_deadline(session)
        return session

    def _push_deadline(self, session: Session) -> None:
        deadline = session.last_used_mono + session.idle_timeout_s
        heapq.heappush(self._deadlines, (deadline, next(self._tie), session))
        if len(self._deadlines) > 2 * len(self._sessions) + 1024:
            # Compact: one entry per live session (the newest deadline).
            self._deadlines = [
                (s.last_used_mono + s.idle_timeout_s, next(self._tie), s)
                for s in self._sessions.values()
            ]
            heapq.heapify(self._deadlines)

    def _evict_one(self) -> bool:
        # With a durable store behind it this table only caches sessions: dropping the least
        # recently used idle one loses nothing (its record stays in the store), whatever the
        # policy. Ephemeral sessions have no record and are never evicted then.
        if self.eviction != "lru" and not self.durable:
            return False
        for session in self._sessions.values():
            if session.busy or session.attached or (self.durable and session.ephemeral):
                continue
            self._end(session, "evicted")
            return True
        return False

    def local(self, sid: str, owner: str = "") -> Session | None:
        """``owner``'s session ``sid`` if this process holds it (live or not yet expired)."""
        return self._sessions.get((owner, sid))

    def drop(self, session: Session, reason: str = "superseded") -> None:
        """Forget a session held here whatever its state (its durable record stays)."""
        if self._sessions.get(session.key) is session:
            self._end(session, reason)

    def get(self, sid: str, owner: str = "") -> Session:
        """``owner``'s live session ``sid``; raises :class:`NotFound` (expired ones are ended
        here)."""
        session = self._sessions.get((owner, sid))
        if session is None:
            raise NotFound(self.why_not_found(sid, owner))
        if self._idle_past_deadline(session, self.clock()):
            self._end(session, "expired")
            raise NotFound(self.why_not_found(sid, owner))
        return session

    def why_not_found(self, sid: str, owner: str = "") -> str:
        """What NOT_FOUND says about ``owner``'s ``sid``: evicted or expired when remembered."""
        gone = self._gone.get((owner, sid))
        if gone is not None and self.clock() - gone[1] <= GONE_TTL_S:
            return f"session {quote(sid)} {gone[0]}"
        return f"session {quote(sid)} not found (never created, closed or expired)"

    @staticmethod
    def _idle_past_deadline(session: Session, now: float) -> bool:
        return (
            not session.busy
            and not session.attached
            and now - session.last_used_mono > session.idle_timeout_s
        )

    def attach(self, session: Session) -> None:
        """An open stream holds ``session`` (by id) until :meth:`detach`."""
        session.attached += 1
        self.touch(session)

    def detach(self, session: Session) -> None:
        session.attached = max(0, session.attached - 1)
        self.touch(session)

    def acquire(self, sid: str, owner: str = "") -> Session:
        """Mark ``owner``'s ``sid`` busy for one request; raises :class:`NotFound` or
        :class:`Busy`."""
        session = self.get(sid, owner)
        if session.busy:
            raise Busy(
                f"session {quote(sid)} is busy with another request (one at a time per session)"
            )
        session.busy = True
        self.touch(session)
        return session

    def hold(self, session: Session) -> Session:
        """Mark a session its owner holds (an ephemeral stream session) busy for one request.

        Raises :class:`NotFound` when it has been ended meanwhile.
        """
        if self._sessions.get(session.key) is not session:
            raise NotFound(f"session {quote(session.id)} was ended")
        session.busy = True
        self.touch(session)
        return session

    def release(self, session: Session) -> None:
        session.busy = False
        self.touch(session)

    def touch(self, session: Session) -> None:
        session.last_used_mono = self.clock()
        if self._sessions.get(session.key) is session:
            self._sessions.move_to_end(session.key)
            self._push_deadline(session)

    def close(self, sid: str, reason: str = "closed", *, owner: str = "") -> None:
        """End ``owner``'s ``sid``; raises :class:`NotFound` or :class:`Busy` (close it after the
        request)."""
        session = self.get(sid, owner)
        if session.busy:
            raise Busy(f"session {quote(sid)} is busy with another request; close it afterwards")
        self._end(session, reason)

    def end(self, session: Session, reason: str) -> None:
        """End a session its owner holds (ephemeral sessions, even while busy)."""
        if self._sessions.get(session.key) is session:
            self._end(session, reason)

    @staticmethod
    def remember(
        session: Session,
        request_id: str,
        outcome: object,
        digest: bytes = b"",
        blob: bytes | None = None,
    ) -> None:
        """Keep ``outcome`` (and the ``digest`` of the request's payload; ``blob``: the outcome's
        encoding for a durable record, if made) for a retry of ``request_id``; the last
        RECENT_REQUESTS only."""
        if session.recent is None:
            session.recent = OrderedDict()
        session.recent[request_id] = Remembered(digest, outcome, blob)
        session.recent.move_to_end(request_id)
        while len(session.recent) > RECENT_REQUESTS:
            session.recent.popitem(last=False)

    @staticmethod
    def recalled(session: Session, request_id: str) -> Remembered | None:
        """What ``request_id`` left on this session, if it is one of its recent requests."""
        if not request_id or session.recent is None:
            return None
        return session.recent.get(request_id)

    def ids_and_owners(self) -> list[tuple[str, str]]:
        """Every session held, as (id, owner)."""
        return [(s.id, s.owner) for s in self._sessions.values()]

    def end_all(self, reason: str) -> None:
        """End every session (its version is being unloaded)."""
        for session in list(self._sessions.values()):
            self._end(session, reason)

    def owned(self, principal: str) -> list[Session]:
        """``principal``'s live sessions held here (idle ones past their timeout are ended
        first). O(k log n) for the k due to expire, plus the principal's own count."""
        self.expire_idle()
        return list(self._by_owner.get(principal, {}).values())

    def owned_by(self, principal: str) -> int:
        """How many sessions ``principal`` holds here."""
        return self._owned[principal]

    def _end(self, session: Session, reason: str) -> None:
        del self._sessions[session.key]
        self._owned[session.owner] -= 1
        if self._owned[session.owner] <= 0:
            del self._owned[session.owner]
        mine = self._by_owner.get(session.owner)
        if mine is not None:
            mine.pop(session.id, None)
            if not mine:
                del self._by_owner[session.owner]
        self.pool.free(session.slot)
        session.slot = -1
        self.stats.ended[reason] += 1
        if reason in ("evicted", "expired"):
            why = (
                "was evicted (the session table was full)"
                if reason == "evicted"
                else f"expired after {session.idle_timeout_s:g} s idle"
            )
            self._gone[session.key] = (why, self.clock())
            self._gone.move_to_end(session.key)
            while len(self._gone) > GONE_MAX:
                self._gone.popitem(last=False)

    def expire_idle(self) -> int:
        """End every idle session past its timeout; returns how many. O(k log n) for k due."""
        now = self.clock()
        n = 0
        heap = self._deadlines
        while heap and heap[0][0] < now:
            _, _, session = heapq.heappop(heap)
            if self._sessions.get(session.key) is not session:
                continue  # ended already
            if self._idle_past_deadline(session, now):
                self._end(session, "expired")
                n += 1
            # Busy or attached: touched again when released or detached (a new entry).
        while self._gone and now - next(iter(self._gone.values()))[1] > GONE_TTL_S:
            self._gone.popitem(last=False)
        return n
