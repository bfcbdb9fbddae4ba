"""CVV, PVV and IBM 3624 (VECTORS.md sections 6, 7 and 8)."""

from __future__ import annotations

import psec
import pytest

from emulator.crypto.card import (
    generate_cvv,
    generate_pvv,
    ibm3624_natural_pin,
    ibm3624_offset,
    ibm3624_pin_from_offset,
    thales_validation_data,
    verify_cvv,
    verify_ibm3624,
    verify_pvv,
)
from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.errors import CryptoError
from emulator.crypto.pinblock import account_from_pan

CVK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")


@pytest.mark.parametrize(
    ("cvk", "pan", "expiry", "service_code", "cvv"),
    [
        ("0123456789ABCDEFFEDCBA9876543210", "4123456789012345", "8701", "101", "561"),
        ("0123456789ABCDEFFEDCBA9876543210", "4999988887777", "9105", "111", "649"),
        ("99999999999999998888888888888888", "2222222222222222", "3333", "111", "361"),
    ],
)
def test_cvv_vectors(cvk: str, pan: str, expiry: str, service_code: str, cvv: str) -> None:
    key = bytes.fromhex(cvk)
    assert generate_cvv(key, pan, expiry, service_code) == cvv
    verify_cvv(key, pan, expiry, service_code, cvv)


def test_cvv_failures() -> None:
    with pytest.raises(CryptoError) as exc:
        verify_cvv(CVK, "4123456789012345", "8701", "101", "562")
    assert exc.value.code == "01"
    assert "561" not in exc.value.message
    with pytest.raises(CryptoError) as exc:
        generate_cvv(CVK[:8], "4123456789012345", "8701", "101")
    assert exc.value.code == "27"
    with pytest.raises(CryptoError) as exc:
        generate_cvv(CVK, "4123456789012345", "870", "101")
    assert exc.value.code == "15"
    # CVV2 / iCVV are the same algorithm with service codes 000 / 999.
    assert generate_cvv(CVK, "4123456789012345", "8701", "000").isdecimal()


@pytest.mark.parametrize(
    ("pvk", "account", "pvki", "pin", "pvv"),
    [
        ("C8199237EA5857BC40EF9DA2B5E96BBF", "550000025321", "1", "1234", "4402"),
        ("86190176866EC17FB32685ADB6ADA83B", "550000025321", "1", "1234", "0481"),
        ("0123456789ABCDEFFEDCBA9876543210", account_from_pan("1122334455667788"), "1", "4524", "8523"),
        ("0123456789ABCDEFFEDCBA9876543210", account_from_pan("1122334455667788"), "2", "1912", "3244"),
    ],
)
def test_pvv_vectors(pvk: str, account: str, pvki: str, pin: str, pvv: str) -> None:
    key = bytes.fromhex(pvk)
    assert generate_pvv(key, pin, account, pvki) == pvv
    verify_pvv(key, pin, account, pvki, pvv)


def test_pvv_uses_leftmost_four_pin_digits_and_errors() -> None:
    key = bytes.fromhex("C8199237EA5857BC40EF9DA2B5E96BBF")
    assert generate_pvv(key, "123456", "550000025321", "1") == "4402"
    with pytest.raises(CryptoError) as exc:
        verify_pvv(key, "1235", "550000025321", "1", "4402")
    assert exc.value.code == "01"
    with pytest.raises(CryptoError) as exc:
        generate_pvv(key, "123", "550000025321", "1")
    assert exc.value.code == "24"
    with pytest.raises(CryptoError) as exc:
        generate_pvv(key, "1234", "55000002532", "1")
    assert exc.value.code == "22"
    with pytest.raises(CryptoError) as exc:
        generate_pvv(key, "1234", "550000025321", "A")
    assert exc.value.code == "15"


PVK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
DEC = "1234567890123456"
VD = "1122334455667788"


def test_ibm3624_vectors() -> None:
    assert ibm3624_natural_pin(PVK, DEC, VD, 4) == "4524"
    assert ibm3624_offset(PVK, "1234", DEC, VD) == "7710"
    assert ibm3624_offset(PVK, "0000", DEC, VD) == "6586"
    assert ibm3624_natural_pin(PVK, DEC, "11223344556677", 4) == "5518"
    assert ibm3624_pin_from_offset(PVK, "7710", DEC, VD) == "1234"
    assert ibm3624_pin_from_offset(PVK, "6586", DEC, VD) == "0000"
    verify_ibm3624(PVK, "1234", "7710", DEC, VD, check_length=4)


def test_ibm3624_matches_psec() -> None:
    with legacy_tdes():
        natural = psec.pin.generate_ibm3624_pin(PVK, DEC, "000000", VD, 0, 16, "F")
        short = psec.pin.generate_ibm3624_pin(PVK, DEC, "0000", VD, 0, 14, "F")
        offset = psec.pin.generate_ibm3624_offset(PVK, DEC, "123456", VD, 0, 16, "F")
    assert ibm3624_natural_pin(PVK, DEC, VD, 6) == natural
    assert ibm3624_natural_pin(PVK, DEC, VD[:14], 4) == short
    assert ibm3624_offset(PVK, "123456", DEC, VD) == offset


def test_ibm3624_verify_check_length() -> None:
    offset = ibm3624_offset(PVK, "123456", DEC, VD)
    verify_ibm3624(PVK, "123456", offset, DEC, VD, check_length=6)
    verify_ibm3624(PVK, "123499", offset, DEC, VD, check_length=4)  # only 4 digits checked
    with pytest.raises(CryptoError) as exc:
        verify_ibm3624(PVK, "123499", offset, DEC, VD, check_length=6)
    assert exc.value.code == "01"
    with pytest.raises(CryptoError) as exc:
        verify_ibm3624(PVK, "1234", "7710", DEC, VD, check_length=5)
    assert exc.value.code == "24"
    with pytest.raises(CryptoError) as exc:
        verify_ibm3624(PVK, "12345", "7710", DEC, VD, check_length=5)
    assert exc.value.code == "15"


def test_ibm3624_errors() -> None:
    with pytest.raises(CryptoError) as exc:
        ibm3624_natural_pin(PVK, "123456789012345A", VD, 4)
    assert exc.value.code == "25"
    with pytest.raises(CryptoError) as exc:
        ibm3624_natural_pin(PVK, DEC, VD + "1", 4)
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        ibm3624_natural_pin(PVK[:7], DEC, VD, 4)
    assert exc.value.code == "27"
    with pytest.raises(CryptoError) as exc:
        ibm3624_natural_pin(PVK, DEC, VD, 3)
    assert exc.value.code == "24"
    with pytest.raises(CryptoError) as exc:
        ibm3624_pin_from_offset(PVK, "12F4", DEC, VD)
    assert exc.value.code == "15"


def test_thales_validation_data() -> None:
    assert thales_validation_data("11223N", "112233445566") == "1122345566"
    assert thales_validation_data("1234567890AN", "112233445566") == "1234567890A45566"
    assert thales_validation_data("1234567890AB", "112233445566") == "1234567890AB"
    # Hex validation data is accepted (psec would refuse it).
    assert len(ibm3624_natural_pin(PVK, DEC, "ABCDEF1234567890", 4)) == 4
    with pytest.raises(CryptoError) as exc:
        thales_validation_data("1234567890ANN", "112233445566")
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        thales_validation_data("12345678901N", "1122334455")
    assert exc.value.code == "22"
