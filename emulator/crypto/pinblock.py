"""ISO 9564 PIN blocks by Thales PIN block format code.

| code | format | clear block |
|---|---|---|
| ``01`` | ISO 9564-1 format 0 (ANSI X9.8) | ``0 L P..P F..F`` XOR ``0000`` + account 12 |
| ``03`` | Diebold / IBM 3624 | ``P..P F..F`` (16 hex), no account |
| ``05`` | ISO 9564-1 format 1 | ``1 L P..P R..R`` (R random 0-F), no account |
| ``47`` | ISO 9564-1 format 3 | ``3 L P..P R..R`` (R random A-F) XOR ``0000`` + account 12 |
| ``48`` | ISO 9564-1 format 4 (AES) | see :func:`encipher_iso4` |

``account`` is always the Thales 12-digit account number: the 12 rightmost
PAN digits excluding the check digit (:func:`account_from_pan`). Clear 8-byte
blocks are returned as bytes; encrypting them under a TPK/ZPK is the
caller's TDES-ECB. Format 4 is only defined enciphered, so
:func:`encipher_iso4` / :func:`decipher_iso4` take the AES key and the full
PAN.

Errors: ``23`` unsupported format code, ``24`` PIN length outside 4..12,
``20`` malformed block (control field, fill or non-decimal PIN digit),
``22`` account number not 12 digits / PAN not 1..19 digits, ``15`` other
bad input. Messages never contain the PIN, the block or the PAN.
"""

from __future__ import annotations

import secrets

from emulator.crypto.cipher import aes_ecb_decrypt, aes_ecb_encrypt, xor
from emulator.crypto.errors import CryptoError

__all__ = [
    "SUPPORTED_FORMATS",
    "account_from_pan",
    "decipher_iso4",
    "decode_pin_block",
    "encipher_iso4",
    "encode_iso4_pan_field",
    "encode_iso4_pin_field",
    "encode_pin_block",
]

#: Thales format codes handled by :func:`encode_pin_block` / :func:`decode_pin_block`.
SUPPORTED_FORMATS = ("01", "03", "05", "47")

_HEX_DIGITS = "0123456789ABCDEF"
_MIN_PIN, _MAX_PIN = 4, 12


def account_from_pan(pan: str) -> str:
    """Return the 12 rightmost PAN digits excluding the check digit.

    Shorter PANs are left-padded with zeros (error ``22`` for a PAN that is
    not 2..19 decimal digits).
    """
    if not (2 <= len(pan) <= 19 and pan.isdecimal()):
        raise CryptoError("22", "PAN must be 2-19 decimal digits")
    return pan[:-1][-12:].rjust(12, "0")


def _check_pin(pin: str) -> None:
    if not pin.isdecimal() or not pin.isascii():
        raise CryptoError("20", "PIN must be decimal digits")
    if not _MIN_PIN <= len(pin) <= _MAX_PIN:
        raise CryptoError("24", "PIN length must be 4-12")


def _check_account(account: str) -> None:
    if len(account) != 12 or not account.isdecimal() or not account.isascii():
        raise CryptoError("22", "account number must be 12 decimal digits")


def _account_field(account: str) -> bytes:
    _check_account(account)
    return bytes.fromhex("0000" + account)


def _random_fill(count: int, alphabet: str) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(count))


def _fill(count: int, fill: str | None, alphabet: str) -> str:
    if fill is None:
        return _random_fill(count, alphabet)
    fill = fill.upper()
    if len(fill) != count or any(c not in alphabet for c in fill):
        raise CryptoError("15", "fill has the wrong length or characters")
    return fill


def encode_pin_block(fmt: str, pin: str, account: str = "", *, fill: str | None = None) -> bytes:
    """Return the 8-byte clear PIN block of Thales format ``fmt``.

    ``account`` (12 digits) is used by formats 01 and 47 only. ``fill``
    fixes the random fill of formats 05 (hex 0-F) and 47 (A-F) for tests;
    by default it comes from :mod:`secrets`.
    """
    _check_pin(pin)
    pad = 14 - len(pin)
    if fmt == "01":
        block = bytes.fromhex(f"0{len(pin):X}{pin}" + "F" * pad)
        return xor(block, _account_field(account))
    if fmt == "03":
        return bytes.fromhex(pin + "F" * (16 - len(pin)))
    if fmt == "05":
        return bytes.fromhex(f"1{len(pin):X}{pin}" + _fill(pad, fill, _HEX_DIGITS))
    if fmt == "47":
        block = bytes.fromhex(f"3{len(pin):X}{pin}" + _fill(pad, fill, "ABCDEF"))
        return xor(block, _account_field(account))
    raise CryptoError("23", "unsupported PIN block format code")


