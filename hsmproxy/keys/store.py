"""The keystore: named, versioned keys per tenant, their life cycle, history and event outbox.

One :class:`KeyStore` class on two databases, chosen by URL:

* ``sqlite:///relative/or/absolute.db`` (``sqlite:////abs/path.db`` is absolute too): stdlib
  :mod:`sqlite3`, WAL journal, ``BEGIN IMMEDIATE`` transactions (one writer at a time);
* ``postgresql://user@host:port/db`` (or ``postgres://``): psycopg 3, ``SELECT … FOR UPDATE`` row
  locks, so many proxy instances can share one inventory.

The SQL is written once with ``?`` placeholders; the dialect layer (:class:`_Dialect`) swaps the
placeholder style, the auto-increment column type and the row-lock suffix. Timestamps are stored as
UTC ISO-8601 text (sortable as text in both databases), durations as whole seconds.

Schema migrations are numbered (:data:`MIGRATIONS`); ``schema_migrations`` records the applied
ones, so :meth:`KeyStore.open` is idempotent (PostgreSQL takes an advisory lock while migrating).

A record holds the key only as a cryptogram under the tenant's LMK (every node can use it, nothing
is replicated) plus its check value. Destroying a version erases the cryptogram; the row stays as a
tombstone that keeps the SHA-256 of the cryptogram, so the key stays refused (``29``).

Transition table (anything else raises :class:`InvalidTransition`)::

    pre-active -> active                     activation           key.activated
    active     -> grace                      rotation             key.rotated
    grace      -> active                     rollback             key.rolled_back
    active, grace -> suspended                                    key.suspended
    suspended  -> active                     resume               key.activated
    any state but destroyed -> revoked                            key.revoked
    pre-active, grace, suspended, revoked -> destroyed            key.destroyed
    destroyed  -> (nothing)

(``active -> destroyed`` is refused: suspend or revoke first.) Every step writes a history row
(actor, time, from, to, reason) and an outbox event in the same transaction as the state change;
event payloads never carry the cryptogram.
"""

from __future__ import annotations

import enum
import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "MIGRATIONS",
    "TRANSITIONS",
    "Event",
    "InvalidTransition",
    "KeyExists",
    "KeyNotFound",
    "KeyRecord",
    "KeyState",
    "KeyStore",
    "cryptogram_digest",
    "event_kind",
]


class KeyState(enum.StrEnum):
    """Life-cycle state of one key version."""

    PRE_ACTIVE = "pre-active"
    ACTIVE = "active"
    GRACE = "grace"
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    DESTROYED = "destroyed"


class InvalidTransition(Exception):
    """The transition is not in the table (e.g. destroyed -> active)."""


class KeyNotFound(Exception):
    """No such tenant/name/version."""


class KeyExists(Exception):
    """A record with this tenant/name/version already exists."""


S = KeyState
#: Allowed transitions: from state -> the states it may move to.
TRANSITIONS: dict[KeyState, frozenset[KeyState]] = {
    S.PRE_ACTIVE: frozenset({S.ACTIVE, S.REVOKED, S.DESTROYED}),
    S.ACTIVE: frozenset({S.GRACE, S.SUSPENDED, S.REVOKED}),
    S.GRACE: frozenset({S.ACTIVE, S.SUSPENDED, S.REVOKED, S.DESTROYED}),
    S.SUSPENDED: frozenset({S.ACTIVE, S.REVOKED, S.DESTROYED}),
    S.REVOKED: frozenset({S.DESTROYED}),
    S.DESTROYED: frozenset(),
}


def event_kind(old: KeyState, new: KeyState) -> str:
    """The outbox event kind of a transition."""
    if new is S.GRACE:
        return "key.rotated"
    if old is S.GRACE and new is S.ACTIVE:
        return "key.rolled_back"
    if new is S.ACTIVE:
        return "key.activated"
    return f"key.{new.value}"


