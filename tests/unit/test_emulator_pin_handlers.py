"""PIN and card handlers through the dispatcher (no socket): edge cases and error codes."""

from __future__ import annotations

import pytest

from emulator.app import TEST_KEYBLOCK_LMK, build_state
from emulator.crypto.cipher import tdes_ecb_encrypt
from emulator.crypto.keyblock import KeyBlockHeader, wrap_key_block
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk
from emulator.crypto.pin_lmk import encrypt_pin_under_lmk
from emulator.crypto.pinblock import encode_pin_block
from emulator.hsm import EmulatorHsm

KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
AES_KEY = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
ACCT = "401234567890"


def call(hsm: EmulatorHsm, command: bytes) -> bytes:
    """Run one command (header 0000) and return the response without header."""
    resp = hsm.handle(b"0000" + command)
    assert resp is not None
    return resp[4:]


def lmk(key_type: str, clear: bytes = KEY) -> bytes:
    return encrypt_key_under_lmk(TEST_LMK, key_type, "U", clear).encode()


def kb(usage: str, clear: bytes, algorithm: str = "A", mode: str = "B") -> bytes:
    header = KeyBlockHeader("1", usage, algorithm, mode, lmk_id="01")
    return b"S" + wrap_key_block(TEST_KEYBLOCK_LMK, header, clear).encode()


def block(pin: str = "1234", fmt: str = "01") -> bytes:
    return tdes_ecb_encrypt(KEY, encode_pin_block(fmt, pin, ACCT)).hex().upper().encode()


@pytest.fixture
def hsm() -> EmulatorHsm:
    return EmulatorHsm(build_state())


def test_aes_key_with_a_tdes_format_is_23(hsm: EmulatorHsm) -> None:
    zpk = kb("P0", AES_KEY)
    assert call(hsm, b"JG" + zpk + b"01" + ACCT.encode() + b"0" * 16) == b"JH23"
    assert call(hsm, b"CA" + lmk("002") + zpk + b"12" + block() + b"0101" + ACCT.encode()) == b"CB23"


def test_tdes_key_block_tpk_works_like_a_variant_key(hsm: EmulatorHsm) -> None:
    tpk = kb("71", KEY, "T", "B")
    pin_lmk = encrypt_pin_under_lmk(TEST_LMK, "1234", ACCT).encode()
    assert call(hsm, b"JC" + tpk + block() + b"01" + ACCT.encode()) == b"JD00" + pin_lmk
    assert (
        call(hsm, b"JC" + kb("72", KEY, "T", "B") + block() + b"01" + ACCT.encode()) == b"JD29"
    )  # ZPK usage


def test_destination_format_disabled_is_69_source_too(hsm: EmulatorHsm) -> None:
    req = b"CC" + lmk("001") + lmk("001") + b"12" + block() + b"0103" + ACCT.encode()
    assert call(hsm, req)[:4] == b"CD00"
    hsm.state.disabled_pin_formats.add("03")
    assert call(hsm, req) == b"CD69"
    hsm.state.disabled_pin_formats.add("01")
    assert call(hsm, b"JE" + lmk("001") + block() + b"01" + ACCT.encode()) == b"JF69"


def test_ibm_parameter_errors(hsm: EmulatorHsm) -> None:
    pvk = lmk("002")
    pin_lmk = encrypt_pin_under_lmk(TEST_LMK, "1234", ACCT).encode()
    tail = ACCT.encode() + b"1234567890123456" + b"11223344556N"
    assert call(hsm, b"DE" + pvk + pin_lmk + b"04" + tail)[:4] == b"DF00"
    assert call(hsm, b"DE" + pvk + pin_lmk + b"05" + tail) == b"DF24"  # PIN shorter than the check length
    assert call(hsm, b"DE" + pvk + pin_lmk + b"03" + tail) == b"DF15"
    assert call(hsm, b"DE" + pvk + pin_lmk + b"04" + tail[:12] + b"12345678901234AB" + tail[28:]) == b"DF25"
    assert call(hsm, b"EE" + pvk + b"771FFFFFFFFF" + b"04" + tail) == b"EF24"  # offset below the check length
    assert call(hsm, b"EE" + pvk + b"7710FFFFFFFF" + b"04" + tail[:28] + b"1122334455GN") == b"EF15"
    assert call(hsm, b"DE" + kb("V1", AES_KEY, "A", "C") + pin_lmk + b"04" + tail) == b"DF27"  # AES PVK


def test_iso4_pan_must_be_digits(hsm: EmulatorHsm) -> None:
    zpk = kb("P0", AES_KEY)
    pin_lmk = encrypt_pin_under_lmk(TEST_LMK, "1234", ACCT).encode()
    assert call(hsm, b"JG" + zpk + b"48" + b"13" + b"401234567890A" + pin_lmk) == b"JH22"


def test_ksn_descriptor_must_be_hex(hsm: EmulatorHsm) -> None:
    req = (
        b"G0"
        + lmk("009")
        + lmk("001")
        + b"A0G"
        + b"FFFF9876543210E00001"
        + b"1B9C1845EB993A7A0101"
        + ACCT.encode()
    )
    assert call(hsm, req) == b"G115"


def test_translate_keeps_pin_length_and_maximum(hsm: EmulatorHsm) -> None:
    req = b"CA" + lmk("002") + lmk("001") + b"12" + block("123456789012") + b"0101" + ACCT.encode()
    assert call(hsm, req)[:6] == b"CB0012"
    assert call(hsm, req.replace(b"12" + block("123456789012"), b"03" + block("123456789012"))) == b"CB24"


def test_cy_needs_a_cvk_usage(hsm: EmulatorHsm) -> None:
    cvk = kb("C0", KEY, "T", "C")
    assert call(hsm, b"CY" + cvk + b"561" + b"4123456789012345;8701101") == b"CZ00"
    assert call(hsm, b"CY" + kb("C0", AES_KEY, "A", "C") + b"561" + b"4123456789012345;8701101") == b"CZ27"
