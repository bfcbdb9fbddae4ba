"""An asyncio host-command client for the conformance runner.

It keeps a few TCP connections to one HSM (or proxy) and pipelines requests over them with a
bounded window. Every request gets a header that is unique among the requests in flight
(``header_length`` decimal digits, wrapping), which is the correlation id: a response is matched to
its request by the echoed header, so a late answer to a timed-out request is recognised and dropped.
With header length 0 responses are matched in order per connection.

Results are response payloads *without* the header. A request that times out, or whose
connection fails, yields an exception object (never a hang): a hung target is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from protocols.framing import FrameError, Framer, encode_frame

#: Default number of requests in flight per client (all connections together).
DEFAULT_WINDOW = 64
#: Default seconds to wait for one response.
DEFAULT_TIMEOUT = 10.0


class ClientError(Exception):
    """A request got no usable response (timeout, closed connection, bad frame)."""


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pending: dict[bytes, asyncio.Future[bytes]] = field(default_factory=dict)
    order: deque[bytes] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    closed: bool = False


class HostClient:
    """Pipelining client of one host-command endpoint.

    Args:
        host, port: the endpoint.
        header_length: the endpoint's configured message header length (0-255).
        connections: TCP connections to keep open (requests are spread round-robin).
        window: most requests in flight at once.
        timeout: seconds to wait for each response.
    """

    def __init__(
        self,
        host: str,
        port: int,
        header_length: int = 4,
        *,
        connections: int = 2,
        window: int = DEFAULT_WINDOW,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not 0 <= header_length <= 255:
            raise ValueError("header length must be 0..255")
        self.host = host
        self.port = port
        self.header_length = header_length
        self.timeout = timeout
        self._n_connections = max(1, connections)
        self._conns: list[_Connection | None] = [None] * self._n_connections
        self._window = asyncio.Semaphore(max(1, window))
        self._counter = 0
        self._next_conn = 0
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> HostClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open every connection (raises OSError when the endpoint is unreachable)."""
        for i in range(self._n_connections):
            await self._connection(i)

    async def close(self) -> None:
        """Close every connection; requests still in flight fail."""
        for i, conn in enumerate(self._conns):
            if conn is not None:
                self._fail(conn, ClientError("client closed"))
                conn.writer.close()
                with contextlib.suppress(Exception):
                    await conn.writer.wait_closed()
                if conn.task is not None:
                    conn.task.cancel()
                    with contextlib.suppress(BaseException):
                        await conn.task
                self._conns[i] = None

    async def _connection(self, index: int) -> _Connection:
        async with self._lock:
            conn = self._conns[index]
            if conn is not None and not conn.closed:
                return conn
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout
            )
            conn = _Connection(reader, writer)
            conn.task = asyncio.create_task(self._read_loop(conn))
            self._conns[index] = conn
            return conn

    def _fail(self, conn: _Connection, exc: Exception) -> None:
        conn.closed = True
        for fut in conn.pending.values():
            if not fut.done():
                fut.set_exception(ClientError(str(exc)))
        conn.pending.clear()
        conn.order.clear()

    async def _read_loop(self, conn: _Connection) -> None:
        framer = Framer(65535)
        try:
            while True:
                chunk = await conn.reader.read(65536)
                if not chunk:
                    raise ClientError("connection closed by peer")
                for payload in framer.feed(chunk):
                    self._deliver(conn, payload)
        except (OSError, FrameError, ClientError) as exc:
            self._fail(conn, exc if isinstance(exc, ClientError) else ClientError(type(exc).__name__))

    def _deliver(self, conn: _Connection, payload: bytes) -> None:
        n = self.header_length
        if n:
            header = payload[:n]
            fut = conn.pending.pop(header, None)
            if fut is None:
                return  # answer to a request that already timed out
        else:
            if not conn.order:
                return
            header = conn.order.popleft()
            fut = conn.pending.pop(header, None)
            if fut is None:
                return
        if not fut.done():
            fut.set_result(payload[n:])

    def _new_header(self, conn: _Connection) -> bytes:
        n = self.header_length
        if n == 0:
            self._counter += 1
            return self._counter.to_bytes(8, "big")  # private key of the pending map only
        modulus = 10 ** min(n, 18)
        for _ in range(modulus):
            self._counter = (self._counter + 1) % modulus
            header = str(self._counter).zfill(n).encode("ascii")
            if header not in conn.pending:
                return header
        raise ClientError("no free header value")  # pragma: no cover - window << 10**n

    async def call(self, request: bytes) -> bytes:
        """Send one request (command code + data, no header); return the response without header.

        Raises:
            ClientError: timeout, connection failure or unusable frame.
        """
        async with self._window:
            index = self._next_conn
            self._next_conn = (self._next_conn + 1) % self._n_connections
            try:
                conn = await self._connection(index)
            except (OSError, TimeoutError) as exc:
                raise ClientError(f"cannot connect: {type(exc).__name__}") from None
            header = self._new_header(conn)
            fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            conn.pending[header] = fut
            if self.header_length == 0:
                conn.order.append(header)
            wire_header = header if self.header_length else b""
            try:
                conn.writer.write(encode_frame(wire_header + request))
                await conn.writer.drain()
            except (OSError, ValueError) as exc:
                conn.pending.pop(header, None)
                if fut.done():
                    fut.exception()  # consumed: the error is reported below
                else:
                    fut.cancel()
                raise ClientError(f"send failed: {type(exc).__name__}") from None
            try:
                return await asyncio.wait_for(fut, self.timeout)
            except TimeoutError:
                conn.pending.pop(header, None)
                if self.header_length == 0:
                    # In-order matching is lost after a timeout: drop this connection.
                    self._fail(conn, ClientError("connection dropped after a timeout"))
                    conn.writer.close()
                raise ClientError(f"no response within {self.timeout:g} s") from None

    async def call_many(self, requests: Sequence[bytes]) -> list[bytes | ClientError]:
        """Pipeline ``requests``; return their responses (or errors) in request order."""

        async def one(req: bytes) -> bytes | ClientError:
            try:
                return await self.call(req)
            except ClientError as exc:
                return exc

        return list(await asyncio.gather(*(one(r) for r in requests)))
