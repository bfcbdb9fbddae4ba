"""TDES DUKPT (VECTORS.md section 2) and AES DUKPT (section 3, ISO-4 rows of section 1)."""

from __future__ import annotations

import pytest

from emulator.crypto.cipher import tdes_cbc_encrypt, tdes_ecb_encrypt
from emulator.crypto.dukpt import (
    aes_initial_key,
    aes_transaction_key,
    aes_working_key,
    tdes_ipek,
    tdes_transaction_key,
    tdes_working_key,
)
from emulator.crypto.errors import CryptoError
from emulator.crypto.lmk import kcv_tdes
from emulator.crypto.mac import retail_mac
from emulator.crypto.pinblock import account_from_pan, decipher_iso4, encipher_iso4, encode_pin_block

BDK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
PIN_BLOCK = encode_pin_block("01", "1234", account_from_pan("4012345678909"))
MAC_DATA = b"4012345678909D987"
PADDED = MAC_DATA.ljust(24, b"\x00")

# KSN, transaction key, encrypted PIN block, request MAC, response MAC, request data
A4_ROWS = [
    ("FFFF9876543210E00001", "042666B49184CFA368DE9628D0397BC9", "1B9C1845EB993A7A",
     "9CCC78173FC4FB64", "20364223C1FF00FA",
     "FC0D53B7EA1FDA9EE68AAF2E70D9B9506229BE2AA993F04F"),
    ("FFFF9876543210E00002", "C46551CEF9FD24B0AA9AD834130D3BC7", "10A01C8D02C69107",
     "F608A9BCA6FFC311", "D1FCA6BEF05D24D2",
     "A2B4E70F846E63D68775B7215EB4563DFD3037244C61CC13"),
    ("FFFF9876543210E00003", "0DF3D9422ACA56E547676D07AD6BADFA", "18DC07B94797B466",
     "20B59A4FEAC937E3", "BAD4CC9CC2AE326C",
     "BD751E65F10E75B6C1D5B1D283496A36C2DE21D993C387A7"),
    ("FFFF9876543210E00004", "279C0F6AEED0BE652B2C733E1383AE91", "0BC79509D5645DF7",
     "C7BFA6CC44161828", "1EB08AEECE6FF0C2",
     "1118F50947441BBDA3C8C70220021A12EC31CC473F7215F4"),
    ("FFFF9876543210E00005", "5F8DC6D2C845C125508DDC048093B83F", "5BC0AF22AD87B327",
     "0202B96339022058", "5CBE3E81D1D2A0FB",
     "9FD7BD1EC28845ACA93367A9DA9317BD555C6B33AE22D365"),
]

ROLLOVER_ROWS = [
    ("FFFF9876543210EFF800", "F9CDFEBF4F5B1D9EB3EC12454527E176", "33365F5CC6F23C35"),
    ("FFFF9876543210EFF801", "5BEE92627E97825C911BF619DF72CA3B", "3A86BF003F835C9D"),
    ("FFFF9876543210EFF802", "64CA2F8AB93F61B01620B00BF77C7301", "3DB977D05C36DF3F"),
    ("FFFF9876543210EFF804", "35A168695B3BA83307E871C42021DD37", "BA83243305712099"),
    ("FFFF9876543210EFFC00", "F9430DF975082491C77BE4EF4FDB91EE", "DEFC6F09F8927B71"),
    ("FFFF9876543210F00000", "AA4D58DB653EC74A48C75F2F047DD2B5", "73EC88AD0AC5830E"),
]


def _hex(b: bytes) -> str:
    return b.hex().upper()


def test_ipek() -> None:
    ipek = tdes_ipek(BDK, bytes.fromhex("FFFF9876543210E00000"))
    assert _hex(ipek) == "6AC292FAA1315B4D858AB3A3D7D5933A"
    assert _hex(kcv_tdes(ipek)[:3]) == "AF8C07"
    # The counter is ignored.
    assert tdes_ipek(BDK, bytes.fromhex("FFFF9876543210E00005")) == ipek


def test_clear_pin_block() -> None:
    assert _hex(PIN_BLOCK) == "041274EDCBA9876F"


@pytest.mark.parametrize("row", A4_ROWS, ids=[r[0] for r in A4_ROWS])
def test_x9_24_1_a4(row: tuple[str, str, str, str, str, str]) -> None:
    ksn, key, epb, req_mac, resp_mac, req_data = row
    k = bytes.fromhex(ksn)
    assert _hex(tdes_transaction_key(BDK, k)) == key
    assert _hex(tdes_ecb_encrypt(tdes_working_key(BDK, k, "pin"), PIN_BLOCK)) == epb
    assert _hex(retail_mac(tdes_working_key(BDK, k, "mac_request"), MAC_DATA)) == req_mac
    assert _hex(retail_mac(tdes_working_key(BDK, k, "mac_response"), MAC_DATA)) == resp_mac
    data_key = tdes_working_key(BDK, k, "data_request")
    assert _hex(tdes_cbc_encrypt(data_key, bytes(8), PADDED)) == req_data


@pytest.mark.parametrize(
    ("ksn", "resp_data"),
    [
        ("FFFF9876543210E00001", "1FCC89AF66222F27B903898BB2BC8589CDBFDE5EC6AFCC25"),
        ("FFFF9876543210E00002", "5B692A6B1FDD5E25B0DEFAFDE1672E402F8011360CFF3508"),
    ],
)
def test_response_data(ksn: str, resp_data: str) -> None:
    key = tdes_working_key(BDK, bytes.fromhex(ksn), "data_response")
    assert _hex(tdes_cbc_encrypt(key, bytes(8), PADDED)) == resp_data


