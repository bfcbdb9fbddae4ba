"""Data encryption (M0, M2) in a node worker, and the working-key resolution the data, MAC and EMV
operations share.

Working keys (:func:`resolve`): variant keys come from the backend's cached handles
(:func:`~hsmproxy.ops.keyref.key_handle`, parity ``10``); their single-length parts (X9.19) from
``variant_key_halves``. ``S`` key blocks are verified and decrypted by the key-block LMK objects on
the token (AES-CMAC under the KBAK, AES-CBC under the KBEK, :func:`keyblock_clear`) and the clear
key becomes a sensitive session object for this operation only (fallback: counted in
``fallback_imports``, wiped and destroyed when the operation ends). ``R`` (TR-31) answers ``26``;
a key-block usage the command does not allow ``29``; key-block format errors ``83``/``A1``/``A4``
and the header field codes (``A6``-``AC``) as the emulator answers them.

Data encryption on PKCS#11:

- ECB / CBC: ``DES3_ECB`` / ``DES3_CBC`` (a single-DES key is a K||K object) or ``AES_ECB`` /
  ``AES_CBC`` for AES key blocks, on the token.
- CFB-8 and CFB-64 (TDES only; AES answers ``15``): composed in the worker, the shift register is
  ECB-encrypted on the token (one call per segment when encrypting, one call for the whole message
  when decrypting, since every register is then known).
- DUKPT BDKs (``009``/``609``/``809``, key-block usage B0; double-length TDES only, else ``15``):
  the X9.24-1 derivation (IPEK with the C0C0 mask, non-reversible key generation, request data
  variant and its one-way TDES step) needs XOR and single-DES steps SoftHSM2 does not offer on
  key objects, so it runs in the worker from the clear BDK (fallback, ``decrypt_cryptogram``); the
  derived data key becomes a session object and the message is encrypted on the token.

Errors: ``04`` key type, ``10`` parity, ``13`` LMK, ``15`` mode/IV/BDK, ``80`` empty or partial-block
data for ECB/CBC.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import pkcs11
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from pkcs11 import Mechanism

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import KBLMK_LABEL, Pkcs11Backend
from hsmproxy.ops.keyref import key_handle, pair_and_variant
from hsmproxy.ops.registry import OpResult, op

#: Key-block usages accepted where a command expects a variant key type (by its pair code).
USAGES_BY_PAIR: dict[str, frozenset[str]] = {
    "03": frozenset({"M0", "M1", "M3", "M5", "M6", "M7"}),
    "08": frozenset({"M0", "M1", "M3", "M5", "M6", "M7"}),
    "09": frozenset({"B0", "B1", "E0"}),
    "0A": frozenset({"D0", "22"}),
    "0B": frozenset({"D0", "21", "23"}),
}
_SCHEME_BYTES = {"": 8, "Z": 8, "U": 16, "X": 16, "T": 24, "Y": 24}


def xor(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    """XOR of two equal-length byte strings."""
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


class Scope:
    """Session objects and clear buffers of one operation: destroyed and wiped on exit."""

    def __init__(self, backend: Pkcs11Backend) -> None:
        self.backend = backend
        self._objects: list[Any] = []
        self._buffers: list[bytearray] = []

    def obj(self, clear: bytes | bytearray, algorithm: str = "T") -> Any:
        """A sensitive session key from clear bytes, destroyed when the operation ends."""
        handle = self.backend.create_session_key(clear, algorithm)
        self._objects.append(handle)
        return handle

    def keep(self, buffer: bytearray) -> bytearray:
        """Register a clear buffer to be wiped when the operation ends."""
        self._buffers.append(buffer)
        return buffer

    def __enter__(self) -> Scope:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._objects:
            try:
                handle.destroy()
            except pkcs11.PKCS11Error:
                pass
        for buffer in self._buffers:
            buffer[:] = bytes(len(buffer))


class WorkingKey:
    """A resolved working key: algorithm, clear length, and lazily built handles or clear value."""

    def __init__(
        self,
        algorithm: str,
        length: int,
        handle: Callable[[], Any],
        parts: Callable[[], tuple[Any, ...]],
        clear: Callable[[], bytearray],
    ) -> None:
        self.algorithm = algorithm
        self.length = length
        self._handle, self._parts, self._clear = handle, parts, clear
        self._cached: Any = None

    def handle(self) -> Any:
        """The whole key as a PKCS#11 handle."""
        if self._cached is None:
            self._cached = self._handle()
        return self._cached

    def parts(self) -> tuple[Any, ...]:
        """Single-length handles, one per 8-byte part (TDES keys)."""
        return self._parts()

    def clear(self) -> bytearray:
        """The clear key (fallback compositions only; wiped by the scope)."""
        return self._clear()


