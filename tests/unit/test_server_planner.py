"""The planner, driven directly with a fake model: what goes into each model call, what its
outputs do to the state pool, and what each work item gets back.

The fake model is a small recurrent function whose rows are independent, like the real LSTM:
``h`` counts the tokens fed (channel 0) and folds their ids into a running value (channel 1),
and the logits pick a scripted next token by that count, plus a tiny term from channel 1 so
that two sessions fed different tokens have different logits. The reference runs every session
alone, one token at a time, in float64; the pool must hold exactly what it computes.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from server.batch import StatePool
from server.engine import MAX_STREAM_CHUNK, Generation, Plan, Planner, StepWork

TABLE = ("<unk>", "a", "b", " ", "c", "d")
V = len(TABLE)
L, H = 2, 3
ATOL = 1e-6


class FakeModel:
    """``run(tokens[T, B], h[L, B, H], c) -> (logits[T, B, V], hn, cn)``; rows independent."""

    def __init__(self, script: list[int] | None = None) -> None:
        self.script = script or [1, 2, 3, 4, 5]
        self.calls: list[tuple[int, int]] = []  # (T, B) of each call
        self.fail_next = False

    def step(self, token: np.ndarray, h: np.ndarray, c: np.ndarray):
        h = h.astype(np.float64).copy()
        c = c.astype(np.float64).copy()
        h[:, :, 0] += 1.0
        h[:, :, 1] = 0.5 * h[:, :, 1] + token[None, :]
        c[:, :, 2] = c[:, :, 2] + token[None, :] ** 2
        count = h[0, :, 0].astype(np.int64)
        logits = 0.01 * np.sin(h[-1, :, 1:2] * np.arange(1, V + 1)[None, :])
        nxt = np.asarray(self.script)[(count - 1) % len(self.script)]
        logits[np.arange(len(token)), nxt] += 10.0
        return logits, h, c

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        self.calls.append(tokens.shape)
        out = []
        for t in range(tokens.shape[0]):
            logits, h, c = self.step(tokens[t], h, c)
            out.append(logits)
        return (
            np.stack(out).astype(np.float32),
            h.astype(np.float32),
            c.astype(np.float32),
        )


class Reference:
    """Each session alone: its own (h, c) and last logits, fed one token at a time."""

    def __init__(self, model: FakeModel) -> None:
        self.model = model
        self.h: dict[int, np.ndarray] = {}
        self.c: dict[int, np.ndarray] = {}
        self.logits: dict[int, np.ndarray] = {}

    def feed(self, slot: int, tokens) -> np.ndarray:
        h = self.h.get(slot, np.zeros((L, 1, H)))
        c = self.c.get(slot, np.zeros((L, 1, H)))
        rows = []
        for tok in tokens:
            logits, h, c = self.model.step(np.asarray([tok]), h, c)
            rows.append(logits[0])
        self.h[slot], self.c[slot] = h, c
        self.logits[slot] = rows[-1]
        return np.stack(rows)

    def check(self, pool: StatePool, slot: int) -> None:
        np.testing.assert_allclose(pool.h[:, slot], self.h[slot][:, 0], atol=ATOL)
        np.testing.assert_allclose(pool.c[:, slot], self.c[slot][:, 0], atol=ATOL)
        np.testing.assert_allclose(pool.logits[slot], self.logits[slot], atol=ATOL)


@pytest.fixture
def loop():
    # Work items carry asyncio futures and events; none is awaited here.
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def make(
    max_batch_size: int = 8, prefill_chunk_tokens: int = 4, capacity: int = 16, **kw
) -> tuple[Planner, StatePool]:
    pool = StatePool(L, H, V, capacity)
    return Planner(
        pool, max_batch_size=max_batch_size, prefill_chunk_tokens=prefill_chunk_tokens, **kw
    ), pool


def step(loop, slot: int, tokens, want_all: bool = False) -> StepWork:
    return StepWork(slot, np.asarray(tokens, np.int64), want_all, loop.create_future())


def gen(slot: int, max_tokens: int = 50, stops=()) -> Generation:
    return Generation(
        slot,
        max_tokens=max_tokens,
        temperature=0.0,
        top_k=0,
        top_p=0.0,
        seed=0,
        stops=stops,
        table=TABLE,
    )


def call(model: FakeModel, b):
    """One batch's outputs, the way the engine gets them (into ``b.out`` when it has one)."""
    logits, hn, cn = model.run(b.tokens, b.h, b.c)
    if b.out is None:
        return logits, hn, cn, 0.0
    for dst, src in zip(b.out, (logits, hn, cn), strict=True):
        dst[...] = src
    return (*b.out, 0.0)


def run(planner: Planner, model: FakeModel, plan: Plan):
    return planner.update(plan, [call(model, b) for b in plan.batches()])


