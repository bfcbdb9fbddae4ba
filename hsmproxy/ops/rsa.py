"""RSA (EI, EW, EY) and hashing (GM) in a node worker, on PKCS#11.

Formats are the emulator's (hsmproxy's own definitions, interchangeable between the two):

- Private key under LMK: the DER PKCS#1 ``RSAPrivateKey``, ISO 9797-1 padding method 2, TDES-CBC
  with a zero IV under LMK pair 34-35 variant 0 — ``DES3_CBC`` with the LMK object on the token.
- Public-key MAC: the leftmost 4 bytes of the ISO 9797-1 alg. 1 CBC-MAC (padding method 1) of the
  DER public key under LMK pair 36-37 variant 0 — ``DES3_CBC`` with the LMK object.
- Public key: DER PKCS#1 ``RSAPublicKey``, INTEGERs unsigned (encoding ``01``) or two's
  complement (``02``); EY also reads SubjectPublicKeyInfo.

EI generates the key pair ON THE TOKEN (``C_GenerateKeyPair``, session objects). SoftHSM2 cannot
export a private key in the LMK format (no DES3-CBC wrap), so the private key object is created
non-sensitive, its components are read into the worker, DER-encoded and encrypted under the LMK
object on the token; both objects are destroyed at once (the clear key exists in the worker only
during the operation, as on the fallback import path).

EW decrypts the private key under the LMK object, parses it in the worker (``cryptography``'s DER
reader, as the emulator accepts), creates a sensitive private-key session object (kept in the
worker's key cache, like a working key) and signs with ``SHA*_RSA_PKCS`` on the token. EY checks
the MAC on the token, then verifies with a public-key session object and ``SHA*_RSA_PKCS``. GM
hashes with ``session.digest`` (``SHA_1``/``SHA224``/``SHA256``/``SHA384``/``SHA512``).

Errors: ``01`` public-key MAC (EY), ``02`` signature does not verify, ``15`` undecodable key,
``43`` key generation failure, ``78`` private key length.
"""

from __future__ import annotations

import hmac
from typing import Any

import pkcs11
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa as _rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend, lmk_object_label
from hsmproxy.ops.data import cbc
from hsmproxy.ops.mac import pad
from hsmproxy.ops.registry import OpResult, op

SIGN_MECHANISMS = {
    "01": Mechanism.SHA1_RSA_PKCS,
    "05": Mechanism.SHA224_RSA_PKCS,
    "06": Mechanism.SHA256_RSA_PKCS,
    "07": Mechanism.SHA384_RSA_PKCS,
    "08": Mechanism.SHA512_RSA_PKCS,
}
DIGEST_MECHANISMS = {
    "01": Mechanism.SHA_1,
    "05": Mechanism.SHA224,
    "06": Mechanism.SHA256,
    "07": Mechanism.SHA384,
    "08": Mechanism.SHA512,
}


def _lmk(backend: Pkcs11Backend, lmk_id: str, pair: str) -> Any:
    return backend.lmk_object(lmk_object_label(lmk_id, pair, 0, "", 0))


def public_key_mac(backend: Pkcs11Backend, lmk_id: str, der: bytes) -> bytes:
    """hsmproxy's 4-byte public-key MAC under LMK pair 36-37 (variant 0), on the token."""
    return cbc(_lmk(backend, lmk_id, "36"), bytes(8), pad(der, 1))[-8:][:4]


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _der_int(value: int, *, unsigned: bool = False) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    if not unsigned and body[0] & 0x80:
        body = b"\x00" + body
    return _der(0x02, body)


