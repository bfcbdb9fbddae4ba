"""Stateful property test of the router over fake nodes (hypothesis RuleBasedStateMachine).

The machine drives the real :meth:`Router.execute` on a private event loop with a fake clock:
requests start, finish or fail (transport error -> retry elsewhere + ejection), operators set
READY/DRAIN/MAINT, health moves nodes UP/DOWN, workers die and come back, time passes.
Invariants, checked by the fake nodes at the moment a request reaches them and after every step:

* no request reaches a node that is DOWN, MAINT, DRAIN, ejected or whose worker is not running;
* a backup node gets a request only while no primary is eligible (the primary that just failed
  and is being retried away from does not count);
* in-flight requests of a node set to DRAIN/MAINT/DOWN still finish with their own answer;
* the router's outstanding count per node equals the requests really pending on that node;
* requests wait in the admission queue only while every node that could take them is at its
  concurrency limit (except a node that became eligible with no event the router sees: an ejection
  that ran out, a worker back before the router noticed it gone; such a node takes waiters at the
  queue's next timer or state change, within ``queue_timeout``), and never more than ``max_queue``.

A waiter is started later, by an answer or a state change, and the arrival invariants hold for it
then. The loop runs on the machine's clock, so the queue's timer fires when time passes, not when
the machine happens to be slow. :class:`TightRouterMachine` runs the same rules with limits of 2-3
requests a node and a queue of 4, so that most steps queue, start or expire waiters.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hsmproxy.backend.client import NodeDown
from hsmproxy.cluster.router import NoNodeAvailable, Router
from hsmproxy.cluster.state import AdminState, ClusterSettings, OpState

NAMES = ("a", "b", "c", "bk")
BACKUPS = frozenset({"bk"})
KEYS = ("", "K1", "K2", "K3", "K4")


class FakeNode:
    """A node whose answers the state machine controls."""

    def __init__(self, name: str, machine: RouterMachine) -> None:
        self.name = name
        self.up = True
        self.machine = machine
        self.pending: list[asyncio.Future[tuple[str, Any]]] = []
        self.received = 0

    def submit(self, op: str, args: dict[str, Any]) -> asyncio.Future[tuple[str, Any]]:
        """Check the routing invariants at the moment a request arrives, then hold it."""
        self.machine.check_arrival(self)
        fut: asyncio.Future[tuple[str, Any]] = self.machine.loop.create_future()
        self.pending.append(fut)
        self.received += 1
        return fut


class _MachineLoop(asyncio.SelectorEventLoop):
    """An event loop on the machine's clock: its timers fire when the machine lets time pass."""

    def __init__(self, machine: RouterMachine) -> None:
        self.machine = machine
        super().__init__()

    def time(self) -> float:
        """The machine's clock."""
        return self.machine.now


