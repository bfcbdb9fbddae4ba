"""Overload behaviour of the router: shedding at the hard cap (max_outstanding) when no request may
wait, slow nodes not ejected, retry budget. Adaptive limit and admission queue: test_cluster_admission.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from hsmproxy.backend.client import NodeDown
from hsmproxy.cluster.health import HealthChecker
from hsmproxy.cluster.router import RETRY_BURST, NoNodeAvailable, Overloaded, Router
from hsmproxy.cluster.state import ClusterSettings, OpState
from hsmproxy.config import ConfigError, parse_settings


class HeldNode:
    """Keeps every request pending until the test answers it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.up = True
        self.pending: list[asyncio.Future[tuple[str, Any]]] = []

    def submit(self, op: str, args: dict[str, Any]) -> asyncio.Future[tuple[str, Any]]:
        """A future the test resolves (or never does)."""
        fut: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        return fut

    def answer_all(self, code: str = "00") -> None:
        """Answer every pending request."""
        for fut in self.pending:
            if not fut.done():
                fut.set_result((code, {"n": 1}))
        self.pending = []


def test_requests_beyond_max_outstanding_are_shed_at_once_and_nothing_is_ejected() -> None:
    """max_outstanding is the hard cap of the adaptive limit; with no room to wait (max_queue = 0) a
    request beyond it on every node is shed at once."""
    a, b = HeldNode("a"), HeldNode("b")
    router = Router([a, b], deadline=30.0, settings=ClusterSettings(max_outstanding=3, max_queue=0))

    async def go() -> tuple[list[Any], list[Any]]:
        held = [router.submit("op", {}, "key") for _ in range(6)]  # 3 on each node
        await asyncio.sleep(0)
        shed = router.submit("op", {}, "key")
        await asyncio.sleep(0)
        assert shed.done() and isinstance(shed.exception(), Overloaded)
        a.answer_all()
        b.answer_all()
        first = list(await asyncio.gather(*held))
        again = router.submit("op", {}, "key")  # capacity is back
        await asyncio.sleep(0)
        a.answer_all()
        b.answer_all()
        return first, [await again]

    first, again = asyncio.run(go())
    assert first == [("00", {"n": 1})] * 6 and again == [("00", {"n": 1})]
    assert len(a.pending) == len(b.pending) == 0
    assert router.shed == 1 and router.expired == 0 and router.queued == 0
    assert router.limits["a"].current == router.limits["b"].current == 3  # the cap bounds the limit
    for node in (a, b):
        st = router.state(node)
        assert st.outstanding == 0 and st.ejections == 0 and st.errors_total == 0


def test_a_timeout_on_a_node_that_answers_others_does_not_eject_it() -> None:
    a, b = HeldNode("a"), HeldNode("b")
    router = Router([a, b], deadline=0.2)

    async def go() -> None:
        slow = router.submit("op", {}, "k")  # key affinity: both requests go to the same node
        other = router.submit("op", {}, "k")
        await asyncio.sleep(0.05)
        node = a if a.pending else b
        assert len(node.pending) == 2
        node.pending.pop(1).set_result(("00", {}))  # it answers the second while the first waits
        assert await other == ("00", {})
        with pytest.raises(TimeoutError):
            await slow  # the first attempt times out; so does its retry on the other node

    asyncio.run(go())
    answered = a if router.state(a).last_answer else b
    other = b if answered is a else a
    assert router.state(answered).ejections == 0  # slow, not failed
    assert router.slow_timeouts == 1
    assert router.state(other).errors_total == 1  # never answered anything: a failure


def test_the_retry_budget_stops_retries_from_multiplying_an_overload() -> None:
    now = [1000.0]
    a, b = HeldNode("a"), HeldNode("b")
    fixed = ClusterSettings(max_outstanding=10_000, min_limit=10_000)  # a fixed limit: every request starts
    router = Router([a, b], deadline=0.01, settings=fixed, clock=lambda: now[0])

    async def go() -> list[BaseException | tuple[str, Any]]:
        futures = [router.submit("op", {}, "") for _ in range(400)]
        return list(await asyncio.gather(*futures, return_exceptions=True))

    results = asyncio.run(go())
    assert all(isinstance(r, TimeoutError | NoNodeAvailable) for r in results)
    # the clock stood still: the saved burst plus 10% of the requests, not one retry per request
    assert router.retries <= RETRY_BURST + 0.1 * (400 + router.retries) + 1
    assert router.retries_refused >= 400 - router.retries - 1


