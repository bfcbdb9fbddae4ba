"""Admission control: the adaptive per-node concurrency limit and the bounded wait with a deadline.

Everything runs on a virtual-time event loop (its clock jumps to the next timer instead of
sleeping, and the router reads the same clock), with fake nodes, so every RTT, wait and expiry is
an exact, reproducible number: no timing assertion depends on the machine.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import selectors
from collections.abc import Callable, Coroutine
from contextvars import Context
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple, Unpack

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmproxy.backend.client import NodeDown
from hsmproxy.cluster.admission import NodeLimit, limit_bounds
from hsmproxy.cluster.health import HealthChecker
from hsmproxy.cluster.router import QUEUE_SLACK, QUEUE_TIMER_FLOOR, NoNodeAvailable, Overloaded, Router
from hsmproxy.cluster.state import ClusterSettings, OpState
from hsmproxy.config import ConfigError, parse_settings

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


# -- a deterministic loop ---------------------------------------------------------------------------


class _JumpSelector(selectors.DefaultSelector):
    """Polls without waiting; a wait for the next timer advances the loop's virtual clock instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._virtual = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Ready events now; else jump the clock by ``timeout``."""
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("nothing scheduled on the virtual-time loop: the test would hang")
        self._virtual.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock, counting the timers scheduled on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers = 0
        super().__init__(_JumpSelector(self))

    def time(self) -> float:
        """The virtual clock."""
        return self.now

    def call_at(
        self,
        when: float,
        callback: Callable[[Unpack[Ts]], object],
        *args: *Ts,
        context: Context | None = None,
    ) -> asyncio.TimerHandle:
        """Schedule as usual, counting."""
        self.timers += 1
        return super().call_at(when, callback, *args, context=context)


def run_virtual(main: Callable[[VirtualTimeLoop], Coroutine[Any, Any, T]]) -> T:
    """Run ``main(loop)`` to completion on a fresh virtual-time loop, then cancel what is left."""
    loop = VirtualTimeLoop()
    try:
        result = loop.run_until_complete(main(loop))

        async def settle() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        loop.run_until_complete(settle())
        return result
    finally:
        loop.close()


async def turn() -> None:
    """Let every ready callback run (a few loop iterations, no virtual time passes)."""
    for _ in range(4):
        await asyncio.sleep(0)


# -- fake nodes ---------------------------------------------------------------------------------------


class HeldNode:
    """Keeps every request pending until the test answers it; records what arrived (``args["i"]``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.up = True
        self.pending: list[tuple[int, asyncio.Future[tuple[str, Any]]]] = []
        self.arrived: list[int] = []

    def submit(self, op: str, args: dict[str, Any]) -> asyncio.Future[tuple[str, Any]]:
        """A future the test resolves."""
        fut: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        marker = int(args.get("i", -1))
        self.pending.append((marker, fut))
        self.arrived.append(marker)
        return fut

    def answer(self, count: int = 1) -> list[int]:
        """Answer the ``count`` oldest pending requests; their markers."""
        done, self.pending = self.pending[:count], self.pending[count:]
        for marker, fut in done:
            fut.set_result(("00", {"i": marker, "node": self.name}))
        return [m for m, _ in done]


class BatchingNode:
    """A node as :class:`~hsmproxy.backend.client.NodeClient` and its worker behave: requests submitted
    in one loop iteration travel as one message; the worker runs everything waiting in its pipe as one
    batch (``overhead`` + ``service`` seconds per operation) and answers the batch in one message.
    ``service`` may change under way (a mix of dearer commands); ``latency`` set: every request takes
    that long whatever the load (a device with many engines, no queueing)."""

    def __init__(self, name: str, service: float, overhead: float = 0.0) -> None:
        self.name = name
        self.up = True
        self.service = service
        self.overhead = overhead
        self.latency: float | None = None
        self.arrivals: list[tuple[float, str, int]] = []
        self._message: list[tuple[str, asyncio.Future[tuple[str, Any]]]] = []
        self._pipe: list[tuple[str, asyncio.Future[tuple[str, Any]]]] = []
        self._busy = False

    def submit(self, op: str, args: dict[str, Any]) -> asyncio.Future[tuple[str, Any]]:
        """Queue for this iteration's message."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[str, Any]] = loop.create_future()
        self.arrivals.append((loop.time(), op, int(args.get("i", -1))))
        if self.latency is not None:
            loop.call_later(self.latency, self._answer, [(op, fut)])
            return fut
        if not self._message:
            loop.call_soon(self._flush)
        self._message.append((op, fut))
        return fut

    def _flush(self) -> None:
        self._pipe += self._message
        self._message = []
        if not self._busy:
            self._run()

    def _run(self) -> None:
        batch, self._pipe = self._pipe, []
        if not batch:
            self._busy = False
            return
        self._busy = True
        cost = self.overhead + self.service * len(batch)
        asyncio.get_running_loop().call_later(cost, self._done, batch)

    def _done(self, batch: list[tuple[str, asyncio.Future[tuple[str, Any]]]]) -> None:
        self._answer(batch)
        self._run()

    @staticmethod
    def _answer(batch: list[tuple[str, asyncio.Future[tuple[str, Any]]]]) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_result(("00", {}))


