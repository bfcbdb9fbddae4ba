"""MAC algorithms (VECTORS.md section 9)."""

from __future__ import annotations

import psec
import pytest

from emulator.crypto.cipher import legacy_tdes, xor
from emulator.crypto.errors import CryptoError
from emulator.crypto.mac import aes_cmac, cbc_mac, check_mac, pad, retail_mac, tdes_cmac

DUKPT_KEY = bytes.fromhex("042666B49184CFA368DE9628D0397BC9")
DATA = b"4012345678909D987"


def test_retail_mac_request_key() -> None:
    key = xor(DUKPT_KEY, bytes.fromhex("000000000000FF00000000000000FF00"))
    assert retail_mac(key, DATA, padding=1).hex().upper() == "9CCC78173FC4FB64"


def test_retail_mac_response_key() -> None:
    key = xor(DUKPT_KEY, bytes.fromhex("00000000FF00000000000000FF000000"))
    assert retail_mac(key, DATA, padding=1).hex().upper() == "20364223C1FF00FA"


def test_x9_9_single_des_cbc_mac() -> None:
    key = bytes.fromhex("E9CB01B93B20914F")
    data = bytes.fromhex("676976656D65534F4D454D4143696E67")
    assert cbc_mac(key, data)[:4].hex().upper() == "170C2BDB"


@pytest.mark.parametrize(
    ("data", "mac"),
    [
        ("", "BB1D6929E95937287FA37D129B756746"),
        ("6BC1BEE22E409F96E93D7E117393172A", "070A16B46B4D4144F79BDD9DD04A287C"),
    ],
)
def test_aes_cmac_sp800_38b(data: str, mac: str) -> None:
    key = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
    assert aes_cmac(key, bytes.fromhex(data)).hex().upper() == mac


def test_tdes_cmac_sp800_38b() -> None:
    """NIST SP 800-38B D.4 (three-key TDEA), examples 1 and 2."""
    key = bytes.fromhex("8AA83BF8CBDA10620BC1BF19FBB6CD58BC313D4A371CA8B5")
    assert tdes_cmac(key, b"").hex().upper() == "B7A688E122FFAF95"
    data = bytes.fromhex("6BC1BEE22E409F96")
    assert tdes_cmac(key, data).hex().upper() == "8E8F293136283797"


def test_cbc_mac_matches_psec() -> None:
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    data = bytes.fromhex("1234567890ABCDEF")
    assert cbc_mac(key, data, padding=2).hex().upper() == "925B1737EF681AD3"
    with legacy_tdes():
        assert cbc_mac(key, b"abc", padding=1) == psec.mac.generate_cbc_mac(key, b"abc", 1)


def test_retail_mac_psec_doc_example() -> None:
    """psec's own retail MAC example: key1 = K, key2 = K with halves swapped."""
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    data = bytes.fromhex("1234567890ABCDEF")
    with legacy_tdes():
        expected = psec.mac.generate_retail_mac(key[:8], key[8:], data, 2)
    assert retail_mac(key, data, padding=2) == expected


def test_iv_chains_blocks() -> None:
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    data = bytes(range(24))
    first = cbc_mac(key, data[:16])
    assert cbc_mac(key, data[16:], iv=first) == cbc_mac(key, data)
    assert retail_mac(key, data, iv=bytes(8)) == retail_mac(key, data)


def test_padding() -> None:
    assert pad(b"", 1) == bytes(8)
    assert pad(b"\x12\x34", 2).hex() == "1234800000000000"
    assert pad(bytes(8), 2, 16) == bytes(8) + b"\x80" + bytes(7)
    assert len(pad(b"abc", 3)) == 16
    with pytest.raises(CryptoError) as exc:
        pad(b"", 4)
    assert exc.value.code == "15"


def test_errors() -> None:
    with pytest.raises(CryptoError) as exc:
        retail_mac(bytes(8), b"x")
    assert exc.value.code == "27"
    with pytest.raises(CryptoError) as exc:
        cbc_mac(bytes(7), b"x")
    assert exc.value.code == "27"
    with pytest.raises(CryptoError) as exc:
        cbc_mac(bytes(8), b"x", iv=bytes(4))
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        aes_cmac(bytes(8), b"x")
    assert exc.value.code == "27"
    with pytest.raises(CryptoError) as exc:
        tdes_cmac(bytes(8), b"x")
    assert exc.value.code == "27"


def test_check_mac() -> None:
    check_mac(bytes.fromhex("9CCC78173FC4FB64"), bytes.fromhex("9CCC7817"))
    with pytest.raises(CryptoError) as exc:
        check_mac(bytes.fromhex("9CCC78173FC4FB64"), bytes.fromhex("9CCC7818"))
    assert exc.value.code == "01"
    with pytest.raises(CryptoError):
        check_mac(bytes(8), b"")
