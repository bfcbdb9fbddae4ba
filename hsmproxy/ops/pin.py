"""PIN operations: translation (CA CC), IBM 3624 and Visa PVV verification (DA EA DC EC), FW.

Arguments (from :mod:`hsmproxy.commands.pin`): ``fields`` (the parsed request, text), ``lmk``
(variant LMK id, ``""`` when the request may not use it: ``13``), ``kb_lmk`` (key-block LMK id),
``disabled`` (disabled PIN block formats) and the key roles. Error precedence follows the
reference emulator: keys first (``10``/``11`` parity, ``29`` key-block usage), then the destination
format, the source format (``23`` unknown or not fitting the key's algorithm, ``69`` disabled),
the PIN block (``20``, ``24``, ``22``), the maximum PIN length (``24``).

On PKCS#11: TDES PIN blocks are DES3-ECB under the key handle; ISO 9564-1 format 4 (``48``, AES
key blocks only) is AES-ECB on the handle, ``AES_K(AES_K(PIN field) XOR PAN field)``, bound to the
full PAN of the request's ``pan`` field; IBM 3624 and PVV encryptions are DES3-ECB under the PVK
handle (a single-length PVK is a K||K object). Clear PIN blocks exist only here, only during one
operation, and never appear in messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pkcs11 import Mechanism

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops import card, pinblock
from hsmproxy.ops.keyref import WorkingKey, resolve_working_key
from hsmproxy.ops.registry import OpResult, op

ISO4 = "48"
#: Key-block usages accepted per key role.
USAGES: dict[str, frozenset[str]] = {
    "TPK": frozenset({"P0", "71"}),
    "ZPK": frozenset({"P0", "72"}),
    "PVK": frozenset({"V0", "V1", "V2"}),
    "BDK": frozenset({"B0"}),
    "CVK": frozenset({"C0"}),
}
#: A key role as the front sends it: (field, key type, usage role, parity error).
Role = tuple[str, str, str, str]


def field(a: dict[str, Any], name: str) -> str:
    """A request field's text."""
    return str(a["fields"][name])


def role_key(backend: Pkcs11Backend, a: dict[str, Any], role: Role) -> WorkingKey:
    """Resolve the key of ``role`` (field, key type, usage role, parity error)."""
    name, key_type, usage, parity = role
    return resolve_working_key(
        backend, a["lmk"], a["kb_lmk"], key_type, field(a, name), parity_error=parity, usages=USAGES[usage]
    )


def pvk_key(backend: Pkcs11Backend, a: dict[str, Any], parity: str) -> WorkingKey:
    """The PVK (type 002, usages V0-V2); an AES PVK answers ``27``."""
    key = role_key(backend, a, ("pvk", "002", "PVK", parity))
    if key.algorithm != "T":
        raise BackendError("27", "PVK must be a DES/TDES key")
    return key


def account_from_pan(pan: str) -> str:
    """The 12 rightmost PAN digits excluding the check digit (``22`` unless 2-19 digits)."""
    if not (2 <= len(pan) <= 19 and pan.isdecimal() and pan.isascii()):
        raise BackendError("22", "PAN must be 2-19 decimal digits")
    return pan[:-1][-12:].rjust(12, "0")


def account12(a: dict[str, Any]) -> str:
    """The 12-digit account: given, or derived from the full PAN of an ISO-4 request."""
    return account_from_pan(field(a, "pan")) if "pan" in a["fields"] else field(a, "account")


def check_format(a: dict[str, Any], fmt: str, key: WorkingKey) -> None:
    """``23`` unknown format or format not fitting the key's algorithm, ``69`` disabled."""
    if fmt != ISO4 and fmt not in pinblock.FORMATS:
        raise BackendError("23", "unsupported PIN block format")
    if fmt in a["disabled"]:
        raise BackendError("69", "PIN block format disabled")
    if (fmt == ISO4) != (key.algorithm == "A"):
        raise BackendError("23", "PIN block format does not fit the key's algorithm")


def _decode(fmt: str, block: bytes, account: str) -> str:
    """Decode a clear TDES PIN block (Diebold as payShield: PIN digits up to the first ``F``)."""
    if fmt != "03":
        return pinblock.decode(fmt, block, account)
    text = block.hex().upper()
    n = text.find("F")
    n = 16 if n < 0 else n
    if not 4 <= n <= 12:
        raise BackendError("24", "PIN length must be 4 to 12 digits")
    if not text[:n].isdigit() or text[n:] != "F" * (16 - n):
        raise BackendError("20", "invalid PIN block")
    return text[:n]


def _iso4_pan_field(pan: str) -> bytes:
    if not (1 <= len(pan) <= 19 and pan.isdecimal() and pan.isascii()):
        raise BackendError("22", "PAN must be 1-19 decimal digits")
    digits = pan.rjust(12, "0")
    return bytes.fromhex(f"{len(digits) - 12:X}{digits}".ljust(32, "0"))


def _xor(x: bytes, y: bytes) -> bytes:
    return bytes(p ^ q for p, q in zip(x, y, strict=True))


def _aes(handle: Any, data: bytes, *, decrypt: bool = False) -> bytes:
    if decrypt:
        return bytes(handle.decrypt(data, mechanism=Mechanism.AES_ECB))
    return bytes(handle.encrypt(data, mechanism=Mechanism.AES_ECB))


