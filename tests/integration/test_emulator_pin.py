"""Live emulator: PIN translation, PIN under LMK, IBM 3624 and Visa PVV against VECTORS.md and psec.

Keys are encrypted under the public test LMK (variant, id 00) or wrapped as AES key blocks under
the test key-block LMK (id 01); every translated PIN block is decrypted with psec.
"""

from __future__ import annotations

from collections.abc import Iterator

import psec
import pytest

from emulator.app import TEST_KEYBLOCK_LMK
from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.keyblock import KeyBlockHeader, wrap_key_block
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk
from emulator.crypto.pin_lmk import decrypt_pin_under_lmk, encrypt_pin_under_lmk
from tests.integration.conftest import HsmClient, RunningEmulator

TPK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
ZPK = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
ZPK2 = bytes.fromhex("FEDCBA98765432100123456789ABCDEF")
EVEN = bytes.fromhex("0023456789ABCDEFFEDCBA9876543210")  # first byte has even parity
PVK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
DEC_TABLE = b"1234567890123456"


def lmk(key_type: str, clear: bytes, scheme: str = "U") -> bytes:
    """``clear`` under the test variant LMK."""
    return encrypt_key_under_lmk(TEST_LMK, key_type, scheme, clear).encode()


def aes_block(usage: str, clear: bytes, mode: str = "N") -> bytes:
    """``clear`` as an AES key block under the test key-block LMK (id 01)."""
    header = KeyBlockHeader("1", usage, "A", mode, lmk_id="01")
    return b"S" + wrap_key_block(TEST_KEYBLOCK_LMK, header, clear).encode()


def iso0(key: bytes, pin: str, pan: str) -> bytes:
    """ISO-0 PIN block of ``pin`` for ``pan`` under ``key`` (psec), hex."""
    with legacy_tdes():
        return (
            bytes(psec.des.encrypt_tdes_ecb(key, psec.pinblock.encode_pinblock_iso_0(pin, pan)))
            .hex()
            .upper()
            .encode()
        )


def clear_block(key: bytes, block: bytes) -> bytes:
    """TDES-ECB decrypt a hex PIN block with psec."""
    with legacy_tdes():
        return bytes(psec.des.decrypt_tdes_ecb(key, bytes.fromhex(block.decode())))


def pin_iso0(key: bytes, block: bytes, pan: str) -> str:
    """The PIN of an ISO-0 block under ``key`` (psec)."""
    return str(psec.pinblock.decode_pinblock_iso_0(clear_block(key, block), pan))


def account(pan: str) -> bytes:
    """Thales 12-digit account number of a PAN."""
    return pan[:-1][-12:].rjust(12, "0").encode()


# -- CA / CC ---------------------------------------------------------------------------------

PAN = "4012345678909"


def test_ca_translates_iso0_from_tpk_to_zpk(client: HsmClient) -> None:
    resp = client.call(
        b"CA" + lmk("002", TPK) + lmk("001", ZPK) + b"12" + iso0(TPK, "1234", PAN) + b"0101" + account(PAN)
    )
    assert resp[:6] == b"CB0004" and resp[-2:] == b"01"
    assert resp[6:-2] == iso0(ZPK, "1234", PAN)  # ISO-0 is deterministic: exact block


def test_cc_changes_format_iso0_to_iso3_and_diebold(client: HsmClient) -> None:
    src = lmk("001", ZPK)
    resp = client.call(
        b"CC" + src + lmk("001", ZPK2) + b"12" + iso0(ZPK, "123456", PAN) + b"0147" + account(PAN)
    )
    assert resp[:6] == b"CD0006" and resp[-2:] == b"47"
    assert psec.pinblock.decode_pinblock_iso_3(clear_block(ZPK2, resp[6:-2]), PAN) == "123456"
    resp = client.call(
        b"CC" + src + lmk("001", ZPK2) + b"12" + iso0(ZPK, "123456", PAN) + b"0103" + account(PAN)
    )
    assert resp[:6] == b"CD0006" and clear_block(ZPK2, resp[6:-2]).hex().upper() == "123456FFFFFFFFFF"


