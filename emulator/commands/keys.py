"""Key management commands: A0 generate, A6 import, A8 export, BU check value, FA ZPK ZMK->LMK.

Keys under LMK use the variant LMK (schemes none/Z/U/T/X/Y) or the key-block LMK (``S``). Keys
under a ZMK (A0 mode 1, A6, A8, FA) use:

* ``X``, ``Y``, ``Z`` and none: ANSI X9.17, each 8-byte half TDES-ECB under the ZMK;
* ``U``, ``T``: the same with the scheme variant XORed into byte 8 of the ZMK per half (``U``:
  A6, 5A; ``T``: 6A, DE, 2B), as for keys under the LMK;
* ``R``: a TR-31 key block (version B for TDES keys, D for AES keys) under the ZMK.

A returned key carries its scheme tag (``U``/``T``/``X``/``Y``, ``S``/``R`` blocks) except a
single-length one: scheme ``Z`` (or ``0``) comes back as the bare 16 hex characters, under the
LMK and under a ZMK alike, as payShield answers (:func:`protocols.hostcmd.fields.output_key`).
``Z`` + 16 hex is still accepted as an input key.

Check values are 6 hex (TDES-ECB of zeros, or AES-CMAC of zeros for AES keys); BU and FA
return 16 hex unless the request's KCV type asks for 6. Error codes: ``04`` key type, ``05`` key
length flag, ``10``/``11`` parity of the source/destination key, ``26`` key scheme, ``27`` key
length, ``01`` (A6/FA) the imported key has even parity: the key is still returned, as payShield
does, so the caller can decide.
"""

from __future__ import annotations

import secrets

from emulator.commands.common import (
    ClearKey,
    keyblock_lmk,
    resolve_key,
    text,
    variant_lmk,
)
from emulator.crypto.cipher import tdes_ecb_decrypt, tdes_ecb_encrypt
from emulator.crypto.errors import CryptoError
from emulator.crypto.keyblock import KeyBlockHeader, unwrap_tr31, wrap_key_block, wrap_tr31
from emulator.crypto.lmk import (
    SCHEME_VARIANTS,
    adjust_parity,
    encrypt_key_under_lmk,
    has_odd_parity,
    kcv_aes_cmac,
    kcv_tdes,
    parse_key_type,
    split_key_scheme,
)
from emulator.hsm import Handler, Reply
from emulator.state import EmulatorState
from protocols.hostcmd.fields import Values, output_key

#: Key scheme character -> clear key length in bytes (``0`` is single length, untagged).
SCHEME_LENGTH = {"0": 8, "Z": 8, "U": 16, "X": 16, "T": 24, "Y": 24}
#: Key type (pair code) -> TR-31 usage used when exporting as ``R``.
TR31_USAGE = {"00": "K0", "01": "P0", "02": "P0", "03": "M3", "08": "M3", "09": "B0", "0A": "D0", "0B": "D0"}
#: A0 key-block algorithm (2 characters after ``#``) -> key length in bytes.
KB_ALGORITHM_LENGTH = {"D1": 8, "T2": 16, "T3": 24, "A1": 16, "A2": 24, "A3": 32}
#: BU key-length flag -> clear key length.
LENGTH_FLAG = {"0": 8, "1": 16, "2": 24}


def _kcv(key: ClearKey | bytes, algorithm: str = "T") -> bytes:
    if isinstance(key, ClearKey):
        algorithm, key = key.algorithm, key.key
    return kcv_aes_cmac(key)[:8] if algorithm == "A" else kcv_tdes(key)


def _random_des_key(length: int) -> bytes:
    return adjust_parity(secrets.token_bytes(length))


def _zmk_variant(zmk: bytes, scheme: str, half: int) -> bytes:
    variants = SCHEME_VARIANTS.get(scheme)
    if variants is None:
        return zmk
    k = bytearray(zmk)
    k[8] ^= variants[half]
    return bytes(k)


