"""Thales variant LMK: keys under LMK, key check values, parity, LMK files.

Variant LMK
-----------
A variant LMK is 20 double-length DES pairs, addressed by the even pair code
``"00"`` (pair 00-01) to ``"38"`` (pair 38-39). A key type code ``VPP`` names
the key-type variant ``V`` (0-9) and the pair code ``PP`` (see
:data:`KEY_TYPE_PAIRS`). To encrypt a key:

1. take the LMK pair (16 bytes);
2. XOR the key-type variant ``A6 5A 6A DE 2B 50 74 9C FA`` (for V = 1..9)
   into byte 0;
3. for each 8-byte half ``i`` of the clear key, XOR the scheme variant into
   byte 8 (first byte of the right half): scheme ``U`` uses A6, 5A; ``T``
   uses 6A, DE, 2B; ``X``, ``Y``, ``Z`` and no scheme use none;
4. encrypt that half with two-key TDES-ECB under the result.

A key under LMK is written ``scheme + hex`` (uppercase). Scheme ``""`` (no
prefix) and ``Z`` are single DES (16 hex), ``U``/``X`` double length (32 hex),
``T``/``Y`` triple length (48 hex). These functions write the tag they are
given (``Z`` + 16 hex is a valid input key field); a host command that
*returns* a single-length key leaves the ``Z`` off, as payShield does
(:func:`protocols.hostcmd.fields.output_key`).

LMK file format (:func:`load_lmk_file`)
---------------------------------------
A UTF-8 text file. Blank lines and lines starting with ``#`` are ignored.
Each LMK starts with a header line and is followed by its key lines::

    lmk id=00 scheme=variant
    pair 00-01 = 0101010101010101 7902CD1FD36EF8BA
    pair 02-03 = 2020202020202020 3131313131313131 ^ 0000000000000000 0000000000000000
    ...                                   (all 20 pairs, 00-01 .. 38-39)

    lmk id=01 scheme=keyblock version=1
    key = <64 hex> ^ <64 hex> ^ <64 hex>

``id`` is two decimal digits (the ``%LL`` LMK identifier). ``scheme`` is
``variant`` or ``keyblock``; a key-block LMK also names its ``version``
(``1`` = AES-256, ``0`` = triple-length TDES). A value is one or more
components separated by ``^``; the components are XORed together (LMK
components as typed in at the console). Spaces inside a component are
ignored. Errors raise :class:`CryptoError` code ``15`` (bad syntax) or ``13``
(bad or duplicate LMK identifier), naming the line number, never a key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psec
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC

from emulator.crypto.cipher import tdes_ecb_decrypt, tdes_ecb_encrypt, xor
from emulator.crypto.errors import CryptoError
from emulator.crypto.keyblock import KeyBlockLmk

__all__ = [
    "KEY_TYPE_PAIRS",
    "KEY_TYPE_VARIANTS",
    "SCHEME_KEY_LENGTH",
    "SCHEME_VARIANTS",
    "TEST_LMK",
    "VariantLmk",
    "adjust_parity",
    "decrypt_key_under_lmk",
    "decrypt_under_lmk_pair",
    "encrypt_key_under_lmk",
    "encrypt_under_lmk_pair",
    "has_odd_parity",
    "kcv_aes_cmac",
    "kcv_tdes",
    "lmk_variant",
    "load_lmk_file",
    "parse_key_type",
    "split_key_scheme",
]

#: Key-type variant byte XORed into LMK byte 0, indexed by V (0 = none).
KEY_TYPE_VARIANTS: tuple[int, ...] = (0x00, 0xA6, 0x5A, 0x6A, 0xDE, 0x2B, 0x50, 0x74, 0x9C, 0xFA)

#: Scheme variant bytes XORed into LMK byte 8, one per key half.
SCHEME_VARIANTS: dict[str, tuple[int, ...]] = {"U": (0xA6, 0x5A), "T": (0x6A, 0xDE, 0x2B)}

#: Clear key length in bytes by key scheme ("" = single DES, no prefix).
SCHEME_KEY_LENGTH: dict[str, int] = {"": 8, "Z": 8, "U": 16, "X": 16, "T": 24, "Y": 24}

#: Key type code PP (last two characters of ``VPP``) -> LMK pair code.
KEY_TYPE_PAIRS: dict[str, str] = {
    "00": "04",
    "01": "06",
    "02": "14",
    "03": "16",
    "04": "18",
    "06": "22",
    "07": "24",
    "08": "26",
    "09": "28",
    "0A": "30",
    "0B": "32",
    "0C": "34",
    "0D": "36",
}

_PAIR_CODES = tuple(f"{2 * i:02d}" for i in range(20))
_HEX = re.compile(r"[0-9A-Fa-f]*")


@dataclass(frozen=True)
class VariantLmk:
    """A variant LMK: 20 double-length DES pairs, pair 00-01 first."""

    pairs: tuple[bytes, ...]

    def __post_init__(self) -> None:
        """Check there are 20 pairs of 16 bytes."""
        if len(self.pairs) != 20 or any(len(p) != 16 for p in self.pairs):
            raise CryptoError("15", "a variant LMK needs 20 pairs of 16 bytes")

    def pair(self, code: str) -> bytes:
        """Return the LMK pair with the even pair code ``"00"`` .. ``"38"``."""
        try:
            return self.pairs[_PAIR_CODES.index(code)]
        except ValueError:
            raise CryptoError("15", "invalid LMK pair code") from None

    def check_value(self) -> bytes:
        """Return the LMK check value: TDES-ECB of zeros under pair 00-01 (8 bytes)."""
        return kcv_tdes(self.pairs[0])


def _variant_lmk_from_hex(values: list[str]) -> VariantLmk:
    return VariantLmk(tuple(bytes.fromhex(v) for v in values))


#: The public payShield test LMK (VECTORS.md section 5).
TEST_LMK = _variant_lmk_from_hex(
    [
        "01010101010101017902CD1FD36EF8BA",
        "20202020202020203131313131313131",
        "40404040404040405151515151515151",
        "61616161616161617070707070707070",
        "80808080808080809191919191919191",
        "A1A1A1A1A1A1A1A1B0B0B0B0B0B0B0B0",
        "C1C1010101010101D0D0010101010101",
        "E0E0010101010101F1F1010101010101",
        "1C587F1C13924FEF0101010101010101",
        "01010101010101010101010101010101",
        "02020202020202020404040404040404",
        "07070707070707071010101010101010",
        "13131313131313131515151515151515",
        "16161616161616161919191919191919",
        "1A1A1A1A1A1A1A1A1C1C1C1C1C1C1C1C",
        "23232323232323232525252525252525",
        "26262626262626262929292929292929",
        "2A2A2A2A2A2A2A2A2C2C2C2C2C2C2C2C",
        "2F2F2F2F2F2F2F2F3131313131313131",
        "01010101010101010101010101010101",
    ]
)


def kcv_tdes(key: bytes) -> bytes:
    """Return DES/TDES-ECB of 8 zero bytes under ``key`` (full 8 bytes).

    Callers take the leftmost 3 bytes (6 hex) or all 8 (16 hex).
    """
    return tdes_ecb_encrypt(key, bytes(8))


def kcv_aes_cmac(key: bytes) -> bytes:
    """Return AES-CMAC of 16 zero bytes under ``key`` (full 16 bytes).

    X9.24-1:2017 / X9.143 AES KCV; callers take the leftmost 3 or 5 bytes.
    """
    if len(key) not in (16, 24, 32):
        raise CryptoError("27", "AES key must be 16, 24 or 32 bytes")
    mac = CMAC(algorithms.AES(key))
    mac.update(bytes(16))
    return mac.finalize()


def has_odd_parity(key: bytes) -> bool:
    """Return True when every byte of ``key`` has odd parity."""
    return all(psec.tools.odd_parity(b) for b in key)


def adjust_parity(key: bytes) -> bytes:
    """Return ``key`` with the low bit of each byte set for odd parity."""
    return bytes(psec.des.adjust_key_parity(key))


#: The key types payShield defines (PROTOCOL.md key type table), by pair code: allowed variants.
KEY_TYPE_VARIANTS_BY_CODE: dict[str, frozenset[int]] = {
    "00": frozenset(range(5)), "01": frozenset({0}), "02": frozenset({0, 1, 2, 4, 6}),
    "03": frozenset({0, 1}), "04": frozenset({0}), "06": frozenset({0}), "07": frozenset(range(1, 10)),
    "08": frozenset({0}), "09": frozenset(range(9)), "0A": frozenset({0}), "0B": frozenset({0}),
    "0C": frozenset({0, 1}), "0D": frozenset({0}),
}  # fmt: skip


def parse_key_type(key_type: str) -> tuple[str, int]:
    """Split a 3-character key type code ``VPP`` into (LMK pair code, variant); ``04`` if undefined."""
    if len(key_type) != 3 or not key_type[0].isdigit():
        raise CryptoError("04", "invalid key type code")
    code = key_type[1:].upper()
    pair = KEY_TYPE_PAIRS.get(code)
    if pair is None or int(key_type[0]) not in KEY_TYPE_VARIANTS_BY_CODE.get(code, frozenset()):
        raise CryptoError("04", "invalid key type code")
    return pair, int(key_type[0])


def lmk_variant(pair: bytes, variant: int, scheme: str, half: int) -> bytes:
    """Return the LMK pair variant protecting key half ``half`` (0-based).

    Key-type ``variant`` (0-9) goes into byte 0, the scheme variant of
    ``half`` into byte 8.
    """
    if not 0 <= variant <= 9:
        raise CryptoError("04", "key type variant must be 0-9")
    key = bytearray(pair)
    key[0] ^= KEY_TYPE_VARIANTS[variant]
    scheme_variants = SCHEME_VARIANTS.get(scheme)
    if scheme_variants is not None:
        key[8] ^= scheme_variants[half]
    return bytes(key)


def _check_scheme(scheme: str) -> int:
    length = SCHEME_KEY_LENGTH.get(scheme)
    if length is None:
        raise CryptoError("26", "invalid key scheme")
    return length


def encrypt_under_lmk_pair(pair: bytes, variant: int, scheme: str, clear: bytes) -> str:
    """Encrypt ``clear`` under an LMK pair; return ``scheme + hex``.

    ``scheme`` is ``""`` (single DES, no prefix), ``Z``, ``U``, ``X``, ``T``
    or ``Y``; the clear key length must match it (error ``27``).
    """
    length = _check_scheme(scheme)
    if len(clear) != length:
        raise CryptoError("27", "key length does not match the key scheme")
    out = b"".join(
        tdes_ecb_encrypt(lmk_variant(pair, variant, scheme, i), clear[8 * i : 8 * i + 8])
        for i in range(length // 8)
    )
    return scheme + out.hex().upper()


def split_key_scheme(value: str) -> tuple[str, str]:
    """Split a key field ``[scheme] hex`` into (scheme, hex).

    16 hex characters without prefix give scheme ``""``. Unknown scheme
    characters raise ``26``, a length that does not fit the scheme ``27``,
    non-hex data ``15``.
    """
    if value[:1] in SCHEME_KEY_LENGTH and value[:1] != "":
        scheme, hex_part = value[0], value[1:]
    elif value[:1].isalpha() and not _HEX.fullmatch(value[:1]):
        raise CryptoError("26", "invalid key scheme")
    else:
        scheme, hex_part = "", value
    if not _HEX.fullmatch(hex_part):
        raise CryptoError("15", "key is not hexadecimal")
    if len(hex_part) != 2 * SCHEME_KEY_LENGTH[scheme]:
        raise CryptoError("27", "key length does not match the key scheme")
    return scheme, hex_part


def decrypt_under_lmk_pair(pair: bytes, variant: int, value: str, *, check_parity: bool = False) -> bytes:
    """Decrypt a key field ``[scheme] hex`` under an LMK pair.

    With ``check_parity`` a clear key without odd parity raises ``10``.
    """
    scheme, hex_part = split_key_scheme(value)
    data = bytes.fromhex(hex_part)
    clear = b"".join(
        tdes_ecb_decrypt(lmk_variant(pair, variant, scheme, i), data[8 * i : 8 * i + 8])
        for i in range(len(data) // 8)
    )
    if check_parity and not has_odd_parity(clear):
        raise CryptoError("10", "key parity error")
    return clear


def encrypt_key_under_lmk(lmk: VariantLmk, key_type: str, scheme: str, clear: bytes) -> str:
    """Encrypt ``clear`` under the LMK pair and variant of ``key_type`` (``VPP``).

    Returns ``scheme + uppercase hex``; ``scheme`` ``""`` means single DES
    without prefix.
    """
    pair_code, variant = parse_key_type(key_type)
    return encrypt_under_lmk_pair(lmk.pair(pair_code), variant, scheme, clear)


def decrypt_key_under_lmk(lmk: VariantLmk, key_type: str, value: str, *, check_parity: bool = False) -> bytes:
    """Decrypt a key field ``[scheme] hex`` of key type ``VPP`` under ``lmk``.

    The key length follows from the scheme. With ``check_parity`` a key
    without odd parity raises ``10``.
    """
    pair_code, variant = parse_key_type(key_type)
    return decrypt_under_lmk_pair(lmk.pair(pair_code), variant, value, check_parity=check_parity)


# --- LMK files ---------------------------------------------------------------

_HEADER = re.compile(r"lmk\s+(.*)", re.IGNORECASE)
_PAIR_LINE = re.compile(r"pair\s+(\d\d)-(\d\d)\s*=\s*(.+)", re.IGNORECASE)
_KEY_LINE = re.compile(r"key\s*=\s*(.+)", re.IGNORECASE)


def _components(text: str, length: int, line_no: int) -> bytes:
    value = bytes(length)
    for part in text.split("^"):
        digits = "".join(part.split())
        if len(digits) != 2 * length or not _HEX.fullmatch(digits):
            raise CryptoError("15", f"line {line_no}: expected {2 * length} hex digits")
        value = xor(value, bytes.fromhex(digits))
    return value


def _attributes(text: str, line_no: int) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep:
            raise CryptoError("15", f"line {line_no}: expected name=value")
        attrs[name.lower()] = value
    return attrs


@dataclass
class _Section:
    lmk_id: str
    scheme: str
    version: str
    line_no: int
    pairs: dict[str, bytes]
    key: bytes | None = None


def _finish(section: _Section) -> VariantLmk | KeyBlockLmk:
    where = f"LMK {section.lmk_id} (line {section.line_no})"
    if section.scheme == "variant":
        missing = [c for c in _PAIR_CODES if c not in section.pairs]
        if missing:
            raise CryptoError("15", f"{where}: missing pair {missing[0]}")
        return VariantLmk(tuple(section.pairs[c] for c in _PAIR_CODES))
    if section.key is None:
        raise CryptoError("15", f"{where}: missing key line")
    return KeyBlockLmk(section.version, section.key)


def load_lmk_file(path: str | Path) -> dict[str, VariantLmk | KeyBlockLmk]:
    """Load LMKs from a component file (format in the module docstring).

    Returns a mapping from the 2-digit LMK identifier to the LMK.
    """
    result: dict[str, VariantLmk | KeyBlockLmk] = {}
    section: _Section | None = None
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for line_no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := _HEADER.fullmatch(line):
            if section is not None:
                result[section.lmk_id] = _finish(section)
            attrs = _attributes(m.group(1), line_no)
            lmk_id = attrs.get("id", "")
            if not re.fullmatch(r"\d\d", lmk_id) or lmk_id in result:
                raise CryptoError("13", f"line {line_no}: invalid or duplicate LMK id")
            scheme = attrs.get("scheme", "").lower()
            version = attrs.get("version", "")
            if scheme not in ("variant", "keyblock"):
                raise CryptoError("15", f"line {line_no}: scheme must be variant or keyblock")
            if scheme == "keyblock" and version not in ("0", "1"):
                raise CryptoError("15", f"line {line_no}: key-block LMK version must be 0 or 1")
            section = _Section(lmk_id, scheme, version, line_no, {})
        elif section is None:
            raise CryptoError("15", f"line {line_no}: key line before any 'lmk' line")
        elif section.scheme == "variant" and (m := _PAIR_LINE.fullmatch(line)):
            first, second = m.group(1), m.group(2)
            if first not in _PAIR_CODES or int(second) != int(first) + 1:
                raise CryptoError("15", f"line {line_no}: invalid LMK pair")
            if first in section.pairs:
                raise CryptoError("15", f"line {line_no}: duplicate LMK pair")
            section.pairs[first] = _components(m.group(3), 16, line_no)
        elif section.scheme == "keyblock" and (m := _KEY_LINE.fullmatch(line)):
            if section.key is not None:
                raise CryptoError("15", f"line {line_no}: duplicate key line")
            length = 32 if section.version == "1" else 24
            section.key = _components(m.group(1), length, line_no)
        else:
            raise CryptoError("15", f"line {line_no}: unrecognised line")
    if section is not None:
        result[section.lmk_id] = _finish(section)
    return result
