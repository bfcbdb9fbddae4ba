"""Named keys for the gateway: a cache of the keystore's usable versions, refreshed in the background.

A route names keys (``pin_in = "zpk-acq"``); a message uses the name's **active** version, and for
incoming keys (``pin_in``, ``mac_in``, and ``mac_out`` on responses) also the versions still in
their grace period (``grace_until`` in the future), newest first, so traffic protected under the
previous version keeps working during a rotation or a key exchange. Revoked, suspended, destroyed
and grace-expired versions are never offered. The cache is reloaded every ``refresh_interval``
seconds (the keystore's) and at once after a key exchange (:meth:`NamedKeys.refresh`); the store
is read in a thread so the event loop never waits on the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from hsmproxy.keys.store import KeyRecord, KeyState, KeyStore
from hsmproxy.periodic import Refresher

log = logging.getLogger("hsmproxy.iso8583")


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class KeyVersions:
    """The usable versions of one named key."""

    active: KeyRecord
    #: Versions in grace, newest first (their ``grace_until`` may pass before the next refresh).
    grace: tuple[KeyRecord, ...] = ()

    def candidates(self, now: datetime) -> list[str]:
        """Cryptograms to try for incoming traffic: the active one, then those still in grace."""
        out = [self.active.cryptogram or ""]
        out += [r.cryptogram for r in self.grace if r.cryptogram and r.grace_until and r.grace_until > now]
        return out


class NamedKeys:
    """``(tenant, name) -> KeyVersions`` from a :class:`KeyStore` (see the module docstring)."""

    def __init__(
        self, store: KeyStore | None, refresh_interval: float = 1.0, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self.store = store
        self.interval = refresh_interval
        self.clock = clock
        self._keys: dict[tuple[str, str], KeyVersions] = {}
        self._refresher = Refresher(
            self.refresh,
            refresh_interval,
            "iso8583-keys",
            "named key refresh failed (keeping the previous keys)",
        )

    def get(self, tenant: str, name: str) -> KeyVersions | None:
        """The usable versions of ``tenant/name`` (None: unknown, or no active version)."""
        return self._keys.get((tenant, name))

    def _load(self) -> dict[tuple[str, str], KeyVersions]:
        assert self.store is not None
        now = self.clock()
        active: dict[tuple[str, str], KeyRecord] = {}
        grace: dict[tuple[str, str], list[KeyRecord]] = {}
        for r in self.store.list():
            if r.cryptogram is None:
                continue
            key = (r.tenant, r.name)
            if r.state is KeyState.ACTIVE and (key not in active or r.version > active[key].version):
                active[key] = r
            elif r.state is KeyState.GRACE and r.grace_until is not None and r.grace_until > now:
                grace.setdefault(key, []).append(r)
        return {
            key: KeyVersions(rec, tuple(sorted(grace.get(key, []), key=lambda r: -r.version)))
            for key, rec in active.items()
        }

    async def refresh(self) -> None:
        """Reload from the store now (in a thread)."""
        if self.store is not None:
            self._keys = await asyncio.to_thread(self._load)

    def notify(self) -> None:
        """Ask the background task to reload soon."""
        self._refresher.notify()

    async def start(self) -> None:
        """Load once, then keep reloading in the background."""
        await self.refresh()
        if self.store is not None:
            self._refresher.start()

    async def stop(self) -> None:
        """Stop the background reload."""
        await self._refresher.stop()
