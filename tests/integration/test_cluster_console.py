"""The admin console (line-based TCP) and the /livez, /readyz endpoints of a running proxy."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from hsmproxy.config import load_settings
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import RunningProxy, start_proxy
from tests.integration.test_console_admin import rows as table_rows


@pytest.fixture(scope="module")
def admin_proxy(proxy_config: Path) -> Iterator[RunningProxy]:
    """A proxy on the session's test nodes with the console and readiness endpoints on free ports."""
    settings = replace(load_settings(proxy_config), console_bind=("127.0.0.1", 0), http_bind=("127.0.0.1", 0))
    rp = start_proxy(settings)
    yield rp
    rp.stop()


class Console:
    """A console session: one command line out, the reply (up to the empty line) back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def cmd(self, line: str) -> list[str]:
        """Send ``line``; return the reply lines."""
        self.sock.sendall(line.encode() + b"\n")
        while b"\n\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "console closed the connection"
            self.buf += chunk
        reply, _, self.buf = self.buf.partition(b"\n\n")
        return reply.decode().split("\n")

    def close(self) -> None:
        """Close the session."""
        self.sock.close()


@pytest.fixture
def console(admin_proxy: RunningProxy) -> Iterator[Console]:
    """A console session; every node is READY again afterwards."""
    c = Console(admin_proxy.proxy.console_port)
    yield c
    for node in admin_proxy.proxy.nodes:
        c.cmd(f"SET NODE {node.name} STATE READY test cleanup")
    c.close()


def _http(port: int, request: str) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request.encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def _get(port: int, path: str) -> tuple[int, str]:
    return _http(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")


def test_help_and_unknown_commands(console: Console) -> None:
    text = "\n".join(console.cmd("help"))
    for command in ("SHOW NODES", "SET NODE", "SHOW TENANTS", "SHOW HISTORY", "HELP"):
        assert command in text
    bad_lines = ("FOO", "SHOW", "SET NODE node-a STATE SLEEP", "SET NODE x STATE DRAIN", "SHOW HISTORY x")
    for bad in bad_lines:
        reply = console.cmd(bad)
        assert len(reply) == 1 and reply[0].startswith("ERR"), (bad, reply)


def test_show_nodes(console: Console, admin_proxy: RunningProxy) -> None:
    rows = table_rows(console.cmd("SHOW NODES"))
    assert [r["NAME"] for r in rows] == [n.name for n in admin_proxy.proxy.nodes]
    for r in rows:
        assert r["ADMIN"] == "READY" and r["OPER"] == "UP" and r["WEIGHT"] == "1" and r["BACKUP"] == "no"
        assert r["MANUFACTURER"].startswith("SoftHSM") and r["MODEL"].startswith("SoftHSM")
        assert r["FIRMWARE"][0].isdigit()
        assert "start-up" in r["REASON"] and r["LAST_CHANGE"].endswith("Z")


def test_drain_and_history(console: Console, admin_proxy: RunningProxy) -> None:
    router = admin_proxy.proxy.router
    assert router is not None
    assert console.cmd("SET NODE node-a STATE DRAIN firmware upgrade") == ["OK node-a READY -> DRAIN"]
    row = table_rows(console.cmd("show nodes"))[0]
    assert row["ADMIN"] == "DRAIN" and "firmware upgrade" in row["REASON"]
    before = router.state("node-a").requests
    client = HsmClient("127.0.0.1", admin_proxy.port)
    try:
        for _ in range(50):
            assert client.call(b"NC")[:4] == b"ND00"
    finally:
        client.close()
    assert router.state("node-a").requests == before, "a DRAIN node got new requests"
    history = table_rows(console.cmd("SHOW HISTORY node-a"))
    assert history[-1]["WHAT"] == "admin" and history[-1]["FROM"] == "READY" and history[-1]["TO"] == "DRAIN"
    assert "firmware upgrade (by console 127.0.0.1:" in history[-1]["REASON"]
    assert console.cmd("SET NODE node-a STATE READY done") == ["OK node-a DRAIN -> READY"]


def test_show_tenants(console: Console, admin_proxy: RunningProxy) -> None:
    rows = {r["NAME"]: r for r in table_rows(console.cmd("SHOW TENANTS"))}
    assert set(rows) == set(admin_proxy.proxy.settings.tenants)
    assert rows["default"]["LMK_IDS"] == "00,01" and rows["default"]["DEFAULT_LMK"] == "00"


def test_readiness_follows_the_nodes(console: Console, admin_proxy: RunningProxy) -> None:
    port = admin_proxy.proxy.http_port
    assert _get(port, "/livez") == (200, "ok\n")
    status, body = _get(port, "/readyz?verbose")
    assert status == 200
    assert body.splitlines() == ["ready", "node-a READY UP", "node-b READY UP"]
    for node in ("node-a", "node-b"):
        assert console.cmd(f"SET NODE {node} STATE MAINT test")[0].startswith("OK")
    assert _get(port, "/readyz")[0] == 503
    assert _get(port, "/livez")[0] == 200
    client = HsmClient("127.0.0.1", admin_proxy.port)
    try:
        start = time.monotonic()
        assert client.call(b"NC") == b"ND41"  # promptly, never hangs
        print(f"\nNC with every node in MAINT answered in {1000 * (time.monotonic() - start):.1f} ms")
        console.cmd("SET NODE node-b STATE READY test")
        assert _get(port, "/readyz")[0] == 200
        assert client.call(b"NC")[:4] == b"ND00"
    finally:
        client.close()


def test_http_errors(admin_proxy: RunningProxy) -> None:
    port = admin_proxy.proxy.http_port
    assert _get(port, "/nope")[0] == 404
    assert _http(port, "POST /readyz HTTP/1.1\r\nContent-Length: 0\r\n\r\n")[0] == 405
    assert _http(port, "garbage\r\n\r\n")[0] == 400
