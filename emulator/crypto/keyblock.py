"""Thales key blocks (scheme ``S``) under a key-block LMK, and TR-31 (``R``) under a ZMK.

Thales key block layout (the leading ``S`` is not part of it)::

    header 16: version 1 | length 4 (decimal, whole block) | usage 2 |
               algorithm 1 | mode of use 1 | key version 2 | exportability 1 |
               optional blocks 2 (count) | LMK id 2
    optional blocks: id 2 | length 2 (hex, whole block) | data   (TR-31 style)
    encrypted key data (hex), then the MAC (hex)

Clear key data = key length in bits (2 bytes) ‖ key ‖ random pad to the
cipher block size (no key-length masking).

Version ``1`` (AES-256 key-block LMK), reproduced from third-party payShield
captures (VECTORS.md section 5):

- KBEK / KBAK derived from the LMK by the TR-31 version D CMAC KDF
  (``counter ‖ 0000 (enc) / 0001 (MAC) ‖ 00 ‖ 0004 ‖ 0100``, two CMAC
  calls each);
- key data encrypted with AES-CBC under KBEK, IV = the first 16 header
  characters (ASCII);
- MAC = AES-CMAC under KBAK over header (with optional blocks) ‖ encrypted
  key data, leftmost 8 bytes (16 hex).

Version ``0`` (triple-length TDES key-block LMK), reproduced from the
third-party capture: the TR-31 version A/C variant binding:

- KBEK = LMK XOR ``45..45``, KBAK = LMK XOR ``4D..4D``;
- key data encrypted with TDES-CBC under KBEK, IV = the first 8 header
  characters (ASCII);
- MAC = ISO 9797-1 algorithm 1 TDES CBC-MAC under KBAK over header ‖
  encrypted key data, leftmost 4 bytes (8 hex).

Errors: ``83`` key block format, ``A4`` MAC (authentication) failure,
``A1`` block version does not match the LMK, ``A5`` key length, ``A6``
usage, ``A7`` algorithm, ``A8`` mode of use, ``A9`` key version, ``AA``
exportability, ``AB`` optional block count, ``AC`` optional block error.

TR-31 (``R`` scheme) wrap/unwrap under a ZMK (versions A, B, C, D) is psec's
``tr31``; psec errors become ``83`` (format) or ``A4`` (MAC mismatch).
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass

import psec

from emulator.crypto.cipher import (
    aes_cbc_decrypt,
    aes_cbc_encrypt,
    legacy_tdes,
    tdes_cbc_decrypt,
    tdes_cbc_encrypt,
    xor,
)
from emulator.crypto.errors import CryptoError
from emulator.crypto.mac import aes_cmac, cbc_mac

__all__ = [
    "KeyBlockHeader",
    "KeyBlockLmk",
    "derive_keyblock_keys",
    "unwrap_key_block",
    "unwrap_tr31",
    "wrap_key_block",
    "wrap_tr31",
]

_ALGORITHMS = frozenset("ADTEHRS")
_MODES = frozenset("BCDEGNSTVXY")
_EXPORTABILITY = frozenset("ENS")
_ALNUM2 = re.compile(r"[0-9A-Z]{2}")
_HEX = re.compile(r"[0-9A-Fa-f]*")


@dataclass(frozen=True)
class KeyBlockLmk:
    """A key-block LMK: version ``1`` AES-256 (32 bytes) or ``0`` TDES (16/24 bytes)."""

    version: str
    key: bytes

    def __post_init__(self) -> None:
        """Check the key length fits the version."""
        if self.version == "1":
            if len(self.key) != 32:
                raise CryptoError("27", "AES key-block LMK must be 32 bytes")
        elif self.version == "0":
            if len(self.key) not in (16, 24):
                raise CryptoError("27", "TDES key-block LMK must be 16 or 24 bytes")
        else:
            raise CryptoError("15", "key-block LMK version must be 0 or 1")

    def check_value(self) -> bytes:
        """Return the LMK check value: AES-CMAC (v1) or TDES-ECB (v0) of zeros."""
        if self.version == "1":
            return aes_cmac(self.key, bytes(16))
        return cbc_mac(self.key, bytes(8))


@dataclass(frozen=True)
class KeyBlockHeader:
    """The fields of a Thales key block header (length is computed on wrap)."""

    version: str
    usage: str
    algorithm: str
    mode_of_use: str
    key_version: str = "00"
    exportability: str = "N"
    lmk_id: str = "00"
    optional_blocks: tuple[tuple[str, str], ...] = ()

    def validate(self) -> None:
        """Check each field; raise the payShield key block error for the first bad one."""
        if self.version not in ("0", "1"):
            raise CryptoError("83", "key block version must be 0 or 1")
        if not _ALNUM2.fullmatch(self.usage):
            raise CryptoError("A6", "invalid key usage")
        if self.algorithm not in _ALGORITHMS or len(self.algorithm) != 1:
            raise CryptoError("A7", "invalid algorithm")
        if self.mode_of_use not in _MODES or len(self.mode_of_use) != 1:
            raise CryptoError("A8", "invalid mode of use")
        if not _ALNUM2.fullmatch(self.key_version):
            raise CryptoError("A9", "invalid key version number")
        if self.exportability not in _EXPORTABILITY or len(self.exportability) != 1:
            raise CryptoError("AA", "invalid exportability")
        if not re.fullmatch(r"\d\d", self.lmk_id):
            raise CryptoError("83", "invalid LMK identifier in header")
        if len(self.optional_blocks) > 99:
            raise CryptoError("AB", "too many optional blocks")
        for block_id, data in self.optional_blocks:
            if not _ALNUM2.fullmatch(block_id) or len(data) + 4 > 255 or not data.isascii():
                raise CryptoError("AC", "invalid optional block")

    def encode(self, total_length: int) -> str:
        """Return the header text (with optional blocks) for a block of ``total_length``."""
        blocks = "".join(f"{i}{len(d) + 4:02X}{d}" for i, d in self.optional_blocks)
        return (
            f"{self.version}{total_length:04d}{self.usage}{self.algorithm}"
            f"{self.mode_of_use}{self.key_version}{self.exportability}"
            f"{len(self.optional_blocks):02d}{self.lmk_id}{blocks}"
        )


def _parse_header(block: str) -> tuple[KeyBlockHeader, int]:
    if len(block) < 16 or not block[:16].isascii() or not block[:16].isalnum():
        raise CryptoError("83", "key block header is malformed")
    if not block[12:14].isdecimal():
        raise CryptoError("AB", "invalid number of optional blocks")
    pos = 16
    optional: list[tuple[str, str]] = []
    for _ in range(int(block[12:14])):
        block_id, length_hex = block[pos : pos + 2], block[pos + 2 : pos + 4]
        if len(length_hex) != 2 or not _HEX.fullmatch(length_hex) or int(length_hex, 16) < 4:
            raise CryptoError("AC", "optional block is malformed")
        end = pos + int(length_hex, 16)
        if end > len(block):
            raise CryptoError("AC", "optional block is truncated")
        optional.append((block_id, block[pos + 4 : end]))
        pos = end
    header = KeyBlockHeader(
        version=block[0],
        usage=block[5:7],
        algorithm=block[7],
        mode_of_use=block[8],
        key_version=block[9:11],
        exportability=block[11],
        lmk_id=block[14:16],
        optional_blocks=tuple(optional),
    )
    header.validate()
    return header, pos


def derive_keyblock_keys(lmk: KeyBlockLmk) -> tuple[bytes, bytes]:
    """Return (KBEK, KBAK) for ``lmk``: TR-31 D CMAC KDF (v1) or the 45/4D variants (v0)."""
    if lmk.version == "0":
        return xor(lmk.key, b"\x45" * len(lmk.key)), xor(lmk.key, b"\x4d" * len(lmk.key))
    kbek = kbak = b""
    for counter in (1, 2):
        # counter | usage (0000 enc, 0001 MAC) | 00 | algorithm 0004 AES-256 | 0100 bits
        kbek += aes_cmac(lmk.key, bytes([counter, 0, 0, 0, 0, 4, 1, 0]))
        kbak += aes_cmac(lmk.key, bytes([counter, 0, 1, 0, 0, 4, 1, 0]))
    return kbek, kbak


def _mac(lmk: KeyBlockLmk, kbak: bytes, authenticated: bytes) -> bytes:
    if lmk.version == "1":
        return aes_cmac(kbak, authenticated)[:8]
    return cbc_mac(kbak, authenticated)[:4]


def wrap_key_block(lmk: KeyBlockLmk, header: KeyBlockHeader, key: bytes, *, pad: bytes | None = None) -> str:
    """Wrap ``key`` into a Thales key block (without the leading ``S``).

    ``pad`` fixes the random padding (tests); it must have the exact length
    needed to reach the cipher block size.
    """
    header.validate()
    if header.version != lmk.version:
        raise CryptoError("A1", "key block version does not match the LMK")
    if not 1 <= len(key) <= 64:
        raise CryptoError("A5", "invalid key length")
    block_size = 16 if lmk.version == "1" else 8
    mac_hex = 16 if lmk.version == "1" else 8
    pad_len = -(2 + len(key)) % block_size
    if pad is None:
        pad = secrets.token_bytes(pad_len)
    if len(pad) != pad_len:
        raise CryptoError("15", "pad has the wrong length")
    clear = (8 * len(key)).to_bytes(2, "big") + key + pad
    header_len = len(header.encode(0))
    text = header.encode(header_len + 2 * len(clear) + mac_hex)
    kbek, kbak = derive_keyblock_keys(lmk)
    iv = text[:block_size].encode("ascii")
    encrypt = aes_cbc_encrypt if lmk.version == "1" else tdes_cbc_encrypt
    encrypted = encrypt(kbek, iv, clear)
    mac = _mac(lmk, kbak, text.encode("ascii") + encrypted)
    return text + encrypted.hex().upper() + mac.hex().upper()


def unwrap_key_block(lmk: KeyBlockLmk, block: str) -> tuple[KeyBlockHeader, bytes]:
    """Verify and decrypt a Thales key block (a leading ``S`` is accepted)."""
    if block.startswith("S"):
        block = block[1:]
    header, pos = _parse_header(block)
    if header.version != lmk.version:
        raise CryptoError("A1", "key block version does not match the LMK")
    if not block[1:5].isdecimal() or int(block[1:5]) != len(block):
        raise CryptoError("83", "key block length field does not match")
    block_size = 16 if lmk.version == "1" else 8
    mac_hex = 16 if lmk.version == "1" else 8
    body = block[pos:]
    if not _HEX.fullmatch(body) or len(body) < mac_hex + 2 * block_size:
        raise CryptoError("83", "key block data is malformed")
    encrypted, mac = bytes.fromhex(body[:-mac_hex]), bytes.fromhex(body[-mac_hex:])
    if len(encrypted) % block_size:
        raise CryptoError("83", "key block data is not a whole number of blocks")
    kbek, kbak = derive_keyblock_keys(lmk)
    if not hmac.compare_digest(_mac(lmk, kbak, block[:pos].encode("ascii") + encrypted), mac):
        raise CryptoError("A4", "key block authentication failure")
    iv = block[:block_size].encode("ascii")
    decrypt = aes_cbc_decrypt if lmk.version == "1" else tdes_cbc_decrypt
    clear = decrypt(kbek, iv, encrypted)
    bits = int.from_bytes(clear[:2], "big")
    if bits % 8 or not 8 <= bits <= 8 * (len(clear) - 2):
        raise CryptoError("83", "key length in key block is invalid")
    return header, clear[2 : 2 + bits // 8]


# --- TR-31 ('R' scheme) under a ZMK ----------------------------------------------


def _tr31_error(exc: ValueError) -> CryptoError:
    if "doesn't match generated MAC" in str(exc):
        return CryptoError("A4", "TR-31 key block authentication failure")
    return CryptoError("83", "TR-31 key block format error")


def wrap_tr31(kbpk: bytes, header: str, key: bytes, *, masked_key_len: int | None = None) -> str:
    """Wrap ``key`` into a TR-31 block (version A, B, C or D from ``header``) via psec.

    ``header`` is the 16-character TR-31 header (its length field is
    recomputed); psec masks the key length to the algorithm maximum unless
    ``masked_key_len`` says otherwise.
    """
    try:
        with legacy_tdes():
            return str(psec.tr31.wrap(kbpk, header, key, masked_key_len))
    except ValueError as exc:
        raise _tr31_error(exc) from None


def unwrap_tr31(kbpk: bytes, block: str) -> tuple[str, bytes]:
    """Verify and decrypt a TR-31 block via psec; return (header text, key).

    The header text is the 16-character fixed header plus optional blocks.
    """
    if block.startswith("R"):
        block = block[1:]
    try:
        with legacy_tdes():
            header, key = psec.tr31.unwrap(kbpk, block)
    except ValueError as exc:
        raise _tr31_error(exc) from None
    return block[: len(str(header))], bytes(key)