def _marks(node: HeldNode) -> list[int]:
    return [m for m, _ in node.pending]


# -- the limit on its own ----------------------------------------------------------------------------


def _feed_window(
    limit: NodeLimit, rtt: float, now: float, cs: ClusterSettings, peak: int | None = None
) -> float:
    """Answers at ``rtt`` until one window (or probe) closes, demand at ``peak`` (default: the limit)."""
    closed = (limit.windows, limit.probes)
    while (limit.windows, limit.probes) == closed:
        limit.peak = max(limit.peak, limit.current if peak is None else peak)
        now += 1e-4
        limit.sample(rtt, limit.epoch, now, cs)
    return now


def test_the_first_probe_measures_the_no_load_rtt_at_min_limit() -> None:
    cs = ClusterSettings()
    limit = NodeLimit("a", cs, 0.0)
    assert limit.probing and limit.current == cs.min_limit == 16
    for _ in range(2 * cs.min_limit - 1):
        limit.sample(0.001, limit.epoch, 0.01, cs)
    assert limit.probing and limit.probes == 0
    limit.sample(0.003, limit.epoch, 0.01, cs)
    assert not limit.probing and limit.probes == 1
    assert limit.rtt_noload == pytest.approx((31 * 0.001 + 0.003) / 32)
    assert limit.current == 2 * cs.min_limit  # the initial estimate, now in force


def test_answers_of_requests_started_before_a_probe_do_not_count_in_it() -> None:
    cs = ClusterSettings()
    limit = NodeLimit("a", cs, 0.0)
    stale = limit.epoch
    now = _feed_window(limit, 0.001, 0.0, cs)  # the start-up probe
    assert limit.epoch != stale
    for _ in range(1000):
        limit.sample(9.0, stale, now, cs)  # late answers of requests started during the probe: ignored
    assert limit.windows == 0 and limit.rtt_noload == pytest.approx(0.001)


def test_the_limit_grows_while_the_rtt_stays_at_the_no_load_rtt_up_to_max_outstanding() -> None:
    cs = ClusterSettings(probe_interval=1e6)
    limit = NodeLimit("a", cs, 0.0)
    now = _feed_window(limit, 0.001, 0.0, cs)
    seen = [limit.current]
    while len(seen) < 200 and limit.current < cs.max_outstanding:
        now = _feed_window(limit, 0.001, now, cs)
        seen.append(limit.current)
    assert seen == sorted(seen) and seen[-1] == cs.max_outstanding  # grows, monotonically, to the cap
    assert len(seen) < 80  # growth is about sqrt(limit)/2 a window: 32 -> 256 in a few dozen windows
    now = _feed_window(limit, 0.001, now, cs)
    assert limit.current == cs.max_outstanding  # never above it


def test_the_limit_does_not_grow_when_demand_does_not_press_on_it() -> None:
    cs = ClusterSettings(probe_interval=1e6)
    limit = NodeLimit("a", cs, 0.0)
    now = _feed_window(limit, 0.001, 0.0, cs)
    for _ in range(20):
        now = _feed_window(limit, 0.001, now, cs, peak=10)  # 10 in flight of a limit of 32
    assert limit.current == 32


def test_the_limit_shrinks_when_the_rtt_inflates_and_never_below_min_limit() -> None:
    cs = ClusterSettings(probe_interval=1e6)
    limit = NodeLimit("a", cs, 0.0)
    now = _feed_window(limit, 0.001, 0.0, cs)
    while limit.current < 200:
        now = _feed_window(limit, 0.001, now, cs)
    high = limit.current
    now = _feed_window(limit, 0.010, now, cs)  # queueing: 10x the no-load RTT
    # gradient clamped at 0.5, half of the step taken: at most a quarter less a window
    assert limit.current == int(high - 0.5 * (high - (high * 0.5 + math.sqrt(high))))
    seen = [limit.current]
    while limit.current > cs.min_limit:
        now = _feed_window(limit, 0.010, now, cs)
        seen.append(limit.current)
    assert seen == sorted(seen, reverse=True) and len(seen) <= 14  # 200 -> 16 in about a dozen windows
    for _ in range(4):
        now = _feed_window(limit, 0.010, now, cs)
        assert limit.current == cs.min_limit  # never below


