"""Audit records to a SIEM: RFC 5424 syslog over TCP (RFC 6587 octet counting) or TLS (RFC 5425).

Each line of the audit trail, once written in the audit file (every record and every signed checkpoint,
or only the checkpoints with ``send = "checkpoints"``), is queued here as one syslog message::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD-ID seq="…" kind="…" result="…"] MSG

* ``PRI`` = facility * 8 + severity: severity 6 (informational), 5 (notice) for a record whose
  ``result`` is not ``00`` and for ``key`` records; facility from ``[audit.syslog] facility``
  (a number 0..23 or a name: ``audit`` = 13, the default, ``local0`` .. ``local7`` …).
* ``TIMESTAMP`` is the record's ``time``; ``MSGID`` its ``kind``; ``PROCID`` the proxy's pid.
* ``STRUCTURED-DATA``: one element ``sd_id`` (default ``hsmproxy@32473``: 32473 is the example
  enterprise number of RFC 5612; set your own) with ``seq``, ``kind`` and ``result`` (when the record
  has one); values are escaped per RFC 5424 (``"``, ``\\`` and ``]``).
* ``MSG`` is the line exactly as in the audit file, ASCII: the SIEM holds a witness copy of the
  checkpoints (``hsmproxy audit verify --witness``) and can check records against them itself.

Framing: ``MSG-LEN SP SYSLOG-MSG`` (octet counting, RFC 6587 section 3.4.1; RFC 5425 uses the same).

Delivery never blocks the event loop or the audit file: :meth:`SyslogSink.submit` appends to a bounded
in-memory queue (``max_queue``) and returns; one task connects (TLS when ``tls`` or ``ca`` is set),
writes batches and reconnects with exponential back-off (0.1 s doubling to ``max_backoff``) when the
connection fails or the server closes it. A batch whose write failed is sent again after the reconnect
(so a SIEM may see a record twice: de-duplicate by ``seq``); records already handed to the kernel when a
connection breaks can be lost. When the queue is full the OLDEST queued
record is dropped; drops are counted (:attr:`SyslogSink.dropped`) and logged at WARNING (at most once per
``DROP_LOG_INTERVAL`` seconds, with the running count). The audit file remains the record of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmproxy.configutil import resolve_path, split_host_port

log = logging.getLogger("hsmproxy.audit")

#: RFC 5424 facility names (section 6.2.1) -> codes.
FACILITIES: dict[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13, "alert": 14, "clock": 15,
    **{f"local{i}": 16 + i for i in range(8)},
}  # fmt: skip
SEVERITY_INFO = 6
SEVERITY_NOTICE = 5
#: First reconnect delay (doubles per failed attempt up to ``max_backoff``).
BASE_BACKOFF = 0.1
#: Seconds between two WARNING lines about dropped records.
DROP_LOG_INTERVAL = 10.0
#: Most messages written per write call.
MAX_WRITE = 500
CONNECT_TIMEOUT = 10.0


class SyslogConfigError(ValueError):
    """The ``[audit.syslog]`` section is invalid."""


@dataclass(frozen=True)
class SyslogSettings:
    """``[audit.syslog]``: where and how audit records go to a SIEM."""

    host: str
    port: int
    tls: bool = False
    #: CA bundle verifying the server (TLS; default: the system's), client certificate and key (mutual TLS).
    ca: str = ""
    cert: str = ""
    key: str = ""
    #: Name checked in the server's certificate (default: ``host``).
    server_name: str = ""
    app_name: str = "hsmproxy"
    facility: int = 13
    #: HOSTNAME field (default: this machine's host name).
    hostname: str = ""
    sd_id: str = "hsmproxy@32473"
    max_queue: int = 10_000
    max_backoff: float = 30.0
    #: ``all``: every line of the trail; ``checkpoints``: only the signed checkpoints (a witness of the
    #: trail at a few messages a second).
    send: str = "all"


def _path(base: Path, value: Any) -> str:
    return resolve_path(base, value)


def _printable(value: str, limit: int, what: str) -> str:
    if not value or len(value) > limit or any(not 33 <= ord(c) <= 126 for c in value):
        raise SyslogConfigError(f"audit.syslog: {what} must be 1..{limit} printable ASCII characters")
    return value


def parse_syslog_settings(raw: Any, base: Path) -> SyslogSettings | None:
    """The ``[audit.syslog]`` table (None when absent or without ``address``)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SyslogConfigError("audit.syslog: expected a table")
    known = {"address", "tls", "ca", "cert", "key", "server_name", "app_name", "facility", "hostname",
             "sd_id", "max_queue", "max_backoff", "send"}  # fmt: skip
    unknown = set(raw) - known
    if unknown:
        raise SyslogConfigError(f"audit.syslog: unknown keys {sorted(unknown)}")
    address = str(raw.get("address", ""))
    if not address:
        return None
    found = split_host_port(address, default_host="")
    if found is None or found[1] == 0:
        raise SyslogConfigError(f"audit.syslog: address must be HOST:PORT, got {address!r}")
    host, port = found
    facility_raw = raw.get("facility", "audit")
    if isinstance(facility_raw, int) and not isinstance(facility_raw, bool):
        facility = facility_raw
    elif str(facility_raw).lower() in FACILITIES:
        facility = FACILITIES[str(facility_raw).lower()]
    else:
        raise SyslogConfigError(f"audit.syslog: unknown facility {facility_raw!r}")
    if not 0 <= facility <= 23:
        raise SyslogConfigError("audit.syslog: facility must be 0..23")
    try:
        s = SyslogSettings(
            host=host.strip("[]"),
            port=port,
            tls=bool(raw.get("tls", False)) or bool(raw.get("ca")),
            ca=_path(base, raw.get("ca")),
            cert=_path(base, raw.get("cert")),
            key=_path(base, raw.get("key")),
            server_name=str(raw.get("server_name", "")),
            app_name=str(raw.get("app_name", "hsmproxy")),
            facility=facility,
            hostname=str(raw.get("hostname", "")),
            sd_id=str(raw.get("sd_id", "hsmproxy@32473")),
            max_queue=int(raw.get("max_queue", 10_000)),
            max_backoff=float(raw.get("max_backoff", 30.0)),
            send=str(raw.get("send", "all")),
        )
    except (TypeError, ValueError) as exc:
        raise SyslogConfigError(f"audit.syslog: {exc}") from None
    _printable(s.app_name, 48, "app_name")
    if s.hostname:
        _printable(s.hostname, 255, "hostname")
    if "@" not in s.sd_id or any(c in s.sd_id for c in ' ="]'):
        raise SyslogConfigError("audit.syslog: sd_id must look like name@enterprise-number")
    _printable(s.sd_id, 32, "sd_id")
    if s.send not in ("all", "checkpoints"):
        raise SyslogConfigError('audit.syslog: send must be "all" or "checkpoints"')
    if s.max_queue < 1 or s.max_backoff <= 0:
        raise SyslogConfigError("audit.syslog: max_queue >= 1 and max_backoff > 0")
    if bool(s.cert) != bool(s.key):
        raise SyslogConfigError("audit.syslog: cert and key go together")
    if (s.cert or s.key) and not s.tls:
        raise SyslogConfigError("audit.syslog: cert/key need tls = true")
    for name in ("ca", "cert", "key"):
        value = getattr(s, name)
        if value and not Path(value).is_file():
            raise SyslogConfigError(f"audit.syslog: {name}: no such file {value}")
    return s


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_field(value: str, limit: int) -> str:
    """A header field (printable US-ASCII, no spaces) or the NILVALUE ``-``."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def format_message(settings: SyslogSettings, hostname: str, record: dict[str, Any], line: bytes) -> bytes:
    """One RFC 5424 message (without framing) for an audit record and its canonical JSON ``line``."""
    result = record.get("result")
    notice = (result is not None and result != "00") or record.get("kind") == "key"
    pri = settings.facility * 8 + (SEVERITY_NOTICE if notice else SEVERITY_INFO)
    params = [("kind", str(record.get("kind", "")))]
    if record.get("seq") is not None:
        params.insert(0, ("seq", str(record["seq"])))
    if result is not None:
        params.append(("result", str(result)))
    sd = "[" + settings.sd_id + "".join(f' {k}="{_sd_escape(v)}"' for k, v in params) + "]"
    stamp = _header_field(str(record.get("time", "")), 64)
    msgid = _header_field(str(record.get("kind", "")), 32)
    app = _header_field(settings.app_name, 48)
    head = f"<{pri}>1 {stamp} {_header_field(hostname, 255)} {app} {os.getpid()} {msgid} {sd} "
    return head.encode("ascii", "replace") + line.rstrip(b"\n")


def frame(message: bytes) -> bytes:
    """RFC 6587 octet-counting frame: ``MSG-LEN SP MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


