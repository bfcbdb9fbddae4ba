"""ISO 9564-1 PIN block encoding for the proxy's operations (runs inside node workers).

Thales format codes: ``01`` ISO-0, ``03`` Diebold/IBM, ``05`` ISO-1, ``47`` ISO-3. Blocks here are
clear 8-byte values; encryption is the caller's (a PKCS#11 key handle). Errors are
:class:`~hsmproxy.backend.pkcs11_backend.BackendError` codes: ``23`` format, ``24`` PIN length,
``20`` malformed block. Nothing here logs or formats a PIN.
"""

from __future__ import annotations

from collections.abc import Callable

from hsmproxy.backend.errors import BackendError

FORMATS = frozenset({"01", "03", "05", "47"})


def _account_field(account12: str) -> bytes:
    return bytes.fromhex("0000" + account12)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def encode(fmt: str, pin: str, account12: str, random_bytes: Callable[[int], bytes]) -> bytes:
    """The clear PIN block of ``pin`` in format ``fmt``; random fill comes from ``random_bytes``."""
    n = len(pin)
    if not 4 <= n <= 12 or not pin.isdigit():
        raise BackendError("24", "PIN length must be 4 to 12 digits")
    fill = 14 - n
    if fmt == "01":
        return _xor(bytes.fromhex(f"0{n:X}{pin}" + "F" * fill), _account_field(account12))
    if fmt == "03":
        return bytes.fromhex(pin + "F" * (16 - n))
    if fmt == "05":
        rnd = "".join("0123456789ABCDEF"[b & 0x0F] for b in random_bytes(fill))
        return bytes.fromhex(f"1{n:X}{pin}{rnd}")
    if fmt == "47":
        # Rejection sampling keeps the A-F fill uniform (b % 6 over 0..255 would not be).
        rnd = ""
        while len(rnd) < fill:
            rnd += "".join("ABCDEF"[b % 6] for b in random_bytes(2 * fill) if b < 252)
        rnd = rnd[:fill]
        return _xor(bytes.fromhex(f"3{n:X}{pin}{rnd}"), _account_field(account12))
    raise BackendError("23", "unsupported PIN block format")


def decode(fmt: str, block: bytes, account12: str) -> str:
    """The PIN in a clear PIN block of format ``fmt`` (validates control, length, fill)."""
    if fmt in ("01", "47"):
        text = _xor(block, _account_field(account12)).hex().upper()
        control, fill_chars = ("0", "F") if fmt == "01" else ("3", "ABCDEF")
    elif fmt == "05":
        text, control, fill_chars = block.hex().upper(), "1", "0123456789ABCDEF"
    elif fmt == "03":
        # Diebold/IBM: the PIN runs to the first F (or the end); everything after it must be F.
        text = block.hex().upper()
        n = text.find("F")
        n = 16 if n < 0 else n
        if not 4 <= n <= 12:
            raise BackendError("24", "PIN length must be 4 to 12 digits")
        pin = text[:n]
        if not pin.isdigit() or text[n:] != "F" * (16 - n):
            raise BackendError("20", "invalid PIN block")
        return pin
    else:
        raise BackendError("23", "unsupported PIN block format")
    if text[0] != control:
        raise BackendError("20", "invalid PIN block control field")
    n = int(text[1], 16)
    if not 4 <= n <= 12:
        raise BackendError("24", "PIN length must be 4 to 12 digits")
    pin, fill = text[2 : 2 + n], text[2 + n :]
    if not pin.isdigit() or any(c not in fill_chars for c in fill):
        raise BackendError("20", "invalid PIN block")
    return pin
