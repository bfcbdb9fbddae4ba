"""DUKPT PIN translation (CI, G0): TDES DUKPT (X9.24-1:2009) and AES DUKPT (X9.24-3:2017).

The BDK is key type 009 or a key block with usage ``B0``: a TDES BDK (16 bytes, else ``27``)
means TDES DUKPT with a 10-byte KSN and the PIN variant of the transaction key; an AES key-block
BDK means AES DUKPT with a 12-byte KSN (initial key ID 8 ‖ counter 4) and a PIN key of the BDK's
own AES type (usage 1000). The KSN descriptor is not used: the KSN is taken whole.

Where the work runs (fallback, counted in ``fallback_imports``): DUKPT derivation XORs key bits
(IPEK right half, the non-reversible key generation, the PIN variant), which PKCS#11 cannot do on
handles. So the worker obtains the clear BDK from the LMK objects (``decrypt_cryptogram`` or
``keyblock_clear``) and runs the DES/AES steps with ``cryptography`` in this process: every
intermediate key is necessarily clear here anyway, and one token object per step (up to 42
create/encrypt/destroy round trips per request) would cost latency without changing custody.
Only the final PIN key becomes a (sensitive, session) token object; the PIN block is decrypted
with it on the token and the object is destroyed. Clear key material lives in bytearrays that are
overwritten before returning (``cryptography`` may keep transient copies we cannot wipe).
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops.keyref import WorkingKey, clear_working_key
from hsmproxy.ops.pin import USAGES, field, role_key, translate
from hsmproxy.ops.registry import OpResult, op

_C0 = bytes.fromhex("C0C0C0C000000000C0C0C0C000000000")
_PIN_VARIANT = bytes.fromhex("00000000000000FF00000000000000FF")
_AES_TYPES = {16: (0x0002, 16), 24: (0x0003, 24), 32: (0x0004, 32)}


def _xor(x: bytes | bytearray, y: bytes | bytearray) -> bytearray:
    return bytearray(p ^ q for p, q in zip(x, y, strict=True))


def _des(key: bytes | bytearray, data: bytes | bytearray) -> bytes:
    """Single DES (8-byte key) or TDES-ECB, as 3-key TDES (the form ``cryptography`` accepts)."""
    k = bytes(key) * 3 if len(key) == 8 else bytes(key) + bytes(key[:8]) if len(key) == 16 else bytes(key)
    enc = Cipher(TripleDES(k), modes.ECB()).encryptor()
    return enc.update(bytes(data)) + enc.finalize()


def _aes(key: bytes | bytearray, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()
    return enc.update(data) + enc.finalize()


def tdes_pin_key(bdk: bytearray, ksn: bytes) -> bytearray:
    """The TDES DUKPT PIN key: IPEK, non-reversible key generation per counter bit, PIN variant."""
    ksn8 = bytes(x & y for x, y in zip(ksn[:8], bytes.fromhex("FFFFFFFFFFFFFFE0"), strict=True))
    masked = _xor(bdk, _C0)
    key = bytearray(_des(bdk, ksn8) + _des(masked, ksn8))
    masked[:] = bytes(16)
    register = int.from_bytes(ksn[2:], "big") & ~0x1FFFFF
    counter = int.from_bytes(ksn, "big") & 0x1FFFFF
    bit = 1 << 20
    while bit:
        if counter & bit:
            register |= bit
            data = register.to_bytes(8, "big")
            k2 = _xor(key, _C0)
            right = _xor(_des(key[:8], _xor(data, key[8:])), key[8:])
            left = _xor(_des(k2[:8], _xor(data, k2[8:])), k2[8:])
            key[:] = left + right
            k2[:] = bytes(16)
        bit >>= 1
    out = _xor(key, _PIN_VARIANT)
    key[:] = bytes(16)
    return out


def _aes_derive(key: bytearray, usage: int, algorithm: int, length: int, tail: bytes) -> bytearray:
    out = bytearray()
    for block_counter in range(1, (length + 15) // 16 + 1):
        data = bytes([1, block_counter]) + usage.to_bytes(2, "big") + algorithm.to_bytes(2, "big")
        out += _aes(key, data + (8 * length).to_bytes(2, "big") + tail)
    del out[length:]
    return out


def aes_pin_key(bdk: bytearray, ksn: bytes) -> bytearray:
    """The AES DUKPT PIN key (usage 1000, the BDK's own AES type) for a 12-byte KSN."""
    kind = _AES_TYPES.get(len(bdk))
    if kind is None:
        raise BackendError("27", "AES DUKPT BDK must be 16, 24 or 32 bytes")
    if len(ksn) != 12:
        raise BackendError("15", "AES DUKPT KSN must be 12 bytes")
    algorithm, length = kind
    key = _aes_derive(bdk, 0x8001, algorithm, length, ksn[:8])
    counter = int.from_bytes(ksn[8:], "big")
    working = 0
    for bit in range(31, -1, -1):
        if counter & (1 << bit):
            working |= 1 << bit
            nxt = _aes_derive(key, 0x8000, algorithm, length, ksn[4:8] + working.to_bytes(4, "big"))
            key[:] = bytes(len(key))
            key = nxt
    out = _aes_derive(key, 0x1000, algorithm, length, ksn[4:12])
    key[:] = bytes(len(key))
    return out


def dukpt_pin_key(backend: Pkcs11Backend, a: dict[str, Any]) -> WorkingKey:
    """A session object for the DUKPT PIN key of the request's BDK and KSN (caller destroys it)."""
    bdk, algorithm, _ = clear_working_key(
        backend, a["lmk"], a["kb_lmk"], "009", field(a, "bdk"), usages=USAGES["BDK"]
    )
    try:
        try:
            ksn = bytes.fromhex(field(a, "ksn"))
        except ValueError:
            raise BackendError("15", "KSN is not hex") from None
        if algorithm == "A":
            pin_key = aes_pin_key(bdk, ksn)
        else:
            if len(bdk) != 16:
                raise BackendError("27", "TDES DUKPT BDK must be 16 bytes")
            if len(ksn) != 10:
                raise BackendError("15", "TDES DUKPT KSN must be 10 bytes")
            pin_key = tdes_pin_key(bdk, ksn)
    finally:
        bdk[:] = bytes(len(bdk))
    try:
        return WorkingKey(backend.create_session_key(pin_key, algorithm), algorithm, len(pin_key))
    finally:
        pin_key[:] = bytes(len(pin_key))


@op("dukpt_translate_pin")
def dukpt_translate_pin(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """CI (ISO-0 source), G0 (source format given): DUKPT PIN key -> ZPK."""
    pin_key = dukpt_pin_key(backend, a)
    try:
        zpk = role_key(backend, a, ("zpk", "001", "ZPK", "11"))
        src_fmt = field(a, "source_format") if "source_format" in a["fields"] else "01"
        return translate(backend, a, pin_key, zpk, src_fmt)
    finally:
        pin_key.handle.destroy()
