"""``hsmproxy bench``: a load generator for host-command servers, and a raw echo server.

Closed loop (default): ``--connections C`` connections each keep ``--depth D`` requests in flight;
each chunk of answers sends as many new requests in one write. The measured window counts the
requests *sent* in it (answers that arrive after it, within the grace period, included).
Open loop (``--rate R``): request ``n`` of the run is due at ``start + n / R`` on connection
``n mod C``. The client wakes at most once per millisecond (``OPEN_LOOP_TICK``) and writes what is
due on each connection with ONE write per connection (two in the tick where phase 2 starts), from
pre-encoded parts. Latency is measured from each request's *intended* send time, so neither a
stalled server nor a late client can hide queueing delay (no coordinated omission); it therefore
includes the up to one tick a request waits for its batch. Requests are matched to answers by the
header, a per-connection rolling sequence number (a number still in flight is skipped over, so at
most ``10 ** header_length`` requests, capped at 100,000, are in flight per connection: beyond
that they are ``skipped``; with ``--header-length 0`` answers are matched in order).

What a run reports (``--json`` gives every field; the summary line the main ones):

* ``offered`` / ``offered_rate``: requests actually written in the measured window, next to
  ``rate`` (asked). ``sent`` is the same count (kept for existing readers).
* ``ok`` / ``errors`` / ``error_codes`` and the percentiles of the answered-ok (p50/p99/p99.9/max).
* ``unanswered``: written but not answered when the run ended, ``--grace`` seconds after the last
  scheduled request (a client timeout); ``offered == ok + errors + unanswered`` always.
* ``resets``: connections the server closed or reset; ``skipped``: requests due on such a
  connection (or with every sequence number of its connection in flight), never written.
* ``unmatched``: answers that matched no request in flight.
* ``send_lag_p99_ms`` / ``send_lag_max_ms`` (open loop): how late, behind its schedule, the client
  wrote the oldest request of a batch. More than a tick or two means the *client* is the
  bottleneck and the latencies include its own delay.
* ``client_cpu_us``: the client's CPU per request written (``time.process_time()`` from the first
  request to the end of the grace period over every request of the run, warm-up and all phases,
  summed over processes).

Flags beyond the connection shape:

* ``--processes N``: N client processes (multiprocessing, spawn), each with its share of the
  connections (and so of the rate: the schedule above is per connection, identical to one process's).
  Their results are merged exactly: counters summed, every latency sample kept, percentiles computed
  over the union. The processes start on one shared ``time.monotonic()`` instant (CLOCK_MONOTONIC
  is system-wide on Linux and macOS). Each process wakes every tick on its own, so use more than
  one only when ``offered_rate`` falls short of ``rate`` or the send lag grows.
* ``--timeline``: per-second buckets (by intended send time) with sent / ok / errors / unanswered /
  skipped and the p99 of the ok, in the JSON (``timeline``) and one summary line per second.
* ``--then-rate R2 --then-duration S2``: open loop only; right after the main phase the schedule
  goes on at R2 for S2 seconds (``then`` in the result: that phase's counters and percentiles).
  ``recovery_s`` is the start, in whole seconds after the switch, of the first second of phase 2
  whose p99 is under ``--recovery-p99-ms`` (default 10); ``recovery_held`` says whether every later
  second stayed under it. "p99 back under 10 ms within 2 s" reads ``recovery_s <= 2``.
* ``--warmup S`` (default 1): seconds sent before the measured window; ``--grace S`` (default 2).

Requests are valid commands under the public test LMK: ``CC`` with one hot key pair (``--keys
hot``) or a different key pair per request (``--keys cold``), and any other table command from
the conformance generators. ``hsmproxy bench --echo-server HOST:PORT`` runs the raw echo server:
same framing, answers every request with its header, response code and ``00`` and no work, which
is the ceiling any HSM front end on this machine can reach.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import random
import time
from array import array
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from protocols.framing import Framer, encode_frame
from protocols.hostcmd.envelope import response_code

#: Distinct CC requests (each with its own key pair) for ``--keys cold``.
COLD_REQUESTS = 65536
#: Modulus of the RSA key pair that EW/EY requests use (one key, like a scheme's signing key).
RSA_BITS = 2048
#: Open loop: the client wakes at most once per tick (or at the next due time) and sends what is due.
OPEN_LOOP_TICK = 0.001
#: Largest rolling sequence space per connection (headers longer than 5 digits are zero-padded).
MAX_SEQUENCES = 100_000
#: The clock of schedules and latencies; system-wide, so client processes share one start instant.
clock = time.monotonic


@dataclass
class BenchResult:
    """What one run measured (phase 1, the main phase; ``then`` holds phase 2)."""

    target: str
    command: str
    mode: str
    connections: int
    depth: int
    rate: float
    duration: float
    sent: int = 0
    ok: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    tps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    max_ms: float = 0.0
    #: Idle connections held open during the run (each answered one NC first).
    idle: int = 0
    processes: int = 1
    offered: int = 0
    offered_rate: float = 0.0
    unanswered: int = 0
    skipped: int = 0
    resets: int = 0
    unmatched: int = 0
    send_lag_p99_ms: float = 0.0
    send_lag_max_ms: float = 0.0
    client_cpu_us: float = 0.0
    then_rate: float = 0.0
    then_duration: float = 0.0
    then: dict[str, Any] | None = None
    recovery_p99_ms: float = 10.0
    recovery_s: int | None = None
    recovery_held: bool | None = None
    timeline: list[dict[str, Any]] | None = None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ascending ``sorted_values`` (nearest rank, rounded), 0 when empty."""
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def build_requests(command: str, count: int, keys: str = "hot", seed: int = 1) -> list[bytes]:
    """``count`` valid request bodies (command code + data) for ``command``."""
    if command == "CC":
        return _cc_requests(count, keys, seed)
    if command == "B2":
        return [b"B20010" + b"0123456789ABCDEF"] * count
    if command == "NC":
        return [b"NC"] * count
    from conformance.generators import GenContext, generate

    ctx = GenContext()
    if command in ("EW", "EY"):
        ctx.rsa_material(RSA_BITS)  # the field's asymmetric target is stated for RSA-2048
    return [generate(command, seed, i, ctx).request for i in range(count)]


