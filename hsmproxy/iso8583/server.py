"""ISO 8583 listeners (service and inline modes) and their upstream links.

* **service** mode: each message is answered on the same connection with its translation (field
  52 translated, MAC verified and regenerated: :class:`~hsmproxy.iso8583.gateway.Gateway`), or an
  error answer with field 39; answers are written as they complete (ISO 8583 links are matched by
  STAN, not by order).
* **inline** mode: the translated request goes to the listener's ``upstream`` over one persistent
  connection (reconnected with exponential back-off, 0.1 s doubling up to ``reconnect_max``);
  the upstream's response is matched by STAN (11) + terminal (41) + RRN (37), its MAC verified and
  regenerated (response leg), and written to the acquirer's connection. No response within
  ``timeout`` seconds (including while the upstream is unreachable) answers the response MTI with
  ``39 = 91``. An 0800 from the upstream is answered locally (echo, sign-on/off).

0800 messages from the acquirer side are answered locally in both modes (:mod:`.netmgmt`).

The listener's tenant limits apply (:mod:`hsmproxy.tenancy`): ``max_connections`` (a connection
over it is closed at once) and the rate per financial message (0800s are not counted), answered
with the listener's ``rate_limit_code`` (default ``91``) when over it.

With an audit trail, every message that reached a node (a translation, a key exchange) writes one
``iso8583`` record: tenant, client, listener, MTI, STAN, RRN, result (field 39 of the answer, ``00``
for a translation), latency and node; with ``ack_after_durable`` its answer leaves once the record is
on disk. A message answered without a node (undecodable, over the rate, no route, echo and sign-on)
is only counted (an ``aggregate`` record per second). Never field values beyond those.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from hsmproxy.cluster.router import REQUEST_NOTE, RequestNote
from hsmproxy.iso8583.config import IsoListenerConfig, IsoSettings
from hsmproxy.iso8583.gateway import (
    DUPLICATE,
    FORMAT_ERROR,
    NO_ROUTE,
    OK,
    SYSTEM_ERROR,
    TIMEOUT,
    Gateway,
    Message,
)
from hsmproxy.iso8583.keys import NamedKeys
from hsmproxy.iso8583.netmgmt import KeyExchange, is_network, network_answer
from hsmproxy.tenancy import TenantState
from protocols.framing import FrameError, Framer, encode_frame

log = logging.getLogger("hsmproxy.iso8583")

MAX_FRAME = 9999


@dataclass
class Stats:
    """Counters of one listener (for tests and the logs)."""

    messages: int = 0
    translated: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Upstream(asyncio.Protocol):
    """The persistent link of an inline listener to its upstream host."""

    def __init__(self, listener: IsoListener) -> None:
        self.listener = listener
        lc = listener.config
        assert lc.upstream is not None
        self.host, self.port = lc.upstream
        self._framer = Framer(MAX_FRAME, lc.framing)
        self._transport: asyncio.Transport | None = None
        self.connected = asyncio.Event()
        self._lost: asyncio.Event = asyncio.Event()
        self.pending: dict[tuple[str, str, str], asyncio.Future[Message]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connects = 0
        self._background: set[asyncio.Future[None]] = set()

    def start(self) -> None:
        """Connect (and keep reconnecting) in the background."""
        self._task = asyncio.create_task(self._run(), name=f"iso8583-upstream-{self.listener.config.name}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.1
        while True:
            try:
                await loop.create_connection(lambda: self, self.host, self.port)
            except OSError as exc:
                name = self.listener.config.name
                log.warning("iso8583 %s: upstream %s:%d unreachable (%s); retrying in %.1f s",
                            name, self.host, self.port, type(exc).__name__, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.listener.config.reconnect_max)
                continue
            started = loop.time()
            await self._lost.wait()
            # a link that drops at once (a host accepting and closing) backs off like a refusal
            delay = (
                0.1 if loop.time() - started >= 1.0 else min(delay * 2, self.listener.config.reconnect_max)
            )
            await asyncio.sleep(delay)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The link is up."""
        self._transport = cast(asyncio.Transport, transport)
        self._framer = Framer(MAX_FRAME, self.listener.config.framing)
        self._lost.clear()
        self.connected.set()
        self.connects += 1
        log.info("iso8583 %s: upstream %s:%d connected", self.listener.config.name, self.host, self.port)

    def connection_lost(self, exc: Exception | None) -> None:
        """The link is down: the reconnect loop takes over; pending requests time out."""
        self._transport = None
        self.connected.clear()
        self._lost.set()
        log.warning("iso8583 %s: upstream connection lost", self.listener.config.name)

    def data_received(self, data: bytes) -> None:
        """Frames from the upstream: responses (matched), or 0800 answered locally."""
        try:
            frames = self._framer.feed(data)
        except FrameError:
            log.warning(
                "iso8583 %s: upstream sent an unframeable stream; reconnecting", self.listener.config.name
            )
            if self._transport is not None:
                self._transport.close()
            return
        for frame in frames:
            decoded = self.listener.gateway.decode(frame)
            if not isinstance(decoded, Message):
                continue
            if is_network(decoded.fields):
                task = asyncio.ensure_future(self._answer_network(decoded))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                continue
            fut = self.pending.get(decoded.match_key())
            if fut is None or fut.done():
                log.warning("iso8583 %s: unmatched upstream message %s", self.listener.config.name,
                            self.listener.gateway.describe(decoded.fields))  # fmt: skip
                continue
            fut.set_result(decoded)

    async def _answer_network(self, msg: Message) -> None:
        out, _ = await network_answer(self.listener.gateway, msg, self.listener.exchange, {}, "upstream")
        if out is not None:
            self.send(out)

    def send(self, raw: bytes) -> bool:
        """Write one message; False when the link is down."""
        if self._transport is None or self._transport.is_closing():
            return False
        self._transport.write(encode_frame(raw, self.listener.config.framing))
        return True

    async def request(self, msg_key: tuple[str, str, str], raw: bytes, timeout: float) -> Message | None:
        """Send ``raw`` and wait for the response matching ``msg_key``; None on timeout or duplicate."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fut: asyncio.Future[Message] = loop.create_future()
        self.pending[msg_key] = fut
        try:
            if not self.connected.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.connected.wait(), max(0.0, deadline - loop.time()))
            if not self.send(raw):
                return None
            try:
                return await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            except TimeoutError:
                return None
        finally:
            if self.pending.get(msg_key) is fut:
                del self.pending[msg_key]

    async def stop(self) -> None:
        """Stop reconnecting and close the link."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._transport is not None:
            self._transport.close()