def encrypt_under_zmk(zmk: bytes, scheme: str, clear: bytes, key_type: str) -> str:
    """Encrypt ``clear`` under ``zmk`` in ``scheme`` (X/Y/Z/U/T/none, or R for TR-31)."""
    if scheme == "R":
        pair = key_type[1:].upper()
        usage = TR31_USAGE.get(pair, "K0")
        header = f"B0000{usage}TN00E0000" if len(clear) != 32 else f"D0000{usage}AN00E0000"
        return "R" + wrap_tr31(zmk, header, clear)
    if scheme not in SCHEME_LENGTH:
        raise CryptoError("26", "invalid key scheme (ZMK)")
    if len(clear) != SCHEME_LENGTH[scheme]:
        raise CryptoError("27", "key length does not match the key scheme")
    out = b"".join(
        tdes_ecb_encrypt(_zmk_variant(zmk, scheme, i), clear[8 * i : 8 * i + 8])
        for i in range(len(clear) // 8)
    )
    return output_key(scheme, out.hex().upper())


def decrypt_under_zmk(zmk: bytes, value: str) -> ClearKey:
    """Decrypt a key field ``[scheme] hex`` (or a TR-31 ``R`` block) from under ``zmk``."""
    if value.startswith("S"):
        raise CryptoError("26", "a key block under the LMK is not a key under a ZMK")
    if value.startswith("R"):
        header, key = unwrap_tr31(zmk, value)
        algorithm = "A" if header[7:8] == "A" else "T"
        return ClearKey(key, algorithm)
    if value[:1] in SCHEME_LENGTH and value[:1] != "0":
        scheme, hex_part = value[0], value[1:]
    else:
        scheme, hex_part = "", value
    data = bytes.fromhex(hex_part)
    clear = b"".join(
        tdes_ecb_decrypt(_zmk_variant(zmk, scheme, i), data[8 * i : 8 * i + 8]) for i in range(len(data) // 8)
    )
    return ClearKey(clear, "T")


def _zmk(state: EmulatorState, v: Values, field: str = "zmk", flag: str = "0") -> bytes:
    key = resolve_key(state, v, field, "002" if flag == "1" else "000")
    if key.algorithm != "T" or len(key.key) not in (16, 24):
        raise CryptoError("27", "ZMK must be a double or triple length TDES key")
    return key.key


def _under_lmk(state: EmulatorState, v: Values, key_type: str, scheme: str, key: ClearKey) -> str:
    """Encrypt a clear key under the LMK in ``scheme`` (variant schemes or ``S`` key block)."""
    if scheme == "S":
        lmk = keyblock_lmk(state, v)
        pair = key_type[1:].upper() if key_type.upper() != "FFF" else ""
        header = KeyBlockHeader(
            version=lmk.version,
            usage=text(v, "kb_usage", TR31_USAGE.get(pair, "K0")),
            algorithm=text(v, "kb_algorithm", key.algorithm)[:1],
            mode_of_use=text(v, "kb_mode_of_use", "N"),
            key_version=text(v, "kb_version", "00"),
            exportability=text(v, "kb_exportability", "E"),
            lmk_id=text(v, "lmk_id", "01"),
        )
        return "S" + wrap_key_block(lmk, header, key.key)
    if scheme not in SCHEME_LENGTH:
        raise CryptoError("26", "invalid key scheme (LMK)")
    if key.algorithm != "T":
        raise CryptoError("26", "an AES key needs the key-block LMK (scheme S)")
    if len(key.key) != SCHEME_LENGTH[scheme]:
        raise CryptoError("27", "key length does not match the key scheme")
    lmk_scheme = "" if scheme == "0" else scheme
    cryptogram = encrypt_key_under_lmk(variant_lmk(state, v), key_type, lmk_scheme, key.key)
    _, hex_text = split_key_scheme(cryptogram)
    return output_key(scheme, hex_text)


def _check_key_type(key_type: str) -> None:
    if key_type.upper() == "FFF":
        return
    parse_key_type(key_type)


def a0(state: EmulatorState, v: Values) -> Reply:
    """A0: generate a random key under the LMK (mode 0) and also under a ZMK/TMK (mode 1)."""
    mode = text(v, "mode")
    if mode not in ("0", "1"):
        raise CryptoError("15", "A0 mode must be 0 or 1")
    key_type = text(v, "key_type")
    _check_key_type(key_type)
    scheme = text(v, "key_scheme_lmk")
    if scheme == "S":
        algorithm = text(v, "kb_algorithm", "T2")
        length = KB_ALGORITHM_LENGTH.get(algorithm)
        if length is None:
            raise CryptoError("A7", "unsupported key block algorithm")
        if algorithm[0] == "A":
            clear = ClearKey(secrets.token_bytes(length), "A")
        else:
            clear = ClearKey(_random_des_key(length), "T")
    else:
        if scheme not in SCHEME_LENGTH:
            raise CryptoError("26", "invalid key scheme (LMK)")
        clear = ClearKey(_random_des_key(SCHEME_LENGTH[scheme]), "T")
    values: Values = {"key_lmk": _under_lmk(state, v, key_type, scheme, clear)}
    if mode == "1":
        zmk = _zmk(state, v, "zmk", text(v, "zmk_tmk_flag", "0"))
        values["key_zmk"] = encrypt_under_zmk(zmk, text(v, "key_scheme_zmk"), clear.key, key_type)
    values["kcv"] = _kcv(clear).hex().upper()[:6]
    return Reply(values=values)


def a6(state: EmulatorState, v: Values) -> Reply:
    """A6: import a key from under a ZMK to under the LMK."""
    key_type = text(v, "key_type")
    _check_key_type(key_type)
    zmk = _zmk(state, v)
    clear = decrypt_under_zmk(zmk, text(v, "key_zmk"))
    key_lmk = _under_lmk(state, v, key_type, text(v, "key_scheme_lmk"), clear)
    error = "01" if clear.algorithm == "T" and not has_odd_parity(clear.key) else "00"
    return Reply(error, {"key_lmk": key_lmk, "kcv": _kcv(clear).hex().upper()[:6]})


def a8(state: EmulatorState, v: Values) -> Reply:
    """A8: export a key from under the LMK to under a ZMK."""
    key_type = text(v, "key_type")
    _check_key_type(key_type)
    zmk = _zmk(state, v)
    key = resolve_key(state, v, "key_lmk", key_type, parity_error="11")
    if key.header is not None and key.header.exportability not in ("E", "S"):
        raise CryptoError("29", "key is not exportable")
    key_zmk = encrypt_under_zmk(zmk, text(v, "key_scheme_zmk"), key.key, key_type)
    return Reply(values={"key_zmk": key_zmk, "kcv": _kcv(key).hex().upper()[:6]})


def bu(state: EmulatorState, v: Values) -> Reply:
    """BU: check value of a key under the LMK (16 hex, or 6 with KCV type 1)."""
    code = text(v, "key_type_code").upper()
    # The 2-character code is the 3-character key type without its middle digit (42 = 402).
    key_type = text(v, "key_type") if code == "FF" else code[0] + "0" + code[1]
    if code == "FF" and "key_type" not in v:
        raise CryptoError("04", "key type FF needs the 3-character key type")
    length = LENGTH_FLAG.get(text(v, "key_length_flag"))
    if length is None:
        raise CryptoError("05", "invalid key length flag")
    value = text(v, "key")
    if not value.startswith("S"):
        _check_key_type(key_type)
    key = resolve_key(
        state, v, "key", key_type, usages=None if not value.startswith("S") else _any_usage(state, v)
    )
    if key.algorithm == "T" and len(key.key) != length and not value.startswith("S"):
        raise CryptoError("27", "key length flag does not match the key")
    kcv = _kcv(key).hex().upper()
    return Reply(values={"kcv": kcv[:6] if text(v, "kcv_type", "0") == "1" else kcv[:16]})


def _any_usage(state: EmulatorState, v: Values) -> frozenset[str]:
    from emulator.crypto.keyblock import unwrap_key_block

    header, _ = unwrap_key_block(keyblock_lmk(state, v), text(v, "key"))
    return frozenset({header.usage})


def fa(state: EmulatorState, v: Values) -> Reply:
    """FA: translate a ZPK from under a ZMK to under the LMK."""
    zmk = _zmk(state, v)
    clear = decrypt_under_zmk(zmk, text(v, "zpk_zmk"))
    scheme = text(v, "key_scheme_lmk", "")
    if not scheme:
        scheme = {8: "0", 16: "U", 24: "T"}.get(len(clear.key), "U")
    zpk_lmk = _under_lmk(state, v, "001", scheme, clear)
    error = "01" if clear.algorithm == "T" and not has_odd_parity(clear.key) else "00"
    kcv = _kcv(clear).hex().upper()
    return Reply(error, {"zpk_lmk": zpk_lmk, "kcv": kcv[:6] if text(v, "kcv_type", "0") == "1" else kcv[:16]})


HANDLERS: dict[str, Handler] = {"A0": a0, "A6": a6, "A8": a8, "BU": bu, "FA": fa}
