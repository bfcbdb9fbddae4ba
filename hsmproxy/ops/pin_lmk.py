"""PIN under LMK: JA JC JE JG, and the IBM 3624 / Visa PVV commands on it (DE EE DG).

hsmproxy's documented encoding (the reference emulator uses the same): the PIN under LMK is the
ISO 9564-1 format 0 block of the PIN and the 12-digit account, TDES-ECB under LMK pair 02-03 with
no variant — computed by the token object ``hsmproxy-lmk:<id>:02:0:-``, 16 hex characters. A value
that does not decode answers ``14``, a PIN length outside 4..12 ``24``, an LMK the request may not
use (or that is not a variant LMK) ``13``. Random PINs (JA) come from the token's generator.
Clear PINs exist only in this worker for one operation.
"""

from __future__ import annotations

from typing import Any

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops import card, pinblock
from hsmproxy.ops.pin import account12, check_format, decrypt_pin, encrypt_pin, field, pvk_key, role_key
from hsmproxy.ops.registry import OpResult, op


def lmk_pin_key(backend: Pkcs11Backend, a: dict[str, Any]) -> Any:
    """The LMK pair 02-03 object of the request's variant LMK (``13`` if none)."""
    if not a["lmk"]:
        raise BackendError("13", "LMK identifier not usable")
    return backend.lmk_object(f"hsmproxy-lmk:{a['lmk']}:02:0:-")


def encrypt_pin_lmk(backend: Pkcs11Backend, lmk: Any, pin: str, account: str) -> str:
    """``pin`` under the LMK for ``account`` (16 hex)."""
    return backend.ecb_encrypt(lmk, pinblock.encode("01", pin, account, backend.random)).hex().upper()


def decrypt_pin_lmk(backend: Pkcs11Backend, lmk: Any, value: str, account: str) -> str:
    """The clear PIN of a PIN under LMK (``14`` invalid, ``24`` length)."""
    try:
        block = bytes.fromhex(value)
    except ValueError:
        raise BackendError("14", "PIN under LMK is not hex") from None
    if len(block) != 8:
        raise BackendError("14", "PIN under LMK must be 16 hex characters")
    try:
        return pinblock.decode("01", backend.ecb_decrypt(lmk, block), account)
    except BackendError as exc:
        if exc.code == "20":
            raise BackendError("14", "PIN under LMK is invalid") from None
        raise


@op("random_pin")
def random_pin(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """JA: a random PIN of the requested length, under the LMK."""
    length = int(field(a, "pin_length"))
    if not 4 <= length <= 12:
        raise BackendError("24", "PIN length must be 04-12")
    lmk = lmk_pin_key(backend, a)
    digits: list[str] = []
    while len(digits) < length:
        digits += [str(b % 10) for b in backend.random(2 * length) if b < 250]
    return "00", {"pin_lmk": encrypt_pin_lmk(backend, lmk, "".join(digits[:length]), field(a, "account"))}


@op("pin_to_lmk")
def pin_to_lmk(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """JC, JE: a PIN block under a TPK/ZPK to the PIN under LMK."""
    key = role_key(backend, a, a["pin_key"])
    lmk = lmk_pin_key(backend, a)
    pin = decrypt_pin(backend, a, key, field(a, "format"))
    return "00", {"pin_lmk": encrypt_pin_lmk(backend, lmk, pin, account12(a))}


@op("pin_from_lmk")
def pin_from_lmk(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """JG: a PIN under LMK to a PIN block under a ZPK."""
    zpk = role_key(backend, a, a["pin_key"])
    fmt = field(a, "format")
    check_format(a, fmt, zpk)
    lmk = lmk_pin_key(backend, a)
    pin = decrypt_pin_lmk(backend, lmk, field(a, "pin_lmk"), account12(a))
    return "00", {"pin_block": encrypt_pin(backend, a, zpk, fmt, pin)}


@op("ibm_offset")
def ibm_offset(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """DE: the IBM 3624 offset (as many digits as the PIN, F-padded to 12) of a PIN under LMK."""
    pvk = pvk_key(backend, a, "10")
    check = card.check_length(field(a, "check_length"))
    account = field(a, "account")
    pin = decrypt_pin_lmk(backend, lmk_pin_key(backend, a), field(a, "pin_lmk"), account)
    if len(pin) < check:
        raise BackendError("24", "PIN shorter than the check length")
    data = card.validation_data(field(a, "validation_data"), account)
    offset = card.ibm_offset(backend, pvk.handle, pin, field(a, "decimalisation_table"), data)
    return "00", {"offset": offset.ljust(12, "F")}


@op("ibm_pin")
def ibm_pin(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """EE: the PIN given by an IBM 3624 offset (natural PIN + offset), under the LMK."""
    pvk = pvk_key(backend, a, "10")
    check = card.check_length(field(a, "check_length"))
    offset = card.offset_digits(field(a, "offset"))
    if not check <= len(offset) <= 12:
        raise BackendError("24", "offset length is below the check length")
    lmk = lmk_pin_key(backend, a)
    account = field(a, "account")
    data = card.validation_data(field(a, "validation_data"), account)
    pin = card.ibm_pin_from_offset(backend, pvk.handle, offset, field(a, "decimalisation_table"), data)
    return "00", {"pin_lmk": encrypt_pin_lmk(backend, lmk, pin, account)}


@op("pvv_from_lmk")
def pvv_from_lmk(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """DG: the Visa PVV of a PIN under LMK."""
    pvk = pvk_key(backend, a, "10")
    account = field(a, "account")
    pin = decrypt_pin_lmk(backend, lmk_pin_key(backend, a), field(a, "pin_lmk"), account)
    return "00", {"pvv": card.pvv(backend, pvk.handle, pin, account, field(a, "pvki"))}
