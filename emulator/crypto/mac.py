"""MAC algorithms: ISO 9797-1 algorithms 1 and 3, AES-CMAC and TDES-CMAC.

- :func:`cbc_mac` — ISO/IEC 9797-1 MAC algorithm 1 (CBC-MAC) with single DES
  (8-byte key, X9.9) or TDES (16/24-byte key), via psec.
- :func:`retail_mac` — ISO/IEC 9797-1 MAC algorithm 3 / ANSI X9.19 retail
  MAC with a double-length key, via psec.
- :func:`aes_cmac` / :func:`tdes_cmac` — NIST SP 800-38B CMAC via
  ``cryptography``.

Padding methods (:func:`pad`): 1 = zeros to the block size (empty data gives
one zero block), 2 = ``80`` then zeros, 3 = length block then zeros. MACs are
returned full length (8 or 16 bytes); callers truncate. An optional IV is
XORed into the first padded block, as payShield's chained MAC commands do.
"""

from __future__ import annotations

import hmac

import psec
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC

from emulator.crypto.cipher import expand_des_key, legacy_tdes, xor
from emulator.crypto.errors import CryptoError

__all__ = ["aes_cmac", "cbc_mac", "check_mac", "pad", "retail_mac", "tdes_cmac"]


def pad(data: bytes, method: int, block_size: int = 8) -> bytes:
    """Pad ``data`` with ISO/IEC 9797-1 padding ``method`` 1, 2 or 3."""
    if method == 1:
        return bytes(psec.mac.pad_iso_1(data, block_size))
    if method == 2:
        return bytes(psec.mac.pad_iso_2(data, block_size))
    if method == 3:
        return bytes(psec.mac.pad_iso_3(data, block_size))
    raise CryptoError("15", "padding method must be 1, 2 or 3")


def _padded_with_iv(data: bytes, padding: int, iv: bytes | None) -> bytes:
    padded = pad(data, padding, 8)
    if iv is None:
        return padded
    if len(iv) != 8:
        raise CryptoError("15", "MAC IV must be 8 bytes")
    return xor(padded[:8], iv) + padded[8:]


def cbc_mac(key: bytes, data: bytes, *, padding: int = 1, iv: bytes | None = None) -> bytes:
    """ISO/IEC 9797-1 algorithm 1 (CBC-MAC): DES for 8-byte keys, else TDES (8 bytes)."""
    blocks = _padded_with_iv(data, padding, iv)
    # Already padded and non-empty: psec's method 1 adds nothing more.
    with legacy_tdes():
        return bytes(psec.mac.generate_cbc_mac(expand_des_key(key), blocks, 1, 8))


def retail_mac(key: bytes, data: bytes, *, padding: int = 1, iv: bytes | None = None) -> bytes:
    """ISO/IEC 9797-1 algorithm 3 / X9.19 retail MAC under a 16-byte key (8 bytes).

    Single DES CBC under the left half, then decrypt with the right half and
    encrypt with the left half on the final block.
    """
    if len(key) != 16:
        raise CryptoError("27", "retail MAC needs a double-length key")
    blocks = _padded_with_iv(data, padding, iv)
    left, right = expand_des_key(key[:8]), expand_des_key(key[8:])
    with legacy_tdes():
        return bytes(psec.mac.generate_retail_mac(left, right, blocks, 1, 8))


def aes_cmac(key: bytes, data: bytes) -> bytes:
    """AES-CMAC (NIST SP 800-38B) of ``data`` (16 bytes)."""
    if len(key) not in (16, 24, 32):
        raise CryptoError("27", "AES key must be 16, 24 or 32 bytes")
    mac = CMAC(algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


def tdes_cmac(key: bytes, data: bytes) -> bytes:
    """TDES-CMAC (NIST SP 800-38B) of ``data`` under a 16/24-byte key (8 bytes)."""
    if len(key) not in (16, 24):
        raise CryptoError("27", "TDES CMAC needs a double or triple length key")
    mac = CMAC(TripleDES(expand_des_key(key)))
    mac.update(data)
    return mac.finalize()


def check_mac(computed: bytes, received: bytes) -> None:
    """Compare a received (possibly truncated) MAC; raise ``01`` on mismatch."""
    if not received or not hmac.compare_digest(computed[: len(received)], received):
        raise CryptoError("01", "MAC verification failed")
