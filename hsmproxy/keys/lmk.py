"""LMK ceremony: create LMK objects on a node's token, and list them.

A variant LMK becomes one sensitive, non-extractable DES2 token object per (pair, key-type
variant, scheme half) the commands use, so that no command ever needs to derive a variant at
run time (SoftHSM2 has no XOR derivation). A key-block LMK (AES, version ``1``) becomes its
KBEK and KBAK (TR-31 version D CMAC derivation) as AES token objects. Each LMK also gets a data
object recording its scheme and check value.

The public **test LMKs** (shared/VECTORS.md section 5) load with ``--test``: variant id ``00``
and AES key-block id ``01``. Real LMKs are typed as components at a hidden prompt.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

from hsmproxy.backend.pkcs11_backend import (
    KBLMK_LABEL,
    SCHEME_VARIANTS,
    Pkcs11Backend,
    lmk_object_label,
    variant_of_pair,
)

#: The public test variant LMK, pairs 00-01 .. 38-39 (shared/VECTORS.md section 5).
TEST_VARIANT_LMK: tuple[str, ...] = (
    "01010101010101017902CD1FD36EF8BA", "20202020202020203131313131313131",
    "40404040404040405151515151515151", "61616161616161617070707070707070",
    "80808080808080809191919191919191", "A1A1A1A1A1A1A1A1B0B0B0B0B0B0B0B0",
    "C1C1010101010101D0D0010101010101", "E0E0010101010101F1F1010101010101",
    "1C587F1C13924FEF0101010101010101", "01010101010101010101010101010101",
    "02020202020202020404040404040404", "07070707070707071010101010101010",
    "13131313131313131515151515151515", "16161616161616161919191919191919",
    "1A1A1A1A1A1A1A1A1C1C1C1C1C1C1C1C", "23232323232323232525252525252525",
    "26262626262626262929292929292929", "2A2A2A2A2A2A2A2A2C2C2C2C2C2C2C2C",
    "2F2F2F2F2F2F2F2F3131313131313131", "01010101010101010101010101010101",
)  # fmt: skip
#: The AES key-block LMK of the public BP-Tools captures (VECTORS.md section 5), id 01.
TEST_KEYBLOCK_LMK = "9B71333A13F9FAE72F9D0E2DAB4AD6784718012F9244033F3F26A2DE0C8AA11A"

#: (pair code, key-type variants) used by the host commands (PROTOCOL.md key type table).
VARIANTS_BY_PAIR: dict[str, tuple[int, ...]] = {
    "00": (0,),  # pair 00-01: NC check value
    "02": (0,),  # pair 02-03: PIN under LMK
    "04": (0, 1, 2, 3, 4),  # ZMK, ZMK component, KML, KEKr, KEKs
    "06": (0,),  # ZPK
    "14": (0, 1, 2, 4, 6),  # TPK/TMK/PVK, TMK1, TMK2, CVK, KIA
    "16": (0, 1),  # TAK
    "18": (0,),  # DTAB
    "22": (0,),  # WWK
    "24": (1, 2, 3, 4, 5, 6, 7, 8, 9),  # issuing keys
    "26": (0,),  # ZAK
    "28": (0, 1, 2, 3, 4, 5, 6, 7, 8),  # BDK, MK-AC …
    "30": (0,),  # ZEK
    "32": (0,),  # DEK/TEK
    "34": (0, 1),  # RSA private key, HMAC
    "36": (0,),  # RSA public key MAC
}
SCHEME_HALVES: tuple[tuple[str, int], ...] = (("", 0), ("U", 0), ("U", 1), ("T", 0), ("T", 1), ("T", 2))


def kcv_tdes(key: bytes) -> str:
    """TDES-ECB of 8 zero bytes under ``key``, 16 hex (the variant LMK check value convention)."""
    k = key + key[:8] if len(key) == 16 else key
    enc = Cipher(TripleDES(k), modes.ECB()).encryptor()
    return (enc.update(bytes(8)) + enc.finalize()).hex().upper()


def _cmac(key: bytes, data: bytes) -> bytes:
    c = CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


def keyblock_keys(lmk: bytes) -> tuple[bytes, bytes]:
    """KBEK and KBAK of an AES-256 key-block LMK (TR-31 version D CMAC KDF)."""

    def derive(usage: bytes) -> bytes:
        return b"".join(_cmac(lmk, bytes([i]) + usage + b"\x00\x00\x04\x01\x00") for i in (1, 2))

    return derive(b"\x00\x00"), derive(b"\x00\x01")


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one LMK load did on one node (check values only, never key values)."""

    node: str
    lmk_id: str
    scheme: str
    check_value: str
    objects: int


