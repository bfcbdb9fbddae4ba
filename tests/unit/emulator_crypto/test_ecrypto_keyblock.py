"""Thales key blocks (VECTORS.md section 5) and TR-31 via psec (section 4)."""

from __future__ import annotations

import pytest

from emulator.crypto.errors import CryptoError
from emulator.crypto.keyblock import (
    KeyBlockHeader,
    KeyBlockLmk,
    derive_keyblock_keys,
    unwrap_key_block,
    unwrap_tr31,
    wrap_key_block,
    wrap_tr31,
)
from emulator.crypto.lmk import kcv_aes_cmac, kcv_tdes

LMK1 = KeyBlockLmk(
    "1", bytes.fromhex("9B71333A13F9FAE72F9D0E2DAB4AD6784718012F9244033F3F26A2DE0C8AA11A")
)
LMK0 = KeyBlockLmk("0", bytes.fromhex("0123456789ABCDEF8080808080808080FEDCBA9876543210"))

V1_BLOCK_T = (
    "10096B0TN00E0002F21247ABCAF1AAB60415020B95858FA2D3D35DCE0B9CA675739A1C6EC367061107D66472D5097626"
)
V1_BLOCK_A = (
    "10096B0AN00E00021DFDC97FED3ACD531E0F85F811B10D8700B58E7D5CD72CB465DCCE8B79B67CDE6298505CCB7BAD47"
)
V0_BLOCK = "00072B0TN00E000256A37F894FD49E61DD3FA27FDE8919D07F7AA966F8BF39AB31D00034"


def test_v1_derived_keys() -> None:
    kbek, kbak = derive_keyblock_keys(LMK1)
    assert kbek.hex().upper() == "1B39BAA881FCEDC1CD5138CC5A31F2E82E1BB7EA3B29CF875F6AAB21268F0D17"
    assert kbak.hex().upper() == "B9C8CD6543528A1C6859765503FBB3A87C533BC73933513AF534A90F525308F2"


def test_v1_capture_tdes_key() -> None:
    header, key = unwrap_key_block(LMK1, V1_BLOCK_T)
    assert key.hex().upper() == "000102030405060708090A0B0C0D0E0F"
    assert header == KeyBlockHeader("1", "B0", "T", "N", "00", "E", "02")
    pad = bytes.fromhex("53F831C75646159457F7FDC0B5D3")
    assert wrap_key_block(LMK1, header, key, pad=pad) == V1_BLOCK_T
    assert unwrap_key_block(LMK1, "S" + V1_BLOCK_T)[1] == key


def test_v1_capture_aes_key() -> None:
    header, key = unwrap_key_block(LMK1, V1_BLOCK_A)
    assert key.hex().upper() == "0D6B02388AC8EF491902342C5B0EDAD5"
    assert header.algorithm == "A"
    assert header.lmk_id == "02"


def test_v0_capture() -> None:
    header, key = unwrap_key_block(LMK0, V0_BLOCK)
    assert key.hex().upper() == "735B3125EFF2E04ABFBFA1670180A168"
    assert header == KeyBlockHeader("0", "B0", "T", "N", "00", "E", "02")
    assert wrap_key_block(LMK0, header, key, pad=bytes.fromhex("E370F35CCB09")) == V0_BLOCK
    kbek, kbak = derive_keyblock_keys(LMK0)
    assert kbek == bytes(b ^ 0x45 for b in LMK0.key)
    assert kbak == bytes(b ^ 0x4D for b in LMK0.key)


@pytest.mark.parametrize("lmk", [LMK0, LMK1], ids=["v0", "v1"])
@pytest.mark.parametrize("length", [8, 16, 24, 32])
def test_round_trip_with_optional_blocks(lmk: KeyBlockLmk, length: int) -> None:
    header = KeyBlockHeader(
        lmk.version, "72", "T", "N", "00", "E", "00", (("KS", "00604B120F9292800000"), ("PB", "00"))
    )
    key = bytes(range(length))
    block = wrap_key_block(lmk, header, key)
    assert int(block[1:5]) == len(block)
    assert block[12:14] == "02"
    got_header, got_key = unwrap_key_block(lmk, block)
    assert got_header == header
    assert got_key == key


def test_tampering_is_detected() -> None:
    tampered = V1_BLOCK_T[:20] + ("0" if V1_BLOCK_T[20] != "0" else "1") + V1_BLOCK_T[21:]
    with pytest.raises(CryptoError) as exc:
        unwrap_key_block(LMK1, tampered)
    assert exc.value.code == "A4"
    header_changed = V1_BLOCK_T.replace("B0TN", "B0TE", 1)
    with pytest.raises(CryptoError) as exc:
        unwrap_key_block(LMK1, header_changed)
    assert exc.value.code == "A4"
    with pytest.raises(CryptoError) as exc:
        unwrap_key_block(LMK0, V0_BLOCK[:-1] + "5")
    assert exc.value.code == "A4"


