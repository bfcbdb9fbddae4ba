"""Key management operations: A0 generate, A6 import, A8 export, BU check value, FA ZPK import.

Everything runs in the node worker on PKCS#11 objects, matching the emulator's answers (error codes
and their precedence included):

* keys under the LMK (variant schemes none/Z/U/T/X/Y): each 8-byte half is DES3-ECB encrypted or
  decrypted by the LMK variant object of the key type and scheme half (``hsmproxy-lmk:…``);
* ``S`` key blocks (AES key-block LMK): the header is validated like the emulator does, the MAC is
  AES-CMAC under the KBAK object and the key data AES-CBC under the KBEK object (IV = the first 16
  header characters); wrapping pads with bytes from the token's generator;
* new keys come from the token's random generator (odd parity set for DES keys);
* check values: DES3-ECB of zeros (DES/TDES keys) or AES-CMAC of zeros (AES keys) on the token;
* keys under a ZMK: ``X``/``Y``/``Z``/none are DES3-ECB under the ZMK object; ``R`` is TR-31:
  versions A/C (unwrap), B (wrap/unwrap: TDES-CMAC KDF from the ZMK object, DES3-CBC, DES3-CMAC) and
  D (AES-CMAC KDF, AES-CBC, AES-CMAC with the ZMK's bytes as the AES KBPK, as the emulator does).

Fallback (clear values inside the worker only, during one operation, then wiped): the clear key
being imported/exported/generated is data to the ECB/CBC calls (SoftHSM2 has no DES3 wrap/unwrap);
the ``U``/``T`` ZMK variants (byte 8 XOR A6/5A, 6A/DE/2B) and the TR-31 A/C/D key block protection
keys are composed from the clear ZMK (no XOR derivation on the token); TR-31 B derives its KBEK/KBAK
on the token by DES3-CMAC under the ZMK object, the derived keys become session objects.

Error codes: ``04`` key type, ``05`` key length flag, ``10``/``11`` source/destination key parity,
``13`` LMK id, ``15`` mode, ``26`` scheme, ``27`` key length, ``29`` usage/exportability, ``A1``-``AC``
and ``83`` key block errors (``A4`` MAC), ``01`` (A6/FA) imported key with even parity (the key is
still returned), ``26`` for an ``S`` block given as a key under a ZMK.
Returned keys carry their scheme tag except a single-length one: ``Z`` (or ``0``) comes back as the
bare 16 hex characters, under the LMK and under a ZMK, as payShield and the emulator answer
(:func:`protocols.hostcmd.fields.output_key`); ``Z`` + 16 hex stays a valid input key.
Limitation: only the LMK variant objects the ceremony creates exist on the token; a key type whose
variant object is missing answers ``13``.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pkcs11 import Mechanism

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend, lmk_object_label
from hsmproxy.ops.keyref import pair_and_variant
from hsmproxy.ops.registry import OpResult, op
from protocols.hostcmd.fields import output_key

#: Key scheme -> clear key length in bytes (``0`` is single length, untagged).
SCHEME_LENGTH = {"0": 8, "Z": 8, "U": 16, "X": 16, "T": 24, "Y": 24}
#: Scheme variants XORed into byte 8 of a ZMK, per key half.
ZMK_VARIANTS = {"U": (0xA6, 0x5A), "T": (0x6A, 0xDE, 0x2B)}
#: Key type pair code -> TR-31 / key-block usage when none is given.
TR31_USAGE = {"00": "K0", "01": "P0", "02": "P0", "03": "M3", "08": "M3", "09": "B0", "0A": "D0", "0B": "D0"}
#: A0 key-block algorithm -> key length in bytes.
KB_ALGORITHM_LENGTH = {"D1": 8, "T2": 16, "T3": 24, "A1": 16, "A2": 24, "A3": 32}
#: BU key length flag -> key length in bytes.
LENGTH_FLAG = {"0": 8, "1": 16, "2": 24}
#: Key-block usages accepted for a variant key type's pair code.
USAGES_BY_PAIR: dict[str, frozenset[str]] = {
    "00": frozenset({"K0", "K1", "52"}),
    "01": frozenset({"P0", "72"}),
    "02": frozenset({"P0", "71", "V1", "V2", "C0", "51"}),
    "03": frozenset({"M0", "M1", "M3", "M5", "M6", "M7"}),
    "08": frozenset({"M0", "M1", "M3", "M5", "M6", "M7"}),
    "09": frozenset({"B0", "B1", "E0"}),
    "0A": frozenset({"D0", "22"}),
    "0B": frozenset({"D0", "21", "23"}),
}
_ALNUM2 = re.compile(r"[0-9A-Z]{2}")
_HEX = re.compile(r"[0-9A-Fa-f]*")
_ZERO8, _ZERO16 = bytes(8), bytes(16)


@dataclass
class _Key:
    """A resolved key: handle, algorithm ``T``/``A``, length, key-block header, clear (fallback only)."""

    handle: Any
    algorithm: str
    length: int
    header: dict[str, str] | None = None
    clear: bytearray | None = None
    #: (LMK id, pair, variant, cryptogram) to fetch the clear value from later (fallback).
    source: tuple[str, str, int, str] | None = None


def _clear(backend: Pkcs11Backend, key: _Key) -> bytearray:
    """The key's clear value in this worker (fallback path); wiped by the operation."""
    if key.clear is None:
        assert key.source is not None
        key.clear = backend.decrypt_cryptogram(*key.source)
    return key.clear