def load_variant_lmk(backend: Pkcs11Backend, node: str, lmk_id: str, pairs: Iterable[bytes]) -> LoadResult:
    """Create every variant object of a variant LMK on ``backend``'s token."""
    pair_values = list(pairs)
    if len(pair_values) != 20 or any(len(p) != 16 for p in pair_values):
        raise ValueError("a variant LMK is 20 double-length pairs")
    count = 0
    for pair_code, variants in VARIANTS_BY_PAIR.items():
        pair = pair_values[int(pair_code) // 2]
        for variant in variants:
            for scheme, half in SCHEME_HALVES:
                if scheme and pair_code in ("00", "02"):
                    continue
                label = lmk_object_label(lmk_id, pair_code, variant, scheme, half)
                backend.create_lmk_object(label, variant_of_pair(pair, variant, scheme, half))
                count += 1
    return LoadResult(node, lmk_id, "variant", kcv_tdes(pair_values[0]), count)


def load_keyblock_lmk(backend: Pkcs11Backend, node: str, lmk_id: str, key: bytes) -> LoadResult:
    """Create the KBEK and KBAK objects of an AES key-block LMK on ``backend``'s token."""
    if len(key) != 32:
        raise ValueError("an AES key-block LMK is 32 bytes")
    kbek, kbak = keyblock_keys(key)
    backend.create_lmk_object(f"{KBLMK_LABEL}:{lmk_id}:kbek", kbek, "aes")
    backend.create_lmk_object(f"{KBLMK_LABEL}:{lmk_id}:kbak", kbak, "aes")
    # The LMK itself, used only for its check value (AES-CMAC of zeros, as NC reports it).
    backend.create_lmk_object(f"{KBLMK_LABEL}:{lmk_id}:lmk", key, "aes")
    return LoadResult(node, lmk_id, "keyblock", _cmac(key, bytes(16))[:8].hex().upper(), 3)


#: The public test audit HMAC key (id ``00``): 32 bytes, loaded by ``lmk load --test``. NOT a secret.
TEST_AUDIT_KEY = bytes.fromhex("A0D17C4A1E5B3F2C6D7E8F90A1B2C3D4E5F60718293A4B5C6D7E8F9001122334")
TEST_AUDIT_KEY_ID = "00"


def audit_key_check_value(key: bytes) -> str:
    """Check value of an audit HMAC key: the first 3 bytes of HMAC-SHA256(key, 16 zero bytes), hex."""
    return hmac.new(key, bytes(16), hashlib.sha256).hexdigest()[:6].upper()


def load_audit_key(backend: Pkcs11Backend, node: str, key_id: str, key: bytes) -> LoadResult:
    """Create the audit HMAC key ``hsmproxy-audit:<key_id>`` (generic secret, sensitive,
    non-extractable, sign/verify only) on ``backend``'s token, replacing an older one."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    if len(key) < 32:
        raise ValueError("an audit HMAC key is at least 32 bytes")
    from hsmproxy.ops.audit import AUDIT_KEY_LABEL

    label = f"{AUDIT_KEY_LABEL}:{key_id}"
    for old in backend.session.get_objects({Attribute.LABEL: label}):
        old.destroy()
    backend.session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.VALUE: key,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.VERIFY: True,
            Attribute.LABEL: label,
        }
    )
    return LoadResult(node, key_id, "audit", audit_key_check_value(key), 1)


def test_lmks() -> dict[str, tuple[str, list[bytes]]]:
    """The public test LMKs: id 00 variant, id 01 AES key block."""
    return {
        "00": ("variant", [bytes.fromhex(p) for p in TEST_VARIANT_LMK]),
        "01": ("keyblock", [bytes.fromhex(TEST_KEYBLOCK_LMK)]),
    }


def prompt_components(
    count: int,
    length: int,
    ask: Callable[[str], str] = getpass.getpass,
    check: Callable[[bytes], str] | None = None,
) -> bytes:
    """Read ``count`` hex components of ``length`` bytes at a hidden prompt; return their XOR.

    Prints each component's check value (never the component) as ceremonies require: ``check`` of
    the component (default: the TDES check value of its first 16 bytes).
    """
    result = bytes(length)
    for i in range(1, count + 1):
        text = ask(f"component {i} of {count} ({2 * length} hex): ").strip().replace(" ", "")
        try:
            comp = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"component {i} is not hexadecimal") from None
        if len(comp) != length:
            raise ValueError(f"component {i} must be {2 * length} hex characters")
        cv = check(comp) if check is not None else kcv_tdes(comp[:16])[:6]
        print(f"component {i} check value: {cv}")
        result = bytes(a ^ b for a, b in zip(result, comp, strict=True))
    return result


__all__ = [
    "SCHEME_VARIANTS",
    "TEST_AUDIT_KEY",
    "TEST_AUDIT_KEY_ID",
    "TEST_KEYBLOCK_LMK",
    "TEST_VARIANT_LMK",
    "LoadResult",
    "audit_key_check_value",
    "keyblock_keys",
    "load_audit_key",
    "load_keyblock_lmk",
    "load_variant_lmk",
    "prompt_components",
    "test_lmks",
]