def test_five_windows_at_the_floor_re_measure_the_no_load_rtt() -> None:
    """A mix of dearer commands (or the front's own lag) raises the RTT for good: the limit goes to the
    floor, and after 5 windows there a probe learns the new baseline, so the limit can rise again."""
    cs = ClusterSettings(probe_interval=1e6)
    limit = NodeLimit("a", cs, 0.0)
    now = _feed_window(limit, 0.001, 0.0, cs)
    floor_windows = 0
    while not limit.probing:
        now = _feed_window(limit, 0.008, now, cs)
        floor_windows += limit.current == cs.min_limit
    assert floor_windows == 5 and limit.current == cs.min_limit
    now = _feed_window(limit, 0.008, now, cs)  # the probe at the new mix
    assert limit.rtt_noload == pytest.approx(0.008) and limit.probes == 2
    for _ in range(10):
        now = _feed_window(limit, 0.008, now, cs)
    assert limit.current > cs.min_limit  # the baseline moved: no longer pinned to the floor


def test_a_faster_window_at_no_less_concurrency_lowers_the_no_load_rtt() -> None:
    cs = ClusterSettings(probe_interval=1e6)
    limit = NodeLimit("a", cs, 0.0)
    now = _feed_window(limit, 0.004, 0.0, cs)
    now = _feed_window(limit, 0.001, now, cs, peak=4)  # faster, but nearly idle: not a baseline
    assert limit.rtt_noload == pytest.approx(0.004)
    _feed_window(limit, 0.001, now, cs)  # faster at the limit: the mix got cheaper
    assert limit.rtt_noload == pytest.approx(0.001)


def test_probes_recur_every_probe_interval_with_jitter() -> None:
    cs = ClusterSettings(probe_interval=5.0)
    limit = NodeLimit("a", cs, 0.0)
    now = _feed_window(limit, 0.001, 0.0, cs)
    probe_times: list[float] = []
    while len(probe_times) < 4:
        now = _feed_window(limit, 0.001, now + 0.05, cs)
        if limit.probing:
            probe_times.append(now)
    gaps = [b - a for a, b in itertools.pairwise(probe_times)]
    assert all(0.8 * 5.0 <= g <= 1.2 * 5.0 + 0.2 for g in gaps)


@settings(max_examples=200, deadline=None)
@given(
    windows=st.lists(
        st.tuples(st.floats(0.0, 5.0), st.integers(0, 400), st.floats(0.0, 3.0)), min_size=1, max_size=60
    ),
    min_limit=st.integers(1, 64),
    max_outstanding=st.integers(1, 512),
    tolerance=st.floats(1.0, 4.0),
)
def test_the_limit_stays_within_min_limit_and_max_outstanding(
    windows: list[tuple[float, int, float]], min_limit: int, max_outstanding: int, tolerance: float
) -> None:
    cs = ClusterSettings(min_limit=min_limit, max_outstanding=max_outstanding, limit_tolerance=tolerance)
    floor, ceiling = limit_bounds(cs)
    limit = NodeLimit("a", cs, 0.0)
    now = 0.0
    for rtt, peak, gap in windows:
        now = _feed_window(limit, rtt, now + gap, cs, peak=peak)
        assert floor <= limit.current <= ceiling
        assert floor <= limit.estimate <= ceiling


# -- the queue ---------------------------------------------------------------------------------------


def _held_router(
    loop: VirtualTimeLoop, nodes: list[HeldNode], **cluster: Any
) -> tuple[Router, list[asyncio.Future[tuple[str, Any]]]]:
    """A router whose nodes each take 2 requests (the hard cap), filled with requests 0..2n-1; waiters
    may wait 5 ms unless ``cluster`` says otherwise."""
    # queue_interval 0: every wait is bounded by queue_timeout alone (no CoDel interval)
    base = {"max_outstanding": 2, "min_limit": 2, "queue_timeout": 0.005, "queue_interval": 0.0}
    cs = ClusterSettings(**{**base, **cluster})
    router = Router(list(nodes), deadline=30.0, settings=cs, clock=loop.time)
    held = [router.submit("op", {"i": i}) for i in range(2 * len(nodes))]
    return router, held


