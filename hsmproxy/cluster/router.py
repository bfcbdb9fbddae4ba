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
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from hsmproxy.backend.client import NodeDown
from hsmproxy.cluster.state import AdminState, ClusterSettings, NodeState, OpState, StateChange
from hsmproxy.logs import LogThrottle

log = logging.getLogger("hsmproxy.cluster")


@dataclass(slots=True)
class RequestNote:
    """What serving one host command learned, for its audit record (never a field value): the node
    that answered ("" for an immediate answer) and the named keys it presented (id, check value)."""

    node: str = ""
    key_ids: tuple[tuple[str, str], ...] = ()


#: The note of the request served in this context: set by the listener (while an observer is
#: registered) around the dispatch, so the request's task carries it; None otherwise.
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


class Overloaded(NoNodeAvailable):
    """Every eligible node already has ``max_outstanding`` requests: the request is shed."""


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


class Router:
    """Chooses a node per operation, retries once elsewhere, ejects failing nodes."""

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
        #: Requests shed because every eligible node was at ``max_outstanding`` (overload).
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
        return changed

    def set_oper(self, node: Backend, state: OpState, reason: str) -> bool:
        """Set a node's operational state (health checks, worker loss); True if it changed."""
        changed = self.states[node.name].set_oper(state, reason, self.clock())
        if changed:
            log.warning("node %s is %s: %s", node.name, state.value, reason)
        return changed

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
        """The node for the next request (``shed``: :class:`Overloaded` when every node is full)."""
        now = self.clock()
        candidates = self.candidates(exclude, now)
        if not candidates:
            raise NoNodeAvailable("no node is up")
        states = self.states
        limit = self.settings.max_outstanding
        if shed and any(states[n.name].outstanding >= limit for n in candidates):
            candidates = [n for n in candidates if states[n.name].outstanding < limit]
            if not candidates:
                self.shed += 1
                raise Overloaded(f"every eligible node has {limit} requests outstanding")
        if len(candidates) == 1:
            return candidates[0]
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

        ``shed=False``: not refused when every node is at ``max_outstanding`` (internal work such as the
        audit trail's one batch in flight, which records answers already sent).
        """
        return await self.submit(op, args, affinity, shed=shed)

    def submit(
        self, op: str, args: dict[str, Any], affinity: str = "", *, shed: bool = True
    ) -> asyncio.Future[tuple[str, Any]]:
        """Like :meth:`execute`, as a future, without a task per request (the host-command path).

        The attempt is driven by callbacks: the node's future, one timer for the deadline, and a
        retry on another node from the callback. Fails with :class:`NoNodeAvailable` or
        ``TimeoutError`` when no node could answer.
        """
        loop = self._loop
        if loop is None or loop.is_closed():  # get_running_loop() is a getpid() call on Python 3.11
            loop = self._loop = asyncio.get_running_loop()
        outer: asyncio.Future[tuple[str, Any]] = loop.create_future()
        note = REQUEST_NOTE.get()  # a host command's audit note (read now: callbacks run elsewhere)
        if note is not None and self.gate is not None and not self.gate():
            outer.set_exception(AuditUnavailable("the audit trail cannot take records now"))
            return outer
        try:
            node = self.pick(affinity, shed=shed)
        except NoNodeAvailable as exc:
            outer.set_exception(exc)
            return outer
        self._attempt(loop, outer, node, op, args, affinity, True, note)
        return outer

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
        st.outstanding += 1
        st.requests += 1
        inner = node.submit(op, args)
        timer = loop.call_later(self.deadline, _expire, inner)

        def done(fut: asyncio.Future[tuple[str, Any]]) -> None:
            st.outstanding -= 1
            timer.cancel()
            if outer.done():  # the caller gave up (connection closed)
                return
            error: Exception
            if fut.cancelled():
                reason, error = f"no answer within {self.deadline:g}s", TimeoutError()
                if st.last_answer and self.clock() - st.last_answer < self.deadline:
                    reason = SLOW  # the node answers others: overloaded, not failed
            else:
                exc = fut.exception()
                if exc is None:
                    st.last_answer = self.clock()
                    if note is not None:
                        note.node = node.name
                    outer.set_result(fut.result())
                    return
                if not isinstance(exc, NodeDown):
                    outer.set_exception(exc)
                    return
                reason, error = "transport or device error", exc
            self.report_failure(node, reason)
            # a dead node's requests are always retried (nothing lost); timeouts draw on the budget
            if not first or (isinstance(error, TimeoutError) and not self._retry_allowed()):
                outer.set_exception(error)
                return
            self.retries += 1
            try:
                other = self.pick(affinity, exclude=node)
            except NoNodeAvailable as exc:
                outer.set_exception(exc)
                return
            self._attempt(loop, outer, other, op, args, affinity, False, note)

        inner.add_done_callback(done)

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