def _cc_requests(count: int, keys: str, seed: int) -> list[bytes]:
    # Keys and PIN blocks come from the emulator's reference crypto (the public test LMK).
    from emulator.crypto.cipher import tdes_ecb_encrypt
    from emulator.crypto.lmk import TEST_LMK, adjust_parity, encrypt_key_under_lmk

    rng = random.Random(seed)

    def one(src: bytes, dst: bytes) -> bytes:
        pin = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 8)))
        account = "".join(rng.choice("0123456789") for _ in range(12))
        clear = bytes.fromhex(f"0{len(pin):X}{pin}".ljust(16, "F"))
        block = bytes(a ^ b for a, b in zip(clear, bytes.fromhex("0000" + account), strict=True))
        return (
            b"CC" + encrypt_key_under_lmk(TEST_LMK, "001", "U", src).encode()
            + encrypt_key_under_lmk(TEST_LMK, "001", "U", dst).encode() + b"12"
            + tdes_ecb_encrypt(src, block).hex().upper().encode() + b"0101" + account.encode()
        )  # fmt: skip

    if keys == "hot":
        src, dst = adjust_parity(rng.randbytes(16)), adjust_parity(rng.randbytes(16))
        return [one(src, dst) for _ in range(min(count, 512))]
    return [one(adjust_parity(rng.randbytes(16)), adjust_parity(rng.randbytes(16))) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# The plan, the tally and the result
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    """The schedule of one run, the same in every client process.

    Open loop: phase 1 holds requests ``0 .. phase1_requests`` (the first ``warmup_requests`` are
    not measured) at ``rate``; phase 2 ``then_requests`` more at ``then_rate`` right after.
    """

    connections: int
    depth: int = 1
    rate: float = 0.0
    duration: float = 10.0
    warmup: float = 1.0
    then_rate: float = 0.0
    then_duration: float = 0.0
    grace: float = 2.0

    @property
    def warmup_requests(self) -> int:
        """Open loop: requests of the warm-up."""
        return round(self.rate * self.warmup)

    @property
    def phase1_requests(self) -> int:
        """Open loop: requests of phase 1, warm-up included."""
        return self.warmup_requests + round(self.rate * self.duration)

    @property
    def then_requests(self) -> int:
        """Open loop: requests of phase 2."""
        return round(self.then_rate * self.then_duration) if self.then_rate else 0

    @property
    def window(self) -> float:
        """Seconds of phase 1's measured window (by intended send time)."""
        if self.rate:
            return (self.phase1_requests - self.warmup_requests) / self.rate
        return self.duration

    @property
    def then_window(self) -> float:
        """Seconds of phase 2."""
        return self.then_requests / self.then_rate if self.then_rate else 0.0

    @property
    def buckets(self) -> tuple[int, int]:
        """Per-second buckets of phase 1 and of phase 2 (the last of each may be partial)."""
        n2 = math.ceil(self.then_window - 1e-9) if self.then_requests else 0
        return max(1, math.ceil(self.window - 1e-9)), n2


class Tally:
    """What one client process counted, per second of intended send time; merges exactly.

    Buckets ``0 .. n1-1`` are phase 1 (seconds since the start of the measured window), ``n1 ..``
    phase 2 (seconds since the switch). ``ok`` keeps every latency (seconds) of an ok answer.
    """

    def __init__(self, n1: int, n2: int) -> None:
        nb = n1 + n2
        self.n1 = n1
        self.ok: list[array[float]] = [array("d") for _ in range(nb)]
        self.sent = [0] * nb
        self.errors = [0] * nb
        self.unanswered = [0] * nb
        self.skipped = [0] * nb
        self.error_codes: list[dict[str, int]] = [{}, {}]
        self.resets = 0
        self.unmatched = 0
        self.lags: array[float] = array("d")
        self.cpu_s = 0.0
        self.requests_total = 0
        self.processes = 1

    def merge(self, other: Tally) -> None:
        """Add ``other`` (another process's tally of the same plan) into this one."""
        if (other.n1, len(other.sent)) != (self.n1, len(self.sent)):
            raise ValueError("tallies of different plans")
        for b in range(len(self.sent)):
            self.ok[b].extend(other.ok[b])
            self.sent[b] += other.sent[b]
            self.errors[b] += other.errors[b]
            self.unanswered[b] += other.unanswered[b]
            self.skipped[b] += other.skipped[b]
        for mine, theirs in zip(self.error_codes, other.error_codes, strict=True):
            for code, n in theirs.items():
                mine[code] = mine.get(code, 0) + n
        self.resets += other.resets
        self.unmatched += other.unmatched
        self.lags.extend(other.lags)
        self.cpu_s += other.cpu_s
        self.requests_total += other.requests_total
        self.processes += other.processes


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 3)


