"""The host-command listener: asyncio.Protocol, pipelined requests answered in order.

Layering (like asyncpg): :mod:`protocols` is the pure codec; this module owns buffers, ordering,
flow control and timeouts; :class:`Dispatcher` is plain Python on top that turns one request
payload into one response payload, going to a node only when the command needs an HSM.

Ordering: each request takes a slot in a per-connection queue; responses are written as the
head slot completes, so a slow command never lets a later response overtake it. Backpressure:
with ``max_inflight`` slots outstanding the connection stops reading until half have drained.

Tenant policy (:mod:`hsmproxy.tenancy`), when the dispatcher serves a tenant: every request takes a
token of the tenant's rate (waiting up to ``rate_max_delay``, else answered with the tenant's
``rate_limit_error``); a command outside the tenant's ``commands`` answers ``17``; a well-formed
request whose ``%LL`` names an LMK owned by another tenant answers ``13`` before its handler runs (an
LMK id owned by no tenant is answered ``13`` by the command itself, where payShield answers it).
The connection's tenant is chosen once, when it is accepted (``admit``).

Refused keys (:mod:`hsmproxy.keys.rotation`): with a keystore, a well-formed request presenting a
revoked, destroyed, suspended or grace-expired key in any of its key fields (the command's
:class:`~protocols.hostcmd.fields.Key` fields) answers ``29`` here, before any handler runs — the
one choke point for every command.

Audit (:class:`AuditSink`, the proxy's audit writer): the dispatcher is the one audit point of host
commands. A command that reached a node is one ``hostcmd`` record, queued when the node's answer
arrives — whether or not the client is still there to read it; with ``ack_after_durable`` the answer
is held until its record is on disk. A command answered before it reached a node (rate limit, ACL,
disabled, format error, refused key, shed, the proxy's own answers such as ``B2``) is only counted
(``refused``: one aggregate record per second per tenant, listener, command and code).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from hsmproxy.cluster.router import REQUEST_NOTE, NoNodeAvailable, RequestNote, Router
from hsmproxy.commands.base import CommandContext, Handler, Immediate
from hsmproxy.logs import LogThrottle
from hsmproxy.tenancy import TenantState
from protocols.framing import FrameError, Framer, encode_frame
from protocols.hostcmd.envelope import EnvelopeError, build_response, response_code, split_request
from protocols.hostcmd.fields import Field, Key, ParseError, format_fields, parse
from protocols.hostcmd.table import COMMANDS

log = logging.getLogger("hsmproxy.hostcmd")

MAX_FRAME = 32768
#: Error code when no node can serve the request (payShield's generic internal error).
NO_NODE_ERROR = "41"
#: Seconds a connection is not read after a read it had to shed under overload.
SHED_PAUSE = 0.001
#: Commands the proxy answers itself: never shed as overload (B2 is the switches' keep-alive).
LOCAL_COMMANDS = frozenset({"B2", "NO"})
LOCAL_CODES = frozenset(c.encode("latin-1") for c in LOCAL_COMMANDS)
_RESPONSE_CODES: dict[bytes, bytes] = {}


def _response_code(code: bytes) -> bytes:
    """The response code of a command code (memoised: the overload path answers thousands a second)."""
    found = _RESPONSE_CODES.get(code)
    if found is None:
        try:
            found = response_code(code.decode("latin-1")).encode("latin-1")
        except ValueError:
            found = code
        if len(_RESPONSE_CODES) < 4096:
            _RESPONSE_CODES[code] = found
    return found
#: A command the tenant may not call.
NOT_ALLOWED_ERROR = "17"
#: An LMK id the tenant does not own.
LMK_ERROR = "13"
#: A key that the keystore refuses (revoked, destroyed, suspended, grace over).
REFUSED_KEY_ERROR = "29"


#: A host-command audit record as queued: listener, tenant, client, command, result, latency (s),
#: header, node, key ids (:data:`hsmproxy.audit.form.HostcmdItem`).
AuditItem = tuple[str, str, str, str, str, float, bytes, str, tuple[tuple[str, str], ...]]


class AuditSink(Protocol):
    """What the dispatcher tells the audit trail (:class:`~hsmproxy.audit.writer.AuditWriter`)."""

    @property
    def ack_after_durable(self) -> bool:
        """True: hold each answer until its record is on disk."""
        ...

    def hostcmd(self, item: AuditItem) -> int:
        """Queue one executed command (listener, tenant, client, command, result, latency s, header,
        node, key ids); its ticket."""
        ...

    def refused(self, tenant: str, listener: str, command: str, result: str, count: int = 1) -> None:
        """Count commands answered before they reached a node."""
        ...

    def when_durable(self, ticket: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the record of ``ticket`` is on disk."""
        ...