def test_a_request_beyond_every_limit_waits_and_the_oldest_starts_when_a_slot_frees() -> None:
    a, b = HeldNode("a"), HeldNode("b")

    async def go(loop: VirtualTimeLoop) -> None:
        router, held = _held_router(loop, [a, b])
        assert sorted(_marks(a) + _marks(b)) == [0, 1, 2, 3]
        waiting = [router.submit("op", {"i": i}) for i in (10, 11, 12)]
        await turn()
        assert router.queued == 3 and router.queued_total == 3 and not any(w.done() for w in waiting)
        assert len(a.arrived) == len(b.arrived) == 2  # nothing beyond the limit reached a node
        a.answer()
        await turn()
        assert a.arrived[-1] == 10 and router.queued == 2  # the oldest, on the node that freed a slot
        b.answer()
        await turn()
        assert b.arrived[-1] == 11 and router.queued == 1
        await asyncio.sleep(0.002)  # 2 ms later, still within queue_timeout (5 ms)
        a.answer()
        await turn()
        assert a.arrived[-1] == 12 and router.queued == 0
        a.answer(2)
        b.answer(2)
        results = await asyncio.gather(*held, *waiting)
        assert sorted(r[1]["i"] for r in results) == [0, 1, 2, 3, 10, 11, 12]
        assert router.shed == router.expired == 0

    run_virtual(go)


def test_a_new_request_never_overtakes_the_waiters() -> None:
    a = HeldNode("a")

    async def go(loop: VirtualTimeLoop) -> None:
        router, _ = _held_router(loop, [a])
        first = router.submit("op", {"i": 10})
        a.pending.pop(0)[1].set_result(("00", {}))  # a slot frees ...
        late = router.submit("op", {"i": 11})  # ... and a newcomer arrives before the callback ran
        await turn()
        assert a.arrived[-1] == 10 and router.queued == 1 and not late.done() and not first.done()

    run_virtual(go)


def test_a_waiter_past_queue_timeout_fails_overloaded_and_never_reaches_a_node() -> None:
    a, b = HeldNode("a"), HeldNode("b")

    async def go(loop: VirtualTimeLoop) -> None:
        router, _ = _held_router(loop, [a, b])
        t0 = loop.time()
        early = router.submit("op", {"i": 10})
        await asyncio.sleep(0.003)
        late = router.submit("op", {"i": 11})
        await asyncio.sleep(0.0015)  # t0 + 4.5 ms: a slot frees, the oldest starts in time
        a.answer()
        await turn()
        assert a.arrived[-1] == 10 and not early.done()
        await asyncio.sleep(0.004)  # t0 + 8.5 ms: the second waited 5.5 ms
        assert late.done() and isinstance(late.exception(), Overloaded)
        failed_at = loop.time()
        assert failed_at - t0 - 0.003 <= 0.005 + QUEUE_TIMER_FLOOR  # failed at its deadline, not later
        b.answer()
        await turn()
        assert 11 not in a.arrived + b.arrived  # never executed late
        assert router.expired == 1 and router.shed == 0 and router.queued == 0
        for node in (a, b):
            assert router.state(node).errors_total == 0 and router.state(node).ejections == 0

    run_virtual(go)


def test_one_timer_serves_the_whole_queue() -> None:
    a = HeldNode("a")

    async def go(loop: VirtualTimeLoop) -> None:
        router, _ = _held_router(loop, [a])
        before = loop.timers
        waiting = []
        for i in range(200):
            waiting.append(router.submit("op", {"i": 100 + i}))
            await asyncio.sleep(0.00002)  # 20 us apart: 200 waiters over 4 ms
        armed_while_queueing = loop.timers - before
        assert armed_while_queueing == 1 + 200  # the queue's one timer, plus the test's own sleeps
        await asyncio.sleep(0.01)
        assert all(isinstance(w.exception(), Overloaded) for w in waiting)
        assert router.expired == 200
        assert loop.timers - before - 200 - 1 <= 10  # a handful of re-arms, not one per waiter

    run_virtual(go)


def test_a_full_queue_sheds_at_once() -> None:
    a = HeldNode("a")

    async def go(loop: VirtualTimeLoop) -> None:
        router, _ = _held_router(loop, [a], max_queue=2)
        waiting = [router.submit("op", {"i": 10 + i}) for i in range(2)]
        shed = router.submit("op", {"i": 12})
        assert shed.done() and isinstance(shed.exception(), Overloaded)  # before any loop iteration
        assert router.shed == 1 and router.queued == 2 and not any(w.done() for w in waiting)
        for w in waiting:
            w.cancel()

    run_virtual(go)


