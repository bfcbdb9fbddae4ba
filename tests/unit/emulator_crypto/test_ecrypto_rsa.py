"""RSA key pairs, private key under LMK, PKCS#1 v1.5 signatures."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric import rsa as crsa

from emulator.crypto.errors import CryptoError
from emulator.crypto.lmk import TEST_LMK
from emulator.crypto.rsa import (
    decrypt_private_key_under_lmk,
    encrypt_private_key_under_lmk,
    generate_rsa_key_pair,
    load_public_key_der,
    public_key_der,
    sign,
    verify,
)


@pytest.fixture(scope="module")
def key() -> crsa.RSAPrivateKey:
    return generate_rsa_key_pair(1024)


def test_generate(key: crsa.RSAPrivateKey) -> None:
    assert key.key_size == 1024
    assert key.public_key().public_numbers().e == 65537


def test_public_key_der_is_pkcs1(key: crsa.RSAPrivateKey) -> None:
    der = public_key_der(key.public_key())
    # SEQUENCE { INTEGER n, INTEGER e } ending in 02 03 01 00 01.
    assert der[0] == 0x30
    assert der.endswith(bytes.fromhex("0203010001"))
    loaded = serialization.load_der_public_key(der)
    assert isinstance(loaded, crsa.RSAPublicKey)
    assert loaded.public_numbers() == key.public_key().public_numbers()
    assert load_public_key_der(der).public_numbers() == key.public_key().public_numbers()


@pytest.mark.parametrize(
    ("hash_id", "algorithm"),
    [
        ("01", hashes.SHA1()),
        ("05", hashes.SHA224()),
        ("06", hashes.SHA256()),
        ("07", hashes.SHA384()),
        ("08", hashes.SHA512()),
    ],
)
def test_sign_verify(key: crsa.RSAPrivateKey, hash_id: str, algorithm: hashes.HashAlgorithm) -> None:
    message = b"payShield EW message"
    signature = sign(key, hash_id, message)
    assert len(signature) == 128
    verify(key.public_key(), hash_id, message, signature)
    # cryptography's own verifier accepts it (raises otherwise).
    key.public_key().verify(signature, message, padding.PKCS1v15(), algorithm)
    with pytest.raises(CryptoError) as exc:
        verify(key.public_key(), hash_id, message + b"!", signature)
    assert exc.value.code == "01"


def test_private_key_under_lmk(key: crsa.RSAPrivateKey) -> None:
    blob = encrypt_private_key_under_lmk(TEST_LMK, key)
    assert len(blob) % 8 == 0
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert der not in blob
    restored = decrypt_private_key_under_lmk(TEST_LMK, blob)
    assert restored.private_numbers() == key.private_numbers()
    with pytest.raises(CryptoError) as exc:
        decrypt_private_key_under_lmk(TEST_LMK, blob[:-1])
    assert exc.value.code == "78"
    with pytest.raises(CryptoError) as exc:
        decrypt_private_key_under_lmk(TEST_LMK, blob[8:])
    assert exc.value.code == "15"


def test_errors() -> None:
    with pytest.raises(CryptoError) as exc:
        generate_rsa_key_pair(512)
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        generate_rsa_key_pair(1028)
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        generate_rsa_key_pair(1024, 17)
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        load_public_key_der(b"\x30\x00")
    assert exc.value.code == "15"
