"""Node faults under ~1,000 TPS of mixed host commands on two SoftHSM2 nodes.

* SIGKILL one node worker: 0 lost, 0 wrong responses; the worker comes back by itself.
* SIGSTOP one: it is out of rotation within the request deadline (ejected on the first timeout,
  DOWN after ``fall`` timed-out checks), 0 errors; back in rotation after SIGCONT.
* Rename one node's token directory: DOWN within about ``fall`` x ``inter``, UP again by itself
  after the directory is restored (the worker is recycled and restarts with back-off).
* Every node down: /readyz answers 503 and commands answer 41 at once; service resumes by itself.

Each test prints the p99 latency of the requests sent during the fault. No timing assertions: the
tests assert counts and states (with generous bounded waits) and print the times.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from hsmproxy.cluster.state import ClusterSettings
from hsmproxy.config import Settings, load_settings
from tests.chaos.load import LoadResult, mixed_requests, run_load
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import RunningProxy, make_nodes, start_proxy

CLUSTER = ClusterSettings(
    inter=0.2, fall=2, rise=2, timeout=0.3, base_ejection_time=2.0, max_ejection_time=10.0, slowstart=1.0
)
DEADLINE = 0.5


@pytest.fixture(scope="module")
def chaos_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two SoftHSM2 nodes of this module's own (the tests rename token directories)."""
    return make_nodes(tmp_path_factory.mktemp("chaos"))


@pytest.fixture(scope="module")
def expected() -> dict[bytes, bytes]:
    """The mixed request set and the emulator's answers."""
    return mixed_requests()


def _settings(config: Path) -> Settings:
    return replace(
        load_settings(config),
        cluster=CLUSTER,
        request_timeout=DEADLINE,
        http_bind=("127.0.0.1", 0),
    )


@pytest.fixture
def chaos_proxy(chaos_config: Path) -> Iterator[RunningProxy]:
    """A fresh proxy per test (short health-check interval, 0.5 s request deadline)."""
    rp = start_proxy(_settings(chaos_config))
    try:
        _wait(lambda: all(_oper(rp, n.name) == "UP" for n in rp.proxy.nodes), 30, "nodes up")
        yield rp
    finally:
        rp.stop()


def _oper(rp: RunningProxy, name: str) -> str:
    assert rp.proxy.router is not None
    return rp.proxy.router.state(name).status(time.monotonic())