def _phase_summary(tally: Tally, buckets: range, seconds: float) -> dict[str, Any]:
    samples: array[float] = array("d")
    for b in buckets:
        samples.extend(tally.ok[b])
    latencies = sorted(samples)
    ok = len(latencies)
    offered = sum(tally.sent[b] for b in buckets)
    return {
        "offered": offered,
        "offered_rate": round(offered / seconds, 1) if seconds else 0.0,
        "ok": ok,
        "errors": sum(tally.errors[b] for b in buckets),
        "unanswered": sum(tally.unanswered[b] for b in buckets),
        "skipped": sum(tally.skipped[b] for b in buckets),
        "tps": round(ok / seconds, 1) if seconds else 0.0,
        "p50_ms": _ms(percentile(latencies, 0.50)),
        "p99_ms": _ms(percentile(latencies, 0.99)),
        "p999_ms": _ms(percentile(latencies, 0.999)),
        "max_ms": _ms(latencies[-1] if latencies else 0.0),
    }


def summarize(
    result: BenchResult, tally: Tally, plan: LoadPlan, timeline: bool = False, recovery_p99_ms: float = 10.0
) -> BenchResult:
    """``result`` with every measured field filled in from ``tally`` (merged over processes)."""
    n1, n2 = plan.buckets
    main = _phase_summary(tally, range(n1), plan.window)
    result.duration = round(plan.window, 3)
    result.offered = result.sent = main["offered"]
    result.offered_rate = main["offered_rate"]
    for name in ("ok", "errors", "unanswered", "skipped", "tps", "p50_ms", "p99_ms", "p999_ms", "max_ms"):
        setattr(result, name, main[name])
    result.error_codes = dict(sorted(tally.error_codes[0].items()))
    result.processes = tally.processes
    result.resets = tally.resets
    result.unmatched = tally.unmatched
    lags = sorted(tally.lags)
    result.send_lag_p99_ms = _ms(percentile(lags, 0.99))
    result.send_lag_max_ms = _ms(lags[-1] if lags else 0.0)
    result.client_cpu_us = round(1e6 * tally.cpu_s / tally.requests_total, 2) if tally.requests_total else 0.0
    result.then_rate, result.then_duration = plan.then_rate, round(plan.then_window, 3)
    result.recovery_p99_ms = recovery_p99_ms
    result.then = result.recovery_s = result.recovery_held = result.timeline = None
    wanted = range(n1 + n2) if timeline else range(n1, n1 + n2)
    p99s = {b: percentile(sorted(tally.ok[b]), 0.99) for b in wanted}
    if n2:
        result.then = _phase_summary(tally, range(n1, n1 + n2), plan.then_window)
        result.then["error_codes"] = dict(sorted(tally.error_codes[1].items()))
        under = [bool(tally.ok[b]) and 1000 * p99s[b] < recovery_p99_ms for b in range(n1, n1 + n2)]
        if True in under:
            result.recovery_s = under.index(True)
            result.recovery_held = all(under[result.recovery_s :])
    if timeline:
        result.timeline = []
        for b in range(n1 + n2):
            second, phase_seconds = (b, plan.window) if b < n1 else (b - n1, plan.then_window)
            result.timeline.append(
                {
                    "phase": 1 if b < n1 else 2,
                    "second": second,
                    "span": round(min(1.0, phase_seconds - second), 3),
                    "sent": tally.sent[b],
                    "ok": len(tally.ok[b]),
                    "errors": tally.errors[b],
                    "unanswered": tally.unanswered[b],
                    "skipped": tally.skipped[b],
                    "p99_ms": _ms(p99s[b]),
                }
            )
    return result


# ---------------------------------------------------------------------------------------------
# Connections: the shared part, then host commands (the ISO 8583 driver has its own)
# ---------------------------------------------------------------------------------------------


class BenchConnection(asyncio.Protocol):
    """A plain connection: every framed answer goes to ``on_response`` (the idle connections)."""

    def __init__(self, on_response: Any) -> None:
        self.framer = Framer(65535)
        self.on_response = on_response
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for frame in self.framer.feed(data):
            self.on_response(frame)