def test_cc_iso4_vector_through_aes_zpk(client: HsmClient) -> None:
    key = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    pan = "1234567890123456789"
    block = b"28B41FDDD29B743E93124BD8E32D921E"  # VECTORS.md section 1 (psec, fill FF)
    req = b"CC" + aes_block("P0", key) + lmk("001", ZPK) + b"12" + block + b"4801" + b"19" + pan.encode()
    resp = client.call(req)
    assert resp[:6] == b"CD0004" and resp[-2:] == b"01"
    assert resp[6:-2] == iso0(ZPK, "1234", pan)
    # and back: ISO-0 under the TDES ZPK to ISO-4 under the AES ZPK (random fill; psec decodes it).
    req = (
        b"CC"
        + lmk("001", ZPK)
        + aes_block("P0", key)
        + b"12"
        + iso0(ZPK, "1234", pan)
        + b"0148"
        + b"19"
        + pan.encode()
    )
    resp = client.call(req)
    assert resp[:6] == b"CD0004" and resp[-2:] == b"48" and len(resp) == 6 + 32 + 2
    assert psec.pinblock.decipher_pinblock_iso_4(key, bytes.fromhex(resp[6:-2].decode()), pan) == "1234"


# -- CI / G0: DUKPT (VECTORS.md sections 1, 2, 3) ---------------------------------------------

BDK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
TDES_DUKPT = [
    ("FFFF9876543210E00001", "1B9C1845EB993A7A"),
    ("FFFF9876543210E00002", "10A01C8D02C69107"),
    ("FFFF9876543210E00003", "18DC07B94797B466"),
    ("FFFF9876543210E00004", "0BC79509D5645DF7"),
    ("FFFF9876543210E00005", "5BC0AF22AD87B327"),
    ("FFFF9876543210EFF800", "33365F5CC6F23C35"),
    ("FFFF9876543210EFF801", "3A86BF003F835C9D"),
    ("FFFF9876543210EFF802", "3DB977D05C36DF3F"),
    ("FFFF9876543210EFF804", "BA83243305712099"),
    ("FFFF9876543210EFFC00", "DEFC6F09F8927B71"),
    ("FFFF9876543210F00000", "73EC88AD0AC5830E"),
]


@pytest.mark.parametrize(("ksn", "epb"), TDES_DUKPT)
def test_g0_and_ci_translate_x924_1_dukpt_vectors(client: HsmClient, ksn: str, epb: str) -> None:
    keys = lmk("009", BDK) + lmk("001", ZPK)
    expected = b"04" + iso0(ZPK, "1234", PAN)
    assert client.call(b"G0" + keys + b"A05" + ksn.encode() + epb.encode() + b"0101" + account(PAN)) == (
        b"G100" + expected + b"01"
    )
    assert client.call(b"CI" + keys + b"A05" + ksn.encode() + epb.encode() + b"01" + account(PAN)) == (
        b"CJ00" + expected + b"01"
    )


AES_BDK = bytes.fromhex("FEDCBA9876543210F1F1F1F1F1F1F1F1")
# VECTORS.md section 1 (ISO-4 example, section 3 PIN keys): PIN 1234, PAN 4111111111111111.
AES_DUKPT = [
    ("123456789012345600000001", "A912150391AB65A67E52883D81CE2D15"),
    ("123456789012345600000002", "52A00503BD34BA1383F6A7EE9FE2547F"),
    ("123456789012345600000003", "A5A27E82B43A9A866A93D7ABE89CEF93"),
]


@pytest.mark.parametrize(("ksn", "epb"), AES_DUKPT)
def test_g0_translates_x924_3_aes_dukpt_iso4_vectors(client: HsmClient, ksn: str, epb: str) -> None:
    pan = b"4111111111111111"
    bdk = aes_block("B0", AES_BDK, "X")
    resp = client.call(
        b"G0" + bdk + lmk("001", ZPK) + b"A05" + ksn.encode() + epb.encode() + b"4801" + b"16" + pan
    )
    assert resp == b"G10004" + iso0(ZPK, "1234", pan.decode()) + b"01"
    zpk_key = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    resp = client.call(
        b"G0"
        + bdk
        + aes_block("P0", zpk_key, "B")
        + b"A05"
        + ksn.encode()
        + epb.encode()
        + b"4848"
        + b"16"
        + pan
    )
    assert resp[:6] == b"G10004" and resp[-2:] == b"48"
    assert (
        psec.pinblock.decipher_pinblock_iso_4(zpk_key, bytes.fromhex(resp[6:-2].decode()), pan.decode())
        == "1234"
    )