def _decode_control_block(text: str, control: str, fill_alphabet: str) -> str:
    if text[0] != control:
        raise CryptoError("20", "PIN block control field is wrong")
    length = int(text[1], 16)
    if not _MIN_PIN <= length <= _MAX_PIN:
        raise CryptoError("24", "PIN length must be 4-12")
    pin = text[2 : 2 + length]
    if not pin.isdecimal():
        raise CryptoError("20", "PIN block holds a non-decimal PIN digit")
    if any(c not in fill_alphabet for c in text[2 + length :]):
        raise CryptoError("20", "PIN block fill is wrong")
    return pin


def decode_pin_block(fmt: str, block: bytes, account: str = "") -> str:
    """Decode and validate the 8-byte clear PIN block of Thales format ``fmt``.

    ``account`` (12 digits) is needed for formats 01 and 47.
    """
    if fmt not in SUPPORTED_FORMATS:
        raise CryptoError("23", "unsupported PIN block format code")
    if len(block) != 8:
        raise CryptoError("20", "PIN block must be 8 bytes")
    if fmt in ("01", "47"):
        block = xor(block, _account_field(account))
    text = block.hex().upper()
    if fmt == "01":
        return _decode_control_block(text, "0", "F")
    if fmt == "05":
        return _decode_control_block(text, "1", _HEX_DIGITS)
    if fmt == "47":
        return _decode_control_block(text, "3", "ABCDEF")
    # 03: Diebold / IBM: PIN digits, then F to the end.
    length = text.find("F")
    if length == -1:
        length = 16
    if not _MIN_PIN <= length <= _MAX_PIN:
        raise CryptoError("24", "PIN length must be 4-12")
    pin = text[:length]
    if not pin.isdecimal() or text[length:] != "F" * (16 - length):
        raise CryptoError("20", "Diebold PIN block is malformed")
    return pin


# --- ISO 9564-1 format 4 (AES) -------------------------------------------------


def encode_iso4_pin_field(pin: str, *, fill: bytes | None = None) -> bytes:
    """Return the 16-byte ISO-4 plaintext PIN field ``4 L P..P A..A`` + 8 random bytes.

    ``fill`` fixes the 8 random bytes (tests); by default :mod:`secrets`.
    """
    _check_pin(pin)
    if fill is None:
        fill = secrets.token_bytes(8)
    if len(fill) != 8:
        raise CryptoError("15", "ISO-4 fill must be 8 bytes")
    return bytes.fromhex(f"4{len(pin):X}{pin}" + "A" * (14 - len(pin))) + fill


def encode_iso4_pan_field(pan: str) -> bytes:
    """Return the 16-byte ISO-4 PAN field ``M + PAN (left-aligned, 12+ digits) + 0..0``.

    ``M`` is the PAN length minus 12 (0 for PANs shorter than 12, which are
    left-padded with zeros to 12 digits).
    """
    if not (1 <= len(pan) <= 19 and pan.isdecimal() and pan.isascii()):
        raise CryptoError("22", "PAN must be 1-19 decimal digits")
    digits = pan.rjust(12, "0")
    return bytes.fromhex(f"{len(digits) - 12:X}{digits}".ljust(32, "0"))


def encipher_iso4(key: bytes, pin: str, pan: str, *, fill: bytes | None = None) -> bytes:
    """Return the ISO-4 enciphered PIN block ``AES(AES(PIN field) XOR PAN field)``."""
    pan_field = encode_iso4_pan_field(pan)
    pin_field = encode_iso4_pin_field(pin, fill=fill)
    return aes_ecb_encrypt(key, xor(aes_ecb_encrypt(key, pin_field), pan_field))


def decipher_iso4(key: bytes, block: bytes, pan: str) -> str:
    """Decipher and validate an ISO-4 PIN block; return the PIN."""
    if len(block) != 16:
        raise CryptoError("20", "ISO-4 PIN block must be 16 bytes")
    pan_field = encode_iso4_pan_field(pan)
    pin_field = aes_ecb_decrypt(key, xor(aes_ecb_decrypt(key, block), pan_field))
    return _decode_control_block(pin_field[:8].hex().upper(), "4", "A")
