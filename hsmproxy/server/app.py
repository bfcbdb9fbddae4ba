"""``hsmproxy serve``: start node workers, listeners, and stop gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field

from hsmproxy.audit import AuditWriter, load_audit_settings, router_chain_mac
from hsmproxy.backend.client import NodeClient
from hsmproxy.cluster.health import HealthChecker, check_lmk_id
from hsmproxy.cluster.router import Router
from hsmproxy.commands import HANDLERS
from hsmproxy.commands.base import CommandContext
from hsmproxy.config import ListenerConfig, Settings
from hsmproxy.keys.rotation import KeyLifecycle
from hsmproxy.metrics import CONTENT_TYPE, Metrics
from hsmproxy.server.console import AdminConsole
from hsmproxy.server.hostcmd import CommandObserver, CommandRecord, Dispatcher, HostCommandProtocol
from hsmproxy.server.readiness import ReadinessServer
from hsmproxy.tenancy import TenantRegistry, describe_certificate

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
    #: Tenants' live state (connections, rate limiting) and per-connection resolution.
    tenancy: TenantRegistry | None = None
    _dispatchers: dict[tuple[str, str], Dispatcher] = field(default_factory=dict)
    #: Called once per answered host command (metrics, audit): see CommandRecord.
    observers: list[CommandObserver] = field(default_factory=list)

    def _observe(self, record: CommandRecord) -> None:
        for observer in self.observers:
            observer(record)

    health: HealthChecker | None = None
    console: AdminConsole | None = None
    readiness: ReadinessServer | None = None
    #: Bound ports of the admin console and the readiness endpoints (0: not listening).
    console_port: int = 0
    http_port: int = 0
    #: ``[keystore]``: refused keys, rotation engine, event delivery (None without a keystore).
    lifecycle: KeyLifecycle | None = None
    #: The Prometheus catalogue, served on ``[http] bind`` (None without it).
    metrics: Metrics | None = None
    #: True once the first round of health checks has completed (readiness).
    health_checked: bool = False
    #: ``[audit]``: the HMAC-chained audit trail (None without ``[audit] path``).
    audit: AuditWriter | None = None

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
        self.router = Router(self.nodes, s.request_timeout, s.cluster, s.node_weights, s.backup_nodes)
        served = [s.tenants[lc.tenant] for lc in s.listeners if lc.tenant in s.tenants]
        if s.keystore is not None:
            self.lifecycle = KeyLifecycle(s.keystore, self.router)
            await self.lifecycle.start()
        self.health = HealthChecker(self.router, check_lmk_id([*served, *s.tenants.values()]))
        checks = await asyncio.gather(*(self.health.check_once(n) for n in self.nodes))
        for node, (ok, reason, device) in zip(self.nodes, checks, strict=True):
            self.health.observe(node, ok, reason, device)
        self.health_checked = True
        self.health.start()
        if s.console_bind is not None:
            self.console = AdminConsole(self.router, s.tenants)
            self.console_port = await self.console.start(*s.console_bind)
        if s.http_bind is not None:
            self.metrics = Metrics(self, HANDLERS)
            self.observers.append(self.metrics.observe)
            await self.metrics.start()
            self.readiness = ReadinessServer(
                self.router, self.metrics.render, CONTENT_TYPE, lambda: self.health_checked
            )
            self.http_port = await self.readiness.start(*s.http_bind)
        audit_settings = load_audit_settings(s.source)
        if audit_settings is not None:
            self.audit = AuditWriter(audit_settings, router_chain_mac(self.router, audit_settings.key_id))
            await self.audit.start()
            self.observers.append(self.audit.observe)
        loop = asyncio.get_running_loop()
        self.tenancy = TenantRegistry(s.tenants, {lc.name: lc.tenant for lc in s.listeners})
        for lc in s.listeners:

            def factory(lc: ListenerConfig = lc) -> HostCommandProtocol:
                # Admitted (counted, tenant resolved) in connection_made, i.e. after a TLS handshake.
                return HostCommandProtocol(
                    None, lc.max_inflight, self.connections.discard, lambda p: self._admit(p, lc)
                )

            tls: dict[str, object] = {}
            if lc.tls is not None:
                tls = {"ssl": lc.tls.server_context(), "ssl_handshake_timeout": lc.tls.handshake_timeout}
            server = await loop.create_server(
                factory, lc.host, lc.port, reuse_address=True, backlog=1024, **tls
            )  # type: ignore[call-overload]
            self.servers.append(server)
            port = server.sockets[0].getsockname()[1]
            self.ports.append(port)
            log.info(
                "listener %s on %s:%d (header length %d, tenant %s)",
                lc.name,
                lc.host,
                port,
                lc.header_length,
                lc.tenant or "by certificate or address only",
            )
            if lc.tls is not None:
                asked = "optional" if lc.tls.client_ca else "not asked"
                log.info(
                    "listener %s: TLS %s+, client certificate %s",
                    lc.name,
                    lc.tls.min_version,
                    "required" if lc.tls.require_client_cert else asked,
                )

    def _admit(self, proto: HostCommandProtocol, lc: ListenerConfig) -> Dispatcher | None:
        """Count a new connection and pick its tenant's dispatcher; None (logged) refuses it."""
        s = self.settings
        assert self.router is not None and self.tenancy is not None
        if len(self.connections) >= lc.max_connections:
            log.warning("refusing connection from %s: connection limit reached", proto.peer)
            return None
        transport = proto.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        found = self.tenancy.resolve(lc.name, proto.peer, peercert)
        state = found.tenant
        if state is None:
            log.warning(
                "refusing connection from %s on listener %s: %s (%s)",
                proto.peer,
                lc.name,
                found.how,
                describe_certificate(peercert) if lc.tls is not None else "plain TCP",
            )
            return None
        if not state.acquire_connection():
            log.warning(
                "refusing connection from %s on listener %s: tenant %s is at max_connections (%d)",
                proto.peer,
                lc.name,
                state.name,
                state.config.max_connections,
            )
            return None
        proto.release = state.release_connection
        proto.listener = lc.name
        if self.observers:
            proto.observer = self._observe
        self.connections.add(proto)
        dispatcher = self._dispatchers.get((lc.name, state.name))
        if dispatcher is None:
            t = state.config
            ctx = CommandContext(
                t.name, t.lmk_ids, t.default_lmk, s.disabled_pin_formats, keyblock_lmk=t.keyblock_lmk
            )
            foreign = self.tenancy.foreign_lmks(t.name)
            dispatcher = Dispatcher(
                self.router,
                HANDLERS,
                ctx,
                lc.header_length,
                s.disabled_commands,
                state,
                foreign,
                self.lifecycle.refused if self.lifecycle is not None else None,
            )
            self._dispatchers[(lc.name, state.name)] = dispatcher
        log.debug("connection from %s on %s: tenant %s by %s", proto.peer, lc.name, state.name, found.how)
        return dispatcher

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), stop the nodes."""
        if self.readiness is not None:
            self.readiness.draining = True  # /readyz answers 503 while draining
        if self.metrics is not None:
            self.metrics.draining = True
        for aux in (self.console, self.health, self.metrics):
            if aux is not None:
                await aux.stop()
        if self.lifecycle is not None:
            await self.lifecycle.stop()
        for server in self.servers:
            server.close()
        deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT
        while any(c.busy for c in self.connections) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.connections):
            c.close()
        if self.audit is not None:
            await self.audit.stop()
        if self.readiness is not None:
            await self.readiness.stop()
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