def test_dukpt_error_paths(client: HsmClient) -> None:
    rest = b"A05FFFF9876543210E000011B9C1845EB993A7A0101" + account(PAN)
    good = b"G0" + lmk("009", BDK) + lmk("001", ZPK) + rest
    # wrong KSN counter: the PIN block decrypts to garbage -> PIN block invalid
    assert client.call(good.replace(b"E00001", b"E00002")) == b"G120"
    assert client.call(b"G0" + lmk("009", EVEN) + lmk("001", ZPK) + rest) == b"G110"
    assert client.call(b"G0" + lmk("009", BDK) + lmk("001", EVEN) + rest) == b"G111"
    assert client.call(good.replace(b"0101" + account(PAN), b"4701" + account(PAN))) == b"G120"  # not ISO-3
    assert client.call(good.replace(b"0101" + account(PAN), b"4801" + b"13" + PAN.encode())) == b"G123"
    # CI is ISO-0 only: an AES BDK cannot be used with it
    bdk = aes_block("B0", AES_BDK, "X")
    ci = (
        b"CI"
        + bdk
        + lmk("001", ZPK)
        + b"A05123456789012345600000001A912150391AB65A67E52883D81CE2D1501"
        + account(PAN)
    )
    assert client.call(ci) == b"CJ23"
    # a key block whose usage is not a BDK
    assert (
        client.call(
            b"G0" + aes_block("P0", AES_BDK) + lmk("001", ZPK) + b"A05123456789012345600000001"
            b"A912150391AB65A67E52883D81CE2D154801164111111111111111"
        )
        == b"G129"
    )
    assert client.call(good) == b"G10004" + iso0(ZPK, "1234", PAN) + b"01"


# -- PIN under LMK ---------------------------------------------------------------------------


def test_ja_random_pin_under_lmk(client: HsmClient) -> None:
    for length in (4, 12):
        resp = client.call(b"JA" + account(PAN) + f"{length:02d}".encode())
        assert resp[:4] == b"JB00" and len(resp) == 20
        pin = decrypt_pin_under_lmk(TEST_LMK, resp[4:].decode(), account(PAN).decode())
        assert len(pin) == length and pin.isdecimal()
    assert client.call(b"JA" + account(PAN) + b"13") == b"JB24"
    assert client.call(b"JA" + account(PAN) + b"03") == b"JB24"


def test_jc_je_jg_round_trip(client: HsmClient) -> None:
    acct = account(PAN)
    pin_lmk = encrypt_pin_under_lmk(TEST_LMK, "1234", acct.decode()).encode()
    assert client.call(b"JC" + lmk("002", TPK) + iso0(TPK, "1234", PAN) + b"01" + acct) == b"JD00" + pin_lmk
    assert client.call(b"JE" + lmk("001", ZPK) + iso0(ZPK, "1234", PAN) + b"01" + acct) == b"JF00" + pin_lmk
    assert client.call(b"JG" + lmk("001", ZPK) + b"01" + acct + pin_lmk) == b"JH00" + iso0(ZPK, "1234", PAN)
    # ISO-1 and ISO-3 have random fill: JG then JE brings the same PIN back.
    for fmt in (b"05", b"47", b"03"):
        resp = client.call(b"JG" + lmk("001", ZPK) + fmt + acct + pin_lmk)
        assert resp[:4] == b"JH00"
        assert client.call(b"JE" + lmk("001", ZPK) + resp[4:] + fmt + acct) == b"JF00" + pin_lmk


def test_je_jg_iso4_with_aes_zpk(client: HsmClient) -> None:
    key = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    pan = "1234567890123456789"
    pin_lmk = encrypt_pin_under_lmk(TEST_LMK, "1234", account(pan).decode()).encode()
    zpk = aes_block("P0", key, "B")
    resp = client.call(b"JE" + zpk + b"28B41FDDD29B743E93124BD8E32D921E48" + b"19" + pan.encode())
    assert resp == b"JF00" + pin_lmk
    resp = client.call(b"JG" + zpk + b"48" + b"19" + pan.encode() + pin_lmk)
    assert resp[:4] == b"JH00" and len(resp) == 4 + 32
    assert psec.pinblock.decipher_pinblock_iso_4(key, bytes.fromhex(resp[4:].decode()), pan) == "1234"


# -- IBM 3624 (VECTORS.md section 8) ---------------------------------------------------------

# Validation data "11223344556N": N = last 5 account digits -> 1122334455667788 with this account.
ACCT_8 = b"123451267788"
VDATA_16 = b"11223344556N"
# "112233445NFF" with an account ending 56677 -> 11223344556677FF.
ACCT_14 = b"123456756677"
VDATA_14 = b"112233445NFF"


def test_de_offset_of_pin_under_lmk(client: HsmClient) -> None:
    pvk = lmk("002", PVK)
    for pin, offset in (("1234", b"7710"), ("0000", b"6586")):
        pin_lmk = encrypt_pin_under_lmk(TEST_LMK, pin, ACCT_8.decode()).encode()
        resp = client.call(b"DE" + pvk + pin_lmk + b"04" + ACCT_8 + DEC_TABLE + VDATA_16)
        assert resp == b"DF00" + offset + b"FFFFFFFF"


