"""Regenerate the bundled case corpus (``conformance/cases/*.toml``) from shared/VECTORS.md.

Run ``.venv/bin/python -m conformance.build_cases`` after changing this file; the TOML files are
checked in as data (``tests/unit/test_conformance_cases.py`` fails when they are out of date and
cross-checks the expected values with psec).

How the cases are built: every VECTORS.md row that a host command of the table can express is
turned into a request whose keys are the vector's clear keys encrypted under the public test LMK
(:data:`emulator.crypto.lmk.TEST_LMK`, scheme U unless stated; key blocks under the AES key-block
LMK id 01 with a fixed pad) and whose expected response is written out in full. Expected values
are the vector's own result where the command returns it (CVV ``561``, PVV ``4402``, offset
``7710``, MAC ``9CCC78173FC4FB64``, hashes), and otherwise computed once here with
:mod:`emulator.crypto` from the vector (a PIN block re-encrypted under a fixed destination ZPK,
hsmproxy's PIN-under-LMK encoding of the vector's PIN). Nothing here is random: ISO-1/ISO-3
fills are fixed, key-block pads are fixed.

Rows a command cannot express are left out: VECTORS 5 external LMK vector (pair 00-01 is no key
type's pair), 8 "5518" (14-digit validation data does not fit the 12-character field), 11 ARQC /
ARPC (their R = 1234567890123456 is not ATC ‖ 0000 ‖ UN; KQ cases use a computed ARQC instead), 12
FPE (no command). Cases whose exact output depends on a convention not pinned down yet (M0 IV and
length conventions, NC firmware string, CVV2/iCVV) are ``expect = "reference"``.

Three files: ``vectors.toml`` (known answers), ``errors.toml`` (error paths), ``reference.toml``
(compared with the reference).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from emulator.app import TEST_KEYBLOCK_LMK
from emulator.crypto import emv
from emulator.crypto.cipher import tdes_ecb_encrypt, xor
from emulator.crypto.keyblock import KeyBlockHeader, unwrap_tr31, wrap_key_block
from emulator.crypto.lmk import TEST_LMK, adjust_parity, encrypt_key_under_lmk, has_odd_parity, kcv_tdes
from emulator.crypto.pin_lmk import encrypt_pin_under_lmk
from emulator.crypto.pinblock import account_from_pan, encode_pin_block

CASES_DIR = Path(__file__).resolve().parent / "cases"

Case = dict[str, str]

# Fixed working keys of the corpus (odd parity).
ZPK1 = bytes.fromhex("C1C1C1C1C1C1C1C1D0D0D0D0D0D0D0D0")
ZPK2 = bytes.fromhex("A1A1A1A1A1A1A1A1B0B0B0B0B0B0B0B0")
TPK = bytes.fromhex("E0E0E0E0E0E0E0E0F1F1F1F1F1F1F1F1")
KEY_0123 = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")


def lmk(key_type: str, clear: bytes, scheme: str | None = None) -> str:
    """``clear`` (parity adjusted: DES ignores parity bits) under the test LMK."""
    if scheme is None:
        scheme = {8: "", 16: "U", 24: "T"}[len(clear)]
    return encrypt_key_under_lmk(TEST_LMK, key_type, scheme, adjust_parity(clear))


def aes_block(usage: str, key: bytes, mode_of_use: str = "N") -> str:
    """An AES key block (scheme S) under the test key-block LMK id 01, with a fixed pad."""
    header = KeyBlockHeader("1", usage, "A", mode_of_use, "00", "E", "01")
    pad = bytes(range(1, 1 + (-(2 + len(key)) % 16)))
    return "S" + wrap_key_block(TEST_KEYBLOCK_LMK, header, key, pad=pad)


def enc(key: bytes, block: bytes) -> str:
    """TDES-ECB of a clear PIN block, hex."""
    return tdes_ecb_encrypt(key, block).hex().upper()


def case(name: str, command: str | bytes, expect: str | bytes) -> Case:
    """A case: mostly-printable bytes as text with ``\\xNN`` escapes, binary ones as hex."""
    out: Case = {"name": name}
    raw_cmd = command if isinstance(command, bytes) else command.encode("latin-1")
    text = _as_text(raw_cmd)
    if text is not None:
        out["command"] = text
    else:
        out["request_hex"] = raw_cmd.hex().upper()
    if expect == "reference":
        out["expect"] = "reference"
        return out
    raw_exp = expect if isinstance(expect, bytes) else expect.encode("latin-1")
    text = _as_text(raw_exp)
    if text is not None:
        out["expect"] = text
    else:
        out["expect_hex"] = raw_exp.hex().upper()
    return out


def _as_text(data: bytes) -> str | None:
    """``data`` as case text (inverse of runner.decode_escapes), or None when mostly binary."""
    binary = sum(1 for b in data if not 0x20 <= b < 0x7F)
    if binary * 4 > len(data):
        return None
    return "".join("\\\\" if b == 0x5C else (chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02X}") for b in data)


# -- VECTORS.md known answers ----------------------------------------------------------------------

ISO0_ROWS = (  # (PIN, PAN, clear ISO-0 block) - VECTORS 1, format 0
    ("1234", "43219876543210987", "0412AC89ABCDEF67"),
    ("1234", "4012345678909", "041274EDCBA9876F"),
    ("1234", "5555555551234567", "041261AAAAEDCBA9"),
    ("123456789012", "5555555551234567", "0C1261032D8226A9"),
)
DUKPT_ROWS = (  # (KSN, encrypted PIN block) - VECTORS 2
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
)
AES_DUKPT_ROWS = (  # (counter, ISO-4 block) - VECTORS 1 format 4 / 3
    ("00000001", "A912150391AB65A67E52883D81CE2D15"),
    ("00000002", "52A00503BD34BA1383F6A7EE9FE2547F"),
    ("00000003", "A5A27E82B43A9A866A93D7ABE89CEF93"),
)
CVV_ROWS = (  # (CVK, PAN, expiry, service code, CVV) - VECTORS 6
    ("0123456789ABCDEFFEDCBA9876543210", "4123456789012345", "8701", "101", "561"),
    ("0123456789ABCDEFFEDCBA9876543210", "4999988887777", "9105", "111", "649"),
    ("99999999999999998888888888888888", "2222222222222222", "3333", "111", "361"),
)
PVV_ROWS = (  # (PVK, account12, PVKI, PIN, PVV) - VECTORS 7
    ("C8199237EA5857BC40EF9DA2B5E96BBF", "550000025321", "1", "1234", "4402"),
    ("86190176866EC17FB32685ADB6ADA83B", "550000025321", "1", "1234", "0481"),
    ("0123456789ABCDEFFEDCBA9876543210", account_from_pan("1122334455667788"), "1", "4524", "8523"),
    ("0123456789ABCDEFFEDCBA9876543210", account_from_pan("1122334455667788"), "2", "1912", "3244"),
)
#: VECTORS 8: validation data 1122334455667788 = template "11223344556N" with an account ending 67788.
IBM_ACCOUNT = "550000067788"
IBM_TEMPLATE = "11223344556N"
IBM_DEC = "1234567890123456"
IBM_ROWS = (("1234", "7710"), ("0000", "6586"), ("4524", "0000"))  # (PIN, offset); 4524 = natural PIN
TR31_ROWS = (  # (name, KBPK, block, clear key, key type) - VECTORS 4, TDES KBPKs
    (
        "tr31-a7-2-1-A",
        "89E88CF7931444F334BD7547FC3F380C",
        "A0072P0TE00E0000F5161ED902807AF26F1D62263644BD24192FDB3193C730301CEE8701",
        "F039121BEC83D26B169BDCD5B22AAF8F",
        "001",
    ),
    (
        "tr31-a7-2-2-B",
        "DD7515F2BFC17F85CE48F3CA25CB21F6",
        "B0080P0TE00E000094B420079CC80BA3461F86FE26EFC4A3B8E4FA4C5F5341176EED7B727B8A248E",
        "3F419E1CB7079442AA37474C2EFBF8B8",
        "001",
    ),
    (
        "tr31-a7-3-1-C-ks",
        "B8ED59E0A279A295E9F5ED7944FD06B9",
        "C0096B0TX12S0100KS1800604B120F9292800000BFB9B689CB567E66FC3FEE5AD5F52161FC6545B9D60989015D02155C",
        "EDB380DD340BC2620247D445F5B8D678",
        "009",
    ),
    (
        "tr31-a7-3-2-B-ks",
        "1D22BF32387C600AD97F9B97A51311AC",
        "B0104B0TX12S0100KS1800604B120F9292800000BB68BE8680A400D9191AD4ECE45B6E6C0D21C4738A52190E248719E24B433627",
        "E8BC63E5479455E26577F715D587FE68",
        "009",
    ),
    (
        "payshield-gen-A",
        "EFE0853B256B583D868F251CE99EA1D9",
        "A0072K0TN00N0000F40D5672C6D0EC86F860BA88D44D00F0CA9A8CE8CD2F640287A9A9EB",
        "5DB50B454F8389ADCE573BE50861F2BF",
        "000",
    ),
    (
        "payshield-gen-B",
        "EFE0853B256B583D868F251CE99EA1D9",
        "B0080K0TN00N00001C414014375212C24995E405B5EE052CB92B67F455EA2680F6751088F9F1C228",
        "5DB50B454F8389ADCE573BE50861F2BF",
        "000",
    ),
    (
        "payshield-gen-C",
        "EFE0853B256B583D868F251CE99EA1D9",
        "C0072K0TN00N0000C9B875FF7A5316BF221C09ED52080DE0B45632A4EA9CE87699CB565E",
        "5DB50B454F8389ADCE573BE50861F2BF",
        "000",
    ),
)
DUKPT_MAC_KEY_REQ = xor(
    bytes.fromhex("042666B49184CFA368DE9628D0397BC9"), bytes.fromhex("000000000000FF00000000000000FF00")
)
DUKPT_MAC_KEY_RESP = xor(
    bytes.fromhex("042666B49184CFA368DE9628D0397BC9"), bytes.fromhex("00000000FF00000000000000FF000000")
)
GM_ROWS = (  # (hash id, hashlib name, data)
    ("01", "sha1", b"abc"),
    ("05", "sha224", b"abc"),
    ("06", "sha256", b"abc"),
    ("07", "sha384", b"abc"),
    ("08", "sha512", b"abc"),
    ("06", "sha256", b""),
    ("01", "sha1", b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
    ("06", "sha256", b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
)


def pin_block_cases() -> Iterable[Case]:
    """VECTORS 1: ISO-0 rows through CC and JE; the ISO-3 row through CC; ISO-4 rows through CC."""
    for i, (pin, pan, clear_hex) in enumerate(ISO0_ROWS, 1):
        account = account_from_pan(pan)
        clear = bytes.fromhex(clear_hex)
        block = enc(ZPK1, clear)
        n = f"{len(pin):02d}"
        yield case(
            f"iso0-row{i}-cc-01-01",
            f"CC{lmk('001', ZPK1)}{lmk('001', ZPK2)}12{block}0101{account}",
            f"CD00{n}{enc(ZPK2, clear)}01",
        )
        yield case(
            f"iso0-row{i}-cc-01-03",
            f"CC{lmk('001', ZPK1)}{lmk('001', ZPK2, 'X')}12{block}0103{account}",
            f"CD00{n}{enc(ZPK2, bytes.fromhex(pin.ljust(16, 'F')))}03",
        )
        yield case(
            f"iso0-row{i}-je",
            f"JE{lmk('001', ZPK1)}{block}01{account}",
            f"JF00{encrypt_pin_under_lmk(TEST_LMK, pin, account)}",
        )
        yield case(
            f"iso0-row{i}-jg",
            f"JG{lmk('001', ZPK2)}01{account}{encrypt_pin_under_lmk(TEST_LMK, pin, account)}",
            f"JH00{enc(ZPK2, clear)}",
        )
        yield case(
            f"iso0-row{i}-ca-tpk",
            f"CA{lmk('002', TPK)}{lmk('001', ZPK2)}12{enc(TPK, clear)}0101{account}",
            f"CB00{n}{enc(ZPK2, clear)}01",
        )
    # ISO-3 (IBM example): account field 0000222333444555, block 361216759CFA8889, PIN 123456.
    account = "222333444555"
    iso3 = bytes.fromhex("361216759CFA8889")
    yield case(
        "iso3-ibm-cc-47-01",
        f"CC{lmk('001', ZPK1)}{lmk('001', ZPK2)}12{enc(ZPK1, iso3)}4701{account}",
        f"CD0006{enc(ZPK2, encode_pin_block('01', '123456', account))}01",
    )
    yield case(
        "iso3-ibm-je",
        f"JE{lmk('001', ZPK1)}{enc(ZPK1, iso3)}47{account}",
        f"JF00{encrypt_pin_under_lmk(TEST_LMK, '123456', account)}",
    )
    # ISO-4: X9.24-3 example (PIN key of AES DUKPT counter 1..3) and psec's deterministic vector.
    iso4 = (
        ("x9243-ctr1", "AF8CB133A78F8DC2D1359F18527593FB", "4111111111111111", AES_DUKPT_ROWS[0][1]),
        ("x9243-ctr2", "D30BDC73EC9714B000BEC66BDB7B6D09", "4111111111111111", AES_DUKPT_ROWS[1][1]),
        ("x9243-ctr3", "7D69F01F3B45449F62C7816ECE723268", "4111111111111111", AES_DUKPT_ROWS[2][1]),
        (
            "psec",
            "00112233445566778899AABBCCDDEEFF",
            "1234567890123456789",
            "28B41FDDD29B743E93124BD8E32D921E",
        ),
    )
    for name, key_hex, pan, block_hex in iso4:
        zpk = aes_block("P0", bytes.fromhex(key_hex))
        account = account_from_pan(pan)
        yield case(
            f"iso4-{name}-cc-48-01",
            f"CC{zpk}{lmk('001', ZPK2)}12{block_hex}4801{len(pan):02d}{pan}",
            f"CD0004{enc(ZPK2, encode_pin_block('01', '1234', account))}01",
        )


def dukpt_cases() -> Iterable[Case]:
    """VECTORS 2 (TDES DUKPT via G0 and CI) and 3 (AES DUKPT via G0), to ZPK2 in ISO-0."""
    account = account_from_pan("4012345678909")
    expected = f"04{enc(ZPK2, encode_pin_block('01', '1234', account))}01"
    bdk = lmk("009", KEY_0123)
    for ksn, block in DUKPT_ROWS:
        yield case(
            f"dukpt-tdes-{ksn}-g0",
            f"G0{bdk}{lmk('001', ZPK2)}A05{ksn}{block}0101{account}",
            f"G100{expected}",
        )
        yield case(
            f"dukpt-tdes-{ksn}-ci", f"CI{bdk}{lmk('001', ZPK2)}A05{ksn}{block}01{account}", f"CJ00{expected}"
        )
    aes_bdk = aes_block("B0", bytes.fromhex("FEDCBA9876543210F1F1F1F1F1F1F1F1"))
    pan = "4111111111111111"
    expected = f"04{enc(ZPK2, encode_pin_block('01', '1234', account_from_pan(pan)))}01"
    for counter, block in AES_DUKPT_ROWS:
        ksn = "1234567890123456" + counter
        yield case(
            f"dukpt-aes128-{counter}-g0",
            f"G0{aes_bdk}{lmk('001', ZPK2)}A05{ksn}{block}4801{len(pan):02d}{pan}",
            f"G100{expected}",
        )


def card_cases() -> Iterable[Case]:
    """VECTORS 6: CVV through CW and CY (right and wrong CVV); CVV2/iCVV against the reference."""
    for cvk_hex, pan, expiry, sc, cvv in CVV_ROWS:
        cvk = lmk("402", bytes.fromhex(cvk_hex))
        yield case(f"cvv-{cvv}-cw", f"CW{cvk}{pan};{expiry}{sc}", f"CX00{cvv}")
        yield case(
            f"cvv-{cvv}-cw-x-scheme",
            f"CW{lmk('402', bytes.fromhex(cvk_hex), 'X')}{pan};{expiry}{sc}",
            f"CX00{cvv}",
        )
        yield case(f"cvv-{cvv}-cy", f"CY{cvk}{cvv}{pan};{expiry}{sc}", "CZ00")
        wrong = f"{(int(cvv) + 1) % 1000:03d}"
        yield case(f"cvv-{cvv}-cy-wrong", f"CY{cvk}{wrong}{pan};{expiry}{sc}", "CZ01")


def pvv_cases() -> Iterable[Case]:
    """VECTORS 7: PVV through DG (PIN under LMK), FW (PIN block), EC/DC verification."""
    for i, (pvk_hex, account, pvki, pin, pvv) in enumerate(PVV_ROWS, 1):
        pvk = lmk("002", bytes.fromhex(pvk_hex))
        pin_lmk = encrypt_pin_under_lmk(TEST_LMK, pin, account)
        block = enc(ZPK1, encode_pin_block("01", pin, account))
        tpk_block = enc(TPK, encode_pin_block("01", pin, account))
        yield case(f"pvv-row{i}-dg", f"DG{pvk}{pin_lmk}{account}{pvki}", f"DH00{pvv}")
        yield case(
            f"pvv-row{i}-fw-zpk", f"FW001{lmk('001', ZPK1)}{pvk}{block}01{account}{pvki}", f"FX00{pvv}"
        )
        yield case(
            f"pvv-row{i}-fw-tpk", f"FW002{lmk('002', TPK)}{pvk}{tpk_block}01{account}{pvki}", f"FX00{pvv}"
        )
        yield case(f"pvv-row{i}-ec", f"EC{lmk('001', ZPK1)}{pvk}{block}01{account}{pvki}{pvv}", "ED00")
        yield case(f"pvv-row{i}-dc", f"DC{lmk('002', TPK)}{pvk}{tpk_block}01{account}{pvki}{pvv}", "DD00")
        wrong = f"{(int(pvv) + 1) % 10000:04d}"
        yield case(
            f"pvv-row{i}-ec-wrong", f"EC{lmk('001', ZPK1)}{pvk}{block}01{account}{pvki}{wrong}", "ED01"
        )


def ibm_cases() -> Iterable[Case]:
    """VECTORS 8: IBM 3624 natural PIN 4524 and offsets 7710 / 6586 through DE, EE, EA, DA."""
    pvk = lmk("002", KEY_0123)
    account = IBM_ACCOUNT
    tail = f"{account}{IBM_DEC}{IBM_TEMPLATE}"
    for pin, offset in IBM_ROWS:
        pin_lmk = encrypt_pin_under_lmk(TEST_LMK, pin, account)
        padded = offset.ljust(12, "F")
        yield case(f"ibm-{pin}-de", f"DE{pvk}{pin_lmk}04{tail}", f"DF00{padded}")
        yield case(f"ibm-{offset}-ee", f"EE{pvk}{padded}04{tail}", f"EF00{pin_lmk}")
        block = enc(ZPK1, encode_pin_block("01", pin, account))
        yield case(
            f"ibm-{pin}-ea",
            f"EA{lmk('001', ZPK1)}{pvk}12{block}0104{account}{IBM_DEC}{IBM_TEMPLATE}{padded}",
            "EB00",
        )
        tpk_block = enc(TPK, encode_pin_block("01", pin, account))
        yield case(
            f"ibm-{pin}-da",
            f"DA{lmk('002', TPK)}{pvk}12{tpk_block}0104{account}{IBM_DEC}{IBM_TEMPLATE}{padded}",
            "DB00",
        )
    wrong = "7711FFFFFFFF"
    block = enc(ZPK1, encode_pin_block("01", "1234", account))
    yield case(
        "ibm-1234-ea-wrong-offset",
        f"EA{lmk('001', ZPK1)}{pvk}12{block}0104{account}{IBM_DEC}{IBM_TEMPLATE}{wrong}",
        "EB01",
    )


def key_cases() -> Iterable[Case]:
    """VECTORS 10 (KCVs via BU) and 4 (TR-31 blocks imported with A6 under their KBPK as ZMK)."""
    key = lmk("001", KEY_0123)
    yield case("kcv-tdes-bu-legacy", f"BU011{key}", "BV0008D7B4FB629D0885")
    yield case("kcv-tdes-bu-ff", f"BUFF1{key};001", "BV0008D7B4FB629D0885")
    yield case("kcv-tdes-bu-6", f"BUFF1{key};001;001", "BV0008D7B4")
    aes = aes_block("P0", bytes.fromhex("3F419E1CB7079442AA37474C2EFBF8B8"))
    yield case("kcv-aes-cmac-bu-6", f"BUFF1{aes};FFF;001", "BV0008793E")
    for name, kbpk_hex, block, clear_hex, key_type in TR31_ROWS:
        kbpk = adjust_parity(bytes.fromhex(kbpk_hex))
        _, clear = unwrap_tr31(kbpk, block)
        assert clear.hex().upper() == clear_hex, name
        error = "00" if has_odd_parity(clear) else "01"
        kcv = kcv_tdes(clear)[:3].hex().upper()
        key_lmk = encrypt_key_under_lmk(TEST_LMK, key_type, "U", clear)
        yield case(f"{name}-a6", f"A6{key_type}{lmk('000', kbpk)}R{block}U", f"A7{error}{key_lmk}{kcv}")
    yield from single_length_key_cases()


def single_length_key_cases() -> Iterable[Case]:
    """Single-length keys (scheme ``Z``) come back as the bare 16 hex characters, never ``Z`` + hex.

    VECTORS 6's CVK A and CVK B imported (A6) and exported (A8) under the VECTORS 10 key as ZMK, a
    single-length ZPK through FA, and CW with the two untagged A6 answers side by side as the legacy
    CVK pair (CVV 561). Inputs are given both as ``Z`` + 16 hex and as 16 hex.
    """
    zmk = lmk("000", KEY_0123)
    cvv_tail = "4123456789012345;8701101"
    halves = {"a": KEY_0123[:8], "b": KEY_0123[8:]}
    for half, clear in halves.items():
        under_zmk = tdes_ecb_encrypt(KEY_0123, clear).hex().upper()
        key_lmk = lmk("402", clear)  # 16 hex, no tag
        kcv = kcv_tdes(clear)[:3].hex().upper()
        yield case(f"single-z-cvk-{half}-a6", f"A6402{zmk}Z{under_zmk}Z", f"A700{key_lmk}{kcv}")
        yield case(f"single-z-cvk-{half}-a6-untagged-in", f"A6402{zmk}{under_zmk}Z", f"A700{key_lmk}{kcv}")
        yield case(f"single-z-cvk-{half}-a8", f"A8402{zmk}Z{key_lmk}Z", f"A900{under_zmk}{kcv}")
        yield case(f"single-z-cvk-{half}-a8-untagged-in", f"A8402{zmk}{key_lmk}Z", f"A900{under_zmk}{kcv}")
    pair = lmk("402", halves["a"]) + lmk("402", halves["b"])
    yield case("single-z-cvk-pair-cw", f"CW{pair}{cvv_tail}", "CX00561")
    zpk = halves["a"]
    zpk_zmk = tdes_ecb_encrypt(KEY_0123, zpk).hex().upper()
    kcv16 = kcv_tdes(zpk).hex().upper()
    yield case("single-z-zpk-fa-kcv6", f"FA{zmk}Z{zpk_zmk};ZZ1", f"FB00{lmk('001', zpk)}{kcv16[:6]}")
    yield case("single-z-zpk-fa-kcv16", f"FA{zmk}{zpk_zmk};ZZ0", f"FB00{lmk('001', zpk)}{kcv16}")
    yield case("single-z-zpk-fa-no-block", f"FA{zmk}Z{zpk_zmk}", f"FB00{lmk('001', zpk)}{kcv16}")


def mac_cases() -> Iterable[Case]:
    """VECTORS 9: X9.19 retail MAC (DUKPT request/response MAC keys) and X9.9 CBC-MAC via M6/M8."""
    data = b"4012345678909D987"
    length = f"{len(data):04X}"
    for name, key, mac in (
        ("req", DUKPT_MAC_KEY_REQ, "9CCC78173FC4FB64"),
        ("resp", DUKPT_MAC_KEY_RESP, "20364223C1FF00FA"),
    ):
        tak = lmk("003", key)
        yield case(f"mac-x919-dukpt-{name}-m6", f"M600131003{tak}{length}".encode() + data, f"M700{mac}")
        yield case(
            f"mac-x919-dukpt-{name}-m8", f"M800131003{tak}{length}".encode() + data + mac.encode(), "M900"
        )
    x99 = bytes.fromhex("676976656D65534F4D454D4143696E67")
    tak = lmk("003", bytes.fromhex("E9CB01B93B20914F"))
    yield case("mac-x99-m6", f"M600011003{tak}{len(x99):04X}".encode() + x99, "M700170C2BDB")
    yield case("mac-x99-m8", f"M800011003{tak}{len(x99):04X}".encode() + x99 + b"170C2BDB", "M900")
    yield case("mac-x99-m8-wrong", f"M800011003{tak}{len(x99):04X}".encode() + x99 + b"170C2BDC", "M901")


def gm_cases() -> Iterable[Case]:
    """GM: SHA-1/2 digests of the FIPS 180 example strings."""
    for hid, name, data in GM_ROWS:
        label = "abc" if data == b"abc" else ("empty" if not data else "448bit")
        yield case(
            f"gm-{name}-{label}",
            b"GM" + hid.encode() + b"%05d" % len(data) + data,
            b"GN00" + hashlib.new(name, data).digest(),
        )


def emv_cases() -> Iterable[Case]:
    """KQ with the VECTORS 11 issuer key and PAN/PSN; the ARQC is computed (see the module docstring)."""
    mk = lmk("109", KEY_0123)
    pan, psn = "9901234567890123", "45"
    atc, un = bytes.fromhex("0001"), bytes.fromhex("12345678")
    data = bytes.fromhex("0123456789ABCDEF0123456789ABCDEF")
    icc = emv.derive_icc_mk(KEY_0123, pan, psn)
    sk = emv.derive_common_session_key(icc, emv.common_sk_diversification(atc, un))
    arqc = emv.generate_arqc(sk, data)
    head = (
        b"KQ%s1"
        + mk.encode()
        + bytes.fromhex((pan + psn)[-16:])
        + atc
        + un
        + b"%02X" % len(data)
        + data
        + b";"
    )
    yield case("kq-arqc-ok", head.replace(b"%s", b"0", 1) + arqc, "KR00")
    bad = bytes([arqc[0] ^ 1]) + arqc[1:]
    yield case("kq-arqc-wrong", head.replace(b"%s", b"0", 1) + bad, "KR01")
    yield case("kq-arqc-arpc", head.replace(b"%s", b"1", 1) + arqc + b"\x00\x00", "reference")


def vector_cases() -> list[Case]:
    """Every known-answer case."""
    return [
        *pin_block_cases(),
        *dukpt_cases(),
        *card_cases(),
        *pvv_cases(),
        *ibm_cases(),
        *key_cases(),
        *mac_cases(),
        *gm_cases(),
        *emv_cases(),
        case("echo-hello", "B20005hello", "B300hello"),
        case("echo-trailer", b"B20002hi\x19TRAIL", b"B300hi\x19TRAIL"),
    ]


def error_cases() -> list[Case]:
    """Error paths with the payShield code each must answer."""
    cvk = lmk("402", KEY_0123)
    card_tail = "4123456789012345;8701101"
    even = bytes.fromhex("0023456789ABCDEFFEDCBA9876543210")  # 0x00 has even parity
    even_cvk = encrypt_key_under_lmk(TEST_LMK, "402", "U", even)
    account = account_from_pan("4012345678909")
    block = enc(ZPK1, encode_pin_block("01", "1234", account))
    zpk1 = lmk("001", ZPK1)
    zpk2 = lmk("001", ZPK2)
    return [
        case("unknown-command-ZZ", "ZZ", "ZA68"),
        case("unknown-command-Q1", "Q1whatever", "Q268"),
        case("cw-bad-key-scheme", f"CWW{cvk[1:]}{card_tail}", "CX26"),
        case("cw-non-hex-key", f"CW{cvk[:-1]}G{card_tail}", "CX15"),
        case("cw-bad-lmk-id", f"CW{cvk}{card_tail}%99", "CX13"),
        case("cw-cvk-parity", f"CW{even_cvk}{card_tail}", "CX10"),
        case("cw-single-length-cvk", f"CW{lmk('402', KEY_0123[:8], 'Z')}{card_tail}", "CX27"),
        case("cw-missing-delimiter", f"CW{cvk}41234567890123458701101", "CX15"),
        case("nc-bad-lmk-id", "NC%13", "ND13"),
        case("cc-bad-source-format", f"CC{zpk1}{zpk2}12{block}0201{account}", "CD23"),
        case("cc-bad-destination-format", f"CC{zpk1}{zpk2}12{block}0199{account}", "CD23"),
        case("cc-tdes-key-iso4", f"CC{zpk1}{zpk2}12{block}0148164012345678909000", "CD23"),
        case("je-bad-format", f"JE{zpk1}{block}99{account}", "JF23"),
        case("je-wrong-account", f"JE{zpk1}{block}01{'9' * 12}", "JF20"),
        case("je-non-numeric-account", f"JE{zpk1}{block}01ABCDEFABCDEF", "JF15"),
        case("ja-pin-too-short", f"JA{account}03", "JB24"),
        case("ja-pin-too-long", f"JA{account}13", "JB24"),
        case("jg-bad-pin-under-lmk", f"JG{zpk1}01{account}{'0' * 16}", "JH14"),
        case("gm-bad-hash-id", "GM9900003abc", "GN15"),
        case("b2-short-data", "B20009short", "B380"),
        case("a0-bad-key-scheme", "A00001Q", "A126"),
        case("a0-bad-key-type", "A00ZZ1U", "A104"),
        case("bu-bad-length-flag", f"BUFF7{zpk1};001", "BV05"),
        case("bu-wrong-length-flag", f"BUFF0{zpk1};001", "BV27"),
        case("cy-wrong-cvv", f"CY{cvk}000{card_tail}", "CZ01"),
    ]


def reference_cases() -> list[Case]:
    """Cases compared with the reference (conventions not fixed by a vector)."""
    cvk = lmk("402", KEY_0123)
    bdk = lmk("009", KEY_0123)
    data = b"4012345678909D987".ljust(24, b"\x00")
    out = [
        case("nc-default", "NC", "reference"),
        case("nc-lmk-00", "NC%00", "reference"),
        case("no-mode-00", "NO00", "reference"),
        case("cvv2-sc000", f"CW{cvk}4123456789012345;8701000", "reference"),
        case("icvv-sc999", f"CW{cvk}4123456789012345;8701999", "reference"),
    ]
    for ksn in ("FFFF9876543210E00001", "FFFF9876543210E00002"):
        out.append(
            case(
                f"dukpt-data-{ksn}-m0",
                f"M0010001009{bdk}A05{ksn}0000000000000000{len(data):04X}".encode() + data,
                "reference",
            )
        )
    return out


def _toml_string(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(cases: list[Case], title: str) -> str:
    """TOML text of ``cases``."""
    lines = [f"# {title}", "# Generated by conformance/build_cases.py - edit that file, not this one.", ""]
    for c in cases:
        lines.append("[[case]]")
        for k, v in c.items():
            lines.append(f"{k} = {_toml_string(v)}")
        lines.append("")
    return "\n".join(lines)


FILES = {
    "vectors.toml": ("Known answers from shared/VECTORS.md", vector_cases),
    "errors.toml": ("Error paths and the payShield code each answers", error_cases),
    "reference.toml": ("Compared with the reference (conventions no vector fixes)", reference_cases),
}


def build() -> dict[str, str]:
    """File name -> TOML text of the whole corpus."""
    out = {}
    for name, (title, make) in FILES.items():
        cases = make()
        names = [c["name"] for c in cases]
        assert len(names) == len(set(names)), f"duplicate case names in {name}"
        out[name] = render(cases, title)
    return out


def main() -> None:
    """Write the corpus into conformance/cases/."""
    CASES_DIR.mkdir(exist_ok=True)
    for name, text in build().items():
        (CASES_DIR / name).write_text(text, encoding="utf-8")
        print(f"wrote {CASES_DIR / name}")


if __name__ == "__main__":
    main()