def _wait(cond: Callable[[], bool], seconds: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < seconds, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - start


def _first_change(rp: RunningProxy, name: str, new: str, after: float) -> float | None:
    """Wall time of the first change of ``name`` to ``new`` (oper DOWN/UP or EJECTED) after ``after``."""
    assert rp.proxy.router is not None
    for c in rp.proxy.router.state(name).history:
        if c.new == new and c.at >= after:
            return c.at
    return None


def _report(title: str, result: LoadResult, start: float, end: float) -> None:
    print(
        f"\n{title}: sent {result.sent}, answered {result.answered}, lost {result.lost}, "
        f"wrong {len(result.wrong)}, p99 during the fault {result.p99(start, end):.1f} ms, "
        f"p99 overall {result.p99(0, float('inf')):.1f} ms"
    )


def test_sigkill_one_worker(chaos_proxy: RunningProxy, expected: dict[bytes, bytes]) -> None:
    victim = chaos_proxy.proxy.nodes[0]
    pid = victim.pid
    assert pid is not None
    marks: dict[str, float] = {}

    def kill() -> None:
        marks["fault"] = time.monotonic()
        os.kill(pid, signal.SIGKILL)

    result = asyncio.run(run_load(chaos_proxy.port, expected, 4.0, [(1.5, kill)]))
    _report("SIGKILL", result, marks["fault"], marks["fault"] + 1.5)
    assert result.sent >= 3000
    assert result.lost == 0
    assert result.wrong == []
    waited = _wait(lambda: _oper(chaos_proxy, victim.name) == "UP" and victim.pid != pid, 30, "worker back")
    print(f"worker back and UP {waited:.2f}s after the load ended; restarts {victim.restarts}")


def test_sigstop_one_worker(chaos_proxy: RunningProxy, expected: dict[bytes, bytes]) -> None:
    router = chaos_proxy.proxy.router
    assert router is not None
    victim = chaos_proxy.proxy.nodes[1]
    pid = victim.pid
    assert pid is not None
    marks: dict[str, float] = {}

    def stop() -> None:
        marks["fault"], marks["fault_wall"] = time.monotonic(), time.time()
        os.kill(pid, signal.SIGSTOP)

    def cont() -> None:
        marks["cont"], marks["cont_wall"] = time.monotonic(), time.time()
        os.kill(pid, signal.SIGCONT)

    try:
        result = asyncio.run(run_load(chaos_proxy.port, expected, 6.0, [(1.0, stop), (4.0, cont)]))
    finally:
        os.kill(pid, signal.SIGCONT)
    _report("SIGSTOP", result, marks["fault"], marks["cont"])
    assert result.sent >= 5000
    assert result.lost == 0
    assert result.wrong == []
    ejected = _first_change(chaos_proxy, victim.name, "EJECTED", marks["fault_wall"])
    down = _first_change(chaos_proxy, victim.name, "DOWN", marks["fault_wall"])
    assert ejected is not None or down is not None, "the stopped node was never taken out of rotation"
    out = min(t for t in (ejected, down) if t is not None) - marks["fault_wall"]
    print(f"out of rotation {out:.2f}s after SIGSTOP (deadline {DEADLINE}s); DOWN: {down is not None}")
    _wait(lambda: _oper(chaos_proxy, victim.name) == "UP", 30, "node back UP after SIGCONT")
    back = _first_change(chaos_proxy, victim.name, "UP", marks["cont_wall"])
    before = router.state(victim.name).requests
    again = asyncio.run(run_load(chaos_proxy.port, expected, 1.0, []))
    assert again.lost == 0 and again.wrong == []
    assert router.state(victim.name).requests > before, "the node got no requests after SIGCONT"
    if back is not None:
        print(f"UP again {back - marks['cont_wall']:.2f}s after SIGCONT")


def test_token_directory_vanishes(
    chaos_proxy: RunningProxy, chaos_config: Path, expected: dict[bytes, bytes]
) -> None:
    victim = chaos_proxy.proxy.nodes[0]
    tokens = chaos_config.parent / victim.name / "tokens"
    hidden = tokens.with_name("tokens.hidden")
    marks: dict[str, float] = {}

    def vanish() -> None:
        marks["fault"], marks["fault_wall"] = time.monotonic(), time.time()
        tokens.rename(hidden)

    def restore() -> None:
        marks["restore"], marks["restore_wall"] = time.monotonic(), time.time()
        hidden.rename(tokens)

    try:
        result = asyncio.run(run_load(chaos_proxy.port, expected, 5.0, [(1.0, vanish), (3.5, restore)]))
    finally:
        if hidden.exists():
            hidden.rename(tokens)
    _report("token directory renamed", result, marks["fault"], marks["restore"])
    assert result.lost == 0
    down = _first_change(chaos_proxy, victim.name, "DOWN", marks["fault_wall"])
    assert down is not None, "the node never went DOWN"
    detect = down - marks["fault_wall"]
    print(f"DOWN {detect:.2f}s after the rename (fall x inter = {CLUSTER.fall * CLUSTER.inter:.1f}s)")
    # A request that meets the vanished token is a device error, retried on the other node: none is wrong.
    assert result.wrong == []
    _wait(lambda: _oper(chaos_proxy, victim.name) == "UP", 40, "node UP after the token returned")
    up = _first_change(chaos_proxy, victim.name, "UP", marks["restore_wall"])
    assert up is not None
    print(f"UP {up - marks['restore_wall']:.2f}s after the restore; worker restarts {victim.restarts}")
    again = asyncio.run(run_load(chaos_proxy.port, expected, 1.0, []))
    assert again.lost == 0 and again.wrong == []


def _http_get(port: int, path: str) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def test_every_node_down_answers_at_once_and_recovers(chaos_proxy: RunningProxy, chaos_config: Path) -> None:
    port = chaos_proxy.proxy.http_port
    assert _http_get(port, "/readyz")[0] == 200
    moved = []
    try:
        for node in chaos_proxy.proxy.nodes:
            tokens = chaos_config.parent / node.name / "tokens"
            tokens.rename(tokens.with_name("tokens.hidden"))
            moved.append(tokens)
        _wait(lambda: all(_oper(chaos_proxy, n.name) == "DOWN" for n in chaos_proxy.proxy.nodes), 20, "DOWN")
        status, body = _http_get(port, "/readyz?verbose")
        assert status == 503
        assert "not ready" in body and "node-a READY DOWN" in body
        client = HsmClient("127.0.0.1", chaos_proxy.port)
        try:
            start = time.monotonic()
            assert client.call(b"NC") == b"ND41"
            print(f"\nwith every node down NC answered 41 in {1000 * (time.monotonic() - start):.1f} ms")
        finally:
            client.close()
    finally:
        for tokens in moved:
            tokens.with_name("tokens.hidden").rename(tokens)
    _wait(lambda: any(_oper(chaos_proxy, n.name) == "UP" for n in chaos_proxy.proxy.nodes), 40, "a node UP")
    assert _http_get(port, "/readyz")[0] == 200
    assert _http_get(port, "/livez") == (200, "ok\n")
    client = HsmClient("127.0.0.1", chaos_proxy.port)
    try:
        assert client.call(b"NC")[:4] == b"ND00"
    finally:
        client.close()
