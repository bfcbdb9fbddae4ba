"""Card verification compositions on PKCS#11: Visa CVV (CW, CY), Visa PVV and IBM 3624 helpers.

- CVV: block = PAN ‖ expiry ‖ service code, zero-padded to 32 digits; ``DES_A(B1) XOR B2``, then
  TDES under A‖B; the first 3 decimal digits of the result. SoftHSM2 has no single-DES mechanism,
  so the CVK is brought in as two single-length objects (A‖A, B‖B) — ``variant_key_halves`` for
  variant CVKs, or session objects made from a key block's clear value (fallback) — and the TDES
  step is E_A(D_B(E_A(x))) on those halves. CVK: type 402 or a key block with usage ``C0``; not a
  double-length TDES key: ``27``; ``01`` (CY) mismatch.
- PVV: TSP = the account's 11 rightmost digits ‖ PVKI ‖ 4 leftmost PIN digits, DES3-ECB under the
  PVK handle; the first 4 decimal digits, completed by the letters A-F as 0-5.
- IBM 3624: natural PIN = DES3-ECB(PVK, validation data padded with ``F``), decimalised; offset
  = PIN - natural PIN per digit mod 10. ``25`` decimalisation table, ``15`` validation data,
  offset or check length, ``24`` PIN/offset lengths.
"""

from __future__ import annotations

import hmac
from typing import Any

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops.keyref import clear_working_key, resolve_key_halves
from hsmproxy.ops.registry import OpResult, op

_HEX = frozenset("0123456789ABCDEF")
CVK_USAGES = frozenset({"C0"})


def equal(x: str, y: str) -> bool:
    """Constant-time comparison of two digit strings."""
    return hmac.compare_digest(x.encode(), y.encode())


def _digits(text: str) -> bool:
    return text.isdecimal() and text.isascii()


# -- IBM 3624 ------------------------------------------------------------------------------------


def check_length(text: str) -> int:
    """The check length, 4..12 (``15``)."""
    check = int(text)
    if not 4 <= check <= 12:
        raise BackendError("15", "check length must be 04-12")
    return check


def offset_digits(text: str) -> str:
    """The offset's digits (F-padded on the right; ``15`` otherwise)."""
    digits = text.upper().rstrip("F")
    if not _digits(digits):
        raise BackendError("15", "offset must be decimal digits padded with F")
    return digits


def validation_data(template: str, account12: str) -> str:
    """payShield validation data: the first ``N`` becomes the account's last 5 digits (``15``)."""
    data = template.upper().replace("N", account12[-5:], 1)
    if not 1 <= len(data) <= 16 or any(c not in _HEX for c in data):
        raise BackendError("15", "invalid PIN validation data")
    return data


def ibm_natural_pin(backend: Pkcs11Backend, pvk: Any, table: str, data: str, length: int) -> str:
    """The IBM 3624 natural PIN of ``length`` digits."""
    if len(table) != 16 or not _digits(table):
        raise BackendError("25", "decimalisation table must be 16 decimal digits")
    encrypted = backend.ecb_encrypt(pvk, bytes.fromhex(data.ljust(16, "F"))).hex().upper()
    return encrypted.translate(str.maketrans("0123456789ABCDEF", table))[:length]


def ibm_offset(backend: Pkcs11Backend, pvk: Any, pin: str, table: str, data: str) -> str:
    """The IBM 3624 offset of ``pin`` (as many digits as the PIN)."""
    natural = ibm_natural_pin(backend, pvk, table, data, len(pin))
    return "".join(str((int(p) - int(n)) % 10) for p, n in zip(pin, natural, strict=True))


def ibm_pin_from_offset(backend: Pkcs11Backend, pvk: Any, offset: str, table: str, data: str) -> str:
    """Natural PIN + offset, digit by digit modulo 10."""
    natural = ibm_natural_pin(backend, pvk, table, data, len(offset))
    return "".join(str((int(n) + int(o)) % 10) for n, o in zip(natural, offset, strict=True))


# -- Visa PVV ------------------------------------------------------------------------------------


def pvv(backend: Pkcs11Backend, pvk: Any, pin: str, account12: str, pvki: str) -> str:
    """The 4-digit Visa PVV of ``pin`` for the 12-digit account and PVKI."""
    tsp = backend.ecb_encrypt(pvk, bytes.fromhex(account12[1:] + pvki + pin[:4])).hex().upper()
    digits = [c for c in tsp if c.isdigit()]
    letters = [str(int(c, 16) - 10) for c in tsp if not c.isdigit()]
    return "".join((digits + letters)[:4])


# -- Visa CVV ------------------------------------------------------------------------------------


def _cvv_halves(backend: Pkcs11Backend, a: dict[str, Any]) -> tuple[Any, Any, bool]:
    """(CVK A, CVK B, owned): cached variant halves, or session objects from a key block's clear value."""
    cvk = str(a["fields"]["cvk"])
    if not cvk.startswith(("S", "R")):
        parts = resolve_key_halves(backend, a["lmk"], "402", cvk)
        if len(parts) != 2:
            raise BackendError("27", "CVK must be a double-length TDES key")
        return parts[0], parts[1], False
    clear, algorithm, _ = clear_working_key(backend, a["lmk"], a["kb_lmk"], "402", cvk, usages=CVK_USAGES)
    try:
        if algorithm != "T" or len(clear) != 16:
            raise BackendError("27", "CVK must be a double-length TDES key")
        return backend.create_session_key(clear[:8]), backend.create_session_key(clear[8:]), True
    finally:
        clear[:] = bytes(len(clear))


def _cvv(backend: Pkcs11Backend, a: dict[str, Any]) -> str:
    key_a, key_b, owned = _cvv_halves(backend, a)
    fields = a["fields"]
    try:
        block = bytes.fromhex(f"{fields['pan']}{fields['expiry']}{fields['service_code']}".ljust(32, "0"))
        r = bytes(x ^ y for x, y in zip(backend.ecb_encrypt(key_a, block[:8]), block[8:], strict=True))
        r = backend.ecb_encrypt(key_a, backend.ecb_decrypt(key_b, backend.ecb_encrypt(key_a, r)))
    finally:
        if owned:
            key_a.destroy()
            key_b.destroy()
    return "".join(c for c in r.hex() if c.isdigit())[:3]


@op("cvv_generate")
def cvv_generate(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """CW: the Visa CVV of PAN, expiry date and service code."""
    return "00", {"cvv": _cvv(backend, a)}


@op("cvv_verify")
def cvv_verify(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """CY: verify a Visa CVV (``01`` when it does not match)."""
    return ("00", {}) if equal(_cvv(backend, a), str(a["fields"]["cvv"])) else ("01", {})
