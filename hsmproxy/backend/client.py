"""Front-side handle on a node worker: spawn, batch per loop wake-up, restart with backoff.

:meth:`NodeClient.submit` queues an operation and returns a future. All operations queued in
one event-loop iteration go to the worker as one pipe message; the worker answers with one
message. When the worker dies every in-flight future fails with :class:`NodeDown` (the router
retries them elsewhere) and the worker is restarted with exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import struct
import time
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from hsmproxy.backend.spec import DEVICE_ERROR, NodeSpec, run_worker

log = logging.getLogger("hsmproxy.node")

_CTX = multiprocessing.get_context("spawn")
#: Bytes asked per read of a worker pipe: below glibc's mmap threshold (128 KiB), so a read is a heap
#: allocation rather than an mmap/munmap pair per wake-up (a pipe holds 64 KiB anyway).
READ_SIZE = 1 << 16


class NodeDown(Exception):
    """The node's worker is not running or failed while holding the request."""


class NodeClient:
    """One node: its worker process, pipe, in-flight requests and health."""

    def __init__(self, spec: NodeSpec, *, start_timeout: float = 30.0, max_backoff: float = 10.0) -> None:
        self.spec = spec
        self.name = spec.name
        self.info: dict[str, Any] = {}
        self.up = False
        self.outstanding = 0
        self.restarts = 0
        self.last_error = ""
        self._start_timeout = start_timeout
        self._max_backoff = max_backoff
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._inflight: dict[int, asyncio.Future[tuple[str, Any]]] = {}
        self._queue: list[tuple[int, str, dict[str, Any]]] = []
        self._flush_scheduled = False
        self._next_id = 0
        self._closing = False
        self._restart_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._rbuf = bytearray()
        self._wbuf = bytearray()
        self._writing = False
        #: Futures of ``request_stats`` calls, answered in order by the worker.
        self._stats_waiters: deque[asyncio.Future[dict[str, int]]] = deque()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> bool:
        """Spawn the worker and wait for it to report ready; False if it failed to open the node."""
        self._loop = asyncio.get_running_loop()
        parent, child = _CTX.Pipe(duplex=True)
        proc = _CTX.Process(
            target=run_worker, args=(self.spec, child), name=f"hsmproxy-node-{self.name}", daemon=True
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        deadline = time.monotonic() + self._start_timeout
        while not parent.poll(0):
            if time.monotonic() > deadline or not proc.is_alive():
                self.last_error = "worker did not start"
                self._kill()
                return False
            await asyncio.sleep(0.02)
        try:
            kind, payload = parent.recv()
        except (EOFError, OSError):
            kind, payload = "failed", "worker exited"
        if kind != "ready":
            self.last_error = str(payload)
            log.warning("node %s failed to start: %s", self.name, payload)
            self._kill()
            return False
        self.info = dict(payload)
        self.up = True
        self._fd = parent.fileno()
        self._rbuf = bytearray()
        self._wbuf = bytearray()
        self._writing = False
        os.set_blocking(self._fd, False)  # the event loop never blocks on a busy worker
        self._loop.add_reader(self._fd, self._on_readable)
        log.info(
            "node %s up: %s %s firmware %s, mechanisms %s",
            self.name,
            self.info.get("manufacturer"),
            self.info.get("model"),
            self.info.get("firmware"),
            self.info.get("mechanisms"),
        )
        return True

    def _kill(self) -> None:
        if self._conn is not None:
            if self._loop is not None:
                try:
                    self._loop.remove_reader(self._conn.fileno())
                    if self._writing:
                        self._loop.remove_writer(self._conn.fileno())
                except (ValueError, OSError):
                    pass
            self._writing = False
            self._wbuf = bytearray()
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
            self._proc = None

    async def stop(self) -> None:
        """Stop the worker (in-flight requests fail with NodeDown)."""
        self._closing = True
        self.up = False
        if self._restart_task is not None:
            self._restart_task.cancel()
        if self._conn is not None:
            try:
                data = pickle.dumps(None)
                self._wbuf += struct.pack("!i", len(data)) + data
                os.set_blocking(self._fd, True)
                os.write(self._fd, bytes(self._wbuf))
                self._wbuf.clear()
            except (OSError, ValueError):
                pass
        proc = self._proc
        if proc is not None:
            for _ in range(100):
                if not proc.is_alive():
                    break
                await asyncio.sleep(0.02)
        self._fail_all("node stopping")
        self._kill()
        self.up = False

    @property
    def pid(self) -> int | None:
        """PID of the worker process, if running."""
        return self._proc.pid if self._proc is not None else None

    # -- requests ---------------------------------------------------------------------------------

    def submit(self, op: str, args: dict[str, Any]) -> asyncio.Future[tuple[str, Any]]:
        """Queue an operation; the future resolves to (error code, values) or fails with NodeDown."""
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[tuple[str, Any]] = loop.create_future()
        if not self.up or self._conn is None:
            fut.set_exception(NodeDown(self.name))
            return fut
        self._next_id += 1
        rid = self._next_id
        self._inflight[rid] = fut
        self._queue.append((rid, op, args))
        self.outstanding += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def request_stats(self) -> asyncio.Future[dict[str, int]]:
        """Ask the worker for its counters (``fallback_imports``, ``native_unwraps``, ``cache_hits``,
        ``cache_misses``); the future fails with NodeDown if the worker is not running or dies first."""
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, int]] = loop.create_future()
        if not self.up or self._conn is None:
            fut.set_exception(NodeDown(self.name))
            return fut
        self._stats_waiters.append(fut)
        data = pickle.dumps("stats", pickle.HIGHEST_PROTOCOL)
        self._wbuf += struct.pack("!i", len(data))
        self._wbuf += data
        self._write_some()
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._queue = self._queue, []
        if not batch or self._conn is None:
            return
        # The worker reads with multiprocessing.Connection: a 4-byte big-endian length, then pickle.
        data = pickle.dumps(batch, pickle.HIGHEST_PROTOCOL)
        self._wbuf += struct.pack("!i", len(data))
        self._wbuf += data
        self._write_some()

    def _write_some(self) -> None:
        try:
            while self._wbuf:
                n = os.write(self._fd, self._wbuf)
                del self._wbuf[:n]
        except BlockingIOError:
            pass
        except OSError:
            self._worker_died("pipe write failed")
            return
        loop = self._loop
        if loop is None:
            return
        if self._wbuf and not self._writing:
            self._writing = True
            loop.add_writer(self._fd, self._write_some)
        elif not self._wbuf and self._writing:
            self._writing = False
            loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        if self._conn is None:
            return
        try:
            while True:
                chunk = os.read(self._fd, READ_SIZE)
                if not chunk:
                    self._worker_died("worker exited")
                    return
                self._rbuf += chunk
                if len(chunk) < READ_SIZE:
                    break
        except BlockingIOError:
            pass
        except OSError:
            self._worker_died("worker exited")
            return
        buf = self._rbuf
        while len(buf) >= 4:
            (n,) = struct.unpack_from("!i", buf)
            if len(buf) < 4 + n:
                break
            message = pickle.loads(bytes(buf[4 : 4 + n]))  # noqa: S301 - our own worker's replies
            del buf[: 4 + n]
            self._deliver(message)

    def _deliver(self, results: Any) -> None:
        if isinstance(results, tuple):  # ("stats", {...}) replies are not requests
            if results and results[0] == "stats" and self._stats_waiters:
                waiter = self._stats_waiters.popleft()
                if not waiter.done():
                    waiter.set_result({k: int(v) for k, v in dict(results[1]).items()})
            return
        device_failed = False
        for rid, code, values in results:
            fut = self._inflight.pop(rid, None)
            self.outstanding -= 1
            if fut is None or fut.done():
                continue
            if code == DEVICE_ERROR:
                device_failed = True
                fut.set_exception(NodeDown(self.name))
            else:
                fut.set_result((code, values))
        if device_failed:
            self._worker_died("device error")

    def _fail_all(self, reason: str) -> None:
        inflight, self._inflight = self._inflight, {}
        self._queue = []
        self.outstanding = 0
        for fut in inflight.values():
            if not fut.done():
                fut.set_exception(NodeDown(f"{self.name}: {reason}"))
        waiters, self._stats_waiters = self._stats_waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(NodeDown(f"{self.name}: {reason}"))

    def _worker_died(self, reason: str) -> None:
        if not self.up:
            return
        self.up = False
        self.last_error = reason
        log.warning("node %s down: %s", self.name, reason)
        self._fail_all(reason)
        self._kill()
        if not self._closing and self._loop is not None:
            self._restart_task = self._loop.create_task(self._restart())

    def recycle(self, reason: str) -> None:
        """Kill a running worker whose device is unusable and restart it with backoff."""
        self._worker_died(reason)

    def schedule_restart(self) -> None:
        """Keep trying to start the worker in the background (with backoff)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._restart_task is None or self._restart_task.done():
            self._restart_task = self._loop.create_task(self._restart())

    async def _restart(self) -> None:
        delay = 0.1
        while not self._closing:
            await asyncio.sleep(delay)
            self.restarts += 1
            if await self.start():
                log.info("node %s restarted", self.name)
                return
            delay = min(delay * 2, self._max_backoff)
