"""hsmproxy bench: the schedule, matching and merging math (simulated clock, synthetic samples), and
runs against its own raw echo server and against servers that drop, close or refuse on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import iso8583
import pytest

from hsmproxy import bench
from hsmproxy.bench import (
    BenchResult,
    HostCommandWire,
    LoadPlan,
    LoadRun,
    Tally,
    check_options,
    connection_shares,
    echo_server,
    format_result,
    percentile,
    run_bench,
    summarize,
)
from hsmproxy.iso8583.bench import build_requests as iso_requests
from hsmproxy.iso8583.bench import run_iso_bench, stan_at, stan_path
from hsmproxy.iso8583.codec import load_spec
from protocols.framing import Framer, encode_frame

# --------------------------------------------------------------------------------------------
# helpers: servers on an ephemeral loopback port, stopped by the test
# --------------------------------------------------------------------------------------------


def _against_echo(header_length: int = 4, **kwargs: Any) -> BenchResult:
    async def go() -> BenchResult:
        stop = asyncio.Event()
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        server = asyncio.ensure_future(echo_server("127.0.0.1", 0, header_length, stop, bound))
        try:
            port = await bound
            return await run_bench("127.0.0.1", port, header_length=header_length, **kwargs)
        finally:
            stop.set()
            await server

    return asyncio.run(go())


def _against(
    protocol: Callable[[], asyncio.Protocol], run: Callable[[int], Awaitable[BenchResult]]
) -> BenchResult:
    """``run(port)`` against a server of ``protocol`` on an ephemeral loopback port."""

    async def go() -> BenchResult:
        server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
        try:
            return await run(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(go())


class _Answering(asyncio.Protocol):
    """Answers NC with ND00 (header kept), except every ``drop_every``-th request of the connection."""

    def __init__(self, drop_every: int = 0) -> None:
        self.framer = Framer(65535)
        self.drop_every = drop_every
        self.seen = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        out = bytearray()
        for frame in self.framer.feed(data):
            self.seen += 1
            if not self.drop_every or self.seen % self.drop_every:
                out += encode_frame(frame[:4] + b"ND00")
        if out and self.transport is not None:
            self.transport.write(bytes(out))


class _RecordingTransport(asyncio.Transport):
    """Keeps every write with the tick it happened in."""

    def __init__(self, clock: list[int]) -> None:
        super().__init__()
        self.clock = clock
        self.writes: list[tuple[int, bytes]] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append((self.clock[0], bytes(data)))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _frames(data: bytes) -> list[bytes]:
    return Framer(65535).feed(data)


# --------------------------------------------------------------------------------------------
# math: percentiles, buckets, merging (synthetic samples, exact values)
# --------------------------------------------------------------------------------------------


def test_percentile_is_nearest_rank_rounded() -> None:
    assert percentile([], 0.99) == 0.0
    assert percentile([7.0], 0.5) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 3.0  # round(1.5) = 2
    values = [float(v) for v in range(1, 102)]
    assert [percentile(values, q) for q in (0.5, 0.99, 0.999)] == [51.0, 100.0, 101.0]


def test_plan_counts_requests_and_buckets() -> None:
    plan = LoadPlan(connections=3, rate=1024, duration=2.5, warmup=0.125, then_rate=256, then_duration=1.0)
    assert (plan.warmup_requests, plan.phase1_requests, plan.then_requests) == (128, 128 + 2560, 256)
    assert (plan.window, plan.then_window, plan.buckets) == (2.5, 1.0, (3, 1))
    assert LoadPlan(connections=1, duration=4.0).buckets == (4, 0)  # closed loop
    assert connection_shares(5, 2) == [(0, 2, 4), (1, 3)]


def _synthetic(plan: LoadPlan, samples_ms: dict[int, list[int]], sent: dict[int, int]) -> Tally:
    n1, n2 = plan.buckets
    tally = Tally(n1, n2)
    for b, values in samples_ms.items():
        tally.ok[b].extend(v / 1000 for v in values)
    for b, n in sent.items():
        tally.sent[b] = n
    return tally


def test_merged_tallies_give_the_percentiles_of_the_union() -> None:
    plan = LoadPlan(connections=2, rate=100, duration=2.5, warmup=0, then_rate=50, then_duration=3)
    # process A: the fast half of phase 1, B: the slow half; phase 2 recovers in its second second
    fast = {0: list(range(1, 51)), 3: [30] * 40, 4: [4] * 50, 5: [3] * 50}
    slow = {1: list(range(51, 101)), 2: [101], 3: [2] * 9}
    a = _synthetic(plan, fast, {0: 50, 3: 50, 4: 50})
    b = _synthetic(plan, slow, {1: 50, 2: 25, 3: 25, 5: 50})
    a.errors[2], a.unanswered[2], b.skipped[2] = 3, 2, 1
    a.error_codes[0]["15"] = 3
    b.resets, b.unmatched = 1, 4
    a.lags.extend([0.001, 0.002])
    b.lags.extend([0.0015])
    a.cpu_s, a.requests_total, b.cpu_s, b.requests_total = 0.3, 100_000, 0.1, 100_000
    a.merge(b)
    r = summarize(BenchResult("t", "CC", "open", 2, 1, 100, 2.5), a, plan, timeline=True)
    # phase 1 holds 1..101 ms once each: the same percentiles as the union sorted
    assert (r.ok, r.p50_ms, r.p99_ms, r.p999_ms, r.max_ms) == (101, 51.0, 100.0, 101.0, 101.0)
    assert (r.offered, r.sent, r.offered_rate, r.tps) == (125, 125, 50.0, 40.4)
    assert (r.errors, r.error_codes, r.unanswered, r.skipped) == (3, {"15": 3}, 2, 1)
    assert (r.resets, r.unmatched) == (1, 4)
    assert (r.processes, r.client_cpu_us, r.send_lag_max_ms, r.send_lag_p99_ms) == (2, 2.0, 2.0, 2.0)
    assert r.then is not None
    assert (r.then["offered"], r.then["ok"], r.then["offered_rate"]) == (175, 149, 58.3)
    # phase-2 second 0: 40 x 30 ms and 9 x 2 ms -> p99 30 ms; second 1: 4 ms; second 2: 3 ms
    assert (r.recovery_s, r.recovery_held) == (1, True)
    assert r.timeline is not None
    assert [(s["phase"], s["second"], s["span"], s["sent"], s["ok"], s["p99_ms"]) for s in r.timeline] == [
        (1, 0, 1.0, 50, 50, 50.0),
        (1, 1, 1.0, 50, 50, 100.0),
        (1, 2, 0.5, 25, 1, 101.0),
        (2, 0, 1.0, 75, 49, 30.0),
        (2, 1, 1.0, 50, 50, 4.0),
        (2, 2, 1.0, 50, 50, 3.0),
    ]
    assert (r.timeline[2]["errors"], r.timeline[2]["unanswered"], r.timeline[2]["skipped"]) == (3, 2, 1)
    text = format_result(r, False)
    assert "processes=2" in text and "p99 < 10 ms from second 1 after the switch" in text
    assert "phase 2 second 0: sent 75 ok 49 errors 0 unanswered 0 p99 30.0 ms" in text
    assert json.loads(format_result(r, True))["recovery_s"] == 1


def test_recovery_that_does_not_hold_and_one_that_never_comes() -> None:
    plan = LoadPlan(connections=1, rate=10, duration=1, warmup=0, then_rate=10, then_duration=3)
    header = BenchResult("t", "CC", "open", 1, 1, 10, 1)
    r = summarize(header, _synthetic(plan, {1: [5], 2: [50], 3: [5]}, {}), plan)
    assert (r.recovery_s, r.recovery_held, r.timeline) == (0, False, None)
    r = summarize(header, _synthetic(plan, {1: [10], 3: [20]}, {}), plan, False, 10.0)
    assert (r.recovery_s, r.recovery_held) == (None, None)  # 10 ms is not under 10 ms; second 2 had no ok


def test_tallies_of_different_plans_do_not_merge() -> None:
    with pytest.raises(ValueError, match="different plans"):
        Tally(2, 0).merge(Tally(3, 0))


def test_options_that_make_no_run_are_refused() -> None:
    with pytest.raises(ValueError, match="needs an open-loop"):
        check_options("CC", 8, then_rate=100, then_duration=1)
    with pytest.raises(ValueError, match="go together"):
        check_options("CC", 8, rate=100, then_rate=100)
    with pytest.raises(ValueError, match="between 1 and --connections"):
        check_options("CC", 2, processes=3)
    with pytest.raises(ValueError, match="--idle"):
        check_options("iso", 2, idle=10)
    check_options("CC", 2, 2, 100, 50, 1, 10)


# --------------------------------------------------------------------------------------------
# the batched open-loop sender on a simulated clock
# --------------------------------------------------------------------------------------------


def _simulated_run(plan: LoadPlan, start: float) -> tuple[LoadRun, list[_RecordingTransport], list[int]]:
    wire = HostCommandWire([b"NC"], 4, "NC")
    run = LoadRun(plan, wire)
    tick = [0]
    transports = []
    for j in range(plan.connections):
        conn = wire.connection(run, j)
        transport = _RecordingTransport(tick)
        conn.connection_made(transport)
        run.conns.append(conn)
        transports.append(transport)
    run.begin(start)
    return run, transports, tick


def test_batched_sender_writes_exactly_the_schedule_once_per_connection_and_tick() -> None:
    # powers of two: every intended time and bucket boundary is exact in binary floating point
    plan = LoadPlan(connections=3, rate=1024, duration=2.0, warmup=0.125, then_rate=256, then_duration=1.0)
    start = 64.0
    run, transports, tick = _simulated_run(plan, start)
    now = start - 0.01  # a tick before the start sends nothing
    switch_tick = -1
    while not run.tick(now):
        if run.sent2 and switch_tick < 0:
            switch_tick = tick[0]
        tick[0] += 1
        # uneven ticks and one 40 ms stall the sender must catch up on
        now += 0.040 if tick[0] == 500 else 0.0007 + 0.0006 * (tick[0] % 3)
        assert tick[0] < 20_000
    written = [len(t.writes) for t in transports]
    assert run.tick(now + 1.0) is True and [len(t.writes) for t in transports] == written  # nothing more
    n1, n2 = plan.phase1_requests, plan.then_requests
    ts = start + n1 / plan.rate
    for j, transport in enumerate(transports):
        ticks = [t for t, _ in transport.writes]
        # one write per connection per tick; two (phase 1's last requests, phase 2's first) in the switch tick
        assert {t for t in ticks if ticks.count(t) > 1} <= {switch_tick}
        frames = [f for _, data in transport.writes for f in _frames(data)]
        assert len(frames) == len(range(j, n1, 3)) + len(range(j, n2, 3))
        assert [f[:4] for f in frames] == [str(i).zfill(4).encode() for i in range(1, len(frames) + 1)]
        assert {f[4:] for f in frames} == {b"NC"}
        intended = [start + n / plan.rate for n in range(j, n1, 3)] + [ts + m / 256 for m in range(j, n2, 3)]
        assert list(run.conns[j].pending.values()) == intended
    assert any(len([t for t, _ in tr.writes if t == switch_tick]) == 2 for tr in transports)
    # the buckets count what was written by intended second: warm-up excluded
    assert run.tally.sent == [1024, 1024, 256]
    assert run.tally.requests_total == n1 + n2
    assert len(transports[0].writes) < len(range(0, n1 + n2, 3))  # batched, not one write per request


def test_answers_match_by_header_and_time_from_the_intended_send(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = LoadPlan(connections=2, rate=64, duration=1.0, warmup=0.0)
    run, transports, _ = _simulated_run(plan, 8.0)
    assert run.tick(8.5) is False and run.tick(9.5) is True
    conn = run.conns[0]
    frames = [f for _, data in transports[0].writes for f in _frames(data)]
    assert len(frames) == 32
    answers = b"".join(encode_frame(f[:4] + (b"ND15" if i == 3 else b"ND00")) for i, f in enumerate(frames))
    answers += encode_frame(b"9999ND00")  # matches no request in flight
    monkeypatch.setattr(bench, "clock", lambda: 10.0)
    conn.data_received(answers[:7])  # split inside a frame
    conn.data_received(answers[7:])
    assert conn.pending == {}
    intended = [8.0 + n / 64 for n in range(0, 64, 2)]
    latencies = [10.0 - t for i, t in enumerate(intended) if i != 3]
    assert sorted(run.tally.ok[0]) == sorted(latencies)
    assert (run.tally.errors, run.tally.error_codes[0], run.tally.unmatched) == ([1], {"15": 1}, 1)
    r = summarize(BenchResult("t", "NC", "open", 2, 1, 64, 1.0), run.tally, plan)
    assert (r.ok, r.errors, r.p50_ms, r.max_ms) == (31, 1, round(1000 * sorted(latencies)[15], 3), 2000.0)


def test_a_sequence_number_still_in_flight_is_skipped_over() -> None:
    wire = HostCommandWire([b"NC"], 1, "NC")  # ten sequence numbers per connection
    plan = LoadPlan(connections=1, rate=100, duration=0.12, warmup=0.0)
    run = LoadRun(plan, wire)
    conn = wire.connection(run, 0)
    transport = _RecordingTransport([0])
    conn.connection_made(transport)
    run.conns.append(conn)
    run.begin(0.0)
    run.tick(0.095)  # requests 0..9 use every header
    conn.data_received(encode_frame(b"4ND00") + encode_frame(b"7ND00"))
    assert run.tick(1.0) is True  # requests 10 and 11 take the freed 4 and 7; none left for a 13th
    headers = [f[:1] for _, data in transport.writes for f in _frames(data)]
    assert headers == [b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9", b"0", b"4", b"7"]
    assert (run.tally.skipped, sum(run.tally.sent)) == ([0], 12)


# --------------------------------------------------------------------------------------------
# loopback runs
# --------------------------------------------------------------------------------------------


def test_closed_loop_counts_every_answer() -> None:
    r = _against_echo(command="NC", connections=3, depth=2, duration=0.3, warmup=0.1)
    assert r.mode == "closed" and r.errors == 0 and r.ok > 0 and r.tps > 0
    assert r.sent >= r.ok - 6  # now exactly: ok counts the requests sent in the window only
    assert r.ok + r.errors + r.unanswered == r.offered == r.sent and r.unanswered == 0
    assert 0 < r.p50_ms <= r.p99_ms <= r.p999_ms <= r.max_ms
    assert "NC closed c=3 d=2" in format_result(r, False)


def test_open_loop_sends_on_schedule_and_holds_idle_connections() -> None:
    r = _against_echo(command="CC", connections=2, rate=500, duration=0.4, warmup=0.1, idle=20)
    assert r.mode == "open" and r.errors == 0 and r.idle == 20
    # the schedule, not a speed check: late sends are caught up, so about rate x duration go out
    assert 150 <= r.sent <= 260 and 0 < r.ok <= r.sent
    assert '"idle": 20' in format_result(r, True)


def test_open_loop_client_sleeps_a_whole_tick_between_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 5,000/s the next send is due in 0.2 ms: the client still sleeps a whole tick and sends what is
    due in one go (a timer below the loop's resolution fires at once and the client spins a core)."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, result: object = None) -> object:
        asked.append(delay)
        return await real_sleep(delay, result)

    monkeypatch.setattr(asyncio, "sleep", sleep)  # the bench module looks it up at each call
    r = _against_echo(command="NC", connections=2, rate=5000, duration=0.2, warmup=0.05)
    assert r.errors == 0 and r.ok > 0
    assert asked and min(asked) >= bench.OPEN_LOOP_TICK


def test_echo_answers_every_request_offered_with_a_second_phase() -> None:
    r = _against_echo(
        command="NC", connections=3, rate=1000, duration=0.5, warmup=0.1, then_rate=400, then_duration=0.5,
        timeline=True, grace=5.0,
    )  # fmt: skip
    assert (r.offered, r.ok, r.errors, r.unanswered) == (500, 500, 0, 0)
    assert (r.skipped, r.resets, r.unmatched) == (0, 0, 0)
    assert (r.offered_rate, r.duration, r.processes) == (1000.0, 0.5, 1)
    assert r.then is not None and (r.then["offered"], r.then["ok"], r.then["unanswered"]) == (200, 200, 0)
    assert r.timeline is not None and [(s["phase"], s["sent"], s["ok"]) for s in r.timeline] == [
        (1, 500, 500),
        (2, 200, 200),
    ]
    assert r.client_cpu_us > 0 and r.send_lag_max_ms >= r.send_lag_p99_ms > 0
    assert "offered 500 (1,000/s), unanswered 0, resets 0" in format_result(r, False)


def test_without_a_header_answers_match_in_order() -> None:
    r = _against_echo(header_length=0, command="NC", connections=2, rate=800, duration=0.25, warmup=0)
    assert (r.offered, r.ok, r.unanswered, r.unmatched) == (200, 200, 0, 0)


def test_a_server_that_drops_requests_yields_the_exact_unanswered_count() -> None:
    async def run(port: int) -> BenchResult:
        return await run_bench("127.0.0.1", port, "NC", 2, rate=600, duration=0.5, warmup=0, grace=0.5)

    r = _against(lambda: _Answering(drop_every=3), run)
    # 150 requests per connection, every third dropped
    assert (r.offered, r.ok, r.errors, r.unanswered, r.resets, r.skipped) == (300, 200, 0, 100, 0, 0)


class _ClosesFirstConnection(_Answering):
    accepted = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        type(self).accepted += 1
        if type(self).accepted == 1:
            transport.close()


def test_a_connection_the_server_closes_counts_as_a_reset_and_loses_its_requests() -> None:
    async def run(port: int) -> BenchResult:
        return await run_bench("127.0.0.1", port, "NC", 2, rate=600, duration=0.5, warmup=0, grace=0.5)

    r = _against(_ClosesFirstConnection, run)
    assert (r.resets, r.ok, r.errors) == (1, 150, 0)  # the other connection's 150 only
    assert r.ok + r.unanswered == r.offered and r.offered + r.skipped == 300 and r.skipped > 0


def test_processes_share_the_schedule_and_merge_exactly() -> None:
    r = _against_echo(
        command="NC", connections=4, rate=800, duration=0.5, warmup=0.1, processes=2, timeline=True, grace=5.0
    )
    assert (r.processes, r.offered, r.ok, r.unanswered, r.skipped, r.resets) == (2, 400, 400, 0, 0, 0)
    assert r.timeline is not None and sum(s["ok"] for s in r.timeline) == 400
    assert 0 < r.p50_ms <= r.p99_ms <= r.max_ms


# --------------------------------------------------------------------------------------------
# the ISO 8583 driver on the same engine
# --------------------------------------------------------------------------------------------


def test_stan_is_found_without_decoding() -> None:
    spec = load_spec("ascii")
    path = stan_path(spec)
    assert path is not None
    for stan, raw in iso_requests(30):
        assert stan_at(raw, path) == stan.encode() == iso8583.decode(raw, spec)[0]["11"].encode()
    doc = {"t": "0200", "2": "4000001234567899", "4": "000000000100", "11": "123456", "70": "301"}
    secondary = bytes(iso8583.encode(doc, spec)[0])
    assert stan_at(secondary, path) == b"123456"
    assert stan_at(bytes(iso8583.encode({"t": "0200", "3": "000000"}, spec)[0]), path) is None


class _IsoAnswering(asyncio.Protocol):
    """Sends each 0200 back as if translated, but answers every fourth with 0210 and field 39 = 55."""

    def __init__(self) -> None:
        self.framer = Framer(65535)
        self.spec = load_spec("ascii")
        self.seen = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        out = bytearray()
        for frame in self.framer.feed(data):
            self.seen += 1
            if self.seen % 4:
                out += encode_frame(frame)
            else:
                answer = {"t": "0210", "11": iso8583.decode(frame, self.spec)[0]["11"], "39": "55"}
                out += encode_frame(bytes(iso8583.encode(answer, self.spec)[0]))
        if out and self.transport is not None:
            self.transport.write(bytes(out))


@pytest.mark.parametrize("processes", [1, 2])
def test_iso_scenario_counts_translations_errors_and_offered(processes: int) -> None:
    async def run(port: int) -> BenchResult:
        return await run_iso_bench(
            "127.0.0.1", port, 2, rate=400, duration=0.5, warmup=0, grace=5.0, processes=processes
        )

    r = _against(_IsoAnswering, run)
    assert (r.command, r.processes, r.offered, r.ok, r.unanswered) == ("iso", processes, 200, 150, 0)
    assert (r.errors, r.error_codes) == (50, {"55": 50})
