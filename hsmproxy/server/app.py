"""``hsmproxy serve``: start node workers, listeners, and stop gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field

from hsmproxy.backend.client import NodeClient
from hsmproxy.cluster.router import Router
from hsmproxy.commands import HANDLERS
from hsmproxy.commands.base import CommandContext
from hsmproxy.config import Settings
from hsmproxy.server.hostcmd import Dispatcher, HostCommandProtocol

log = logging.getLogger("hsmproxy")

#: Seconds a graceful stop waits for in-flight requests.
DRAIN_TIMEOUT = 10.0


@dataclass
class Proxy:
    """A running proxy: nodes, router, listening servers and open connections."""

    settings: Settings
    nodes: list[NodeClient] = field(default_factory=list)
    router: Router | None = None
    servers: list[asyncio.Server] = field(default_factory=list)
    connections: set[HostCommandProtocol] = field(default_factory=set)
    ports: list[int] = field(default_factory=list)

    async def start(self) -> None:
        """Start every node worker, then every listener."""
        s = self.settings
        self.nodes = [NodeClient(spec) for spec in s.nodes]
        started = await asyncio.gather(*(n.start() for n in self.nodes))
        for node, ok in zip(self.nodes, started, strict=True):
            if not ok:
                log.warning(
                    "node %s is down at start-up (%s); retrying in the background", node.name, node.last_error
                )
                node.schedule_restart()
            elif s.strict_key_custody and not node.info.get("mechanisms", {}).get("des3_ecb_unwrap", False):
                log.warning(
                    "strict_key_custody: node %s (%s %s) cannot unwrap DES3-ECB cryptograms natively, so "
                    "commands that bring a working key into it answer 68",
                    node.name,
                    node.info.get("manufacturer"),
                    node.info.get("model"),
                )
        self.router = Router(self.nodes, s.request_timeout)
        loop = asyncio.get_running_loop()
        for lc in s.listeners:
            tenant = s.tenants[lc.tenant]
            ctx = CommandContext(tenant.name, tenant.lmk_ids, tenant.default_lmk, s.disabled_pin_formats)
            dispatcher = Dispatcher(self.router, HANDLERS, ctx, lc.header_length, s.disabled_commands)

            def factory(
                d: Dispatcher = dispatcher, limit: int = lc.max_connections, inflight: int = lc.max_inflight
            ) -> HostCommandProtocol:
                proto = HostCommandProtocol(d, inflight, on_close=self.connections.discard)
                if len(self.connections) >= limit:
                    proto.over_limit = True  # refused in connection_made, never counted
                else:
                    self.connections.add(proto)
                return proto

            server = await loop.create_server(factory, lc.host, lc.port, reuse_address=True, backlog=1024)
            self.servers.append(server)
            port = server.sockets[0].getsockname()[1]
            self.ports.append(port)
            log.info(
                "listener %s on %s:%d (header length %d, tenant %s)",
                lc.name,
                lc.host,
                port,
                lc.header_length,
                lc.tenant,
            )

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), stop the nodes."""
        for server in self.servers:
            server.close()
        deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT
        while any(c.busy for c in self.connections) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.connections):
            c.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        await asyncio.gather(*(n.stop() for n in self.nodes))


async def serve(
    settings: Settings, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run the proxy until SIGTERM/SIGINT (or ``stop`` is set)."""
    proxy = Proxy(settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await proxy.start()
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("stopping: draining in-flight requests")
        await proxy.stop()
        log.info("stopped")