def test_no_waiting_when_queue_timeout_is_zero() -> None:
    a = HeldNode("a")

    async def go(loop: VirtualTimeLoop) -> None:
        router, _ = _held_router(loop, [a], queue_timeout=0.0)
        shed = router.submit("op", {"i": 10})
        assert shed.done() and isinstance(shed.exception(), Overloaded) and router.shed == 1

    run_virtual(go)


def test_internal_work_bypasses_the_limit_and_the_queue() -> None:
    a, b = HeldNode("a"), HeldNode("b")

    async def go(loop: VirtualTimeLoop) -> None:
        router, _ = _held_router(loop, [a, b], max_queue=1)
        waiter = router.submit("op", {"i": 10})
        router.submit("audit_mac", {"i": 20}, shed=False)  # the queue is full, every node too
        await turn()
        assert 20 in a.arrived + b.arrived and router.queued == 1 and not waiter.done()
        node = a if 20 in a.arrived else b
        assert router.state(node).outstanding == 3  # beyond max_outstanding
        assert router.shed == 0
        waiter.cancel()

    run_virtual(go)


def test_a_retry_after_node_down_is_not_refused_by_admission() -> None:
    a, b = HeldNode("a"), HeldNode("b")

    async def go(loop: VirtualTimeLoop) -> None:
        router, held = _held_router(loop, [a, b], max_queue=1)
        waiter = router.submit("op", {"i": 10})
        marker, fut = a.pending.pop(0)
        fut.set_exception(NodeDown("a"))  # a's worker failed while holding the request
        await turn()
        assert b.arrived[-1] == marker  # retried on b although b is at its limit and the queue is full
        assert router.retries == 1 and router.shed == 0 and router.retries_refused == 0
        assert router.state(b).outstanding == 3 and router.queued == 1
        b.answer(3)
        await turn()
        retried = held[marker]
        assert retried.result() == ("00", {"i": marker, "node": "b"})
        assert b.arrived[-1] == 10  # the waiter went to b once b was under its limit (a is ejected)
        waiter.cancel()

    run_virtual(go)


def test_waiters_fail_at_once_when_no_node_is_left() -> None:
    a, b = HeldNode("a"), HeldNode("b")

    async def go(loop: VirtualTimeLoop) -> None:
        router, _ = _held_router(loop, [a, b])
        waiting = [router.submit("op", {"i": 10 + i}) for i in range(3)]
        router.set_oper(a, OpState.DOWN, "test")
        assert not any(w.done() for w in waiting)  # b can still serve them
        router.set_oper(b, OpState.DOWN, "test")
        for w in waiting:
            exc = w.exception()
            assert isinstance(exc, NoNodeAvailable) and not isinstance(exc, Overloaded)
        assert router.queued == 0 and router.expired == 0

    run_virtual(go)


def test_a_waiter_whose_caller_gave_up_is_skipped() -> None:
    a = HeldNode("a")

    async def go(loop: VirtualTimeLoop) -> None:
        router, _ = _held_router(loop, [a])
        gone = router.submit("op", {"i": 10})
        kept = router.submit("op", {"i": 11})
        gone.cancel()  # the connection closed
        a.answer()
        await turn()
        assert a.arrived[-1] == 11 and 10 not in a.arrived and not kept.done()
        kept.cancel()

    run_virtual(go)


# -- the limit in the router -------------------------------------------------------------------------


async def _clients(
    router: Router, count: int, stop: Callable[[], bool], outcomes: list[tuple[float, bool]]
) -> list[asyncio.Task[None]]:
    """``count`` closed-loop clients (send, await the answer, send again) until ``stop()``;
    ``outcomes`` gets (time, answered) per request (not answered: Overloaded, tried again 1 ms later)."""
    loop = asyncio.get_running_loop()

    async def client() -> None:
        while not stop():
            try:
                await router.submit("op", {})
                outcomes.append((loop.time(), True))
            except Overloaded:
                outcomes.append((loop.time(), False))
                await asyncio.sleep(0.001)

    return [asyncio.get_running_loop().create_task(client()) for _ in range(count)]