class LoadConnection(asyncio.Protocol):
    """A load-generating connection: writes batches, matches answers to requests, records them.

    A driver subclasses it with ``write_batch`` (encode and write requests, register them in
    ``pending`` by match key) and ``data_received`` (frame answers, then ``record_answer`` each, or
    an inlined equivalent). ``index`` is the connection's place in the whole run, across processes.
    """

    def __init__(self, run: LoadRun, index: int) -> None:
        self.run = run
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.pending: dict[bytes, float] = {}
        self.rest = b""
        self.lost = False
        self.closing = False
        #: Open loop: how many of this connection's requests of phase 1 / phase 2 went out.
        self.done1 = 0
        self.done2 = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closing:
            self.run.tally.resets += 1

    def in_flight(self) -> int:
        """Requests written and not answered yet."""
        return len(self.pending)

    def in_flight_times(self) -> list[float]:
        """Intended send times of the requests written and not answered yet."""
        return list(self.pending.values())

    def writable(self) -> bool:
        """Whether a request can still be written on this connection."""
        return self.transport is not None and not self.lost and not self.transport.is_closing()

    def send(self, base: float, rate: float, n0: int, stride: int, count: int) -> None:
        """Write ``count`` requests, number ``n0 + i * stride`` intended at ``base + n / rate``."""
        skipped = self.write_batch(base, rate, n0, stride, count)
        self.run.add_sent(base, rate, n0, stride, count)
        for t in skipped:
            self.run.add_skipped(t)

    def write_batch(self, base: float, rate: float, n0: int, stride: int, count: int) -> list[float]:
        """Encode and write the requests in one write; the intended times of those not written."""
        raise NotImplementedError

    def record(self, t: float, code: str | None, now: float) -> None:
        """The answer, at ``now``, to the request intended at ``t``: ok (``code`` None) or an error code."""
        run = self.run
        if t >= run.t0:
            b = run.bucket(t)
            if code is None:
                run.tally.ok[b].append(now - t)
            else:
                run.error(b, code)

    def record_answer(self, key: bytes, code: str | None, now: float) -> bool:
        """Match one answer by ``key`` and record it (see ``record``); whether it matched a request."""
        t = self.pending.pop(key, None)
        if t is None:
            self.run.tally.unmatched += 1
            return False
        self.record(t, code, now)
        return True

    def answered(self, matched: int, now: float) -> None:
        """Closed loop: each matched answer sends the next request (in one write)."""
        if matched and not self.run.open_loop and now < self.run.ts and self.writable():
            self.send(now, 1.0, 0, 0, matched)


def _skipped_times(base: float, rate: float, n0: int, stride: int, count: int) -> list[float]:
    return [base + (n0 + i * stride) / rate for i in range(count)]


class HostCommandWire:
    """Host-command requests, pre-encoded: length prefixes, the header table, the bodies."""

    def __init__(self, bodies: Sequence[bytes], header_length: int, command: str) -> None:
        self.header_length = header_length
        self.bodies = list(bodies)
        self.prefixes = [(header_length + len(b)).to_bytes(2, "big") for b in self.bodies]
        cycle = min(10**header_length, MAX_SEQUENCES) if header_length else 0
        self.headers = [str(i).zfill(header_length).encode() for i in range(cycle)]
        code = response_code(command).encode()
        self.ok_codes = frozenset({code + b"00", code + b"01"})

    def connection(self, run: LoadRun, index: int) -> LoadConnection:
        """A connection of ``run`` (``index`` in the whole run) speaking these requests."""
        if self.header_length:
            return HostCommandConnection(run, index, self)
        return OrderedHostCommandConnection(run, index, self)


class HostCommandConnection(LoadConnection):
    """Host commands matched by header (the hot path: pre-encoded parts, byte-slice checks)."""

    def __init__(self, run: LoadRun, index: int, wire: HostCommandWire) -> None:
        super().__init__(run, index)
        self.wire = wire
        self.seq = 0
        # connections start at different places of the body list (cold keys stay cold)
        self.body_index = index * len(wire.bodies) // max(1, run.plan.connections)

    def _free_seq(self, seq: int) -> int:
        headers, pending = self.wire.headers, self.pending
        if len(pending) >= len(headers):
            return -1
        while headers[seq] in pending:
            seq = (seq + 1) % len(headers)
        return seq

    def write_batch(self, base: float, rate: float, n0: int, stride: int, count: int) -> list[float]:
        """Encode and write the requests in one write; the intended times of those not written."""
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return _skipped_times(base, rate, n0, stride, count)
        wire = self.wire
        pending, headers, prefixes, bodies = self.pending, wire.headers, wire.prefixes, wire.bodies
        last_seq, last_body = len(headers) - 1, len(bodies) - 1
        seq, bi = self.seq, self.body_index
        skipped: list[float] = []
        parts: list[bytes] = []
        add = parts.append
        n = n0
        for _ in range(count):
            t = base + n / rate
            n += stride
            seq = 0 if seq == last_seq else seq + 1
            header = headers[seq]
            # one dict operation: setdefault returns this very float only when the header was free
            if pending.setdefault(header, t) is not t:
                seq = self._free_seq(seq)
                if seq < 0:
                    skipped.append(t)
                    continue
                header = headers[seq]
                pending[header] = t
            add(prefixes[bi])
            add(header)
            add(bodies[bi])
            bi = 0 if bi == last_body else bi + 1
        self.seq, self.body_index = seq, bi
        if parts:
            transport.write(b"".join(parts))
        return skipped

    def data_received(self, data: bytes) -> None:
        now = clock()
        if self.rest:
            data = self.rest + data
        run = self.run
        tally = run.tally
        pending, hl, ok_codes = self.pending, self.wire.header_length, self.wire.ok_codes
        t0, ts, n1, last, oks = run.t0, run.ts, run.n1, run.last_bucket, tally.ok
        size, pos, matched = len(data), 0, 0
        # record_answer, inlined: this loop runs once per answer
        while size - pos >= 2:
            end = pos + 2 + ((data[pos] << 8) | data[pos + 1])
            if end > size:
                break
            h = pos + 2 + hl
            t = pending.pop(data[pos + 2 : h], None)
            pos = end
            if t is None:
                tally.unmatched += 1
                continue
            matched += 1
            if t >= t0:
                b = min(int(t - t0), n1 - 1) if t < ts else min(n1 + int(t - ts), last)
                if data[h : h + 4] in ok_codes:
                    oks[b].append(now - t)
                else:
                    run.error(b, data[h + 2 : h + 4].decode("latin-1"))
        self.rest = data[pos:] if pos < size else b""
        if matched and not run.open_loop:
            self.answered(matched, now)


