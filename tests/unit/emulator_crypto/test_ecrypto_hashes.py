"""payShield hash identifiers."""

from __future__ import annotations

import hashlib

import pytest

from emulator.crypto.errors import CryptoError
from emulator.crypto.hashes import digest, hash_algorithm


@pytest.mark.parametrize(
    ("hash_id", "name"),
    [("01", "sha1"), ("05", "sha224"), ("06", "sha256"), ("07", "sha384"), ("08", "sha512")],
)
def test_digest(hash_id: str, name: str) -> None:
    assert digest(hash_id, b"abc") == hashlib.new(name, b"abc").digest()
    assert hash_algorithm(hash_id).name == name


def test_known_answer_sha256() -> None:
    assert digest("06", b"abc").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@pytest.mark.parametrize("hash_id", ["00", "02", "09", "6", ""])
def test_unknown(hash_id: str) -> None:
    with pytest.raises(CryptoError) as exc:
        digest(hash_id, b"")
    assert exc.value.code == "15"
