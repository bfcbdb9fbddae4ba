"""EMV (KQ) in a node worker: ARQC verification and ARPC method 1.

- ICC master key (EMV Book 2 A1.4.1 option A): ``DES3_ECB`` of Y ‖ (Y XOR FF..) under the MK-AC
  handle on the token, Y = the 8 BCD bytes of PAN/PSN (rightmost 16 digits). The result is parity
  adjusted in the worker and becomes a session object (a derived key: SoftHSM2 has no
  derivation that keeps it on the token with the parity step; clear only during this operation).
- Session key: scheme ``0`` (Visa CVN 10) the ICC master key; scheme ``1`` the EMV common session
  key (A1.3.1), ``DES3_ECB`` under the ICC master key object of R with byte 2 = F0 / 0F,
  R = ATC ‖ 00 00 ‖ UN, parity adjusted in the worker.
- ARQC: ISO 9797-1 algorithm 3 (retail MAC) on single-length session objects of the session key
  halves, zero padding (scheme 0) or EMV padding ``80 00..`` (scheme 1).
- ARPC method 1: ``DES3_ECB`` under the ICC master key object of ARQC XOR (ARC ‖ 00..00).

Errors: ``01`` ARQC verification failed (no ARPC), ``10`` MK parity, ``15`` PAN/PSN not BCD,
``27`` MK not double-length TDES.
"""

from __future__ import annotations

import hmac
from typing import Any

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops.data import Scope, cbc, ecb, resolve, xor
from hsmproxy.ops.mac import pad
from hsmproxy.ops.registry import OpResult, op


def _parity(key: bytes) -> bytearray:
    return bytearray((b & 0xFE) | (bin(b >> 1).count("1") + 1) % 2 for b in key)


def _retail_mac(scope: Scope, key: bytearray, data: bytes) -> bytes:
    left, right = scope.obj(key[:8]), scope.obj(key[8:])
    state = cbc(left, bytes(8), data)[-8:]
    return ecb(left, ecb(right, state, encrypt=False))


@op("emv_arqc")
def emv_arqc(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """KQ: verify an ARQC (modes 0, 1) and/or generate an ARPC method 1 (modes 1, 2)."""
    mode, scheme = str(a["mode"]), str(a["scheme"])
    with Scope(backend) as scope:
        mk = resolve(backend, scope, a, "mk_ac", "109")
        if mk.algorithm != "T" or mk.length != 16:
            raise BackendError("27", "MK-AC must be a double-length TDES key")
        y = bytes(a["pan_psn"])
        if not y.hex().isdecimal():
            raise BackendError("15", "PAN/PSN is not BCD")
        icc = scope.keep(_parity(ecb(mk.handle(), y + xor(y, b"\xff" * 8))))
        icc_obj = scope.obj(icc)
        arqc = bytes(a["arqc"])
        if mode in ("0", "1"):
            session = icc
            if scheme == "1":
                r = bytes(a["atc"]) + b"\x00\x00" + bytes(a["un"])
                ra, rb = bytearray(r), bytearray(r)
                ra[2], rb[2] = 0xF0, 0x0F
                session = scope.keep(_parity(ecb(icc_obj, bytes(ra + rb))))
            data = pad(bytes(a["data"]), 1 if scheme == "0" else 2)
            if not hmac.compare_digest(_retail_mac(scope, session, data), arqc):
                return "01", {}
        if mode == "0":
            return "00", {}
        arpc = ecb(icc_obj, xor(arqc, bytes(a["arc"]) + bytes(6)))
    return "00", {"arpc": arpc}
