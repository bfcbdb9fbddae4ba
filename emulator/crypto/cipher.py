"""Block-cipher primitives shared by the other modules.

DES and TDES go through ``cryptography.hazmat.decrepit`` with keys always
expanded to 24 bytes (K1K2K1 for double length, KKK for single DES), the only
form ``cryptography`` keeps supporting. A key of 8 bytes is single DES, 16
bytes two-key TDES, 24 bytes three-key TDES.

:func:`legacy_tdes` quiets the deprecation warnings that psec and pyemv
trigger by handing 8- or 16-byte keys to ``cryptography``; wrap calls into
those libraries with it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.utils import CryptographyDeprecationWarning

from emulator.crypto.errors import CryptoError

__all__ = [
    "aes_cbc_decrypt",
    "aes_cbc_encrypt",
    "aes_ecb_decrypt",
    "aes_ecb_encrypt",
    "expand_des_key",
    "legacy_tdes",
    "tdes_cbc_decrypt",
    "tdes_cbc_encrypt",
    "tdes_ecb_decrypt",
    "tdes_ecb_encrypt",
    "xor",
]

_DES_KEY_LENGTHS = (8, 16, 24)
_AES_KEY_LENGTHS = (16, 24, 32)


def xor(a: bytes, b: bytes) -> bytes:
    """XOR two byte strings of equal length."""
    if len(a) != len(b):
        raise CryptoError("15", "XOR operands differ in length")
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def expand_des_key(key: bytes) -> bytes:
    """Return the 24-byte TDES form of an 8-, 16- or 24-byte DES key."""
    if len(key) == 8:
        return key * 3
    if len(key) == 16:
        return key + key[:8]
    if len(key) == 24:
        return key
    raise CryptoError("27", "DES key must be 8, 16 or 24 bytes")


def _check_blocks(data: bytes, size: int) -> None:
    if len(data) % size:
        raise CryptoError("15", f"data length is not a multiple of {size}")


def _crypt(
    algorithm: TripleDES | algorithms.AES,
    mode: modes.ECB | modes.CBC,
    data: bytes,
    *,
    encrypt: bool,
) -> bytes:
    _check_blocks(data, algorithm.block_size // 8)
    cipher = Cipher(algorithm, mode)
    context = cipher.encryptor() if encrypt else cipher.decryptor()
    return context.update(data) + context.finalize()


def _iv(iv: bytes, size: int) -> modes.CBC:
    if len(iv) != size:
        raise CryptoError("15", f"IV must be {size} bytes")
    return modes.CBC(iv)


def _aes(key: bytes) -> algorithms.AES:
    if len(key) not in _AES_KEY_LENGTHS:
        raise CryptoError("27", "AES key must be 16, 24 or 32 bytes")
    return algorithms.AES(key)


# ECB is what the payment standards specify for single blocks (key
# encryption under LMK, PIN blocks, KCVs), hence the S305 exemptions.


def tdes_ecb_encrypt(key: bytes, data: bytes) -> bytes:
    """DES/TDES-ECB encrypt ``data`` (a multiple of 8 bytes)."""
    return _crypt(TripleDES(expand_des_key(key)), modes.ECB(), data, encrypt=True)


def tdes_ecb_decrypt(key: bytes, data: bytes) -> bytes:
    """DES/TDES-ECB decrypt ``data`` (a multiple of 8 bytes)."""
    return _crypt(TripleDES(expand_des_key(key)), modes.ECB(), data, encrypt=False)


def tdes_cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """DES/TDES-CBC encrypt ``data`` (a multiple of 8 bytes) with an 8-byte IV."""
    return _crypt(TripleDES(expand_des_key(key)), _iv(iv, 8), data, encrypt=True)


def tdes_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """DES/TDES-CBC decrypt ``data`` (a multiple of 8 bytes) with an 8-byte IV."""
    return _crypt(TripleDES(expand_des_key(key)), _iv(iv, 8), data, encrypt=False)


def aes_ecb_encrypt(key: bytes, data: bytes) -> bytes:
    """AES-ECB encrypt ``data`` (a multiple of 16 bytes)."""
    return _crypt(_aes(key), modes.ECB(), data, encrypt=True)


def aes_ecb_decrypt(key: bytes, data: bytes) -> bytes:
    """AES-ECB decrypt ``data`` (a multiple of 16 bytes)."""
    return _crypt(_aes(key), modes.ECB(), data, encrypt=False)


def aes_cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-CBC encrypt ``data`` (a multiple of 16 bytes) with a 16-byte IV."""
    return _crypt(_aes(key), _iv(iv, 16), data, encrypt=True)


def aes_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-CBC decrypt ``data`` (a multiple of 16 bytes) with a 16-byte IV."""
    return _crypt(_aes(key), _iv(iv, 16), data, encrypt=False)


@contextlib.contextmanager
def legacy_tdes() -> Iterator[None]:
    """Silence ``cryptography``'s TripleDES deprecation warnings for one call.

    psec and pyemv build TripleDES from the old import path with 8- and
    16-byte keys, which ``cryptography`` >= 47 warns about. Only those
    warnings are ignored, and only inside the ``with`` block.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TripleDES", category=CryptographyDeprecationWarning)
        yield
