"""Node states in HAProxy's vocabulary, with the reason and time of every change.

Two independent dimensions, as in HAProxy:

* the **admin state**, set by an operator (console ``SET NODE``): ``READY`` takes new requests,
  ``DRAIN`` takes no new requests but lets its in-flight ones finish, ``MAINT`` takes nothing;
* the **operational state**, set by the proxy: ``UP`` or ``DOWN`` (active health checks with
  ``fall``/``rise``, or the worker process gone).

On top of those, passive outlier detection (Envoy's term) may **eject** an UP node for a while
after a transport error, a timeout or a device error; the ejection time doubles with every
ejection (``base_ejection_time`` x 2^(n-1), capped at ``max_ejection_time``) and the multiplier
resets once the node has gone ``max_ejection_time`` without being ejected.

A node that comes back UP (or out of an ejection) ramps its weight over ``slowstart`` seconds,
so a cold node (empty key-handle cache) is not flooded at once.

Every change is appended to a bounded per-node history: (wall time, what, from, to, reason).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

#: How many state changes each node remembers.
HISTORY_SIZE = 64
#: Floor of the slow-start weight fraction, so a recovering node gets some traffic at once.
SLOWSTART_FLOOR = 0.05


class AdminState(enum.Enum):
    """Operator-set state."""

    READY = "READY"
    DRAIN = "DRAIN"
    MAINT = "MAINT"


class OpState(enum.Enum):
    """Proxy-observed state."""

    UP = "UP"
    DOWN = "DOWN"


@dataclass(frozen=True, slots=True)
class StateChange:
    """One recorded change: ``what`` is ``admin``, ``oper`` or ``eject``."""

    at: float
    what: str
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """Health-check, outlier-detection and balancing parameters (the ``[cluster]`` section)."""

    inter: float = 2.0
    fall: int = 3
    rise: int = 2
    timeout: float = 1.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    slowstart: float = 0.0
    affinity_spill: int = 32
    #: Hard cap on the requests a node may have outstanding (the adaptive limit's ceiling); only
    #: internal work (``shed=False``) and retries go beyond it.
    max_outstanding: int = 256
    #: Admission (:mod:`hsmproxy.cluster.admission`): the adaptive per-node limit's floor, how much RTT
    #: inflation over the no-load RTT it accepts, and how often the no-load RTT is re-measured (s).
    min_limit: int = 16
    limit_tolerance: float = 2.0
    probe_interval: float = 5.0
    #: A request that finds every eligible node at its limit waits (FIFO, router-wide, among at most
    #: ``max_queue`` others) at most ``queue_timeout + queue_interval`` seconds, and once waits have
    #: stood above ``queue_timeout`` for ``queue_interval`` (CoDel's target and interval: a standing
    #: queue) at most ``queue_timeout``; then it is answered ``41``.
    queue_timeout: float = 0.010
    queue_interval: float = 0.1
    max_queue: int = 1024


@dataclass(slots=True)
class NodeState:
    """Routing state of one node. Times are ``time.monotonic()`` except history (wall clock)."""

    name: str
    weight: int = 1
    backup: bool = False
    admin: AdminState = AdminState.READY
    oper: OpState = OpState.DOWN
    #: Requests the router has sent to this node and not yet seen finish.
    outstanding: int = 0
    #: Requests the router has sent to this node (health checks not counted).
    requests: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    ejection_level: int = 0
    last_ejection: float = 0.0
    last_ejection_end: float = 0.0
    #: When the node last became UP / left an ejection (slow start counts from here); 0: no ramp.
    ramp_from: float = 0.0
    check_failures: int = 0
    check_successes: int = 0
    #: Lifetime counters (metrics): failures seen by the router (transport, timeout, device) and
    #: failed active health checks.
    errors_total: int = 0
    check_failures_total: int = 0
    #: ``clock()`` of the node's last answer to a routed request (0: none yet). A node that answers
    #: is slow under load, not dead: its timeouts do not eject it, its check timeouts do not fail.
    last_answer: float = 0.0
    history: deque[StateChange] = field(default_factory=lambda: deque(maxlen=HISTORY_SIZE))

    def _record(self, what: str, old: str, new: str, reason: str) -> None:
        self.history.append(StateChange(time.time(), what, old, new, reason))

    @property
    def last_change(self) -> StateChange | None:
        """The most recent change, if any."""
        return self.history[-1] if self.history else None

    def set_admin(self, state: AdminState, reason: str) -> bool:
        """Set the admin state; True if it changed."""
        if state is self.admin:
            return False
        self._record("admin", self.admin.value, state.value, reason)
        self.admin = state
        return True

    def set_oper(self, state: OpState, reason: str, now: float | None = None) -> bool:
        """Set the operational state; True if it changed. Coming UP starts slow start, clears ejection."""
        if state is self.oper:
            return False
        now = time.monotonic() if now is None else now
        self._record("oper", self.oper.value, state.value, reason)
        self.oper = state
        self.check_failures = self.check_successes = 0
        if state is OpState.UP:
            self.ramp_from = now
            if self.ejected_until > now:
                self.ejected_until = 0.0
                self._record("eject", "EJECTED", "-", "health checks passed")
        return True

    def ejected(self, now: float) -> bool:
        """True while an ejection is in force."""
        return now < self.ejected_until

    def eject(self, now: float, settings: ClusterSettings, reason: str) -> float:
        """Eject for a doubling back-off; returns the ejection time in seconds."""
        if self.last_ejection and now - self.last_ejection_end > settings.max_ejection_time:
            self.ejection_level = 0  # a long quiet period forgives earlier ejections
        self.ejection_level += 1
        span = self._span(settings)
        self.ejections += 1
        self.last_ejection = now
        self.last_ejection_end = self.ejected_until = now + span
        self.ramp_from = self.ejected_until
        self._record("eject", "-", "EJECTED", f"{reason} ({span:g}s)")
        return span

    def _span(self, settings: ClusterSettings) -> float:
        level = max(self.ejection_level, 1)
        return float(min(settings.base_ejection_time * 2 ** min(level - 1, 30), settings.max_ejection_time))

    def serving(self, now: float) -> bool:
        """READY, UP and not ejected: may take new requests."""
        return self.admin is AdminState.READY and self.oper is OpState.UP and not self.ejected(now)

    def effective_weight(self, now: float, slowstart: float) -> float:
        """The configured weight, ramped linearly over ``slowstart`` seconds after recovery."""
        if slowstart <= 0 or not self.ramp_from or now >= self.ramp_from + slowstart:
            return float(self.weight)
        fraction = max((now - self.ramp_from) / slowstart, SLOWSTART_FLOOR)
        return self.weight * fraction

    def status(self, now: float) -> str:
        """One word for tables: UP, DOWN or EJECTED."""
        if self.oper is OpState.DOWN:
            return "DOWN"
        if self.ejected(now):
            return "EJECTED"
        return "UP"