def keyblock_lmk_id(backend: Pkcs11Backend, a: dict[str, Any]) -> str:
    """The key-block LMK: the request's ``%LL``, else the first of the tenant's that is a key-block LMK."""
    if a.get("kb_lmk"):
        return str(a["kb_lmk"])
    for lmk_id in sorted(a.get("lmk_ids", ())):
        try:
            backend.lmk_object(f"{KBLMK_LABEL}:{lmk_id}:kbek")
        except BackendError:
            continue
        return str(lmk_id)
    raise BackendError("13", "no key-block LMK is loaded")


def keyblock_clear(backend: Pkcs11Backend, lmk_id: str, block: str) -> tuple[dict[str, str], bytearray]:
    """Verify and decrypt a Thales key block with the LMK objects -> (header, clear key).

    Fallback path (the clear key is in the worker for this operation; the caller wipes it).
    """
    return backend.open_keyblock(lmk_id, block)


def resolve(
    backend: Pkcs11Backend,
    scope: Scope,
    a: dict[str, Any],
    field: str,
    key_type: str,
    *,
    usages: frozenset[str] | None = None,
    parity_error: str = "10",
) -> WorkingKey:
    """Resolve the key in ``a[field]`` of type ``VPP`` (variant key or ``S`` key block)."""
    value = str(a[field])
    if value.startswith("S"):
        header, clear = keyblock_clear(backend, keyblock_lmk_id(backend, a), value)
        scope.keep(clear)
        allowed = usages if usages is not None else USAGES_BY_PAIR.get(key_type[1:].upper(), frozenset())
        if header["usage"] not in allowed:
            raise BackendError("29", "key usage not permitted for this function")
        algorithm = "A" if header["algorithm"] == "A" else "T"
        return WorkingKey(
            algorithm,
            len(clear),
            lambda: scope.obj(clear, algorithm),
            lambda: tuple(scope.obj(clear[i : i + 8]) for i in range(0, len(clear), 8)),
            lambda: clear,
        )
    if value.startswith("R"):
        raise BackendError("26", "a TR-31 key block is not a key under LMK")
    lmk_id = str(a["lmk_id"])
    handle = key_handle(backend, lmk_id, key_type, value, parity_error)
    scheme = value[0] if value[:1] in ("U", "T", "X", "Y", "Z") else ""
    pair, variant = pair_and_variant(key_type)
    return WorkingKey(
        "T",
        _SCHEME_BYTES[scheme],
        lambda: handle,
        lambda: tuple(backend.variant_key_halves(lmk_id, pair, variant, value)),
        lambda: scope.keep(backend.decrypt_cryptogram(lmk_id, pair, variant, value)),
    )


# -- ciphers on the token ---------------------------------------------------------------------


def ecb(handle: Any, data: bytes, *, aes: bool = False, encrypt: bool = True) -> bytes:
    """ECB under a handle (DES3 or AES)."""
    mechanism = Mechanism.AES_ECB if aes else Mechanism.DES3_ECB
    if encrypt:
        return bytes(handle.encrypt(data, mechanism=mechanism))
    return bytes(handle.decrypt(data, mechanism=mechanism))


def cbc(handle: Any, iv: bytes, data: bytes, *, aes: bool = False, encrypt: bool = True) -> bytes:
    """CBC (no padding) under a handle (DES3 or AES)."""
    mechanism = Mechanism.AES_CBC if aes else Mechanism.DES3_CBC
    if encrypt:
        return bytes(handle.encrypt(data, mechanism=mechanism, mechanism_param=iv))
    return bytes(handle.decrypt(data, mechanism=mechanism, mechanism_param=iv))


def _cfb8(handle: Any, iv: bytes, data: bytes, aes: bool, encrypt: bool) -> bytes:
    size = len(iv)
    if not encrypt:  # every register is known from the ciphertext: one token call
        stream = iv + data
        registers = b"".join(stream[i : i + size] for i in range(len(data)))
        keystream = ecb(handle, registers, aes=aes)
        return bytes(c ^ keystream[i * size] for i, c in enumerate(data))
    out, register = bytearray(), iv
    for p in data:
        c = p ^ ecb(handle, register, aes=aes)[0]
        out.append(c)
        register = register[1:] + bytes([c])
    return bytes(out)


