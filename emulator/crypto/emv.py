"""EMV application cryptograms via pyemv.

- ICC master key: EMV Book 2 A1.4.1 option A (PAN ‖ PSN, rightmost 16
  digits; parity adjusted).
- Session key: EMV common session key derivation (A1.3) with a caller-given
  8-byte diversification value R; :func:`common_sk_diversification` builds
  the usual ``ATC ‖ 0000 ‖ UN``.
- ARQC/TC/AAC: ISO 9797-1 algorithm 3 under the session key, EMV padding
  (``80 00..``) by default or Visa padding (zeros).
- ARPC method 1: ``TDES(K, ARQC XOR (ARC ‖ 00..00))``; method 2: 4-byte MAC
  over ARQC ‖ CSU ‖ proprietary data. ``K`` is whatever key the card scheme
  prescribes: the published pyemv vectors (VECTORS.md section 11) use the
  ICC master key, others use the session key; the caller decides.

Errors: ``27`` key length, ``15`` bad input, ``01`` ARQC verification
failure.
"""

from __future__ import annotations

import hmac
from typing import Literal

from pyemv import ac, kd

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.errors import CryptoError

__all__ = [
    "common_sk_diversification",
    "derive_common_session_key",
    "derive_icc_mk",
    "generate_arpc_method1",
    "generate_arpc_method2",
    "generate_arqc",
    "verify_arqc",
]

_PADDING = {"emv": ac.PaddingType.EMV, "visa": ac.PaddingType.VISA}


def _check_double(key: bytes) -> None:
    if len(key) != 16:
        raise CryptoError("27", "EMV keys must be double length")


def derive_icc_mk(issuer_mk: bytes, pan: str, psn: str = "00") -> bytes:
    """Derive the ICC master key from the issuer master key (option A)."""
    _check_double(issuer_mk)
    if not (pan.isdecimal() and pan.isascii() and 1 <= len(pan) <= 19):
        raise CryptoError("15", "PAN must be 1-19 decimal digits")
    if len(psn) != 2 or not psn.isdecimal():
        raise CryptoError("15", "PAN sequence number must be 2 digits")
    with legacy_tdes():
        return bytes(kd.derive_icc_mk_a(issuer_mk, pan, psn))


def common_sk_diversification(atc: bytes, unpredictable_number: bytes) -> bytes:
    """Return R = ATC (2) ‖ 00 00 ‖ UN (4) for the common session key."""
    if len(atc) != 2 or len(unpredictable_number) != 4:
        raise CryptoError("15", "ATC must be 2 bytes and UN 4 bytes")
    return atc + b"\x00\x00" + unpredictable_number


def derive_common_session_key(icc_mk: bytes, r: bytes) -> bytes:
    """Derive the EMV common session key from the ICC master key and 8-byte ``r``."""
    _check_double(icc_mk)
    if len(r) != 8:
        raise CryptoError("15", "diversification value must be 8 bytes")
    with legacy_tdes():
        return bytes(kd.derive_common_sk(icc_mk, r))


def generate_arqc(session_key: bytes, data: bytes, *, padding: Literal["emv", "visa"] = "emv") -> bytes:
    """Return the 8-byte application cryptogram over ``data``."""
    _check_double(session_key)
    padding_type = _PADDING.get(padding)
    if padding_type is None:
        raise CryptoError("15", "padding must be emv or visa")
    with legacy_tdes():
        return bytes(ac.generate_ac(session_key, data, padding_type))


def verify_arqc(
    session_key: bytes, data: bytes, arqc: bytes, *, padding: Literal["emv", "visa"] = "emv"
) -> None:
    """Verify an 8-byte ARQC; raise ``01`` on mismatch."""
    if len(arqc) != 8:
        raise CryptoError("15", "ARQC must be 8 bytes")
    if not hmac.compare_digest(generate_arqc(session_key, data, padding=padding), arqc):
        raise CryptoError("01", "ARQC verification failed")


def generate_arpc_method1(key: bytes, arqc: bytes, arc: bytes) -> bytes:
    """Return the 8-byte ARPC (method 1) under ``key`` (ICC MK or session key)."""
    _check_double(key)
    if len(arqc) != 8 or len(arc) != 2:
        raise CryptoError("15", "ARQC must be 8 bytes and ARC 2 bytes")
    with legacy_tdes():
        return bytes(ac.generate_arpc_1(key, arqc, arc))


def generate_arpc_method2(key: bytes, arqc: bytes, csu: bytes, proprietary: bytes = b"") -> bytes:
    """Return the 4-byte ARPC (method 2) for the ARQC, 4-byte CSU and 0-8 bytes of data."""
    _check_double(key)
    if len(arqc) != 8 or len(csu) != 4 or len(proprietary) > 8:
        raise CryptoError("15", "ARQC 8, CSU 4, proprietary data 0-8 bytes")
    with legacy_tdes():
        return bytes(ac.generate_arpc_2(key, arqc, csu, proprietary))