class RefusedKeySet(Protocol):
    """What the dispatcher asks about keys (:class:`hsmproxy.keys.rotation.RefusedKeys`)."""

    @property
    def digests(self) -> frozenset[str]:
        """Digests of refused cryptograms (empty: nothing to check)."""
        ...

    @property
    def named(self) -> Mapping[str, tuple[str, str]]:
        """Named keystore keys by cryptogram: (``tenant/name@version``, check value)."""
        ...

    def refused(self, cryptogram: str) -> bool:
        """True if the cryptogram must be refused."""
        ...


def _key_names(layout: tuple[Field, ...]) -> tuple[str, ...]:
    """Names of the :class:`Key` fields of a layout, nested ones included."""
    names: list[str] = []
    for f in layout:
        if isinstance(f, Key):
            names.append(f.name)
        inner = getattr(f, "fields", None)
        if isinstance(inner, tuple):
            names += _key_names(inner)
    return tuple(dict.fromkeys(names))


_KEY_FIELDS: dict[str, tuple[str, ...]] = {code: _key_names(spec.request) for code, spec in COMMANDS.items()}


def _named_keys(
    named: Mapping[str, tuple[str, str]], fields: tuple[str, ...], values: Mapping[str, Any]
) -> tuple[tuple[str, str], ...]:
    """(id, check value) of the named keystore keys among a request's key fields (dict lookups only)."""
    out = []
    for name in fields:
        value = values.get(name)
        if isinstance(value, str):
            found = named.get(value) or named.get(value.upper())
            if found is not None:
                out.append(found)
    return tuple(out)


_NO_NODE_LOG = LogThrottle()


def _trailer_of(body: bytes) -> bytes:
    i = body.find(b"\x19")
    return body[i:] if i >= 0 else b""


def _answer(out: asyncio.Future[bytes], response: bytes) -> None:
    if not out.done():  # cancelled when the client went away: its record is written all the same
        out.set_result(response)