def drive(planner: Planner, model: FakeModel, limit: int = 100) -> list[Plan]:
    plans = []
    while (plan := planner.schedule()) is not None:
        run(planner, model, plan)
        plans.append(plan)
        assert len(plans) <= limit, "the planner never ran out of work"
    return plans


def test_steps_batch_into_one_decode_call_and_match_each_session_alone(loop):
    planner, pool = make()
    model = FakeModel()
    ref = Reference(model)
    slots = [pool.alloc() for _ in range(5)]
    rng = np.random.default_rng()
    for rnd in range(4):
        works = [step(loop, s, [int(rng.integers(V))]) for s in slots]
        for w in works:
            planner.add_step(w)
        plan = planner.schedule()
        assert plan is not None and plan.prefill is None
        assert plan.decode is not None and plan.decode.tokens.shape == (1, 5)
        d = run(planner, model, plan)
        got = {w.slot: r for w, r in d.results}
        assert set(got) == set(slots) and not d.errors and not d.wake
        for w in works:
            want = ref.feed(w.slot, w.tokens)
            np.testing.assert_allclose(got[w.slot], want[-1:], atol=ATOL, err_msg=f"round {rnd}")
            ref.check(pool, w.slot)
        assert planner.schedule() is None


def test_generations_past_max_batch_size_take_turns():
    planner, pool = make(max_batch_size=2)
    model = FakeModel()
    gens = [gen(pool.alloc(), max_tokens=1000) for _ in range(5)]
    for g in gens:
        planner.start_generation(g, np.eye(V, dtype=np.float32)[1])
    fed_at: dict[int, list[int]] = {id(g): [] for g in gens}
    for it in range(30):
        plan = planner.schedule()
        assert plan is not None and len(plan.gens) == 2  # never more than the batch holds
        for g in plan.gens:
            fed_at[id(g)].append(it)
        run(planner, model, plan)
    room = 2
    longest = math.ceil(len(gens) / room)
    for g in gens:
        its = fed_at[id(g)]
        assert len(its) == 30 * room // len(gens)  # every generation got its share
        gaps = np.diff(its)
        assert gaps.max() <= longest, f"a generation waited {gaps.max()} iterations"


def test_queued_steps_go_before_generations_and_round_robin_keeps_order(loop):
    planner, pool = make(max_batch_size=3)
    gens = [gen(pool.alloc(), max_tokens=1000) for _ in range(3)]
    for g in gens:
        planner.start_generation(g, np.eye(V, dtype=np.float32)[1])
    s = step(loop, pool.alloc(), [2])
    planner.add_step(s)
    plan = planner.schedule()
    assert plan is not None and plan.steps == [s] and plan.gens == gens[:2]
    run(planner, model := FakeModel(), plan)
    plan = planner.schedule()
    assert plan is not None and plan.gens[0] is gens[2]  # the one left out goes first
    run(planner, model, plan)


@pytest.mark.parametrize(("n", "chunk"), [(11, 4), (9, 4), (4, 4), (3, 8), (13, 1)])
def test_long_prompts_advance_a_chunk_per_iteration_beside_running_generations(loop, n, chunk):
    planner, pool = make(prefill_chunk_tokens=chunk)
    model = FakeModel()
    ref = Reference(model)
    g = gen(pool.alloc(), max_tokens=1000)
    planner.start_generation(g, np.eye(V, dtype=np.float32)[1])
    rng = np.random.default_rng()
    tokens = rng.integers(1, V, n)
    w = step(loop, pool.alloc(), tokens, want_all=True)
    planner.add_step(w)
    plans = []
    result = None
    while result is None:
        plan = planner.schedule()
        assert plan is not None
        assert plan.gens == [g], "the running generation was stalled by the prompt"
        if plan.prefill is not None:
            assert plan.prefill_len <= chunk
        plans.append(plan)
        d = run(planner, model, plan)
        result = next((r for x, r in d.results if x is w), None)
    # Chunks of `chunk` while more than one token is left; a last single token rides the
    # decode call.
    want_chunks, left = [], n
    while left > 1:
        want_chunks.append(min(left, chunk))
        left -= want_chunks[-1]
    assert [p.prefill_len for p in plans if p.prefill is not None] == want_chunks
    assert len(plans) == math.ceil(n / chunk)
    np.testing.assert_allclose(result, ref.feed(w.slot, tokens), atol=ATOL)
    ref.check(pool, w.slot)


