"""Rotation engine on a live proxy (two SoftHSM2 nodes, SQLite keystore).

A ZPK rotated with a short grace period: PIN translations (CC) under the old version keep working
until the grace ends, then answer 29, while the new version (generated inside a node, checked here
by decrypting it independently under the test LMK) works; the nodes drop the old key's handles.
A rotation whose validation fails rolls back by itself: the new version is revoked (29), the old
one stays active.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import psec
import pytest

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.lmk import TEST_LMK, decrypt_key_under_lmk, encrypt_key_under_lmk, kcv_tdes
from hsmproxy.config import load_settings
from hsmproxy.keys.rotation import RotationEngine, RotationOutcome
from hsmproxy.keys.store import KeyRecord, KeyState, KeyStore
from tests.integration.proxy_env import RunningProxy, make_nodes, start_proxy

T = TypeVar("T")
ZPK_OLD = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
ZPK_DST = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
ACCT = "401234567890"
PAN = "4012345678909"


def _enc(key: bytes, block: bytes) -> bytes:
    with legacy_tdes():
        return bytes(psec.des.encrypt_tdes_ecb(key, block))


def _dec(key: bytes, block: bytes) -> bytes:
    with legacy_tdes():
        return bytes(psec.des.decrypt_tdes_ecb(key, block))


def call(port: int, payload: bytes) -> bytes:
    """One host command (header 0000) -> response without header."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        frame = b"0000" + payload
        s.sendall(struct.pack(">H", len(frame)) + frame)
        n = struct.unpack(">H", _read(s, 2))[0]
        return _read(s, n)[4:]


def _read(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "connection closed"
        out += chunk
    return out


def cc(port: int, src_lmk: str, src_clear: bytes, pin: str = "1234") -> bytes:
    """CC from ``src`` to the fixed destination ZPK; the response."""
    dst = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_DST)
    block = _enc(src_clear, psec.pinblock.encode_pinblock_iso_0(pin, PAN)).hex().upper()
    return call(port, f"CC{src_lmk}{dst}12{block}0101{ACCT}".encode())


def zpk_record(name: str, clear: bytes, *, grace: timedelta, rotate_every: timedelta) -> KeyRecord:
    """An active ZPK under the test LMK, activated long enough ago to be due for rotation."""
    now = datetime.now(UTC)
    with legacy_tdes():
        kcv = kcv_tdes(clear).hex().upper()[:6]
    return KeyRecord(
        tenant="default", name=name, version=1, key_type="ZPK", type_code="001", lmk_id="00",
        cryptogram=encrypt_key_under_lmk(TEST_LMK, "001", "U", clear), kcv=kcv, state=KeyState.ACTIVE,
        activation_date=now - timedelta(days=2), expiry_date=None, grace_until=None,
        rotate_every=rotate_every, grace_period=grace, created_at=now, updated_at=now, created_by="test",
    )  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningProxy, KeyStore]]:
    """A proxy with a keystore (refresh every 0.2 s; the rotation loop is driven by the tests)."""
    root = tmp_path_factory.mktemp("rotation")
    config = make_nodes(root)
    db = root / "keys.db"
    with config.open("a") as fh:
        fh.write(f'[keystore]\nurl = "sqlite:///{db}"\nrotation_interval = 3600\nrefresh_interval = 0.2\n')
    store = KeyStore.open(f"sqlite:///{db}")
    rp = start_proxy(load_settings(Path(config)))
    try:
        yield rp, store
    finally:
        rp.stop()
        store.close()


