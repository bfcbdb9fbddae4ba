"""``hsmproxy serve``: start node workers, listeners, and stop gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from dataclasses import dataclass, field, fields, replace

from hsmproxy.audit.checkpoint import KeyFileError, PinnedKeys
from hsmproxy.audit.keytrail import KeyTrail
from hsmproxy.audit.settings import AuditSettings
from hsmproxy.audit.signer import NodeSigner
from hsmproxy.audit.syslog import SyslogSink
from hsmproxy.audit.writer import AuditWriter
from hsmproxy.backend.client import NodeClient
from hsmproxy.cluster.health import HealthChecker, check_lmk_id
from hsmproxy.cluster.router import Router
from hsmproxy.commands import HANDLERS
from hsmproxy.commands.base import CommandContext
from hsmproxy.config import ConfigError, ListenerConfig, Settings, load_settings
from hsmproxy.iso8583.server import IsoGateway
from hsmproxy.keys.rotation import KeyLifecycle
from hsmproxy.metrics import CONTENT_TYPE, Metrics
from hsmproxy.server.console import AdminConsole
from hsmproxy.server.hostcmd import CommandObserver, CommandRecord, Dispatcher, HostCommandProtocol
from hsmproxy.server.readiness import ReadinessServer
from hsmproxy.tenancy import TenantRegistry, certificate_subject, describe_certificate

log = logging.getLogger("hsmproxy")

#: Seconds a graceful stop waits for in-flight requests (default of ``[proxy] drain_timeout``).
DRAIN_TIMEOUT = 10.0
#: Seconds a drained connection (answers written, EOF sent) waits for the client to close it.
LINGER = 2.0
#: Settings a reload cannot change in a running proxy (reported: "takes effect on restart").
RESTART_FIELDS = (
    "listeners", "nodes", "console_bind", "http_bind", "keystore", "audit", "strict_key_custody", "iso8583",
)  # fmt: skip


def _describe_changes(old: Settings, new: Settings, had_overrides: bool) -> list[str]:
    """What a reload changes at run time, one phrase per kind of change (no secrets)."""
    out: list[str] = []
    added = sorted(set(new.tenants) - set(old.tenants))
    changed = sorted(n for n in set(new.tenants) & set(old.tenants) if new.tenants[n] != old.tenants[n])
    if added:
        out.append(f"tenants added: {', '.join(added)}")
    if changed:
        out.append(f"tenants changed: {', '.join(changed)}")
    for name in ("request_timeout", "drain_timeout", "disabled_commands", "disabled_pin_formats"):
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            show = (lambda v: " ".join(sorted(v)) or "-") if isinstance(a, frozenset) else str
            out.append(f"{name} {show(a)} -> {show(b)}")
    oc, nc = old.cluster, new.cluster
    cluster = [f.name for f in fields(oc) if getattr(oc, f.name) != getattr(nc, f.name)]
    if cluster:
        out.append(f"cluster: {', '.join(cluster)}")
    nodes = {n.name for n in old.nodes} & {n.name for n in new.nodes}
    reweighted = sorted(
        n
        for n in nodes
        if old.node_weights.get(n, 1) != new.node_weights.get(n, 1)
        or (n in old.backup_nodes) != (n in new.backup_nodes)
    )
    if reweighted:
        out.append(f"node weight/backup: {', '.join(reweighted)}")
    if old.console_users != new.console_users:
        out.append(f"console users: {len(new.console_users)}")
    if had_overrides:
        out.append("console CONFIGCMDS/CONFIGPB overrides reset to the file")
    return out


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
    #: ``[audit]``: the audit trail's writer (None without ``[audit] path``), the signer of its
    #: checkpoints, and the keystore life-cycle steps it records (None without a keystore).
    audit: AuditWriter | None = None
    audit_signer: NodeSigner | None = None
    audit_keys: KeyTrail | None = None
    #: ``protocol = "iso8583"`` listeners (None without any; ports in ``iso.ports``).
    iso: IsoGateway | None = None
    #: True once a graceful stop has begun (readyz 503, console QH says DRAINING).
    draining: bool = False
    #: Set by the console's SHUTDOWN; ``shutdown_wait``: drain in-flight requests first.
    shutdown_requested: asyncio.Event = field(default_factory=asyncio.Event)
    shutdown_wait: bool = True
    #: Per-tenant disabled host commands (answer 68) and PIN block formats (answer 69): the file's
    #: ``[proxy]`` lists plus console CONFIGCMDS/CONFIGPB overrides (a RELOAD resets them).
    _disabled_cmds: dict[str, frozenset[str]] = field(default_factory=dict)
    _disabled_pb: dict[str, frozenset[str]] = field(default_factory=dict)
    _next_conn_id: int = 0
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

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
            self.console = AdminConsole(self, s.console_users)
            self.observers.append(self.console.observe)
            self.console_port = await self.console.start(*s.console_bind)
        if s.http_bind is not None:
            self.metrics = Metrics(self, HANDLERS)
            self.observers.append(self.metrics.observe)
            await self.metrics.start()
            self.readiness = ReadinessServer(
                self.router, self.metrics.render, CONTENT_TYPE, lambda: self.health_checked
            )
            self.http_port = await self.readiness.start(*s.http_bind)
        if s.audit is not None:
            self.audit = self._audit_writer(s.audit)
            await self.audit.start()
            if self.audit_keys is not None:
                self.audit_keys.start(self.audit, self.audit.key_cursor or 0)
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
            # reuse_port: a second instance can bind the same port for a blue-green switch.
            server = await loop.create_server(
                factory, lc.host, lc.port, reuse_address=True, reuse_port=True, backlog=1024, **tls
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
        if s.iso8583 is not None:
            self.iso = IsoGateway(self, s.iso8583)
            await self.iso.start()

    def _audit_writer(self, settings: AuditSettings) -> AuditWriter:
        """The audit writer: checkpoints signed by the nodes (eligible ones first), a syslog sink when
        configured, the keystore's life cycle when there is a keystore, and its gate on the router."""
        router = self.router
        assert router is not None

        def signing_nodes() -> list[NodeClient]:
            preferred = [n for n in self.nodes if n in router.candidates()]
            return preferred + [n for n in self.nodes if n not in preferred]

        try:
            pinned = PinnedKeys.load(settings.trusted_keys) if settings.trusted_keys else None
        except KeyFileError as exc:
            raise ConfigError(
                f"[audit] trusted_keys: {exc} (write it with `hsmproxy audit keys --generate --out "
                f"{settings.trusted_keys}`, or `make var`)"
            ) from None
        self.audit_signer = NodeSigner(signing_nodes, settings.key_id, pinned, timeout=router.deadline)
        sink = SyslogSink(settings.syslog) if settings.syslog is not None else None
        writer = AuditWriter(settings, self.audit_signer, sink=sink, key_cursor=self.lifecycle is not None)
        if self.lifecycle is not None:
            self.audit_keys = KeyTrail(self.lifecycle.store, self.lifecycle.refused.named)
        router.gate = lambda: writer.admits
        return writer

    def _admit(self, proto: HostCommandProtocol, lc: ListenerConfig) -> Dispatcher | None:
        """Count a new connection and pick its tenant's dispatcher; None (logged) refuses it."""
        assert self.router is not None and self.tenancy is not None
        if self.draining:
            log.info("refusing connection from %s: draining", proto.peer)
            return None
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
        subject = certificate_subject(peercert) if lc.tls is not None else ""
        if subject:  # the audit's client identity: certificate subject and address
            proto.client = (
                f"{subject} {proto.peer[0]}:{proto.peer[1]}" if isinstance(proto.peer, tuple) else subject
            )
        self._next_conn_id += 1
        proto.conn_id = self._next_conn_id
        if self.observers:
            proto.observer = self._observe
        self.connections.add(proto)
        dispatcher = self._dispatchers.get((lc.name, state.name))
        if dispatcher is None:
            t = state.config
            ctx = CommandContext(
                t.name,
                t.lmk_ids,
                t.default_lmk,
                self.tenant_disabled_pin_formats(t.name),
                keyblock_lmk=t.keyblock_lmk,
            )
            foreign = self.tenancy.foreign_lmks(t.name)
            dispatcher = Dispatcher(
                self.router,
                HANDLERS,
                ctx,
                lc.header_length,
                self.tenant_disabled_commands(t.name),
                state,
                foreign,
                self.lifecycle.refused if self.lifecycle is not None else None,
                lc.name,
                self.audit,
            )
            self._dispatchers[(lc.name, state.name)] = dispatcher
        log.debug("connection from %s on %s: tenant %s by %s", proto.peer, lc.name, state.name, found.how)
        return dispatcher

    # -- runtime policy, reload, shutdown ---------------------------------------------------------

    def tenant_disabled_commands(self, tenant: str) -> frozenset[str]:
        """Host commands answered 68 for ``tenant``: ``[proxy] disabled_commands`` or a console override."""
        return self._disabled_cmds.get(tenant, self.settings.disabled_commands)

    def tenant_disabled_pin_formats(self, tenant: str) -> frozenset[str]:
        """PIN block formats answered 69 for ``tenant``: ``[proxy] disabled_pin_formats`` or an override."""
        return self._disabled_pb.get(tenant, self.settings.disabled_pin_formats)

    def set_tenant_policy(
        self,
        tenant: str,
        disabled_commands: frozenset[str] | None = None,
        disabled_pin_formats: frozenset[str] | None = None,
    ) -> None:
        """Runtime override (console CONFIGCMDS / CONFIGPB) until the next reload."""
        if disabled_commands is not None:
            self._disabled_cmds[tenant] = frozenset(disabled_commands)
        if disabled_pin_formats is not None:
            self._disabled_pb[tenant] = frozenset(disabled_pin_formats)
        self._refresh_dispatchers(tenant)

    def _refresh_dispatchers(self, only: str | None = None) -> None:
        """Push tenants' config and policy into their dispatchers (synchronous: atomic for requests)."""
        assert self.tenancy is not None
        for (_, name), d in self._dispatchers.items():
            t = self.settings.tenants.get(name)
            if t is None or (only is not None and name != only):
                continue
            d.context = replace(
                d.context,
                lmk_ids=t.lmk_ids,
                default_lmk=t.default_lmk,
                keyblock_lmk=t.keyblock_lmk,
                disabled_pin_formats=self.tenant_disabled_pin_formats(name),
            )
            d.disabled_commands = self.tenant_disabled_commands(name)
            d.foreign_lmks = self.tenancy.foreign_lmks(name)

    def request_shutdown(self, wait: bool = True) -> None:
        """Console SHUTDOWN: ask :func:`serve` to stop (``wait``: drain in-flight requests first)."""
        self.shutdown_wait = wait
        self.shutdown_requested.set()

    async def reload(self) -> str:
        """Re-read ``settings.source`` and swap in what can change at run time; returns a summary.

        Swapped at once (no await in between, so no request sees half of it): tenants (LMK ids,
        commands, limits, clients), disabled commands and PIN formats (console overrides are reset),
        request_timeout, drain_timeout, ``[cluster]``, node weights and backup flags, console users.
        Listeners, nodes, the console/http binds, ``[keystore]``, ``[audit]`` and strict key custody
        take effect on restart (named in the summary). Raises ConfigError, keeping the old config,
        when the file is invalid.
        """
        async with self._reload_lock:
            old = self.settings
            if not old.source:
                raise ConfigError("nothing to reload: these settings were not read from a file")
            try:
                new = await asyncio.to_thread(load_settings, old.source)
            except ConfigError:
                raise
            except (ValueError, TypeError, KeyError, OSError) as exc:  # e.g. int("x") in a section
                raise ConfigError(f"{old.source}: {type(exc).__name__}: {exc}") from None
            restart = [f for f in RESTART_FIELDS if getattr(old, f, None) != getattr(new, f, None)]
            listener_tenants = {lc.name: lc.tenant for lc in old.listeners}
            for lc in new.listeners:
                if lc.name in listener_tenants:
                    listener_tenants[lc.name] = lc.tenant
            missing = sorted({t for t in listener_tenants.values() if t and t not in new.tenants})
            if missing:
                raise ConfigError(
                    f"tenant {', '.join(missing)} is the tenant of a running listener and cannot be removed "
                    "by a reload (change the listener, then restart)"
                )
            changes = _describe_changes(old, new, bool(self._disabled_cmds or self._disabled_pb))
            effective = replace(new, **{f: getattr(old, f) for f in RESTART_FIELDS if hasattr(old, f)})
            # -- the swap: synchronous from here on -------------------------------------------------
            self.settings = effective
            removed: list[str] = []
            if self.tenancy is not None:
                removed = self.tenancy.update(effective.tenants, listener_tenants)
            for key in [k for k in self._dispatchers if k[1] in removed]:
                del self._dispatchers[key]
            self._disabled_cmds.clear()
            self._disabled_pb.clear()
            self._refresh_dispatchers()
            if self.router is not None:
                self.router.deadline = effective.request_timeout
                self.router.settings = effective.cluster
                for name, st in self.router.states.items():
                    if name in {n.name for n in new.nodes}:
                        st.weight = effective.node_weights.get(name, 1)
                        st.backup = name in effective.backup_nodes
            if self.console is not None:
                self.console.users = {u.name: u for u in effective.console_users}
            # -- background parts -------------------------------------------------------------------
            health = self.health
            if health is not None:
                health.check_args["lmk_id"] = check_lmk_id(list(effective.tenants.values()))
                if health.settings != effective.cluster:
                    await health.stop()
                    health.settings = effective.cluster
                    health.start()
        if removed:
            changes.append(f"tenants removed (open connections run until they close): {', '.join(removed)}")
        summary = f"reloaded {old.source}: " + ("; ".join(changes) if changes else "no run-time changes")
        log.info("config %s", summary)
        if restart:
            note = f"changed, takes effect on restart: {', '.join(restart)}"
            log.warning("config reload: %s", note)
            summary += f"; {note}"
        return summary

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting, let in-flight requests finish (``drain_timeout``; none if not ``drain``),
        stop the nodes. Connections stop reading at once: a request read before is answered."""
        self.draining = True
        if self.readiness is not None:
            self.readiness.draining = True  # /readyz answers 503 while draining
        if self.metrics is not None:
            self.metrics.draining = True
        for server in self.servers:
            server.close()
        # A signal handler runs before the loop polls again: let it read what clients sent before
        # the stop began (already in the socket buffers), then read no more.
        for _ in range(2):
            await asyncio.sleep(0)
        for c in list(self.connections):
            c.drain_and_close()
        if self.iso is not None:
            await self.iso.stop(self.settings.drain_timeout if drain else 0.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.settings.drain_timeout if drain else 0.0)
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        unfinished = sum(c.inflight for c in self.connections)
        if unfinished:
            log.warning(
                "drain: closing %d connections with %d unanswered requests", len(self.connections), unfinished
            )
        else:  # every answer is written and EOF sent: give the clients a moment to close their end
            linger = min(deadline, loop.time() + LINGER)
            while self.connections and loop.time() < linger:
                await asyncio.sleep(0.02)
        for c in list(self.connections):
            c.close()
        for aux in (self.console, self.health, self.metrics):
            if aux is not None:
                await aux.stop()
        if self.audit_keys is not None:
            await self.audit_keys.stop()  # its last look at the keystore, before the store closes
        if self.lifecycle is not None:
            await self.lifecycle.stop()
        if self.audit is not None:
            await self.audit.stop()
        if self.readiness is not None:
            await self.readiness.stop()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        await asyncio.gather(*(n.stop() for n in self.nodes))


def settle_heap() -> None:
    """Move everything built at start-up (modules, config, keystore, metrics) out of the collector's way.

    A full collection of the front's heap took up to 32 ms, a pause every request in flight waited
    through (the p99 of the open-loop bench). Frozen objects are never scanned again; a reload's
    new objects are collected as usual.
    """
    gc.collect()
    gc.freeze()


async def serve(
    settings: Settings, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run the proxy until SIGTERM/SIGINT, a console SHUTDOWN (or ``stop`` is set); SIGHUP reloads."""
    proxy = Proxy(settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            await proxy.reload()  # logs its summary
        except ConfigError as exc:
            log.error("SIGHUP: reload failed, the old config stays in force: %s", exc)
        except Exception:
            log.exception("SIGHUP: reload failed, the old config stays in force")

    def on_hup() -> None:
        if proxy.tenancy is None:
            log.warning("SIGHUP ignored: the proxy is still starting")
            return
        log.info("SIGHUP: reloading %s", proxy.settings.source)
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await proxy.start()
    except BaseException:
        await proxy.stop(drain=False)  # the node workers already started, and whatever else did
        raise
    settle_heap()
    if ready is not None:
        ready.set()
    waits = [loop.create_task(stop.wait()), loop.create_task(proxy.shutdown_requested.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        drain = proxy.shutdown_wait or not proxy.shutdown_requested.is_set()
        log.info("stopping: %s", "draining in-flight requests" if drain else "console SHUTDOWN without WAIT")
        await proxy.stop(drain=drain)
        log.info("stopped")