class IsoConnection(asyncio.Protocol):
    """One acquirer-side connection."""

    def __init__(self, listener: IsoListener) -> None:
        self.listener = listener
        self._framer = Framer(MAX_FRAME, listener.config.framing)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.tasks: set[asyncio.Task[None]] = set()
        self.state: dict[str, Any] = {"signed_on": False}
        self._out: list[bytes] = []
        self._release: Callable[[], None] | None = None
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def busy(self) -> bool:
        """True while messages of this connection are being processed."""
        return bool(self.tasks)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit (or refuse over ``max_connections``)."""
        self.transport = cast(asyncio.Transport, transport)
        # once per connection: asyncio.get_running_loop() (and ensure_future without a loop) is a
        # getpid() system call on Python 3.11
        self._loop = asyncio.get_running_loop()
        peer = self.transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if len(self.listener.connections) >= self.listener.config.max_connections:
            log.warning(
                "iso8583 %s: refusing connection from %s: connection limit",
                self.listener.config.name,
                self.peer,
            )
            self.transport.close()
            self.transport = None
            return
        state = self.listener.tenant_state()
        if state is not None:
            if not state.acquire_connection():
                log.warning("iso8583 %s: refusing connection from %s: tenant %s is at max_connections",
                            self.listener.config.name, self.peer, state.name)  # fmt: skip
                self.transport.close()
                self.transport = None
                return
            self._release = state.release_connection
        self.listener.connections.add(self)

    def data_received(self, data: bytes) -> None:
        """Frame, and process every message concurrently."""
        if self.transport is None:
            return
        try:
            frames = self._framer.feed(data)
        except FrameError as exc:
            log.warning(
                "iso8583 %s: closing connection from %s: %s", self.listener.config.name, self.peer, exc
            )
            self.transport.close()
            return
        loop = self._loop or asyncio.get_running_loop()
        for frame in frames:
            task = loop.create_task(self.listener.handle(frame, self))
            self.tasks.add(task)
            task.add_done_callback(self._done)
        if not self._paused and len(self.tasks) >= self.listener.config.max_inflight:
            self._paused = True
            self.transport.pause_reading()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if (
            self._paused
            and self.transport is not None
            and len(self.tasks) <= self.listener.config.max_inflight // 2
        ):
            self._paused = False
            self.transport.resume_reading()

    def send(self, raw: bytes) -> None:
        """Queue one message; the queue is written once per loop iteration (dropped if closed)."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self._out:
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush)
        self._out.append(encode_frame(raw, self.listener.config.framing))

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def close(self) -> None:
        """Close now."""
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """Cancel this connection's work."""
        for task in list(self.tasks):
            task.cancel()
        self.transport = None
        self.listener.connections.discard(self)
        if self._release is not None:
            self._release()
            self._release = None


