"""PIN commands: translation (CA CC CI G0), PIN under LMK (JA JC JE JG), verification and
generation (DA EA DC EC DE EE DG FW).

PIN blocks are TDES-ECB under a TDES (variant or ``S`` key block) TPK/ZPK in formats ``01``
ISO-0, ``03`` Diebold, ``05`` ISO-1, ``47`` ISO-3; or ISO 9564-1 format 4 (``48``) under an AES
key block, bound to the full PAN that the request carries in place of the 12-digit account. A
TDES key with format ``48`` and an AES key with any other format answer ``23``, like an
unsupported format code; a format disabled with CONFIGPB answers ``69``.

DUKPT (CI, G0): the BDK is key type 009 (variant LMK) or a key block with usage ``B0``. A TDES
BDK means TDES DUKPT (ANSI X9.24-1:2009, PIN variant of the transaction key) with a 20-hex KSN;
an AES key block BDK means AES DUKPT (X9.24-3:2017, PIN working key of the BDK's own AES type)
with a 24-hex KSN (initial key ID 16 ‖ counter 8) and ISO-4 PIN blocks. The 3-hex KSN
descriptor is checked to be hex and otherwise not used: the KSN is always taken whole. CI has no
source format: it is ISO-0 (``01``), so CI with an AES BDK answers ``23``.

PIN under LMK is hsmproxy's own encoding (``emulator.crypto.pin_lmk``) under the variant LMK the
request selects. IBM 3624 offsets are 12 characters, the offset digits left-justified and padded
with ``F``; an offset has as many digits as the PIN, the check length is the minimum PIN length
(DE, EE) or the number of leftmost digits compared (DA, EA). The PIN validation data's first
``N`` stands for the last 5 digits of the account number.

Error codes: ``10`` source key (TPK, ZPK, BDK, the PVK of DE/EE/DG) parity, ``11`` destination
key or PVK (CA CC CI G0 DA EA DC EC FW) parity, ``13`` unknown LMK identifier, ``14`` PIN under
LMK invalid, ``15`` bad data (check length outside 4..12, offset not decimal, validation data
not hex), ``20`` PIN block invalid, ``22`` account / PAN, ``23`` format, ``24`` PIN length
outside 4..12 or longer than the maximum, ``25`` decimalisation table, ``27`` key length or
algorithm not usable for the function (AES PVK), ``29`` key block usage, ``69`` format
disabled, ``01`` verification failed (DA EA DC EC).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from emulator.commands.common import ClearKey, hex_bytes, raw, resolve_key, text, variant_lmk
from emulator.crypto.card import (
    generate_pvv,
    ibm3624_offset,
    ibm3624_pin_from_offset,
    thales_validation_data,
    verify_ibm3624,
    verify_pvv,
)
from emulator.crypto.cipher import tdes_ecb_decrypt, tdes_ecb_encrypt
from emulator.crypto.dukpt import aes_working_key, tdes_working_key
from emulator.crypto.errors import CryptoError
from emulator.crypto.pin_lmk import decrypt_pin_under_lmk, encrypt_pin_under_lmk
from emulator.crypto.pinblock import (
    SUPPORTED_FORMATS,
    account_from_pan,
    decipher_iso4,
    decode_pin_block,
    encipher_iso4,
    encode_pin_block,
)
from emulator.hsm import Handler, Reply
from emulator.state import EmulatorState
from protocols.hostcmd.fields import Values

ISO4 = "48"
#: Key-block usages accepted per role.
TPK_USAGES = frozenset({"P0", "71"})
ZPK_USAGES = frozenset({"P0", "72"})
PVK_USAGES = frozenset({"V0", "V1", "V2"})
BDK_USAGES = frozenset({"B0"})
#: FW key type -> (key type code, usages) of the key the PIN block is under.
FW_PIN_KEYS = {"001": ("001", ZPK_USAGES), "002": ("002", TPK_USAGES)}


# -- shared helpers ------------------------------------------------------------------------------


def _pan(v: Values) -> str:
    return raw(v, "pan").decode("latin-1")


def _account12(v: Values) -> str:
    """The 12-digit account: given, or derived from the full PAN of an ISO-4 request."""
    return account_from_pan(_pan(v)) if "pan" in v else text(v, "account")


def _check_format(state: EmulatorState, fmt: str, key: ClearKey) -> None:
    if fmt != ISO4 and fmt not in SUPPORTED_FORMATS:
        raise CryptoError("23", "unsupported PIN block format code")
    if fmt in state.disabled_pin_formats:
        raise CryptoError("69", "PIN block format is disabled")
    if (fmt == ISO4) != (key.algorithm == "A"):
        raise CryptoError("23", "PIN block format does not fit the key's algorithm")


def _decrypt_pin(state: EmulatorState, v: Values, key: ClearKey, fmt: str) -> str:
    """The clear PIN of the request's ``pin_block`` under ``key`` in format ``fmt``."""
    _check_format(state, fmt, key)
    block = hex_bytes(v, "pin_block", "20")
    if fmt == ISO4:
        return decipher_iso4(key.key, block, _pan(v))
    return decode_pin_block(fmt, tdes_ecb_decrypt(key.key, block), _account12(v))


