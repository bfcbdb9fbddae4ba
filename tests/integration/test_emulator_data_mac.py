"""Live emulator: M0/M2 data encryption and M6/M8/MS MACs against VECTORS.md and independent code."""

from __future__ import annotations

import psec
import pytest
from cryptography.hazmat.decrepit.ciphers import modes as decrepit_modes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from emulator.app import TEST_KEYBLOCK_LMK
from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.keyblock import KeyBlockHeader, wrap_key_block
from emulator.crypto.lmk import TEST_LMK, adjust_parity, encrypt_key_under_lmk
from tests.integration.conftest import HsmClient

BDK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
BDK_LMK = encrypt_key_under_lmk(TEST_LMK, "009", "U", BDK).encode()
DUKPT_DATA = b"4012345678909D987"
#: VECTORS.md section 2, "request data (TDES-CBC)" column.
REQUEST_DATA = {
    "FFFF9876543210E00001": "FC0D53B7EA1FDA9EE68AAF2E70D9B9506229BE2AA993F04F",
    "FFFF9876543210E00002": "A2B4E70F846E63D68775B7215EB4563DFD3037244C61CC13",
    "FFFF9876543210E00005": "9FD7BD1EC28845ACA93367A9DA9317BD555C6B33AE22D365",
}
ZEK = adjust_parity(bytes.fromhex("00112233445566778899AABBCCDDEEFF"))
ZEK_LMK = encrypt_key_under_lmk(TEST_LMK, "00A", "U", ZEK).encode()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _tak(clear: bytes, key_type: str = "003") -> bytes:
    scheme = {8: "", 16: "U", 24: "T"}[len(clear)]
    return encrypt_key_under_lmk(TEST_LMK, key_type, scheme, clear).encode()


# VECTORS.md section 9: DUKPT MAC keys of KSN ...E00001 (request / response variants). DES ignores
# the parity bits, so the parity-adjusted key (what an HSM holds) gives the same MAC.
_TXN_KEY = bytes.fromhex("042666B49184CFA368DE9628D0397BC9")
MAC_REQ_KEY = adjust_parity(_xor(_TXN_KEY, bytes.fromhex("000000000000FF00000000000000FF00")))
MAC_RESP_KEY = adjust_parity(_xor(_TXN_KEY, bytes.fromhex("00000000FF00000000000000FF000000")))


@pytest.mark.parametrize(("ksn", "expected"), sorted(REQUEST_DATA.items()))
def test_m0_dukpt_request_data_vectors(client: HsmClient, ksn: str, expected: str) -> None:
    msg = DUKPT_DATA.ljust(24, b"\0")
    resp = client.call(b"M00101009" + BDK_LMK + b"A05" + ksn.encode() + b"0" * 16 + b"0018" + msg)
    assert resp == b"M100" + expected[-16:].encode() + b"0030" + expected.encode()
    # M2 with the same BDK/KSN decrypts it back (hex in, binary out).
    resp = client.call(
        b"M20110009" + BDK_LMK + b"A05" + ksn.encode() + b"0" * 16 + b"0030" + expected.encode()
    )
    assert resp == b"M300" + expected[-16:].encode() + b"0018" + msg


def _tdes_encrypt(mode: modes.ModeWithInitializationVector | modes.ECB, data: bytes) -> bytes:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

    cipher = Cipher(TripleDES(ZEK + ZEK[:8]), mode)
    enc = cipher.encryptor()
    return enc.update(data) + enc.finalize()


@pytest.mark.parametrize(
    ("mode", "cipher_mode"),
    [
        (b"00", None),
        (b"01", modes.CBC(bytes.fromhex("0102030405060708"))),
        (b"02", decrepit_modes.CFB8(bytes.fromhex("0102030405060708"))),
        (b"03", decrepit_modes.CFB(bytes.fromhex("0102030405060708"))),
    ],
)
def test_m0_m2_zek_modes_match_cryptography(
    client: HsmClient, mode: bytes, cipher_mode: modes.ModeWithInitializationVector | None
) -> None:
    data = bytes(range(32))
    iv = b"" if cipher_mode is None else b"0102030405060708"
    expected = _tdes_encrypt(cipher_mode or modes.ECB(), data)
    resp = client.call(b"M0" + mode + b"21" + b"00A" + ZEK_LMK + iv + b"0020" + data)
    next_iv = b"" if cipher_mode is None else expected[-8:].hex().upper().encode()
    assert resp == b"M100" + next_iv + b"0040" + expected.hex().upper().encode()
    resp = client.call(
        b"M2" + mode + b"10" + b"00A" + ZEK_LMK + iv + b"0040" + expected.hex().upper().encode()
    )
    assert resp == b"M300" + next_iv + b"0020" + data