def test_a_fast_node_gets_enough_concurrency_for_its_load() -> None:
    """A node answering in 10 ms whatever the load (no queueing): the limit grows until every one of
    200 clients is in flight, then stops growing (demand no longer presses on it)."""
    a, b = BatchingNode("a", 0.0), BatchingNode("b", 0.0)
    a.latency = b.latency = 0.010

    async def go(loop: VirtualTimeLoop) -> tuple[list[int], int, list[tuple[float, bool]], float]:
        router = Router([a, b], settings=ClusterSettings(probe_interval=1e6), clock=loop.time)
        outcomes: list[tuple[float, bool]] = []
        settled = loop.time() + 1.0
        end = loop.time() + 2.0
        tasks = await _clients(router, 200, lambda: loop.time() >= end, outcomes)
        peak = 0
        while loop.time() < end:
            await asyncio.sleep(0.005)
            if loop.time() >= settled:
                peak = max(peak, sum(router.state(n).outstanding for n in (a, b)))
        await asyncio.gather(*tasks)
        return [router.limits[n].current for n in ("a", "b")], peak, outcomes, settled

    limits, peak, outcomes, _ = run_virtual(go)
    assert peak == 200  # every client in flight at once: no one waits for a slot
    assert all(100 <= limit <= 256 for limit in limits)  # enough for its half, not the cap
    # from the floor (16 a node during the start-up probe) the limit grows in a few hundred ms at a
    # 10 ms RTT; the waits of that ramp stay within CoDel's interval, so nothing is refused at all
    assert all(ok for _, ok in outcomes) and sum(ok for _, ok in outcomes) > 20_000


def test_the_limit_shrinks_under_queueing_and_recovers_after() -> None:
    """Phase 1: a device with many engines (flat 10 ms RTT): the limit grows to the cap. Phase 2: it
    turns into one engine (2 ms per operation, batched): the RTT grows with the queue, the limit
    shrinks. Phase 3: flat again: the limit recovers to the cap."""
    node = BatchingNode("a", service=0.002)
    cs = ClusterSettings(min_limit=8, max_outstanding=64, probe_interval=1e6, queue_interval=0.0)

    async def go(loop: VirtualTimeLoop) -> list[list[int]]:
        router = Router([node], settings=cs, clock=loop.time)
        outcomes: list[tuple[float, bool]] = []
        stopped = False
        tasks = await _clients(router, 100, lambda: stopped, outcomes)
        phases: list[list[int]] = []
        for latency, seconds in ((0.010, 1.0), (None, 2.0), (0.010, 1.0)):
            node.latency = latency
            seen = []
            end = loop.time() + seconds
            while loop.time() < end:
                await asyncio.sleep(0.01)
                seen.append(router.limits["a"].current)
            phases.append(seen)
        stopped = True
        await asyncio.gather(*tasks)
        assert router.state("a").ejections == 0 and router.state("a").errors_total == 0
        return phases

    grow, queueing, recover = run_virtual(go)
    assert all(8 <= v <= 64 for v in grow + queueing + recover)  # never outside [min_limit, max_outstanding]
    assert grow[-1] == 64
    assert queueing[-1] <= 24  # RTT ~ limit x 2 ms against a 10 ms baseline: about 2 x 10 ms / 2 ms
    assert recover[-1] == 64


def test_no_node_is_ejected_or_down_while_the_queue_is_full_and_nodes_answer() -> None:
    a, b = BatchingNode("a", 0.001, 0.0001), BatchingNode("b", 0.001, 0.0001)
    cs = ClusterSettings(max_queue=8, timeout=0.05, fall=1, rise=1, queue_interval=0.0)

    async def go(loop: VirtualTimeLoop) -> tuple[Router, list[bool]]:
        router = Router([a, b], deadline=0.1, settings=cs, clock=loop.time)
        checker = HealthChecker(router)
        sent: list[asyncio.Future[tuple[str, Any]]] = []
        checks: list[bool] = []
        full = 0
        for tick in range(1000):  # 1 s of 16 requests a millisecond: 8x what two nodes can run
            sent.extend(router.submit("op", {}) for _ in range(16))
            full += router.queued == cs.max_queue
            if tick % 50 == 0:
                for node in (a, b):
                    ok, reason, device = await checker.check_once(node)
                    checker.observe(node, ok, reason, device)
                    checks.append(ok)
            await asyncio.sleep(0.001)
        assert full > 800  # the queue was full most of the time
        await asyncio.gather(*sent, return_exceptions=True)
        return router, checks

    router, checks = run_virtual(go)
    assert all(checks) and len(checks) == 40
    assert router.shed > 0 and router.expired > 0
    for name in ("a", "b"):
        st = router.state(name)
        assert st.oper is OpState.UP and st.ejections == 0 and st.errors_total == 0
    assert router.slow_timeouts == 0 and router.retries == 0


