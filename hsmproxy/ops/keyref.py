"""Resolving key references (LMK id, key type, cryptogram) to PKCS#11 handles in a worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend

#: Key type code ``VPP`` pair code -> LMK pair (even number, as the token object label uses it).
PAIR_OF_TYPE = {
    "00": "04", "01": "06", "02": "14", "03": "16", "04": "18", "06": "22", "07": "24",
    "08": "26", "09": "28", "0A": "30", "0B": "32", "0C": "34", "0D": "36",
}  # fmt: skip
SCHEME_HEX = {"": 16, "Z": 16, "U": 32, "X": 32, "T": 48, "Y": 48}


#: Key-type variants payShield defines per pair code (PROTOCOL.md); other codes answer ``04``.
VARIANTS_OF_TYPE = {
    "00": "01234", "01": "0", "02": "01246", "03": "01", "04": "0", "06": "0", "07": "123456789",
    "08": "0", "09": "012345678", "0A": "0", "0B": "0", "0C": "01", "0D": "0",
}  # fmt: skip


def pair_and_variant(key_type: str) -> tuple[str, int]:
    """The LMK pair and key-type variant of a 3-character key type code; ``04`` if it is not one."""
    pp = key_type[1:].upper()
    pair = PAIR_OF_TYPE.get(pp)
    if len(key_type) != 3 or pair is None or key_type[0] not in VARIANTS_OF_TYPE[pp]:
        raise BackendError("04", "invalid key type code")
    return pair, int(key_type[0])


def key_handle(
    backend: Pkcs11Backend, lmk_id: str, key_type: str, cryptogram: str, parity_error: str = "10"
) -> Any:
    """The handle of a working key given as ``[scheme]hex`` under LMK ``lmk_id`` and type ``VPP``."""
    pair, _variant = pair_and_variant(key_type)
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


# -- variant or key-block working keys (PIN, card and DUKPT families) ---------------------------

#: Key-block usages accepted where a command expects a variant key type (by its pair code).
KEYBLOCK_USAGES_BY_PAIR: dict[str, frozenset[str]] = {
    "00": frozenset({"K0", "K1", "52"}),
    "01": frozenset({"P0", "72"}),
    "02": frozenset({"P0", "71", "V1", "V2", "C0", "51"}),
    "03": frozenset({"M0", "M1", "M3", "M5", "M6", "M7"}),
    "08": frozenset({"M0", "M1", "M3", "M5", "M6", "M7"}),
    "09": frozenset({"B0", "B1", "E0"}),
    "0A": frozenset({"D0", "22"}),
    "0B": frozenset({"D0", "21", "23"}),
}


@dataclass(frozen=True, slots=True)
class WorkingKey:
    """A resolved working key: handle, algorithm ``T``/``A``, byte length (0 if unknown), key-block header."""

    handle: Any
    algorithm: str
    length: int = 0
    header: dict[str, str] | None = None


def _keyblock_lmk_ready(backend: Pkcs11Backend, keyblock_lmk: str) -> None:
    """``13`` unless ``keyblock_lmk`` names a key-block LMK on this node (checked before the block)."""
    if not keyblock_lmk:
        raise BackendError("13", "no key-block LMK selected")
    backend.lmk_object(f"hsmproxy-kblmk:{keyblock_lmk}:kbek")


def _check_usage(header: dict[str, str], key_type: str, usages: frozenset[str] | None) -> None:
    allowed = usages if usages is not None else KEYBLOCK_USAGES_BY_PAIR.get(key_type[1:].upper(), frozenset())
    if header["usage"] not in allowed:
        raise BackendError("29", "key usage not permitted for this function")


def _variant_cryptogram(key_type: str, cryptogram: str) -> tuple[str, int, str, int]:
    """(pair, variant, normalised cryptogram, key bytes) of a variant key reference."""
    pair, _variant = pair_and_variant(key_type)
    scheme = cryptogram[0] if cryptogram[:1] in ("U", "T", "X", "Y", "Z") else ""
    body = cryptogram[1:] if scheme else cryptogram
    if len(body) == 32 and not scheme:
        scheme, cryptogram = "X", "X" + body
    if len(body) != SCHEME_HEX[scheme]:
        raise BackendError("27", "key length does not match the key scheme")
    return pair, int(key_type[0]), cryptogram, len(body) // 2


def resolve_working_key(
    backend: Pkcs11Backend,
    variant_lmk: str,
    keyblock_lmk: str,
    key_type: str,
    cryptogram: str,
    *,
    parity_error: str = "10",
    usages: frozenset[str] | None = None,
) -> WorkingKey:
    """A handle for a variant key (type ``VPP`` under ``variant_lmk``) or an ``S`` key block.

    Key blocks are verified under ``keyblock_lmk`` and their usage must be in ``usages`` (default:
    by the pair of ``key_type``), else ``29``; ``R`` (TR-31) is not a key under LMK: ``26``. An
    empty LMK id means the request may not use that LMK: ``13``.
    """
    if cryptogram.startswith("S"):
        _keyblock_lmk_ready(backend, keyblock_lmk)
        header, handle = backend.keyblock_key(keyblock_lmk, cryptogram)
        _check_usage(header, key_type, usages)
        return WorkingKey(handle, "A" if header["algorithm"] == "A" else "T", 0, header)
    if cryptogram.startswith("R"):
        raise BackendError("26", "a TR-31 key block is not a key under LMK")
    if not variant_lmk:
        raise BackendError("13", "LMK identifier not usable")
    length = _variant_cryptogram(key_type, cryptogram)[3]
    return WorkingKey(key_handle(backend, variant_lmk, key_type, cryptogram, parity_error), "T", length)


def clear_working_key(
    backend: Pkcs11Backend,
    variant_lmk: str,
    keyblock_lmk: str,
    key_type: str,
    cryptogram: str,
    *,
    parity_error: str = "10",
    usages: frozenset[str] | None = None,
) -> tuple[bytearray, str, dict[str, str] | None]:
    """(clear key, algorithm, header) like :func:`resolve_working_key`, for fallback compositions.

    The caller wipes the clear key. Variant keys must have odd parity (``parity_error``).
    """
    if cryptogram.startswith("S"):
        _keyblock_lmk_ready(backend, keyblock_lmk)
        header, clear = backend.keyblock_clear(keyblock_lmk, cryptogram)
        try:
            _check_usage(header, key_type, usages)
        except BackendError:
            clear[:] = bytes(len(clear))
            raise
        return clear, "A" if header["algorithm"] == "A" else "T", header
    if cryptogram.startswith("R"):
        raise BackendError("26", "a TR-31 key block is not a key under LMK")
    if not variant_lmk:
        raise BackendError("13", "LMK identifier not usable")
    pair, variant, normalised, _ = _variant_cryptogram(key_type, cryptogram)
    clear = backend.decrypt_cryptogram(variant_lmk, pair, variant, normalised)
    if not all(bin(b).count("1") % 2 for b in clear):
        clear[:] = bytes(len(clear))
        raise BackendError(parity_error, "key parity error")
    return clear, "T", None


def resolve_key_halves(
    backend: Pkcs11Backend, variant_lmk: str, key_type: str, cryptogram: str, parity_error: str = "10"
) -> tuple[Any, ...]:
    """Single-length handles (cached) for each 8-byte part of a variant key (CVV, retail MAC)."""
    if not variant_lmk:
        raise BackendError("13", "LMK identifier not usable")
    pair, variant, normalised, _ = _variant_cryptogram(key_type, cryptogram)
    try:
        return backend.variant_key_halves(variant_lmk, pair, variant, normalised)
    except BackendError as exc:
        if exc.code == "10":
            raise BackendError(parity_error, "key parity error") from None
        raise
