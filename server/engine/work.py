"""The work items the engine schedules: a step (tokens to feed to one session) and a generation.

Both are created on the event loop thread and then belong to the planner until they complete;
``cancelled`` is the only field the loop thread writes afterwards (under the engine's lock).
Stop strings are matched in one place, :class:`StopStrings`, both while tokens are sampled
(to end the generation) and while text is released to the client (to hold back a partial match
and cut the stop string off).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class StepWork:
    """Tokens to feed to the session at ``slot``; ``future`` gets ``logits[positions, V]``.

    For a ``sequence`` model ``tokens`` holds feature rows (float32 ``[T, F]``) and the future
    gets ``outputs[positions, O]``: everything below reads ``len(tokens)`` and rows, so it
    serves both kinds unchanged.

    With ``want_all`` every fed position's logits are returned, else only the last one's.
    ``pos`` counts the tokens fed so far; the planner advances it.
    """

    __slots__ = ("cancelled", "chunks", "enqueued", "future", "pos", "slot", "tokens", "want_all")

    def __init__(
        self, slot: int, tokens: np.ndarray, want_all: bool, future: asyncio.Future[np.ndarray]
    ) -> None:
        self.slot = slot
        self.tokens = tokens
        self.pos = 0
        self.want_all = want_all
        self.chunks: list[np.ndarray] = []
        self.future = future
        self.enqueued = time.perf_counter()  # -1 once its queue wait has been recorded
        self.cancelled = False

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.pos


class StopStrings:
    """Watches generated text for stop strings.

    :meth:`feed` is called with each sampled token's text and says when the text now ends with
    a stop string; ``cut`` is then the length of the text to return (the text before the stop).
    ``hold`` is how many characters a streaming consumer must keep back so that it never sends
    the beginning of a stop string that may still complete.
    """

    __slots__ = ("cut", "hold", "stops", "text")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.cut = -1

    def feed(self, piece: str) -> bool:
        """Append ``piece``; True once the text ends with a stop string (``cut`` is then set)."""
        if not self.stops:
            return False
        self.text += piece
        for s in self.stops:
            if self.text.endswith(s):
                self.cut = len(self.text) - len(s)
                return True
        return False


@dataclass(frozen=True)
class Delta:
    """What a generation releases to its client at once (see :meth:`Generation.drain`)."""

    token_ids: list[int]
    text: str
    generated: int  # tokens released so far, these included
    finish: str | None  # "length" | "stop" on the last delta


class Generation:
    """A running generation: the planner feeds ``next_token``, samples the next one, repeats.

    Finishes (``finish`` set to ``"length"`` or ``"stop"``) once its last token has been fed, so
    the session's state then holds every generated token and the pool holds the distribution
    after it; ``"error"`` with ``error`` set when a model call failed. ``table`` maps token ids
    to the text a client sees.
    """

    __slots__ = (
        "_ubuf",
        "cancelled",
        "done_after_feed",
        "error",
        "event",
        "fed",
        "finish",
        "max_tokens",
        "next_token",
        "phase",
        "rng",
        "sent",
        "slot",
        "stop",
        "table",
        "temperature",
        "tokens",
        "top_k",
        "top_p",
    )

    def __init__(
        self,
        slot: int,
        *,
        max_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int,
        stops: Sequence[str] = (),
        table: Sequence[str] = (),
    ) -> None:
        self.slot = slot
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)
        self._ubuf: list[float] = []
        self.stop = StopStrings(stops)
        self.table = table
        self.tokens: list[int] = []
        self.next_token = -1
        self.phase = 0
        self.done_after_feed = False
        self.fed = 0
        self.sent = 0  # tokens released by drain()
        self.finish: str | None = None
        self.cancelled = False
        self.error: BaseException | None = None
        self.event = asyncio.Event()  # set by the engine on the loop thread: something to drain

    def uniform(self) -> float:
        """The next number of this request's own random sequence."""
        if not self._ubuf:
            # Drawn in blocks (one numpy call per 64 tokens), consumed in order.
            self._ubuf = self.rng.random(64).tolist()[::-1]
        return self._ubuf.pop()

    def accept(self, token: int) -> None:
        """Record a sampled token (to be fed next iteration) and check the end conditions."""
        self.tokens.append(token)
        self.next_token = token
        stop = self.stop
        if (stop.stops and stop.feed(self.table[token])) or len(self.tokens) >= self.max_tokens:
            self.done_after_feed = True

    def drain(self) -> Delta | None:
        """Everything that may be released now and was not yet; None when there is nothing.

        While running, text that could be the start of a stop string is held back. On a stop,
        the stop string (and any token that only partly precedes it) is dropped. Raises the
        generation's error if a model call failed.
        """
        if self.error is not None:
            raise self.error
        finish = self.finish
        if finish is None and self.stop.cut >= 0:
            # A stop string is complete but its last token is still being fed: holding back
            # `hold` characters is not enough now (the whole stop string must go), so release
            # nothing until the generation finishes and the cut below applies.
            return None
        table = self.table
        n = len(self.tokens)
        sent = self.sent
        hold = self.stop.hold
        if finish is None and hold:
            tail = 0
            while n > sent and tail < hold:
                n -= 1
                tail += len(table[self.tokens[n]])
        new = self.tokens[sent:n]
        text = "".join([table[t] for t in new])
        if finish == "stop":
            done_chars = len("".join([table[t] for t in self.tokens[:sent]]))
            keep_chars = self.stop.cut - done_chars
            text = text[:keep_chars]
            k, acc = 0, 0
            while k < len(new) and acc + len(table[new[k]]) <= keep_chars:
                acc += len(table[new[k]])
                k += 1
            new = new[:k]
        if not new and finish is None:
            return None
        self.sent = n
        return Delta(new, text, n, finish)
