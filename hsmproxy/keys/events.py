"""Delivery of the keystore's outbox events to subscribers, at least once.

The keystore writes each event (``key.created`` / ``rotated`` / ``rolled_back`` / ``revoked`` /
``destroyed`` ...) to its outbox in the same transaction as the state change. Here one task per
``[[keystore.subscribers]]`` entry reads :meth:`KeyStore.pending_events` for its subscriber name,
delivers each event in order, and only then calls :meth:`KeyStore.mark_delivered`. That mark is
the only delivery state, so a proxy killed with ``kill -9`` at any point re-delivers, after its
restart, every event it had not marked: at least once, with a stable ``Idempotency-Key``.

* ``webhook = "http://host:port/path"``: HTTP/1.1 ``POST`` of the event as JSON (stdlib asyncio
  streams, ``Connection: close``), headers ``X-Hsmproxy-Signature`` (HMAC-SHA256 hex of the body
  with the subscriber's secret), ``Idempotency-Key`` and ``X-Hsmproxy-Event``. A 2xx answer is a
  delivery; anything else (or no answer in 5 s) is retried with exponential back-off (0.1 s
  doubling, at most ``max_backoff``), the same event until it is accepted.
* ``jsonl = "path"``: one JSON line per event appended and ``fsync``-ed. The file's idempotency keys
  are read once at start, so an event written just before a crash is not written twice.

Bodies carry the event's id, kind, tenant, name, version, time, payload and idempotency key;
payloads never hold a cryptogram or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from hsmproxy.config import SubscriberConfig
from hsmproxy.keys.store import Event, KeyStore

log = logging.getLogger("hsmproxy.events")

#: Seconds to wait for a webhook's connection and status line.
HTTP_TIMEOUT = 5.0
#: First retry delay (doubles per failed attempt, up to the subscriber's ``max_backoff``).
BASE_BACKOFF = 0.1
#: Seconds between outbox polls when idle (events written by other processes, e.g. the CLI).
POLL_INTERVAL = 0.5


def event_body(event: Event) -> bytes:
    """The JSON document delivered for ``event`` (sorted keys, compact)."""
    doc = {
        "id": event.id,
        "kind": event.kind,
        "tenant": event.tenant,
        "name": event.name,
        "version": event.version,
        "at": event.at.isoformat(),
        "payload": event.payload,
        "idempotency_key": event.idempotency_key,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign(secret: bytes, body: bytes) -> str:
    """HMAC-SHA256 hex of ``body`` (the ``X-Hsmproxy-Signature`` header)."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


async def post_webhook(url: str, body: bytes, headers: dict[str, str], timeout: float = HTTP_TIMEOUT) -> int:
    """POST ``body`` to an ``http://`` URL; the response status code (raises OSError/TimeoutError)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]  # fmt: skip
    head += [f"{k}: {v}" for k, v in headers.items()]
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    fields = status.split()
    if len(fields) < 2 or not fields[1].isdigit():
        raise OSError("malformed HTTP status line")
    return int(fields[1])


@dataclass
class SubscriberStats:
    """Per-subscriber counters."""

    delivered: int = 0
    attempts: int = 0
    failures: int = 0
    last_error: str = ""
    seen: set[str] = field(default_factory=set)


class EventDelivery:
    """One background task per subscriber (see the module docstring)."""

    def __init__(self, store: KeyStore, subscribers: Sequence[SubscriberConfig]) -> None:
        self.store = store
        self.subscribers = list(subscribers)
        self.stats = {s.name: SubscriberStats() for s in self.subscribers}
        self._wakes = {s.name: asyncio.Event() for s in self.subscribers}
        self._tasks: list[asyncio.Task[None]] = []

    def notify(self) -> None:
        """Look at the outbox now (an event was just written)."""
        for wake in self._wakes.values():
            wake.set()

    def start(self) -> None:
        """Start delivering."""
        self._tasks = [asyncio.create_task(self._run(s), name=f"events:{s.name}") for s in self.subscribers]

    async def stop(self) -> None:
        """Stop delivering (undelivered events stay in the outbox)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _run(self, sub: SubscriberConfig) -> None:
        wake, stats = self._wakes[sub.name], self.stats[sub.name]
        if sub.kind == "jsonl":
            stats.seen = _jsonl_keys(sub.target)
        while True:
            try:
                events = self.store.pending_events(sub.name, 100)
            except Exception as exc:
                log.warning("events: cannot read the outbox (%s)", type(exc).__name__)
                events = []
            if not events:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL_INTERVAL)
                wake.clear()
                continue
            for event in events:
                delay = BASE_BACKOFF
                while not await self._deliver(sub, event, stats):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, sub.max_backoff)
                self.store.mark_delivered(event.id, sub.name)
                stats.delivered += 1

    async def _deliver(self, sub: SubscriberConfig, event: Event, stats: SubscriberStats) -> bool:
        """One attempt; True when the subscriber has the event."""
        stats.attempts += 1
        body = event_body(event)
        try:
            if sub.kind == "jsonl":
                if event.idempotency_key not in stats.seen:
                    _append_line(sub.target, body)
                    stats.seen.add(event.idempotency_key)
                return True
            headers = {
                "X-Hsmproxy-Signature": sign(sub.secret, body),
                "Idempotency-Key": event.idempotency_key,
                "X-Hsmproxy-Event": event.kind,
            }
            status = await post_webhook(sub.target, body, headers)
            if 200 <= status < 300:
                return True
            stats.last_error = f"HTTP {status}"
        except (OSError, TimeoutError) as exc:
            stats.last_error = type(exc).__name__
        stats.failures += 1
        log.warning("events: %s to %s failed (%s); retrying", event.kind, sub.name, stats.last_error)
        return False


def _jsonl_keys(path: str) -> set[str]:
    """Idempotency keys already in a JSON-lines file (unreadable lines are skipped)."""
    keys: set[str] = set()
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                with contextlib.suppress(ValueError, AttributeError):
                    keys.add(str(json.loads(line).get("idempotency_key")))
    except FileNotFoundError:
        pass
    return keys


def _append_line(path: str, body: bytes) -> None:
    """Append one line and fsync (a partial last line from a crash is closed first)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        size = os.fstat(fd).st_size
        prefix = b""
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    prefix = b"\n"
        os.write(fd, prefix + body + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_event(line: bytes | str) -> dict[str, Any]:
    """A delivered event document (for subscribers and tests)."""
    doc: dict[str, Any] = json.loads(line)
    return doc
