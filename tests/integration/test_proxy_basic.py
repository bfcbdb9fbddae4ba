"""The proxy on two SoftHSM2 nodes answers byte for byte like the emulator (commands it serves)."""

from __future__ import annotations

import os
import signal
import time

import psec
import pytest

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk
from tests.integration.conftest import HsmClient, RunningEmulator
from tests.integration.proxy_env import RunningProxy

ZPK_A = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
ZPK_B = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
TPK = bytes.fromhex("1C1C1C1C1C1C1C1C2A2A2A2A2A2A2A2A")


def _enc(key: bytes, block: bytes) -> bytes:
    with legacy_tdes():
        return bytes(psec.des.encrypt_tdes_ecb(key, block))


def _dec(key: bytes, block: bytes) -> bytes:
    with legacy_tdes():
        return bytes(psec.des.decrypt_tdes_ecb(key, block))


def _requests() -> list[bytes]:
    za = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_A).encode()
    zb = encrypt_key_under_lmk(TEST_LMK, "001", "T", ZPK_B + ZPK_B[:8]).encode()
    zx = encrypt_key_under_lmk(TEST_LMK, "001", "X", ZPK_B).encode()
    tpk = encrypt_key_under_lmk(TEST_LMK, "002", "U", TPK).encode()
    block = _enc(ZPK_A, psec.pinblock.encode_pinblock_iso_0("1234", "4012345678909")).hex().upper().encode()
    tblock = _enc(TPK, psec.pinblock.encode_pinblock_iso_0("98765", "4012345678909")).hex().upper().encode()
    acct = b"401234567890"
    return [
        b"NC",
        b"NC%01",
        b"NC%02",
        b"NO00",
        b"NO01",
        b"B20005hello",
        b"CC" + za + zb + b"12" + block + b"0101" + acct,
        b"CC" + za + zx + b"12" + block + b"0103" + acct,
        b"CC" + za + zb + b"04" + block + b"0101" + acct,
        b"CC" + za + zb + b"12" + block + b"0199" + acct,
        b"CC" + za + zb + b"12" + block + b"0101" + acct + b"%01",
        b"CC" + za + zb + b"12" + b"0" * 16 + b"0101" + acct,
        b"CA" + tpk + za + b"12" + tblock + b"0101" + acct,
        b"CA" + tpk + zx + b"12" + tblock + b"0103" + acct + b"\x19trailer",
        b"CCQ123",
        b"ZZ",
        b"BUFF1" + za + b";904;001",  # key type 904 is not defined: 04 on both
        b"A00" + b"904U",
        b"A00" + b"302U",  # 302 (IKEY) is a valid-looking code payShield does not define here: 04
    ]


def test_proxy_matches_emulator(running_proxy: RunningProxy, emulator: RunningEmulator) -> None:
    proxy = HsmClient("127.0.0.1", running_proxy.port)
    ref = HsmClient(emulator.host, emulator.port)
    try:
        for request in _requests():
            assert proxy.call(request) == ref.call(request), request[:2]
    finally:
        proxy.close()
        ref.close()


def test_cc_translates_to_the_right_pin(running_proxy: RunningProxy) -> None:
    za = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_A).encode()
    zx = encrypt_key_under_lmk(TEST_LMK, "001", "X", ZPK_B).encode()
    block = _enc(ZPK_A, psec.pinblock.encode_pinblock_iso_0("1234", "4012345678909"))
    client = HsmClient("127.0.0.1", running_proxy.port)
    try:
        resp = client.call(b"CC" + za + zx + b"12" + block.hex().upper().encode() + b"0101401234567890")
    finally:
        client.close()
    assert resp[:6] == b"CD0004"
    out = _dec(ZPK_B, bytes.fromhex(resp[6:22].decode()))
    assert psec.pinblock.decode_pinblock_iso_0(out, "4012345678909") == "1234"
    assert resp[22:] == b"01"


def test_sigkill_of_a_worker_loses_nothing(running_proxy: RunningProxy) -> None:
    za = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_A).encode()
    zx = encrypt_key_under_lmk(TEST_LMK, "001", "X", ZPK_B).encode()
    block = _enc(ZPK_A, psec.pinblock.encode_pinblock_iso_0("1234", "4012345678909")).hex().upper().encode()
    request = b"CC" + za + zx + b"12" + block + b"0101401234567890"
    expected_block = _enc(ZPK_B, psec.pinblock.encode_pinblock_iso_0("1234", "4012345678909")).hex().upper()
    victim = running_proxy.proxy.nodes[0]
    pid = victim.pid
    assert pid is not None
    restarts = victim.restarts
    client = HsmClient("127.0.0.1", running_proxy.port)
    try:
        for i in range(300):
            if i == 50:
                os.kill(pid, signal.SIGKILL)
            assert client.call(request) == b"CD0004" + expected_block.encode() + b"01"
        deadline = time.monotonic() + 20
        while not (victim.up and victim.restarts > restarts) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert victim.up, "the killed worker came back"
        assert victim.pid != pid
    finally:
        client.close()


@pytest.mark.parametrize("strict", [True])
def test_strict_key_custody_answers_68(
    tmp_path_factory: pytest.TempPathFactory, strict: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from hsmproxy.config import load_settings
    from tests.integration.proxy_env import make_nodes, start_proxy

    config = make_nodes(tmp_path_factory.mktemp("strict"), ("node-s",), strict=strict)
    with caplog.at_level("WARNING"):
        rp = start_proxy(load_settings(config))
    try:
        assert any(
            "strict_key_custody" in r.getMessage() and "node-s" in r.getMessage() for r in caplog.records
        )
        za = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_A).encode()
        client = HsmClient("127.0.0.1", rp.port)
        try:
            assert client.call(b"CC" + za + za + b"12" + b"0" * 16 + b"0101401234567890") == b"CD68"
            assert client.call(b"NC")[:4] == b"ND00"  # LMK objects themselves are fine
        finally:
            client.close()
    finally:
        rp.stop()