class OrderedHostCommandConnection(LoadConnection):
    """Host commands without a header (``--header-length 0``): answers match requests in order."""

    def __init__(self, run: LoadRun, index: int, wire: HostCommandWire) -> None:
        super().__init__(run, index)
        self.wire = wire
        self.queue: deque[float] = deque()
        self.body_index = index * len(wire.bodies) // max(1, run.plan.connections)

    def in_flight(self) -> int:
        """Requests written and not answered yet."""
        return len(self.queue)

    def in_flight_times(self) -> list[float]:
        """Intended send times of the requests written and not answered yet."""
        return list(self.queue)

    def write_batch(self, base: float, rate: float, n0: int, stride: int, count: int) -> list[float]:
        """Encode and write the requests in one write; the intended times of those not written."""
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return _skipped_times(base, rate, n0, stride, count)
        wire, parts = self.wire, list[bytes]()
        for i in range(count):
            self.queue.append(base + (n0 + i * stride) / rate)
            parts += (wire.prefixes[self.body_index], wire.bodies[self.body_index])
            self.body_index = (self.body_index + 1) % len(wire.bodies)
        transport.write(b"".join(parts))
        return []

    def data_received(self, data: bytes) -> None:
        now = clock()
        if self.rest:
            data = self.rest + data
        size, pos, matched = len(data), 0, 0
        while size - pos >= 2:
            end = pos + 2 + ((data[pos] << 8) | data[pos + 1])
            if end > size:
                break
            code = data[pos + 2 : pos + 6]
            pos = end
            if not self.queue:
                self.run.tally.unmatched += 1
                continue
            matched += 1
            error = None if code in self.wire.ok_codes else code[2:].decode("latin-1")
            self.record(self.queue.popleft(), error, now)
        self.rest = data[pos:] if pos < size else b""
        self.answered(matched, now)


# ---------------------------------------------------------------------------------------------
# One process's run
# ---------------------------------------------------------------------------------------------


class Wire(Protocol):
    """A driver's requests and answers: makes the connections of a run (plain data, picklable)."""

    def connection(self, run: LoadRun, index: int) -> LoadConnection:
        """A connection of ``run``; ``index`` is its place in the whole run, across processes."""
        ...