def test_prompts_of_different_lengths_are_grouped_by_chunk(loop):
    planner, pool = make(prefill_chunk_tokens=4)
    model = FakeModel()
    ref = Reference(model)
    lengths = [6, 9, 2, 4, 7]
    works = [step(loop, pool.alloc(), list(range(1, n + 1))) for n in lengths]
    for w in works:
        planner.add_step(w)
    results = {}
    for plan in iter(planner.schedule, None):
        if plan.prefill is not None:
            # One chunk length per prefill call.
            assert all(min(x.remaining, 4) == plan.prefill_len for x in plan.prefill_work)
        d = run(planner, model, plan)
        results.update({x.slot: r for x, r in d.results})
    for w in works:
        np.testing.assert_allclose(results[w.slot], ref.feed(w.slot, w.tokens)[-1:], atol=ATOL)
        ref.check(pool, w.slot)


def test_cancellation_while_the_model_call_is_out_leaves_the_restored_state(loop):
    planner, pool = make()
    model = FakeModel()
    ref = Reference(model)
    a, b = pool.alloc(), pool.alloc()
    for s in (a, b):  # some history, so the snapshot is not just zeros
        planner.add_step(step(loop, s, [1, 2, 3]))
        ref.feed(s, [1, 2, 3])
    drive(planner, model)
    snap = pool.snapshot(a)
    g = gen(pool.alloc(), max_tokens=1000)
    planner.start_generation(g, np.eye(V, dtype=np.float32)[2])
    wa, wb = step(loop, a, [4]), step(loop, b, [5])
    planner.add_step(wa)
    planner.add_step(wb)
    plan = planner.schedule()
    assert plan is not None and {w.slot for w in plan.steps} == {a, b}
    outputs = [call(model, x) for x in plan.batches()]
    # The client gives up while the call runs: cancel, and put the state back.
    planner.abandon(wa, a, snap)
    planner.abandon(g)
    d = planner.update(plan, outputs)
    assert [w for w, _ in d.results] == [wb]  # no result for the cancelled step
    assert g not in d.wake and g.fed == 0
    np.testing.assert_array_equal(pool.h[:, a], snap.h)
    np.testing.assert_array_equal(pool.c[:, a], snap.c)
    np.testing.assert_array_equal(pool.logits[a], snap.logits)
    ref.feed(b, [5])
    ref.check(pool, b)  # the other row of the same call was written
    assert planner.schedule() is None  # the cancelled generation left the running set


def test_a_failed_model_call_writes_nothing_and_fails_every_item(loop):
    planner, pool = make()
    model = FakeModel()
    s = pool.alloc()
    planner.add_step(step(loop, s, [1, 2]))
    drive(planner, model)
    before = pool.snapshot(s)
    g = gen(pool.alloc())
    planner.start_generation(g, np.eye(V, dtype=np.float32)[1])
    w = step(loop, s, [3, 4, 5])
    planner.add_step(w)
    plan = planner.schedule()
    assert plan is not None
    err = RuntimeError("model call failed: RuntimeError")
    d = planner.fail(plan, err)
    assert d.errors == [(w, err)] and d.wake == [g] and g.finish == "error"
    np.testing.assert_array_equal(pool.h[:, s], before.h)
    with pytest.raises(RuntimeError, match="model call failed"):
        g.drain()
    assert planner.schedule() is None  # nothing left behind


def test_greedy_generation_follows_the_model_and_stops_at_max_tokens(loop):
    model = FakeModel(script=[1, 2, 3, 1, 4, 5, 5])
    planner, pool = make(stream_chunk_tokens=2)
    ref = Reference(model)
    slot = pool.alloc()
    prompt = step(loop, slot, [3, 1])
    planner.add_step(prompt)
    drive(planner, model)
    first = ref.feed(slot, [3, 1])[-1]
    g = gen(slot, max_tokens=9)
    planner.start_generation(g, pool.logits[slot].copy())
    drive(planner, model)
    assert g.finish == "length" and g.fed == 9 and len(g.tokens) == 9
    want = [int(np.argmax(first))]
    for _ in range(8):
        want.append(int(np.argmax(ref.feed(slot, [want[-1]])[-1])))
    ref.feed(slot, [want[-1]])
    assert g.tokens == want
    ref.check(pool, slot)  # the state holds every generated token


def test_messages_come_about_once_per_iteration_in_chunks():
    planner, pool = make(max_batch_size=64, stream_chunk_tokens=4)
    model = FakeModel()
    gens = [gen(pool.alloc(), max_tokens=1000) for _ in range(3)]
    for g in gens:
        planner.start_generation(g, np.eye(V, dtype=np.float32)[1])
    woken = []
    for _ in range(40):
        plan = planner.schedule()
        assert plan is not None
        woken.append(len(run(planner, model, plan).wake))
    assert sum(woken) == 3 * 40 // 4  # every 4 tokens per generation
    assert max(woken) == 1  # phases spread the messages over iterations
    assert MAX_STREAM_CHUNK == 64