def _encrypt_pin(state: EmulatorState, v: Values, key: ClearKey, fmt: str, pin: str) -> str:
    """``pin`` as a PIN block of format ``fmt`` under ``key`` (hex)."""
    _check_format(state, fmt, key)
    if fmt == ISO4:
        return encipher_iso4(key.key, pin, _pan(v)).hex().upper()
    return tdes_ecb_encrypt(key.key, encode_pin_block(fmt, pin, _account12(v))).hex().upper()


def _check_max_length(v: Values, pin: str) -> None:
    maximum = int(text(v, "max_pin_length"))
    if not 4 <= maximum <= 12 or len(pin) > maximum:
        raise CryptoError("24", "PIN longer than the maximum PIN length")


def _translated(pin: str, block: str, fmt: str) -> Reply:
    return Reply(values={"pin_length": f"{len(pin):02d}", "pin_block": block, "destination_format": fmt})


def _pvk(state: EmulatorState, v: Values, parity_error: str) -> bytes:
    key = resolve_key(state, v, "pvk", "002", parity_error=parity_error, usages=PVK_USAGES)
    if key.algorithm != "T":
        raise CryptoError("27", "PVK must be a DES/TDES key")
    return key.key


def _check_length(v: Values) -> int:
    check = int(text(v, "check_length"))
    if not 4 <= check <= 12:
        raise CryptoError("15", "check length must be 04-12")
    return check


def _offset_digits(v: Values) -> str:
    digits = text(v, "offset").upper().rstrip("F")
    if not digits.isdecimal() or not digits.isascii():
        raise CryptoError("15", "offset must be decimal digits padded with F")
    return digits


def _validation_data(v: Values) -> str:
    return thales_validation_data(text(v, "validation_data"), _account12(v))


def _verified(check: Callable[[], None]) -> Reply:
    """Run a verification; its ``01`` failure becomes the reply's error code."""
    try:
        check()
    except CryptoError as exc:
        if exc.code == "01":
            return Reply(error="01")
        raise
    return Reply()


# -- translation -----------------------------------------------------------------------------


def _translate(state: EmulatorState, v: Values, src: ClearKey, dst: ClearKey, src_fmt: str) -> Reply:
    dst_fmt = text(v, "destination_format")
    _check_format(state, dst_fmt, dst)
    pin = _decrypt_pin(state, v, src, src_fmt)
    if "max_pin_length" in v:
        _check_max_length(v, pin)
    return _translated(pin, _encrypt_pin(state, v, dst, dst_fmt, pin), dst_fmt)


def ca(state: EmulatorState, v: Values) -> Reply:
    """CA: translate a PIN block from a TPK to a ZPK (formats may change)."""
    tpk = resolve_key(state, v, "tpk", "002", usages=TPK_USAGES)
    zpk = resolve_key(state, v, "zpk", "001", parity_error="11", usages=ZPK_USAGES)
    return _translate(state, v, tpk, zpk, text(v, "source_format"))


