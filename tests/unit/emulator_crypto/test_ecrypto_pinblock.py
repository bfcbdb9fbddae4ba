"""ISO 9564 PIN blocks (VECTORS.md section 1)."""

from __future__ import annotations

import warnings

import psec
import pytest

from emulator.crypto.errors import CryptoError
from emulator.crypto.pinblock import (
    account_from_pan,
    decipher_iso4,
    decode_pin_block,
    encipher_iso4,
    encode_iso4_pan_field,
    encode_iso4_pin_field,
    encode_pin_block,
)

ISO0_ROWS = [
    ("1234", "43219876543210987", "0412AC89ABCDEF67"),
    ("1234", "4012345678909", "041274EDCBA9876F"),
    ("1234", "5555555551234567", "041261AAAAEDCBA9"),
    ("123456789012", "5555555551234567", "0C1261032D8226A9"),
]


def _code(exc: pytest.ExceptionInfo[CryptoError]) -> str:
    return exc.value.code


@pytest.mark.parametrize(("pin", "pan", "block"), ISO0_ROWS)
def test_iso0_vectors(pin: str, pan: str, block: str) -> None:
    account = account_from_pan(pan)
    assert encode_pin_block("01", pin, account).hex().upper() == block
    assert decode_pin_block("01", bytes.fromhex(block), account) == pin
    # psec (full PAN) agrees.
    assert psec.pinblock.decode_pinblock_iso_0(bytes.fromhex(block), pan) == pin


def test_account_from_pan() -> None:
    assert account_from_pan("4012345678909") == "401234567890"
    assert account_from_pan("43219876543210987") == "987654321098"
    assert account_from_pan("123456") == "000000012345"
    for bad in ("1", "12345678901234567890", "40123456789O9"):
        with pytest.raises(CryptoError) as exc:
            account_from_pan(bad)
        assert _code(exc) == "22"


def test_iso3_vector() -> None:
    """IBM example: the given number already excludes the check digit."""
    account = "222333444555"
    block = encode_pin_block("47", "123456", account, fill="AFBECDDC")
    assert block.hex().upper() == "361216759CFA8889"
    assert decode_pin_block("47", block, account) == "123456"
    # psec takes a full PAN; append a dummy check digit.
    assert psec.pinblock.decode_pinblock_iso_3(block, account + "0") == "123456"


def test_iso3_random_fill_is_a_to_f() -> None:
    account = "222333444555"
    for _ in range(20):
        block = encode_pin_block("47", "1234", account)
        clear = bytes(a ^ b for a, b in zip(block, bytes.fromhex("0000" + account), strict=True))
        assert all(c in "ABCDEF" for c in clear.hex().upper()[6:])
        assert decode_pin_block("47", block, account) == "1234"


def test_iso1_decode_only() -> None:
    assert decode_pin_block("05", bytes.fromhex("141234A1B2C3D4E5")) == "1234"
    assert decode_pin_block("05", bytes.fromhex("1C12345678901200")) == "123456789012"
    block = encode_pin_block("05", "98765")
    assert block.hex().upper().startswith("1598765")
    assert decode_pin_block("05", block) == "98765"
    assert encode_pin_block("05", "1234", fill="0123456789").hex().upper() == "1412340123456789"


def test_diebold() -> None:
    assert encode_pin_block("03", "1234").hex().upper() == "1234FFFFFFFFFFFF"
    assert encode_pin_block("03", "123456789012").hex().upper() == "123456789012FFFF"
    assert decode_pin_block("03", bytes.fromhex("12345FFFFFFFFFFF")) == "12345"


@pytest.mark.parametrize(
    ("fmt", "block", "code"),
    [
        ("01", "1412AC89ABCDEF67", "20"),  # control nibble 1 in an ISO-0 block
        ("01", "0312AC89ABCDEF67", "24"),  # length 3
        ("01", "0D12AC89ABCDEF67", "24"),  # length 13
        ("01", "0412AC89ABCDEF66", "20"),  # fill not F
        ("01", "041A", "20"),  # wrong size
        ("03", "123FFFFFFFFFFFFF", "24"),
        ("03", "1234F5FFFFFFFFFF", "20"),
        ("03", "1234567890123456", "24"),
        ("03", "12A4FFFFFFFFFFFF", "20"),
        ("05", "041234FFFFFFFFFF", "20"),
        ("05", "14A234FFFFFFFFFF", "20"),
        ("47", "0412AC89ABCDEF67", "20"),
        ("02", "0412AC89ABCDEF67", "23"),
        ("48", "0412AC89ABCDEF67", "23"),
    ],
)
def test_decode_errors(fmt: str, block: str, code: str) -> None:
    with pytest.raises(CryptoError) as exc:
        decode_pin_block(fmt, bytes.fromhex(block), "987654321098")
    assert _code(exc) == code
    assert block not in exc.value.message
    assert "987654321098" not in exc.value.message


