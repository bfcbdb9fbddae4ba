"""Card verification: Visa CVV, Visa PVV and IBM 3624 PIN offsets.

- CVV / CVV2 / iCVV (:func:`generate_cvv`) is psec's Visa CVV algorithm; CVV2
  uses service code ``000`` and iCVV ``999`` (the caller chooses).
- PVV (:func:`generate_pvv`) is psec's Visa PVV. It takes the Thales 12-digit
  account number; the transformed security parameter is its rightmost 11
  digits ‖ PVKI ‖ the 4 leftmost PIN digits.
- IBM 3624: ``natural PIN = decimalise(TDES(PVK, validation data))``, offset
  = PIN - natural PIN digit by digit modulo 10. The validation data is up to
  16 hex characters, right-padded with ``F``; :func:`thales_validation_data`
  turns the payShield 12-character field (``N`` = last 5 account digits)
  into it. This is the same computation as psec's ``generate_ibm3624_pin``
  (cross-checked in the tests), written out because psec rejects the
  hexadecimal validation data payShield allows.

Verification failures raise :class:`CryptoError` ``01``. Input errors: ``27``
key length, ``25`` decimalisation table, ``24`` PIN length, ``20``
non-decimal PIN, ``22`` account number, ``15`` other bad input.
"""

from __future__ import annotations

import hmac
import re

import psec

from emulator.crypto.cipher import expand_des_key, legacy_tdes, tdes_ecb_encrypt
from emulator.crypto.errors import CryptoError

__all__ = [
    "generate_cvv",
    "generate_pvv",
    "ibm3624_natural_pin",
    "ibm3624_offset",
    "ibm3624_pin_from_offset",
    "thales_validation_data",
    "verify_cvv",
    "verify_ibm3624",
    "verify_pvv",
]

_DIGITS = re.compile(r"[0-9]+")
_HEX = re.compile(r"[0-9A-Fa-f]*")


def _check_digits(value: str, code: str, what: str, lengths: range) -> None:
    if len(value) not in lengths or not _DIGITS.fullmatch(value):
        raise CryptoError(code, f"{what} has the wrong length or is not decimal")


def _check_key(key: bytes) -> None:
    if len(key) not in (8, 16, 24):
        raise CryptoError("27", "DES key must be 8, 16 or 24 bytes")


def _check_pin(pin: str) -> None:
    if not _DIGITS.fullmatch(pin):
        raise CryptoError("20", "PIN must be decimal digits")
    if not 4 <= len(pin) <= 12:
        raise CryptoError("24", "PIN length must be 4-12")


def _equal(a: str, b: str) -> None:
    if not hmac.compare_digest(a.encode(), b.encode()):
        raise CryptoError("01", "verification failed")


# --- CVV ---------------------------------------------------------------------


def generate_cvv(cvk: bytes, pan: str, expiry: str, service_code: str) -> str:
    """Return the 3-digit Visa CVV for a double-length CVK pair (A ‖ B)."""
    if len(cvk) != 16:
        raise CryptoError("27", "CVK must be a double-length key")
    _check_digits(pan, "15", "PAN", range(1, 20))
    _check_digits(expiry, "15", "expiry", range(4, 5))
    _check_digits(service_code, "15", "service code", range(3, 4))
    with legacy_tdes():
        return str(psec.cvv.generate_cvv(cvk, pan, expiry, service_code))


def verify_cvv(cvk: bytes, pan: str, expiry: str, service_code: str, cvv: str) -> None:
    """Verify a 3-digit CVV; raise ``01`` when it does not match."""
    _equal(generate_cvv(cvk, pan, expiry, service_code), cvv)


# --- Visa PVV ------------------------------------------------------------------