class SyslogSink:
    """Queues audit records and ships them to one syslog server (see the module docstring)."""

    def __init__(self, settings: SyslogSettings) -> None:
        self.settings = settings
        self.hostname = settings.hostname or socket.gethostname() or "-"
        self._queue: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ssl: ssl.SSLContext | None = self._context() if settings.tls else None
        #: Messages sent (written and drained), dropped (queue full), connections made.
        self.sent = 0
        self.dropped = 0
        self.connects = 0
        self.connected = False
        self.last_error = ""
        self._last_drop_log = 0.0

    def _context(self) -> ssl.SSLContext:
        s = self.settings
        ctx = ssl.create_default_context(cafile=s.ca or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if s.cert:
            ctx.load_cert_chain(s.cert, s.key)
        return ctx

    @property
    def queued(self) -> int:
        """Messages waiting to be sent."""
        return len(self._queue)

    def submit_line(self, seq: int | None, kind: str, result: str, time: str, line: bytes) -> None:
        """Queue one written line of the trail (``seq`` None: a checkpoint; ``result`` "": none).

        With ``send = "checkpoints"`` only checkpoints are queued."""
        if self.settings.send == "checkpoints" and kind != "checkpoint":
            return
        record: dict[str, Any] = {"seq": seq, "kind": kind, "time": time}
        if result:
            record["result"] = result
        self.submit(record, line)

    def submit(self, record: dict[str, Any], line: bytes) -> None:
        """Queue one written audit record (never blocks; drops the oldest when the queue is full)."""
        self._queue.append(frame(format_message(self.settings, self.hostname, record, line)))
        if len(self._queue) > self.settings.max_queue:
            self._queue.popleft()
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= DROP_LOG_INTERVAL:
                self._last_drop_log = now
                log.warning(
                    "audit syslog: queue full (%d), %d record(s) dropped so far (%s)",
                    self.settings.max_queue, self.dropped, self.last_error or "server slow",
                )  # fmt: skip
        self._wake.set()

    def start(self) -> None:
        """Start the sending task."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-syslog")

    async def stop(self, timeout: float = 2.0) -> None:
        """Send what is queued (within ``timeout`` seconds), then stop."""
        if self._task is None:
            return
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._queue:
            log.warning("audit syslog: %d record(s) not sent at stop", len(self._queue))

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        s = self.settings
        extra: dict[str, Any] = {}
        if self._ssl is not None:
            extra = {"ssl": self._ssl, "server_hostname": s.server_name or s.host}
        return await asyncio.wait_for(asyncio.open_connection(s.host, s.port, **extra), CONNECT_TIMEOUT)

    async def _run(self) -> None:
        delay = BASE_BACKOFF
        while True:
            try:
                reader, writer = await self._connect()
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                self.last_error = f"connect: {type(exc).__name__}"
                log.warning("audit syslog: cannot connect to %s:%d (%s); retrying in %gs",
                            self.settings.host, self.settings.port, type(exc).__name__, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.max_backoff)
                continue
            self.connects += 1
            self.connected = True
            log.info("audit syslog: connected to %s:%d", self.settings.host, self.settings.port)
            closed = asyncio.ensure_future(reader.read(1))  # a syslog server never talks: EOF = gone
            delay = BASE_BACKOFF
            try:
                await self._send(writer, closed)
            except (OSError, ConnectionError, ssl.SSLError) as exc:
                self.last_error = f"send: {type(exc).__name__}"
                log.warning("audit syslog: connection lost (%s); reconnecting", type(exc).__name__)
            finally:
                self.connected = False
                closed.cancel()
                with contextlib.suppress(BaseException):
                    await closed
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.max_backoff)

    async def _send(self, writer: asyncio.StreamWriter, closed: asyncio.Future[bytes]) -> None:
        """Write batches until the connection fails (raises ConnectionError or OSError)."""
        while True:
            while not self._queue:
                self._wake.clear()
                wake: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
                waiting: set[asyncio.Future[Any]] = {wake, closed}
                try:
                    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
                if closed in done:
                    raise ConnectionResetError("the server closed the connection")
            batch = [self._queue.popleft() for _ in range(min(MAX_WRITE, len(self._queue)))]
            try:
                if closed.done():
                    raise ConnectionResetError("the server closed the connection")
                writer.write(b"".join(batch))
                await writer.drain()
            except BaseException:
                self._requeue(batch)
                raise
            self.sent += len(batch)

    def _requeue(self, batch: list[bytes]) -> None:
        """Put an unsent batch back at the head of the queue (it is sent again after reconnecting)."""
        self._queue.extendleft(reversed(batch))
        batch.clear()
        while len(self._queue) > self.settings.max_queue:
            self._queue.popleft()
            self.dropped += 1
