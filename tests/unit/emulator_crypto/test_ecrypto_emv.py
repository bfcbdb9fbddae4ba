"""EMV ARQC / ARPC (VECTORS.md section 11)."""

from __future__ import annotations

import pytest

from emulator.crypto.emv import (
    common_sk_diversification,
    derive_common_session_key,
    derive_icc_mk,
    generate_arpc_method1,
    generate_arpc_method2,
    generate_arqc,
    verify_arqc,
)
from emulator.crypto.errors import CryptoError
from emulator.crypto.lmk import kcv_tdes

ISSUER_MK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
R = bytes.fromhex("1234567890123456")
DATA = bytes.fromhex("0123456789ABCDEF0123456789ABCDEF")


def _kcv2(key: bytes) -> str:
    return kcv_tdes(key)[:2].hex().upper()


@pytest.mark.parametrize(
    ("pan", "icc_kcv", "sk_kcv", "arqc", "arpc"),
    [
        ("9901234567890123", "1DA5", "0995", "4B46013359B7A58B", "F8C9CECAABD55AD1"),
        ("12345678901234567", "FF08", "DF82", "19C1FBC83EBDC0D5", "78A372523FA35A03"),
    ],
)
def test_vectors(pan: str, icc_kcv: str, sk_kcv: str, arqc: str, arpc: str) -> None:
    assert _kcv2(ISSUER_MK) == "08D7"
    icc_mk = derive_icc_mk(ISSUER_MK, pan, "45")
    assert _kcv2(icc_mk) == icc_kcv
    sk = derive_common_session_key(icc_mk, R)
    assert _kcv2(sk) == sk_kcv
    assert generate_arqc(sk, DATA).hex().upper() == arqc
    verify_arqc(sk, DATA, bytes.fromhex(arqc))
    # The published ARPCs are computed under the ICC master key, not the session key.
    assert generate_arpc_method1(icc_mk, bytes.fromhex(arqc), b"\x00\x00").hex().upper() == arpc
    assert generate_arpc_method1(sk, bytes.fromhex(arqc), b"\x00\x00").hex().upper() != arpc


def test_verify_failure_and_padding() -> None:
    sk = derive_common_session_key(derive_icc_mk(ISSUER_MK, "9901234567890123", "45"), R)
    with pytest.raises(CryptoError) as exc:
        verify_arqc(sk, DATA, bytes.fromhex("4B46013359B7A58C"))
    assert exc.value.code == "01"
    assert generate_arqc(sk, DATA, padding="visa") != generate_arqc(sk, DATA)
    assert len(generate_arpc_method2(sk, bytes(8), bytes(4))) == 4


def test_diversification_and_errors() -> None:
    assert common_sk_diversification(b"\x00\x01", b"\xaa\xbb\xcc\xdd").hex() == "00010000aabbccdd"
    with pytest.raises(CryptoError) as exc:
        common_sk_diversification(b"\x00", b"\xaa\xbb\xcc\xdd")
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        derive_icc_mk(ISSUER_MK[:8], "9901234567890123", "45")
    assert exc.value.code == "27"
    with pytest.raises(CryptoError) as exc:
        derive_icc_mk(ISSUER_MK, "99012345678901X3", "45")
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        derive_common_session_key(ISSUER_MK, bytes(7))
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        generate_arpc_method1(ISSUER_MK, bytes(8), b"\x00")
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        verify_arqc(ISSUER_MK, DATA, bytes(4))
    assert exc.value.code == "15"