def test_m0_cbc_chains_across_calls(client: HsmClient) -> None:
    data = bytes(range(48))
    whole = client.call(b"M00101" + b"00A" + ZEK_LMK + b"0" * 16 + b"0030" + data)
    first = client.call(b"M00101" + b"00A" + ZEK_LMK + b"0" * 16 + b"0010" + data[:16])
    second = client.call(b"M00101" + b"00A" + ZEK_LMK + first[4:20] + b"0020" + data[16:])
    assert whole[24:] == first[24:] + second[24:] and whole[4:20] == second[4:20]


def test_m0_aes_key_block_cbc(client: HsmClient) -> None:
    key = bytes(range(16))
    header = KeyBlockHeader("1", "D0", "A", "B", lmk_id="01")
    block = b"S" + wrap_key_block(TEST_KEYBLOCK_LMK, header, key).encode()
    iv = bytes(range(16, 32))
    data = b"sixteen byte msg" * 2
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    expected = enc.update(data) + enc.finalize()
    resp = client.call(b"M00101FFF" + block + iv.hex().upper().encode() + b"0020" + data)
    assert resp == b"M100" + expected[-16:].hex().upper().encode() + b"0040" + expected.hex().upper().encode()


def test_m0_m2_error_paths(client: HsmClient) -> None:
    base = b"00A" + ZEK_LMK
    assert client.call(b"M00001" + base + b"0007" + b"1234567") == b"M180"  # ECB, not whole blocks
    assert client.call(b"M00001" + base + b"0000") == b"M180"  # empty
    assert client.call(b"M00901" + base + b"0008" + b"12345678") == b"M115"  # bad mode
    assert client.call(b"M00031" + base + b"0008" + b"12345678") == b"M115"  # bad input format
    assert client.call(b"M00012" + base + b"0008" + b"12345678") == b"M115"  # bad output format
    assert client.call(b"M00011" + base + b"0008" + b"1234567X") == b"M115"  # hex input not hex
    assert client.call(b"M00001001" + _tak(ZEK, "001") + b"0008" + b"12345678") == b"M104"  # ZPK
    even = encrypt_key_under_lmk(TEST_LMK, "00A", "U", bytes(16)).encode()
    assert client.call(b"M00001" + b"00A" + even + b"0008" + b"12345678") == b"M110"  # parity


def test_m6_x919_vectors_and_m8(client: HsmClient) -> None:
    for key, mac in ((MAC_REQ_KEY, b"9CCC78173FC4FB64"), (MAC_RESP_KEY, b"20364223C1FF00FA")):
        for key_type in ("003", "008"):
            tak = _tak(key, key_type)
            resp = client.call(b"M60213" + b"1" + key_type.encode() + tak + b"0011" + DUKPT_DATA)
            assert resp == b"M700" + mac
            # the same message as hex, 8-hex MAC
            resp = client.call(
                b"M60103" + b"1" + key_type.encode() + tak + b"0022" + DUKPT_DATA.hex().encode()
            )
            assert resp == b"M700" + mac[:8]
            assert (
                client.call(b"M80213" + b"1" + key_type.encode() + tak + b"0011" + DUKPT_DATA + mac)
                == b"M900"
            )
    tak = _tak(MAC_REQ_KEY)
    assert client.call(b"M802131003" + tak + b"0011" + DUKPT_DATA + b"9CCC78173FC4FB65") == b"M901"
    assert client.call(b"M802031003" + tak + b"0011" + DUKPT_DATA + b"9CCC7817") == b"M900"


def test_m6_x99_single_des_vector(client: HsmClient) -> None:
    tak = _tak(bytes.fromhex("E9CB01B93B20914F"))
    data = bytes.fromhex("676976656D65534F4D454D4143696E67")
    assert client.call(b"M602010003" + tak + b"0010" + data)[:12] == b"M700170C2BDB"
    assert client.call(b"M802010003" + tak + b"0010" + data + b"170C2BDB") == b"M900"