class LoadRun:
    """One client process's side of a run: its connections, the schedule and the tally.

    ``wire.connection(run, index)`` makes the connections (host commands, or ISO 8583 from
    :mod:`hsmproxy.iso8583.bench`); ``indices`` are this process's connections in the whole run.
    """

    def __init__(self, plan: LoadPlan, wire: Wire, indices: Sequence[int] | None = None) -> None:
        self.plan = plan
        self.wire = wire
        self.indices = list(range(plan.connections) if indices is None else indices)
        self.open_loop = bool(plan.rate)
        self.n1, n2 = plan.buckets
        self.last_bucket = self.n1 + n2 - 1
        self.tally = Tally(self.n1, n2)
        self.conns: list[LoadConnection] = []
        self.begin(clock())

    def begin(self, start: float) -> None:
        """Fix the schedule: the run starts (warm-up first) at ``start``."""
        plan = self.plan
        self.start = start
        if self.open_loop:
            self.t0 = start + plan.warmup_requests / plan.rate
            self.ts = start + plan.phase1_requests / plan.rate
        else:
            self.t0 = start + plan.warmup
            self.ts = self.t0 + plan.duration
        self.sent1 = self.sent2 = 0  # open loop: requests of each phase due so far (whole run)

    def bucket(self, t: float) -> int:
        """The bucket of a measured intended send time ``t`` (``t >= t0``)."""
        if t < self.ts:
            return min(int(t - self.t0), self.n1 - 1)
        return min(self.n1 + int(t - self.ts), self.last_bucket)

    def error(self, b: int, code: str) -> None:
        """An error answer to a measured request of bucket ``b``."""
        self.tally.errors[b] += 1
        codes = self.tally.error_codes[0 if b < self.n1 else 1]
        codes[code] = codes.get(code, 0) + 1

    def add_sent(self, base: float, rate: float, n0: int, stride: int, count: int) -> None:
        """Count requests handed to ``write_batch`` into the buckets of their intended times."""
        if count <= 0:
            return
        self.tally.requests_total += count
        first, last = base + n0 / rate, base + (n0 + (count - 1) * stride) / rate
        if last < self.t0:
            return
        sent = self.tally.sent
        if first >= self.t0 and (b := self.bucket(first)) == self.bucket(last):
            sent[b] += count
            return
        for i in range(count):
            t = base + (n0 + i * stride) / rate
            if t >= self.t0:
                sent[self.bucket(t)] += 1

    def add_skipped(self, t: float) -> None:
        """A request counted as sent that was not written after all."""
        self.tally.requests_total -= 1
        if t >= self.t0:
            b = self.bucket(t)
            self.tally.sent[b] -= 1
            self.tally.skipped[b] += 1

    async def connect(self, host: str, port: int) -> None:
        """Open this process's connections."""
        loop = asyncio.get_running_loop()
        for index in self.indices:

            def factory(i: int = index) -> LoadConnection:
                return self.wire.connection(self, i)

            _, proto = await loop.create_connection(factory, host, port)
            self.conns.append(proto)

    def tick(self, now: float) -> bool:
        """Open loop: write what is due at ``now`` on every connection; True once all is sent."""
        plan = self.plan
        plan_connections = plan.connections
        lag_from: float | None = None
        n_all = plan.phase1_requests
        due = min(n_all, math.floor((now - self.start) * plan.rate) + 1) if now >= self.start else 0
        if due > self.sent1:
            lag_from = self.start + self.sent1 / plan.rate
            for conn in self.conns:
                j = conn.index
                k_due = (due - j + plan_connections - 1) // plan_connections if due > j else 0
                if k_due > conn.done1:
                    n0 = j + conn.done1 * plan_connections
                    conn.send(self.start, plan.rate, n0, plan_connections, k_due - conn.done1)
                    conn.done1 = k_due
            self.sent1 = due
        m_all = plan.then_requests
        if m_all and now >= self.ts:
            due2 = min(m_all, math.floor((now - self.ts) * plan.then_rate) + 1)
            if due2 > self.sent2:
                if lag_from is None:
                    lag_from = self.ts + self.sent2 / plan.then_rate
                for conn in self.conns:
                    j = conn.index
                    k_due = (due2 - j + plan_connections - 1) // plan_connections if due2 > j else 0
                    if k_due > conn.done2:
                        n0 = j + conn.done2 * plan_connections
                        conn.send(self.ts, plan.then_rate, n0, plan_connections, k_due - conn.done2)
                        conn.done2 = k_due
                self.sent2 = due2
        if lag_from is not None and lag_from >= self.t0:
            self.tally.lags.append(now - lag_from)
        return self.sent1 == n_all and self.sent2 == m_all

    def next_due(self) -> float:
        """Open loop: the intended time of the next request not yet written."""
        plan = self.plan
        if self.sent1 < plan.phase1_requests:
            return self.start + self.sent1 / plan.rate
        return self.ts + self.sent2 / plan.then_rate if plan.then_rate else self.ts

    async def drive(self, start: float | None = None) -> Tally:
        """Run the schedule from ``start`` (now by default), wait out the grace period, close."""
        now = clock()
        if start is not None and start > now:
            await asyncio.sleep(start - now)
        self.begin(clock() if start is None else start)
        cpu0 = time.process_time()
        if self.open_loop:
            while not self.tick(now := clock()):
                # Wake at most once a millisecond and send what is due: a timer below the loop's 1 ms
                # resolution fires at once, and the client would spin a whole core it shares with the
                # server. Latency still counts from each request's intended time.
                await asyncio.sleep(max(self.next_due() - now, OPEN_LOOP_TICK))
        else:
            for conn in self.conns:
                if conn.writable():
                    conn.send(self.start, 1.0, 0, 0, self.plan.depth)
            await asyncio.sleep(max(0.0, self.ts - clock()))
        deadline = clock() + self.plan.grace
        while any(c.in_flight() for c in self.conns if not c.lost) and clock() < deadline:
            await asyncio.sleep(0.01)
        self.tally.cpu_s = time.process_time() - cpu0
        for conn in self.conns:
            for t in conn.in_flight_times():
                if t >= self.t0:
                    self.tally.unanswered[self.bucket(t)] += 1
            conn.closing = True
            if conn.transport is not None:
                conn.transport.close()
        return self.tally


# ---------------------------------------------------------------------------------------------
# Several client processes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientJob:
    """What one client process runs (picklable: the wire is plain data)."""

    host: str
    port: int
    plan: LoadPlan
    wire: Wire
    indices: tuple[int, ...]


def connection_shares(connections: int, processes: int) -> list[tuple[int, ...]]:
    """The connection indices of each of ``processes`` client processes (as even as can be)."""
    return [tuple(range(p, connections, processes)) for p in range(processes)]