def _cfb64(handle: Any, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    segments = [data[i : i + 8] for i in range(0, len(data), 8)]
    if not encrypt:
        registers = iv + b"".join(s for s in segments[:-1])
        keystream = ecb(handle, registers)
        return b"".join(xor(s, keystream[8 * i : 8 * i + len(s)]) for i, s in enumerate(segments))
    out, register = b"", iv
    for s in segments:
        c = xor(s, ecb(handle, register)[: len(s)])
        out += c
        register = c
    return out


# -- DUKPT (X9.24-1, worker composition from the clear BDK) -----------------------------------

_KEY_MASK = bytes.fromhex("C0C0C0C000000000C0C0C0C000000000")
_DATA_REQUEST_VARIANT = bytes.fromhex("0000000000FF00000000000000FF0000")
_COUNTER = 0x1FFFFF


def _des_ecb(key: bytes, block: bytes) -> bytes:
    k = key * 3 if len(key) == 8 else key + key[:8]
    enc = Cipher(TripleDES(k), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def dukpt_data_request_key(bdk: bytes | bytearray, ksn: bytes) -> bytearray:
    """X9.24-1 request data key for ``ksn``: current key XOR data variant, through the one-way step."""
    bdk = bytes(bdk)
    initial = (int.from_bytes(ksn, "big") & ~_COUNTER).to_bytes(10, "big")[:8]
    key = _des_ecb(bdk, initial) + _des_ecb(xor(bdk, _KEY_MASK), initial)
    counter = int.from_bytes(ksn[7:], "big") & _COUNTER
    register = int.from_bytes(ksn[2:], "big") & ~_COUNTER
    bit = 1 << 20
    while bit:
        if counter & bit:
            register |= bit
            reg = register.to_bytes(8, "big")

            def half(k: bytes, reg: bytes = reg) -> bytes:
                return xor(k[8:], _des_ecb(k[:8], xor(k[8:], reg)))

            key = half(xor(key, _KEY_MASK)) + half(key)
        bit >>= 1
    v = xor(key, _DATA_REQUEST_VARIANT)
    return bytearray(_des_ecb(v, v[:8]) + _des_ecb(v, v[8:]))


# -- M0 / M2 ----------------------------------------------------------------------------------

_DUKPT_TYPES = frozenset({"009", "609", "809"})
_DATA_USAGES = frozenset({"D0", "21", "22", "23"})


def _data_key(backend: Pkcs11Backend, scope: Scope, a: dict[str, Any]) -> WorkingKey:
    key_type = str(a["key_type"])
    if key_type in _DUKPT_TYPES:
        bdk = resolve(backend, scope, a, "key", key_type, usages=frozenset({"B0"}))
        if bdk.algorithm != "T" or bdk.length != 16:
            raise BackendError("15", "only double-length TDES DUKPT BDKs are supported here")
        clear = scope.keep(dukpt_data_request_key(bdk.clear(), bytes.fromhex(a["ksn"])))
        return WorkingKey("T", 16, lambda: scope.obj(clear), lambda: (), lambda: clear)
    if key_type == "FFF":
        return resolve(backend, scope, a, "key", key_type, usages=_DATA_USAGES)
    return resolve(backend, scope, a, "key", key_type)


@op("data_crypt")
def data_crypt(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """M0/M2: encrypt or decrypt ``data`` (ECB, CBC, CFB-8, CFB-64) under a data or DUKPT key."""
    mode, encrypt, data = str(a["mode"]), bool(a["encrypt"]), bytes(a["data"])
    with Scope(backend) as scope:
        key = _data_key(backend, scope, a)
        aes = key.algorithm == "A"
        size = 16 if aes else 8
        iv = bytes.fromhex(a["iv"]) if mode != "00" else b""
        if mode == "03" and aes:
            raise BackendError("15", "CFB-64 needs a TDES key")
        if not data or (mode in ("00", "01") and len(data) % size):
            raise BackendError("80", "data length is not a whole number of blocks")
        handle = key.handle()
        if mode == "00":
            out = ecb(handle, data, aes=aes, encrypt=encrypt)
        elif mode == "01":
            out = cbc(handle, iv, data, aes=aes, encrypt=encrypt)
        elif mode == "02":
            out = _cfb8(handle, iv, data, aes, encrypt)
        else:
            out = _cfb64(handle, iv, data, encrypt)
    message = out.hex().upper().encode() if a["output_format"] == "1" else out
    values: dict[str, str | bytes] = {"message_length": f"{len(message):04X}", "message": message}
    if mode != "00":
        values["iv"] = (iv + (out if encrypt else data))[-size:].hex().upper()
    return "00", values
