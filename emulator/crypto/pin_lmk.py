"""PIN under LMK: hsmproxy's own documented encoding.

payShield's encryption of a PIN under LMK pair 02-03 is proprietary and
unpublished, so hsmproxy defines its own (the emulator and the proxy use
exactly this; values are not interchangeable with a real payShield):

1. Clear block (16 hex) = ``0`` ‖ ``L`` ‖ PIN ‖ ``F`` padding, where ``L`` is
   the PIN length (4-12) as one hex digit, XOR ``0000`` ‖ the 12-digit
   account number (the 12 rightmost PAN digits excluding the check digit) —
   i.e. an ISO 9564-1 format 0 block.
2. Encrypt those 8 bytes with two-key TDES-ECB under LMK pair 02-03 as is
   (no key-type or scheme variant).
3. The PIN under LMK is the 16 uppercase hex characters of the result.

Decoding reverses the steps and validates the block: a value that is not 16
hex characters, a wrong control nibble, non-decimal PIN digits or wrong
padding raise :class:`CryptoError` code ``14`` (PIN under LMK invalid); a PIN
length outside 4..12 raises ``24``; an account that is not 12 digits ``22``.
"""

from __future__ import annotations

import re

from emulator.crypto.cipher import tdes_ecb_decrypt, tdes_ecb_encrypt
from emulator.crypto.errors import CryptoError
from emulator.crypto.lmk import VariantLmk
from emulator.crypto.pinblock import decode_pin_block, encode_pin_block

__all__ = ["PIN_LMK_PAIR", "decrypt_pin_under_lmk", "encrypt_pin_under_lmk"]

#: LMK pair protecting PINs.
PIN_LMK_PAIR = "02"

_HEX16 = re.compile(r"[0-9A-Fa-f]{16}")


def encrypt_pin_under_lmk(lmk: VariantLmk, pin: str, account12: str) -> str:
    """Return ``pin`` encrypted under ``lmk`` for ``account12`` (16 hex)."""
    block = encode_pin_block("01", pin, account12)
    return tdes_ecb_encrypt(lmk.pair(PIN_LMK_PAIR), block).hex().upper()


def decrypt_pin_under_lmk(lmk: VariantLmk, value: str, account12: str) -> str:
    """Return the clear PIN of the PIN-under-LMK ``value`` for ``account12``."""
    if not _HEX16.fullmatch(value):
        raise CryptoError("14", "PIN under LMK must be 16 hex characters")
    block = tdes_ecb_decrypt(lmk.pair(PIN_LMK_PAIR), bytes.fromhex(value))
    try:
        return decode_pin_block("01", block, account12)
    except CryptoError as exc:
        if exc.code == "20":
            raise CryptoError("14", "PIN under LMK is invalid") from None
        raise