@pytest.mark.parametrize(
    ("offset", "acct", "vdata", "pin"),
    [
        (b"7710", ACCT_8, VDATA_16, "1234"),
        (b"0000", ACCT_8, VDATA_16, "4524"),  # natural PIN
        (b"6586", ACCT_8, VDATA_16, "0000"),
        (b"0000", ACCT_14, VDATA_14, "5518"),  # natural PIN, 14-digit validation data
    ],
)
def test_ee_derives_pin_from_offset(
    client: HsmClient, offset: bytes, acct: bytes, vdata: bytes, pin: str
) -> None:
    resp = client.call(b"EE" + lmk("002", PVK) + offset + b"FFFFFFFF" + b"04" + acct + DEC_TABLE + vdata)
    assert resp[:4] == b"EF00"
    assert decrypt_pin_under_lmk(TEST_LMK, resp[4:].decode(), acct.decode()) == pin


def test_da_ea_verify_ibm_offset(client: HsmClient) -> None:
    pan = "99" + ACCT_8.decode() + "5"  # account(pan) == ACCT_8
    assert account(pan) == ACCT_8
    tail = b"01" + b"04" + ACCT_8 + DEC_TABLE + VDATA_16

    def da(tpk: bytes, pvk: bytes, pin: str, offset: bytes, max_len: bytes = b"12") -> bytes:
        return client.call(
            b"DA" + lmk("002", tpk) + lmk("002", pvk) + max_len + iso0(tpk, pin, pan) + tail + offset
        )

    def ea(pin: str, offset: bytes, max_len: bytes = b"12") -> bytes:
        return client.call(
            b"EA" + lmk("001", ZPK) + lmk("002", PVK) + max_len + iso0(ZPK, pin, pan) + tail + offset
        )

    assert da(TPK, PVK, "1234", b"7710FFFFFFFF") == b"DB00"
    assert da(TPK, PVK, "1234", b"7711FFFFFFFF") == b"DB01"
    assert ea("4524", b"0000FFFFFFFF") == b"EB00"
    assert ea("1234", b"0000FFFFFFFF") == b"EB01"
    # check length 4: a 6-digit PIN whose first 4 digits match verifies
    assert ea("123499", b"771000FFFFFF") == b"EB00"
    # parity: TPK 10, PVK 11; PIN longer than the maximum 24
    assert da(EVEN, PVK, "1234", b"7710FFFFFFFF") == b"DB10"
    assert da(TPK, EVEN, "1234", b"7710FFFFFFFF") == b"DB11"
    assert ea("123456", b"771000FFFFFF", b"04") == b"EB24"
    assert ea("1234", b"77G0FFFFFFFF") == b"EB15"  # offset not decimal
    assert ea("1234", b"7710FFFFFFFF") == b"EB00"


# -- Visa PVV (VECTORS.md section 7) ---------------------------------------------------------

PVV_ROWS = [
    ("C8199237EA5857BC40EF9DA2B5E96BBF", "5500000253210", "1", "1234", b"4402"),
    ("86190176866EC17FB32685ADB6ADA83B", "5500000253210", "1", "1234", b"0481"),
    ("0123456789ABCDEFFEDCBA9876543210", "1122334455667788", "1", "4524", b"8523"),
    ("0123456789ABCDEFFEDCBA9876543210", "1122334455667788", "2", "1912", b"3244"),
]


@pytest.mark.parametrize("row", PVV_ROWS)
def test_dg_fw_dc_ec_visa_pvv(client: HsmClient, row: tuple[str, str, str, str, bytes]) -> None:
    pvk, pan, pvki, pin, pvv = row
    pvk_lmk = lmk("002", bytes.fromhex(pvk))
    acct = account(pan)
    pin_lmk = encrypt_pin_under_lmk(TEST_LMK, pin, acct.decode()).encode()
    assert client.call(b"DG" + pvk_lmk + pin_lmk + acct + pvki.encode()) == b"DH00" + pvv
    tpk_block, zpk_block = iso0(TPK, pin, pan), iso0(ZPK, pin, pan)
    fw_tail = b"01" + acct + pvki.encode()
    assert client.call(b"FW002" + lmk("002", TPK) + pvk_lmk + tpk_block + fw_tail) == b"FX00" + pvv
    assert client.call(b"FW001" + lmk("001", ZPK) + pvk_lmk + zpk_block + fw_tail) == b"FX00" + pvv
    dc = b"DC" + lmk("002", TPK) + pvk_lmk + tpk_block + b"01" + acct + pvki.encode()
    ec = b"EC" + lmk("001", ZPK) + pvk_lmk + zpk_block + b"01" + acct + pvki.encode()
    wrong = f"{(int(pvv) + 1) % 10000:04d}".encode()
    assert client.call(dc + pvv) == b"DD00"
    assert client.call(dc + wrong) == b"DD01"
    assert client.call(ec + pvv) == b"ED00"
    assert client.call(ec + wrong) == b"ED01"


