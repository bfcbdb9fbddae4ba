"""RSA: EI (generate a key pair), EW (sign), EY (verify a signature).

EI request: key type indicator 1 (``0``-``4``) + modulus length 4 (bits, 1024-4096, a multiple of 8;
payShield's 320-1023 answer ``15``: ``cryptography`` does not generate them) + public key encoding
2 [+ exponent length 4 (in bits, as payShield) + exponent (binary, 3 or 65537; default 65537)].
EI response: MAC 4 bytes + public key (DER PKCS#1 RSAPublicKey) + private key length 4 + private key
under LMK (:func:`emulator.crypto.rsa.encrypt_private_key_under_lmk`).

- Encoding ``01``: DER with the INTEGERs in unsigned representation (no leading 00 byte even when
  the top bit is set, as payShield does); ``02``: standard DER (two's complement). Public keys in
  EY are read with either representation (:func:`decode_public_key`).
- Public-key MAC (hsmproxy's definition; payShield's is proprietary): the leftmost 4 bytes of the
  ISO 9797-1 alg. 1 TDES CBC-MAC (padding method 1) of the DER bytes under LMK pair 36-37,
  variant 0 (:func:`public_key_mac`).

EW: hash id 2 (``01`` SHA-1, ``05`` SHA-224, ``06`` SHA-256, ``07`` SHA-384, ``08`` SHA-512) +
signature id 2 (``01`` RSA) + pad mode 2 (``01`` PKCS#1 v1.5) + message length 4 + message + ``;``
+ private key flag 2 (``99`` = key in the command; ``00``-``20`` user storage is not held: ``12``)
+ private key length 4 + private key. Response: signature length 4 + signature.

EY: hash id + signature id + pad mode + signature length 4 + signature + ``;`` + message length 4 +
message + ``;`` + MAC 4 bytes + DER public key. ``01`` public-key MAC failure, ``02`` signature
does not verify.

Other errors: ``15`` bad flags, hash id or DER, ``43`` key generation failure, ``78`` private key
length, ``12`` user storage key flag.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.asymmetric import rsa as _rsa

from emulator.commands.common import raw, text, variant_lmk
from emulator.crypto.errors import CryptoError
from emulator.crypto.hashes import hash_algorithm
from emulator.crypto.lmk import VariantLmk
from emulator.crypto.mac import cbc_mac
from emulator.crypto.rsa import (
    decrypt_private_key_under_lmk,
    encrypt_private_key_under_lmk,
    generate_rsa_key_pair,
    load_public_key_der,
    sign,
    verify,
)
from emulator.hsm import Handler, Reply
from emulator.state import EmulatorState
from protocols.hostcmd.fields import Values

#: LMK pair whose variant 0 MACs public keys (key type 00D).
PUBLIC_KEY_MAC_PAIR = "36"


def public_key_mac(lmk: VariantLmk, der: bytes) -> bytes:
    """hsmproxy's 4-byte public-key MAC: ISO 9797-1 alg. 1, pad 1, under LMK pair 36-37 (variant 0)."""
    return cbc_mac(lmk.pair(PUBLIC_KEY_MAC_PAIR), der, padding=1)[:4]


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _der_integer(value: int, *, unsigned: bool) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    if not unsigned and body[0] & 0x80:
        body = b"\x00" + body
    return _der(0x02, body)


def encode_public_key(key: _rsa.RSAPublicKey, *, unsigned: bool) -> bytes:
    """DER PKCS#1 RSAPublicKey; ``unsigned`` drops the sign byte of the INTEGERs (encoding 01)."""
    numbers = key.public_numbers()
    return _der(0x30, _der_integer(numbers.n, unsigned=unsigned) + _der_integer(numbers.e, unsigned=unsigned))


def _read(der: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    if pos + 2 > len(der) or der[pos] != tag:
        raise CryptoError("15", "invalid DER public key")
    first, pos = der[pos + 1], pos + 2
    length = first
    if first & 0x80:
        size = first & 0x7F
        if not 1 <= size <= 3:
            raise CryptoError("15", "invalid DER length")
        length, pos = int.from_bytes(der[pos : pos + size], "big"), pos + size
    if pos + length > len(der):
        raise CryptoError("15", "DER element truncated")
    return der[pos : pos + length], pos + length


def decode_public_key(der: bytes) -> _rsa.RSAPublicKey:
    """Read an RSA public key: PKCS#1 DER with unsigned or two's-complement INTEGERs, or SPKI."""
    try:
        body, end = _read(der, 0, 0x30)
        n_bytes, pos = _read(body, 0, 0x02)
        e_bytes, pos = _read(body, pos, 0x02)
        if end != len(der) or pos != len(body):
            raise CryptoError("15", "trailing data in DER public key")
    except CryptoError:
        return load_public_key_der(der)
    n, e = int.from_bytes(n_bytes, "big"), int.from_bytes(e_bytes, "big")
    try:
        return _rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        raise CryptoError("15", "invalid RSA public key") from None


def _check_ids(v: Values) -> str:
    hash_id = text(v, "hash_id")
    hash_algorithm(hash_id)  # 15 when unknown
    if text(v, "signature_id") != "01" or text(v, "pad_mode") != "01":
        raise CryptoError("15", "only RSA signatures with PKCS#1 v1.5 padding are supported")
    return hash_id


def ei(state: EmulatorState, v: Values) -> Reply:
    """EI: generate an RSA key pair; public key (MAC'd) and private key under the LMK."""
    encoding = text(v, "public_key_encoding")
    if text(v, "key_type_indicator") not in ("0", "1", "2", "3", "4") or encoding not in ("01", "02"):
        raise CryptoError("15", "invalid key type indicator or public key encoding")
    exponent = int.from_bytes(raw(v, "exponent"), "big") if "exponent" in v else 65537
    key = generate_rsa_key_pair(int(text(v, "modulus_length")), exponent)
    lmk = variant_lmk(state, v)
    der = encode_public_key(key.public_key(), unsigned=encoding == "01")
    blob = encrypt_private_key_under_lmk(lmk, key)
    return Reply(
        values={
            "mac": public_key_mac(lmk, der),
            "public_key": der,
            "private_key_length": f"{len(blob):04d}",
            "private_key": blob,
        }
    )


def ew(state: EmulatorState, v: Values) -> Reply:
    """EW: sign a message (PKCS#1 v1.5) with a private key under the LMK."""
    hash_id = _check_ids(v)
    flag = text(v, "private_key_flag")
    if flag != "99":
        raise CryptoError("12" if int(flag) <= 20 else "15", "private keys in user storage are not held")
    key = decrypt_private_key_under_lmk(variant_lmk(state, v), raw(v, "private_key"))
    signature = sign(key, hash_id, raw(v, "message"))
    return Reply(values={"signature_length": f"{len(signature):04d}", "signature": signature})


def ey(state: EmulatorState, v: Values) -> Reply:
    """EY: verify a PKCS#1 v1.5 signature with a MAC'd public key (``01`` MAC, ``02`` signature)."""
    hash_id = _check_ids(v)
    der = raw(v, "public_key")
    if not hmac.compare_digest(public_key_mac(variant_lmk(state, v), der), raw(v, "mac")):
        return Reply(error="01")
    try:
        verify(decode_public_key(der), hash_id, raw(v, "message"), raw(v, "signature"))
    except CryptoError as exc:
        if exc.code == "01":
            return Reply(error="02")
        raise
    return Reply()


HANDLERS: dict[str, Handler] = {"EI": ei, "EW": ew, "EY": ey}
