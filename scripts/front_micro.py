"""Pure-Python cost of the proxy front per CC request (BENCHMARKS.md "What changed").

Runs 40,000 CC requests through the real HostCommandProtocol, Dispatcher, handlers, Router and
NodeClient batching, with fake transports and a simulated worker (each batch is pickled and
unpickled both ways as on the pipe, answered on the next loop turn). No sockets, no SoftHSM2:
what is left is the front's own Python. Prints microseconds per request for 5 runs.

    .venv/bin/python scripts/front_micro.py
"""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any

import uvloop

from hsmproxy.backend.client import NodeClient
from hsmproxy.backend.spec import NodeSpec
from hsmproxy.bench import build_requests
from hsmproxy.cluster.router import Router
from hsmproxy.commands import HANDLERS
from hsmproxy.commands.base import CommandContext
from hsmproxy.server.hostcmd import Dispatcher, HostCommandProtocol
from protocols.framing import encode_frame

REQUESTS = 40_000
CONNECTIONS = 8
ANSWER = {"pin_length": "04", "pin_block": "0123456789ABCDEF", "destination_format": "01"}


class FakeTransport:
    """Counts writes."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


class FakeNode(NodeClient):
    """A NodeClient whose flush pickles the batch as the pipe does and answers it next turn."""

    def __init__(self, name: str) -> None:
        super().__init__(NodeSpec(name=name, module="", token_label=name, pin_file=""))
        self.up = True
        self._conn = object()  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._queue = self._queue, []
        sent = pickle.loads(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))  # noqa: S301 - our own bytes
        reply = pickle.dumps([(rid, "00", ANSWER) for rid, _, _ in sent], pickle.HIGHEST_PROTOCOL)
        assert self._loop is not None
        self._loop.call_soon(self._deliver, pickle.loads(reply))  # noqa: S301


async def run() -> float:
    """Microseconds per request for one run."""
    router = Router([FakeNode("a"), FakeNode("b")])
    dispatcher = Dispatcher(router, HANDLERS, CommandContext("default", ("00", "01"), "00"), 4)
    frames = [encode_frame(b"0000" + r) for r in build_requests("CC", 512)]
    conns = []
    for _ in range(CONNECTIONS):
        proto, transport = HostCommandProtocol(dispatcher, 256), FakeTransport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        conns.append((proto, transport))
    start = time.perf_counter()
    for i in range(REQUESTS // CONNECTIONS):
        for proto, _ in conns:
            proto.data_received(frames[i % len(frames)])
        for _ in range(5):
            await asyncio.sleep(0)
    while any(proto.busy for proto, _ in conns):
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    assert sum(t.writes for _, t in conns) == REQUESTS
    return elapsed / REQUESTS * 1e6


if __name__ == "__main__":
    for _ in range(5):
        print(f"{uvloop.run(run()):.1f} us per request ({CONNECTIONS} connections, 1 in flight each)")
