"""``hsmproxy bench``: a load generator for host-command servers, and a raw echo server.

Closed loop (default): ``--connections C`` connections each keep ``--depth D`` requests in flight.
Open loop (``--rate R``): requests are sent on a fixed schedule of R per second spread over the
connections, and latency is measured from each request's *intended* send time, so a stalled
server cannot hide its queueing delay (no coordinated omission).

Requests are valid commands under the public test LMK: ``CC`` with one hot key pair (``--keys
hot``) or a different key pair per request (``--keys cold``), and any other table command from
the conformance generators. ``hsmproxy bench --echo-server HOST:PORT`` runs the raw echo server:
same framing, answers every request with its header, response code and ``00`` and no work, which
is the ceiling any HSM front end on this machine can reach.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from protocols.framing import Framer, encode_frame
from protocols.hostcmd.envelope import response_code

#: Distinct CC requests (each with its own key pair) for ``--keys cold``.
COLD_REQUESTS = 65536
#: Modulus of the RSA key pair that EW/EY requests use (one key, like a scheme's signing key).
RSA_BITS = 2048


@dataclass
class BenchResult:
    """What one run measured."""

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


def _percentile(sorted_values: list[float], q: float) -> float:
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


class BenchConnection(asyncio.Protocol):
    """A load-generator connection: every framed answer goes to ``on_response`` (also the ISO bench's)."""

    def __init__(self, on_response: Any) -> None:
        self.framer = Framer(65535)
        self.on_response = on_response
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for frame in self.framer.feed(data):
            self.on_response(frame)


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
) -> BenchResult:
    """Run one measurement and return its result.

    ``idle`` extra connections are opened first, each answers one ``NC``, and they stay open and
    silent for the whole run (memory per connection; a busy server among many idle clients).
    ``command = "iso"``: an ISO 8583 listener, 0200 with PIN + MAC translation (hsmproxy.iso8583.bench).
    """
    if command == "iso":
        from hsmproxy.iso8583.bench import run_iso_bench

        return await run_iso_bench(host, port, connections, depth, rate, duration, warmup)
    # cold: more distinct key pairs than two nodes' key caches hold (2 x 4,096 handles), so every
    # request really brings two new working keys into a token
    requests = build_requests(command, COLD_REQUESTS if keys == "cold" else 512, keys)
    expect = response_code(command).encode()
    loop = asyncio.get_running_loop()
    result = BenchResult(
        f"{host}:{port}", command, "open" if rate else "closed", connections, depth, rate, duration
    )
    latencies: list[float] = []
    state = LoadState()
    conns: list[BenchConnection] = []
    pending: list[dict[int, float]] = [{} for _ in range(connections)]
    counters = [0] * connections

    def send(ci: int, intended: float | None = None) -> None:
        conn = conns[ci]
        if conn.transport is None or conn.transport.is_closing():
            return
        counters[ci] += 1
        seq = counters[ci] % (10**header_length)
        header = str(seq).zfill(header_length).encode()[-header_length:] if header_length else b""
        body = requests[state.next % len(requests)]
        state.next += 1
        pending[ci][seq] = intended if intended is not None else time.perf_counter()
        conn.transport.write(encode_frame(header + body))
        if state.measuring:
            result.sent += 1

    def make_handler(ci: int) -> Any:
        def on_response(frame: bytes) -> None:
            now = time.perf_counter()
            seq = int(frame[:header_length]) if header_length else 0
            started = pending[ci].pop(seq, None)
            if state.measuring and started is not None:
                if frame[header_length : header_length + 2] == expect and frame[
                    header_length + 2 : header_length + 4
                ] in (
                    b"00",
                    b"01",
                ):
                    result.ok += 1
                    latencies.append(now - started)
                else:
                    result.errors += 1
                    code = frame[header_length + 2 : header_length + 4].decode("latin-1")
                    result.error_codes[code] = result.error_codes.get(code, 0) + 1
            if not rate and now < state.stop_at:
                send(ci)

        return on_response

    idle_conns = await _open_idle(host, port, idle, header_length)
    result.idle = len(idle_conns)
    for ci in range(connections):
        handler = make_handler(ci)

        def factory(h: Any = handler) -> BenchConnection:
            return BenchConnection(h)

        _, proto = await loop.create_connection(factory, host, port)
        conns.append(proto)
    duration = await drive(send, state, latencies, connections, depth, rate, duration, warmup)
    for c in (*conns, *idle_conns):
        if c.transport is not None:
            c.transport.close()
    return finish(result, latencies, duration)