def _event_loop_run(main: Coroutine[Any, Any, Tally]) -> Tally:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(main)
    result: Tally = uvloop.run(main)
    return result


async def _client_main(pipe: Any, job: ClientJob) -> Tally:
    run = LoadRun(job.plan, job.wire, job.indices)
    await run.connect(job.host, job.port)
    pipe.send(("ready", None))
    start_at = pipe.recv()  # blocks this process's loop, which has nothing else to do yet
    return await run.drive(start_at)


def client_process(pipe: Any, job: ClientJob) -> None:
    """Entry point of one client process: connect, report ready, run from the given start."""
    try:
        tally = _event_loop_run(_client_main(pipe, job))
    except BaseException as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    pipe.send(("done", tally))


def run_processes(host: str, port: int, plan: LoadPlan, wire: Wire, processes: int) -> Tally:
    """Run ``plan`` over ``processes`` client processes from one start instant; the merged tally."""
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    try:
        for indices in connection_shares(plan.connections, processes):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=client_process, args=(theirs, ClientJob(host, port, plan, wire, indices)), daemon=True
            )
            proc.start()
            theirs.close()
            pipes.append(mine)
            procs.append(proc)
        for pipe, proc in zip(pipes, procs, strict=True):
            _expect(pipe, proc, "ready", 120.0)
        start_at = clock() + 0.2  # every process is connected and waiting on its pipe
        for pipe in pipes:
            pipe.send(start_at)
        run_seconds = plan.warmup + plan.duration + plan.then_window + plan.grace + 120.0
        merged: Tally | None = None
        for pipe, proc in zip(pipes, procs, strict=True):
            tally: Tally = _expect(pipe, proc, "done", run_seconds)
            if merged is None:
                merged = tally
            else:
                merged.merge(tally)
        assert merged is not None
        return merged
    finally:
        for pipe in pipes:
            pipe.close()
        for proc in procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def _expect(pipe: Any, proc: Any, kind: str, timeout: float) -> Any:
    deadline = clock() + timeout
    while not pipe.poll(0.2):
        if not proc.is_alive() and not pipe.poll(0):
            raise RuntimeError(f"a client process exited (code {proc.exitcode}) before {kind!r}")
        if clock() > deadline:
            raise RuntimeError(f"a client process sent no {kind!r} within {timeout:.0f} s")
    try:
        got, value = pipe.recv()
    except EOFError:  # the process ended without a word (it printed its traceback)
        raise RuntimeError(f"a client process exited before {kind!r}") from None
    if got != kind:
        raise RuntimeError(f"a client process failed: {value}")
    return value


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def check_options(
    command: str,
    connections: int,
    processes: int = 1,
    rate: float = 0.0,
    then_rate: float = 0.0,
    then_duration: float = 0.0,
    idle: int = 0,
) -> None:
    """Raise ValueError (worded for the command line) when the options do not make a run."""
    if connections < 1:
        raise ValueError("--connections must be 1 or more")
    if not 1 <= processes <= connections:
        raise ValueError("--processes must be between 1 and --connections")
    if rate < 0 or then_rate < 0:
        raise ValueError("rates must not be negative")
    if then_rate and not rate:
        raise ValueError("--then-rate needs an open-loop main phase (--rate)")
    if bool(then_rate) != (then_duration > 0):
        raise ValueError("--then-rate and --then-duration go together")
    if idle and command == "iso":
        raise ValueError("--idle holds host-command connections (NC); not with --command iso")


async def run_bench(
    host: str,
    port: int,
    command: str = "CC",
    connections: int = 8,
    depth: int = 1,
    rate: float = 0.0,
    duration: float = 10.0,
    header_length: int = 4,
    keys: str = "hot",
    warmup: float = 1.0,
    idle: int = 0,
    processes: int = 1,
    then_rate: float = 0.0,
    then_duration: float = 0.0,
    grace: float = 2.0,
    timeline: bool = False,
    recovery_p99_ms: float = 10.0,
) -> BenchResult:
    """Run one measurement and return its result.

    ``idle`` extra connections are opened first, each answers one ``NC``, and they stay open and
    silent for the whole run (memory per connection; a busy server among many idle clients).
    ``command = "iso"``: an ISO 8583 listener, 0200 with PIN + MAC translation (hsmproxy.iso8583.bench).
    """
    check_options(command, connections, processes, rate, then_rate, then_duration, idle)
    plan = LoadPlan(connections, depth, rate, duration, warmup, then_rate, then_duration, grace)
    if command == "iso":
        from hsmproxy.iso8583.bench import iso_wire

        wire: Wire = iso_wire()
    else:
        # cold: more distinct key pairs than two nodes' key caches hold (2 x 4,096 handles), so every
        # request really brings two new working keys into a token
        bodies = build_requests(command, COLD_REQUESTS if keys == "cold" else 512, keys)
        wire = HostCommandWire(bodies, header_length, command)
    result = BenchResult(
        f"{host}:{port}", command, "open" if rate else "closed", connections, depth, rate, duration
    )
    idle_conns = await _open_idle(host, port, idle, header_length)
    result.idle = len(idle_conns)
    try:
        if processes > 1:
            tally = await asyncio.to_thread(run_processes, host, port, plan, wire, processes)
        else:
            run = LoadRun(plan, wire)
            await run.connect(host, port)
            tally = await run.drive()
    finally:
        for c in idle_conns:
            if c.transport is not None:
                c.transport.close()
    return summarize(result, tally, plan, timeline, recovery_p99_ms)