class Dispatcher:
    """One request payload in, one response payload (or an awaitable of it) out."""

    def __init__(
        self,
        router: Router,
        handlers: Mapping[str, Handler],
        context: CommandContext,
        header_length: int,
        disabled_commands: frozenset[str] = frozenset(),
        tenant: TenantState | None = None,
        foreign_lmks: frozenset[str] = frozenset(),
        refused: RefusedKeySet | None = None,
        listener: str = "",
        audit: AuditSink | None = None,
    ) -> None:
        self.refused = refused
        self.listener = listener
        self.audit = audit
        self.router = router
        self.handlers = handlers
        self.context = context
        self.header_length = header_length
        self.disabled_commands = disabled_commands
        self.tenant = tenant
        self.foreign_lmks = foreign_lmks

    @property
    def tenant_name(self) -> str:
        """The tenant this dispatcher serves."""
        return self.tenant.name if self.tenant is not None else self.context.tenant

    def handle(self, payload: bytes, client: str = "") -> bytes | Awaitable[bytes] | None:
        """Answer immediately (bytes), later (awaitable), or None for an unusable frame. ``client``
        names the connection's client in audit records."""
        try:
            req = split_request(payload, self.header_length)
        except EnvelopeError:
            return None
        if req.code not in LOCAL_COMMANDS and self.router.overloaded():
            # it would not start in time: answered before it costs a parse (the proxy's own answers,
            # B2 the switches' keep-alive among them, are still given)
            self.router.shed_early += 1
            return self._local(req.header, req.code, NO_NODE_ERROR, _trailer_of(req.body))
        tenant = self.tenant
        if tenant is not None:
            delay = tenant.admit_request()
            if delay is None:
                error = tenant.config.rate_limit_error
                return self._local(req.header, req.code, error, _trailer_of(req.body))
            if delay > 0:
                return self._after(delay, req.header, req.code, req.body, client)
        return self._serve(req.header, req.code, req.body, client)

    async def _after(self, delay: float, header: bytes, code: str, body: bytes, client: str) -> bytes:
        """Serve a request once its rate-limit token is due."""
        await asyncio.sleep(delay)
        result = self._serve(header, code, body, client)
        return result if isinstance(result, bytes) else await result

    def shed(self, counts: Mapping[bytes, int]) -> None:
        """Count requests a connection answered ``41`` in bulk under overload (by command code)."""
        self.router.shed_early += sum(counts.values())
        if self.audit is not None:
            for code, n in counts.items():
                self.audit.refused(self.tenant_name, self.listener, code.decode("latin-1"), "41", n)

    def _local(self, header: bytes, code: str, error: str, trailer: bytes, body: bytes = b"") -> bytes:
        """An answer given without a node: counted by the audit trail, not written one by one."""
        if self.audit is not None:
            self.audit.refused(self.tenant_name, self.listener, code, error)
        return build_response(header, code, error, body, trailer)

    def _serve(self, header: bytes, code: str, body: bytes, client: str = "") -> bytes | Awaitable[bytes]:
        spec = COMMANDS.get(code)
        handler = self.handlers.get(code)
        if spec is None or handler is None:
            return self._local(header, code, "68", _trailer_of(body))
        if self.tenant is not None and not self.tenant.config.allows(code):
            self.tenant.denied_commands += 1
            return self._local(header, code, NOT_ALLOWED_ERROR, _trailer_of(body))
        if code in self.disabled_commands:
            return self._local(header, code, "68", _trailer_of(body))
        try:
            parsed = parse(spec.request, body)
        except ParseError as exc:
            return self._local(header, code, exc.code, _trailer_of(body))
        if parsed.values.get("lmk_id") in self.foreign_lmks:
            return self._local(header, code, LMK_ERROR, parsed.trailer)
        refused = self.refused
        key_ids: tuple[tuple[str, str], ...] = ()
        if refused is not None:
            key_fields = _KEY_FIELDS.get(code, ())
            if self.audit is not None and refused.named:
                key_ids = _named_keys(refused.named, key_fields, parsed.values)
            if refused.digests:
                for name in key_fields:
                    value = parsed.values.get(name)
                    if isinstance(value, str) and refused.refused(value):
                        return self._local(header, code, REFUSED_KEY_ERROR, parsed.trailer)
        action = handler(parsed.values, self.context)
        if isinstance(action, Immediate):
            error, out = self._respond(
                header, code, action.error, action.values, parsed.values, parsed.trailer
            )
            if self.audit is not None:
                self.audit.refused(self.tenant_name, self.listener, code, error)
            return out
        return self._remote(
            header, code, action.name, action.args, action.affinity, parsed.values, parsed.trailer,
            client, key_ids,
        )  # fmt: skip

    def _respond(
        self,
        header: bytes,
        code: str,
        error: str,
        values: Mapping[str, Any],
        request_values: Mapping[str, Any],
        trailer: bytes,
    ) -> tuple[str, bytes]:
        """(the error code answered, the response)."""
        body = b""
        if values:
            try:
                body = format_fields(COMMANDS[code].response, values, request_values)
            except (KeyError, ValueError):
                log.error("%s: operation result does not fit the response layout", code)
                error, body = "41", b""
        return error, build_response(header, code, error, body, trailer)

    def _remote(
        self,
        header: bytes,
        code: str,
        op: str,
        args: dict[str, Any],
        affinity: str,
        request_values: Mapping[str, Any],
        trailer: bytes,
        client: str = "",
        key_ids: tuple[tuple[str, str], ...] = (),
    ) -> asyncio.Future[bytes]:
        """The response, once a node answered: a future completed by callbacks (no task)."""
        audit = self.audit
        if audit is None:
            routed = self.router.submit(op, args, affinity)
        else:
            started = time.perf_counter()
            note = RequestNote(key_ids=key_ids)
            token = REQUEST_NOTE.set(note)  # the router notes the node that answers
            try:
                routed = self.router.submit(op, args, affinity)
            finally:
                REQUEST_NOTE.reset(token)
        out: asyncio.Future[bytes] = routed.get_loop().create_future()

        def done(fut: asyncio.Future[tuple[str, Any]]) -> None:
            exc = fut.exception() if not fut.cancelled() else TimeoutError()
            if exc is None:
                error, values = fut.result()
                error, response = self._respond(header, code, error, values, request_values, trailer)
            else:
                error, response = NO_NODE_ERROR, self._failed(code, exc, header, trailer)
            if audit is None:
                _answer(out, response)
                return
            if not note.tried:  # it never reached a node: counted with the refusals
                audit.refused(self.tenant_name, self.listener, code, error)
                _answer(out, response)
                return
            latency = time.perf_counter() - started
            # sent to a node: recorded, with the node that answered, else the last one it went to (41)
            node, keys = note.node or note.tried, note.key_ids
            item = (self.listener, self.tenant_name, client, code, error, latency, header, node, keys)
            ticket = audit.hostcmd(item)
            if audit.ack_after_durable:
                audit.when_durable(ticket, lambda: _answer(out, response))
            else:
                _answer(out, response)

        routed.add_done_callback(done)
        return out

    @staticmethod
    def _failed(code: str, exc: BaseException, header: bytes, trailer: bytes) -> bytes:
        """The ``41`` answer of a request no node could serve (logged, throttled)."""
        if isinstance(exc, NoNodeAvailable | TimeoutError):
            skipped = _NO_NODE_LOG.due()
            if skipped is not None:  # under overload this would be thousands of lines a second
                log.warning(
                    "%s: no node could serve the request (%s)%s", code, type(exc).__name__,
                    f"; {skipped} more such answers since the last line" if skipped else "",
                )  # fmt: skip
        else:
            log.error("%s: routing failed", code, exc_info=exc)
        return build_response(header, code, NO_NODE_ERROR, b"", trailer)


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """What one answered host command was, for observers (metrics, audit): never a field value.

    ``error`` is the response's error code; ``header`` the echoed message header (the client's
    correlation id); ``latency`` seconds from the request's arrival to its response being written.
    (The audit trail is fed by the :class:`Dispatcher`, which also knows the node and the keys.)
    """

    listener: str
    tenant: str
    peer: str
    command: str
    error: str
    latency: float
    header: bytes