@pytest.mark.parametrize("algorithm", [b"1", b"3"])
@pytest.mark.parametrize("padding", [1, 2, 3])
def test_m6_matches_psec(client: HsmClient, algorithm: bytes, padding: int) -> None:
    key = adjust_parity(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"))
    data = b"The quick brown fox jumps over the lazy dog"
    with legacy_tdes():
        if algorithm == b"1":
            expected = bytes(psec.mac.generate_cbc_mac(key + key[:8], data, padding, 8))
        else:
            expected = bytes(psec.mac.generate_retail_mac(key[:8] * 3, key[8:] * 3, data, padding, 8))
    req = (
        b"M6021" + algorithm + str(padding).encode() + b"003" + _tak(key) + f"{len(data):04X}".encode() + data
    )
    assert client.call(req) == b"M700" + expected.hex().upper().encode()


def test_m6_chained_modes_give_the_single_block_mac(client: HsmClient) -> None:
    tak = _tak(MAC_REQ_KEY)
    first = client.call(b"M612131003" + tak + b"0008" + DUKPT_DATA[:8])
    assert first[:4] == b"M700" and len(first) == 20
    middle = client.call(b"M622131003" + tak + first[4:] + b"0008" + DUKPT_DATA[8:16])
    last = client.call(b"M632131003" + tak + middle[4:] + b"0001" + DUKPT_DATA[16:])
    assert last == b"M7009CCC78173FC4FB64"
    assert (
        client.call(b"M832131003" + tak + middle[4:] + b"0001" + DUKPT_DATA[16:] + b"9CCC78173FC4FB64")
        == b"M900"
    )
    assert client.call(b"M812131003" + tak + b"0008" + DUKPT_DATA[:8]) == b"M900" + first[4:]


def test_m6_cmac(client: HsmClient) -> None:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.cmac import CMAC

    key = adjust_parity(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"))
    mac = CMAC(TripleDES(key + key[:8]))
    mac.update(b"abc")
    assert (
        client.call(b"M602160003" + _tak(key) + b"0003abc") == b"M700" + mac.finalize().hex().upper().encode()
    )
    # NIST SP 800-38B AES-CMAC example through an AES key block (VECTORS.md section 9)
    header = KeyBlockHeader("1", "M6", "A", "C", lmk_id="01")
    nist = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
    block = b"S" + wrap_key_block(TEST_KEYBLOCK_LMK, header, nist).encode()
    msg = bytes.fromhex("6BC1BEE22E409F96E93D7E117393172A")
    assert client.call(b"M60016" + b"0FFF" + block + b"0010" + msg) == b"M700070A16B46B4D4144"


def test_mac_error_paths(client: HsmClient) -> None:
    tak = _tak(MAC_REQ_KEY)
    assert client.call(b"M602130003" + tak + b"0011" + DUKPT_DATA) == b"M780"  # no padding, 17 bytes
    assert client.call(b"M612131003" + tak + b"0005" + DUKPT_DATA[:5]) == b"M780"  # first block partial
    assert client.call(b"M602231003" + tak + b"0011" + DUKPT_DATA) == b"M715"  # MAC size 2
    assert client.call(b"M602191003" + tak + b"0011" + DUKPT_DATA) == b"M715"  # algorithm 9
    assert client.call(b"M612133003" + tak + b"0008" + DUKPT_DATA[:8]) == b"M715"  # method 3 chained
    assert client.call(b"M602131001" + _tak(MAC_REQ_KEY, "001") + b"0011" + DUKPT_DATA) == b"M704"
    single = _tak(bytes.fromhex("E9CB01B93B20914F"))
    assert client.call(b"M602131003" + single + b"0011" + DUKPT_DATA) == b"M727"  # alg 3, single key


def test_ms_split_message_gives_the_whole_message_mac(client: HsmClient) -> None:
    tak = _tak(MAC_REQ_KEY)
    assert client.call(b"MS0010" + tak + b"0011" + DUKPT_DATA) == b"MT009CCC78173FC4FB64"
    first = client.call(b"MS1010" + tak + b"0008" + DUKPT_DATA[:8])
    middle = client.call(b"MS2010" + tak + first[4:] + b"0008" + DUKPT_DATA[8:16])
    last = client.call(b"MS3010" + tak + middle[4:] + b"0001" + DUKPT_DATA[16:])
    assert last == b"MT009CCC78173FC4FB64"
    # hex message type, ZAK
    zak = _tak(MAC_RESP_KEY, "008")
    assert client.call(b"MS0111" + zak + b"0011" + DUKPT_DATA.hex().encode()) == b"MT0020364223C1FF00FA"
    # single-length key: X9.9 (VECTORS.md section 9)
    single = _tak(bytes.fromhex("E9CB01B93B20914F"))
    data = bytes.fromhex("676976656D65534F4D454D4143696E67")
    assert client.call(b"MS0000" + single + b"0010" + data)[:12] == b"MT00170C2BDB"


def test_ms_error_paths(client: HsmClient) -> None:
    tak = _tak(MAC_REQ_KEY)
    assert client.call(b"MS0000" + tak + b"0011" + DUKPT_DATA) == b"MT27"  # flag single, key double
    assert client.call(b"MS0030" + tak + b"0011" + DUKPT_DATA) == b"MT05"
    assert client.call(b"MS0210" + tak + b"0011" + DUKPT_DATA) == b"MT04"
    assert client.call(b"MS0012" + tak + b"0011" + DUKPT_DATA) == b"MT15"
    assert client.call(b"MS1010" + tak + b"0011" + DUKPT_DATA) == b"MT80"  # first block not whole
