"""The emulator's TCP listener: length-prefixed host commands, answered in order.

The emulator is a reference, not a performance target: each frame is handled synchronously in
the event loop, which keeps responses on a connection in request order by construction.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import suppress
from typing import cast

from emulator.hsm import EmulatorHsm
from protocols.framing import FrameError, Framer, encode_frame

log = logging.getLogger("emulator")

#: Largest request payload accepted; a longer declared length closes the connection.
MAX_FRAME = 32768


class HostCommandProtocol(asyncio.Protocol):
    """One client connection speaking payShield host commands."""

    def __init__(self, hsm: EmulatorHsm) -> None:
        self._hsm = hsm
        self._framer = Framer(MAX_FRAME)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport."""
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        """Frame the bytes and answer each complete command."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        try:
            frames = self._framer.feed(data)
        except FrameError as exc:
            log.warning("closing connection: %s", exc)
            transport.close()
            return
        out = bytearray()
        for frame in frames:
            response = self._hsm.handle(frame)
            if response is None:
                log.warning("closing connection: frame shorter than header and command code")
                if out:
                    transport.write(bytes(out))
                transport.close()
                return
            out += encode_frame(response)
        if out:
            transport.write(bytes(out))

    def close(self) -> None:
        """Close the connection (a server that stops closes the connections it still has)."""
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the transport."""
        self._transport = None


async def serve(hsm: EmulatorHsm, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve host commands on ``host:port`` until cancelled or SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HostCommandProtocol(hsm), host, port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    addrs = ", ".join(str(s.getsockname()) for s in server.sockets)
    log.info("emulator listening on %s (header length %d)", addrs, hsm.header_length)
    if ready is not None:
        ready.set()
    try:
        async with server:
            await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