CommandObserver = Callable[[CommandRecord], None]


class HostCommandProtocol(asyncio.Protocol):
    """One switch connection."""

    def __init__(
        self,
        dispatcher: Dispatcher | None,
        max_inflight: int = 256,
        on_close: Any = None,
        admit: Callable[[HostCommandProtocol], Dispatcher | None] | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        #: Called when the connection is made (after a TLS handshake): the dispatcher of the
        #: connection's tenant, or None to refuse it (the callback logs why).
        self._admit = admit
        #: Called once when an admitted connection closes (the tenant's connection count).
        self.release: Callable[[], None] | None = None
        self._framer = Framer(MAX_FRAME)
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: deque[asyncio.Future[bytes] | bytes] = deque()
        self._max_inflight = max_inflight
        self._paused = False
        self._shed_pause = False  # reading paused for SHED_PAUSE after a read shed under overload
        self._drain_due = False  # a drain is scheduled for this loop pass
        self._closing_after_flush = False
        self._graceful = False
        self._eof_sent = False
        self._on_close = on_close
        self.peer: Any = None
        #: Set by the listener when the connection limit is reached: the connection is closed at once.
        self.over_limit = False
        #: Called once per answered command, in order (the one choke point for metrics and audit).
        self.observer: CommandObserver | None = None
        self.listener = ""
        #: Who the client is, for audit records and the console: ``"<host>:<port>"``, or
        #: ``"<certificate subject> <host>:<port>"`` on mutual TLS (set when the connection is admitted).
        self.client = ""
        self._meta: deque[tuple[float, str]] = deque()
        #: For the admin console (SHOW CLIENTS, KILL CLIENT): id, accepted at (epoch s), requests read.
        self.conn_id = 0
        self.since = time.time()
        self.requests = 0

    @property
    def busy(self) -> bool:
        """True while responses are pending on this connection."""
        return bool(self._slots)

    @property
    def inflight(self) -> int:
        """Requests read and not yet answered."""
        return len(self._slots)

    @property
    def tenant_name(self) -> str:
        """The connection's tenant ("" before it is admitted)."""
        d = self._dispatcher
        if d is None:
            return ""
        return d.tenant.name if d.tenant is not None else d.context.tenant

    def close(self) -> None:
        """Close the connection now."""
        if self._transport is not None:
            self._transport.close()

    def drain_and_close(self) -> None:
        """Graceful stop: read no further request, answer those already read, then send EOF (the
        connection closes when the peer closes it, or at :meth:`close`)."""
        if self._transport is not None:
            self._graceful = True
            self._close_after_flush()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport and the peer address (or refuse it when over the limit)."""
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        # once per connection: asyncio.get_running_loop() is a getpid() system call on Python 3.11
        self._loop = asyncio.get_running_loop()
        self.peer = self._transport.get_extra_info("peername")
        self.client = f"{self.peer[0]}:{self.peer[1]}" if isinstance(self.peer, tuple) else str(self.peer)
        if self.over_limit:
            log.warning("refusing connection from %s: connection limit reached", self.peer)
            transport.close()
            return
        if self._admit is not None:
            self._dispatcher = self._admit(self)
            if self._dispatcher is None:
                self._transport = None
                transport.close()

    @property
    def transport(self) -> asyncio.Transport | None:
        """The connection's transport (``get_extra_info`` gives ``peername`` and ``peercert``)."""
        return self._transport

    def data_received(self, data: bytes) -> None:
        """Frame the bytes; queue each request in order."""
        if self._transport is None or self._closing_after_flush or self._dispatcher is None:
            return
        try:
            frames = self._framer.feed(data)
        except FrameError as exc:
            log.warning("closing connection from %s: %s", self.peer, exc)
            self._close_after_flush()
            return
        loop = self._loop
        observe = self.observer is not None
        self.requests += len(frames)
        dispatcher = self._dispatcher
        hl = dispatcher.header_length
        client = self.client
        arrived = time.perf_counter() if observe else 0.0  # one read: one arrival time
        # Overloaded: what this read brought cannot start in time, so it is answered 41 in one tight
        # loop (no parse, no per-request objects, counted in bulk): refusing must cost far less than
        # serving, or under a flood the refusals starve the nodes' answers (receive livelock).
        shed: dict[bytes, int] | None = {} if dispatcher.router.overloaded() else None
        for frame in frames:
            code = frame[hl : hl + 2]
            if shed is not None and len(code) == 2 and code not in LOCAL_CODES:
                shed[code] = shed.get(code, 0) + 1
                trailer = frame.find(b"\x19", hl + 2)
                self._slots.append(
                    frame[:hl] + _response_code(code) + b"41" + (frame[trailer:] if trailer >= 0 else b"")
                )
                if observe:
                    self._meta.append((arrived, ""))  # answered, not observed one by one
                continue
            result = dispatcher.handle(frame, client)
            if result is None:
                log.warning("closing connection from %s: frame shorter than header and command", self.peer)
                self._close_after_flush()
                return
            if observe:
                self._meta.append((arrived, frame[hl : hl + 2].decode("latin-1")))
            if isinstance(result, bytes):
                self._slots.append(result)
            else:
                fut = asyncio.ensure_future(result, loop=loop)
                fut.add_done_callback(self._on_done)
                self._slots.append(fut)
        if shed:
            dispatcher.shed(shed)
            if not self._shed_pause and self._transport is not None and loop is not None:
                # read this connection again in a moment: its next requests come in one bigger read
                # (fewer wake-ups and system calls per refusal while the flood lasts)
                self._shed_pause = True
                self._transport.pause_reading()
                loop.call_later(SHED_PAUSE, self._end_shed_pause)
        self._drain()
        if not self._paused and len(self._slots) >= self._max_inflight and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _on_done(self, _fut: asyncio.Future[bytes]) -> None:
        # A node's batch answers many requests at once: drain once after all of them, so the answers
        # of this connection leave in one write (one system call, not one per answer).
        if not self._drain_due and self._loop is not None:
            self._drain_due = True
            self._loop.call_soon(self._due_drain)

    def _due_drain(self) -> None:
        self._drain_due = False
        self._drain()

    def _end_shed_pause(self) -> None:
        self._shed_pause = False
        if self._transport is not None and not self._paused and not self._closing_after_flush:
            self._transport.resume_reading()

    def _drain(self) -> None:
        transport = self._transport
        if transport is None:
            return
        out = bytearray()
        slots = self._slots
        answered: list[bytes] = []
        while slots:
            head = slots[0]
            if isinstance(head, bytes):
                response = head
            elif head.done():
                # The dispatcher catches its own errors; a cancelled slot only happens on close.
                response = b"" if head.cancelled() or head.exception() is not None else head.result()
            else:
                break
            out += encode_frame(response)
            answered.append(response)
            slots.popleft()
        if out:
            transport.write(bytes(out))
            if self.observer is not None and self._meta:
                self._observe(answered)
        if self._paused and len(slots) <= self._max_inflight // 2:
            self._paused = False
            if not self._shed_pause:
                transport.resume_reading()
        if self._closing_after_flush and not slots and not self._eof_sent:
            if self._graceful and transport.can_write_eof():
                # FIN, then read and discard until the peer closes: closing with unread requests
                # in the socket would send a RST, which can destroy answers the peer has not read.
                self._eof_sent = True
                transport.write_eof()
                transport.resume_reading()
            else:
                transport.close()

    def _observe(self, answered: list[bytes]) -> None:
        observer = self.observer
        dispatcher = self._dispatcher
        if observer is None or dispatcher is None:
            return
        hl = dispatcher.header_length
        tenant = dispatcher.tenant_name
        peer = self.client
        now = time.perf_counter()
        for response in answered:
            if not self._meta:
                break
            started, command = self._meta.popleft()
            if not command:  # shed in bulk under overload: counted by the dispatcher
                continue
            record = CommandRecord(
                self.listener, tenant, peer, command, response[hl + 2 : hl + 4].decode("latin-1"),
                now - started, response[:hl],
            )  # fmt: skip
            try:
                observer(record)
            except Exception:  # an observer must never break the connection
                log.exception("command observer failed")

    def _close_after_flush(self) -> None:
        self._closing_after_flush = True
        if self._transport is not None:
            self._transport.pause_reading()
        self._drain()
        if not self._slots and self._transport is not None and not self._eof_sent:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """Cancel pending work for this connection."""
        for slot in self._slots:
            if not isinstance(slot, bytes):
                slot.cancel()
        self._slots.clear()
        self._transport = None
        if self.release is not None:
            self.release()
            self.release = None
        if self._on_close is not None:
            self._on_close(self)
