"""Adaptive concurrency limit of one node, from measured round-trip times.

Gradient-style, as Netflix's Gradient2 and Envoy's adaptive concurrency filter: the router measures
every request's RTT (node submit -> answer, front event-loop lag included) and aggregates answers
in windows; at the end of a window the limit moves by

    gradient = clamp(limit_tolerance * rtt_noload / rtt_recent, 0.5, 1.0)
    estimate = limit * gradient + sqrt(limit)
    limit   += 0.5 * (estimate - limit),    bounded to [min_limit, max_outstanding]

so it grows by about ``sqrt(limit) / 2`` a window while the RTT stays within ``limit_tolerance`` x
the no-load RTT, and shrinks (by a quarter a window at most) once queueing inflates the RTT past
it. The limit does not grow while fewer than half of it were in use during the window (there is
no evidence that more would help: it would only drift up and let the next burst queue).

**Windows** are ``2 x limit`` answers (at least 16: about two round trips, as TCP Vegas acts once
per RTT), or one second with at least 4 answers, so a slow node still adapts.

**The no-load RTT** (``rtt_noload``) is *measured*, as Envoy's minRTT: a **probe** holds the node
at ``min_limit`` requests for ``2 x min_limit`` answers and takes their mean. A probe runs at
start-up, when a node comes back UP, every ``probe_interval`` seconds (+-20 % jitter, per node),
and after 5 windows in a row at ``min_limit``. Between probes it only moves down (a window run at
``min_limit`` or more that was faster). Not Gradient2's long-window average: under sustained
saturation that average climbs with the queue it should detect, and the limit drifts up to the
cap (the 256-deep queues this replaces). Why probe at ``min_limit`` rather than at 1: the floor is
where the limit sits under node-bound overload, so holding a node there for a probe costs
nothing then, and the probe after 5 windows at the floor is what re-learns the baseline when the
RTT rose for good (the front's own event-loop lag at saturation, or a mix of dearer commands);
a probe at 1 would cost throughput exactly when the limit is already low.

What the no-load RTT means here: the RTT at ``min_limit`` requests in flight. The worker batches,
so a node-bound worker at ``min_limit`` already runs ``min_limit`` operations per round trip; the
limit then settles near ``limit_tolerance x min_limit`` plus headroom (about 40 for the defaults),
i.e. the node's own queue adds at most about one no-load RTT. When the front is the bottleneck the
no-load RTT is mostly event-loop lag, which a larger batch barely lengthens, and the limit grows
until the batches do: large batches are what make the front cheaper per request.

**Mixed commands**: a cheap PIN translation (~50 us in the token) and an RSA-2048 signature
(~1 ms) share batches, so a request's RTT is its batch's cost, not its own, and normalising per
command would not remove that; instead the tolerance is wide (2x, against Envoy's 1.25x), a
mix that turns dearer shrinks the limit towards the floor (where every command class still keeps
the worker busy), and the probe after 5 windows at the floor re-measures the baseline for the new
mix; a mix that turns cheaper lowers the no-load RTT at once.

This module does no I/O and reads no clock: the router passes times in (its own clock).
"""

from __future__ import annotations

import math
import random

from hsmproxy.cluster.state import ClusterSettings

#: A window closes after ``WINDOW_ROUNDS x limit`` answers, at least ``MIN_WINDOW_SAMPLES`` ...
WINDOW_ROUNDS = 2
MIN_WINDOW_SAMPLES = 16
#: ... or after ``WINDOW_SPAN`` seconds with at least ``MIN_SPAN_SAMPLES`` answers.
WINDOW_SPAN = 1.0
MIN_SPAN_SAMPLES = 4
#: A probe takes ``PROBE_ROUNDS x min_limit`` answers (at least ``MIN_PROBE_SAMPLES``).
PROBE_ROUNDS = 2
MIN_PROBE_SAMPLES = 8
#: Lowest gradient (largest decrease before smoothing) per window, as Gradient2.
MIN_GRADIENT = 0.5
#: Share of the new estimate taken per window.
SMOOTHING = 0.5
#: Consecutive windows at ``min_limit`` after which the no-load RTT is re-measured (Envoy's 5).
FLOOR_WINDOWS = 5
#: Probe interval jitter, as a fraction either way.
PROBE_JITTER = 0.2


def limit_bounds(settings: ClusterSettings) -> tuple[int, int]:
    """(floor, ceiling) of the adaptive limit: ``min_limit`` and ``max_outstanding`` (floor <= ceiling)."""
    ceiling = max(1, settings.max_outstanding)
    return max(1, min(settings.min_limit, ceiling)), ceiling


