"""Keystore life-cycle steps in the audit trail: every step exactly once, across restarts.

The keys CLI and other proxies change the keystore from other processes, and the audit file has one
writer, so the proxy polls the keystore's history past a cursor: the last history id already in the
trail (``history_id`` of ``key`` records, ``key_cursor`` of ``open``/``close`` records), read back from
the files at start, so a restart neither repeats nor skips a step. (With a shared PostgreSQL keystore,
a step committed out of id order by a concurrent transaction could be passed over; SQLite commits one
writer at a time.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from hsmproxy.audit.writer import AuditWriter

log = logging.getLogger("hsmproxy.audit")


class KeyRecord(Protocol):
    """What the trail reads of a keystore key (:class:`~hsmproxy.keys.store.KeyRecord`)."""

    @property
    def tenant(self) -> str:
        """Owning tenant."""
        ...

    @property
    def name(self) -> str:
        """Key name."""
        ...

    @property
    def version(self) -> int:
        """Key version."""
        ...

    @property
    def kcv(self) -> str:
        """Check value."""
        ...

    @property
    def cryptogram(self) -> str | None:
        """The key under its LMK (used only as a lookup key, never written)."""
        ...


class KeyHistory(Protocol):
    """What the trail reads of the keystore (:class:`~hsmproxy.keys.store.KeyStore`)."""

    def history_since(self, cursor: int, limit: int, /) -> Sequence[Mapping[str, Any]]:
        """Life-cycle steps after history id ``cursor``, oldest first."""
        ...

    def list(self, tenant: str | None = None) -> Iterable[KeyRecord]:
        """Every key version."""
        ...


#: Seconds between two looks at the keystore history when idle (the keys CLI runs elsewhere).
KEY_POLL_INTERVAL = 0.5


class KeyTrail:
    """Writes every keystore life-cycle step as one ``key`` record, exactly once.

    The keys CLI and other proxies change the keystore from other processes, and the audit file has one
    writer, so the proxy polls the keystore's history (:meth:`KeyStore.history_since`) past a cursor:
    the last history id already in the trail, read back from the file at start (``history_id`` of
    ``key`` records, ``key_cursor`` of chain records), so a restart neither repeats nor skips a step.
    A ``key`` record carries ``history_id``, ``tenant``, ``key`` (name), ``version``, ``action``
    (created, activated, rotated, rolled_back, suspended, revoked, destroyed, validated, exported …),
    ``from_state``, ``to_state``, ``kcv``, ``actor``, ``reason`` and ``at`` (the keystore's time).

    Each time it finds new steps it also refreshes ``named`` (cryptogram -> (``tenant/name@version``,
    check value)) so that host-command records name the keystore keys they used.
    """

    def __init__(
        self,
        store: KeyHistory,
        named: dict[str, tuple[str, str]] | None = None,
        interval: float = KEY_POLL_INTERVAL,
    ) -> None:
        self.store = store
        self.named = named
        self.interval = interval
        self.cursor = 0
        self.recorded = 0
        self._task: asyncio.Task[None] | None = None
        self._writer: AuditWriter | None = None

    def start(self, writer: AuditWriter, cursor: int) -> None:
        """Start polling after history id ``cursor``, queueing records on ``writer``."""
        self.cursor = cursor
        self._writer = writer
        self._task = asyncio.get_running_loop().create_task(self._run(writer), name="audit-keys")

    async def stop(self) -> None:
        """Take a last look at the keystore, then stop polling (idempotent; steps made later are
        recorded after the next start)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._writer is not None:
            try:
                while (room := min(500, self._writer.room())) > 0 and self.poll(self._writer, room) == room:
                    pass
            except Exception as exc:
                log.warning("audit: cannot read the keystore history at stop (%s)", type(exc).__name__)

    def refresh_named(self) -> None:
        """Rebuild the cryptogram -> (id, check value) map of named keys (replaced wholesale)."""
        if self.named is None:
            return
        fresh = {
            r.cryptogram.upper(): (f"{r.tenant}/{r.name}@{r.version}", r.kcv)
            for r in self.store.list()
            if r.cryptogram
        }
        self.named.clear()
        self.named.update(fresh)

    def poll(self, writer: AuditWriter, limit: int = 500) -> int:
        """Queue (at most ``limit`` of) the steps after the cursor; returns how many."""
        rows = self.store.history_since(self.cursor, limit)
        for row in rows:
            writer.event(
                "key", history_id=int(row["id"]), tenant=row["tenant"], key=row["name"],
                version=int(row["version"]), action=row["action"], from_state=row["from_state"],
                to_state=row["to_state"], kcv=row["kcv"] or "", actor=row["actor"], reason=row["reason"],
                at=str(row["at"]),
            )  # fmt: skip
            self.cursor = int(row["id"])
        self.recorded += len(rows)
        return len(rows)

    async def _run(self, writer: AuditWriter) -> None:
        first = True
        while True:
            room = min(500, writer.room())
            if room < 1:  # the writer is backed up (no node): read the keystore later, lose nothing
                await asyncio.sleep(self.interval)
                continue
            try:
                found = self.poll(writer, room)
                if found or first:
                    self.refresh_named()
                    first = False
            except Exception as exc:  # keystore unavailable: try again later
                log.warning("audit: cannot read the keystore history (%s)", type(exc).__name__)
                found = 0
            if found < room:
                await asyncio.sleep(self.interval)