def cc(state: EmulatorState, v: Values) -> Reply:
    """CC: translate a PIN block from one ZPK to another (formats may change)."""
    src = resolve_key(state, v, "source_zpk", "001", usages=ZPK_USAGES)
    dst = resolve_key(state, v, "destination_zpk", "001", parity_error="11", usages=ZPK_USAGES)
    return _translate(state, v, src, dst, text(v, "source_format"))


def _dukpt_pin_key(state: EmulatorState, v: Values) -> ClearKey:
    """The DUKPT PIN key of the request's KSN: TDES (X9.24-1) or AES (X9.24-3) by the BDK."""
    bdk = resolve_key(state, v, "bdk", "009", usages=BDK_USAGES)
    ksn = hex_bytes(v, "ksn")
    if bdk.algorithm == "A":
        return ClearKey(aes_working_key(bdk.key, ksn, "pin"), "A")
    return ClearKey(tdes_working_key(bdk.key, ksn, "pin"), "T")


def _dukpt_translate(state: EmulatorState, v: Values, src_fmt: str) -> Reply:
    pin_key = _dukpt_pin_key(state, v)
    zpk = resolve_key(state, v, "zpk", "001", parity_error="11", usages=ZPK_USAGES)
    return _translate(state, v, pin_key, zpk, src_fmt)


def ci(state: EmulatorState, v: Values) -> Reply:
    """CI: translate an ISO-0 PIN block from a DUKPT PIN key (BDK + KSN) to a ZPK."""
    return _dukpt_translate(state, v, "01")


def g0(state: EmulatorState, v: Values) -> Reply:
    """G0: translate a PIN block from a TDES or AES DUKPT PIN key to a ZPK."""
    return _dukpt_translate(state, v, text(v, "source_format"))


# -- PIN under LMK ---------------------------------------------------------------------------


def ja(state: EmulatorState, v: Values) -> Reply:
    """JA: a random PIN of the requested length, encrypted under the LMK."""
    length = int(text(v, "pin_length"))
    if not 4 <= length <= 12:
        raise CryptoError("24", "PIN length must be 04-12")
    lmk = variant_lmk(state, v)
    pin = "".join(secrets.choice("0123456789") for _ in range(length))
    return Reply(values={"pin_lmk": encrypt_pin_under_lmk(lmk, pin, text(v, "account"))})


def _to_lmk(state: EmulatorState, v: Values, key: ClearKey) -> Reply:
    lmk = variant_lmk(state, v)
    pin = _decrypt_pin(state, v, key, text(v, "format"))
    return Reply(values={"pin_lmk": encrypt_pin_under_lmk(lmk, pin, _account12(v))})


def jc(state: EmulatorState, v: Values) -> Reply:
    """JC: translate a PIN block under a TPK to the PIN under LMK."""
    return _to_lmk(state, v, resolve_key(state, v, "tpk", "002", usages=TPK_USAGES))


def je(state: EmulatorState, v: Values) -> Reply:
    """JE: translate a PIN block under a ZPK to the PIN under LMK."""
    return _to_lmk(state, v, resolve_key(state, v, "zpk", "001", usages=ZPK_USAGES))


def jg(state: EmulatorState, v: Values) -> Reply:
    """JG: translate a PIN under LMK to a PIN block under a ZPK."""
    zpk = resolve_key(state, v, "zpk", "001", usages=ZPK_USAGES)
    fmt = text(v, "format")
    _check_format(state, fmt, zpk)
    pin = decrypt_pin_under_lmk(variant_lmk(state, v), text(v, "pin_lmk"), _account12(v))
    return Reply(values={"pin_block": _encrypt_pin(state, v, zpk, fmt, pin)})


# -- IBM 3624 --------------------------------------------------------------------------------


def _verify_ibm(state: EmulatorState, v: Values, pin_key: ClearKey) -> Reply:
    pvk = _pvk(state, v, "11")
    pin = _decrypt_pin(state, v, pin_key, text(v, "format"))
    _check_max_length(v, pin)
    check = _check_length(v)
    offset, table, data = _offset_digits(v), text(v, "decimalisation_table"), _validation_data(v)
    return _verified(lambda: verify_ibm3624(pvk, pin, offset, table, data, check_length=check))


