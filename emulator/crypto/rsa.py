"""RSA: key pairs, DER public keys, private key under LMK, PKCS#1 v1.5 signatures.

- Public keys are DER PKCS#1 ``RSAPublicKey`` (what payShield EI returns with
  public key encoding ``01``).
- Private key under LMK is hsmproxy's own format (payShield's is
  proprietary): the DER PKCS#1 ``RSAPrivateKey``, padded with ISO/IEC 9797-1
  method 2 (``80`` then zeros to a multiple of 8), encrypted with two-key
  TDES-CBC, IV zero, under LMK pair 34-35 with no variant (key type 00C).
- Signatures are RSASSA-PKCS1-v1_5 with the payShield hash identifiers of
  :mod:`emulator.crypto.hashes`.

Errors: ``15`` bad modulus/exponent or undecodable key, ``43`` key
generation failure, ``78`` private key length error, ``01`` signature
verification failure.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric import rsa as _rsa

from emulator.crypto.cipher import tdes_cbc_decrypt, tdes_cbc_encrypt
from emulator.crypto.errors import CryptoError
from emulator.crypto.hashes import hash_algorithm
from emulator.crypto.lmk import VariantLmk
from emulator.crypto.mac import pad

__all__ = [
    "PRIVATE_KEY_LMK_PAIR",
    "decrypt_private_key_under_lmk",
    "encrypt_private_key_under_lmk",
    "generate_rsa_key_pair",
    "load_public_key_der",
    "public_key_der",
    "sign",
    "verify",
]

#: LMK pair protecting RSA private keys (key type 00C).
PRIVATE_KEY_LMK_PAIR = "34"

_MIN_BITS, _MAX_BITS = 1024, 4096


def generate_rsa_key_pair(modulus_bits: int, public_exponent: int = 65537) -> _rsa.RSAPrivateKey:
    """Generate an RSA key pair of ``modulus_bits`` (1024-4096, multiple of 8)."""
    if not _MIN_BITS <= modulus_bits <= _MAX_BITS or modulus_bits % 8:
        raise CryptoError("15", "modulus length must be 1024-4096 bits, a multiple of 8")
    if public_exponent not in (3, 65537):
        raise CryptoError("15", "public exponent must be 3 or 65537")
    try:
        return _rsa.generate_private_key(public_exponent, modulus_bits)
    except ValueError:
        raise CryptoError("43", "RSA key generation failed") from None


def public_key_der(key: _rsa.RSAPublicKey) -> bytes:
    """Return the DER PKCS#1 RSAPublicKey encoding of ``key``."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)


def load_public_key_der(der: bytes) -> _rsa.RSAPublicKey:
    """Load a DER RSA public key (PKCS#1 RSAPublicKey or SubjectPublicKeyInfo)."""
    try:
        key = serialization.load_der_public_key(der)
    except ValueError:
        raise CryptoError("15", "invalid DER public key") from None
    if not isinstance(key, _rsa.RSAPublicKey):
        raise CryptoError("15", "public key is not RSA")
    return key


def encrypt_private_key_under_lmk(lmk: VariantLmk, key: _rsa.RSAPrivateKey) -> bytes:
    """Return ``key`` encrypted under the LMK (format in the module docstring)."""
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return tdes_cbc_encrypt(lmk.pair(PRIVATE_KEY_LMK_PAIR), bytes(8), pad(der, 2))


def decrypt_private_key_under_lmk(lmk: VariantLmk, blob: bytes) -> _rsa.RSAPrivateKey:
    """Decrypt and load a private key produced by :func:`encrypt_private_key_under_lmk`."""
    if not blob or len(blob) % 8:
        raise CryptoError("78", "private key length error")
    padded = tdes_cbc_decrypt(lmk.pair(PRIVATE_KEY_LMK_PAIR), bytes(8), blob)
    der = padded.rstrip(b"\x00")
    if not der.endswith(b"\x80"):
        raise CryptoError("15", "private key under LMK is invalid")
    try:
        key = serialization.load_der_private_key(der[:-1], password=None)
    except ValueError:
        raise CryptoError("15", "private key under LMK is invalid") from None
    if not isinstance(key, _rsa.RSAPrivateKey):
        raise CryptoError("15", "private key is not RSA")
    return key


def sign(key: _rsa.RSAPrivateKey, hash_id: str, message: bytes) -> bytes:
    """Sign ``message`` with RSASSA-PKCS1-v1_5 and the hash ``hash_id``."""
    return key.sign(message, padding.PKCS1v15(), hash_algorithm(hash_id))


def verify(key: _rsa.RSAPublicKey, hash_id: str, message: bytes, signature: bytes) -> None:
    """Verify a PKCS#1 v1.5 signature; raise ``01`` when it does not verify."""
    algorithm = hash_algorithm(hash_id)
    try:
        key.verify(signature, message, padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise CryptoError("01", "signature verification failed") from None
