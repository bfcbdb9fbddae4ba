"""Liveness, readiness and metrics over HTTP (``[http] bind``), stdlib asyncio only.

* ``GET /livez``  -> 200 while the process serves at all (never depends on the HSMs);
* ``GET /readyz`` -> 200 while at least one node can take requests; 503 while none can, while
  draining (a graceful stop has started) and before the first health-check round has completed
  (``?verbose`` adds one line per node: name, admin state, operational state);
* ``GET /metrics`` -> the Prometheus text exposition of :mod:`hsmproxy.metrics` (404 without one).

One request per connection (``Connection: close``); anything else answers 404 / 405 / 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from hsmproxy.cluster.router import Router

log = logging.getLogger("hsmproxy.http")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


#: Content type of the plain-text answers.
TEXT = "text/plain; charset=utf-8"


def _response(status: int, body: str | bytes, head_only: bool = False, content_type: str = TEXT) -> bytes:
    data = body.encode() if isinstance(body, str) else body
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else data)


class ReadinessServer:
    """The /livez, /readyz and /metrics endpoints.

    ``metrics`` renders the exposition (and ``metrics_type`` is its content type); ``checked``
    tells whether the first health-check round has completed; ``draining`` is set by the proxy
    when a graceful stop starts.
    """

    def __init__(
        self,
        router: Router,
        metrics: Callable[[], bytes] | None = None,
        metrics_type: str = TEXT,
        checked: Callable[[], bool] | None = None,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.metrics_type = metrics_type
        self.checked = checked
        self.draining = False
        self._server: asyncio.Server | None = None

    def _not_ready(self) -> str:
        """Why the proxy is not ready ("" when it is)."""
        if self.draining:
            return "draining"
        if self.checked is not None and not self.checked():
            return "waiting for the first health check"
        if not self.router.ready():
            return "no node is up"
        return ""

    def answer(self, method: str, target: str) -> tuple[int, str]:
        """Status and body for one request line."""
        if method not in ("GET", "HEAD"):
            return 405, "method not allowed\n"
        path, _, query = target.partition("?")
        if path == "/livez":
            return 200, "ok\n"
        if path == "/readyz":
            why = self._not_ready()
            ready = not why
            body = "ready\n" if ready else f"not ready: {why}\n"
            if "verbose" in query.split("&"):
                now = self.router.clock()
                for node in self.router.nodes:
                    st = self.router.state(node)
                    backup = " backup" if st.backup else ""
                    body += f"{node.name} {st.admin.value} {st.status(now)}{backup}\n"
            return (200 if ready else 503), body
        return 404, "not found\n"

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port; returns the bound port."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=8192, reuse_address=True)
        bound: int = self._server.sockets[0].getsockname()[1]
        log.info("readiness endpoints on http://%s:%d/readyz", host, bound)
        return bound

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            parts = request_line.decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                writer.write(_response(400, "bad request\n"))
            else:
                while True:  # skip the headers
                    line = await asyncio.wait_for(reader.readline(), 5)
                    if line in (b"\r\n", b"\n", b""):
                        break
                head_only = parts[0] == "HEAD"
                path = parts[1].partition("?")[0]
                if path == "/metrics" and self.metrics is not None and parts[0] in ("GET", "HEAD"):
                    try:
                        page = self.metrics()
                    except Exception:  # a broken collector must not take the endpoint down
                        log.exception("rendering /metrics failed")
                        writer.write(_response(500, "metrics unavailable\n", head_only=head_only))
                    else:
                        writer.write(_response(200, page, head_only, self.metrics_type))
                else:
                    status, body = self.answer(parts[0], parts[1])
                    writer.write(_response(status, body, head_only=head_only))
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, OSError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