# -- the simulation ----------------------------------------------------------------------------------


def test_simulated_overload_at_4x_capacity_keeps_goodput_and_answers_the_rest_in_time() -> None:
    """Two batching nodes (0.5 ms per operation, 0.1 ms per batch: 4,000/s together), offered 16,000/s
    for 2 s; then every operation costs 2 ms (a dearer mix: 1,000/s together, offered 16x) for 2 s.
    Each simulated second, the requests started are at least 90 % of capacity; every request either
    started within queue_timeout or was answered Overloaded by then (at once when the queue was full),
    no node was ejected or failed a health check, and every limit stayed within its bounds."""
    nodes = [BatchingNode("a", 0.0005, 0.0001), BatchingNode("b", 0.0005, 0.0001)]
    cs = ClusterSettings(max_queue=32, queue_interval=0.0)
    per_tick = 16  # every millisecond: 16,000/s

    async def go(loop: VirtualTimeLoop) -> dict[str, Any]:
        router = Router(nodes, deadline=2.0, settings=cs, clock=loop.time)
        checker = HealthChecker(router)
        t0 = loop.time()
        submitted: dict[int, float] = {}
        failed: dict[int, tuple[float, BaseException]] = {}
        answered: set[int] = set()
        limits_seen: list[int] = []
        checks: list[bool] = []

        def watch(i: int) -> Callable[[asyncio.Future[tuple[str, Any]]], None]:
            def done(fut: asyncio.Future[tuple[str, Any]]) -> None:
                exc = fut.exception()
                if exc is None:
                    answered.add(i)
                else:
                    failed[i] = (loop.time(), exc)

            return done

        i = 0
        for tick in range(4000):
            if tick == 2000:
                for node in nodes:
                    node.service = 0.002
            for _ in range(per_tick):
                submitted[i] = loop.time()
                router.submit("op", {"i": i}).add_done_callback(watch(i))
                i += 1
            if tick % 100 == 0:
                limits_seen.extend(router.limits[n.name].current for n in nodes)
                for node in nodes:
                    ok, reason, device = await checker.check_once(node)
                    checker.observe(node, ok, reason, device)
                    checks.append(ok)
            await asyncio.sleep(0.001)
        await asyncio.sleep(3.0)  # let the last ones finish
        started = {n: t for node in nodes for t, op, n in node.arrivals if op == "op"}
        return {
            "t0": t0,
            "submitted": submitted,
            "started": started,
            "failed": failed,
            "answered": answered,
            "limits": limits_seen,
            "checks": checks,
            "router": router,
        }

    out = run_virtual(go)
    t0, submitted, started = out["t0"], out["submitted"], out["started"]
    failed, answered, router = out["failed"], out["answered"], out["router"]
    per_second = [0, 0, 0, 0]
    for t in started.values():
        second = int(t - t0)
        if second < 4:
            per_second[second] += 1
    capacity = [4000, 4000, 1000, 1000]
    assert all(n >= 0.9 * c for n, c in zip(per_second, capacity, strict=True)), per_second
    assert set(started) == answered  # whatever started was answered
    assert set(started) | set(failed) == set(submitted) and not set(started) & set(failed)
    waits = [started[i] - submitted[i] for i in started]
    assert max(waits) <= cs.queue_timeout  # no request ran late
    at_once = [i for i, (t, _) in failed.items() if t == submitted[i]]
    for i, (t, exc) in failed.items():
        assert isinstance(exc, Overloaded)
        assert t - submitted[i] <= cs.queue_timeout + QUEUE_TIMER_FLOOR  # answered by its deadline
    assert len(at_once) == router.shed > 0 and router.expired > 0  # both the bound and the deadline acted
    assert len(failed) == router.shed + router.expired
    floor, ceiling = limit_bounds(cs)
    assert all(floor <= v <= ceiling for v in out["limits"])
    assert all(out["checks"])
    for node in nodes:
        st = router.state(node)
        assert st.oper is OpState.UP and st.ejections == 0 and st.errors_total == 0


# -- configuration -----------------------------------------------------------------------------------

_NODE = {"name": "a", "module": "/x.so", "token_label": "a", "pin_file": "/p"}


def _cluster(section: dict[str, Any]) -> ClusterSettings:
    return parse_settings({"cluster": section, "nodes": [_NODE]}, Path("/tmp")).cluster


