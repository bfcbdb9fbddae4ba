"""Variant LMK, key check values, parity and LMK files (VECTORS.md sections 5 and 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.crypto.errors import CryptoError
from emulator.crypto.keyblock import KeyBlockLmk
from emulator.crypto.lmk import (
    TEST_LMK,
    VariantLmk,
    adjust_parity,
    decrypt_key_under_lmk,
    decrypt_under_lmk_pair,
    encrypt_key_under_lmk,
    encrypt_under_lmk_pair,
    has_odd_parity,
    kcv_aes_cmac,
    kcv_tdes,
    lmk_variant,
    load_lmk_file,
    parse_key_type,
    split_key_scheme,
)

KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")


def test_test_lmk_pairs() -> None:
    assert TEST_LMK.pair("00").hex().upper() == "01010101010101017902CD1FD36EF8BA"
    assert TEST_LMK.pair("02").hex().upper() == "20202020202020203131313131313131"
    assert TEST_LMK.pair("16").hex().upper() == "1C587F1C13924FEF0101010101010101"
    assert TEST_LMK.pair("38").hex().upper() == "01010101010101010101010101010101"
    with pytest.raises(CryptoError) as exc:
        TEST_LMK.pair("01")
    assert exc.value.code == "15"


@pytest.mark.parametrize(
    ("variant", "expected"),
    [(1, "UA12049CC30D20BE0DC6E5E2A98FADE9E"), (2, "UBD7F64B9F9875B731BAED72101DEA65B")],
)
def test_external_vector(variant: int, expected: str) -> None:
    """VECTORS.md section 5: Thales tool capture, LMK 00-01."""
    assert encrypt_under_lmk_pair(TEST_LMK.pair("00"), variant, "U", KEY) == expected
    assert decrypt_under_lmk_pair(TEST_LMK.pair("00"), variant, expected) == KEY


def test_kcv_tdes() -> None:
    assert kcv_tdes(KEY).hex().upper() == "08D7B4FB629D0885"
    assert kcv_tdes(KEY)[:3].hex().upper() == "08D7B4"


def test_kcv_aes_cmac() -> None:
    """VECTORS.md section 10."""
    key = bytes.fromhex("3F419E1CB7079442AA37474C2EFBF8B8")
    assert kcv_aes_cmac(key)[:5].hex().upper() == "08793E25AB"
    assert kcv_tdes(key)[:3].hex().upper() == "57C409"
    with pytest.raises(CryptoError) as exc:
        kcv_aes_cmac(bytes(8))
    assert exc.value.code == "27"


def test_lmk_variant_bytes() -> None:
    pair = bytes(16)
    assert lmk_variant(pair, 3, "T", 1).hex().upper() == "6A00000000000000DE00000000000000"
    assert lmk_variant(pair, 9, "U", 0)[0] == 0xFA
    assert lmk_variant(pair, 0, "U", 1)[8] == 0x5A
    assert lmk_variant(pair, 5, "X", 0) == bytes([0x2B]) + bytes(15)
    assert lmk_variant(pair, 0, "", 0) == pair


def test_key_type_parsing() -> None:
    assert parse_key_type("001") == ("06", 0)
    assert parse_key_type("402") == ("14", 4)
    assert parse_key_type("00a") == ("30", 0)
    assert parse_key_type("709") == ("28", 7)
    for bad in ("0", "0FF", "A01", "0001"):
        with pytest.raises(CryptoError) as exc:
            parse_key_type(bad)
        assert exc.value.code == "04"


@pytest.mark.parametrize(
    ("scheme", "length"), [("", 8), ("Z", 8), ("U", 16), ("X", 16), ("T", 24), ("Y", 24)]
)
def test_round_trip_each_scheme(scheme: str, length: int) -> None:
    clear = adjust_parity(bytes(range(1, length + 1)))
    value = encrypt_key_under_lmk(TEST_LMK, "001", scheme, clear)
    assert value[: len(scheme)] == scheme
    assert len(value) == len(scheme) + 2 * length
    assert decrypt_key_under_lmk(TEST_LMK, "001", value, check_parity=True) == clear


def test_scheme_variants_change_ciphertext() -> None:
    u = encrypt_key_under_lmk(TEST_LMK, "001", "U", KEY)
    x = encrypt_key_under_lmk(TEST_LMK, "001", "X", KEY)
    assert u[1:] != x[1:]
    # X: no scheme variant, each half plain ECB under the key-type variant LMK.
    halves = encrypt_key_under_lmk(TEST_LMK, "001", "", KEY[:8])
    assert x[1:17] == halves
    # Different key types give different ciphertexts.
    assert encrypt_key_under_lmk(TEST_LMK, "002", "U", KEY) != u


def test_errors() -> None:
    with pytest.raises(CryptoError) as exc:
        encrypt_key_under_lmk(TEST_LMK, "001", "U", bytes(8))
    assert exc.value.code == "27"
    with pytest.raises(CryptoError) as exc:
        encrypt_key_under_lmk(TEST_LMK, "001", "S", KEY)
    assert exc.value.code == "26"
    with pytest.raises(CryptoError) as exc:
        decrypt_key_under_lmk(TEST_LMK, "001", "R" + "0" * 32)
    assert exc.value.code == "26"
    with pytest.raises(CryptoError) as exc:
        decrypt_key_under_lmk(TEST_LMK, "001", "U" + "0" * 30)
    assert exc.value.code == "27"
    with pytest.raises(CryptoError) as exc:
        decrypt_key_under_lmk(TEST_LMK, "001", "U" + "G" * 32)
    assert exc.value.code == "15"
    even = encrypt_key_under_lmk(TEST_LMK, "001", "U", bytes(16))
    with pytest.raises(CryptoError) as exc:
        decrypt_key_under_lmk(TEST_LMK, "001", even, check_parity=True)
    assert exc.value.code == "10"
    assert "00000000" not in exc.value.message


def test_split_key_scheme() -> None:
    assert split_key_scheme("0123456789ABCDEF") == ("", "0123456789ABCDEF")
    assert split_key_scheme("ABCDEF0123456789") == ("", "ABCDEF0123456789")
    assert split_key_scheme("Y" + "1" * 48) == ("Y", "1" * 48)


def test_parity() -> None:
    assert has_odd_parity(KEY)
    assert not has_odd_parity(bytes(8))
    assert adjust_parity(bytes(2)) == b"\x01\x01"
    assert adjust_parity(bytes.fromhex("1A2B3C4D5F0A1B2C4D5F6A7B8C9D0F1A")).hex().upper() == (
        "1A2A3D4C5E0B1A2C4C5E6B7A8C9D0E1A"
    )


def test_check_value_is_pair_00_kcv() -> None:
    assert TEST_LMK.check_value() == kcv_tdes(TEST_LMK.pair("00"))


def _test_lmk_text(lmk_id: str) -> str:
    lines = [f"lmk id={lmk_id} scheme=variant"]
    for i, pair in enumerate(TEST_LMK.pairs):
        h = pair.hex().upper()
        lines.append(f"pair {2 * i:02d}-{2 * i + 1:02d} = {h[:16]} {h[16:]}")
    return "\n".join(lines) + "\n"


def test_load_lmk_file(tmp_path: Path) -> None:
    kb_key = bytes(range(32))
    comp_a = bytes([0x55] * 32)
    comp_b = bytes(x ^ 0x55 for x in kb_key)
    text = (
        "# test LMKs\n\n"
        + _test_lmk_text("00").replace(
            "pair 02-03 = 2020202020202020 3131313131313131",
            "pair 02-03 = 2020202020202020 3131313131313130 ^ 00000000000000000000000000000001",
        )
        + "lmk id=01 scheme=keyblock version=1\n"
        + f"key = {comp_a.hex()} ^ {comp_b.hex()}\n"
    )
    path = tmp_path / "lmk.txt"
    path.write_text(text, encoding="utf-8")
    lmks = load_lmk_file(path)
    assert lmks["00"] == TEST_LMK
    assert lmks["01"] == KeyBlockLmk("1", kb_key)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("pair 00-01 = " + "00" * 16 + "\n", "15"),
        ("lmk id=0 scheme=variant\n", "13"),
        ("lmk id=00 scheme=other\n", "15"),
        ("lmk id=00 scheme=variant\npair 00-01 = 0101\n", "15"),
        ("lmk id=00 scheme=variant\npair 01-02 = " + "00" * 16 + "\n", "15"),
        ("lmk id=00 scheme=variant\npair 00-01 = " + "01" * 16 + "\n", "15"),
        ("lmk id=01 scheme=keyblock version=2\n", "15"),
        ("lmk id=01 scheme=keyblock version=1\n", "15"),
        ("lmk id=01 scheme=keyblock version=0\nkey = " + "11" * 24 + "\nbogus\n", "15"),
    ],
)
def test_load_lmk_file_errors(tmp_path: Path, text: str, code: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CryptoError) as exc:
        load_lmk_file(path)
    assert exc.value.code == code
    assert "01010101" not in exc.value.message


def test_duplicate_lmk_id(tmp_path: Path) -> None:
    path = tmp_path / "dup.txt"
    path.write_text(_test_lmk_text("00") + _test_lmk_text("00"), encoding="utf-8")
    with pytest.raises(CryptoError) as exc:
        load_lmk_file(path)
    assert exc.value.code == "13"


def test_variant_lmk_shape() -> None:
    with pytest.raises(CryptoError):
        VariantLmk((bytes(16),) * 19)
