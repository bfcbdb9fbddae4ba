"""KeyStore on SQLite and PostgreSQL: transitions (valid and invalid), history, outbox, refusal, inventory.

PostgreSQL runs when HSMPROXY_TEST_POSTGRES_URL names a server (``.ci/run`` starts one); each test
gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest

from hsmproxy.keys.store import (
    TRANSITIONS,
    InvalidTransition,
    KeyExists,
    KeyNotFound,
    KeyRecord,
    KeyState,
    KeyStore,
    cryptogram_digest,
)

S = KeyState
PG_URL = os.environ.get("HSMPROXY_TEST_POSTGRES_URL", "")


def _pg_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh keystore URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.db'}"
        return
    if not PG_URL:
        pytest.skip("PostgreSQL keystore tests need HSMPROXY_TEST_POSTGRES_URL (.ci/run starts a server)")
    import psycopg

    schema = f"ks_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield _pg_url(schema)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def store(store_url: str) -> Iterator[KeyStore]:
    """An open keystore on each backend."""
    ks = KeyStore.open(store_url)
    yield ks
    ks.close()


def rec(name: str = "zpk1", version: int = 1, state: KeyState = S.ACTIVE, cryptogram: str | None = None,
        rotate_every: timedelta | None = None, grace: timedelta | None = None) -> KeyRecord:  # fmt: skip
    """A ZPK record (cryptogram made unique per name/version)."""
    now = datetime.now(UTC)
    return KeyRecord(
        tenant="default", name=name, version=version, key_type="ZPK", type_code="001", lmk_id="00",
        cryptogram=cryptogram or f"U{uuid.uuid4().hex.upper()}", kcv="ABCDEF", state=state,
        activation_date=None, expiry_date=None, grace_until=None, rotate_every=rotate_every,
        grace_period=grace, created_at=now, updated_at=now, created_by="",
    )  # fmt: skip


def test_create_get_versions(store: KeyStore) -> None:
    r1 = store.create(rec(), actor="alice", reason="first")
    assert r1.created_by == "alice" and r1.activation_date is not None
    store.create(rec(version=2, state=S.PRE_ACTIVE), actor="bob")
    assert store.get("default", "zpk1").version == 2
    assert store.get("default", "zpk1", 1).cryptogram == r1.cryptogram
    assert [r.version for r in store.versions("default", "zpk1")] == [1, 2]
    assert store.next_version("default", "zpk1") == 3
    assert store.next_version("default", "other") == 1
    with pytest.raises(KeyExists):
        store.create(rec(version=2), actor="bob")
    with pytest.raises(KeyExists):  # the same cryptogram twice
        store.create(rec(name="copy", cryptogram=r1.cryptogram), actor="bob")
    with pytest.raises(KeyNotFound):
        store.get("default", "nope")
    with pytest.raises(KeyNotFound):
        store.transition("default", "zpk1", 9, S.REVOKED, actor="x")
    assert [r.name for r in store.list(tenant="default", state=S.PRE_ACTIVE)] == ["zpk1"]
    assert store.list(tenant="other") == []


def _put_in(store: KeyStore, name: str, state: KeyState) -> None:
    """Create ``name`` and drive it into ``state`` along valid transitions."""
    paths = {
        S.PRE_ACTIVE: [], S.ACTIVE: [S.ACTIVE], S.GRACE: [S.ACTIVE, S.GRACE],
        S.SUSPENDED: [S.ACTIVE, S.SUSPENDED], S.REVOKED: [S.REVOKED], S.DESTROYED: [S.REVOKED, S.DESTROYED],
    }  # fmt: skip
    store.create(rec(name=name, state=S.PRE_ACTIVE), actor="t")
    for step in paths[state]:
        store.transition("default", name, 1, step, actor="t")
    assert store.get("default", name).state is state


@pytest.mark.parametrize("old", list(KeyState))
def test_every_transition(store: KeyStore, old: KeyState) -> None:
    """Every (from, to) pair: allowed ones succeed with history and event, the rest raise."""
    for new in KeyState:
        name = f"k-{old.value}-{new.value}"
        _put_in(store, name, old)
        events_before = len(store.events())
        history_before = len(store.history("default", name))
        if new in TRANSITIONS[old]:
            after = store.transition("default", name, 1, new, actor="carol", reason="why")
            assert after.state is new and store.get("default", name).state is new
            h = store.history("default", name)[-1]
            got = (h["actor"], h["from_state"], h["to_state"], h["reason"])
            assert got == ("carol", old.value, new.value, "why")
            ev = store.events()[-1]
            assert len(store.events()) == events_before + 1
            assert ev.payload["actor"] == "carol" and ev.payload["state"] == new.value
        else:
            with pytest.raises(InvalidTransition):
                store.transition("default", name, 1, new, actor="carol")
            assert store.get("default", name).state is old
            assert len(store.events()) == events_before
            assert len(store.history("default", name)) == history_before


def test_transition_table() -> None:
    assert TRANSITIONS[S.DESTROYED] == frozenset()
    assert S.ACTIVE not in TRANSITIONS[S.DESTROYED] and S.DESTROYED not in TRANSITIONS[S.ACTIVE]
    assert all(S.REVOKED in TRANSITIONS[s] for s in KeyState if s not in (S.DESTROYED, S.REVOKED))
    assert TRANSITIONS[S.GRACE] >= {S.ACTIVE, S.DESTROYED} and TRANSITIONS[S.PRE_ACTIVE] >= {S.ACTIVE}


def test_history_and_event_kinds(store: KeyStore) -> None:
    store.create(rec(grace=timedelta(days=7)), actor="alice", reason="new")
    store.transition("default", "zpk1", 1, S.GRACE, actor="engine", reason="rotation")
    store.transition("default", "zpk1", 1, S.ACTIVE, actor="engine", reason="validation failed")
    store.transition("default", "zpk1", 1, S.SUSPENDED, actor="ops")
    store.transition("default", "zpk1", 1, S.ACTIVE, actor="ops")
    store.transition("default", "zpk1", 1, S.REVOKED, actor="sec", reason="compromised")
    store.transition("default", "zpk1", 1, S.DESTROYED, actor="sec")
    store.note("default", "zpk1", 1, actor="sec", action="audited", reason="ok")
    h = store.history("default", "zpk1")
    assert [x["action"] for x in h] == [
        "created", "rotated", "rolled_back", "suspended", "activated", "revoked", "destroyed", "audited",
    ]  # fmt: skip
    assert [x["actor"] for x in h][:3] == ["alice", "engine", "engine"]
    assert h[0]["from_state"] is None and h[0]["to_state"] == "active"
    assert h[5]["reason"] == "compromised"
    assert all(datetime.fromisoformat(x["at"]) <= datetime.now(UTC) for x in h)
    events = store.events()
    assert [e.kind for e in events] == [
        "key.created", "key.rotated", "key.rolled_back", "key.suspended", "key.activated", "key.revoked",
        "key.destroyed",
    ]  # fmt: skip
    assert events[1].payload["grace_until"]  # now + 7 days
    cryptogram = store.versions("default", "zpk1")[0].cryptogram
    for e in events:
        assert e.idempotency_key == f"{e.kind}:default:zpk1:1:{e.id}"
        assert "cryptogram" not in e.payload and all(
            not isinstance(v, str) or not v.startswith("U") or len(v) < 32 for v in e.payload.values()
        )
        assert set(e.payload) >= {"tenant", "name", "version", "key_type", "kcv", "state", "reason", "actor"}
    del cryptogram


def test_grace_until(store: KeyStore) -> None:
    store.create(rec(grace=timedelta(days=7)), actor="a")
    before = datetime.now(UTC)
    r = store.transition("default", "zpk1", 1, S.GRACE, actor="a")
    assert r.grace_until is not None and before + timedelta(days=7) <= r.grace_until
    store.create(rec(name="z2"), actor="a")
    until = datetime(2030, 1, 1, tzinfo=UTC)
    assert store.transition("default", "z2", 1, S.GRACE, actor="a", grace_until=until).grace_until == until
    assert store.get("default", "z2").grace_until == until
    assert store.transition("default", "z2", 1, S.ACTIVE, actor="a").grace_until is None


def test_exception_mid_transition_leaves_nothing(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create(rec(), actor="a")
    events = len(store.events())

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("outbox write failed")

    monkeypatch.setattr(store, "_emit", boom)
    with pytest.raises(RuntimeError):
        store.transition("default", "zpk1", 1, S.REVOKED, actor="a")
    with pytest.raises(RuntimeError):
        store.create(rec(name="other"), actor="a")
    monkeypatch.undo()
    assert store.get("default", "zpk1").state is S.ACTIVE
    assert len(store.events()) == events
    assert [h["action"] for h in store.history("default", "zpk1")] == ["created"]
    with pytest.raises(KeyNotFound):
        store.get("default", "other")
    store.transition("default", "zpk1", 1, S.REVOKED, actor="a")  # the store still works
    assert store.events()[-1].kind == "key.revoked"


def test_destroy_tombstone_stays_refused(store: KeyStore) -> None:
    r = store.create(rec(), actor="a")
    assert r.cryptogram is not None
    digest = cryptogram_digest(r.cryptogram)
    now = datetime.now(UTC)
    assert digest not in store.refused_digests(now)
    store.transition("default", "zpk1", 1, S.REVOKED, actor="a", reason="leak")
    assert store.refused_cryptograms(now) == {r.cryptogram: "revoked"}
    t = store.transition("default", "zpk1", 1, S.DESTROYED, actor="a")
    assert t.cryptogram is None and store.get("default", "zpk1").cryptogram is None
    assert store.get("default", "zpk1").kcv == "ABCDEF"  # the tombstone keeps the record
    assert store.refused(now) == {digest: "destroyed"}
    assert store.is_refused(r.cryptogram)
    assert store.refused_cryptograms(now) == {}
    with pytest.raises(KeyExists):  # a destroyed key cannot come back by re-import
        store.create(rec(name="again", cryptogram=r.cryptogram), actor="a")
    with pytest.raises(InvalidTransition):
        store.transition("default", "zpk1", 1, S.ACTIVE, actor="a")


def test_refusal_by_state(store: KeyStore) -> None:
    now = datetime.now(UTC)
    for name, state in (("pre", S.PRE_ACTIVE), ("act", S.ACTIVE), ("sus", S.SUSPENDED), ("rev", S.REVOKED)):
        _put_in(store, name, state)
    store.create(rec(name="g-live"), actor="a")
    store.transition("default", "g-live", 1, S.GRACE, actor="a", grace_until=now + timedelta(hours=1))
    store.create(rec(name="g-over"), actor="a")
    store.transition("default", "g-over", 1, S.GRACE, actor="a", grace_until=now - timedelta(seconds=1))
    refused = store.refused(now)
    by_name = {r.name: r for r in store.list()}
    expected = {"sus": "suspended", "rev": "revoked", "g-over": "grace"}
    got = {n: refused[cryptogram_digest(r.cryptogram)] for n, r in by_name.items()
           if r.cryptogram and cryptogram_digest(r.cryptogram) in refused}  # fmt: skip
    assert got == expected
    assert [r.name for r in store.expired_grace(now)] == ["g-over"]
    # once the grace period of g-live ends it is refused too
    assert "g-live" in {r.name for r in store.expired_grace(now + timedelta(hours=2))}


def test_rotation_due_and_inventory(store: KeyStore) -> None:
    now = datetime.now(UTC)
    store.create(rec(name="monthly", rotate_every=timedelta(days=29)), actor="a")
    store.create(rec(name="weekly", rotate_every=timedelta(days=5)), actor="a")
    store.create(rec(name="never"), actor="a")
    store.create(rec(name="old", rotate_every=timedelta(days=1)), actor="a")
    store.transition("default", "old", 1, S.GRACE, actor="a", grace_until=now + timedelta(days=3))
    _put_in(store, "gone", S.DESTROYED)
    assert store.due_for_rotation(now) == []
    assert [r.name for r in store.due_for_rotation(now + timedelta(days=6))] == ["weekly"]
    assert {r.name for r in store.due_for_rotation(now + timedelta(days=31))} == {"monthly", "weekly"}
    inv = store.inventory(now)
    assert inv["total"] == 5
    assert inv["by_state"] == {"pre-active": 0, "active": 3, "grace": 1, "suspended": 0, "revoked": 0,
                               "destroyed": 1}  # fmt: skip
    assert inv["expiring_7d"] == 2
    assert sorted(inv["expiring_7d_keys"]) == ["default/old@1", "default/weekly@1"]
    assert inv["expiring_30d"] == 3 and inv["pending_rotation"] == 0
    assert store.inventory(now + timedelta(days=6))["pending_rotation"] == 1


def test_outbox_delivery(store: KeyStore) -> None:
    store.create(rec(), actor="a")
    store.transition("default", "zpk1", 1, S.REVOKED, actor="a")
    pending = store.pending_events("hook")
    assert [e.kind for e in pending] == ["key.created", "key.revoked"]
    store.mark_delivered(pending[0].id, "hook")
    store.mark_delivered(pending[0].id, "hook")  # idempotent
    assert [e.id for e in store.pending_events("hook")] == [pending[1].id]
    assert len(store.pending_events("file")) == 2  # each subscriber separately
    assert len(store.pending_events("file", limit=1)) == 1


def test_migrations_idempotent(store_url: str) -> None:
    a = KeyStore.open(store_url)
    assert a.schema_version() == 1
    a.create(rec(), actor="a")
    assert a.migrate() == []
    a.close()
    b = KeyStore.open(store_url)  # re-open: nothing re-applied, data kept
    assert b.migrate() == [] and b.schema_version() == 1
    assert b.get("default", "zpk1").state is S.ACTIVE
    b.close()


def test_two_handles_share_one_store(store_url: str) -> None:
    """Two proxies on one inventory: a transition by one is seen, and not repeated, by the other."""
    a, b = KeyStore.open(store_url), KeyStore.open(store_url)
    try:
        a.create(rec(), actor="a")
        b.transition("default", "zpk1", 1, S.REVOKED, actor="b")
        assert a.get("default", "zpk1").state is S.REVOKED
        with pytest.raises(InvalidTransition):
            a.transition("default", "zpk1", 1, S.REVOKED, actor="a")
    finally:
        a.close()
        b.close()


def test_bad_url() -> None:
    with pytest.raises(ValueError, match="sqlite"):
        KeyStore.open("mysql://x")