def decrypt_pin(backend: Pkcs11Backend, a: dict[str, Any], key: WorkingKey, fmt: str) -> str:
    """The clear PIN of the request's ``pin_block`` under ``key`` in format ``fmt``."""
    check_format(a, fmt, key)
    try:
        block = bytes.fromhex(field(a, "pin_block"))
    except ValueError:
        raise BackendError("20", "PIN block is not hex") from None
    if fmt == ISO4:
        if len(block) != 16:
            raise BackendError("20", "ISO-4 PIN block must be 16 bytes")
        pan_field = _iso4_pan_field(field(a, "pan"))
        pin_field = _aes(key.handle, _xor(_aes(key.handle, block, decrypt=True), pan_field), decrypt=True)
        text = pin_field[:8].hex().upper()
        if text[0] != "4":
            raise BackendError("20", "invalid PIN block control field")
        n = int(text[1], 16)
        if not 4 <= n <= 12:
            raise BackendError("24", "PIN length must be 4 to 12 digits")
        if not text[2 : 2 + n].isdigit() or text[2 + n :] != "A" * (14 - n):
            raise BackendError("20", "invalid PIN block")
        return text[2 : 2 + n]
    clear = backend.ecb_decrypt(key.handle, block)
    return _decode(fmt, clear, account12(a))


def encrypt_pin(backend: Pkcs11Backend, a: dict[str, Any], key: WorkingKey, fmt: str, pin: str) -> str:
    """``pin`` as a PIN block of format ``fmt`` under ``key`` (hex); random fill from the token."""
    check_format(a, fmt, key)
    if fmt == ISO4:
        pan_field = _iso4_pan_field(field(a, "pan"))
        pin_field = bytes.fromhex(f"4{len(pin):X}{pin}" + "A" * (14 - len(pin))) + backend.random(8)
        return _aes(key.handle, _xor(_aes(key.handle, pin_field), pan_field)).hex().upper()
    block = pinblock.encode(fmt, pin, account12(a), backend.random)
    return backend.ecb_encrypt(key.handle, block).hex().upper()


def check_max_length(a: dict[str, Any], pin: str) -> None:
    """``24`` when the maximum PIN length is outside 4..12 or the PIN is longer."""
    maximum = int(field(a, "max_pin_length"))
    if not 4 <= maximum <= 12 or len(pin) > maximum:
        raise BackendError("24", "PIN longer than the maximum PIN length")


def translate(
    backend: Pkcs11Backend, a: dict[str, Any], src: WorkingKey, dst: WorkingKey, src_fmt: str
) -> OpResult:
    """Decrypt under ``src`` (format ``src_fmt``), re-encode, encrypt under ``dst``."""
    dst_fmt = field(a, "destination_format")
    check_format(a, dst_fmt, dst)
    pin = decrypt_pin(backend, a, src, src_fmt)
    if "max_pin_length" in a["fields"]:
        check_max_length(a, pin)
    block = encrypt_pin(backend, a, dst, dst_fmt, pin)
    return "00", {"pin_length": f"{len(pin):02d}", "pin_block": block, "destination_format": dst_fmt}


def verified(check: Callable[[], bool]) -> OpResult:
    """``00`` when ``check()`` holds, else ``01`` (verification failed)."""
    return ("00", {}) if check() else ("01", {})


@op("translate_pin")
def translate_pin(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """CA, CC: translate a PIN block between keys and formats."""
    src = role_key(backend, a, a["source"])
    dst = role_key(backend, a, a["destination"])
    return translate(backend, a, src, dst, field(a, "source_format"))


@op("verify_pin_ibm")
def verify_pin_ibm(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """DA, EA: verify a PIN block against an IBM 3624 offset (leftmost check-length digits)."""
    pin_key = role_key(backend, a, a["pin_key"])
    pvk = pvk_key(backend, a, "11")
    pin = decrypt_pin(backend, a, pin_key, field(a, "format"))
    check_max_length(a, pin)
    check = card.check_length(field(a, "check_length"))
    offset = card.offset_digits(field(a, "offset"))
    table = field(a, "decimalisation_table")
    data = card.validation_data(field(a, "validation_data"), account12(a))
    if len(pin) < check:
        raise BackendError("24", "check length is longer than the PIN")
    if len(offset) < check:
        raise BackendError("15", "offset is shorter than the check length")
    expected = card.ibm_pin_from_offset(backend, pvk.handle, offset[:check], table, data)
    return verified(lambda: card.equal(expected, pin[:check]))


@op("verify_pin_pvv")
def verify_pin_pvv(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """DC, EC: verify a PIN block against a Visa PVV."""
    pin_key = role_key(backend, a, a["pin_key"])
    pvk = pvk_key(backend, a, "11")
    pin = decrypt_pin(backend, a, pin_key, field(a, "format"))
    pvv = card.pvv(backend, pvk.handle, pin, account12(a), field(a, "pvki"))
    return verified(lambda: card.equal(pvv, field(a, "pvv")))


@op("pvv_from_pin_block")
def pvv_from_pin_block(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """FW: the Visa PVV of a PIN block under a TPK or ZPK."""
    pin_key = role_key(backend, a, a["pin_key"])
    pvk = pvk_key(backend, a, "11")
    pin = decrypt_pin(backend, a, pin_key, field(a, "format"))
    return "00", {"pvv": card.pvv(backend, pvk.handle, pin, account12(a), field(a, "pvki"))}


@op("lmk_check")
def lmk_check(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """NC: the check value of LMK pair 00-01 (TDES-ECB of zeros), computed by the LMK object.

    Also the nodes' health check, so it uses the token object itself, not the worker's session copy:
    a token that vanished under the worker fails here.
    """
    lmk_id = a["lmk_id"]
    try:
        obj = backend.lmk_object(f"hsmproxy-lmk:{lmk_id}:00:0:-", token=True)
        check = backend.ecb_encrypt(obj, bytes(8))
    except BackendError:
        obj = backend.lmk_object(f"hsmproxy-kblmk:{lmk_id}:lmk", token=True)
        check = backend.aes_cmac(obj, bytes(16))[:8]
    return "00", {"lmk_check": check.hex().upper(), "firmware": a["firmware"]}
