"""The key life cycle inside ``serve``: rotation engine, refused-key set, handle eviction.

**Rotation** (:class:`RotationEngine`, every ``[keystore] rotation_interval`` seconds): for each
version the keystore reports due (:meth:`KeyStore.due_for_rotation`) the engine

1. generates the next version *inside a node*: the proxy's ``generate_key`` operation (A0 mode 0,
   same key type, scheme and LMK as the old version) through the running router, so the clear key
   never exists outside an HSM worker; the new version is stored ``pre-active``;
2. validates it on every node that is up: the ``key_check_value`` operation (BU) on each node must
   give the stored check value, and for a variant-LMK ZPK a test PIN round-trips: ``random_pin``
   (JA) and ``pin_from_lmk`` (JG) make an ISO-0 PIN block under the new key, then ``translate_pin``
   (CC, new key -> new key, ISO-0 -> ISO-0, deterministic) must return the same block on every node;
3. on success moves the old version to ``grace`` (``grace_until`` = now + its grace period) and the
   new one to ``active``; on failure marks the new version ``revoked`` ("rolled back: validation
   failed") and leaves the old one active.

A grace version past ``grace_until`` stays ``grace`` in the store and is refused by
:meth:`KeyStore.refused_digests` (superseded). Every step is recorded in the key's history with the
actor ``rotation-engine`` (transitions by the store, the validation by :meth:`KeyStore.note`).

**Refusal** (:class:`KeySync`): the front's :class:`RefusedKeys` holds the SHA-256 digests of refused
cryptograms (revoked, destroyed, suspended, grace over), refreshed from the keystore every
``refresh_interval`` seconds and at once after the engine changes a state. Each newly refused digest
is broadcast to every node as the ``forget_keys`` operation, which destroys the worker's cached
handles of that key. The dispatcher answers ``29`` to any request presenting a refused key.

Limitations: S key blocks are rotated with the old block's usage, mode of use and exportability,
and a default length for their algorithm (``T2``, ``A1``/``A3``); the PIN round trip runs for
variant-LMK ZPKs only (other types: check values on every node).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hsmproxy.cluster.router import NoNodeAvailable, Router
from hsmproxy.config import KeystoreSettings
from hsmproxy.keys.events import EventDelivery
from hsmproxy.keys.store import KeyExists, KeyRecord, KeyState, KeyStore, cryptogram_digest
from hsmproxy.periodic import Refresher

log = logging.getLogger("hsmproxy.keys")

ACTOR = "rotation-engine"
#: Seconds one validation operation may take on one node.
NODE_TIMEOUT = 5.0
#: Account and PIN length of the validation PIN (not a customer's: the PIN is random).
TEST_ACCOUNT = "000000000000"

Clock = Callable[[], datetime]
#: A validator: (engine, new record) -> None when valid, else the reason it is not.
Validator = Callable[["RotationEngine", KeyRecord], Awaitable[str | None]]


def utcnow() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


class RefusedKeys:
    """The digests of refused cryptograms, as the front checks them (replaced wholesale)."""

    def __init__(self) -> None:
        self.digests: frozenset[str] = frozenset()
        #: Named keys for audit records: cryptogram (upper case) -> (``tenant/name@version``, check
        #: value); kept current by :class:`hsmproxy.audit.KeyTrail` (empty without ``[audit]``).
        self.named: dict[str, tuple[str, str]] = {}

    def refused(self, cryptogram: str) -> bool:
        """True if ``cryptogram`` (as sent, or upper-cased: hex is case-blind) is refused."""
        if not self.digests:
            return False
        if cryptogram_digest(cryptogram) in self.digests:
            return True
        upper = cryptogram.upper()
        return upper != cryptogram and cryptogram_digest(upper) in self.digests


@dataclass(frozen=True)
class RotationOutcome:
    """What one rotation did: ``rotated``, ``rolled_back`` or ``failed`` (nothing created)."""

    tenant: str
    name: str
    old_version: int
    new_version: int | None
    status: str
    reason: str = ""


def generate_args(record: KeyRecord) -> dict[str, Any]:
    """``generate_key`` (A0 mode 0) arguments for a new key like ``record`` (type, scheme, LMK)."""
    old = record.cryptogram or ""
    args: dict[str, Any] = {
        "mode": "0", "key_type": record.type_code, "zmk_tmk_flag": None, "zmk": None, "key_scheme_zmk": None,
        "kb_usage": None, "kb_algorithm": None, "kb_mode_of_use": None, "kb_version": None,
        "kb_exportability": None, "lmk_id": record.lmk_id, "default_lmk": record.lmk_id,
        "lmk_ids": [record.lmk_id],
    }  # fmt: skip
    if old.startswith("S"):
        algorithm = old[8:9]
        data = len(old) - 1 - 16 - 16  # hex of the encrypted key data (no optional blocks)
        kb_alg = ("A1" if data <= 64 else "A3") if algorithm == "A" else "T2"
        args.update(
            key_scheme_lmk="S", kb_usage=old[6:8], kb_algorithm=kb_alg, kb_mode_of_use=old[9:10],
            kb_version=old[10:12], kb_exportability=old[12:13],
        )  # fmt: skip
    elif old[:1] in ("U", "T", "X", "Y", "Z"):
        args["key_scheme_lmk"] = old[0]
    else:
        args["key_scheme_lmk"] = {16: "0", 32: "X", 48: "Y"}.get(len(old), "U")
    return args


def check_value_args(record: KeyRecord) -> dict[str, Any]:
    """``key_check_value`` (BU, key type FF, 6-digit KCV) arguments for ``record``'s key."""
    crypt = record.cryptogram or ""
    length = len(crypt.lstrip("UTXYZ")) // 2
    flag = {8: "0", 16: "1", 24: "2"}.get(length, "1")
    return {
        "key_type_code": "FF", "key_length_flag": flag, "key": crypt, "key_type": record.type_code,
        "kcv_type": "1", "lmk_id": record.lmk_id, "default_lmk": record.lmk_id, "lmk_ids": [record.lmk_id],
    }  # fmt: skip