@pytest.mark.parametrize(
    ("lmk", "block", "code"),
    [
        (LMK0, V1_BLOCK_T, "A1"),
        (LMK1, V1_BLOCK_T[:-2], "83"),
        (LMK1, "10016B0TN00E0002", "83"),
        (LMK1, "1009", "83"),
        (LMK1, V1_BLOCK_T.replace("B0TN", "B0QN", 1), "A7"),
        (LMK1, V1_BLOCK_T.replace("B0TN", "B0TQ", 1), "A8"),
        (LMK1, V1_BLOCK_T.replace("00E00", "00Q00", 1), "AA"),
        (LMK1, V1_BLOCK_T.replace("00E00", "00EX0", 1), "AB"),
        (LMK1, V1_BLOCK_T[:12] + "0102KS03" + V1_BLOCK_T[20:], "AC"),
        (LMK1, V1_BLOCK_T[:12] + "0102KSFF" + V1_BLOCK_T[20:], "AC"),
        (LMK1, V1_BLOCK_T[:16] + "G" + V1_BLOCK_T[17:], "83"),
    ],
)
def test_unwrap_errors(lmk: KeyBlockLmk, block: str, code: str) -> None:
    with pytest.raises(CryptoError) as exc:
        unwrap_key_block(lmk, block)
    assert exc.value.code == code
    if block[16:]:
        assert block[16:] not in exc.value.message


def test_wrap_errors() -> None:
    with pytest.raises(CryptoError) as exc:
        wrap_key_block(LMK1, KeyBlockHeader("0", "B0", "T", "N"), bytes(16))
    assert exc.value.code == "A1"
    with pytest.raises(CryptoError) as exc:
        wrap_key_block(LMK1, KeyBlockHeader("1", "b0", "T", "N"), bytes(16))
    assert exc.value.code == "A6"
    with pytest.raises(CryptoError) as exc:
        wrap_key_block(LMK1, KeyBlockHeader("1", "B0", "T", "N", "0"), bytes(16))
    assert exc.value.code == "A9"
    with pytest.raises(CryptoError) as exc:
        wrap_key_block(LMK1, KeyBlockHeader("1", "B0", "T", "N"), bytes(16), pad=bytes(3))
    assert exc.value.code == "15"
    with pytest.raises(CryptoError) as exc:
        wrap_key_block(LMK1, KeyBlockHeader("1", "B0", "T", "N"), b"")
    assert exc.value.code == "A5"
    with pytest.raises(CryptoError) as exc:
        KeyBlockLmk("1", bytes(24))
    assert exc.value.code == "27"
    with pytest.raises(CryptoError) as exc:
        KeyBlockLmk("2", bytes(32))
    assert exc.value.code == "15"


def test_lmk_check_values() -> None:
    assert LMK1.check_value() == kcv_aes_cmac(LMK1.key)
    assert LMK0.check_value() == kcv_tdes(LMK0.key)


# --- TR-31 -------------------------------------------------------------------------