class RouterMachine(RuleBasedStateMachine):
    """Drives Router.execute with fake nodes, a fake clock and an explicit model of node states."""

    #: Admission settings of this machine (the defaults here).
    ADMISSION: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.loop = _MachineLoop(self)
        self.nodes = {n: FakeNode(n, self) for n in NAMES}
        self.cluster = ClusterSettings(
            base_ejection_time=5.0, max_ejection_time=40.0, slowstart=3.0, **self.ADMISSION
        )
        self.router = Router(
            list(self.nodes.values()),
            deadline=1e6,
            settings=self.cluster,
            weights={"a": 1, "b": 3, "c": 2, "bk": 1},
            backups=BACKUPS,
            clock=lambda: self.now,
        )
        self.admin = dict.fromkeys(NAMES, AdminState.READY)
        self.oper = dict.fromkeys(NAMES, OpState.UP)
        self.tasks: list[asyncio.Task[tuple[str, Any]]] = []
        self.just_failed: set[str] = set()
        #: Nodes that became eligible with no event the router sees, since the queue last emptied.
        self.silent: set[str] = set()
        self.answers: dict[int, str] = {}

    def teardown(self) -> None:
        """Cancel what is left and close the loop."""
        for t in self.tasks:
            t.cancel()

        async def settle() -> None:
            await asyncio.gather(*self.tasks, return_exceptions=True)

        self.loop.run_until_complete(settle())
        self.loop.close()

    # -- model ------------------------------------------------------------------------------------

    def eligible(self, name: str) -> bool:
        """The model's view: READY, UP, worker running, not ejected."""
        return (
            self.admin[name] is AdminState.READY
            and self.oper[name] is OpState.UP
            and self.nodes[name].up
            and not self.router.state(name).ejected(self.now)
        )

    def check_arrival(self, node: FakeNode) -> None:
        """A request reached ``node``: it must be eligible, and a backup only when no primary is."""
        assert self.eligible(node.name), (node.name, self.admin[node.name], self.oper[node.name], node.up)
        if node.name in BACKUPS:
            primaries = [n for n in NAMES if n not in BACKUPS and n not in self.just_failed]
            assert not any(self.eligible(n) for n in primaries), "backup used while a primary is eligible"

    def step(self) -> None:
        """Let the loop run everything that is ready."""
        for _ in range(5):
            self.loop.run_until_complete(asyncio.sleep(0))

    # -- rules ------------------------------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS), count=st.integers(1, 4))
    def start_requests(self, key: str, count: int) -> None:
        """New requests (with or without a key for affinity)."""
        for i in range(count):
            marker = len(self.tasks)
            task = self.loop.create_task(self.router.execute("op", {"i": marker}, key or f"x{i}"))
            self.tasks.append(task)
        self.step()

    @precondition(lambda self: any(n.pending for n in self.nodes.values()))
    @rule(data=st.data())
    def finish_one(self, data: st.DataObject) -> None:
        """A node answers one of its in-flight requests (whatever its state now)."""
        node = data.draw(st.sampled_from([n for n in self.nodes.values() if n.pending]))
        fut = node.pending.pop(data.draw(st.integers(0, len(node.pending) - 1)))
        if not fut.done():
            fut.set_result(("00", {"node": node.name}))
        self.step()

    @precondition(lambda self: any(n.pending for n in self.nodes.values()))
    @rule(data=st.data(), business=st.booleans())
    def fail_one(self, data: st.DataObject, business: bool) -> None:
        """A transport/device failure (retried elsewhere, ejects) or a business error (neither)."""
        node = data.draw(st.sampled_from([n for n in self.nodes.values() if n.pending]))
        fut = node.pending.pop(0)
        before = self.router.state(node.name).ejections
        if not fut.done():
            if business:
                fut.set_result(("01", {}))
            else:
                fut.set_exception(NodeDown(node.name))
                self.just_failed.add(node.name)
        self.step()
        self.just_failed.clear()
        if business:
            assert self.router.state(node.name).ejections == before, "a business result ejected a node"

    @rule(name=st.sampled_from(NAMES), state=st.sampled_from(list(AdminState)))
    def set_admin(self, name: str, state: AdminState) -> None:
        """Operator: SET NODE name STATE state (the model first: the change may start queued requests)."""
        self.admin[name] = state
        self.router.set_admin(name, state, "test")
        self.step()

    @rule(name=st.sampled_from(NAMES), state=st.sampled_from(list(OpState)))
    def set_oper(self, name: str, state: OpState) -> None:
        """Health checks: node UP or DOWN (the model first: the change may start queued requests)."""
        self.oper[name] = state
        self.router.set_oper(self.nodes[name], state, "test")
        self.step()

    @rule(name=st.sampled_from(NAMES))
    def worker_dies(self, name: str) -> None:
        """The worker process dies: its in-flight requests fail, the router retries them."""
        node = self.nodes[name]
        node.up = False
        pending, node.pending = node.pending, []
        for fut in pending:
            if not fut.done():
                fut.set_exception(NodeDown(name))
        self.just_failed.add(name)
        self.step()
        self.just_failed.clear()
        self.oper[name] = self.router.state(name).oper  # the router marks it DOWN itself

    @rule(name=st.sampled_from(NAMES))
    def worker_restarts(self, name: str) -> None:
        """The worker is back (the node stays DOWN until health checks bring it UP)."""
        self.nodes[name].up = True
        self.silent.add(name)  # UP already if the router never saw the worker die (nothing in flight)

    @rule(seconds=st.sampled_from([0.002, 0.5, 2.0, 6.0, 50.0]))
    def time_passes(self, seconds: float) -> None:
        """Ejections expire, slow start ramps, waiters run out of time (the queue's timer fires)."""
        ejected = {n for n in NAMES if self.router.state(n).ejected(self.now)}
        self.now += seconds
        self.silent |= {n for n in ejected if not self.router.state(n).ejected(self.now)}
        self.step()

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def outstanding_matches_pending(self) -> None:
        """The router's outstanding count per node is the number of requests pending on it."""
        for name, node in self.nodes.items():
            live = sum(1 for f in node.pending if not f.done())
            assert self.router.state(name).outstanding == live, name

    @invariant()
    def finished_requests_are_answers_or_clean_errors(self) -> None:
        """A finished request has its node's answer, or failed with NoNodeAvailable / NodeDown."""
        for task in self.tasks:
            if not task.done():
                continue
            exc = task.exception()
            if exc is None:
                code, values = task.result()
                assert code in ("00", "01")
                assert code == "01" or values["node"] in NAMES
            else:
                assert isinstance(exc, NoNodeAvailable | NodeDown), repr(exc)

    @invariant()
    def waiting_only_while_every_candidate_is_full(self) -> None:
        """A request waits only while each node that could take it is at its concurrency limit."""
        router = self.router
        assert router.queued <= self.cluster.max_queue
        if not router.queued:
            self.silent.clear()
        else:
            for node in router.candidates():
                if node.name in self.silent:
                    continue
                limit = min(router.limits[node.name].current, self.cluster.max_outstanding)
                assert router.state(node).outstanding >= limit, (node.name, limit, router.queued)

    @invariant()
    def model_agrees_with_router(self) -> None:
        """Admin and operational states are what was set."""
        for name in NAMES:
            assert self.router.state(name).admin is self.admin[name]
            assert self.router.state(name).oper is self.oper[name]


RouterMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestRouterStateful = RouterMachine.TestCase


class TightRouterMachine(RouterMachine):
    """The same machine with limits of 2-3 requests a node and room for 4 waiters."""

    ADMISSION: ClassVar[dict[str, Any]] = {"min_limit": 2, "max_outstanding": 3, "max_queue": 4}


TightRouterMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestTightRouterStateful = TightRouterMachine.TestCase


def test_drain_finishes_in_flight_and_takes_nothing_new() -> None:
    """A worked example: DRAIN keeps in-flight requests, new ones go elsewhere."""
    machine = RouterMachine()
    try:
        machine.start_requests("K1", 4)
        busy = {n for n, node in machine.nodes.items() if node.pending}
        drained = next(iter(busy))
        in_flight = len(machine.nodes[drained].pending)
        machine.set_admin(drained, AdminState.DRAIN)
        received = machine.nodes[drained].received
        machine.start_requests("K2", 4)
        assert machine.nodes[drained].received == received
        for fut in list(machine.nodes[drained].pending):
            fut.set_result(("00", {"node": drained}))
        machine.nodes[drained].pending.clear()
        machine.step()
        done = [t.result() for t in machine.tasks if t.done() and not t.exception()]
        assert sum(1 for _, v in done if v["node"] == drained) == in_flight
        assert machine.router.state(drained).outstanding == 0
    finally:
        machine.teardown()


def test_backups_only_when_every_primary_is_down() -> None:
    """With every primary DOWN the backup serves; one primary UP again takes the traffic back."""
    machine = RouterMachine()
    try:
        for name in ("a", "b", "c"):
            machine.set_oper(name, OpState.DOWN)
        machine.start_requests("K1", 3)
        assert len(machine.nodes["bk"].pending) == 3
        machine.set_oper("c", OpState.UP)
        machine.start_requests("K1", 3)
        assert len(machine.nodes["bk"].pending) == 3
        assert len(machine.nodes["c"].pending) == 3
    finally:
        machine.teardown()


def test_ejection_doubles_and_is_capped() -> None:
    """base 5 s, then 10, 20, capped at 40."""
    machine = RouterMachine()
    try:
        spans = []
        st_a = machine.router.state("a")
        for _ in range(5):
            spans.append(st_a.eject(machine.now, machine.cluster, "test"))
            machine.now += spans[-1] + 1
        assert spans == [5.0, 10.0, 20.0, 40.0, 40.0]
        machine.now += 1000  # a long quiet period forgives
        assert st_a.eject(machine.now, machine.cluster, "test") == 5.0
        assert [c.what for c in st_a.history].count("eject") == 6
    finally:
        machine.teardown()


def test_affinity_is_stable_and_spills() -> None:
    """The same key goes to the same node while it is not much busier than the least loaded."""
    machine = RouterMachine()
    try:
        router = machine.router
        first = {key: router.pick(key).name for key in ("K1", "K2", "K3", "K4", "K5", "K6")}
        assert {key: router.pick(key).name for key in first} == first
        assert len(set(first.values())) > 1
        preferred = router.state(first["K1"])
        preferred.outstanding = machine.cluster.affinity_spill + 5
        assert router.pick("K1").name != first["K1"]
        preferred.outstanding = 0
    finally:
        machine.teardown()
