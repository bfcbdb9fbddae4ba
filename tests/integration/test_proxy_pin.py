"""The proxy's PIN and card commands on SoftHSM2 answer byte for byte like the emulator.

CA CC CI G0 JA JC JE JG DA EA DC EC DE EE DG FW CW CY: deterministic requests (good and error
paths) are compared with the emulator; random outputs (JA, formats 05/47/48 out) by round trip
with psec. VECTORS.md sections 1 (PIN blocks), 2 (TDES DUKPT), 3 (AES DUKPT), 6 (CVV), 7 (PVV)
and 8 (IBM 3624) are asserted through the proxy.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import psec
import pytest

from emulator.app import TEST_KEYBLOCK_LMK
from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.keyblock import KeyBlockHeader, wrap_key_block
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk
from emulator.crypto.pin_lmk import decrypt_pin_under_lmk, encrypt_pin_under_lmk
from emulator.crypto.pinblock import encipher_iso4, encode_pin_block
from hsmproxy.commands import HANDLERS
from hsmproxy.commands.base import CommandContext
from hsmproxy.server.hostcmd import Dispatcher
from tests.integration.conftest import HsmClient, RunningEmulator
from tests.integration.proxy_env import RunningProxy

TPK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
ZPK = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
ZPK2 = bytes.fromhex("FEDCBA98765432100123456789ABCDEF")
ZPK1 = bytes.fromhex("0123456789ABCDEF")
EVEN = bytes.fromhex("0023456789ABCDEFFEDCBA9876543210")
PVK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
BDK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
AES_BDK = bytes.fromhex("FEDCBA9876543210F1F1F1F1F1F1F1F1")
AES_ZPK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
CVK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
PAN = "4012345678909"
ACCT = b"401234567890"
TABLE = b"1234567890123456"


def lmk(key_type: str, clear: bytes, scheme: str = "U") -> bytes:
    """``clear`` under the test variant LMK."""
    return encrypt_key_under_lmk(TEST_LMK, key_type, scheme, clear).encode()


def kb(usage: str, clear: bytes, algorithm: str = "A", mode: str = "N") -> bytes:
    """``clear`` as a key block under the test AES key-block LMK (id 01)."""
    header = KeyBlockHeader("1", usage, algorithm, mode, lmk_id="01")
    return b"S" + wrap_key_block(TEST_KEYBLOCK_LMK, header, clear).encode()


def enc(key: bytes, clear: bytes) -> bytes:
    """TDES-ECB (psec), hex."""
    with legacy_tdes():
        return bytes(psec.des.encrypt_tdes_ecb(key, clear)).hex().upper().encode()


def dec(key: bytes, block: bytes) -> bytes:
    """TDES-ECB decrypt of a hex block (psec)."""
    with legacy_tdes():
        return bytes(psec.des.decrypt_tdes_ecb(key, bytes.fromhex(block.decode())))


def iso0(key: bytes, pin: str, pan: str = PAN) -> bytes:
    """ISO-0 PIN block under ``key`` (psec), hex."""
    return enc(key, psec.pinblock.encode_pinblock_iso_0(pin, pan))


def acct(pan: str) -> bytes:
    """Thales 12-digit account of a PAN."""
    return pan[:-1][-12:].rjust(12, "0").encode()


def pin_lmk(pin: str, account: bytes = ACCT) -> bytes:
    """A PIN under the test LMK (hsmproxy's encoding)."""
    return encrypt_pin_under_lmk(TEST_LMK, pin, account.decode()).encode()


@pytest.fixture
def pair(running_proxy: RunningProxy, emulator: RunningEmulator) -> Iterator[tuple[HsmClient, HsmClient]]:
    """(proxy client, emulator client)."""
    proxy = HsmClient("127.0.0.1", running_proxy.port)
    ref = HsmClient(emulator.host, emulator.port)
    yield proxy, ref
    proxy.close()
    ref.close()


# -- deterministic requests: byte-for-byte comparison ------------------------------------------------


def _translation_requests() -> list[bytes]:
    za, zb = lmk("001", ZPK), lmk("001", ZPK2 + ZPK2[:8], "T")
    zx, zz, ze = lmk("001", ZPK2, "X"), lmk("001", ZPK1, "Z"), lmk("001", EVEN)
    tpk, te = lmk("002", TPK), lmk("002", EVEN)
    block, tblock = iso0(ZPK, "1234"), iso0(TPK, "98765")
    iso3 = enc(ZPK, encode_pin_block("47", "123456", ACCT.decode(), fill="ABCDEFAB"))
    iso1 = enc(ZPK, encode_pin_block("05", "4321", fill="0123456789"))
    dieb = enc(ZPK, bytes.fromhex("55555FFFFFFFFFFF"))
    no_f = enc(ZPK, bytes.fromhex("1234567890123456"))
    f_early = enc(ZPK, bytes.fromhex("1F23FFFFFFFFFFFF"))
    aes, aes_t = kb("P0", AES_ZPK), kb("P0", ZPK2, "T")
    bad_usage = kb("M0", ZPK2, "T")
    pan19 = b"19" + b"1234567890123456789"
    iso4_vec = b"28B41FDDD29B743E93124BD8E32D921E"  # VECTORS.md section 1 (psec, fill FF)
    rest = b"0101" + ACCT
    return [
        b"CC" + za + zb + b"12" + block + rest,
        b"CC" + za + zx + b"12" + block + b"0103" + ACCT,
        b"CC" + za + zz + b"12" + block + rest,
        b"CC" + zz + za + b"12" + enc(ZPK1, psec.pinblock.encode_pinblock_iso_0("1234", PAN)) + rest,
        b"CC" + za + zb + b"04" + block + rest,
        b"CC" + za + zb + b"03" + block + rest,
        b"CC" + za + zb + b"13" + block + rest,
        b"CC" + za + zb + b"12" + block + b"0199" + ACCT,
        b"CC" + za + zb + b"12" + block + b"9901" + ACCT,
        b"CC" + za + zb + b"12" + block + b"0201" + ACCT,
        b"CC" + za + zb + b"12" + block + rest + b"%00",
        b"CC" + za + zb + b"12" + block + rest + b"%01",
        b"CC" + za + zb + b"12" + block + rest + b"%02",
        b"CC" + za + zb + b"12" + b"0" * 16 + rest,
        b"CC" + za + zb + b"12" + block + b"01" + b"01" + b"401234567891",
        b"CC" + ze + zb + b"12" + block + rest,
        b"CC" + za + ze + b"12" + block + rest,
        b"CC" + ze + ze + b"12" + block + b"9901" + ACCT,
        b"CC" + za + zb + b"12" + iso3 + b"4701" + ACCT,
        b"CC" + za + zb + b"12" + iso3 + b"0101" + ACCT,
        b"CC" + za + zb + b"12" + iso1 + b"0501" + ACCT,
        b"CC" + za + zb + b"12" + dieb + b"0301" + ACCT,
        b"CC" + za + zb + b"12" + no_f + b"0301" + ACCT,
        b"CC" + za + zb + b"12" + f_early + b"0301" + ACCT,
        b"CC" + za + zb + b"12" + block + b"0301" + ACCT,
        b"CC" + aes + za + b"12" + iso4_vec + b"4801" + pan19,
        b"CC" + aes + za + b"12" + iso4_vec + b"4801" + pan19 + b"%01",
        b"CC" + aes + za + b"12" + iso4_vec + b"4801" + pan19 + b"%00",
        b"CC" + aes + za + b"04" + iso4_vec + b"4803" + pan19,
        b"CC" + aes + za + b"12" + iso4_vec + b"4801" + b"19" + b"1234567890123456788",
        b"CC" + aes + za + b"12" + iso4_vec + b"0101" + ACCT,
        b"CC" + za + aes + b"12" + block + b"0101" + ACCT,
        b"CC" + za + zb + b"12" + block + b"4801" + pan19,
        b"CC" + za + aes + b"12" + block + b"0148" + b"01" + b"5",
        b"CC" + za + aes + b"12" + block + b"0148" + b"16" + b"41111111111111AB",
        b"CC" + aes + za + b"12" + iso4_vec + b"4801" + b"16" + b"41111111111111AB",
        b"CC" + aes_t + za + b"12" + iso0(ZPK2, "1234") + rest,
        b"CC" + za + aes_t + b"12" + block + rest,
        b"CC" + bad_usage + za + b"12" + iso0(ZPK2, "1234") + rest,
        b"CC" + za + bad_usage + b"12" + block + rest,
        b"CC" + b"R0072P0TE00E0000F5161ED902807AF26F1D62263644BD24192FDB3193C730301CEE8701"
        + za + b"12" + block + rest,
        b"CA" + tpk + za + b"12" + tblock + rest,
        b"CA" + tpk + zx + b"12" + tblock + b"0103" + ACCT + b"\x19trailer",
        b"CA" + te + za + b"12" + tblock + rest,
        b"CA" + tpk + ze + b"12" + tblock + rest,
        b"CA" + tpk + za + b"04" + tblock + rest,
        b"CA" + kb("71", TPK, "T") + za + b"12" + tblock + rest,
        b"CA" + kb("72", TPK, "T") + za + b"12" + tblock + rest,
    ]  # fmt: skip


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
AES_DUKPT = [
    ("123456789012345600000001", "A912150391AB65A67E52883D81CE2D15"),
    ("123456789012345600000002", "52A00503BD34BA1383F6A7EE9FE2547F"),
    ("123456789012345600000003", "A5A27E82B43A9A866A93D7ABE89CEF93"),
]


def _dukpt_requests() -> list[bytes]:
    za, bdk, bdk_t = lmk("001", ZPK), lmk("009", BDK), lmk("009", BDK + BDK[:8], "T")
    aes_bdk, aes256 = kb("B0", AES_BDK, "A", "X"), kb("B0", AES_BDK + AES_BDK, "A", "X")
    tdes_kb_bdk = kb("B0", BDK, "T", "X")
    ksn, epb = TDES_DUKPT[0]
    rest = b"A05" + ksn.encode() + epb.encode()
    pan16 = b"16" + b"4111111111111111"
    aksn, aepb = AES_DUKPT[0]
    arest = b"A05" + aksn.encode() + aepb.encode()
    return [
        b"G0" + bdk + za + rest + b"0101" + ACCT,
        b"CI" + bdk + za + rest + b"01" + ACCT,
        b"CI" + bdk + za + rest + b"03" + ACCT,
        b"G0" + bdk + za + rest.replace(b"E00001", b"E00002") + b"0101" + ACCT,
        b"G0" + lmk("009", EVEN) + za + rest + b"0101" + ACCT,
        b"G0" + bdk + lmk("001", EVEN) + rest + b"0101" + ACCT,
        b"G0" + bdk + za + rest + b"4701" + ACCT,
        b"G0" + bdk + za + rest + b"9901" + ACCT,
        b"G0" + bdk + za + rest + b"4801" + b"13" + PAN.encode(),
        b"G0" + bdk_t + za + rest + b"0101" + ACCT,
        b"G0" + bdk + za + rest + b"0101" + ACCT + b"%01",
        b"G0" + tdes_kb_bdk + za + rest + b"0101" + ACCT,
        b"G0" + kb("P0", BDK, "T") + za + rest + b"0101" + ACCT,
        b"G0" + aes_bdk + za + arest + b"4801" + pan16,
        b"G0" + aes_bdk + za + arest + b"0101" + ACCT,
        b"G0" + aes_bdk + za + arest + b"4801" + b"16" + b"4111111111111112",
        b"G0" + aes256 + za + arest + b"4801" + pan16,
        b"G0" + aes_bdk + za + b"A05" + aksn.encode()[:-1] + b"2" + aepb.encode() + b"4801" + pan16,
        b"CI" + aes_bdk + za + arest + b"01" + ACCT,
    ]


def _pin_lmk_requests() -> list[bytes]:
    za, tpk, aes = lmk("001", ZPK), lmk("002", TPK), kb("P0", AES_ZPK)
    pan16 = "4111111111111111"
    iso4_block = encipher_iso4(AES_ZPK, "5678", pan16).hex().upper().encode()
    return [
        b"JA" + ACCT + b"03",
        b"JA" + ACCT + b"13",
        b"JA" + ACCT + b"03%02",
        b"JA" + ACCT + b"04%01",
        b"JA" + ACCT + b"04%02",
        b"JC" + tpk + iso0(TPK, "1234") + b"01" + ACCT,
        b"JC" + tpk + iso0(TPK, "1234") + b"01" + ACCT + b"%01",
        b"JC" + lmk("002", EVEN) + iso0(TPK, "1234") + b"01" + ACCT,
        b"JC" + tpk + iso0(TPK, "1234") + b"47" + ACCT,
        b"JE" + za + iso0(ZPK, "987654321") + b"01" + ACCT,
        b"JE" + za + iso0(ZPK, "1234") + b"99" + ACCT,
        b"JE" + aes + iso4_block + b"48" + b"16" + pan16.encode(),
        b"JG" + za + b"01" + ACCT + pin_lmk("1234"),
        b"JG" + za + b"03" + ACCT + pin_lmk("123456"),
        b"JG" + za + b"01" + ACCT + pin_lmk("1234", b"401234567891"),
        b"JG" + za + b"01" + ACCT + b"0" * 16,
        b"JG" + za + b"99" + ACCT + pin_lmk("1234"),
        b"JG" + za + b"01" + ACCT + pin_lmk("1234") + b"%01",
        b"JG" + lmk("001", EVEN) + b"01" + ACCT + pin_lmk("1234"),
        b"JG" + aes + b"01" + ACCT + pin_lmk("1234"),
    ]  # fmt: skip


IBM_ACCT = b"000000067788"  # last 5 digits 67788: template 11223344556N -> 1122334455667788
IBM_VD = b"11223344556N"
PVV_PVK_1 = bytes.fromhex("C8199237EA5857BC40EF9DA2B5E96BBF")
PVV_ACCT = b"550000025321"


def _verify_requests() -> list[bytes]:
    za, tpk, pvk = lmk("001", ZPK), lmk("002", TPK), lmk("002", PVK)
    pvx = lmk("002", PVV_PVK_1, "X")[1:]  # untagged double-length PVK pair
    b1234, t1234 = iso0(ZPK, "1234", "00000006778" + "80"), iso0(TPK, "1234", "00000006778" + "80")
    tail = IBM_ACCT + TABLE + IBM_VD
    pv_block = iso0(ZPK, "1234", "5500000253210")
    out: list[bytes] = []
    for pfx, key, blk in ((b"DA", tpk, t1234), (b"EA", za, b1234)):
        head = pfx + key + pvk + b"12" + blk + b"0104"
        out += [
            pfx + key + pvk + b"12" + blk + b"01" + b"04" + tail + b"7710FFFFFFFF",
            pfx + key + pvk + b"12" + blk + b"01" + b"04" + tail + b"7711FFFFFFFF",
            pfx + key + pvk + b"12" + blk + b"01" + b"03" + tail + b"7710FFFFFFFF",
            pfx + key + pvk + b"12" + blk + b"01" + b"05" + tail + b"7710FFFFFFFF",
            pfx + key + pvk + b"12" + blk + b"01" + b"04" + tail + b"771FFFFFFFFF",
            pfx + key + pvk + b"12" + blk + b"01" + b"04" + tail + b"77A0FFFFFFFF",
            pfx + key + pvk + b"03" + blk + b"01" + b"04" + tail + b"7710FFFFFFFF",
            head + IBM_ACCT + b"123456789012345A" + IBM_VD + b"7710FFFFFFFF",
            head + IBM_ACCT + TABLE + b"1122334455NG" + b"7710FFFFFFFF",
            head + IBM_ACCT + TABLE + b"112233445566" + b"7710FFFFFFFF",
            pfx + key + lmk("002", EVEN) + b"12" + blk + b"01" + b"04" + tail + b"7710FFFFFFFF",
            pfx + key + kb("V1", AES_ZPK) + b"12" + blk + b"01" + b"04" + tail + b"7710FFFFFFFF",
            pfx + key + kb("V1", PVK, "T") + b"12" + blk + b"01" + b"04" + tail + b"7710FFFFFFFF",
            pfx + key + kb("P0", PVK, "T") + b"12" + blk + b"01" + b"04" + tail + b"7710FFFFFFFF",
        ]
    for pfx, key, k in ((b"DC", tpk, TPK), (b"EC", za, ZPK)):
        blk = iso0(k, "1234", "5500000253210")
        out += [
            pfx + key + pvx + blk + b"01" + PVV_ACCT + b"1" + b"4402",
            pfx + key + pvx + blk + b"01" + PVV_ACCT + b"1" + b"4403",
            pfx + key + pvx + blk + b"01" + PVV_ACCT + b"2" + b"4402",
            pfx + key + pvx + blk + b"03" + PVV_ACCT + b"1" + b"4402",
            pfx + key + lmk("002", EVEN, "X")[1:] + blk + b"01" + PVV_ACCT + b"1" + b"4402",
        ]
    out += [
        b"DE" + pvk + pin_lmk("1234", IBM_ACCT) + b"04" + tail,
        b"DE" + pvk + pin_lmk("0000", IBM_ACCT) + b"04" + tail,
        b"DE" + pvk + pin_lmk("123456", IBM_ACCT) + b"04" + tail,
        b"DE" + pvk + pin_lmk("1234", IBM_ACCT) + b"05" + tail,
        b"DE" + pvk + pin_lmk("1234", IBM_ACCT) + b"13" + tail,
        b"DE" + pvk + pin_lmk("1234", IBM_ACCT) + b"04" + tail + b"%01",
        b"DE" + lmk("002", EVEN) + pin_lmk("1234", IBM_ACCT) + b"04" + tail,
        b"DE" + pvk + b"0" * 16 + b"04" + tail,
        b"EE" + pvk + b"7710FFFFFFFF" + b"04" + tail,
        b"EE" + pvk + b"6586FFFFFFFF" + b"04" + tail,
        b"EE" + pvk + b"771FFFFFFFFF" + b"04" + tail,
        b"EE" + pvk + b"7710FFFFFFFF" + b"05" + tail,
        b"EE" + pvk + b"7710FFFFFFFF" + b"04" + tail + b"%01",
        b"EE" + pvk + b"7710FFFFFFFF" + b"04" + IBM_ACCT + b"ABCDEF0123456789" + IBM_VD,
        b"DG" + pvx + pin_lmk("1234", PVV_ACCT) + PVV_ACCT + b"1",
        b"DG"
        + lmk("002", bytes.fromhex("86190176866EC17FB32685ADB6ADA83B"), "X")[1:]
        + pin_lmk("1234", PVV_ACCT)
        + PVV_ACCT
        + b"1",
        b"DG" + pvx + pin_lmk("1234", PVV_ACCT) + PVV_ACCT + b"1%01",
        b"DG" + pvx + b"F" * 16 + PVV_ACCT + b"1",
        b"FW" + b"001" + za + pvx + pv_block + b"01" + PVV_ACCT + b"1",
        b"FW" + b"002" + tpk + pvx + iso0(TPK, "1234", "5500000253210") + b"01" + PVV_ACCT + b"1",
        b"FW" + b"003" + za + pvx + pv_block + b"01" + PVV_ACCT + b"1",
        b"FW" + b"001" + za + lmk("002", EVEN, "X")[1:] + pv_block + b"01" + PVV_ACCT + b"1",
        b"FW" + b"001" + lmk("001", EVEN) + pvx + pv_block + b"01" + PVV_ACCT + b"1",
    ]
    return out


def _card_requests() -> list[bytes]:
    cvk_u, cvk_x = lmk("402", CVK), lmk("402", CVK, "X")[1:]
    psec_cvk = kb("C0", bytes.fromhex("99999999999999998888888888888888"), "T")
    return [
        b"CW" + cvk_u + b"4123456789012345;8701101",
        b"CW" + cvk_x + b"4999988887777;9105111",
        b"CW" + psec_cvk + b"2222222222222222;3333111",
        b"CW" + cvk_u + b"4123456789012345;8701000",
        b"CW" + cvk_u + b"4123456789012345;8701101%01",
        b"CW" + lmk("402", EVEN) + b"4123456789012345;8701101",
        b"CW" + lmk("402", CVK + CVK[:8], "T") + b"4123456789012345;8701101",
        b"CW" + lmk("402", CVK[:8], "Z") + b"4123456789012345;8701101",
        b"CW" + kb("C0", AES_ZPK) + b"4123456789012345;8701101",
        b"CW" + kb("P0", CVK, "T") + b"4123456789012345;8701101",
        b"CY" + cvk_u + b"561" + b"4123456789012345;8701101",
        b"CY" + cvk_u + b"562" + b"4123456789012345;8701101",
        b"CY" + psec_cvk + b"361" + b"2222222222222222;3333111",
        b"CY" + lmk("402", EVEN) + b"561" + b"4123456789012345;8701101",
    ]


ALL = (
    _translation_requests() + _dukpt_requests() + _pin_lmk_requests() + _verify_requests() + _card_requests()
)


def test_proxy_matches_emulator_on_pin_and_card_commands(pair: tuple[HsmClient, HsmClient]) -> None:
    proxy, ref = pair
    mismatches = []
    for request in ALL:
        got, want = proxy.call(request), ref.call(request)
        if got != want:
            mismatches.append((request[:2], request[2:60], got, want))
    assert not mismatches, mismatches
    codes = {ref.call(r)[2:4].decode() for r in ALL}
    # the comparison covers good and error paths alike
    assert {"00", "01", "10", "11", "13", "15", "20", "22", "23", "24", "25", "27", "29"} <= codes


def _random_request(rng: random.Random) -> tuple[bytes, bool]:
    """A random PIN/card request mixing good and bad keys, formats, PINs; (request, deterministic)."""
    pan = str(rng.randrange(10**12, 10**19))
    account = acct(pan)
    pin = "".join(rng.choice("0123456789") for _ in range(rng.choice((4, 4, 6, 12, 13))))[:12]
    zpk = rng.choice((ZPK, ZPK2))
    zpk_ref = rng.choice((lmk("001", zpk), lmk("001", zpk), kb("P0", zpk, "T"), lmk("001", EVEN)))
    dst_ref = rng.choice((lmk("001", ZPK2), lmk("001", EVEN), kb("72", ZPK2, "T")))
    fmt = rng.choice(("01", "01", "03", "47", "05", "99"))
    clear = encode_pin_block(fmt if fmt != "99" else "01", pin, account.decode())
    block = enc(zpk, clear) if rng.random() < 0.9 else enc(zpk, bytes(rng.randrange(256) for _ in range(8)))
    dst_fmt = rng.choice(("01", "03", "47", "05", "02"))
    max_len = rng.choice((b"12", b"04", b"06", b"03"))
    lmk_tail = rng.choice((b"", b"", b"", b"%00", b"%01"))
    pvk = rng.choice((lmk("002", PVK), lmk("002", PVK), lmk("002", EVEN), kb("V2", PVK, "T")))
    check = rng.choice((b"04", b"06", b"12", b"03"))
    offset = "".join(rng.choice("0123456789") for _ in range(len(pin))).ljust(12, "F").encode()
    vd = rng.choice((b"1234567890AN", b"N12345678901", b"ABCDEF012345", b"12345678901G"))
    table = rng.choice((TABLE, b"0123456789012345", b"0123456789ABCDEF"))
    kind = rng.choice(("CC", "JE", "JG", "EA", "EC", "DE", "EE", "DG", "FW", "CW", "CY"))
    if kind == "CC":
        req = b"CC" + zpk_ref + dst_ref + max_len + block + fmt.encode() + dst_fmt.encode() + account
        return req + lmk_tail, dst_fmt in ("01", "03", "02")
    if kind == "JE":
        return b"JE" + zpk_ref + block + fmt.encode() + account + lmk_tail, True
    if kind == "JG":
        value = pin_lmk(pin[:12] if len(pin) >= 4 else "1234", account) if rng.random() < 0.9 else b"0" * 16
        return b"JG" + zpk_ref + dst_fmt.encode() + account + value + lmk_tail, dst_fmt in ("01", "03", "02")
    if kind == "EA":
        req = b"EA" + zpk_ref + pvk + max_len + block + fmt.encode() + check + account + table + vd + offset
        return req + lmk_tail, True
    if kind == "EC":
        pvv = f"{rng.randrange(10000):04d}".encode()
        return b"EC" + zpk_ref + lmk("002", PVK, "X")[1:] + block + fmt.encode() + account + b"1" + pvv, True
    if kind == "DE":
        value = pin_lmk(pin if 4 <= len(pin) <= 12 else "1234", account)
        return b"DE" + pvk + value + check + account + table + vd, True
    if kind == "EE":
        return b"EE" + pvk + offset + check + account + table + vd + lmk_tail, True
    if kind == "DG":
        return b"DG" + lmk("002", PVK, "X")[1:] + pin_lmk("98765", account) + account + b"3" + lmk_tail, True
    if kind == "FW":
        return b"FW001" + zpk_ref + lmk("002", PVK, "X")[1:] + block + fmt.encode() + account + b"7", True
    cvk = rng.choice((lmk("402", CVK), lmk("402", ZPK2, "X")[1:], kb("C0", ZPK, "T"), lmk("402", EVEN)))
    data = pan.encode() + b";" + f"{rng.randrange(10000):04d}".encode() + rng.choice((b"101", b"000", b"999"))
    if kind == "CW":
        return b"CW" + cvk + data + lmk_tail, True
    return b"CY" + cvk + f"{rng.randrange(1000):03d}".encode() + data + lmk_tail, True


def test_proxy_matches_emulator_on_random_requests(pair: tuple[HsmClient, HsmClient]) -> None:
    proxy, ref = pair
    rng = random.Random(20240611)
    for _ in range(400):
        request, deterministic = _random_request(rng)
        got, want = proxy.call(request), ref.call(request)
        if deterministic or want[2:4] != b"00":
            assert got == want, request
        else:
            assert got[:4] == want[:4] and len(got) == len(want), request


# -- VECTORS.md through the proxy ---------------------------------------------------------------------


@pytest.fixture
def proxy(running_proxy: RunningProxy) -> Iterator[HsmClient]:
    """A client of the session proxy."""
    c = HsmClient("127.0.0.1", running_proxy.port)
    yield c
    c.close()


@pytest.mark.parametrize(("ksn", "epb"), TDES_DUKPT)
def test_x924_1_tdes_dukpt_vectors(proxy: HsmClient, ksn: str, epb: str) -> None:
    keys = lmk("009", BDK) + lmk("001", ZPK)
    expected = b"04" + iso0(ZPK, "1234") + b"01"
    assert (
        proxy.call(b"G0" + keys + b"A05" + ksn.encode() + epb.encode() + b"0101" + ACCT) == b"G100" + expected
    )
    assert (
        proxy.call(b"CI" + keys + b"A05" + ksn.encode() + epb.encode() + b"01" + ACCT) == b"CJ00" + expected
    )


@pytest.mark.parametrize(("ksn", "epb"), AES_DUKPT)
def test_x924_3_aes_dukpt_iso4_vectors(proxy: HsmClient, ksn: str, epb: str) -> None:
    pan = "4111111111111111"
    bdk = kb("B0", AES_BDK, "A", "X")
    req = (
        b"G0" + bdk + lmk("001", ZPK) + b"A05" + ksn.encode() + epb.encode() + b"4801" + b"16" + pan.encode()
    )
    assert proxy.call(req) == b"G10004" + iso0(ZPK, "1234", pan) + b"01"
    req = (
        b"G0"
        + bdk
        + kb("P0", AES_ZPK)
        + b"A05"
        + ksn.encode()
        + epb.encode()
        + b"4848"
        + b"16"
        + pan.encode()
    )
    resp = proxy.call(req)
    assert resp[:6] == b"G10004" and resp[-2:] == b"48"
    assert psec.pinblock.decipher_pinblock_iso_4(AES_ZPK, bytes.fromhex(resp[6:-2].decode()), pan) == "1234"


def test_aes_dukpt_counter_4_pin_key(proxy: HsmClient) -> None:
    """VECTORS.md section 3: the counter-4 PIN key 91A0…896E, shown by decrypting a block made with it."""
    pan = "4111111111111111"
    key = bytes.fromhex("91A0588318EC2673214271F70137896E")
    epb = psec.pinblock.encipher_pinblock_iso_4(key, "7391", pan).hex().upper().encode()
    req = b"G0" + kb("B0", AES_BDK, "A", "X") + lmk("001", ZPK) + b"A05123456789012345600000004" + epb
    assert proxy.call(req + b"4801" + b"16" + pan.encode()) == b"G10004" + iso0(ZPK, "7391", pan) + b"01"


def test_iso_pin_block_vectors(proxy: HsmClient) -> None:
    """VECTORS.md section 1: ISO-0 clear blocks, the IBM ISO-3 example, the psec ISO-4 vector."""
    za = lmk("001", ZPK)
    for pin, pan, clear in (
        ("1234", "43219876543210987", "0412AC89ABCDEF67"),
        ("1234", "4012345678909", "041274EDCBA9876F"),
        ("1234", "5555555551234567", "041261AAAAEDCBA9"),
        ("123456789012", "5555555551234567", "0C1261032D8226A9"),
    ):
        resp = proxy.call(b"JG" + za + b"01" + acct(pan) + pin_lmk(pin, acct(pan)))
        assert resp[:4] == b"JH00" and dec(ZPK, resp[4:]).hex().upper() == clear
    iso3 = enc(ZPK, bytes.fromhex("361216759CFA8889"))
    resp = proxy.call(b"CC" + za + za + b"12" + iso3 + b"4703" + b"222333444555")
    assert resp == b"CD0006" + enc(ZPK, bytes.fromhex("123456FFFFFFFFFF")) + b"03"
    vec = b"28B41FDDD29B743E93124BD8E32D921E"
    resp = proxy.call(b"CC" + kb("P0", AES_ZPK) + za + b"12" + vec + b"4801" + b"19" + b"1234567890123456789")
    assert resp == b"CD0004" + iso0(ZPK, "1234", "1234567890123456789") + b"01"


def test_cvv_vectors(proxy: HsmClient) -> None:
    """VECTORS.md section 6."""
    cvk = lmk("402", CVK)
    assert proxy.call(b"CW" + cvk + b"4123456789012345;8701101") == b"CX00561"
    assert proxy.call(b"CW" + cvk + b"4999988887777;9105111") == b"CX00649"
    psec_cvk = kb("C0", bytes.fromhex("99999999999999998888888888888888"), "T")
    assert proxy.call(b"CW" + psec_cvk + b"2222222222222222;3333111") == b"CX00361"
    assert proxy.call(b"CY" + cvk + b"561" + b"4123456789012345;8701101") == b"CZ00"
    assert proxy.call(b"CY" + cvk + b"651" + b"4123456789012345;8701101") == b"CZ01"


def test_pvv_vectors(proxy: HsmClient) -> None:
    """VECTORS.md section 7 through DG, FW and EC."""
    for pvk, pvv in ((PVV_PVK_1, b"4402"), (bytes.fromhex("86190176866EC17FB32685ADB6ADA83B"), b"0481")):
        pvx = lmk("002", pvk, "X")
        assert proxy.call(b"DG" + pvx + pin_lmk("1234", PVV_ACCT) + PVV_ACCT + b"1") == b"DH00" + pvv
        blk = iso0(ZPK, "1234", "5500000253210")
        za = lmk("001", ZPK)
        assert proxy.call(b"FW001" + za + pvx + blk + b"01" + PVV_ACCT + b"1") == b"FX00" + pvv
        assert proxy.call(b"EC" + za + pvx + blk + b"01" + PVV_ACCT + b"1" + pvv) == b"ED00"
    pvk = lmk("002", PVK)
    for pvki, pin, pvv in ((b"1", "4524", b"8523"), (b"2", "1912", b"3244")):
        account = acct("1122334455667788")
        assert proxy.call(b"DG" + pvk + pin_lmk(pin, account) + account + pvki) == b"DH00" + pvv


def test_ibm_3624_vectors(proxy: HsmClient) -> None:
    """VECTORS.md section 8: natural PIN 4524, offset of 1234 = 7710, of 0000 = 6586."""
    pvk = lmk("002", PVK)
    tail = IBM_ACCT + TABLE + IBM_VD
    assert proxy.call(b"DE" + pvk + pin_lmk("1234", IBM_ACCT) + b"04" + tail) == b"DF007710FFFFFFFF"
    assert proxy.call(b"DE" + pvk + pin_lmk("0000", IBM_ACCT) + b"04" + tail) == b"DF006586FFFFFFFF"
    assert proxy.call(b"DE" + pvk + pin_lmk("4524", IBM_ACCT) + b"04" + tail) == b"DF000000FFFFFFFF"
    resp = proxy.call(b"EE" + pvk + b"7710FFFFFFFF" + b"04" + tail)
    assert (
        resp[:4] == b"EF00"
        and decrypt_pin_under_lmk(TEST_LMK, resp[4:].decode(), IBM_ACCT.decode()) == "1234"
    )
    blk = iso0(ZPK, "1234", "00000006778" + "80")
    req = b"EA" + lmk("001", ZPK) + pvk + b"12" + blk + b"01" + b"04" + tail
    assert proxy.call(req + b"7710FFFFFFFF") == b"EB00"
    assert proxy.call(req + b"7720FFFFFFFF") == b"EB01"


# -- random outputs: round trip -----------------------------------------------------------------------


def test_random_outputs_round_trip(proxy: HsmClient) -> None:
    za, zb = lmk("001", ZPK), lmk("001", ZPK2)
    for length in range(4, 13):
        resp = proxy.call(b"JA" + ACCT + f"{length:02d}".encode())
        assert resp[:4] == b"JB00"
        pin = decrypt_pin_under_lmk(TEST_LMK, resp[4:].decode(), ACCT.decode())
        assert len(pin) == length and pin.isdigit()
    seen = set()
    for _ in range(3):
        resp = proxy.call(b"CC" + za + zb + b"12" + iso0(ZPK, "123456") + b"0147" + ACCT)
        assert resp[:6] == b"CD0006" and resp[-2:] == b"47"
        assert psec.pinblock.decode_pinblock_iso_3(dec(ZPK2, resp[6:-2]), PAN) == "123456"
        seen.add(resp)
        resp = proxy.call(b"CC" + za + zb + b"12" + iso0(ZPK, "123456") + b"0105" + ACCT)
        clear = dec(ZPK2, resp[6:-2]).hex().upper()
        assert resp[:6] == b"CD0006" and clear[:8] == "16123456" and resp[-2:] == b"05"
        resp = proxy.call(b"JG" + za + b"47" + ACCT + pin_lmk("4321"))
        assert psec.pinblock.decode_pinblock_iso_3(dec(ZPK, resp[4:]), PAN) == "4321"
        pan = "1234567890123456789"
        resp = proxy.call(
            b"CC" + za + kb("P0", AES_ZPK) + b"12" + iso0(ZPK, "1234", pan) + b"0148" + b"19" + pan.encode()
        )
        assert resp[:6] == b"CD0004" and resp[-2:] == b"48"
        assert (
            psec.pinblock.decipher_pinblock_iso_4(AES_ZPK, bytes.fromhex(resp[6:-2].decode()), pan) == "1234"
        )
        seen.add(resp)
    assert len(seen) == 6  # random fill differs each time


def test_disabled_pin_formats_answer_69(running_proxy: RunningProxy, emulator: RunningEmulator) -> None:
    """A format disabled (CONFIGPB) answers 69 like the emulator with the same setting."""
    router = running_proxy.proxy.router
    assert router is not None
    ctx = CommandContext("default", ("00", "01"), "00", frozenset({"47"}))
    dispatcher = Dispatcher(router, HANDLERS, ctx, 4)

    async def call(payload: bytes) -> bytes:
        result = dispatcher.handle(payload)
        assert result is not None
        return result if isinstance(result, bytes) else await result

    za, zb = lmk("001", ZPK), lmk("001", ZPK2)
    requests = [
        b"0000CC" + za + zb + b"12" + iso0(ZPK, "1234") + b"0147" + ACCT,
        b"0000CC" + za + zb + b"12" + iso0(ZPK, "1234") + b"4701" + ACCT,
        b"0000CC" + za + zb + b"12" + iso0(ZPK, "1234") + b"0101" + ACCT,
        b"0000JG" + za + b"47" + ACCT + pin_lmk("1234"),
    ]
    state = emulator.hsm.state
    state.disabled_pin_formats.add("47")
    try:
        for req in requests:
            got = asyncio.run_coroutine_threadsafe(call(req), running_proxy.loop).result(10)
            want = emulator.hsm.handle(req)
            assert got == want, req[4:6]
        assert (
            asyncio.run_coroutine_threadsafe(call(requests[0]), running_proxy.loop).result(10) == b"0000CD69"
        )
    finally:
        state.disabled_pin_formats.discard("47")
