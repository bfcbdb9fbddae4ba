"""DUKPT host-side key derivation: TDES (ANSI X9.24-1:2009) and AES (X9.24-3:2017).

TDES DUKPT is pydukpt: the IPEK from BDK and KSN (10 bytes), the current
transaction key, and its variants (``pin``, ``mac_request``,
``mac_response``, ``data_request``, ``data_response``; the data variants go
through X9.24-1's one-way TDES step).

AES DUKPT is written here from X9.24-3. The KSN is 12 bytes: the initial key
ID (IKID = BDK ID 4 ‖ derivation ID 4) and a 32-bit transaction counter.
Each derivation is ``AES-ECB(derivation key, data)`` with the 16-byte
derivation data::

    01 | block counter | key usage (2) | algorithm (2) | length in bits (2) | 8 bytes

where the 8 bytes are the IKID for the initial key and ``IKID[4:8] ‖
counter`` otherwise. Algorithms: ``0000`` 2TDEA, ``0001`` 3TDEA, ``0002``
AES-128, ``0003`` AES-192, ``0004`` AES-256. Key usages: ``8001`` initial
key, ``8000`` intermediate derivation key, ``1000`` PIN encryption,
``2000``/``2001``/``2002`` MAC generate/verify/both, ``3000``/``3001``/
``3002`` data encrypt/decrypt/both. Keys longer than one AES block take
block counters 1, 2, ... The transaction key for a counter is reached from
the initial key by setting the counter's 1 bits one by one from the most
significant down, deriving an intermediate key (usage ``8000``) at each step.

Errors: ``27`` key length, ``15`` bad KSN, key usage or key type.
"""

from __future__ import annotations

from typing import Literal

import pydukpt

from emulator.crypto.cipher import aes_ecb_encrypt
from emulator.crypto.errors import CryptoError

__all__ = [
    "AES_KEY_TYPES",
    "AES_KEY_USAGES",
    "AesKeyType",
    "TdesVariant",
    "aes_initial_key",
    "aes_transaction_key",
    "aes_working_key",
    "tdes_ipek",
    "tdes_transaction_key",
    "tdes_working_key",
]

TdesVariant = Literal["pin", "mac_request", "mac_response", "data_request", "data_response"]
AesKeyType = Literal["2TDEA", "3TDEA", "AES-128", "AES-192", "AES-256"]

#: AES DUKPT key type -> (algorithm indicator, key length in bytes).
AES_KEY_TYPES: dict[str, tuple[int, int]] = {
    "2TDEA": (0x0000, 16),
    "3TDEA": (0x0001, 24),
    "AES-128": (0x0002, 16),
    "AES-192": (0x0003, 24),
    "AES-256": (0x0004, 32),
}

#: Working-key usage names -> X9.24-3 key usage indicator.
AES_KEY_USAGES: dict[str, int] = {
    "pin": 0x1000,
    "mac_generate": 0x2000,
    "mac_verify": 0x2001,
    "mac_both": 0x2002,
    "data_encrypt": 0x3000,
    "data_decrypt": 0x3001,
    "data_both": 0x3002,
}

_USAGE_INITIAL = 0x8001
_USAGE_DERIVATION = 0x8000
_BDK_TYPES = {16: "AES-128", 24: "AES-192", 32: "AES-256"}

_TDES_VARIANTS = {
    "pin": pydukpt.pin_key,
    "mac_request": pydukpt.mac_request_key,
    "mac_response": pydukpt.mac_response_key,
    "data_request": pydukpt.data_request_key,
    "data_response": pydukpt.data_response_key,
}


# --- TDES DUKPT ------------------------------------------------------------------


def _check_tdes(bdk: bytes, ksn: bytes) -> None:
    if len(bdk) != 16:
        raise CryptoError("27", "TDES DUKPT BDK must be 16 bytes")
    if len(ksn) != 10:
        raise CryptoError("15", "TDES DUKPT KSN must be 10 bytes")


def tdes_ipek(bdk: bytes, ksn: bytes) -> bytes:
    """Return the IPEK (initial key) of the device with ``ksn`` (counter ignored)."""
    _check_tdes(bdk, ksn)
    return bytes(pydukpt.derive_ipek(bdk, ksn))


def tdes_transaction_key(bdk: bytes, ksn: bytes) -> bytes:
    """Return the current transaction key for ``ksn``."""
    return bytes(pydukpt.derive_key(tdes_ipek(bdk, ksn), ksn))


def tdes_working_key(bdk: bytes, ksn: bytes, variant: TdesVariant) -> bytes:
    """Return the PIN, MAC or data key variant of the transaction key for ``ksn``."""
    derive = _TDES_VARIANTS.get(variant)
    if derive is None:
        raise CryptoError("15", "unknown TDES DUKPT key variant")
    return bytes(derive(tdes_transaction_key(bdk, ksn)))


# --- AES DUKPT -------------------------------------------------------------------


def _derive(key: bytes, usage: int, key_type: str, tail: bytes) -> bytes:
    algorithm, length = AES_KEY_TYPES[key_type]
    out = b""
    for block_counter in range(1, (length + 15) // 16 + 1):
        data = (
            bytes([0x01, block_counter])
            + usage.to_bytes(2, "big")
            + algorithm.to_bytes(2, "big")
            + (8 * length).to_bytes(2, "big")
            + tail
        )
        out += aes_ecb_encrypt(key, data)
    return out[:length]


def _bdk_type(bdk: bytes) -> str:
    key_type = _BDK_TYPES.get(len(bdk))
    if key_type is None:
        raise CryptoError("27", "AES DUKPT BDK must be 16, 24 or 32 bytes")
    return key_type


def _check_ksn(ksn: bytes) -> None:
    if len(ksn) != 12:
        raise CryptoError("15", "AES DUKPT KSN must be 12 bytes")


def aes_initial_key(bdk: bytes, ikid: bytes) -> bytes:
    """Return the initial key for the 8-byte initial key ID (same type as the BDK)."""
    if len(ikid) != 8:
        raise CryptoError("15", "AES DUKPT initial key ID must be 8 bytes")
    return _derive(bdk, _USAGE_INITIAL, _bdk_type(bdk), ikid)


def aes_transaction_key(bdk: bytes, ksn: bytes) -> bytes:
    """Return the transaction (derivation) key for the 12-byte ``ksn``."""
    _check_ksn(ksn)
    key_type = _bdk_type(bdk)
    key = aes_initial_key(bdk, ksn[:8])
    counter = int.from_bytes(ksn[8:], "big")
    working = 0
    for bit in range(31, -1, -1):
        mask = 1 << bit
        if counter & mask:
            working |= mask
            key = _derive(key, _USAGE_DERIVATION, key_type, ksn[4:8] + working.to_bytes(4, "big"))
    return key


def aes_working_key(bdk: bytes, ksn: bytes, usage: str, key_type: AesKeyType | None = None) -> bytes:
    """Return the working key for ``usage`` (a name in :data:`AES_KEY_USAGES`).

    ``key_type`` defaults to the BDK's own type (AES-128 for a 16-byte BDK).
    """
    usage_code = AES_KEY_USAGES.get(usage)
    if usage_code is None:
        raise CryptoError("15", "unknown AES DUKPT key usage")
    working_type = key_type or _bdk_type(bdk)
    if working_type not in AES_KEY_TYPES:
        raise CryptoError("15", "unknown AES DUKPT key type")
    key = aes_transaction_key(bdk, ksn)
    return _derive(key, usage_code, working_type, ksn[4:12])