@pytest.mark.parametrize(("ksn", "key", "epb"), ROLLOVER_ROWS)
def test_rollover(ksn: str, key: str, epb: str) -> None:
    k = bytes.fromhex(ksn)
    assert _hex(tdes_transaction_key(BDK, k)) == key
    assert _hex(tdes_ecb_encrypt(tdes_working_key(BDK, k, "pin"), PIN_BLOCK)) == epb


def test_tdes_errors() -> None:
    with pytest.raises(CryptoError) as exc:
        tdes_ipek(BDK[:8], bytes(10))
    assert exc.value.code == "27"
    with pytest.raises(CryptoError) as exc:
        tdes_transaction_key(BDK, bytes(9))
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        tdes_working_key(BDK, bytes(10), "kek")  # type: ignore[arg-type]
    assert exc.value.code == "15"


# --- AES DUKPT -------------------------------------------------------------------

AES_BDK = bytes.fromhex("FEDCBA9876543210F1F1F1F1F1F1F1F1")
IKID = bytes.fromhex("1234567890123456")

AES_ROWS = [
    (0x00000001, "4F21B565BAD9835E112B6465635EAE44", "AF8CB133A78F8DC2D1359F18527593FB",
     "A2DC23DE6FDE0824A2BC321E08E4B8B7", "A35C412EFD41FDB98B69797C02DCD08F"),
    (0x00000002, "2F34D68DE10F68D38091A73B9E7C437C", "D30BDC73EC9714B000BEC66BDB7B6D09",
     "484C3B06E8562704528CD5B46FB12FB6", "D639514AA33AC43AD9229E433D6D4E5B"),
    (0x00000003, "031504E530365CF81264238540518318", "7D69F01F3B45449F62C7816ECE723268",
     "A5DF7D9D800CA769766F0C77CA4E6E6C", "EF17F6AB45B4820C93A3DCB21BC491AD"),
    (0x00000004, "0EEFC7ADA628BA68878DA9165A8A1887", "91A0588318EC2673214271F70137896E",
     "E6E4679647D8A9057C1FC15537CB4C4E", "B3BD44C08BB6BA27C3BB4711D7D70387"),
]

AES_TRANSACTION_ONLY = [
    (0x0001FFFE, "E21E8C8D347F8561A2BE752DAA85A111"),
    (0x00020000, "F7AE9025468A25D37B7249CFFED224C8"),
    (0xFFFE2000, "48E585B694EB0B18D5C35443E163C0BA"),
    (0xFFFF0000, "F6BA59389BD14A9855BE9727E7C52E3C"),
]


def _ksn(counter: int) -> bytes:
    return IKID + counter.to_bytes(4, "big")


def test_aes_initial_keys() -> None:
    assert _hex(aes_initial_key(AES_BDK, IKID)) == "1273671EA26AC29AFA4D1084127652A1"
    bdk256 = bytes.fromhex("FEDCBA9876543210F1F1F1F1F1F1F1F1FEDCBA9876543210F1F1F1F1F1F1F1F1")
    assert _hex(aes_initial_key(bdk256, IKID)) == (
        "CE9CE0C101D1138F97FB6CAD4DF045A7083D4EAE2D35A31789D01CCF0949550F"
    )
    assert len(aes_working_key(bdk256, _ksn(1), "pin")) == 32
    assert len(aes_working_key(bdk256, _ksn(1), "pin", "AES-128")) == 16
    assert len(aes_working_key(AES_BDK, _ksn(1), "mac_both", "2TDEA")) == 16


@pytest.mark.parametrize(("counter", "tk", "pin", "mac", "data"), AES_ROWS)
def test_aes_x9_24_3(counter: int, tk: str, pin: str, mac: str, data: str) -> None:
    ksn = _ksn(counter)
    assert _hex(aes_transaction_key(AES_BDK, ksn)) == tk
    assert _hex(aes_working_key(AES_BDK, ksn, "pin")) == pin
    assert _hex(aes_working_key(AES_BDK, ksn, "mac_generate")) == mac
    assert _hex(aes_working_key(AES_BDK, ksn, "data_encrypt")) == data


@pytest.mark.parametrize(("counter", "tk"), AES_TRANSACTION_ONLY)
def test_aes_transaction_keys(counter: int, tk: str) -> None:
    assert _hex(aes_transaction_key(AES_BDK, _ksn(counter))) == tk


@pytest.mark.parametrize(
    ("counter", "block"),
    [
        (1, "A912150391AB65A67E52883D81CE2D15"),
        (2, "52A00503BD34BA1383F6A7EE9FE2547F"),
        (3, "A5A27E82B43A9A866A93D7ABE89CEF93"),
    ],
)
def test_aes_dukpt_iso4_pin_blocks(counter: int, block: str) -> None:
    """VECTORS.md section 1, format 4: PIN 1234 under the derived PIN key."""
    key = aes_working_key(AES_BDK, _ksn(counter), "pin")
    fill = bytes.fromhex("2F69ADDE2E9E7ACE")
    assert _hex(encipher_iso4(key, "1234", "4111111111111111", fill=fill)) == block
    assert decipher_iso4(key, bytes.fromhex(block), "4111111111111111") == "1234"


def test_aes_errors() -> None:
    with pytest.raises(CryptoError) as exc:
        aes_transaction_key(AES_BDK[:8], _ksn(1))
    assert exc.value.code == "27"
    with pytest.raises(CryptoError) as exc:
        aes_transaction_key(AES_BDK, bytes(10))
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        aes_initial_key(AES_BDK, bytes(7))
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        aes_working_key(AES_BDK, _ksn(1), "kek")
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        aes_working_key(AES_BDK, _ksn(1), "pin", "DES")  # type: ignore[arg-type]
    assert exc.value.code == "15"