def _wipe(*values: bytearray | None) -> None:
    for value in values:
        if value is not None:
            value[:] = bytes(len(value))


@contextmanager
def _temp_key(backend: Pkcs11Backend, clear: bytes | bytearray, algorithm: str = "T") -> Iterator[Any]:
    """A session key object for one operation, destroyed afterwards."""
    if algorithm == "T" and len(clear) not in (8, 16, 24):
        raise BackendError("41", "DES key length")
    handle = backend.create_session_key(clear, algorithm)
    try:
        yield handle
    finally:
        handle.destroy()


def _odd(data: bytes | bytearray) -> bool:
    return all(bin(b).count("1") % 2 for b in data)


def _parity(data: bytes) -> bytearray:
    return bytearray(b & 0xFE | (bin(b >> 1).count("1") + 1) % 2 for b in data)


# -- LMKs and key types ------------------------------------------------------------------------------


def _has(backend: Pkcs11Backend, label: str) -> bool:
    try:
        backend.lmk_object(label)
    except BackendError:
        return False
    return True


def _variant_lmk(backend: Pkcs11Backend, a: dict[str, Any]) -> str:
    chosen = a["lmk_id"] or a["default_lmk"]
    if chosen not in a["lmk_ids"] or not _has(backend, f"hsmproxy-lmk:{chosen}:00:0:-"):
        raise BackendError("13", "not a loaded variant LMK")
    return str(chosen)


def _keyblock_lmk(backend: Pkcs11Backend, a: dict[str, Any]) -> str:
    if a["lmk_id"] is None:
        for candidate in sorted(a["lmk_ids"]):
            if _has(backend, f"hsmproxy-kblmk:{candidate}:kbek"):
                return str(candidate)
        raise BackendError("13", "no key-block LMK is loaded")
    if a["lmk_id"] not in a["lmk_ids"] or not _has(backend, f"hsmproxy-kblmk:{a['lmk_id']}:kbek"):
        raise BackendError("13", "not a loaded key-block LMK")
    return str(a["lmk_id"])


def _parse_type(key_type: str) -> tuple[str, int]:
    return pair_and_variant(key_type)


def _check_type(key_type: str) -> None:
    if key_type.upper() != "FFF":
        _parse_type(key_type)


# -- S key blocks under the key-block LMK --------------------------------------------------------------