def cryptogram_digest(cryptogram: str) -> str:
    """SHA-256 hex of the cryptogram text (how refused keys are compared)."""
    return hashlib.sha256(cryptogram.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One version of a named key."""

    tenant: str
    name: str
    version: int
    key_type: str
    type_code: str
    lmk_id: str
    cryptogram: str | None
    kcv: str
    state: KeyState
    activation_date: datetime | None
    expiry_date: datetime | None
    grace_until: datetime | None
    rotate_every: timedelta | None
    grace_period: timedelta | None
    created_at: datetime
    updated_at: datetime
    created_by: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict (datetimes ISO-8601, durations in seconds)."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, datetime):
                out[key] = value.isoformat()
            elif isinstance(value, timedelta):
                out[key] = int(value.total_seconds())
            elif isinstance(value, KeyState):
                out[key] = value.value
            else:
                out[key] = value
        return out


@dataclass(frozen=True)
class Event:
    """One outbox event (at-least-once delivery per subscriber)."""

    id: int
    kind: str
    tenant: str
    name: str
    version: int
    at: datetime
    payload: dict[str, Any]
    idempotency_key: str


# -- dialects and migrations -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Dialect:
    name: str
    serial: str  # auto-increment primary key column type
    lock: str  # row-lock suffix for SELECT in a write transaction

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.name == "postgresql" else text


_SQLITE = _Dialect("sqlite", "INTEGER PRIMARY KEY AUTOINCREMENT", "")
_POSTGRES = _Dialect("postgresql", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", " FOR UPDATE")

#: Numbered schema migrations; ``{serial}`` is the dialect's auto-increment key type. Append only.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE keys (
                tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
                key_type TEXT NOT NULL, type_code TEXT NOT NULL, lmk_id TEXT NOT NULL,
                cryptogram TEXT, digest TEXT, kcv TEXT NOT NULL, state TEXT NOT NULL,
                activation_date TEXT, expiry_date TEXT, grace_until TEXT,
                rotate_every BIGINT, grace_period BIGINT,
                created_at TEXT NOT NULL, updated_at TEXT NOT NULL, created_by TEXT NOT NULL,
                PRIMARY KEY (tenant, name, version))""",
            "CREATE INDEX keys_state ON keys (state)",
            "CREATE INDEX keys_digest ON keys (digest)",
            """CREATE TABLE key_history (
                id {serial}, tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
                at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
                from_state TEXT, to_state TEXT, reason TEXT NOT NULL)""",
            "CREATE INDEX key_history_key ON key_history (tenant, name)",
            """CREATE TABLE outbox (
                id {serial}, kind TEXT NOT NULL, tenant TEXT NOT NULL, name TEXT NOT NULL,
                version INTEGER NOT NULL, at TEXT NOT NULL, payload TEXT NOT NULL)""",
            """CREATE TABLE outbox_delivered (
                event_id BIGINT NOT NULL, subscriber TEXT NOT NULL, delivered_at TEXT NOT NULL,
                PRIMARY KEY (event_id, subscriber))""",
        ),
    ),
)

_COLUMNS = (
    "tenant, name, version, key_type, type_code, lmk_id, cryptogram, digest, kcv, state, activation_date, "
    "expiry_date, grace_until, rotate_every, grace_period, created_at, updated_at, created_by"
)


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def _secs(value: timedelta | None) -> int | None:
    return None if value is None else int(value.total_seconds())


def _td(value: Any) -> timedelta | None:
    return None if value is None else timedelta(seconds=int(value))


def _record(row: Sequence[Any]) -> KeyRecord:
    created_at, updated_at = _dt(row[15]), _dt(row[16])
    assert created_at is not None and updated_at is not None
    return KeyRecord(
        tenant=row[0], name=row[1], version=int(row[2]), key_type=row[3], type_code=row[4], lmk_id=row[5],
        cryptogram=row[6], kcv=row[8], state=KeyState(row[9]), activation_date=_dt(row[10]),
        expiry_date=_dt(row[11]), grace_until=_dt(row[12]), rotate_every=_td(row[13]),
        grace_period=_td(row[14]), created_at=created_at, updated_at=updated_at, created_by=row[17],
    )  # fmt: skip


def _row(r: KeyRecord, digest: str | None) -> tuple[Any, ...]:
    return (
        r.tenant, r.name, r.version, r.key_type, r.type_code, r.lmk_id, r.cryptogram, digest, r.kcv,
        r.state.value, _ts(r.activation_date), _ts(r.expiry_date), _ts(r.grace_until), _secs(r.rotate_every),
        _secs(r.grace_period), _ts(r.created_at), _ts(r.updated_at), r.created_by,
    )  # fmt: skip


