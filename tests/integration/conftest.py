"""Fixtures that run an emulator on a loopback port in a background thread, and stop it."""

from __future__ import annotations

import asyncio
import socket
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from emulator.app import build_state
from emulator.hsm import EmulatorHsm, Handler
from emulator.server import HostCommandProtocol
from protocols.framing import Framer, encode_frame
from tests.integration.proxy_env import finish_loop


@dataclass
class RunningEmulator:
    """An emulator listening on 127.0.0.1:port."""

    host: str
    port: int
    hsm: EmulatorHsm

    @property
    def address(self) -> tuple[str, int]:
        """(host, port)."""
        return (self.host, self.port)


@contextmanager
def running_emulator(handlers: Mapping[str, Handler] | None = None) -> Iterator[RunningEmulator]:
    """An emulator (header length 4, test LMKs) on an ephemeral loopback port, stopped on exit."""
    hsm = EmulatorHsm(build_state(header_length=4), handlers)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, object] = {}

    protocols: weakref.WeakSet[HostCommandProtocol] = weakref.WeakSet()  # an open transport holds its own

    def protocol() -> HostCommandProtocol:
        p = HostCommandProtocol(hsm)
        protocols.add(p)
        return p

    async def main() -> None:
        server = await loop.create_server(protocol, "127.0.0.1", 0)
        holder["port"] = server.sockets[0].getsockname()[1]
        started.set()
        async with server:
            await server.serve_forever()

    def run() -> None:
        asyncio.set_event_loop(loop)
        task = loop.create_task(main())
        holder["task"] = task
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        finally:
            for p in list(protocols):  # connections a test left open: closed here, not by the collector
                p.close()
            finish_loop(loop)

    thread = threading.Thread(target=run, name="emulator", daemon=True)
    thread.start()
    assert started.wait(10), "emulator did not start"
    port = holder["port"]
    assert isinstance(port, int)
    try:
        yield RunningEmulator("127.0.0.1", port, hsm)
    finally:
        task = holder["task"]
        assert isinstance(task, asyncio.Task)
        loop.call_soon_threadsafe(task.cancel)
        thread.join(10)


@pytest.fixture(scope="session")
def emulator() -> Iterator[RunningEmulator]:
    """A session-wide emulator (header length 4, test LMKs) on an ephemeral loopback port."""
    with running_emulator() as running:
        yield running


class HsmClient:
    """A blocking test client: frames requests, returns response payloads."""

    def __init__(self, host: str, port: int, header: bytes = b"0000") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.header = header
        self.framer = Framer(65535)
        self.pending: list[bytes] = []

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are."""
        self.sock.sendall(data)

    def recv(self) -> bytes:
        """Next response payload."""
        while not self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.pending += self.framer.feed(chunk)
        return self.pending.pop(0)

    def call(self, command: bytes) -> bytes:
        """Send header + command, return the response without the header."""
        self.sock.sendall(encode_frame(self.header + command))
        resp = self.recv()
        assert resp[: len(self.header)] == self.header
        return resp[len(self.header) :]

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


@pytest.fixture
def client(emulator: RunningEmulator) -> Iterator[HsmClient]:
    """A connected client of the session emulator."""
    c = HsmClient(emulator.host, emulator.port)
    yield c
    c.close()


from tests.integration.proxy_env import proxy_config, running_proxy  # noqa: E402, F401