def _validate_fields(usage: str, algorithm: str, mode: str, version: str, exportability: str) -> None:
    if not _ALNUM2.fullmatch(usage):
        raise BackendError("A6", "invalid key usage")
    if len(algorithm) != 1 or algorithm not in "ADTEHRS":
        raise BackendError("A7", "invalid algorithm")
    if len(mode) != 1 or mode not in "BCDEGNSTVXY":
        raise BackendError("A8", "invalid mode of use")
    if not _ALNUM2.fullmatch(version):
        raise BackendError("A9", "invalid key version")
    if len(exportability) != 1 or exportability not in "ENS":
        raise BackendError("AA", "invalid exportability")


def _check_s_block(block: str) -> int:
    """The emulator's header and format checks, in its order, before the MAC; -> header length."""
    if len(block) < 16 or not block[:16].isascii() or not block[:16].isalnum():
        raise BackendError("83", "key block header is malformed")
    if not block[12:14].isdecimal():
        raise BackendError("AB", "invalid number of optional blocks")
    pos = 16
    for _ in range(int(block[12:14])):
        length_hex = block[pos + 2 : pos + 4]
        if len(length_hex) != 2 or not _HEX.fullmatch(length_hex) or int(length_hex, 16) < 4:
            raise BackendError("AC", "optional block is malformed")
        end = pos + int(length_hex, 16)
        if end > len(block):
            raise BackendError("AC", "optional block is truncated")
        block_id, data = block[pos : pos + 2], block[pos + 4 : end]
        if not _ALNUM2.fullmatch(block_id) or not data.isascii():
            raise BackendError("AC", "invalid optional block")
        pos = end
    if block[0] not in ("0", "1"):
        raise BackendError("83", "key block version must be 0 or 1")
    _validate_fields(block[5:7], block[7], block[8], block[9:11], block[11])
    if not re.fullmatch(r"\d\d", block[14:16]):
        raise BackendError("83", "invalid LMK identifier in header")
    if block[0] != "1":
        raise BackendError("A1", "key block version does not match the LMK")
    if not block[1:5].isdecimal() or int(block[1:5]) != len(block):
        raise BackendError("83", "key block length field does not match")
    body = block[pos:]
    if not _HEX.fullmatch(body) or len(body) < 48 or (len(body) - 16) % 32:
        raise BackendError("83", "key block data is malformed")
    return pos


def _s_key(backend: Pkcs11Backend, lmk: str, value: str, want_clear: bool) -> _Key:
    """Verify and open an ``S`` key block (handle from the backend; clear only when asked)."""
    block = value[1:]
    pos = _check_s_block(block)
    header, handle = backend.keyblock_key(lmk, value)
    algorithm = "A" if header["algorithm"] == "A" else "T"
    if not want_clear:
        return _Key(handle, algorithm, 0, header)
    kbek = backend.lmk_object(f"hsmproxy-kblmk:{lmk}:kbek")
    data = bytearray(
        kbek.decrypt(
            bytes.fromhex(block[pos:-16]), mechanism=Mechanism.AES_CBC, mechanism_param=block[:16].encode()
        )
    )
    try:
        n = int.from_bytes(data[:2], "big") // 8
        clear = bytearray(data[2 : 2 + n])
    finally:
        _wipe(data)
    return _Key(handle, algorithm, len(clear), header, clear)


def _wrap_s(backend: Pkcs11Backend, lmk: str, fields: tuple[str, str, str, str, str, str], key: bytes) -> str:
    """Wrap ``key`` into an ``S`` block; fields = usage, algorithm, mode, version, exportability, LMK id."""
    usage, algorithm, mode, version, exportability, lmk_id = fields
    _validate_fields(usage, algorithm, mode, version, exportability)
    if not re.fullmatch(r"\d\d", lmk_id):
        raise BackendError("83", "invalid LMK identifier in header")
    if not 1 <= len(key) <= 64:
        raise BackendError("A5", "invalid key length")
    pad = backend.random(-(2 + len(key)) % 16)
    data = bytearray((8 * len(key)).to_bytes(2, "big") + key + pad)
    try:
        header = f"1{16 + 2 * len(data) + 16:04d}{usage}{algorithm}{mode}{version}{exportability}00{lmk_id}"
        kbek = backend.lmk_object(f"hsmproxy-kblmk:{lmk}:kbek")
        kbak = backend.lmk_object(f"hsmproxy-kblmk:{lmk}:kbak")
        enc = bytes(
            kbek.encrypt(bytes(data), mechanism=Mechanism.AES_CBC, mechanism_param=header[:16].encode())
        )
    finally:
        _wipe(data)
    mac = backend.aes_cmac(kbak, header.encode() + enc)[:8]
    return "S" + header + enc.hex().upper() + mac.hex().upper()