class AnsweringNode(HeldNode):
    """Answers routed requests a little later; never answers health checks (queued behind traffic)."""

    def submit(self, op: str, args: dict[str, Any]) -> asyncio.Future[tuple[str, Any]]:
        """Requests answered after 5 ms, checks never."""
        fut = super().submit(op, args)
        if op != "lmk_check":
            asyncio.get_running_loop().call_later(0.005, fut.set_result, ("00", {}))
        return fut


def test_a_health_check_queued_behind_answered_traffic_does_not_fail() -> None:
    node = AnsweringNode("a")
    router = Router([node], settings=ClusterSettings(timeout=0.02, fall=1))
    checker = HealthChecker(router)

    async def go() -> tuple[bool, bool]:
        before = await checker.check_once(node)  # no traffic answered: a real timeout
        traffic = router.submit("op", {}, "")  # answered while the next check waits
        after = await checker.check_once(node)
        await traffic
        return before[0], after[0]

    before, after = asyncio.run(go())
    assert (before, after) == (False, True)
    checker.observe(node, after, "")
    assert router.state(node).oper is OpState.UP


def test_max_outstanding_is_validated() -> None:
    node = {"name": "a", "module": "/x.so", "token_label": "a", "pin_file": "/p"}
    with pytest.raises(ConfigError, match="max_outstanding"):
        parse_settings({"cluster": {"max_outstanding": 0}, "nodes": [node]}, Path("/tmp"))
    assert parse_settings({"cluster": {"max_outstanding": 64}, "nodes": [node]}, Path("/tmp")).cluster == (
        ClusterSettings(max_outstanding=64)
    )
    # a hard cap below the default floor, set alone, keeps its old meaning: a fixed limit
    assert parse_settings({"cluster": {"max_outstanding": 8}, "nodes": [node]}, Path("/tmp")).cluster == (
        ClusterSettings(max_outstanding=8, min_limit=8)
    )


class DyingNode(HeldNode):
    """Fails every request with NodeDown (its worker died)."""

    def submit(self, op: str, args: dict[str, Any]) -> asyncio.Future[tuple[str, Any]]:
        """Failed at once."""
        fut = super().submit(op, args)
        fut.set_exception(NodeDown(self.name))
        return fut


def test_a_dead_nodes_requests_are_all_retried_whatever_the_budget() -> None:
    now = [1000.0]
    dead, alive = DyingNode("dead"), HeldNode("alive")
    fixed = ClusterSettings(max_outstanding=10_000, min_limit=10_000)
    router = Router([dead, alive], settings=fixed, clock=lambda: now[0])

    async def go() -> list[tuple[str, Any]]:
        # affinity keys that prefer the dead node, many more than the retry budget holds
        keys = [f"k{i}" for i in range(2000)]
        preferred = [k for k in keys if router.pick(k).name == "dead"][:500]
        futures = [router.submit("op", {}, k) for k in preferred]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        alive.answer_all()
        return list(await asyncio.gather(*futures))

    results = asyncio.run(go())
    assert len(results) == 500 and all(r == ("00", {"n": 1}) for r in results)
    # every request the dead node took was retried, far more than the timeout budget would allow
    assert router.retries == len(dead.pending) > RETRY_BURST and router.retries_refused == 0


def test_internal_work_asked_not_to_be_shed_still_reaches_a_full_node() -> None:
    """The audit trail's one batch in flight (shed=False) gets through when host commands are shed."""
    a, b = HeldNode("a"), HeldNode("b")
    router = Router([a, b], deadline=30.0, settings=ClusterSettings(max_outstanding=2, max_queue=0))

    async def go() -> tuple[str, Any]:
        held = [router.submit("op", {}, "key") for _ in range(4)]  # both nodes full
        await asyncio.sleep(0)
        shed = router.submit("op", {}, "key")
        audit = router.submit("audit_mac", {}, shed=False)
        await asyncio.sleep(0)
        assert isinstance(shed.exception(), Overloaded) and not audit.done()
        a.answer_all()
        b.answer_all()
        await asyncio.gather(*held)
        return await audit

    assert asyncio.run(go()) == ("00", {"n": 1})
    assert router.shed == 1