class IsoListener:
    """One ``protocol = "iso8583"`` listener: its server, connections, gateway and upstream."""

    def __init__(
        self,
        config: IsoListenerConfig,
        gateway: Gateway,
        exchange: KeyExchange,
        audit: Any,
        tenant_state: Callable[[], TenantState | None] = lambda: None,
        latency: Callable[[str, float], None] | None = None,
    ) -> None:
        #: Called with (listener, seconds) once per answered message (the metrics histogram).
        self.latency = latency
        #: The listener tenant's live state (connection limit, rate), looked up per use (reloads).
        self.tenant_state = tenant_state
        self.config = config
        self.gateway = gateway
        self.exchange = exchange
        self._audit = audit
        self.connections: set[IsoConnection] = set()
        self.server: asyncio.Server | None = None
        self.upstream: Upstream | None = None
        self.port = 0
        self.stats = Stats()

    async def start(self) -> int:
        """Listen (and connect the upstream in inline mode); the bound port."""
        loop = asyncio.get_running_loop()
        lc = self.config
        self.server = await loop.create_server(
            lambda: IsoConnection(self), lc.host, lc.port, reuse_address=True, backlog=1024
        )
        self.port = self.server.sockets[0].getsockname()[1]
        if lc.mode == "inline":
            self.upstream = Upstream(self)
            self.upstream.start()
        log.info("iso8583 listener %s on %s:%d (%s mode, %s framing, spec %s, tenant %s)", lc.name, lc.host,
                 self.port, lc.mode, lc.framing, lc.spec_name, lc.tenant)  # fmt: skip
        return self.port

    async def handle(self, frame: bytes, conn: IsoConnection) -> None:
        """Answer one message (never raises: errors become field 39 or a log line)."""
        started = time.perf_counter()
        fields: dict[str, str] = {}
        code = SYSTEM_ERROR
        out: bytes | None = None
        note = RequestNote()
        REQUEST_NOTE.set(note)  # this message's own task: the router notes the node that answers
        try:
            out, fields, code = await self._process(frame, conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("iso8583 %s: message failed (%s)", self.config.name, type(exc).__name__)
            out = self.gateway.error_answer(fields, SYSTEM_ERROR) if fields else None
        self.stats.messages += 1
        if code == OK:
            self.stats.translated += 1
        else:
            self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        ticket, audit = self._record(fields, conn, code, started, note.node or note.tried)
        if out is None:
            return
        if ticket and audit is not None and audit.ack_after_durable:  # the answer waits for its record
            durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def release() -> None:
                if not durable.done():
                    durable.set_result(None)

            audit.when_durable(ticket, release)
            await durable
        conn.send(out)

    async def _process(self, frame: bytes, conn: IsoConnection) -> tuple[bytes | None, dict[str, str], str]:
        gw = self.gateway
        msg = gw.decode(frame)
        if not isinstance(msg, Message):
            return gw.error_answer(msg, FORMAT_ERROR), msg, FORMAT_ERROR
        fields = msg.fields
        if is_network(fields):
            out, code = await network_answer(gw, msg, self.exchange, conn.state)
            return out, fields, code
        state = self.tenant_state()
        if state is not None:
            delay = state.admit_request()
            if delay is None:
                code = self.config.rate_limit_code
                return gw.error_answer(fields, code), fields, code
            if delay > 0:
                await asyncio.sleep(delay)
        route = gw.route(fields)
        if route is None:
            log.warning("iso8583 %s: no route for %s", self.config.name, gw.describe(fields))
            return gw.error_answer(fields, NO_ROUTE), fields, NO_ROUTE
        out, code = await gw.translate(msg, route, "request")
        if out is None:
            return await gw.signed_error_answer(fields, code, route), fields, code
        if self.upstream is None:
            return out, fields, OK
        key = msg.match_key()
        if key in self.upstream.pending:
            return await gw.signed_error_answer(fields, DUPLICATE, route), fields, DUPLICATE
        response = await self.upstream.request(key, out, self.config.timeout)
        if response is None:
            return await gw.signed_error_answer(fields, TIMEOUT, route), fields, TIMEOUT
        back, code = await gw.translate(response, route, "response")
        if back is None:
            return await gw.signed_error_answer(response.fields, code, route), fields, code
        return back, fields, response.fields.get("39", OK)

    def _record(
        self, fields: dict[str, str], conn: IsoConnection, code: str, started: float, node: str
    ) -> tuple[int, Any]:
        """The message's audit record (one if a node took part, else counted): (ticket, writer)."""
        seconds = time.perf_counter() - started
        if self.latency is not None:
            self.latency(self.config.name, seconds)
        audit = self._audit() if callable(self._audit) else self._audit
        if audit is None:
            return 0, None
        mti = fields.get("t", "")
        try:
            if not node:  # answered without a node (format, rate, route, network management)
                audit.refused(self.config.tenant, self.config.name, mti, code)
                return 0, audit
            ticket = audit.event(
                "iso8583", tenant=self.config.tenant, client=conn.peer, listener=self.config.name,
                mti=mti, stan=fields.get("11", ""), rrn=fields.get("37", ""), result=code,
                latency_ms=round(1000 * seconds, 3), node=node,
            )  # fmt: skip
            return int(ticket), audit
        except Exception:
            log.exception("iso8583 audit record failed")
            return 0, audit

    async def stop(self, drain: float = 5.0) -> None:
        """Stop accepting, let in-flight messages finish (bounded), close everything."""
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.connections):
            c.close()
        if self.upstream is not None:
            await self.upstream.stop()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