A41 = "88E1AB2A2E3DD38C1FA039A536500CC8A87AB9D62DC92C01058FA79F44657DE6"
KS_KEY = "B8ED59E0A279A295E9F5ED7944FD06B9"
PS_KBPK = "EFE0853B256B583D868F251CE99EA1D9"
TR31_ROWS = [
    ("89E88CF7931444F334BD7547FC3F380C",
     "A0072P0TE00E0000F5161ED902807AF26F1D62263644BD24192FDB3193C730301CEE8701",
     "F039121BEC83D26B169BDCD5B22AAF8F", "CB9DEA"),
    ("DD7515F2BFC17F85CE48F3CA25CB21F6",
     "B0080P0TE00E000094B420079CC80BA3461F86FE26EFC4A3B8E4FA4C5F5341176EED7B727B8A248E",
     "3F419E1CB7079442AA37474C2EFBF8B8", "57C409"),
    (KS_KEY,
     "C0096B0TX12S0100KS1800604B120F9292800000BFB9B689CB567E66FC3FEE5AD5F52161FC6545B9D6098901"
     "5D02155C",
     "EDB380DD340BC2620247D445F5B8D678", "F4B08D"),
    ("1D22BF32387C600AD97F9B97A51311AC",
     "B0104B0TX12S0100KS1800604B120F9292800000BB68BE8680A400D9191AD4ECE45B6E6C0D21C4738A5219"
     "0E248719E24B433627",
     "E8BC63E5479455E26577F715D587FE68", "9A4212"),
    (A41,
     "D0112P0AE00E0000B82679114F470F540165EDFBF7E250FCEA43F810D215F8D207E2E417C07156A27E8E31DA"
     "05F7425509593D03A457DC34",
     "3F419E1CB7079442AA37474C2EFBF8B8", "AES:08793E"),
    (A41,
     "D0144P0AE00E00002C77FA3F4A553BED6E88AE5C172A4166E3D4ACA8E2AC71C158A476FAC12C13C3829DE55D"
     "3AB54C48F4C4FEF7AC75E90FC47F1B77E7B19A73ED46E64410082557",
     "3F419E1CB7079442AA37474C2EFBF8B8", "AES:08793E25AB"),
    (KS_KEY,
     "C0112B0TX12S0100KS1800604B120F929280000042B758A2400AB598AE37782823DAF0BA4BDB0DAFF349153"
     "45CA169AE1F976A429EB139E5",
     "EDB380DD340BC2620247D445F5B8D678", "F4B08D"),
    ("1D22BF32387C600AD97F9B97A51311AC",
     "B0120B0TX12S0100KS1800604B120F929280000015CEB14B76D551F21EC43A75390FA118A98C6CB049E3B9E8"
     "64A5F4A8B9A5108A6DB5635C95B042D7",
     "E8BC63E5479455E26577F715D587FE68", "9A4212"),
    (PS_KBPK,
     "A0072K0TN00N0000F40D5672C6D0EC86F860BA88D44D00F0CA9A8CE8CD2F640287A9A9EB",
     "5DB50B454F8389ADCE573BE50861F2BF", "5C9405"),
    (PS_KBPK,
     "B0080K0TN00N00001C414014375212C24995E405B5EE052CB92B67F455EA2680F6751088F9F1C228",
     "5DB50B454F8389ADCE573BE50861F2BF", "5C9405"),
    (PS_KBPK,
     "C0072K0TN00N0000C9B875FF7A5316BF221C09ED52080DE0B45632A4EA9CE87699CB565E",
     "5DB50B454F8389ADCE573BE50861F2BF", "5C9405"),
    ("41" * 32,
     "D0112B0TN00N000037DB9B046B7B0048785690759580ABC3B9842AB4BB7717B49E92528E575785D81235593"
     "76A2553B27BE94F054F4E971C",
     "1FA1F7CEC798D91545DA8AE0C7796BD9", "FF5087"),
    ("41" * 32,
     "D0144D0AN00N0000127862F945C2DED04530FAF7CDBC8B0BA10C7AA79BD5E0C2C5D6AC173BF588E4B19ACF13"
     "57178D50EA0AB193228E13958304FC6149632DFDCADF3A5B3D57E814",
     "BE19E6A07A760F10EF8E83A226B63AAD141F463FDDD4F47DB244B4023EC3CACC", "AES:0A00E3"),
    ("AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBB",
     "B0096M3TC00E0000B6CD513680EF255FC0DC590726FD0129A7CF6602E7F271631AB4EE7350642F11181AF4CC"
     "12F12FD9",
     "EEEEEEEEEEEEEEEE", "-"),
]


@pytest.mark.parametrize("row", TR31_ROWS, ids=[r[1][:5] + r[3] for r in TR31_ROWS])
def test_tr31_vectors(row: tuple[str, str, str, str]) -> None:
    kbpk_hex, block, key_hex, kcv = row
    kbpk = bytes.fromhex(kbpk_hex)
    header, key = unwrap_tr31(kbpk, block)
    assert key.hex().upper() == key_hex
    assert block.startswith(header)
    assert unwrap_tr31(kbpk, "R" + block)[1] == key
    if kcv.startswith("AES:"):
        expected = kcv[4:]
        assert kcv_aes_cmac(key)[: len(expected) // 2].hex().upper() == expected
    elif kcv != "-":
        assert kcv_tdes(key)[:3].hex().upper() == kcv
    # Re-wrapping under the same header round-trips (random pad, so not byte-equal).
    again = wrap_tr31(kbpk, header, key)
    assert unwrap_tr31(kbpk, again)[1] == key


def test_tr31_ks_optional_block_header() -> None:
    header, _ = unwrap_tr31(bytes.fromhex(KS_KEY), TR31_ROWS[2][1])
    assert header == "C0096B0TX12S0100KS1800604B120F9292800000"


def test_tr31_version_e_is_rejected() -> None:
    """ISO 20038 version E: psec does not support it."""
    kbpk = bytes.fromhex("3235362D6269742041455320777261707070696E67202849534F20323030333829")
    block = (
        "E0084B0TV16N0000B2AE5E26BBA7F246E84D5EA24167E208A6B66EF2E27E55A52DB52F0AEACB94C57547"
    )
    with pytest.raises(CryptoError) as exc:
        unwrap_tr31(kbpk, block)
    assert exc.value.code == "83"


def test_tr31_errors() -> None:
    kbpk = bytes.fromhex("89E88CF7931444F334BD7547FC3F380C")
    block = TR31_ROWS[0][1]
    with pytest.raises(CryptoError) as exc:
        unwrap_tr31(kbpk, block[:-1] + "0")
    assert exc.value.code == "A4"
    with pytest.raises(CryptoError) as exc:
        unwrap_tr31(kbpk, block[:-2])
    assert exc.value.code == "83"
    with pytest.raises(CryptoError) as exc:
        wrap_tr31(kbpk, "Z0000P0TE00E0000", bytes(16))
    assert exc.value.code == "83"