def _payload(r: KeyRecord, actor: str, reason: str, **extra: Any) -> dict[str, Any]:
    """Event payload: identifiers, type, check value, state — never the cryptogram."""
    return {
        "tenant": r.tenant, "name": r.name, "version": r.version, "key_type": r.key_type, "kcv": r.kcv,
        "state": r.state.value, "reason": reason, "actor": actor, **extra,
    }  # fmt: skip


Rows = list[tuple[Any, ...]]
Records = list[KeyRecord]
HistoryRows = list[dict[str, Any]]
Events = list[Event]
#: Columns of ``keys`` in :func:`_row` order; every SELECT of records uses them.
_SELECT = f"SELECT {_COLUMNS} FROM keys"  # noqa: S608 - constant column list


class Cursor(Protocol):
    """``q(sql, params) -> rows`` inside one transaction."""

    def __call__(self, sql: str, params: Sequence[Any] = ()) -> Rows: ...


class KeyStore:
    """Named keys per tenant on SQLite or PostgreSQL (see the module docstring)."""

    def __init__(self, url: str, conn: Any, dialect: _Dialect) -> None:
        self.url = url
        self._conn = conn
        self._dialect = dialect
        self._lock = threading.RLock()

    # -- opening and transactions ------------------------------------------------------------------

    @classmethod
    def open(cls, url: str) -> KeyStore:
        """Open (creating if needed) the keystore at ``url`` and run pending migrations."""
        if url.startswith("sqlite:///"):
            path = url[len("sqlite:///") :]
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            store = cls(url, conn, _SQLITE)
        elif url.startswith(("postgresql://", "postgres://")):
            try:
                import psycopg
            except ImportError:  # pragma: no cover - a declared dependency
                raise RuntimeError("the PostgreSQL keystore needs psycopg[binary]") from None
            store = cls(url, psycopg.connect(url, autocommit=True), _POSTGRES)
        else:
            raise ValueError("keystore url must start with sqlite:/// or postgresql://")
        store.migrate()
        return store

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    def _reconnect_if_closed(self) -> None:
        if self._dialect is _POSTGRES and self._conn.closed:
            import psycopg

            self._conn = psycopg.connect(self.url, autocommit=True)

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Cursor]:
        """One transaction; yields ``q(sql, params) -> rows``. Rolled back on any exception."""
        with self._lock:
            self._reconnect_if_closed()
            cur = self._conn.cursor()

            def q(sql: str, params: Sequence[Any] = ()) -> Rows:
                cur.execute(self._dialect.sql(sql), tuple(params))
                return list(cur.fetchall()) if cur.description is not None else []

            cur.execute("BEGIN IMMEDIATE" if write and self._dialect is _SQLITE else "BEGIN")
            try:
                yield q
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def _read(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        with self._tx(write=False) as q:
            return q(sql, params)

    def migrate(self) -> list[int]:
        """Apply the migrations not yet applied; returns their numbers (empty when up to date)."""
        applied: list[int] = []
        with self._tx() as q:
            if self._dialect is _POSTGRES:
                q("SELECT pg_advisory_xact_lock(?)", (0x4B455953,))
            q("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
            done = {int(r[0]) for r in q("SELECT version FROM schema_migrations")}
            for number, statements in MIGRATIONS:
                if number in done:
                    continue
                for statement in statements:
                    q(statement.replace("{serial}", self._dialect.serial))
                q("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", (number, _ts(_now())))
                applied.append(number)
        return applied

    def schema_version(self) -> int:
        """The highest applied migration number."""
        rows = self._read("SELECT MAX(version) FROM schema_migrations")
        return int(rows[0][0] or 0)

    # -- records ---------------------------------------------------------------------------------

    def _history(self, q: Cursor, r: KeyRecord, at: datetime, actor: str, action: str,
                 old: KeyState | None, new: KeyState | None, reason: str) -> None:  # fmt: skip
        q(
            "INSERT INTO key_history (tenant, name, version, at, actor, action, from_state, to_state, reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (r.tenant, r.name, r.version, _ts(at), actor, action,
             old.value if old else None, new.value if new else None, reason),
        )  # fmt: skip

    def _emit(self, q: Cursor, kind: str, r: KeyRecord, at: datetime, payload: dict[str, Any]) -> None:
        """Append an event to the outbox (inside the caller's transaction)."""
        q(
            "INSERT INTO outbox (kind, tenant, name, version, at, payload) VALUES (?, ?, ?, ?, ?, ?)",
            (kind, r.tenant, r.name, r.version, _ts(at), json.dumps(payload, sort_keys=True)),
        )

    def create(self, record: KeyRecord, *, actor: str, reason: str = "") -> KeyRecord:
        """Insert a new key version; emits ``key.created``. Raises :class:`KeyExists`."""
        now = _now()
        activation = record.activation_date
        expiry = record.expiry_date
        if record.state is S.ACTIVE:
            activation = activation or now
            if expiry is None and record.rotate_every is not None:
                expiry = activation + record.rotate_every
        record = replace(record, activation_date=activation, expiry_date=expiry, created_by=actor,
                         created_at=now, updated_at=now)  # fmt: skip
        digest = cryptogram_digest(record.cryptogram) if record.cryptogram else None
        with self._tx() as q:
            if q("SELECT 1 FROM keys WHERE tenant = ? AND name = ? AND version = ?",
                 (record.tenant, record.name, record.version)):  # fmt: skip
                raise KeyExists(f"{record.tenant}/{record.name} version {record.version} exists")
            if digest is not None and q("SELECT 1 FROM keys WHERE digest = ?", (digest,)):
                raise KeyExists("this cryptogram is already in the keystore (or was destroyed)")
            q(f"INSERT INTO keys ({_COLUMNS}) VALUES ({', '.join('?' * 18)})", _row(record, digest))  # noqa: S608
            self._history(q, record, now, actor, "created", None, record.state, reason)
            self._emit(q, "key.created", record, now, _payload(record, actor, reason))
        return record

    def next_version(self, tenant: str, name: str) -> int:
        """1 + the highest version of ``tenant/name`` (1 for a new name)."""
        rows = self._read("SELECT MAX(version) FROM keys WHERE tenant = ? AND name = ?", (tenant, name))
        return int(rows[0][0] or 0) + 1

    def get(self, tenant: str, name: str, version: int | None = None) -> KeyRecord:
        """One version (the latest when ``version`` is None). Raises :class:`KeyNotFound`."""
        if version is None:
            rows = self._read(
                _SELECT + " WHERE tenant = ? AND name = ? ORDER BY version DESC LIMIT 1",
                (tenant, name),
            )
        else:
            rows = self._read(
                _SELECT + " WHERE tenant = ? AND name = ? AND version = ?",
                (tenant, name, version),
            )
        if not rows:
            raise KeyNotFound(f"no key {tenant}/{name}" + ("" if version is None else f" version {version}"))
        return _record(rows[0])

    def versions(self, tenant: str, name: str) -> Records:
        """Every version of ``tenant/name``, oldest first."""
        rows = self._read(_SELECT + " WHERE tenant = ? AND name = ? ORDER BY version", (tenant, name))
        return [_record(r) for r in rows]

    def list(self, tenant: str | None = None, state: KeyState | None = None) -> Records:
        """Every version, optionally of one tenant and/or in one state; by tenant, name, version."""
        where, params = [], []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if state is not None:
            where.append("state = ?")
            params.append(state.value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(_SELECT + clause + " ORDER BY tenant, name, version", params)
        return [_record(r) for r in rows]

    def transition(
        self,
        tenant: str,
        name: str,
        version: int,
        new_state: KeyState,
        *,
        actor: str,
        reason: str = "",
        grace_until: datetime | None = None,
    ) -> KeyRecord:
        """Move one version to ``new_state`` per :data:`TRANSITIONS`, with history and outbox event in
        the same transaction. GRACE sets ``grace_until`` (given, else now + grace period); DESTROYED
        erases the cryptogram (the digest stays). Raises :class:`InvalidTransition`/:class:`KeyNotFound`."""
        new_state = KeyState(new_state)
        now = _now()
        with self._tx() as q:
            rows = q(
                _SELECT + " WHERE tenant = ? AND name = ? AND version = ?" + self._dialect.lock,
                (tenant, name, version),
            )
            if not rows:
                raise KeyNotFound(f"no key {tenant}/{name} version {version}")
            old = _record(rows[0])
            if new_state not in TRANSITIONS[old.state]:
                raise InvalidTransition(f"{tenant}/{name} v{version}: {old.state.value} -> {new_state.value}")
            new = replace(old, state=new_state, updated_at=now)
            if new_state is S.GRACE:
                new = replace(new, grace_until=grace_until or now + (old.grace_period or timedelta(0)))
            elif new_state is S.ACTIVE:
                activation = old.activation_date or now
                expiry = old.expiry_date
                if expiry is None and old.rotate_every is not None:
                    expiry = activation + old.rotate_every
                new = replace(new, activation_date=activation, expiry_date=expiry, grace_until=None)
            elif new_state is S.DESTROYED:
                new = replace(new, cryptogram=None)
            q(
                "UPDATE keys SET state = ?, cryptogram = ?, grace_until = ?, activation_date = ?,"
                " expiry_date = ?, updated_at = ? WHERE tenant = ? AND name = ? AND version = ?",
                (new.state.value, new.cryptogram, _ts(new.grace_until), _ts(new.activation_date),
                 _ts(new.expiry_date), _ts(now), tenant, name, version),
            )  # fmt: skip
            kind = event_kind(old.state, new_state)
            self._history(q, new, now, actor, kind.removeprefix("key."), old.state, new_state, reason)
            extra = {"from_state": old.state.value}
            if new.grace_until is not None:
                extra["grace_until"] = new.grace_until.isoformat()
            self._emit(q, kind, new, now, _payload(new, actor, reason, **extra))
        return new

    def note(
        self, tenant: str, name: str, version: int, *, actor: str, action: str, reason: str = ""
    ) -> None:
        """Record a step without a state change (e.g. ``validated`` on every node)."""
        record = self.get(tenant, name, version)
        with self._tx() as q:
            self._history(q, record, _now(), actor, action, record.state, record.state, reason)

    def history(self, tenant: str, name: str) -> HistoryRows:
        """Who did what when, oldest first: at, actor, action, version, from_state, to_state, reason."""
        rows = self._read(
            "SELECT at, actor, action, version, from_state, to_state, reason FROM key_history"
            " WHERE tenant = ? AND name = ? ORDER BY id",
            (tenant, name),
        )
        keys = ("at", "actor", "action", "version", "from_state", "to_state", "reason")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def history_since(self, after_id: int, limit: int = 500) -> HistoryRows:
        """History rows of every key with ``id > after_id``, oldest first, each with the version's
        check value (``kcv``): the audit trail's cursor over the life cycle
        (:class:`hsmproxy.audit.KeyTrail`). Keys: id, tenant, name, version, at, actor, action,
        from_state, to_state, reason, kcv."""
        rows = self._read(
            "SELECT h.id, h.tenant, h.name, h.version, h.at, h.actor, h.action, h.from_state, h.to_state,"
            " h.reason, k.kcv FROM key_history h LEFT JOIN keys k"
            " ON k.tenant = h.tenant AND k.name = h.name AND k.version = h.version"
            " WHERE h.id > ? ORDER BY h.id LIMIT ?",
            (after_id, limit),
        )
        keys = ("id", "tenant", "name", "version", "at", "actor", "action", "from_state", "to_state",
                "reason", "kcv")  # fmt: skip
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # -- rotation and refusal --------------------------------------------------------------------

    def due_for_rotation(self, now: datetime) -> Records:
        """ACTIVE versions whose ``rotate_every`` has elapsed since activation."""
        out = []
        for r in self.list(state=S.ACTIVE):
            start = r.activation_date or r.created_at
            if r.rotate_every is not None and start + r.rotate_every <= now:
                out.append(r)
        return out

    def expired_grace(self, now: datetime) -> Records:
        """GRACE versions whose ``grace_until`` has passed."""
        return [r for r in self.list(state=S.GRACE) if r.grace_until is not None and r.grace_until <= now]

    def refused(self, now: datetime) -> dict[str, str]:
        """SHA-256 digest -> state of every version that must be refused with ``29``: revoked,
        destroyed (tombstone digest), suspended, and grace past ``grace_until``."""
        rows = self._read(
            "SELECT digest, state, grace_until FROM keys WHERE digest IS NOT NULL AND state IN (?, ?, ?, ?)",
            (S.REVOKED.value, S.DESTROYED.value, S.SUSPENDED.value, S.GRACE.value),
        )
        out: dict[str, str] = {}
        for digest, state, grace_until in rows:
            until = _dt(grace_until)
            if state == S.GRACE.value and (until is None or until > now):
                continue
            out[str(digest)] = str(state)
        return out

    def refused_digests(self, now: datetime) -> set[str]:
        """``sha256(cryptogram).hexdigest()`` of every refused version (see :meth:`refused`)."""
        return set(self.refused(now))

    def refused_cryptograms(self, now: datetime) -> dict[str, str]:
        """Cryptogram -> state of refused versions that still hold a cryptogram (destroyed ones are
        refusable by digest only: :meth:`refused_digests`)."""
        refused = self.refused(now)
        return {
            r.cryptogram: refused[cryptogram_digest(r.cryptogram)]
            for r in self.list()
            if r.cryptogram and cryptogram_digest(r.cryptogram) in refused
        }

    def is_refused(self, cryptogram: str, now: datetime | None = None) -> bool:
        """True if ``cryptogram`` belongs to a refused version."""
        return cryptogram_digest(cryptogram) in self.refused(now or _now())

    # -- outbox ----------------------------------------------------------------------------------

    def pending_events(self, subscriber: str, limit: int = 100) -> Events:
        """Events not yet delivered to ``subscriber``, oldest first."""
        return self._events(
            "SELECT id, kind, tenant, name, version, at, payload FROM outbox o WHERE NOT EXISTS"
            " (SELECT 1 FROM outbox_delivered d WHERE d.event_id = o.id AND d.subscriber = ?)"
            " ORDER BY id LIMIT ?",
            (subscriber, limit),
        )

    def events(self, limit: int = 1000) -> Events:
        """All outbox events, oldest first (for inspection and tests)."""
        sql = "SELECT id, kind, tenant, name, version, at, payload FROM outbox ORDER BY id LIMIT ?"
        return self._events(sql, (limit,))

    def _events(self, sql: str, params: Sequence[Any]) -> Events:
        out = []
        for id_, kind, tenant, name, version, at, payload in self._read(sql, params):
            when = _dt(at)
            assert when is not None
            key = f"{kind}:{tenant}:{name}:{version}:{id_}"
            out.append(Event(int(id_), kind, tenant, name, int(version), when, json.loads(payload), key))
        return out

    def mark_delivered(self, event_id: int, subscriber: str) -> None:
        """Record that ``subscriber`` received event ``event_id`` (idempotent)."""
        with self._tx() as q:
            if not q("SELECT 1 FROM outbox_delivered WHERE event_id = ? AND subscriber = ?",
                     (event_id, subscriber)):  # fmt: skip
                q("INSERT INTO outbox_delivered (event_id, subscriber, delivered_at) VALUES (?, ?, ?)",
                  (event_id, subscriber, _ts(_now())))  # fmt: skip

    # -- inventory -------------------------------------------------------------------------------

    def inventory(self, now: datetime) -> dict[str, Any]:
        """Counts by state, versions expiring within 7 and 30 days (active: expiry date; grace: end
        of grace), and versions pending rotation."""
        records = self.list()
        by_state = {s.value: 0 for s in KeyState}
        expiring: dict[int, list[str]] = {7: [], 30: []}
        for r in records:
            by_state[r.state.value] += 1
            end = r.expiry_date if r.state is S.ACTIVE else r.grace_until if r.state is S.GRACE else None
            for days, names in expiring.items():
                if end is not None and end <= now + timedelta(days=days):
                    names.append(f"{r.tenant}/{r.name}@{r.version}")
        due = [f"{r.tenant}/{r.name}@{r.version}" for r in self.due_for_rotation(now)]
        return {
            "total": len(records),
            "by_state": by_state,
            "expiring_7d": len(expiring[7]),
            "expiring_30d": len(expiring[30]),
            "pending_rotation": len(due),
            "expiring_7d_keys": expiring[7],
            "expiring_30d_keys": expiring[30],
            "pending_rotation_keys": due,
        }