def _read(der: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    if pos + 2 > len(der) or der[pos] != tag:
        raise ValueError("unexpected DER tag")
    first, pos = der[pos + 1], pos + 2
    length = first
    if first & 0x80:
        size = first & 0x7F
        if not 1 <= size <= 3:
            raise ValueError("invalid DER length")
        length, pos = int.from_bytes(der[pos : pos + size], "big"), pos + size
    if pos + length > len(der):
        raise ValueError("DER element truncated")
    return der[pos : pos + length], pos + length


def decode_public_key(der: bytes) -> _rsa.RSAPublicNumbers:
    """(e, n) of a PKCS#1 DER public key (unsigned or two's-complement INTEGERs) or SPKI; ``15``."""
    try:
        body, end = _read(der, 0, 0x30)
        n_bytes, pos = _read(body, 0, 0x02)
        e_bytes, pos = _read(body, pos, 0x02)
        if end != len(der) or pos != len(body):
            raise ValueError("trailing data")
        numbers = _rsa.RSAPublicNumbers(int.from_bytes(e_bytes, "big"), int.from_bytes(n_bytes, "big"))
    except ValueError:
        try:
            key = serialization.load_der_public_key(der)
        except (ValueError, UnsupportedAlgorithm):
            raise BackendError("15", "invalid DER public key") from None
        if not isinstance(key, _rsa.RSAPublicKey):
            raise BackendError("15", "public key is not RSA") from None
        return key.public_numbers()
    try:
        numbers.public_key()  # the same validity rules as the emulator's reader
    except ValueError:
        raise BackendError("15", "invalid RSA public key") from None
    return numbers


@op("rsa_generate")
def rsa_generate(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """EI: an RSA key pair generated on the token; public key (MAC'd) and private key under the LMK."""
    lmk_id, bits, exponent = str(a["lmk_id"]), int(a["bits"]), int(a["exponent"])
    mac_lmk, key_lmk = _lmk(backend, lmk_id, "36"), _lmk(backend, lmk_id, "34")
    try:
        pub, priv = backend.session.generate_keypair(
            KeyType.RSA,
            bits,
            public_template={Attribute.PUBLIC_EXPONENT: exponent.to_bytes(3, "big").lstrip(b"\x00")},
            private_template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
            store=False,
        )
    except pkcs11.PKCS11Error:
        raise BackendError("43", "RSA key generation failed") from None
    backend.noted(pub)
    backend.noted(priv)
    try:
        n, e = (int.from_bytes(pub[x], "big") for x in (Attribute.MODULUS, Attribute.PUBLIC_EXPONENT))
        parts = [
            int.from_bytes(priv[x], "big")
            for x in (
                Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.PRIME_2,
                Attribute.EXPONENT_1, Attribute.EXPONENT_2, Attribute.COEFFICIENT,
            )
        ]  # fmt: skip
    finally:
        for obj in (pub, priv):
            obj.destroy()
    private_der = bytearray(_der(0x30, b"".join(_der_int(x) for x in (0, n, e, *parts))))
    padded = bytearray(pad(bytes(private_der), 2))
    try:
        blob = cbc(key_lmk, bytes(8), bytes(padded))
    finally:
        private_der[:] = bytes(len(private_der))
        padded[:] = bytes(len(padded))
        parts.clear()
    unsigned = a["encoding"] == "01"
    public_der = _der(0x30, _der_int(n, unsigned=unsigned) + _der_int(e, unsigned=unsigned))
    mac = cbc(mac_lmk, bytes(8), pad(public_der, 1))[-8:][:4]
    return "00", {
        "mac": mac,
        "public_key": public_der,
        "private_key_length": f"{len(blob):04d}",
        "private_key": blob,
    }


def _load_private_key(backend: Pkcs11Backend, lmk_id: str, blob: bytes) -> _rsa.RSAPrivateNumbers:
    key_lmk = _lmk(backend, lmk_id, "34")
    if not blob or len(blob) % 8:
        raise BackendError("78", "private key length error")
    padded = bytearray(cbc(key_lmk, bytes(8), blob, encrypt=False))
    try:
        der = bytes(padded).rstrip(b"\x00")
        if not der.endswith(b"\x80"):
            raise BackendError("15", "private key under LMK is invalid")
        try:
            key = serialization.load_der_private_key(der[:-1], password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise BackendError("15", "private key under LMK is invalid") from None
        if not isinstance(key, _rsa.RSAPrivateKey):
            raise BackendError("15", "private key is not RSA")
        return key.private_numbers()
    finally:
        padded[:] = bytes(len(padded))


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _private_key_object(backend: Pkcs11Backend, lmk_id: str, blob: bytes) -> Any:
    """A sensitive private-key session object for ``blob`` (a private key under the LMK)."""
    numbers = _load_private_key(backend, lmk_id, blob)
    pub = numbers.public_numbers
    key: Any = backend.create_object(
        {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.TOKEN: False,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.MODULUS: _int_bytes(pub.n),
            Attribute.PUBLIC_EXPONENT: _int_bytes(pub.e),
            Attribute.PRIVATE_EXPONENT: _int_bytes(numbers.d),
            Attribute.PRIME_1: _int_bytes(numbers.p),
            Attribute.PRIME_2: _int_bytes(numbers.q),
            Attribute.EXPONENT_1: _int_bytes(numbers.dmp1),
            Attribute.EXPONENT_2: _int_bytes(numbers.dmq1),
            Attribute.COEFFICIENT: _int_bytes(numbers.iqmp),
        }
    )
    del numbers
    return key


@op("rsa_sign")
def rsa_sign(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """EW: PKCS#1 v1.5 signature with a private key under the LMK, signed on the token.

    The private key object is cached like a working key (by LMK id and the key's LMK cryptogram),
    so a card scheme's signing key is decrypted, parsed and created once, not per signature.
    """
    lmk_id, blob = str(a["lmk_id"]), bytes(a["private_key"])
    key = backend.cached_object(
        (lmk_id, "RSA", blob.hex().upper()), lambda: _private_key_object(backend, lmk_id, blob)
    )
    signature = bytes(key.sign(bytes(a["message"]), mechanism=SIGN_MECHANISMS[a["hash_id"]]))
    return "00", {"signature_length": f"{len(signature):04d}", "signature": signature}


@op("rsa_verify")
def rsa_verify(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """EY: check the public-key MAC (``01``), then verify the signature on the token (``02``)."""
    der = bytes(a["public_key"])
    if not hmac.compare_digest(public_key_mac(backend, str(a["lmk_id"]), der), bytes(a["mac"])):
        return "01", {}
    numbers = decode_public_key(der)
    key: Any = backend.create_object(
        {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.TOKEN: False,
            Attribute.VERIFY: True,
            Attribute.MODULUS: _int_bytes(numbers.n),
            Attribute.PUBLIC_EXPONENT: _int_bytes(numbers.e),
        }
    )
    try:
        ok = key.verify(bytes(a["message"]), bytes(a["signature"]), mechanism=SIGN_MECHANISMS[a["hash_id"]])
    except pkcs11.PKCS11Error:
        ok = False
    finally:
        key.destroy()
    return ("00", {}) if ok else ("02", {})


@op("digest")
def digest(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """GM: hash ``data`` on the token."""
    mechanism = DIGEST_MECHANISMS[a["hash_id"]]
    return "00", {"hash": bytes(backend.session.digest(bytes(a["data"]), mechanism=mechanism))}