def _pin_args(
    record: KeyRecord, fields: dict[str, str], **roles: tuple[str, str, str, str]
) -> dict[str, Any]:
    return {"fields": fields, "lmk": record.lmk_id, "kb_lmk": "", "disabled": [], **roles}


async def default_validator(engine: RotationEngine, record: KeyRecord) -> str | None:
    """Check values on every up node; for a variant ZPK also a PIN round trip on every node."""
    nodes = engine.router.up_nodes()
    if not nodes:
        return "no node is up"
    crypt = record.cryptogram or ""
    for node in nodes:
        error, values = await engine.on_node(node, "key_check_value", check_value_args(record))
        if error != "00" or str(values.get("kcv", "")).upper() != record.kcv.upper()[:6]:
            return f"check value differs on node {node.name} ({error})"
    if record.type_code != "001" or crypt.startswith("S"):
        return None
    error, values = await engine.on_node(
        nodes[0], "random_pin", _pin_args(record, {"account": TEST_ACCOUNT, "pin_length": "04"})
    )
    if error != "00":
        return f"random_pin failed on node {nodes[0].name} ({error})"
    fields = {"zpk": crypt, "format": "01", "account": TEST_ACCOUNT, "pin_lmk": str(values["pin_lmk"])}
    error, values = await engine.on_node(
        nodes[0], "pin_from_lmk", _pin_args(record, fields, pin_key=("zpk", "001", "ZPK", "10"))
    )
    if error != "00":
        return f"pin_from_lmk failed on node {nodes[0].name} ({error})"
    block = str(values["pin_block"])
    fields = {
        "source_zpk": crypt,
        "destination_zpk": crypt,
        "max_pin_length": "12",
        "pin_block": block,
        "source_format": "01",
        "destination_format": "01",
        "account": TEST_ACCOUNT,
    }
    roles = {
        "source": ("source_zpk", "001", "ZPK", "10"),
        "destination": ("destination_zpk", "001", "ZPK", "11"),
    }
    for node in nodes:
        error, values = await engine.on_node(node, "translate_pin", _pin_args(record, fields, **roles))
        if error != "00" or values.get("pin_block") != block or values.get("pin_length") != "04":
            return f"PIN round trip failed on node {node.name} ({error})"
    return None