# -- keys under the LMK -----------------------------------------------------------------------------


def _resolve(
    backend: Pkcs11Backend,
    a: dict[str, Any],
    value: str,
    key_type: str,
    *,
    parity_error: str = "10",
    usages: frozenset[str] | None = None,
    want_clear: bool = False,
) -> _Key:
    """A key under the LMK (variant cryptogram or ``S`` block), as the emulator's resolve_key."""
    if value.startswith("S"):
        key = _s_key(backend, _keyblock_lmk(backend, a), value, want_clear)
        allowed = usages if usages is not None else USAGES_BY_PAIR.get(key_type[1:].upper(), frozenset())
        if key.header is not None and key.header["usage"] not in allowed:
            _wipe(key.clear)
            raise BackendError("29", "key usage not permitted for this function")
        return key
    if value.startswith("R"):
        raise BackendError("26", "a TR-31 key block is not a key under LMK")
    lmk = _variant_lmk(backend, a)
    pair, variant = _parse_type(key_type)
    try:
        handle = backend.variant_key(lmk, pair, variant, value)
    except BackendError as exc:
        raise BackendError(parity_error if exc.code == "10" else exc.code, "key error") from None
    length = len(value.lstrip("UTXYZ")) // 2
    key = _Key(handle, "T", length, None, None, (lmk, pair, variant, value))
    if want_clear:
        _clear(backend, key)
    return key


