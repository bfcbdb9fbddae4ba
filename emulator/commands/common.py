"""Helpers every emulator command family shares: field access, LMK selection, keys under LMK."""

from __future__ import annotations

from dataclasses import dataclass

from emulator.crypto.errors import CryptoError
from emulator.crypto.keyblock import KeyBlockHeader, KeyBlockLmk, unwrap_key_block
from emulator.crypto.lmk import VariantLmk, decrypt_key_under_lmk
from emulator.state import EmulatorState
from protocols.hostcmd.fields import Values


def text(v: Values, name: str, default: str | None = None) -> str:
    """A text field's value (``default`` when absent; absent without default is a bug)."""
    value = v.get(name)
    if value is None:
        if default is None:
            raise KeyError(name)
        return default
    return value if isinstance(value, str) else value.decode("latin-1")


def raw(v: Values, name: str) -> bytes:
    """A binary field's value as bytes."""
    value = v[name]
    return value if isinstance(value, bytes) else value.encode("latin-1")


def hex_bytes(v: Values, name: str, error: str = "15") -> bytes:
    """A hex text field decoded to bytes (``error`` when it is not hex)."""
    try:
        return bytes.fromhex(text(v, name))
    except ValueError:
        raise CryptoError(error, f"{name} is not hexadecimal") from None


# -- LMKs and keys under LMK ---------------------------------------------------------------------

#: Key-block usages accepted where a command expects a variant key type (by its pair code).
USAGES_BY_PAIR: dict[str, frozenset[str]] = {
    "00": frozenset({"K0", "K1", "52"}),  # ZMK / KEK
    "01": frozenset({"P0", "72"}),  # ZPK
    "02": frozenset({"P0", "71", "V1", "V2", "C0", "51"}),  # TPK, TMK, PVK, CVK
    "03": frozenset({"M0", "M1", "M3", "M5", "M6", "M7"}),  # TAK
    "08": frozenset({"M0", "M1", "M3", "M5", "M6", "M7"}),  # ZAK
    "09": frozenset({"B0", "B1", "E0"}),  # BDK, MK-AC
    "0A": frozenset({"D0", "22"}),  # ZEK
    "0B": frozenset({"D0", "21", "23"}),  # DEK / TEK
}


@dataclass(frozen=True, slots=True)
class ClearKey:
    """A working key recovered from under an LMK: clear bytes, algorithm and key-block header."""

    key: bytes
    algorithm: str  # "T" (DES/TDES) or "A" (AES)
    header: KeyBlockHeader | None = None


def variant_lmk(state: EmulatorState, v: Values) -> VariantLmk:
    """The variant LMK the command selects with ``%LL`` (default LMK otherwise)."""
    lmk_id = text(v, "lmk_id", state.default_lmk_id)
    lmk = state.variant_lmks.get(lmk_id)
    if lmk is None:
        raise CryptoError("13", "LMK identifier is not a loaded variant LMK")
    return lmk


def keyblock_lmk(state: EmulatorState, v: Values) -> KeyBlockLmk:
    """The key-block LMK: the one ``%LL`` names, else the lowest-numbered key-block LMK."""
    lmk_id = v.get("lmk_id")
    if lmk_id is None:
        if not state.keyblock_lmks:
            raise CryptoError("13", "no key-block LMK is loaded")
        return state.keyblock_lmks[min(state.keyblock_lmks)]
    lmk = state.keyblock_lmks.get(text(v, "lmk_id"))
    if lmk is None:
        raise CryptoError("13", "LMK identifier is not a loaded key-block LMK")
    return lmk


def resolve_key(
    state: EmulatorState,
    v: Values,
    field: str,
    key_type: str,
    *,
    parity_error: str = "10",
    usages: frozenset[str] | None = None,
) -> ClearKey:
    """Decrypt the key in ``field`` from under the LMK.

    Variant keys (schemes none/Z/U/T/X/Y) use the key type ``VPP``'s pair and variant and must
    have odd parity (``parity_error`` otherwise). Key blocks (``S``) are verified under the
    key-block LMK and their usage must be one ``usages`` allows (default: by the pair code of
    ``key_type``), else ``29``. TR-31 (``R``) is only valid under a ZMK: ``26`` here.
    """
    value = text(v, field)
    if value.startswith("S"):
        header, key = unwrap_key_block(keyblock_lmk(state, v), value)
        allowed = usages if usages is not None else USAGES_BY_PAIR.get(key_type[1:].upper(), frozenset())
        if header.usage not in allowed:
            raise CryptoError("29", "key usage not permitted for this function")
        return ClearKey(key, "A" if header.algorithm == "A" else "T", header)
    if value.startswith("R"):
        raise CryptoError("26", "a TR-31 key block is not a key under LMK")
    if len(value) == 32 and value[0] not in "UTXYZ":
        value = "X" + value  # a legacy untagged pair: two halves, each ECB under the LMK variant
    key = decrypt_key_under_lmk(variant_lmk(state, v), key_type, value)
    if not _odd_parity(key):
        raise CryptoError(parity_error, "key parity error")
    return ClearKey(key, "T")


def _odd_parity(key: bytes) -> bool:
    return all(bin(b).count("1") % 2 == 1 for b in key)