class IsoGateway:
    """Every ISO 8583 listener of a proxy (started and stopped by :class:`~hsmproxy.server.app.Proxy`)."""

    def __init__(self, proxy: Any, settings: IsoSettings) -> None:
        self.proxy = proxy
        self.settings = settings
        lifecycle = proxy.lifecycle
        store = lifecycle.store if lifecycle is not None else None
        keystore = proxy.settings.keystore
        self.keys = NamedKeys(store, keystore.refresh_interval if keystore is not None else 1.0)
        self.exchange = KeyExchange(store, self._key_changed)
        self.listeners: dict[str, IsoListener] = {}

    def _tenant(self, name: str) -> Callable[[], TenantState | None]:
        def state() -> TenantState | None:
            tenancy = self.proxy.tenancy
            return tenancy.tenants.get(name) if tenancy is not None else None

        return state

    def _observe_latency(self, listener: str, seconds: float) -> None:
        metrics = getattr(self.proxy, "metrics", None)
        if metrics is not None:
            metrics.observe_iso(listener, seconds)

    def _key_changed(self) -> None:
        lifecycle = self.proxy.lifecycle
        if lifecycle is not None:
            lifecycle.sync.notify()
            lifecycle.events.notify()

    @property
    def ports(self) -> dict[str, int]:
        """Bound port of each listener, by name."""
        return {name: lst.port for name, lst in self.listeners.items()}

    async def start(self) -> None:
        """Load the named keys, then start every listener."""
        await self.keys.start()
        s = self.proxy.settings
        for lc in self.settings.listeners:
            tenant = s.tenants[lc.tenant]
            gateway = Gateway(lc, self.settings.routes_for(lc), self.proxy.router, self.keys, tenant,
                              s.disabled_pin_formats)  # fmt: skip
            listener = IsoListener(
                lc,
                gateway,
                self.exchange,
                lambda: getattr(self.proxy, "audit", None),
                self._tenant(lc.tenant),
                self._observe_latency,
            )
            self.listeners[lc.name] = listener
            await listener.start()

    async def stop(self, drain: float = 5.0) -> None:
        """Stop every listener (in-flight messages get up to ``drain`` seconds) and the key refresh."""
        for listener in self.listeners.values():
            await listener.stop(drain)
        await self.keys.stop()