def test_fw_rejects_other_key_types(client: HsmClient) -> None:
    req = lmk("002", TPK) + lmk("002", PVK) + iso0(TPK, "1234", PAN) + b"01" + account(PAN) + b"1"
    assert client.call(b"FW003" + req) == b"FX04"
    assert client.call(b"FW002" + req)[:4] == b"FX00"


# -- error paths -----------------------------------------------------------------------------


def _ca(
    *,
    tpk: bytes = TPK,
    zpk: bytes = ZPK,
    block: bytes | None = None,
    fmts: bytes = b"0101",
    max_len: bytes = b"12",
    tail: bytes = b"",
    acct: bytes | None = None,
) -> bytes:
    block = iso0(TPK, "1234", PAN) if block is None else block
    acct = account(PAN) if acct is None else acct
    return b"CA" + lmk("002", tpk) + lmk("001", zpk) + max_len + block + fmts + acct + tail


GOOD_CA = b"CB0004" + iso0(ZPK, "1234", PAN) + b"01"


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (_ca(tpk=EVEN), b"10"),
        (_ca(zpk=EVEN), b"11"),
        (_ca(fmts=b"0201"), b"23"),  # unsupported source format
        (_ca(fmts=b"0199"), b"23"),  # unsupported destination format
        (_ca(fmts=b"0148", acct=b"13" + PAN.encode()), b"23"),  # ISO-4 under a TDES ZPK
        (_ca(block=iso0(TPK, "123456", PAN), max_len=b"05"), b"24"),
        (_ca(fmts=b"0501"), b"20"),  # ISO-0 block read as ISO-1: control nibble wrong
        (_ca().replace(lmk("002", TPK), b"U" + b"G" * 32), b"15"),  # key not hex
        (_ca(tail=b"%99"), b"13"),
        (_ca(tail=b"%01"), b"13"),  # key-block LMK id with variant keys
    ],
)
def test_ca_error_paths_keep_the_connection(client: HsmClient, request_: bytes, code: bytes) -> None:
    assert client.call(request_) == b"CB" + code
    assert client.call(_ca()) == GOOD_CA


def test_control_nibble_error_is_20(client: HsmClient) -> None:
    clear = bytearray(psec.pinblock.encode_pinblock_iso_0("1234", PAN))
    clear[0] |= 0xF0
    with legacy_tdes():
        block = bytes(psec.des.encrypt_tdes_ecb(TPK, bytes(clear))).hex().upper().encode()
    assert client.call(_ca(block=block)) == b"CB20"
    assert client.call(_ca()) == GOOD_CA


@pytest.fixture
def iso3_disabled(emulator: RunningEmulator) -> Iterator[None]:
    """Disable PIN block format 47 (ISO-3) for one test."""
    emulator.hsm.state.disabled_pin_formats.add("47")
    try:
        yield
    finally:
        emulator.hsm.state.disabled_pin_formats.discard("47")


@pytest.mark.usefixtures("iso3_disabled")
def test_disabled_pin_format_is_69(client: HsmClient) -> None:
    assert client.call(_ca(fmts=b"0147")) == b"CB69"
    assert client.call(b"JG" + lmk("001", ZPK) + b"47" + account(PAN) + b"0" * 16) == b"JH69"
    assert client.call(_ca()) == GOOD_CA


def test_pin_under_lmk_errors(client: HsmClient) -> None:
    acct = account(PAN)
    # a PIN under LMK for another account does not decode: 14
    other = encrypt_pin_under_lmk(TEST_LMK, "1234", "999999999999").encode()
    assert client.call(b"JG" + lmk("001", ZPK) + b"01" + acct + other) == b"JH14"
    assert client.call(b"DG" + lmk("002", PVK) + b"G" * 16 + acct + b"1") == b"DH14"
    assert client.call(b"JA" + acct + b"04%99") == b"JB13"
    assert client.call(b"JA" + acct + b"04")[:4] == b"JB00"