def _first_answer(fut: asyncio.Future[bytes]) -> Any:
    """A response handler that resolves ``fut`` with the first frame."""

    def on_response(frame: bytes) -> None:
        if not fut.done():
            fut.set_result(frame)

    return on_response


async def _open_idle(host: str, port: int, count: int, header_length: int) -> list[BenchConnection]:
    """``count`` connections that each answered one NC (in batches, so a backlog never overflows)."""
    loop = asyncio.get_running_loop()
    opened: list[BenchConnection] = []
    for first in range(0, count, 100):
        answers: list[asyncio.Future[bytes]] = []
        for _ in range(first, min(count, first + 100)):
            answer: asyncio.Future[bytes] = loop.create_future()
            answers.append(answer)

            def factory(a: asyncio.Future[bytes] = answer) -> BenchConnection:
                return BenchConnection(_first_answer(a))

            _, proto = await loop.create_connection(factory, host, port)
            assert proto.transport is not None
            proto.transport.write(encode_frame(b"0" * header_length + b"NC"))
            opened.append(proto)
        for frame in await asyncio.wait_for(asyncio.gather(*answers), 30):
            if frame[header_length : header_length + 4] != b"ND00":
                raise RuntimeError(f"an idle connection's NC was answered {frame[header_length:][:4]!r}")
    return opened


class _Echo(asyncio.Protocol):
    def __init__(self, header_length: int) -> None:
        self.framer = Framer(65535)
        self.hl = header_length
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        out = bytearray()
        hl = self.hl
        for frame in self.framer.feed(data):
            code = frame[hl : hl + 2].decode("latin-1") or "ZZ"
            out += encode_frame(frame[:hl] + response_code(code).encode("latin-1") + b"00")
        if out and self.transport is not None:
            self.transport.write(bytes(out))


async def echo_server(
    host: str,
    port: int,
    header_length: int = 4,
    stop: asyncio.Event | None = None,
    bound: asyncio.Future[int] | None = None,
) -> None:
    """Serve the raw echo responder until cancelled (or ``stop`` is set); ``bound`` gets the port
    it listens on (port 0: an ephemeral one)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Echo(header_length), host, port, reuse_address=True)
    if bound is not None:
        bound.set_result(server.sockets[0].getsockname()[1])
    async with server:
        await (stop.wait() if stop is not None else asyncio.Event().wait())


def format_result(r: BenchResult, as_json: bool) -> str:
    """The result as JSON or a summary: one line, then one per timeline second."""
    if as_json:
        return json.dumps(asdict(r), sort_keys=True)
    line = (
        f"{r.target} {r.command} {r.mode} c={r.connections} d={r.depth}"
        f"{f' rate={r.rate:g}/s' if r.rate else ''}{f' processes={r.processes}' if r.processes > 1 else ''}: "
        f"{r.tps:,.0f} TPS, p50 {r.p50_ms} ms, p99 {r.p99_ms} ms, "
        f"p99.9 {r.p999_ms} ms, errors {r.errors} {r.error_codes or ''}"
        f", offered {r.offered:,} ({r.offered_rate:,.0f}/s), unanswered {r.unanswered}, resets {r.resets}"
        f"{f', skipped {r.skipped}' if r.skipped else ''}"
        f"{f', unmatched {r.unmatched}' if r.unmatched else ''}"
        f"{f', send lag p99 {r.send_lag_p99_ms} ms max {r.send_lag_max_ms} ms' if r.rate else ''}"
        f", client CPU {r.client_cpu_us} us/request"
        f"{f', {r.idle} idle connections held' if r.idle else ''}"
    )
    lines = [line]
    if r.then is not None:
        t = r.then
        recovery = (
            f"p99 < {r.recovery_p99_ms:g} ms from second {r.recovery_s} after the switch"
            f"{'' if r.recovery_held else ' (not held)'}"
            if r.recovery_s is not None
            else f"p99 never under {r.recovery_p99_ms:g} ms"
        )
        lines.append(
            f"  then rate={r.then_rate:g}/s for {r.then_duration:g} s: {t['tps']:,.0f} TPS, "
            f"p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms, errors {t['errors']} {t['error_codes'] or ''}, "
            f"offered {t['offered']:,} ({t['offered_rate']:,.0f}/s), unanswered {t['unanswered']}; {recovery}"
        )
    for b in r.timeline or ():
        lines.append(
            f"  phase {b['phase']} second {b['second']}: sent {b['sent']:,} ok {b['ok']:,} "
            f"errors {b['errors']} unanswered {b['unanswered']}"
            + (f" skipped {b['skipped']}" if b["skipped"] else "")
            + f" p99 {b['p99_ms']} ms"
        )
    return "\n".join(lines)