def da(state: EmulatorState, v: Values) -> Reply:
    """DA: verify a PIN block under a TPK against an IBM 3624 offset."""
    return _verify_ibm(state, v, resolve_key(state, v, "tpk", "002", usages=TPK_USAGES))


def ea(state: EmulatorState, v: Values) -> Reply:
    """EA: verify a PIN block under a ZPK against an IBM 3624 offset."""
    return _verify_ibm(state, v, resolve_key(state, v, "zpk", "001", usages=ZPK_USAGES))


def de(state: EmulatorState, v: Values) -> Reply:
    """DE: the IBM 3624 offset (as many digits as the PIN) of a PIN under LMK."""
    pvk = _pvk(state, v, "10")
    check = _check_length(v)
    pin = decrypt_pin_under_lmk(variant_lmk(state, v), text(v, "pin_lmk"), text(v, "account"))
    if len(pin) < check:
        raise CryptoError("24", "PIN shorter than the check length")
    offset = ibm3624_offset(pvk, pin, text(v, "decimalisation_table"), _validation_data(v))
    return Reply(values={"offset": offset.ljust(12, "F")})


def ee(state: EmulatorState, v: Values) -> Reply:
    """EE: derive the PIN (natural PIN + offset) and return it under LMK."""
    pvk = _pvk(state, v, "10")
    check = _check_length(v)
    offset = _offset_digits(v)
    if not check <= len(offset) <= 12:
        raise CryptoError("24", "offset length is below the check length")
    lmk = variant_lmk(state, v)
    pin = ibm3624_pin_from_offset(pvk, offset, text(v, "decimalisation_table"), _validation_data(v))
    return Reply(values={"pin_lmk": encrypt_pin_under_lmk(lmk, pin, text(v, "account"))})


# -- Visa PVV --------------------------------------------------------------------------------


def _verify_pvv(state: EmulatorState, v: Values, pin_key: ClearKey) -> Reply:
    pvk = _pvk(state, v, "11")
    pin = _decrypt_pin(state, v, pin_key, text(v, "format"))
    account, pvki, pvv = _account12(v), text(v, "pvki"), text(v, "pvv")
    return _verified(lambda: verify_pvv(pvk, pin, account, pvki, pvv))


def dc(state: EmulatorState, v: Values) -> Reply:
    """DC: verify a PIN block under a TPK against a Visa PVV."""
    return _verify_pvv(state, v, resolve_key(state, v, "tpk", "002", usages=TPK_USAGES))


def ec(state: EmulatorState, v: Values) -> Reply:
    """EC: verify a PIN block under a ZPK against a Visa PVV."""
    return _verify_pvv(state, v, resolve_key(state, v, "zpk", "001", usages=ZPK_USAGES))


def dg(state: EmulatorState, v: Values) -> Reply:
    """DG: the Visa PVV of a PIN under LMK."""
    pvk = _pvk(state, v, "10")
    pin = decrypt_pin_under_lmk(variant_lmk(state, v), text(v, "pin_lmk"), text(v, "account"))
    return Reply(values={"pvv": generate_pvv(pvk, pin, text(v, "account"), text(v, "pvki"))})


def fw(state: EmulatorState, v: Values) -> Reply:
    """FW: the Visa PVV of a PIN block under a TPK (key type 002) or ZPK (001)."""
    role = FW_PIN_KEYS.get(text(v, "key_type"))
    if role is None:
        raise CryptoError("04", "key type must be 001 (ZPK) or 002 (TPK)")
    pin_key = resolve_key(state, v, "pin_key", role[0], usages=role[1])
    pvk = _pvk(state, v, "11")
    pin = _decrypt_pin(state, v, pin_key, text(v, "format"))
    return Reply(values={"pvv": generate_pvv(pvk, pin, _account12(v), text(v, "pvki"))})


HANDLERS: dict[str, Handler] = {
    "CA": ca,
    "CC": cc,
    "CI": ci,
    "G0": g0,
    "JA": ja,
    "JC": jc,
    "JE": je,
    "JG": jg,
    "DA": da,
    "EA": ea,
    "DC": dc,
    "EC": ec,
    "DE": de,
    "EE": ee,
    "DG": dg,
    "FW": fw,
}