def test_encode_errors() -> None:
    with pytest.raises(CryptoError) as exc:
        encode_pin_block("01", "123", "987654321098")
    assert _code(exc) == "24"
    with pytest.raises(CryptoError) as exc:
        encode_pin_block("01", "1234567890123", "987654321098")
    assert _code(exc) == "24"
    with pytest.raises(CryptoError) as exc:
        encode_pin_block("01", "12a4", "987654321098")
    assert _code(exc) == "20"
    with pytest.raises(CryptoError) as exc:
        encode_pin_block("01", "1234", "98765432109")
    assert _code(exc) == "22"
    with pytest.raises(CryptoError) as exc:
        encode_pin_block("34", "1234", "987654321098")
    assert _code(exc) == "23"
    with pytest.raises(CryptoError) as exc:
        encode_pin_block("47", "1234", "987654321098", fill="0123456789")
    assert _code(exc) == "15"


# --- ISO-4 -----------------------------------------------------------------------

ISO4_PIN_FIELD = "441234AAAAAAAAAA2F69ADDE2E9E7ACE"
ISO4_ROWS = [
    ("AF8CB133A78F8DC2D1359F18527593FB", "A912150391AB65A67E52883D81CE2D15"),
    ("D30BDC73EC9714B000BEC66BDB7B6D09", "52A00503BD34BA1383F6A7EE9FE2547F"),
    ("7D69F01F3B45449F62C7816ECE723268", "A5A27E82B43A9A866A93D7ABE89CEF93"),
]


def test_iso4_fields() -> None:
    fill = bytes.fromhex(ISO4_PIN_FIELD[16:])
    assert encode_iso4_pin_field("1234", fill=fill).hex().upper() == ISO4_PIN_FIELD
    pan_field = encode_iso4_pan_field("4111111111111111")
    assert pan_field.hex().upper() == "44111111111111111000000000000000"
    assert encode_iso4_pan_field("123").hex().upper() == "0000000000123".ljust(32, "0")


@pytest.mark.parametrize(("key", "block"), ISO4_ROWS)
def test_iso4_x9_24_3_vectors(key: str, block: str) -> None:
    fill = bytes.fromhex(ISO4_PIN_FIELD[16:])
    k = bytes.fromhex(key)
    assert encipher_iso4(k, "1234", "4111111111111111", fill=fill).hex().upper() == block
    assert decipher_iso4(k, bytes.fromhex(block), "4111111111111111") == "1234"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert psec.pinblock.decipher_pinblock_iso_4(k, bytes.fromhex(block), "4111111111111111") == (
            "1234"
        )


def test_iso4_psec_deterministic_vector() -> None:
    key = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    block = encipher_iso4(key, "1234", "1234567890123456789", fill=b"\xff" * 8)
    assert block.hex().upper() == "28B41FDDD29B743E93124BD8E32D921E"
    assert decipher_iso4(key, block, "1234567890123456789") == "1234"


def test_iso4_random_round_trip_and_errors() -> None:
    key = bytes(range(32))
    block = encipher_iso4(key, "987654321", "5555555551234567")
    assert decipher_iso4(key, block, "5555555551234567") == "987654321"
    with pytest.raises(CryptoError) as exc:
        decipher_iso4(key, block, "5555555551234568")
    assert _code(exc) in ("20", "24")
    with pytest.raises(CryptoError) as exc:
        decipher_iso4(key, block[:8], "5555555551234567")
    assert _code(exc) == "20"
    with pytest.raises(CryptoError) as exc:
        encipher_iso4(key, "1234", "")
    assert _code(exc) == "22"