#: Open loop: the client wakes at most once per tick (or at the next due time) and sends what is due.
OPEN_LOOP_TICK = 0.001


@dataclass
class LoadState:
    """What a run's callbacks share: whether answers are measured, when sending stops, next request."""

    measuring: bool = False
    stop_at: float = 0.0
    next: int = 0


async def drive(
    send: Callable[[int, float | None], None],
    state: LoadState,
    latencies: list[float],
    connections: int,
    depth: int,
    rate: float,
    duration: float,
    warmup: float,
) -> float:
    """Send on the schedule: closed loop (``depth`` per connection, each answer sends the next) or
    open loop (``rate`` a second, ``send(ci, intended)``); the measured seconds once it is over."""
    start = time.perf_counter()
    state.stop_at = start + warmup + duration
    if rate:
        interval, next_t, n = 1.0 / rate, start, 0
        while (now := time.perf_counter()) < state.stop_at:
            if not state.measuring and now >= start + warmup:
                state.measuring = True
                latencies.clear()
            while next_t <= now:
                send(n % connections, next_t)
                n += 1
                next_t += interval
            # Wake at most once a millisecond and send what is due: a timer below the loop's 1 ms
            # resolution fires at once, and the client would spin a whole core it shares with the
            # server. Latency still counts from each request's intended time.
            await asyncio.sleep(max(next_t - time.perf_counter(), OPEN_LOOP_TICK))
    else:
        for ci in range(connections):
            for _ in range(depth):
                send(ci, None)
        await asyncio.sleep(warmup)
        state.measuring = True
        latencies.clear()
        t0 = time.perf_counter()
        await asyncio.sleep(duration)
        duration = time.perf_counter() - t0
    state.measuring = False
    await asyncio.sleep(0.2)  # the last answers in flight
    return duration


def finish(result: BenchResult, latencies: list[float], duration: float) -> BenchResult:
    """``result`` with its rate and latency percentiles filled in."""
    latencies.sort()
    result.duration = round(duration, 3)
    result.tps = round(result.ok / duration, 1) if duration else 0.0
    result.p50_ms = round(1000 * _percentile(latencies, 0.50), 3)
    result.p99_ms = round(1000 * _percentile(latencies, 0.99), 3)
    result.p999_ms = round(1000 * _percentile(latencies, 0.999), 3)
    result.max_ms = round(1000 * (latencies[-1] if latencies else 0.0), 3)
    return result


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
    host: str, port: int, header_length: int = 4, stop: asyncio.Event | None = None
) -> None:
    """Serve the raw echo responder until cancelled (or ``stop`` is set)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Echo(header_length), host, port, reuse_address=True)
    async with server:
        await (stop.wait() if stop is not None else asyncio.Event().wait())


def format_result(r: BenchResult, as_json: bool) -> str:
    """The result as JSON or a one-line summary."""
    if as_json:
        return json.dumps(asdict(r), sort_keys=True)
    return (
        f"{r.target} {r.command} {r.mode} c={r.connections} d={r.depth}"
        f"{f' rate={r.rate:g}/s' if r.rate else ''}: {r.tps:,.0f} TPS, p50 {r.p50_ms} ms, p99 {r.p99_ms} ms, "
        f"p99.9 {r.p999_ms} ms, errors {r.errors} {r.error_codes or ''}"
        f"{f', {r.idle} idle connections held' if r.idle else ''}"
    )
