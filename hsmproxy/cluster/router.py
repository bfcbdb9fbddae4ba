"""Routing operations to node workers, in HAProxy's and Envoy's vocabulary.

* **Eligible nodes**: admin ``READY``, operational ``UP``, not ejected, worker running, weight > 0
  (:mod:`hsmproxy.cluster.state`). ``DRAIN`` nodes get no new requests (their in-flight ones
  finish), ``MAINT``/``DOWN``/ejected nodes get none. Backup nodes (``backup = true``) are used
  only while no primary node is eligible.
* **Weighted least outstanding requests**: the node with the lowest (outstanding + 1) / weight,
  the weight ramped over ``slowstart`` seconds after a node recovers.
* **Key affinity**: the key cryptogram picks a preferred node by weighted rendezvous hashing (a
  node joining or leaving moves only its own share of keys), so that node's key-handle cache
  stays warm; the preferred node is used unless it has more than ``affinity_spill`` requests
  outstanding beyond the least busy node.
* **Deadline and one retry**: a request gets ``deadline`` seconds per attempt; a request whose
  node dies (:class:`NodeDown`) or misses the deadline is retried once on another node (every host
  command is stateless in the HSM, so this is safe).
* **Passive outlier detection**: transport errors, timeouts and device errors (all surface as
  ``NodeDown`` or ``TimeoutError``) eject the node for a doubling back-off. Business results
  (``01``, ``15`` ...) are answers, never failures. A node is not ejected when it is the last
  eligible node (as Envoy's panic threshold: ejecting it would only turn slowness into errors).
* With no eligible node a request fails at once with :class:`NoNodeAvailable` (never hangs).

Admission (overload degrades, never collapses):

* **Adaptive concurrency limit per node** (:mod:`hsmproxy.cluster.admission`): a node takes at most
  its current limit of requests, adjusted from the measured RTT of its answers (submit to answer,
  the front's event-loop lag included) between ``[cluster] min_limit`` (default 16: the worker
  batches, and large batches are what keep the front cheap per request) and ``max_outstanding``
  (default 256, the hard cap). ``limit_tolerance`` (default 2.0) is how far the RTT may rise over
  the no-load RTT before the limit shrinks; ``probe_interval`` (default 5 s) how often the no-load
  RTT is re-measured (the node held at ``min_limit`` for ``2 x min_limit`` answers).
  ``min_limit = max_outstanding`` turns adaptation off (a fixed limit).
* **Bounded wait with a deadline** (CoDel's control law): a request that finds every eligible node at
  its limit waits in one router-wide FIFO queue among at most ``max_queue`` others. A burst may wait
  up to ``queue_timeout + queue_interval`` (10 + 100 ms): CoDel lets a queue stand above its target for
  an interval, so the waves in which a pipelined burst starts are not refused. Once waits have stood
  above ``queue_timeout`` for ``queue_interval`` (or a waiter ran out its deadline) the queue is
  *dropping*: every waiter older than ``queue_timeout`` fails with :class:`Overloaded` (``expired``),
  and :meth:`Router.overloaded` tells the fronts to refuse early what would not start in time (queue
  length over the nodes' start rate, Little's law on their limits and RTTs), before they parse it.
  Dropping ends once nothing has shown a standing queue for an interval. An answer frees a slot and
  starts the oldest waiter in time, on the node affinity and least outstanding choose among those
  under their limit. A request finding the queue full fails at once (``shed``). Nothing reaches a node
  late. ``max_queue = 0`` or ``queue_timeout = 0``: no waiting; ``queue_interval = 0``: every wait is
  bounded by ``queue_timeout`` alone. One timer serves the queue (the head is due first).
* **Never refused**: internal work (``shed=False``: the audit trail's MAC batches and checkpoints)
  and retries (the request was admitted once) skip both the limit and the queue, and may exceed
  ``max_outstanding``. Health checks do not go through the router at all.
* **Overload is not failure**: a request that expired in the queue never reached a node and counts
  against none; RTT samples only move limits, never health or ejection.

Counters (for metrics): :attr:`Router.shed` (queue full), :attr:`Router.expired` (waited past
``queue_timeout``), :attr:`Router.queued` (waiting now), :attr:`Router.queued_total` (ever waited);
per node ``Router.limits[name]`` (a :class:`~hsmproxy.cluster.admission.NodeLimit`): ``current``
(limit in force), ``estimate``, ``rtt_noload`` and ``rtt_recent`` (seconds), ``probing``,
``windows``, ``probes``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from hsmproxy.backend.client import NodeDown
from hsmproxy.cluster.admission import NodeLimit
from hsmproxy.cluster.state import AdminState, ClusterSettings, NodeState, OpState, StateChange
from hsmproxy.logs import LogThrottle

log = logging.getLogger("hsmproxy.cluster")


@dataclass(slots=True)
class RequestNote:
    """What serving one request learned, for its audit record (never a field value): the node that
    answered ("" when none did), the last node it was sent to ("" when it never reached one: refused
    before a node, it may be counted instead of recorded) and the named keys it presented."""

    node: str = ""
    key_ids: tuple[tuple[str, str], ...] = ()
    tried: str = ""


#: The note of the request served in this context, set around its submission by the front's audit point
#: (host commands, ISO 8583 messages); None otherwise. A request with a note passes the audit gate.
REQUEST_NOTE: ContextVar[RequestNote | None] = ContextVar("hsmproxy_request_note", default=None)

#: Affinity keys whose per-node rendezvous costs are memoised (the memo is emptied when full).
RENDEZVOUS_CACHE = 65536

#: Default spill threshold (kept for callers of the first router).
AFFINITY_SPILL = 32


class NoNodeAvailable(Exception):
    """No node is eligible to serve the request."""


#: The failure reason of a timeout on a node that answered another request within the deadline.
SLOW = "slow: no answer within the deadline while answering others"
#: Retry budget: a retry per this many requests, at least RETRY_RESERVE a second, at most RETRY_BURST saved.
RETRY_RATIO = 0.1
RETRY_RESERVE = 10.0
RETRY_BURST = 100.0


#: Shortest re-arm of the queue timer (s): a loop whose clock is coarser than the router's (uvloop
#: caches a millisecond clock) may wake it a little early; expiry is then at most this late.
QUEUE_TIMER_FLOOR = 0.001
#: Waiters the queue may always hold before :meth:`Router.overloaded` says a newcomer would be late.
QUEUE_SLACK = 8
#: Seconds over which the completion rate of :meth:`Router.overloaded` is measured.
RATE_WINDOW = 0.05


class Overloaded(NoNodeAvailable):
    """Every eligible node is at its concurrency limit and the request could not start in time
    (the admission queue was full, or it waited ``queue_timeout``): it is shed, never run late."""


class AuditUnavailable(NoNodeAvailable):
    """The audit trail cannot take the record a host command would write (it is behind under overload,
    or ``[audit] fail_closed`` and failing), so the command gets no node (``41``)."""


class Backend(Protocol):
    """What the router needs of a node (NodeClient, or a fake in tests)."""

    @property
    def name(self) -> str:
        """Unique node name."""
        ...

    @property
    def up(self) -> bool:
        """True while the node's worker runs and accepts requests."""
        ...

    def submit(self, op: str, args: dict[str, Any]) -> asyncio.Future[tuple[str, Any]]:
        """Run an operation; resolves to (error code, values) or fails with NodeDown."""
        ...


