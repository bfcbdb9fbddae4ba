"""Block-cipher helpers and the error type."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest

from emulator.crypto.cipher import (
    aes_cbc_decrypt,
    aes_cbc_encrypt,
    expand_des_key,
    legacy_tdes,
    tdes_cbc_decrypt,
    tdes_cbc_encrypt,
    tdes_ecb_encrypt,
    xor,
)
from emulator.crypto.errors import CryptoError


def test_single_and_double_des_equivalences() -> None:
    k = bytes.fromhex("0123456789ABCDEF")
    assert tdes_ecb_encrypt(k, bytes(8)) == tdes_ecb_encrypt(k + k, bytes(8))
    assert expand_des_key(k + bytes(8)) == k + bytes(8) + k


def test_cbc_round_trips() -> None:
    key = bytes(range(16))
    data = bytes(range(32))
    assert tdes_cbc_decrypt(key, bytes(8), tdes_cbc_encrypt(key, bytes(8), data)) == data
    assert aes_cbc_decrypt(key, bytes(16), aes_cbc_encrypt(key, bytes(16), data)) == data


def test_errors() -> None:
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: tdes_ecb_encrypt(bytes(16), bytes(7)), "15"),
        (lambda: tdes_ecb_encrypt(bytes(12), bytes(8)), "27"),
        (lambda: tdes_cbc_encrypt(bytes(16), bytes(16), bytes(8)), "15"),
        (lambda: aes_cbc_encrypt(bytes(15), bytes(16), bytes(16)), "27"),
        (lambda: xor(b"a", b"ab"), "15"),
    ]
    for call, code in cases:
        with pytest.raises(CryptoError) as exc:
            call()
        assert exc.value.code == code
    with pytest.raises(ValueError):
        CryptoError("1", "bad code")
    err = CryptoError("20", "PIN block invalid")
    assert str(err) == "20: PIN block invalid"
    assert (err.code, err.message) == ("20", "PIN block invalid")


def test_legacy_tdes_only_quiets_tripledes_warnings() -> None:
    from cryptography.utils import CryptographyDeprecationWarning

    with legacy_tdes():
        warnings.warn("Two-key TripleDES is deprecated", CryptographyDeprecationWarning, stacklevel=1)
    with pytest.raises(UserWarning), legacy_tdes():
        warnings.warn("something else", UserWarning, stacklevel=1)
