"""hsmproxy's PIN-under-LMK encoding."""

from __future__ import annotations

import pytest

from emulator.crypto.cipher import tdes_ecb_encrypt
from emulator.crypto.errors import CryptoError
from emulator.crypto.lmk import TEST_LMK
from emulator.crypto.pin_lmk import decrypt_pin_under_lmk, encrypt_pin_under_lmk

ACCOUNT = "401234567890"


def test_known_answer() -> None:
    """ISO-0 block 041274EDCBA9876F under test LMK pair 02-03 (cross-computed with psec)."""
    value = encrypt_pin_under_lmk(TEST_LMK, "1234", ACCOUNT)
    assert value == "86DFC8B1B968E09F"
    assert value == tdes_ecb_encrypt(TEST_LMK.pair("02"), bytes.fromhex("041274EDCBA9876F")).hex().upper()
    assert decrypt_pin_under_lmk(TEST_LMK, value, ACCOUNT) == "1234"
    assert decrypt_pin_under_lmk(TEST_LMK, value.lower(), ACCOUNT) == "1234"


@pytest.mark.parametrize("pin", ["0000", "12345", "123456789012"])
def test_round_trip(pin: str) -> None:
    value = encrypt_pin_under_lmk(TEST_LMK, pin, ACCOUNT)
    assert len(value) == 16 and value == value.upper()
    assert decrypt_pin_under_lmk(TEST_LMK, value, ACCOUNT) == pin


def test_errors() -> None:
    value = encrypt_pin_under_lmk(TEST_LMK, "1234", ACCOUNT)
    with pytest.raises(CryptoError) as exc:
        decrypt_pin_under_lmk(TEST_LMK, value, "401234567891")
    assert exc.value.code == "14"
    assert value not in exc.value.message
    with pytest.raises(CryptoError) as exc:
        decrypt_pin_under_lmk(TEST_LMK, value[:15], ACCOUNT)
    assert exc.value.code == "14"
    with pytest.raises(CryptoError) as exc:
        decrypt_pin_under_lmk(TEST_LMK, "X" * 16, ACCOUNT)
    assert exc.value.code == "14"
    with pytest.raises(CryptoError) as exc:
        encrypt_pin_under_lmk(TEST_LMK, "123", ACCOUNT)
    assert exc.value.code == "24"
    with pytest.raises(CryptoError) as exc:
        encrypt_pin_under_lmk(TEST_LMK, "1234", "1234")
    assert exc.value.code == "22"
    # A block whose length nibble is out of range reports the PIN length error.
    bad = tdes_ecb_encrypt(TEST_LMK.pair("02"), bytes.fromhex("0D1274EDCBA9876F")).hex()
    with pytest.raises(CryptoError) as exc:
        decrypt_pin_under_lmk(TEST_LMK, bad, ACCOUNT)
    assert exc.value.code == "24"