@pytest.mark.parametrize(
    ("stop", "other"), [("b c", "zz"), ("c", "qq"), (" c d", "never"), ("zz", "qq")]
)
def test_stop_strings_across_chunk_boundaries(stop, other):
    # The model writes "a b c d a b c d ..."; messages are drained every iteration, so a stop
    # string spanning several tokens always crosses a drain boundary.
    model = FakeModel(script=[2, 3, 4, 3, 5, 3, 1, 3])
    planner, pool = make(stream_chunk_tokens=1)
    slot = pool.alloc()
    g = gen(slot, max_tokens=24, stops=[stop, other])
    planner.start_generation(g, np.eye(V, dtype=np.float32)[1])
    texts, ids = [], []
    finish = None
    while finish is None:
        plan = planner.schedule()
        assert plan is not None
        run(planner, model, plan)
        # Drained after every iteration, also the one in which the stop string completes
        # (the generation then ends only after its last token has been fed).
        delta = g.drain()
        if delta is not None:
            texts.append(delta.text)
            ids.extend(delta.token_ids)
            finish = delta.finish
            # What was sent can never be taken back: it must be a prefix of the final text.
            full = "".join(TABLE[t] for t in g.tokens)
            want = full[: full.index(stop)] if stop in full else full
            assert want.startswith("".join(texts)), (texts, full)
    assert finish == g.finish
    full = "".join(TABLE[t] for t in g.tokens)
    if stop in full:
        assert g.finish == "stop"
        assert "".join(texts) == full[: full.index(stop)]
    else:
        assert g.finish == "length" and "".join(texts) == full
    assert "".join(TABLE[t] for t in ids) == "".join(texts)


def test_drain_holds_back_as_many_characters_as_a_stop_string_could_need():
    g = gen(0, max_tokens=100, stops=["b c"])
    for t in (1, 3, 2):  # "a b": " b" could begin "b c"
        g.accept(t)
    d = g.drain()
    assert d is not None and d.text == "a" and d.finish is None
    g.accept(3)  # "a b ": "b " could still begin it
    d = g.drain()
    assert d is not None and d.text == " "
    g.accept(5)  # "a b d": the "b" is safe now
    d = g.drain()
    assert d is not None and d.text == "b" and not g.done_after_feed
    assert g.drain() is None
    g.finish = "length"
    d = g.drain()
    assert d is not None and d.text == " d" and d.finish == "length" and d.generated == 5


def test_running_batch_keeps_state_stacked_and_the_pool_right_through_joins_and_leaves(loop):
    model = FakeModel(script=[1, 2, 3, 4, 5, 2, 3])
    planner, pool = make(max_batch_size=16)
    ref = Reference(model)
    lengths = [3, 9, 5, 12]
    slots = [pool.alloc() for _ in lengths]
    for slot in slots:
        planner.add_step(step(loop, slot, [2, 1]))
        ref.feed(slot, [2, 1])
    drive(planner, model)
    gens = []
    for slot, n in zip(slots, lengths, strict=True):
        g = gen(slot, max_tokens=n)
        planner.start_generation(g, pool.logits[slot].copy())
        gens.append(g)
    victim, snap = gens[3], pool.snapshot(gens[3].slot)
    other = pool.alloc()
    buffers = []
    for it in range(30):
        if it == 4:  # a client step on another session: the iteration mixes work
            planner.add_step(step(loop, other, [4]))
        if it == 6:  # a client gives up: its session goes back to the snapshot; in the same
            # iteration another step makes the running batch go back to the pool
            planner.abandon(victim, victim.slot, snap)
            planner.add_step(step(loop, other, [5]))
        plan = planner.schedule()
        if plan is None:
            break
        if plan.running:
            buffers.append((len(plan.gens), id(plan.decode.h)))
        run(planner, model, plan)
    # Without a join or leave, the call reads the buffer two iterations back (ping-pong).
    steady = [(a, b) for a, b in zip(buffers, buffers[2:], strict=False) if a[0] == b[0]]
    assert steady and all(a[1] == b[1] for a, b in steady)
    assert sum(1 for b in buffers if b[0] == 4) >= 3
    for g, n in zip(gens[:3], lengths[:3], strict=True):
        assert g.finish == "length" and len(g.tokens) == n
        first = ref.logits[g.slot]
        want = [int(np.argmax(first))]
        for _ in range(n - 1):
            want.append(int(np.argmax(ref.feed(g.slot, [want[-1]])[-1])))
        ref.feed(g.slot, [want[-1]])
        assert g.tokens == want
        ref.check(pool, g.slot)  # written back from the running batch when it left
    np.testing.assert_array_equal(pool.h[:, victim.slot], snap.h)  # never overwritten
    ref.feed(other, [4, 5])
    ref.check(pool, other)