class RotationEngine:
    """Finds due versions and rotates them (see the module docstring)."""

    def __init__(
        self,
        store: KeyStore,
        router: Router,
        *,
        interval: float = 60.0,
        clock: Clock = utcnow,
        validator: Validator = default_validator,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.router = router
        self.interval = interval
        self.clock = clock
        self.validator = validator
        self.on_change = on_change
        self.outcomes: list[RotationOutcome] = []
        self._refresher = Refresher(self.run_once, interval, "rotation-engine", "keystore error")

    async def on_node(self, node: Any, op: str, args: dict[str, Any]) -> tuple[str, Any]:
        """Run ``op`` on one given node; ``("41", {})`` when it is down or too slow."""
        try:
            result: tuple[str, Any] = await asyncio.wait_for(node.submit(op, args), NODE_TIMEOUT)
        except Exception as exc:  # NodeDown, TimeoutError
            log.warning("rotation: %s on node %s failed (%s)", op, node.name, type(exc).__name__)
            return "41", {}
        return result

    def repair(self) -> int:
        """Finish rotations a crash interrupted: older ACTIVE versions of a name go to GRACE.

        Returns how many versions were moved.
        """
        latest: dict[tuple[str, str], KeyRecord] = {}
        older: list[KeyRecord] = []
        for record in sorted(self.store.list(state=KeyState.ACTIVE), key=lambda r: r.version):
            key = (record.tenant, record.name)
            if key in latest:
                older.append(latest[key])
            latest[key] = record
        for record in older:
            newest = latest[(record.tenant, record.name)]
            self.store.transition(
                record.tenant,
                record.name,
                record.version,
                KeyState.GRACE,
                actor=ACTOR,
                reason=f"superseded by version {newest.version} (interrupted rotation completed)",
                grace_until=self.clock() + (record.grace_period or timedelta(0)),
            )
        return len(older)

    async def run_once(self) -> list[RotationOutcome]:
        """Complete interrupted rotations, then rotate every version due now; the outcomes, in order."""
        if self.repair() and self.on_change is not None:
            self.on_change()
        outcomes = []
        for record in self.store.due_for_rotation(self.clock()):
            try:
                outcomes.append(await self.rotate(record))
            except Exception:
                log.exception("rotation of %s/%s v%d failed", record.tenant, record.name, record.version)
        return outcomes

    async def rotate(self, old: KeyRecord, grace: timedelta | None = None) -> RotationOutcome:
        """Generate, validate, and switch to the next version of ``old`` (an active version)."""
        where = f"{old.tenant}/{old.name}"
        args = generate_args(old)
        try:
            error, values = await self.router.execute("generate_key", args, old.cryptogram or "")
        except (NoNodeAvailable, TimeoutError) as exc:
            error, values = "41", {}
            log.warning("rotation of %s: no node could generate the key (%s)", where, type(exc).__name__)
        if error != "00":
            return self._done(
                RotationOutcome(old.tenant, old.name, old.version, None, "failed", f"generate {error}")
            )
        now = self.clock()
        new = replace(
            old, version=old.version + 1, cryptogram=str(values["key_lmk"]), kcv=str(values["kcv"])[:6],
            state=KeyState.PRE_ACTIVE, activation_date=None, expiry_date=None, grace_until=None,
            created_at=now, updated_at=now, created_by=ACTOR,
        )  # fmt: skip
        try:
            new = self.store.create(new, actor=ACTOR, reason=f"rotation of version {old.version}")
        except KeyExists:  # another proxy instance rotated it first
            return self._done(
                RotationOutcome(old.tenant, old.name, old.version, None, "failed", "version exists")
            )
        reason = await self._validate(new)
        if reason is not None:
            self.store.transition(
                old.tenant,
                old.name,
                new.version,
                KeyState.REVOKED,
                actor=ACTOR,
                reason=f"rolled back: validation failed: {reason}",
            )
            log.warning("rotation of %s v%d rolled back: %s", where, new.version, reason)
            return self._done(
                RotationOutcome(old.tenant, old.name, old.version, new.version, "rolled_back", reason)
            )
        self.store.note(
            old.tenant,
            old.name,
            new.version,
            actor=ACTOR,
            action="validated",
            reason=f"check value and test operation agree on {len(self.router.up_nodes())} node(s)",
        )
        period = grace if grace is not None else old.grace_period or timedelta(0)
        # New version first: a crash between the two steps leaves two usable versions (repaired by
        # the next run_once), never a name with no active version.
        self.store.transition(
            old.tenant,
            old.name,
            new.version,
            KeyState.ACTIVE,
            actor=ACTOR,
            reason=f"rotation of version {old.version}",
        )
        self.store.transition(
            old.tenant,
            old.name,
            old.version,
            KeyState.GRACE,
            actor=ACTOR,
            reason=f"superseded by version {new.version}",
            grace_until=self.clock() + period,
        )
        log.info("rotated %s: version %d active, version %d in grace", where, new.version, old.version)
        return self._done(RotationOutcome(old.tenant, old.name, old.version, new.version, "rotated"))

    async def _validate(self, record: KeyRecord) -> str | None:
        try:
            return await self.validator(self, record)
        except Exception as exc:
            return f"validator error ({type(exc).__name__})"

    def _done(self, outcome: RotationOutcome) -> RotationOutcome:
        self.outcomes.append(outcome)
        if self.on_change is not None:
            self.on_change()
        return outcome

    def start(self) -> None:
        """Run :meth:`run_once` every ``interval`` seconds in the background."""
        self._refresher.start()

    async def stop(self) -> None:
        """Stop the background loop."""
        await self._refresher.stop()


class KeySync:
    """Keeps :class:`RefusedKeys` current and makes every node drop newly refused keys' handles."""

    def __init__(
        self,
        store: KeyStore,
        router: Router,
        refused: RefusedKeys,
        *,
        interval: float = 1.0,
        clock: Clock = utcnow,
    ) -> None:
        self.store = store
        self.router = router
        self.refused = refused
        self.interval = interval
        self.clock = clock
        #: Cached handles the nodes reported destroyed (all refreshes).
        self.dropped = 0
        self.broadcasts = 0
        self._refresher = Refresher(
            self.refresh, interval, "key-sync", "refused-key refresh failed (keeping the previous set)"
        )

    async def refresh(self) -> set[str]:
        """Reload the refused digests; broadcast ``forget_keys`` for new ones; returns the new ones."""
        digests = frozenset(self.store.refused_digests(self.clock()))
        new = set(digests - self.refused.digests)
        self.refused.digests = digests
        if new:
            await self.forget(new)
        return new

    async def forget(self, digests: set[str]) -> int:
        """``forget_keys`` on every running node; the number of handles destroyed."""
        args = {"digests": sorted(digests)}
        nodes: Sequence[Any] = [n for n in self.router.nodes if n.up]
        results = await asyncio.gather(
            *(asyncio.wait_for(n.submit("forget_keys", args), NODE_TIMEOUT) for n in nodes),
            return_exceptions=True,
        )
        dropped = sum(int(r[1].get("dropped", 0)) for r in results if isinstance(r, tuple) and r[0] == "00")
        self.dropped += dropped
        self.broadcasts += 1
        log.info(
            "%d key(s) newly refused: %d node(s) dropped %d cached handle(s)",
            len(digests),
            len(nodes),
            dropped,
        )
        return dropped

    def notify(self) -> None:
        """Refresh now (a state changed in this process)."""
        self._refresher.notify()

    def start(self) -> None:
        """Refresh every ``interval`` seconds (and on :meth:`notify`) in the background."""
        self._refresher.start()

    async def stop(self) -> None:
        """Stop refreshing."""
        await self._refresher.stop()


class KeyLifecycle:
    """What ``serve`` runs for ``[keystore]``: the store, refusal sync, rotation and event delivery."""

    def __init__(self, settings: KeystoreSettings, router: Router, store: KeyStore | None = None) -> None:
        self.store = store or KeyStore.open(settings.url)
        self.refused = RefusedKeys()
        self.sync = KeySync(self.store, router, self.refused, interval=settings.refresh_interval)
        self.events = EventDelivery(self.store, settings.subscribers)
        self.engine = RotationEngine(
            self.store, router, interval=settings.rotation_interval, on_change=self._changed
        )

    def _changed(self) -> None:
        self.sync.notify()
        self.events.notify()

    async def start(self) -> None:
        """Load the refused set (before listeners open), then start the background tasks."""
        await self.sync.refresh()
        self.sync.start()
        self.events.start()
        self.engine.start()

    async def stop(self) -> None:
        """Stop the background tasks and close the store."""
        await self.engine.stop()
        await self.events.stop()
        await self.sync.stop()
        self.store.close()
