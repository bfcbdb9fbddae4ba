"""MAC operations (M6, M8, MS) in a node worker, on PKCS#11.

- ISO 9797-1 algorithm 1: ``DES3_CBC`` encryption with the chaining value as IV, last block (a
  single-length key is a K||K object, so this is X9.9 single-DES CBC-MAC).
- Algorithm 3 (X9.19 retail): ``DES3_CBC`` under the left half's K||K object (single DES), then on
  the final block ``D`` under the right half and ``E`` under the left half, both ``DES3_ECB`` on
  single-length objects (``variant_key_halves``; for ``S`` key blocks session objects).
- Algorithm 6 (CMAC): ``DES3_CMAC`` (double/triple keys; single-length ``27``) or ``AES_CMAC``.
- Chaining (modes / block numbers 1 and 2) answers the CBC state, as the emulator does; padding
  (ISO 9797-1 methods 1-3) is applied in the worker to the final block only.

Errors: ``01`` verification failure (M8), ``15`` CMAC with a chained mode or an AES key with
algorithm 1/3, ``27`` key length, ``80`` data not whole blocks.
"""

from __future__ import annotations

import hmac
from typing import Any

from pkcs11 import Mechanism

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops.data import Scope, WorkingKey, cbc, ecb, resolve, xor
from hsmproxy.ops.registry import OpResult, op

#: Key-block usages a MAC key may have.
MAC_USAGES = frozenset({"M0", "M1", "M3", "M5", "M6", "M7"})


def pad(data: bytes, method: int, block: int = 8) -> bytes:
    """ISO/IEC 9797-1 padding method 1 (zeros; empty data -> one block), 2 (``80`` + zeros), 3 (length)."""
    if method == 2:
        return pad(data + b"\x80", 1, block)
    if method == 3:
        return (8 * len(data)).to_bytes(block, "big") + pad(data, 1, block)
    if not data:
        return bytes(block)
    return data + bytes(-len(data) % block)


def chained_mac(
    key: WorkingKey, algorithm: str, data: bytes, iv: bytes, padding: int, *, final: bool
) -> bytes:
    """ISO 9797-1 algorithm 1 or 3 over one part of a (possibly split) message, on the token."""
    if algorithm == "3" and key.length != 16:
        raise BackendError("27", "ISO 9797-1 algorithm 3 needs a double-length key")
    if algorithm not in ("1", "3") or key.length not in (8, 16, 24):
        raise BackendError("27" if algorithm in ("1", "3") else "15", "invalid MAC algorithm or key")
    if final and padding:
        data = pad(data, padding)
    if not data or len(data) % 8:
        raise BackendError("80", "MAC data is not a whole number of 8-byte blocks")
    if algorithm == "1":
        return cbc(key.handle(), iv, data)[-8:]
    left = key.parts()[0]
    if not final:
        return cbc(left, iv, data)[-8:]
    # the last CBC step under K1 and the output transformation E_K1(D_K2(.)) together are one
    # TDES-EDE2 (K1, K2, K1) encryption of the chaining value XOR the last block: two token calls
    head, last = data[:-8], data[-8:]
    state = cbc(left, iv, head)[-8:] if head else iv
    return ecb(key.handle(), xor(state, last))


def cmac(key: WorkingKey, data: bytes) -> bytes:
    """CMAC on the token: ``AES_CMAC`` for AES keys, ``DES3_CMAC`` for double/triple-length TDES."""
    if key.algorithm == "A":
        return bytes(key.handle().sign(data, mechanism=Mechanism.AES_CMAC))
    if key.length in (16, 24):
        return bytes(key.handle().sign(data, mechanism=Mechanism.DES3_CMAC))
    raise BackendError("27", "TDES CMAC needs a double or triple length key")


@op("mac")
def mac(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """M6/M8/MS: a MAC, a chaining value, or a verdict (M8)."""
    mode, algorithm, data = str(a["mode"]), str(a["algorithm"]), bytes(a["data"])
    key_type = str(a["key_type"])
    usages = MAC_USAGES if key_type == "FFF" else None
    with Scope(backend) as scope:
        key = resolve(backend, scope, a, "key", key_type, usages=usages)
        final = mode in ("0", "3")
        iv = bytes.fromhex(a["iv"]) if mode in ("2", "3") else bytes(8)
        if a["command"] == "MS":
            length = int(a["key_length"])
            if key.algorithm != "T" or key.length != length:
                raise BackendError("27", "key length does not match the key length flag")
            result = chained_mac(key, "3" if length == 16 else "1", data, iv, 1, final=final)
            return "00", {"mab": result.hex().upper()}
        if algorithm == "6":
            if mode != "0":
                raise BackendError("15", "CMAC is only available for a single-block message")
            result = cmac(key, data)
        elif key.algorithm == "A":
            raise BackendError("15", "AES keys only support CMAC")
        else:
            result = chained_mac(key, algorithm, data, iv, int(a["padding"]), final=final)
    if not final:
        return "00", {"iv": result.hex().upper()}
    computed = result[: int(a["mac_bytes"])]
    if a["command"] == "M6":
        return "00", {"mac": computed.hex().upper()}
    if not hmac.compare_digest(computed, bytes.fromhex(a["mac"])):
        return "01", {}
    return "00", {}