class NodeLimit:
    """The adaptive concurrency limit of one node.

    The router reads :attr:`current` (the limit in force now), keeps :attr:`peak` up to date when
    it starts a request, and reports every answer with :meth:`sample` (RTT, the :attr:`epoch` the
    request started in). Metrics read :attr:`current`, :attr:`estimate`, :attr:`rtt_noload`,
    :attr:`rtt_recent`, :attr:`probing`, :attr:`windows` and :attr:`probes`.
    """

    __slots__ = (
        "_count",
        "_due",
        "_floor_windows",
        "_next_probe",
        "_opened",
        "_rng",
        "_sum",
        "current",
        "epoch",
        "estimate",
        "peak",
        "probes",
        "probing",
        "rtt_noload",
        "rtt_recent",
        "windows",
    )

    def __init__(self, name: str, settings: ClusterSettings, now: float) -> None:
        floor, ceiling = limit_bounds(settings)
        #: The adaptive estimate (fractional): :attr:`current` is its integer part (the floor while probing).
        self.estimate = float(min(ceiling, 2 * floor))
        #: Requests the node may have outstanding now (admission stops there).
        self.current = floor
        #: Measuring the no-load RTT: the node is held at ``min_limit``. A probe runs first.
        self.probing = True
        #: Changes when a probe starts or ends: answers of requests started before are not counted.
        self.epoch = 0
        #: Mean RTT at ``min_limit`` in flight (s; 0 until the first probe) and of the last window.
        self.rtt_noload = 0.0
        self.rtt_recent = 0.0
        #: Most requests outstanding on the node when one of this window's requests started.
        self.peak = 0
        #: Windows closed and probes completed (lifetime).
        self.windows = 0
        self.probes = 0
        self._sum = 0.0
        self._count = 0
        self._opened = now
        self._due = 0
        self._floor_windows = 0
        self._rng = random.Random(name)  # per-node jitter, reproducible
        self._next_probe = 0.0
        self._recount(settings)

    def sample(self, rtt: float, epoch: int, now: float, settings: ClusterSettings) -> None:
        """Count one answer: ``rtt`` seconds for a request started in ``epoch``; may close a window."""
        if epoch != self.epoch:
            return
        self._sum += rtt
        self._count += 1
        n = self._count
        if n < self._due and (n < MIN_SPAN_SAMPLES or now - self._opened < WINDOW_SPAN):
            return
        if self.probing:
            self._end_probe(now, settings)
        else:
            self._close_window(now, settings)

    def request_probe(self, now: float, settings: ClusterSettings) -> None:
        """Re-measure the no-load RTT from the next requests (a node back UP: a new worker, cold caches)."""
        if not self.probing:
            self._begin_probe(now, settings)

    # -- internals --------------------------------------------------------------------------------

    def _close_window(self, now: float, settings: ClusterSettings) -> None:
        rtt = self._sum / self._count
        peak = self.peak
        self.rtt_recent = rtt
        self.windows += 1
        floor, ceiling = limit_bounds(settings)
        if peak >= floor and 0.0 < rtt < self.rtt_noload:
            self.rtt_noload = rtt  # faster than the baseline at no less concurrency: it was stale
        limit = self.estimate
        if rtt > 0.0 and self.rtt_noload > 0.0:
            gradient = min(1.0, max(MIN_GRADIENT, settings.limit_tolerance * self.rtt_noload / rtt))
        else:
            gradient = 1.0  # no measurable RTT (a clock that stood still): no evidence of queueing
        estimate = limit * gradient + math.sqrt(limit)
        if peak < limit / 2:
            estimate = min(estimate, limit)  # demand did not press on the limit: never grow
        limit += SMOOTHING * (estimate - limit)
        self.estimate = min(float(ceiling), max(float(floor), limit))
        self._floor_windows = self._floor_windows + 1 if self.estimate < floor + 1 else 0
        if self._floor_windows >= FLOOR_WINDOWS or now >= self._next_probe:
            self._begin_probe(now, settings)
            return
        self._open(now, settings)

    def _begin_probe(self, now: float, settings: ClusterSettings) -> None:
        self.probing = True
        self.epoch += 1
        self._floor_windows = 0
        self._open(now, settings)

    def _end_probe(self, now: float, settings: ClusterSettings) -> None:
        rtt = self._sum / self._count
        self.rtt_noload = self.rtt_recent = rtt
        self.probes += 1
        self.probing = False
        self.epoch += 1
        jitter = 1.0 + self._rng.uniform(-PROBE_JITTER, PROBE_JITTER)
        self._next_probe = now + settings.probe_interval * jitter
        self._open(now, settings)

    def _open(self, now: float, settings: ClusterSettings) -> None:
        self._sum = 0.0
        self._count = 0
        self.peak = 0
        self._opened = now
        self._recount(settings)

    def _recount(self, settings: ClusterSettings) -> None:
        floor, ceiling = limit_bounds(settings)
        self.estimate = min(float(ceiling), max(float(floor), self.estimate))
        if self.probing:
            self.current = floor
            self._due = max(MIN_PROBE_SAMPLES, PROBE_ROUNDS * floor)
        else:
            self.current = int(self.estimate)
            self._due = max(MIN_WINDOW_SAMPLES, WINDOW_ROUNDS * self.current)