def run(rp: RunningProxy, coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the proxy's event loop."""
    return asyncio.run_coroutine_threadsafe(coro, rp.loop).result(60)


def engine(rp: RunningProxy) -> RotationEngine:
    """The running proxy's rotation engine."""
    assert rp.proxy.lifecycle is not None
    return rp.proxy.lifecycle.engine


def wait_for(check: Any, timeout: float = 15.0) -> None:
    """Poll ``check()`` until true (bounded)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_rotation_with_grace_then_refused(env: tuple[RunningProxy, KeyStore]) -> None:
    rp, store = env
    old = store.create(
        zpk_record("zpk-a", ZPK_OLD, grace=timedelta(seconds=2), rotate_every=timedelta(days=1)), actor="test"
    )
    assert old.cryptogram is not None
    r = cc(rp.port, old.cryptogram, ZPK_OLD)
    assert r[:4] == b"CD00"
    clear_pb = _dec(ZPK_DST, bytes.fromhex(r[6:22].decode()))
    assert psec.pinblock.decode_pinblock_iso_0(clear_pb, PAN) == "1234"

    outcomes: list[RotationOutcome] = run(rp, engine(rp).run_once())
    mine = [o for o in outcomes if o.name == "zpk-a"]
    assert [(o.status, o.old_version, o.new_version) for o in mine] == [("rotated", 1, 2)]

    v1, v2 = store.versions("default", "zpk-a")
    assert (v1.state, v2.state) == (KeyState.GRACE, KeyState.ACTIVE)
    assert v1.grace_until is not None and v2.cryptogram is not None and v2.cryptogram.startswith("U")
    # The new key came from a node: check it independently under the test LMK.
    new_clear = decrypt_key_under_lmk(TEST_LMK, "001", v2.cryptogram, check_parity=True)
    assert new_clear != ZPK_OLD and len(new_clear) == 16
    with legacy_tdes():
        assert kcv_tdes(new_clear).hex().upper()[:6] == v2.kcv
    steps = [(h["actor"], h["action"], h["version"]) for h in store.history("default", "zpk-a")]
    for step in (("rotation-engine", "created", 2), ("rotation-engine", "validated", 2),
                 ("rotation-engine", "rotated", 1), ("rotation-engine", "activated", 2)):  # fmt: skip
        assert step in steps

    # In grace: the old version still translates; the new one too.
    r = cc(rp.port, old.cryptogram, ZPK_OLD, "98765")
    assert r[:4] == b"CD00"
    r = cc(rp.port, v2.cryptogram, new_clear, "4321")
    assert r[:6] == b"CD0004"
    assert psec.pinblock.decode_pinblock_iso_0(_dec(ZPK_DST, bytes.fromhex(r[6:22].decode())), PAN) == "4321"

    # After the grace period the old version is refused (29); the nodes dropped its handles.
    lifecycle = rp.proxy.lifecycle
    assert lifecycle is not None
    dropped_before = lifecycle.sync.dropped
    wait_for(lambda: cc(rp.port, old.cryptogram or "", ZPK_OLD)[:4] == b"CD29")
    assert cc(rp.port, old.cryptogram, ZPK_OLD)[:4] == b"CD29"
    assert cc(rp.port, v2.cryptogram, new_clear)[:4] == b"CD00"
    wait_for(lambda: lifecycle.sync.dropped > dropped_before)
    assert store.get("default", "zpk-a", 1).state == KeyState.GRACE  # superseded: left in grace


def test_failed_validation_rolls_back(env: tuple[RunningProxy, KeyStore]) -> None:
    rp, store = env
    clear = bytes.fromhex("1C1C1C1C1C1C1C1C2A2A2A2A2A2A2A2A")
    old = store.create(
        zpk_record("zpk-b", clear, grace=timedelta(hours=1), rotate_every=timedelta(days=1)), actor="test"
    )
    assert old.cryptogram is not None
    eng = engine(rp)

    async def failing(_engine: RotationEngine, _record: KeyRecord) -> str | None:
        return "injected failure"

    eng.validator = failing
    try:
        outcome = run(rp, eng.rotate(old))
    finally:
        from hsmproxy.keys.rotation import default_validator

        eng.validator = default_validator
    assert (outcome.status, outcome.new_version, outcome.reason) == ("rolled_back", 2, "injected failure")
    v1, v2 = store.versions("default", "zpk-b")
    assert (v1.state, v2.state) == (KeyState.ACTIVE, KeyState.REVOKED)
    history = store.history("default", "zpk-b")
    assert any(
        h["actor"] == "rotation-engine" and h["version"] == 2 and h["to_state"] == "revoked"
        and str(h["reason"]).startswith("rolled back: validation failed") for h in history
    )  # fmt: skip
    assert cc(rp.port, old.cryptogram, clear)[:4] == b"CD00"
    assert v2.cryptogram is not None
    new_clear = decrypt_key_under_lmk(TEST_LMK, "001", v2.cryptogram)
    wait_for(lambda: cc(rp.port, v2.cryptogram or "", new_clear)[:4] == b"CD29")


def test_default_validator_passes_on_every_node(env: tuple[RunningProxy, KeyStore]) -> None:
    """The real validator (check values + PIN round trip on both nodes) accepts a good key and
    rejects a record whose check value does not belong to its cryptogram."""
    rp, _store = env
    from hsmproxy.keys.rotation import default_validator

    rec = zpk_record("zpk-c", ZPK_DST, grace=timedelta(0), rotate_every=timedelta(days=1))
    eng = engine(rp)
    assert len(eng.router.up_nodes()) == 2
    assert run(rp, default_validator(eng, rec)) is None
    bad = KeyRecord(**{**rec.__dict__, "kcv": "000000"})
    reason = run(rp, default_validator(eng, bad))
    assert reason is not None and "check value" in reason


def test_an_interrupted_rotation_is_completed_by_the_next_run(tmp_path: Path) -> None:
    """A crash after the new version went ACTIVE but before the old one went to GRACE is repaired."""
    store = KeyStore.open(f"sqlite:///{tmp_path / 'keys.db'}")
    try:
        now = datetime.now(UTC)
        base = KeyRecord(
            tenant="default", name="zpk-a", version=1, key_type="ZPK", type_code="001", lmk_id="00",
            cryptogram="U" + "1" * 32, kcv="000000", state=KeyState.ACTIVE, activation_date=now,
            expiry_date=None, grace_until=None, rotate_every=None, grace_period=timedelta(days=7),
            created_at=now, updated_at=now, created_by="test",
        )  # fmt: skip
        store.create(base, actor="test")
        store.create(
            replace(base, version=2, cryptogram="U" + "2" * 32, state=KeyState.PRE_ACTIVE), actor="test"
        )
        store.transition(
            "default", "zpk-a", 2, KeyState.ACTIVE, actor="test", reason="rotation (crashed next)"
        )
        engine = RotationEngine(store, router=None)  # type: ignore[arg-type]
        assert engine.repair() == 1
        assert store.get("default", "zpk-a", 1).state == KeyState.GRACE
        assert store.get("default", "zpk-a", 2).state == KeyState.ACTIVE
        assert engine.repair() == 0
    finally:
        store.close()