def generate_pvv(pvk: bytes, pin: str, account12: str, pvki: str) -> str:
    """Return the 4-digit Visa PVV for ``pin`` (its 4 leftmost digits are used)."""
    _check_key(pvk)
    _check_pin(pin)
    _check_digits(account12, "22", "account number", range(12, 13))
    _check_digits(pvki, "15", "PVKI", range(1, 2))
    # psec takes a full PAN and uses pan[-12:-1]; a dummy check digit after
    # the 12-digit account number selects the account's rightmost 11 digits.
    with legacy_tdes():
        return str(psec.pin.generate_visa_pvv(expand_des_key(pvk), pvki, pin[:4], account12 + "0"))


def verify_pvv(pvk: bytes, pin: str, account12: str, pvki: str, pvv: str) -> None:
    """Verify a Visa PVV; raise ``01`` when it does not match."""
    _equal(generate_pvv(pvk, pin, account12, pvki), pvv)


# --- IBM 3624 ------------------------------------------------------------------


def thales_validation_data(template: str, account12: str) -> str:
    """Expand payShield PIN validation data: the first ``N`` becomes the last 5 account digits.

    The result is padded with ``F`` to 16 characters by the IBM functions.
    """
    _check_digits(account12, "22", "account number", range(12, 13))
    data = template.upper().replace("N", account12[-5:], 1)
    if len(data) > 16 or not _HEX.fullmatch(data):
        raise CryptoError("15", "invalid PIN validation data")
    return data


def _intermediate(pvk: bytes, dec_table: str, validation_data: str) -> str:
    _check_key(pvk)
    if len(dec_table) != 16 or not _DIGITS.fullmatch(dec_table):
        raise CryptoError("25", "decimalisation table must be 16 decimal digits")
    if not 1 <= len(validation_data) <= 16 or not _HEX.fullmatch(validation_data):
        raise CryptoError("15", "validation data must be 1-16 hex characters")
    block = bytes.fromhex(validation_data.ljust(16, "F"))
    encrypted = tdes_ecb_encrypt(pvk, block).hex().upper()
    return encrypted.translate(str.maketrans("0123456789ABCDEF", dec_table))


def ibm3624_natural_pin(pvk: bytes, dec_table: str, validation_data: str, length: int) -> str:
    """Return the IBM 3624 natural PIN of ``length`` (4-16) digits."""
    if not 4 <= length <= 16:
        raise CryptoError("24", "PIN length must be 4-16")
    return _intermediate(pvk, dec_table, validation_data)[:length]


def ibm3624_offset(pvk: bytes, pin: str, dec_table: str, validation_data: str) -> str:
    """Return the IBM 3624 offset of ``pin`` (as many digits as the PIN)."""
    _check_pin(pin)
    natural = ibm3624_natural_pin(pvk, dec_table, validation_data, len(pin))
    return "".join(str((int(p) - int(n)) % 10) for p, n in zip(pin, natural, strict=True))


def ibm3624_pin_from_offset(pvk: bytes, offset: str, dec_table: str, validation_data: str) -> str:
    """Return the PIN given by ``offset`` (natural PIN + offset, modulo 10 per digit)."""
    if not _DIGITS.fullmatch(offset):
        raise CryptoError("15", "offset must be decimal digits")
    natural = ibm3624_natural_pin(pvk, dec_table, validation_data, len(offset))
    return "".join(str((int(n) + int(o)) % 10) for n, o in zip(natural, offset, strict=True))


def verify_ibm3624(
    pvk: bytes, pin: str, offset: str, dec_table: str, validation_data: str, *, check_length: int
) -> None:
    """Verify the leftmost ``check_length`` PIN digits against natural PIN + offset.

    Raises ``01`` on mismatch, ``24`` when the PIN is shorter than
    ``check_length`` or ``check_length`` is outside 4..12.
    """
    _check_pin(pin)
    if not 4 <= check_length <= 12 or len(pin) < check_length:
        raise CryptoError("24", "check length is outside 4-12 or longer than the PIN")
    if len(offset) < check_length:
        raise CryptoError("15", "offset is shorter than the check length")
    expected = ibm3624_pin_from_offset(pvk, offset[:check_length], dec_table, validation_data)
    _equal(expected, pin[:check_length])
