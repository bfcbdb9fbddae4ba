"""PIN operations: translate a PIN block between keys and formats (CA, CC)."""

from __future__ import annotations

from typing import Any

from hsmproxy.backend.pkcs11_backend import BackendError, Pkcs11Backend
from hsmproxy.ops import pinblock
from hsmproxy.ops.keyref import key_handle
from hsmproxy.ops.registry import OpResult, op


def _check_format(fmt: str, disabled: frozenset[str]) -> None:
    if fmt not in pinblock.FORMATS:
        raise BackendError("23", "unsupported PIN block format")
    if fmt in disabled:
        raise BackendError("69", "PIN block format disabled")


@op("translate_pin")
def translate_pin(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """Decrypt a PIN block under the source key, re-encode it, encrypt under the destination key."""
    disabled = frozenset(a.get("disabled_formats", ()))
    _check_format(a["source_format"], disabled)
    _check_format(a["destination_format"], disabled)
    src = key_handle(backend, a["lmk_id"], a["source_type"], a["source_key"], "10")
    dst = key_handle(backend, a["lmk_id"], a["destination_type"], a["destination_key"], "11")
    try:
        block = bytes.fromhex(a["pin_block"])
    except ValueError:
        raise BackendError("20", "PIN block is not hex") from None
    clear = backend.ecb_decrypt(src, block)
    pin = pinblock.decode(a["source_format"], clear, a["account"])
    max_len = int(a["max_pin_length"])
    if not 4 <= max_len <= 12 or len(pin) > max_len:
        raise BackendError("24", "PIN longer than the maximum")
    out = pinblock.encode(a["destination_format"], pin, a["account"], backend.random)
    encrypted = backend.ecb_encrypt(dst, out)
    return "00", {
        "pin_length": f"{len(pin):02d}",
        "pin_block": encrypted.hex().upper(),
        "destination_format": a["destination_format"],
    }


@op("lmk_check")
def lmk_check(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """NC: the check value of LMK pair 00-01 (TDES-ECB of zeros), computed by the LMK object."""
    lmk_id = a["lmk_id"]
    try:
        obj = backend.lmk_object(f"hsmproxy-lmk:{lmk_id}:00:0:-")
        check = backend.ecb_encrypt(obj, bytes(8))
    except BackendError:
        obj = backend.lmk_object(f"hsmproxy-kblmk:{lmk_id}:lmk")
        check = backend.aes_cmac(obj, bytes(16))[:8]
    return "00", {"lmk_check": check.hex().upper(), "firmware": a["firmware"]}