def _expire(fut: asyncio.Future[tuple[str, Any]]) -> None:
    """Deadline of one attempt: cancel the node's future (its late answer is then dropped)."""
    fut.cancel()


def _rendezvous_cost(name: str, key: str) -> float:
    """``-log(u)`` for the hash ``u`` of ``key`` on node ``name``: the weighted rendezvous score of
    the pair is ``weight / cost`` (highest wins)."""
    digest = hashlib.blake2b(f"{name}\x00{key}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)
    return -math.log(u)


def _rendezvous(name: str, key: str, weight: float) -> float:
    """Weighted rendezvous score of ``key`` on node ``name`` (highest wins)."""
    return weight / _rendezvous_cost(name, key)


@dataclass(slots=True)
class _Waiter:
    """A request waiting in the admission queue for a node under its limit."""

    outer: asyncio.Future[tuple[str, Any]]
    op: str
    args: dict[str, Any]
    affinity: str
    note: RequestNote | None
    #: ``clock()`` by which it must have started in any case (``queue_timeout + queue_interval``
    #: after it arrived; in the dropping state ``queue_timeout`` after it arrived).
    deadline: float
    #: ``clock()`` when it arrived.
    since: float


class Router:
    """Chooses a node per operation, admits it under the node's adaptive limit or lets it wait a
    little, retries once elsewhere, ejects failing nodes."""

    def __init__(
        self,
        nodes: Sequence[Backend],
        deadline: float = 2.0,
        settings: ClusterSettings | None = None,
        weights: Mapping[str, int] | None = None,
        backups: Collection[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nodes = list(nodes)
        self.clock = clock
        self.deadline = deadline
        self.settings = settings or ClusterSettings()
        self.retries = 0
        #: Requests answered Overloaded at once: every eligible node at its limit and the admission
        #: queue full (or no waiting configured).
        self.shed = 0
        #: Timeouts on nodes that were answering other requests (not counted as failures), and
        #: retries the retry budget refused.
        self.slow_timeouts = 0
        self.retries_refused = 0
        self._budget = RETRY_BURST
        self._budget_at = clock()
        self._budget_requests = 0
        #: "Last eligible node" warnings, at most one a second per node.
        self._quiet: dict[str, LogThrottle] = {n.name: LogThrottle() for n in self.nodes}
        #: The audit trail's gate (``AuditWriter.admits``): host-command operations run only while it is True.
        self.gate: Callable[[], bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop requests run on (one per process)
        self._costs: dict[str, dict[str, float]] = {}
        #: Admission: requests that waited past ``queue_timeout`` (never reached a node), requests that
        #: ever waited; the per-node adaptive limits; the FIFO of waiters and the one timer of its head.
        self.expired = 0
        self.queued_total = 0
        #: Requests answered at once by a front that asked :meth:`overloaded` (never parsed, never queued).
        self.shed_early = 0
        self._completions = 0  # node answers since _rate_at
        self._rate = 0.0  # node answers a second (smoothed)
        self._rate_at = clock()
        self._capacity = 0.0  # what the eligible nodes can start a second (limit / RTT), estimated
        #: CoDel's state: since when waits have exceeded ``queue_timeout`` (0: they have not), and
        #: whether they have for ``queue_interval`` (a standing queue: dropping).
        self._above_since = 0.0
        self._last_above = 0.0
        self._drop = False
        self.limits: dict[str, NodeLimit] = {n.name: NodeLimit(n.name, self.settings, clock()) for n in nodes}
        self._waiters: deque[_Waiter] = deque()
        self._queue_timer: asyncio.TimerHandle | None = None
        weights = weights or {}
        self.states: dict[str, NodeState] = {}
        for n in self.nodes:
            oper = OpState.UP if n.up else OpState.DOWN  # no slow start at start-up
            st = NodeState(n.name, weight=int(weights.get(n.name, 1)), backup=n.name in backups, oper=oper)
            st.history.append(StateChange(time.time(), "oper", "-", oper.value, "start-up"))
            self.states[n.name] = st

    # -- state ------------------------------------------------------------------------------------

    def state(self, node: Backend | str) -> NodeState:
        """The routing state of a node (by object or name); KeyError if unknown."""
        return self.states[node if isinstance(node, str) else node.name]

    def node(self, name: str) -> Backend:
        """The node called ``name``; KeyError if unknown."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def set_admin(self, name: str, state: AdminState, reason: str) -> bool:
        """Operator action: set a node's admin state (KeyError if unknown); True if it changed."""
        changed = self.states[name].set_admin(state, reason)
        if changed:
            log.warning("node %s admin state %s: %s", name, state.value, reason)
            if self._waiters:
                self._drain()  # a READY node takes waiters; with none left eligible they fail at once
        return changed

    def set_oper(self, node: Backend, state: OpState, reason: str) -> bool:
        """Set a node's operational state (health checks, worker loss); True if it changed."""
        now = self.clock()
        changed = self.states[node.name].set_oper(state, reason, now)
        if changed:
            log.warning("node %s is %s: %s", node.name, state.value, reason)
            if state is OpState.UP:  # a new worker or a recovered token: learn its no-load RTT again
                self.limits[node.name].request_probe(now, self.settings)
            if self._waiters:
                self._drain()
        return changed

    @property
    def queued(self) -> int:
        """Requests waiting in the admission queue now."""
        return len(self._waiters)

    def eligible(self, node: Backend, now: float) -> bool:
        """True if ``node`` may take a new request now."""
        st = self.states[node.name]
        return node.up and st.weight > 0 and st.serving(now)

    def candidates(self, exclude: Backend | None = None, now: float | None = None) -> list[Backend]:
        """Eligible primaries, or eligible backups when no primary is eligible."""
        now = self.clock() if now is None else now
        primaries: list[Backend] = []
        backups: list[Backend] = []
        for n in self.nodes:
            if n is exclude or not self.eligible(n, now):
                continue
            (backups if self.states[n.name].backup else primaries).append(n)
        return primaries or backups

    def up_nodes(self) -> list[Backend]:
        """Nodes currently able to take new requests."""
        return self.candidates()

    def ready(self) -> bool:
        """True while at least one node can take requests (readiness)."""
        return bool(self.candidates())

    # -- choosing ---------------------------------------------------------------------------------

    def pick(self, affinity: str = "", exclude: Backend | None = None, shed: bool = True) -> Backend:
        """The node for the next request: with ``shed``, among nodes under their concurrency limit
        (:class:`Overloaded` when every eligible node is at it); without, among all eligible nodes."""
        now = self.clock()
        candidates = self.candidates(exclude, now)
        if not candidates:
            raise NoNodeAvailable("no node is up")
        if shed:
            candidates = self._under_limit(candidates)
            if not candidates:
                raise Overloaded("every eligible node is at its concurrency limit")
        return self._choose(candidates, affinity, now)

    def _under_limit(self, candidates: list[Backend]) -> list[Backend]:
        """The candidates with fewer requests outstanding than their limit (and the hard cap)."""
        states, limits = self.states, self.limits
        cap = self.settings.max_outstanding
        return [n for n in candidates if states[n.name].outstanding < min(limits[n.name].current, cap)]

    def _choose(self, candidates: list[Backend], affinity: str, now: float) -> Backend:
        """Weighted least outstanding among ``candidates``, or the key's preferred node within the spill."""
        if len(candidates) == 1:
            return candidates[0]
        states = self.states
        slowstart = self.settings.slowstart
        costs = self._rendezvous_costs(affinity) if affinity else None
        least = preferred = candidates[0]
        least_load = best = -1.0
        for n in candidates:
            st = states[n.name]
            weight = st.effective_weight(now, slowstart)
            load = (st.outstanding + 1) / weight
            if least_load < 0 or load < least_load:
                least, least_load = n, load
            if costs is not None:
                score = weight / costs[n.name]  # weighted rendezvous: highest wins
                if score > best:
                    preferred, best = n, score
        if costs is not None:
            spill = self.settings.affinity_spill
            if states[preferred.name].outstanding <= states[least.name].outstanding + spill:
                return preferred
        return least

    def _rendezvous_costs(self, key: str) -> dict[str, float]:
        """``-log(u)`` of ``key`` on every node (score = weight / cost), memoised per key."""
        costs = self._costs.get(key)
        if costs is None:
            if len(self._costs) >= RENDEZVOUS_CACHE:
                self._costs.clear()
            costs = self._costs[key] = {n.name: _rendezvous_cost(n.name, key) for n in self.nodes}
        return costs

    # -- executing --------------------------------------------------------------------------------

    async def execute(
        self, op: str, args: dict[str, Any], affinity: str = "", *, shed: bool = True
    ) -> tuple[str, Any]:
        """Run ``op`` on a node; retry once on another node if the first fails or times out.

        ``shed=False``: never refused nor queued by admission (internal work such as the audit
        trail's one batch in flight, which records answers already sent).
        """
        return await self.submit(op, args, affinity, shed=shed)

    def submit(
        self, op: str, args: dict[str, Any], affinity: str = "", *, shed: bool = True
    ) -> asyncio.Future[tuple[str, Any]]:
        """Like :meth:`execute`, as a future, without a task per request (the host-command path).

        The attempt is driven by callbacks: the node's future, one timer for the deadline, and a
        retry on another node from the callback. A request finding every eligible node at its limit
        waits in the admission queue (started by a later answer, or failed by the queue's timer).
        Fails with :class:`NoNodeAvailable` (:class:`Overloaded` when shed or out of time in the
        queue) or ``TimeoutError`` when no node could answer.
        """
        loop = self._loop
        if loop is None or loop.is_closed():  # get_running_loop() is a getpid() call on Python 3.11
            loop = self._loop = asyncio.get_running_loop()
            self._waiters.clear()  # waiters of a closed loop (tests run several) can never be answered
            self._queue_timer = None
        outer: asyncio.Future[tuple[str, Any]] = loop.create_future()
        note = REQUEST_NOTE.get()  # a host command's audit note (read now: callbacks run elsewhere)
        if note is not None and self.gate is not None and not self.gate():
            outer.set_exception(AuditUnavailable("the audit trail cannot take records now"))
            return outer
        now = self.clock()
        candidates = self.candidates(None, now)
        if not candidates:
            outer.set_exception(NoNodeAvailable("no node is up"))
            return outer
        if shed:
            # waiters exist only while every eligible node is at its limit (whatever frees a slot
            # drains the queue): a newcomer then joins the tail, never overtaking them
            free = [] if self._waiters else self._under_limit(candidates)
            if not free:
                self._enqueue(outer, op, args, affinity, note, now)
                return outer
            candidates = free
        self._attempt(loop, outer, self._choose(candidates, affinity, now), op, args, affinity, True, note)
        return outer

    @property
    def shed_total(self) -> int:
        """Requests answered ``41`` at once as overload: by the router (queue full) and by fronts
        that asked :meth:`overloaded`."""
        return self.shed + self.shed_early

    def overloaded(self) -> bool:
        """True when a request arriving now would not start within ``queue_timeout``: the queue is in
        its dropping state (waits have stood above ``queue_timeout`` for ``queue_interval``: a burst
        that drains is not an overload) and holds more than the nodes can start in that time. Their
        start rate is estimated by
        Little's law from each eligible node's limit and round-trip time (what they can take, so a
        burst at an idle proxy is not mistaken for overload), and is at least the answer rate
        measured. Under a flood the round trips grow with the front's own lag, the estimate falls
        and refusals move to the front. A front asks this before parsing a request and answers it at
        once (counted in :attr:`shed_early`): refusing must cost far less than serving, or the work
        of refusing starves the nodes' answers (receive livelock) and nothing starts in time."""
        waiters = self._waiters
        if len(waiters) < QUEUE_SLACK:
            return False
        now = self.clock()
        span = now - self._rate_at
        if span >= RATE_WINDOW:
            measured = self._completions / span
            self._rate = measured if not self._rate else 0.7 * self._rate + 0.3 * measured
            self._completions, self._rate_at = 0, now
            capacity = 0.0
            for name, limit in self.limits.items():
                rtt = max(limit.rtt_recent, limit.rtt_noload)
                if rtt > 0 and self.states[name].serving(now):
                    capacity += limit.current / rtt
            self._capacity = capacity
        if not self._dropping(now):
            return False  # no standing queue: a burst that drains, not an overload
        rate = max(self._rate, self._capacity)
        # no estimate yet (a fresh proxy): the queue's own deadline decides
        late = rate > 0 and len(waiters) >= max(QUEUE_SLACK, rate * self.settings.queue_timeout)
        if late:
            self._last_above = now  # refusing early is the standing queue's evidence too
        return late

    def _enqueue(
        self,
        outer: asyncio.Future[tuple[str, Any]],
        op: str,
        args: dict[str, Any],
        affinity: str,
        note: RequestNote | None,
        now: float,
    ) -> None:
        """Let a request wait for a node under its limit, or shed it at once when it may not wait."""
        settings = self.settings
        waiters = self._waiters
        while (
            waiters
            and len(waiters) >= settings.max_queue
            and (waiters[0].outer.done() or now >= self._due(waiters[0], now))
        ):
            self._expire_head()  # out of time or given up, not yet reached by the timer: no room taken
        if len(waiters) >= settings.max_queue or settings.queue_timeout <= 0:
            self.shed += 1
            outer.set_exception(Overloaded("every eligible node is at its concurrency limit, none may wait"))
            return
        deadline = now + settings.queue_timeout + settings.queue_interval
        waiters.append(_Waiter(outer, op, args, affinity, note, deadline, now))
        self.queued_total += 1
        if self._queue_timer is None:
            self._arm_queue_timer(now, 0.0)

    def _arm_queue_timer(self, now: float, floor: float) -> None:
        """The queue's one timer, at the head's deadline (every waiter has the same budget)."""
        loop = self._loop
        if loop is not None and self._waiters:
            delay = max(self._due(self._waiters[0], now) - now, floor)
            self._queue_timer = loop.call_later(delay, self._on_queue_timer)

    @property
    def dropping(self) -> bool:
        """True while the admission queue is in CoDel's dropping state (a standing queue)."""
        return self._dropping(self.clock())

    def _dropping(self, now: float) -> bool:
        """The dropping state, ended once nothing has shown a standing queue for an interval."""
        if self._drop and now - self._last_above >= self.settings.queue_interval:
            self._drop = False
        return self._drop

    def _due(self, w: _Waiter, now: float) -> float:
        """When ``w`` must have started: ``queue_timeout`` after it arrived while the queue is
        dropping, else its deadline (``queue_timeout + queue_interval``)."""
        if self._dropping(now):
            return min(w.deadline, w.since + self.settings.queue_timeout)
        return w.deadline

    def _sojourn(self, waited: float, now: float) -> None:
        """CoDel's control law on one wait: above ``queue_timeout`` for ``queue_interval`` on end,
        the queue drops (waiters past the target fail, fronts shed early); it stops once no wait has
        been above the target for an interval (or the queue empties)."""
        settings = self.settings
        if waited <= settings.queue_timeout:
            self._above_since = 0.0
            self._dropping(now)
            return
        self._last_above = now
        if not self._above_since:
            self._above_since = now
        elif now - self._above_since >= settings.queue_interval:
            self._drop = True

    def _on_queue_timer(self) -> None:
        self._queue_timer = None
        self._drain()

    def _expire_head(self) -> None:
        """Remove the head waiter, failing it with Overloaded unless its caller gave up. One that
        waited out its whole deadline stood above the target for the interval: the queue drops."""
        w = self._waiters.popleft()
        if not w.outer.done():
            self.expired += 1
            now = self.clock()
            self._drop, self._last_above = True, now
            self._above_since = self._above_since or w.since
            waited = now - w.since
            w.outer.set_exception(Overloaded(f"no node could start the request within {waited:.3f}s"))

    def _drain(self, freed: Backend | None = None) -> None:
        """Start the oldest waiters still in time while a node is under its limit; fail the others
        that are out of time (``Overloaded``), or all of them when no node is eligible.

        ``freed``: the node that just answered. While it is still an eligible primary, every other
        eligible node was at its limit when the waiters queued (or a drain would have started
        them), so only it can take one; otherwise (a backup, or just ejected: the candidates may
        have changed) the whole cluster is looked at, as on the queue's timer and state changes."""
        waiters = self._waiters
        loop = self._loop
        if loop is None:
            return
        now = self.clock()
        if freed is not None and not self.states[freed.name].backup and self.eligible(freed, now):
            free = self._under_limit([freed])
        else:
            candidates = self.candidates(None, now)
            if not candidates:
                while waiters:
                    gone = waiters.popleft()
                    if not gone.outer.done():
                        gone.outer.set_exception(NoNodeAvailable("no node is up"))
                return
            free = self._under_limit(candidates)
        while waiters:
            w = waiters[0]
            if w.outer.done() or now >= self._due(w, now) - 1e-9:  # slack: timer and clock round apart
                self._expire_head()
                continue
            if not free:
                self._sojourn(now - w.since, now)  # the head still waits: its age counts too
                break
            waiters.popleft()
            self._sojourn(now - w.since, now)
            node = self._choose(free, w.affinity, now)
            self._attempt(loop, w.outer, node, w.op, w.args, w.affinity, True, w.note)
            free = self._under_limit(free)
        if not waiters:
            self._above_since = 0.0
        elif self._queue_timer is None:
            self._arm_queue_timer(now, QUEUE_TIMER_FLOOR)

    def _attempt(
        self,
        loop: asyncio.AbstractEventLoop,
        outer: asyncio.Future[tuple[str, Any]],
        node: Backend,
        op: str,
        args: dict[str, Any],
        affinity: str,
        first: bool,
        note: RequestNote | None,
    ) -> None:
        st = self.states[node.name]
        limit = self.limits[node.name]
        if note is not None:
            note.tried = node.name  # from here on the node may execute it, answer or not
        st.outstanding += 1
        st.requests += 1
        limit.peak = max(limit.peak, st.outstanding)
        epoch = limit.epoch
        started = self.clock()
        inner = node.submit(op, args)
        timer = loop.call_later(self.deadline, _expire, inner)

        def done(fut: asyncio.Future[tuple[str, Any]]) -> None:
            st.outstanding -= 1
            timer.cancel()
            self._completions += 1
            now = self.clock()
            cancelled = fut.cancelled()
            exc = None if cancelled else fut.exception()
            if exc is None:  # an answer, or none within the deadline: both are round-trip times
                limit.sample(now - started, epoch, now, self.settings)
                if not cancelled:
                    st.last_answer = now
            if not outer.done():  # else the caller gave up (connection closed)
                self._settle(loop, outer, fut, exc, node, op, args, affinity, first, note, now)
            if self._waiters:
                self._drain(node)  # a slot is free here (or its limit moved)

        inner.add_done_callback(done)

    def _settle(
        self,
        loop: asyncio.AbstractEventLoop,
        outer: asyncio.Future[tuple[str, Any]],
        fut: asyncio.Future[tuple[str, Any]],
        exc: BaseException | None,
        node: Backend,
        op: str,
        args: dict[str, Any],
        affinity: str,
        first: bool,
        note: RequestNote | None,
        now: float,
    ) -> None:
        """Complete ``outer`` from one attempt's outcome, or retry it once on another node."""
        error: BaseException
        if fut.cancelled():
            reason, error = f"no answer within {self.deadline:g}s", TimeoutError()
            st = self.states[node.name]
            if st.last_answer and now - st.last_answer < self.deadline:
                reason = SLOW  # the node answers others: overloaded, not failed
        elif exc is None:
            if note is not None:
                note.node = node.name
            outer.set_result(fut.result())
            return
        elif not isinstance(exc, NodeDown):
            outer.set_exception(exc)
            return
        else:
            reason, error = "transport or device error", exc
        self.report_failure(node, reason)
        # a dead node's requests are always retried (nothing lost); timeouts draw on the budget
        if not first or (isinstance(error, TimeoutError) and not self._retry_allowed()):
            outer.set_exception(error)
            return
        self.retries += 1
        try:  # admitted once: the retry is neither limited nor queued
            other = self.pick(affinity, exclude=node, shed=False)
        except NoNodeAvailable as no_node:
            outer.set_exception(no_node)
            return
        self._attempt(loop, outer, other, op, args, affinity, False, note)

    def _retry_allowed(self) -> bool:
        """Retry budget for timeouts (as Finagle's): each routed request earns ``RETRY_RATIO`` of a
        retry and each second ``RETRY_RESERVE`` more, up to ``RETRY_BURST`` saved; a retry spends one.
        A slow node's requests are retried elsewhere; an overload is not multiplied by retries.
        Requests of a node that died (``NodeDown``) are always retried."""
        now = self.clock()
        requests = sum(st.requests for st in self.states.values())
        earned = (requests - self._budget_requests) * RETRY_RATIO + (now - self._budget_at) * RETRY_RESERVE
        self._budget_requests, self._budget_at = requests, now
        self._budget = min(RETRY_BURST, self._budget + max(earned, 0.0))
        if self._budget < 1.0:
            self.retries_refused += 1
            return False
        self._budget -= 1.0
        return True

    def report_failure(self, node: Backend, reason: str) -> None:
        """Passive outlier detection: a transport error, timeout or device error on ``node``."""
        now = self.clock()
        st = self.states[node.name]
        st.errors_total += 1
        if not node.up:
            self.set_oper(node, OpState.DOWN, f"worker not running ({reason})")
            return
        if reason == SLOW:
            self.slow_timeouts += 1
            return
        if st.oper is OpState.DOWN or st.ejected(now):
            return  # one incident, one ejection
        if not any(n is not node and self.eligible(n, now) for n in self.nodes):
            if (held := self._quiet[node.name].due()) is not None:
                log.warning(
                    "node %s failed (%s) but is the last eligible node, not ejected (%d more held back)",
                    node.name, reason, held,
                )  # fmt: skip
            return
        span = st.eject(now, self.settings, reason)
        log.warning("node %s ejected for %gs: %s", node.name, span, reason)
