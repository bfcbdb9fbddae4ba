"""hsmproxy bench against its own raw echo server: closed loop, open loop, idle connections."""

from __future__ import annotations

import asyncio
import socket

import pytest

from hsmproxy import bench
from hsmproxy.bench import BenchResult, echo_server, format_result, run_bench


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _against_echo(**kwargs: object) -> BenchResult:
    port = _free_port()

    async def go() -> BenchResult:
        stop = asyncio.Event()
        server = asyncio.ensure_future(echo_server("127.0.0.1", port, 4, stop))
        try:
            for _ in range(100):
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    await w.wait_closed()
                    break
                except OSError:
                    await asyncio.sleep(0.02)
            return await run_bench("127.0.0.1", port, **kwargs)  # type: ignore[arg-type]
        finally:
            stop.set()
            await server

    return asyncio.run(go())


def test_closed_loop_counts_every_answer() -> None:
    r = _against_echo(command="NC", connections=3, depth=2, duration=0.3, warmup=0.1)
    assert r.mode == "closed" and r.errors == 0 and r.ok > 0 and r.tps > 0
    assert r.sent >= r.ok - 6  # the answers to requests sent during warm-up may be counted too
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
