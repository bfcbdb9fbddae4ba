"""Resolving key references (LMK id, key type, cryptogram) to PKCS#11 handles in a worker."""

from __future__ import annotations

from typing import Any

from hsmproxy.backend.pkcs11_backend import BackendError, Pkcs11Backend

#: Key type code ``VPP`` pair code -> LMK pair (even number, as the token object label uses it).
PAIR_OF_TYPE = {
    "00": "04", "01": "06", "02": "14", "03": "16", "04": "18", "06": "22", "07": "24",
    "08": "26", "09": "28", "0A": "30", "0B": "32", "0C": "34", "0D": "36",
}  # fmt: skip
SCHEME_HEX = {"": 16, "Z": 16, "U": 32, "X": 32, "T": 48, "Y": 48}


def key_handle(
    backend: Pkcs11Backend, lmk_id: str, key_type: str, cryptogram: str, parity_error: str = "10"
) -> Any:
    """The handle of a working key given as ``[scheme]hex`` under LMK ``lmk_id`` and type ``VPP``."""
    pair = PAIR_OF_TYPE.get(key_type[1:].upper())
    if pair is None or not key_type[0].isdigit():
        raise BackendError("04", "invalid key type code")
    scheme = cryptogram[0] if cryptogram[:1] in ("U", "T", "X", "Y", "Z") else ""
    body = cryptogram[1:] if scheme else cryptogram
    if len(body) == 32 and not scheme:
        scheme, cryptogram = "X", "X" + body
    if cryptogram[:1] in ("S", "R"):
        raise BackendError("68", "key blocks are not supported by the proxy yet")
    if len(body) != SCHEME_HEX[scheme]:
        raise BackendError("27", "key length does not match the key scheme")
    try:
        return backend.variant_key(lmk_id, pair, int(key_type[0]), cryptogram)
    except BackendError as exc:
        if exc.code == "10":
            raise BackendError(parity_error, "key parity error") from None
        raise
