"""Live emulator: A0, A6, A8, BU, FA against independent computations (psec) and VECTORS.md."""

from __future__ import annotations

import psec

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.lmk import TEST_LMK, decrypt_key_under_lmk, encrypt_key_under_lmk
from tests.integration.conftest import HsmClient

ZMK_CLEAR = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
ZMK_LMK = encrypt_key_under_lmk(TEST_LMK, "000", "U", ZMK_CLEAR).encode()
ZPK_CLEAR = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")  # KCV 08D7B4 (VECTORS.md section 10)


def _x917(zmk: bytes, key: bytes) -> bytes:
    with legacy_tdes():
        return bytes(psec.des.encrypt_tdes_ecb(zmk, key))


def test_a6_imports_an_x917_key_with_known_check_value(client: HsmClient) -> None:
    key_zmk = b"X" + _x917(ZMK_CLEAR, ZPK_CLEAR).hex().upper().encode()
    resp = client.call(b"A6001" + ZMK_LMK + key_zmk + b"U")
    assert resp[:4] == b"A700"
    key_lmk, kcv = resp[4:-6].decode(), resp[-6:]
    assert kcv == b"08D7B4"
    assert decrypt_key_under_lmk(TEST_LMK, "001", key_lmk) == ZPK_CLEAR


def test_tr31_export_and_import_round_trip_through_psec(client: HsmClient) -> None:
    zpk_lmk = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_CLEAR).encode()
    out = client.call(b"A8001" + ZMK_LMK + zpk_lmk + b"R")
    assert out[:4] == b"A900" and out[-6:] == b"08D7B4"
    with legacy_tdes():
        header, key = psec.tr31.unwrap(ZMK_CLEAR, out[5:-6].decode())
        assert key == ZPK_CLEAR
        assert header.key_usage == "P0"
        # A block psec wrapped (version D: AES-based binding of a TDES key) imports to the same key.
        block = psec.tr31.wrap(ZMK_CLEAR, "D0000P0TE00E0000", ZPK_CLEAR)
    resp = client.call(b"A6001" + ZMK_LMK + b"R" + block.encode() + b"U")
    assert resp == b"A700" + zpk_lmk + b"08D7B4"


def test_a0_generates_under_lmk_and_zmk_consistently(client: HsmClient) -> None:
    resp = client.call(b"A01001U;0" + ZMK_LMK + b"X")
    assert resp[:4] == b"A100"
    key_lmk, key_zmk, kcv = resp[4:37].decode(), resp[37:70].decode(), resp[70:]
    clear = decrypt_key_under_lmk(TEST_LMK, "001", key_lmk)
    with legacy_tdes():
        assert bytes(psec.des.decrypt_tdes_ecb(ZMK_CLEAR, bytes.fromhex(key_zmk[1:]))) == clear
        assert kcv == bytes(psec.des.generate_kcv(clear, 3)).hex().upper().encode()
    assert all(bin(b).count("1") % 2 for b in clear)
    # BU gives the same check value, 6 hex with KCV type 1 and 16 hex by default.
    assert client.call(b"BU011" + key_lmk.encode() + b";001") == b"BV00" + kcv
    assert client.call(b"BU011" + key_lmk.encode())[4:10] == kcv


def test_a0_key_block(client: HsmClient) -> None:
    resp = client.call(b"A00FFFS%01#72T2N00E00")
    assert resp[:4] == b"A100"
    block = resp[4:-6].decode()
    assert block.startswith("S1") and block[6:10] == "72TN"
    resp = client.call(b"BUFF1" + block.encode() + b";FFF;001%01")
    assert resp[:4] == b"BV00" and len(resp) == 10


def test_fa_translates_zpk_and_reports_parity(client: HsmClient) -> None:
    zpk_zmk = b"X" + _x917(ZMK_CLEAR, ZPK_CLEAR).hex().upper().encode()
    resp = client.call(b"FA" + ZMK_LMK + zpk_zmk + b";XU1")
    assert resp == b"FB00" + encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_CLEAR).encode() + b"08D7B4"
    even = bytes.fromhex("0023456789ABCDEFFEDCBA9876543210")
    resp = client.call(b"FA" + ZMK_LMK + b"X" + _x917(ZMK_CLEAR, even).hex().upper().encode() + b";XU1")
    assert resp[:4] == b"FB01"  # parity warning, key still returned
    assert len(resp) == 4 + 33 + 6


def test_key_error_paths_keep_the_connection(client: HsmClient) -> None:
    assert client.call(b"A00999U") == b"A104"  # invalid key type code (3 chars required)
    assert client.call(b"A00001Q") == b"A126"  # invalid scheme
    assert client.call(b"A02001U") == b"A115"  # invalid mode
    bad_parity = encrypt_key_under_lmk(TEST_LMK, "000", "U", bytes(16)).encode()
    assert client.call(b"A8001" + bad_parity + ZMK_LMK + b"X") == b"A910"
    assert client.call(b"BU019" + ZMK_LMK) == b"BV05"
    assert client.call(b"BU001U" + b"1" * 32 + b"%99") == b"BV13"
    assert client.call(b"BU021" + ZMK_LMK) == b"BV10"  # wrong key type: decrypts to a key with bad parity