def _under_lmk(backend: Pkcs11Backend, a: dict[str, Any], key_type: str, scheme: str, key: _Key) -> str:
    """Encrypt the clear ``key`` under the LMK in ``scheme`` (variant schemes or ``S``)."""
    assert key.clear is not None
    if scheme == "S":
        lmk = _keyblock_lmk(backend, a)
        pair = key_type[1:].upper() if key_type.upper() != "FFF" else ""
        fields = (
            a.get("kb_usage") or TR31_USAGE.get(pair, "K0"),
            (a.get("kb_algorithm") or key.algorithm)[:1],
            a.get("kb_mode_of_use") or "N",
            a.get("kb_version") or "00",
            a.get("kb_exportability") or "E",
            a["lmk_id"] or "01",
        )
        return _wrap_s(backend, lmk, fields, bytes(key.clear))
    if scheme not in SCHEME_LENGTH:
        raise BackendError("26", "invalid key scheme (LMK)")
    if key.algorithm != "T":
        raise BackendError("26", "an AES key needs the key-block LMK (scheme S)")
    if len(key.clear) != SCHEME_LENGTH[scheme]:
        raise BackendError("27", "key length does not match the key scheme")
    lmk = _variant_lmk(backend, a)
    pair, variant = _parse_type(key_type)
    out = b"".join(
        backend.ecb_encrypt(
            backend.lmk_object(lmk_object_label(lmk, pair, variant, scheme, i)),
            bytes(key.clear[8 * i : 8 * i + 8]),
        )
        for i in range(len(key.clear) // 8)
    )
    return output_key(scheme, out.hex().upper())


def _kcv(backend: Pkcs11Backend, key: _Key) -> bytes:
    """TDES-ECB of zeros, or AES-CMAC of zeros (8 bytes), on the token."""
    if key.algorithm == "A":
        size = len(key.clear) if key.clear is not None else 16
        if size not in (16, 24, 32):
            raise BackendError("27", "AES key must be 16, 24 or 32 bytes")
    if key.handle is None:
        assert key.clear is not None
        with _temp_key(backend, key.clear, key.algorithm) as handle:
            return _kcv(backend, _Key(handle, key.algorithm, key.length))
    if key.algorithm == "A":
        return backend.aes_cmac(key.handle, _ZERO16)[:8]
    return backend.ecb_encrypt(key.handle, _ZERO8)


# -- keys under a ZMK -------------------------------------------------------------------------------


def _zmk(backend: Pkcs11Backend, a: dict[str, Any], field: str = "zmk", flag: str = "0") -> _Key:
    value = a[field]
    key = _resolve(backend, a, value, "002" if flag == "1" else "000", want_clear=value.startswith("S"))
    if key.clear is not None:
        key.length = len(key.clear)
    if key.algorithm != "T" or key.length not in (16, 24):
        _wipe(key.clear)
        raise BackendError("27", "ZMK must be a double or triple length TDES key")
    return key


def _zmk_halves(backend: Pkcs11Backend, zmk: _Key, scheme: str, data: bytes, encrypt: bool) -> bytearray:
    """ECB each 8-byte half under the ZMK (or its scheme variant for U/T)."""
    crypt = backend.ecb_encrypt if encrypt else backend.ecb_decrypt
    variants = ZMK_VARIANTS.get(scheme)
    if variants is None:
        return bytearray(crypt(zmk.handle, data))
    out = bytearray()
    for i in range(len(data) // 8):
        k = bytearray(_clear(backend, zmk))
        k[8] ^= variants[i]
        try:
            with _temp_key(backend, k) as handle:
                out += crypt(handle, data[8 * i : 8 * i + 8])
        finally:
            _wipe(k)
    return out


def _under_zmk(backend: Pkcs11Backend, zmk: _Key, scheme: str, clear: bytes, key_type: str) -> str:
    if scheme == "R":
        usage = TR31_USAGE.get(key_type[1:].upper(), "K0")
        header = f"B0000{usage}TN00E0000" if len(clear) != 32 else f"D0000{usage}AN00E0000"
        return "R" + _tr31_wrap(backend, zmk, header, clear)
    if scheme not in SCHEME_LENGTH:
        raise BackendError("26", "invalid key scheme (ZMK)")
    if len(clear) != SCHEME_LENGTH[scheme]:
        raise BackendError("27", "key length does not match the key scheme")
    out = _zmk_halves(backend, zmk, scheme, clear, True)
    return output_key(scheme, out.hex().upper())


def _from_zmk(backend: Pkcs11Backend, zmk: _Key, value: str) -> _Key:
    """Decrypt ``[scheme]hex`` or a TR-31 ``R`` block from under the ZMK (clear in the worker)."""
    if value.startswith("S"):
        raise BackendError("26", "a key block under the LMK is not a key under a ZMK")
    if value.startswith("R"):
        header, clear = _tr31_unwrap(backend, zmk, value[1:])
        algorithm = "A" if header[7:8] == "A" else "T"
        return _Key(None, algorithm, len(clear), None, clear)
    if value[:1] in SCHEME_LENGTH and value[:1] != "0":
        scheme, hex_part = value[0], value[1:]
    else:
        scheme, hex_part = "", value
    try:
        data = bytes.fromhex(hex_part)
    except ValueError:
        raise BackendError("41", "key under ZMK is not hex") from None
    clear = _zmk_halves(backend, zmk, scheme, data[: len(data) // 8 * 8], False)
    return _Key(None, "T", len(clear), None, clear)


# -- TR-31 ------------------------------------------------------------------------------------------


def _tr31_keys(backend: Pkcs11Backend, zmk: _Key, version: str) -> tuple[Any, Any, list[Any]]:
    """(KBEK handle, KBAK handle, objects to destroy) for TR-31 ``version`` under the ZMK."""
    if version == "B":  # derived on the token by DES3-CMAC under the ZMK object
        alg, bits, calls = (
            (b"\x00\x00", b"\x00\x80", 2) if zmk.length == 16 else (b"\x00\x01", b"\x00\xc0", 3)
        )
        parts: dict[bytes, bytearray] = {b"\x00\x00": bytearray(), b"\x00\x01": bytearray()}
        for i in range(1, calls + 1):
            for usage, acc in parts.items():
                acc.extend(
                    zmk.handle.sign(bytes([i]) + usage + b"\x00" + alg + bits, mechanism=Mechanism.DES3_CMAC)
                )
        objs = [
            backend.create_session_key(parts[b"\x00\x00"]),
            backend.create_session_key(parts[b"\x00\x01"]),
        ]
        _wipe(*parts.values())
        return objs[0], objs[1], objs
    kbpk = bytes(_clear(backend, zmk))
    if version in ("A", "C"):
        enc, mac = bytes(b ^ 0x45 for b in kbpk), bytes(b ^ 0x4D for b in kbpk)
        objs = [backend.create_session_key(enc), backend.create_session_key(mac)]
        return objs[0], objs[1], objs
    alg, bits, calls = {16: (b"\x00\x02", b"\x00\x80", 1), 24: (b"\x00\x03", b"\x00\xc0", 2)}[len(kbpk)]
    root = backend.create_session_key(kbpk, "A")
    try:
        derived = []
        for usage in (b"\x00\x00", b"\x00\x01"):
            material = bytearray()
            for i in range(1, calls + 1):
                material += backend.aes_cmac(root, bytes([i]) + usage + b"\x00" + alg + bits)
            derived.append(backend.create_session_key(material[: len(kbpk)], "A"))
            _wipe(material)
    finally:
        root.destroy()
    return derived[0], derived[1], derived


def _cmac(version: str, key: Any, data: bytes) -> bytes:
    if version == "D":
        return bytes(key.sign(data, mechanism=Mechanism.AES_CMAC))
    if version == "B":
        return bytes(key.sign(data, mechanism=Mechanism.DES3_CMAC))
    return bytes(key.encrypt(data, mechanism=Mechanism.DES3_CBC, mechanism_param=_ZERO8))[-8:][:4]


def _tr31_wrap(backend: Pkcs11Backend, zmk: _Key, header: str, key: bytes) -> str:
    """TR-31 version B or D wrap (key length masked to the algorithm maximum, as psec does)."""
    version = header[0]
    block = 16 if version == "D" else 8
    masked = max({"T": 24, "D": 24, "A": 32}.get(header[7], len(key)), len(key))
    pad_len = block - (2 + masked) % block
    mac_len = 16 if version == "D" else 8
    text = f"{version}{16 + 4 + 2 * masked + 2 * pad_len + 2 * mac_len:04d}{header[5:16]}"
    data = bytearray((8 * len(key)).to_bytes(2, "big") + key + backend.random(pad_len + masked - len(key)))
    kbek, kbak, objs = _tr31_keys(backend, zmk, version)
    try:
        mac = _cmac(version, kbak, text.encode() + bytes(data))
        mech = Mechanism.AES_CBC if version == "D" else Mechanism.DES3_CBC
        enc = bytes(kbek.encrypt(bytes(data), mechanism=mech, mechanism_param=mac))
    finally:
        _wipe(data)
        for obj in objs:
            obj.destroy()
    return text + enc.hex().upper() + mac.hex().upper()


def _tr31_header_length(block: str) -> int:
    """psec's header checks (all ``83``); returns the header length with optional blocks."""
    if not block[:16].isascii() or not block[:16].isalnum() or len(block) < 16 or block[0] not in "ABCD":
        raise BackendError("83", "TR-31 header")
    if not block[12:14].isdecimal():
        raise BackendError("83", "TR-31 optional block count")
    i = 16
    for _ in range(int(block[12:14])):
        if len(block[i : i + 2]) != 2:
            raise BackendError("83", "TR-31 optional block id")
        length_hex = block[i + 2 : i + 4]
        i += 4
        if len(length_hex) != 2 or not _HEX.fullmatch(length_hex):
            raise BackendError("83", "TR-31 optional block length")
        length = int(length_hex, 16) - 4
        if length == -4:
            ll = block[i : i + 2]
            if len(ll) != 2 or not _HEX.fullmatch(ll) or int(ll, 16) == 0:
                raise BackendError("83", "TR-31 optional block length")
            digits = block[i + 2 : i + 2 + 2 * int(ll, 16)]
            if len(digits) != 2 * int(ll, 16) or not _HEX.fullmatch(digits):
                raise BackendError("83", "TR-31 optional block length")
            i += 2 + len(digits)
            length = int(digits, 16) - 6 - len(digits)
        if length < 0 or len(block[i : i + length]) != length:
            raise BackendError("83", "TR-31 optional block data")
        i += length
    return i


def _tr31_unwrap(backend: Pkcs11Backend, zmk: _Key, block: str) -> tuple[str, bytearray]:
    """Verify and decrypt a TR-31 block (versions A, B, C, D) -> (header text, clear key)."""
    header_len = _tr31_header_length(block)
    version = block[0]
    size, mac_len = (16, 16) if version == "D" else (8, 8 if version == "B" else 4)
    if not block[1:5].isdecimal() or int(block[1:5]) != len(block) or len(block) % size:
        raise BackendError("83", "TR-31 length")
    rest = block[header_len:]
    mac_hex, data_hex = rest[-2 * mac_len :], rest[: -2 * mac_len]
    if len(mac_hex) != 2 * mac_len or not _HEX.fullmatch(mac_hex) or not _HEX.fullmatch(data_hex):
        raise BackendError("83", "TR-31 data")
    if len(data_hex) % 2:
        raise BackendError("83", "TR-31 data")
    data, mac = bytes.fromhex(data_hex), bytes.fromhex(mac_hex)
    if len(data) < size or len(data) % size:
        raise BackendError("83", "TR-31 encrypted key")
    header = block[:header_len].encode()
    kbek, kbak, objs = _tr31_keys(backend, zmk, version)
    try:
        if version in ("A", "C"):
            if not hmac.compare_digest(_cmac(version, kbak, header + data), mac):
                raise BackendError("A4", "TR-31 authentication failure")
            clear = bytearray(kbek.decrypt(data, mechanism=Mechanism.DES3_CBC, mechanism_param=header[:8]))
        else:
            mech = Mechanism.AES_CBC if version == "D" else Mechanism.DES3_CBC
            clear = bytearray(kbek.decrypt(data, mechanism=mech, mechanism_param=mac))
            if not hmac.compare_digest(_cmac(version, kbak, header + bytes(clear)), mac):
                _wipe(clear)
                raise BackendError("A4", "TR-31 authentication failure")
    finally:
        for obj in objs:
            obj.destroy()
    try:
        bits = int.from_bytes(clear[:2], "big")
        if bits % 8 or len(clear[2 : 2 + bits // 8]) != bits // 8:
            raise BackendError("83", "TR-31 key length")
        return block[:header_len], bytearray(clear[2 : 2 + bits // 8])
    finally:
        _wipe(clear)


# -- operations -------------------------------------------------------------------------------------


@op("generate_key")
def generate_key(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """A0: a random key under the LMK (mode 0), and also under a ZMK/TMK (mode 1)."""
    if a["mode"] not in ("0", "1"):
        raise BackendError("15", "A0 mode must be 0 or 1")
    key_type, scheme = a["key_type"], a["key_scheme_lmk"]
    _check_type(key_type)
    if scheme == "S":
        algorithm = a.get("kb_algorithm") or "T2"
        length = KB_ALGORITHM_LENGTH.get(algorithm)
        if length is None:
            raise BackendError("A7", "unsupported key block algorithm")
        raw = backend.random(length)
        key = _Key(None, algorithm[0] if algorithm[0] == "A" else "T", length)
        key.clear = bytearray(raw) if key.algorithm == "A" else _parity(raw)
    else:
        if scheme not in SCHEME_LENGTH:
            raise BackendError("26", "invalid key scheme (LMK)")
        key = _Key(None, "T", SCHEME_LENGTH[scheme], None, _parity(backend.random(SCHEME_LENGTH[scheme])))
    zmk: _Key | None = None
    try:
        values: dict[str, str | bytes] = {"key_lmk": _under_lmk(backend, a, key_type, scheme, key)}
        if a["mode"] == "1":
            zmk = _zmk(backend, a, "zmk", a.get("zmk_tmk_flag") or "0")
            assert key.clear is not None
            values["key_zmk"] = _under_zmk(backend, zmk, a["key_scheme_zmk"], bytes(key.clear), key_type)
        values["kcv"] = _kcv(backend, key).hex().upper()[:6]
    finally:
        _wipe(key.clear, zmk.clear if zmk else None)
    return "00", values


@op("import_key")
def import_key(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """A6 (key type from the request) and FA (ZPK, scheme by length): a key from under a ZMK to the LMK."""
    key_type = a["key_type"]
    if a["command"] == "A6":
        _check_type(key_type)
    zmk = _zmk(backend, a)
    key: _Key | None = None
    try:
        key = _from_zmk(backend, zmk, a["key_zmk"])
        assert key.clear is not None
        scheme = a["key_scheme_lmk"]
        if a["command"] == "FA" and not scheme:
            scheme = {8: "0", 16: "U", 24: "T"}.get(len(key.clear), "U")
        key_lmk = _under_lmk(backend, a, key_type, scheme, key)
        error = "01" if key.algorithm == "T" and not _odd(key.clear) else "00"
        kcv = _kcv(backend, key).hex().upper()
    finally:
        _wipe(zmk.clear, key.clear if key else None)
    short = a["command"] == "A6" or a.get("kcv_type") == "1"
    field = "key_lmk" if a["command"] == "A6" else "zpk_lmk"
    return error, {field: key_lmk, "kcv": kcv[:6] if short else kcv[:16]}


@op("export_key")
def export_key(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """A8: a key from under the LMK to under a ZMK."""
    key_type = a["key_type"]
    _check_type(key_type)
    zmk = _zmk(backend, a)
    key: _Key | None = None
    try:
        key = _resolve(backend, a, a["key_lmk"], key_type, parity_error="11", want_clear=True)
        if key.header is not None and key.header["exportability"] not in ("E", "S"):
            raise BackendError("29", "key is not exportable")
        assert key.clear is not None
        key_zmk = _under_zmk(backend, zmk, a["key_scheme_zmk"], bytes(key.clear), key_type)
        kcv = _kcv(backend, key).hex().upper()[:6]
    finally:
        _wipe(zmk.clear, key.clear if key else None)
    return "00", {"key_zmk": key_zmk, "kcv": kcv}


@op("key_check_value")
def key_check_value(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """BU: the check value of a key under the LMK (16 hex, or 6 with KCV type 1)."""
    code = a["key_type_code"].upper()
    key_type = a["key_type"] if code == "FF" else code[0] + "0" + code[1]
    if code == "FF" and a["key_type"] is None:
        raise BackendError("04", "key type FF needs the 3-character key type")
    length = LENGTH_FLAG.get(a["key_length_flag"])
    if length is None:
        raise BackendError("05", "invalid key length flag")
    value = a["key"]
    block = value.startswith("S")
    if not block:
        _check_type(key_type)
    key = _resolve(backend, a, value, key_type, usages=frozenset({value[6:8]}) if block else None)
    if key.algorithm == "T" and key.length != length and not block:
        raise BackendError("27", "key length flag does not match the key")
    kcv = _kcv(backend, key).hex().upper()
    return "00", {"kcv": kcv[:6] if a.get("kcv_type") == "1" else kcv[:16]}