def test_admission_settings_are_parsed_and_validated() -> None:
    assert _cluster({}) == ClusterSettings()
    assert (ClusterSettings().queue_timeout, ClusterSettings().max_queue, ClusterSettings().min_limit) == (
        0.010,
        1024,
        16,
    )
    cs = _cluster(
        {"queue_timeout": 0.02, "max_queue": 0, "min_limit": 8, "limit_tolerance": 1.5, "probe_interval": 30}
    )
    assert (cs.queue_timeout, cs.max_queue, cs.min_limit, cs.limit_tolerance, cs.probe_interval) == (
        0.02,
        0,
        8,
        1.5,
        30.0,
    )
    assert _cluster({"max_outstanding": 4}).min_limit == 4  # a small cap alone: a fixed limit
    for bad in (
        {"queue_timeout": -0.001},
        {"queue_timeout": "soon"},
        {"max_queue": -1},
        {"min_limit": 0},
        {"min_limit": 300},  # above max_outstanding (256)
        {"max_outstanding": 8, "min_limit": 16},
        {"limit_tolerance": 0.9},
        {"probe_interval": 0},
    ):
        with pytest.raises(ConfigError, match="cluster"):
            _cluster(bad)


# -- CoDel's interval: bursts wait, standing queues are dropped ----------------------------------------


def test_a_burst_may_wait_past_the_target_within_the_interval_and_is_served() -> None:
    a = HeldNode("a")

    async def go(loop: VirtualTimeLoop) -> None:
        router, _ = _held_router(loop, [a], queue_timeout=0.010, queue_interval=0.100)
        waiting = router.submit("op", {"i": 10})
        await asyncio.sleep(0.030)  # 30 ms: past the 10 ms target, within the 100 ms interval
        assert not waiting.done() and not router.dropping
        a.answer()
        await turn()
        assert a.arrived[-1] == 10 and not waiting.done()  # started on the node, not refused
        # the 30 ms wait began a standing period; a wait within the target ends it again
        a.answer(2)
        await turn()
        assert waiting.done() and waiting.result()[0] == "00"

    run_virtual(go)


def test_a_standing_queue_drops_waits_past_the_target_until_one_starts_in_time() -> None:
    a = HeldNode("a")

    async def go(loop: VirtualTimeLoop) -> None:
        router, _ = _held_router(loop, [a], queue_timeout=0.010, queue_interval=0.050)
        # a node that answers one request every 15 ms against a stream of one every 5 ms: waits grow
        futures: list[asyncio.Future[tuple[str, Any]]] = []
        for step in range(40):
            futures.append(router.submit("op", {"i": 100 + step}))
            await asyncio.sleep(0.005)
            if step % 3 == 2:
                a.answer()
                await turn()
        assert router.dropping  # waits stood above 10 ms for more than 50 ms
        refused = [f for f in futures if f.done() and f.exception() is not None]
        assert refused and all(isinstance(f.exception(), Overloaded) for f in refused)
        assert router.expired == len(refused)
        # the node catches up: once nothing shows a standing queue for an interval, dropping ends
        for _ in range(12):
            a.answer(len(a.pending))
            await asyncio.sleep(0.001)
        assert router.queued == 0
        await asyncio.sleep(0.051)
        assert not router.dropping

    run_virtual(go)


def test_the_front_is_told_to_shed_early_only_while_the_queue_is_dropping() -> None:
    a = HeldNode("a")

    async def go(loop: VirtualTimeLoop) -> None:
        router, _ = _held_router(loop, [a], queue_timeout=0.010, queue_interval=0.050)
        router.limits["a"].rtt_recent = 0.002  # 2 in flight / 2 ms: 1,000 a second, 10 in 10 ms
        burst = [router.submit("op", {"i": 200 + i}) for i in range(40)]
        await asyncio.sleep(0.051)  # past RATE_WINDOW (the estimate is taken), within the deadline
        assert not router.overloaded()  # a burst is not an overload, however long the queue
        await asyncio.sleep(0.015)  # the burst's waiters reach their 60 ms deadline: a standing queue
        assert router.dropping and router.queued == 0
        more = [router.submit("op", {"i": 300 + i}) for i in range(12)]
        assert router.overloaded()  # 12 waiting, 10 can start in 10 ms: a newcomer would be late
        while router.queued >= QUEUE_SLACK:
            a.answer(len(a.pending))
            await turn()
        assert not router.overloaded()  # a short queue: a newcomer starts in time
        assert all(f.done() and isinstance(f.exception(), Overloaded) for f in burst)
        del more

    run_virtual(go)
