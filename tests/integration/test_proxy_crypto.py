"""The proxy's data, MAC, EMV, RSA and hash commands (M0 M2 M6 M8 MS KQ EI EW EY GM) on SoftHSM2.

Every deterministic request is answered byte for byte like the emulator (good and error paths);
VECTORS.md values (section 2 DUKPT request data, section 9 MACs, section 11 ARPCs) come out of the
proxy; RSA key generation is checked by round trip through both implementations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from emulator.app import TEST_KEYBLOCK_LMK
from emulator.commands.rsa import decode_public_key, public_key_mac
from emulator.crypto.keyblock import KeyBlockHeader, wrap_key_block
from emulator.crypto.lmk import TEST_LMK, adjust_parity, encrypt_key_under_lmk
from emulator.crypto.rsa import decrypt_private_key_under_lmk
from protocols.hostcmd.fields import parse
from protocols.hostcmd.table import COMMANDS
from tests.integration.conftest import HsmClient, RunningEmulator
from tests.integration.proxy_env import RunningProxy


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _key(key_type: str, clear: bytes) -> bytes:
    scheme = {8: "", 16: "U", 24: "T"}[len(clear)]
    return encrypt_key_under_lmk(TEST_LMK, key_type, scheme, clear).encode()


def _block(usage: str, algorithm: str, mode: str, clear: bytes) -> bytes:
    header = KeyBlockHeader("1", usage, algorithm, mode, lmk_id="01")
    return b"S" + wrap_key_block(TEST_KEYBLOCK_LMK, header, clear).encode()


BDK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
BDK_LMK = _key("009", BDK)
DUKPT_DATA = b"4012345678909D987"
#: VECTORS.md section 2, "request data (TDES-CBC)" column.
REQUEST_DATA = {
    "FFFF9876543210E00001": "FC0D53B7EA1FDA9EE68AAF2E70D9B9506229BE2AA993F04F",
    "FFFF9876543210E00002": "A2B4E70F846E63D68775B7215EB4563DFD3037244C61CC13",
    "FFFF9876543210E00003": "BD751E65F10E75B6C1D5B1D283496A36C2DE21D993C387A7",
    "FFFF9876543210E00004": "1118F50947441BBDA3C8C70220021A12EC31CC473F7215F4",
    "FFFF9876543210E00005": "9FD7BD1EC28845ACA93367A9DA9317BD555C6B33AE22D365",
}
ZEK = adjust_parity(bytes.fromhex("00112233445566778899AABBCCDDEEFF"))
ZEK_LMK = _key("00A", ZEK)
DEK3 = adjust_parity(bytes(range(24)))
AES_KEY = bytes.fromhex("3F419E1CB7079442AA37474C2EFBF8B8")
_TXN_KEY = bytes.fromhex("042666B49184CFA368DE9628D0397BC9")
#: VECTORS.md section 9: DUKPT request / response MAC keys of KSN ...E00001 (parity adjusted).
MAC_REQ_KEY = adjust_parity(_xor(_TXN_KEY, bytes.fromhex("000000000000FF00000000000000FF00")))
MAC_RESP_KEY = adjust_parity(_xor(_TXN_KEY, bytes.fromhex("00000000FF00000000000000FF000000")))
X99_KEY = bytes.fromhex("E9CB01B93B20914F")
X99_DATA = bytes.fromhex("676976656D65534F4D454D4143696E67")
ISSUER_MK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
MK_LMK = _key("109", ISSUER_MK)
EMV_DATA = bytes.fromhex("0123456789ABCDEF0123456789ABCDEF")
ATC, UN = bytes.fromhex("1234"), bytes.fromhex("90123456")
#: VECTORS.md section 11: (PAN, PSN 45) -> (ARQC, ARPC method 1 with ARC 0000).
EMV_CASES = [
    ("9901234567890123", "4B46013359B7A58B", "F8C9CECAABD55AD1"),
    ("12345678901234567", "19C1FBC83EBDC0D5", "78A372523FA35A03"),
]


@pytest.fixture(scope="module")
def pair(running_proxy: RunningProxy, emulator: RunningEmulator) -> Iterator[tuple[HsmClient, HsmClient]]:
    """(proxy client, emulator client)."""
    proxy = HsmClient("127.0.0.1", running_proxy.port)
    ref = HsmClient(emulator.host, emulator.port)
    yield proxy, ref
    proxy.close()
    ref.close()


def _same(pair: tuple[HsmClient, HsmClient], requests: list[bytes]) -> None:
    proxy, ref = pair
    for request in requests:
        assert proxy.call(request) == ref.call(request), request


# -- M0 / M2 ----------------------------------------------------------------------------------


def _data_requests() -> list[bytes]:
    data = bytes(range(32))
    iv8, iv16 = b"0102030405060708", b"000102030405060708090A0B0C0D0E0F"
    dek3 = _key("00B", DEK3)
    single = _key("00A", adjust_parity(bytes.fromhex("0123456789ABCDEF")))
    aes_d0 = _block("D0", "A", "B", AES_KEY)
    tdes_d0 = _block("D0", "T", "B", ZEK)
    bdk_block = _block("B0", "T", "X", BDK)
    even = _key("00A", bytes(16))
    reqs: list[bytes] = []
    for cmd in (b"M0", b"M2"):
        for key in (b"00A" + ZEK_LMK, b"00B" + dek3, b"00A" + single, b"FFF" + tdes_d0, b"00A" + tdes_d0):
            for mode in (b"00", b"01", b"02", b"03"):
                iv = b"" if mode == b"00" else iv8
                reqs += [
                    cmd + mode + b"01" + key + iv + b"0020" + data,
                    cmd + mode + b"11" + key + iv + b"0040" + data.hex().upper().encode(),
                    cmd + mode + b"20" + key + iv + b"0013" + b"Hello, world!",  # partial block
                    cmd + mode + b"00" + key + iv + b"0001" + b"x",
                ]
        for mode in (b"00", b"01", b"02", b"03"):
            iv = b"" if mode == b"00" else iv16
            reqs += [
                cmd + mode + b"01FFF" + aes_d0 + iv + b"0020" + data,
                cmd + mode + b"01FFF" + aes_d0 + iv + b"0011" + data[:17],
            ]
        for ksn in REQUEST_DATA:
            for mode in (b"00", b"01", b"02", b"03"):
                iv = b"" if mode == b"00" else iv8
                reqs.append(
                    cmd + mode + b"01009" + BDK_LMK + b"A05" + ksn.encode() + iv + b"0018" + data[:24]
                )
        reqs += [
            cmd + b"0101009" + bdk_block + b"A05FFFF9876543210E00003" + iv8 + b"0008" + data[:8],
            cmd + b"0101609" + _key("609", BDK) + b"A05FFFF9876543210E00003" + iv8 + b"0008" + data[:8],
            cmd + b"0101809" + _key("809", BDK) + b"A05FFFF9876543210E00003" + iv8 + b"0008" + data[:8],
            cmd + b"0101009" + _key("009", BDK[:8]) + b"A05FFFF9876543210E00003" + iv8 + b"0008" + data[:8],
            cmd
            + b"0101009"
            + _block("D0", "T", "B", BDK)
            + b"A05FFFF9876543210E00003"
            + iv8
            + b"0008"
            + data[:8],
            cmd + b"0001" + b"00A" + ZEK_LMK + b"0007" + b"1234567",  # 80
            cmd + b"0001" + b"00A" + ZEK_LMK + b"0000",  # 80 empty
            cmd + b"0901" + b"00A" + ZEK_LMK + b"0008" + b"12345678",  # 15 mode
            cmd + b"0031" + b"00A" + ZEK_LMK + b"0008" + b"12345678",  # 15 input format
            cmd + b"0012" + b"00A" + ZEK_LMK + b"0008" + b"12345678",  # 15 output format
            cmd + b"0011" + b"00A" + ZEK_LMK + b"0008" + b"1234567X",  # 15 hex
            cmd + b"0001001" + _key("001", ZEK) + b"0008" + b"12345678",  # 04
            cmd + b"0001FFF" + ZEK_LMK + b"0008" + b"12345678",  # 04: FFF needs a key block
            cmd + b"0001" + b"00A" + even + b"0008" + b"12345678",  # 10 parity
            cmd + b"0001FFF" + _block("M0", "T", "C", ZEK) + b"0008" + b"12345678",  # 29 usage
            cmd + b"0001" + b"00A" + ZEK_LMK + b"0008" + b"12345678" + b"%01",  # 13 not a variant LMK
            cmd + b"0001" + b"00A" + ZEK_LMK + b"0008" + b"12345678" + b"%05",  # 13 unknown
            cmd + b"0001FFF" + tdes_d0 + b"0008" + b"12345678" + b"%00",  # 13 not a key-block LMK
            cmd + b"0001FFF" + tdes_d0[:-1] + b"0" + b"0008" + b"12345678",  # A4
            cmd + b"0001FFF" + tdes_d0[:-1] + b"0" + b"0008" + b"12345678" + b"\x19trailer",
        ]
    return reqs


def test_m0_m2_match_emulator(pair: tuple[HsmClient, HsmClient]) -> None:
    _same(pair, _data_requests())


@pytest.mark.parametrize(("ksn", "expected"), sorted(REQUEST_DATA.items()))
def test_m0_dukpt_request_data_vectors(running_proxy: RunningProxy, ksn: str, expected: str) -> None:
    client = HsmClient("127.0.0.1", running_proxy.port)
    try:
        msg = DUKPT_DATA.ljust(24, b"\0")
        resp = client.call(b"M00101009" + BDK_LMK + b"A05" + ksn.encode() + b"0" * 16 + b"0018" + msg)
        assert resp == b"M100" + expected[-16:].encode() + b"0030" + expected.encode()
        resp = client.call(
            b"M20110009" + BDK_LMK + b"A05" + ksn.encode() + b"0" * 16 + b"0030" + expected.encode()
        )
        assert resp == b"M300" + expected[-16:].encode() + b"0018" + msg
    finally:
        client.close()


# -- M6 / M8 / MS -----------------------------------------------------------------------------


def _mac_requests() -> list[bytes]:
    reqs: list[bytes] = []
    data = b"The quick brown fox jumps over the lazy dog"
    n = f"{len(data):04X}".encode()
    keys = [
        b"003" + _key("003", MAC_REQ_KEY),
        b"008" + _key("008", MAC_RESP_KEY),
        b"003" + _key("003", X99_KEY),
        b"003" + _key("003", DEK3),
        b"FFF" + _block("M1", "T", "C", MAC_REQ_KEY),
        b"FFF" + _block("M6", "T", "C", DEK3),
        b"FFF" + _block("M0", "D", "C", X99_KEY),
        b"FFF" + _block("M6", "A", "C", AES_KEY),
        b"003" + _block("M6", "T", "C", MAC_REQ_KEY),
    ]
    for cmd in (b"M6", b"M8"):
        for key in keys:
            for algorithm in (b"1", b"3", b"6", b"9"):
                for pad in (b"0", b"1", b"2", b"3"):
                    for size in (b"0", b"1"):
                        req = cmd + b"00" + size + algorithm + pad + key + n + data
                        if cmd == b"M8":
                            req += b"0" * (8 if size == b"0" else 16)
                        reqs.append(req)
                # chained: first, middle, last (IV given as 16 hex for TDES, 32 for AES)
                iv = b"0" * (32 if key.startswith(b"FFFS") and b"M6A" in key[:16] else 16)
                reqs += [
                    cmd + b"111" + algorithm + b"1" + key + b"0010" + data[:16],
                    cmd + b"211" + algorithm + b"1" + key + iv + b"0008" + data[16:24],
                    cmd
                    + b"311"
                    + algorithm
                    + b"1"
                    + key
                    + iv
                    + b"0005"
                    + data[24:29]
                    + (b"0" * 16 if cmd == b"M8" else b""),
                    cmd + b"111" + algorithm + b"1" + key + b"0005" + data[:5],  # 80
                ]
        reqs += [
            cmd + b"02231003" + _key("003", MAC_REQ_KEY) + b"0011" + DUKPT_DATA,  # 15 size
            cmd + b"12133003" + _key("003", MAC_REQ_KEY) + b"0008" + DUKPT_DATA[:8],  # 15 method 3 chained
            cmd + b"02131001" + _key("001", MAC_REQ_KEY) + b"0011" + DUKPT_DATA,  # 04
            cmd + b"04131003" + _key("003", MAC_REQ_KEY) + b"0011" + DUKPT_DATA,  # 15 input format
            cmd + b"01131003" + _key("003", MAC_REQ_KEY) + b"0011" + DUKPT_DATA,  # 15 hex
            cmd + b"02131003" + _key("003", bytes(16)) + b"0011" + DUKPT_DATA,  # 10
            cmd + b"02131FFF" + _block("D0", "T", "B", MAC_REQ_KEY) + b"0011" + DUKPT_DATA,  # 29
            cmd + b"02131003" + _key("003", MAC_REQ_KEY) + b"0011" + DUKPT_DATA + b"%01",  # 13
        ]
    tak = b"003" + _key("003", MAC_REQ_KEY)
    reqs += [
        b"M80213" + b"1" + tak + b"0011" + DUKPT_DATA + b"9CCC78173FC4FB64",
        b"M80213" + b"1" + tak + b"0011" + DUKPT_DATA + b"9CCC78173FC4FB65",
        b"M80203" + b"1" + tak + b"0011" + DUKPT_DATA + b"9CCC7817",
        b"M80203" + b"1" + tak + b"0011" + DUKPT_DATA + b"9ccc7817",
    ]
    # MS
    for key_type, key_flag, clear in (
        (b"0", b"1", MAC_REQ_KEY),
        (b"1", b"1", MAC_RESP_KEY),
        (b"0", b"0", X99_KEY),
    ):
        key = _key("003" if key_type == b"0" else "008", clear)
        for msg_type, msg in ((b"0", DUKPT_DATA), (b"1", DUKPT_DATA.hex().encode())):
            n = b"%04X" % len(DUKPT_DATA)
            reqs += [
                b"MS0" + key_type + key_flag + msg_type + key + n + msg,
                b"MS1" + key_type + key_flag + msg_type + key + b"0008" + msg[: 8 * (1 + int(msg_type))],
                b"MS2"
                + key_type
                + key_flag
                + msg_type
                + key
                + b"1122334455667788"
                + b"0008"
                + msg[: 8 * (1 + int(msg_type))],
                b"MS3" + key_type + key_flag + msg_type + key + b"1122334455667788" + n + msg,
            ]
    reqs += [
        b"MS0000" + _key("003", MAC_REQ_KEY) + b"0011" + DUKPT_DATA,  # 27
        b"MS0030" + _key("003", MAC_REQ_KEY) + b"0011" + DUKPT_DATA,  # 05
        b"MS0210" + _key("003", MAC_REQ_KEY) + b"0011" + DUKPT_DATA,  # 04
        b"MS0012" + _key("003", MAC_REQ_KEY) + b"0011" + DUKPT_DATA,  # 15
        b"MS5010" + _key("003", MAC_REQ_KEY) + b"0011" + DUKPT_DATA,  # 15
        b"MS1010" + _key("003", MAC_REQ_KEY) + b"0011" + DUKPT_DATA,  # 80
        b"MS0010" + _block("M0", "T", "C", MAC_REQ_KEY) + b"0011" + DUKPT_DATA,
        b"MS0110" + _block("M0", "A", "C", AES_KEY) + b"0011" + DUKPT_DATA,  # 27
        b"MS0010" + _key("003", MAC_REQ_KEY) + b"0011" + DUKPT_DATA + b"%01",  # 13
    ]
    return reqs


def test_m6_m8_ms_match_emulator(pair: tuple[HsmClient, HsmClient]) -> None:
    requests = _mac_requests()
    _same(pair, requests)
    # M8 with the MAC M6 gave (mode 0) verifies on both
    verify = []
    for request in requests:
        if request[:3] == b"M60":
            resp = pair[1].call(request)
            if resp[:4] == b"M700":
                verify.append(b"M8" + request[2:] + resp[4:])
    assert len(verify) > 50
    for request in verify:
        assert pair[0].call(request) == pair[1].call(request) == b"M900", request


def test_mac_vectors_through_the_proxy(running_proxy: RunningProxy) -> None:
    client = HsmClient("127.0.0.1", running_proxy.port)
    try:
        for key, mac in ((MAC_REQ_KEY, b"9CCC78173FC4FB64"), (MAC_RESP_KEY, b"20364223C1FF00FA")):
            tak = _key("003", key)
            assert client.call(b"M602131003" + tak + b"0011" + DUKPT_DATA) == b"M700" + mac
            assert client.call(b"M802131003" + tak + b"0011" + DUKPT_DATA + mac) == b"M900"
            assert client.call(b"MS0010" + tak + b"0011" + DUKPT_DATA) == b"MT00" + mac
        first = client.call(b"MS1010" + _key("003", MAC_REQ_KEY) + b"0008" + DUKPT_DATA[:8])
        middle = client.call(b"MS2010" + _key("003", MAC_REQ_KEY) + first[4:] + b"0008" + DUKPT_DATA[8:16])
        last = client.call(b"MS3010" + _key("003", MAC_REQ_KEY) + middle[4:] + b"0001" + DUKPT_DATA[16:])
        assert last == b"MT009CCC78173FC4FB64"
        x99 = _key("003", X99_KEY)
        assert client.call(b"M602010003" + x99 + b"0010" + X99_DATA) == b"M700170C2BDB"
        block = _block("M6", "A", "C", bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C"))
        assert (
            client.call(b"M60016" + b"0FFF" + block + b"0000") == b"M700BB1D6929E95937287FA37D129B756746"[:20]
        )
        msg = bytes.fromhex("6BC1BEE22E409F96E93D7E117393172A")
        assert client.call(b"M60016" + b"0FFF" + block + b"0010" + msg) == b"M700070A16B46B4D4144"
    finally:
        client.close()


# -- KQ ---------------------------------------------------------------------------------------


def _pan_psn(pan: str) -> bytes:
    return bytes.fromhex((pan + "45")[-16:])


def _kq(mode: bytes, scheme: bytes, pan: str, arqc: bytes, arc: bytes = b"", mk: bytes = MK_LMK) -> bytes:
    head = b"KQ" + mode + scheme + mk + _pan_psn(pan) + ATC + UN
    if mode == b"2":
        return head + arqc + arc
    return head + b"%02X" % len(EMV_DATA) + EMV_DATA + b";" + arqc + arc


def _arqc(emulator_client: HsmClient, scheme: bytes, pan: str) -> bytes:
    """The good ARQC, found with the emulator (its KQ is checked against pyemv in its own tests)."""
    from pyemv import ac, kd

    from emulator.crypto.cipher import legacy_tdes

    with legacy_tdes():
        icc_mk = kd.derive_icc_mk_a(ISSUER_MK, pan, "45")
        if scheme == b"0":
            return bytes(ac.generate_ac(icc_mk, EMV_DATA, ac.PaddingType.VISA))
        sk = kd.derive_common_sk(icc_mk, ATC + b"\x00\x00" + UN)
        return bytes(ac.generate_ac(sk, EMV_DATA, ac.PaddingType.EMV))


def test_kq_matches_emulator(pair: tuple[HsmClient, HsmClient]) -> None:
    reqs: list[bytes] = []
    mk_block = _block("E0", "T", "X", ISSUER_MK)
    for pan, arqc_hex, _ in EMV_CASES:
        for scheme in (b"0", b"1"):
            good = _arqc(pair[1], scheme, pan)
            bad = bytes([good[0] ^ 1]) + good[1:]
            for mk in (MK_LMK, mk_block):
                reqs += [
                    _kq(b"0", scheme, pan, good, mk=mk),
                    _kq(b"1", scheme, pan, good, b"\x00\x11", mk=mk),
                    _kq(b"0", scheme, pan, bad, mk=mk),
                    _kq(b"1", scheme, pan, bad, b"\x00\x00", mk=mk),
                    _kq(b"2", scheme, pan, bytes.fromhex(arqc_hex), b"\x30\x30", mk=mk),
                ]
    reqs += [
        _kq(b"3", b"1", "9901234567890123", bytes(8)),
        _kq(b"0", b"2", "9901234567890123", bytes(8)),
        b"KQ01" + MK_LMK + b"\xaa" * 8 + ATC + UN + b"10" + EMV_DATA + b";" + bytes(8),
        _kq(b"0", b"1", "9901234567890123", bytes(8), mk=_key("109", bytes(16))),  # 10
        _kq(b"0", b"1", "9901234567890123", bytes(8), mk=_key("109", ISSUER_MK[:8])),  # 27
        _kq(b"2", b"1", "9901234567890123", bytes(8), b"00", mk=_block("B0", "T", "X", ISSUER_MK)),  # 29
        _kq(b"2", b"1", "9901234567890123", bytes(8), b"00", mk=_block("E0", "A", "X", AES_KEY)),  # 27
        _kq(b"2", b"1", "9901234567890123", bytes(8), b"00") + b"%01",  # 13
    ]
    _same(pair, reqs)


@pytest.mark.parametrize(("pan", "arqc", "arpc"), EMV_CASES)
def test_kq_arpc_vectors_through_the_proxy(
    running_proxy: RunningProxy, pan: str, arqc: str, arpc: str
) -> None:
    client = HsmClient("127.0.0.1", running_proxy.port)
    try:
        assert client.call(_kq(b"2", b"1", pan, bytes.fromhex(arqc), b"\x00\x00")) == b"KR00" + bytes.fromhex(
            arpc
        )
    finally:
        client.close()


# -- EI / EW / EY / GM ------------------------------------------------------------------------


def _ei(client: HsmClient, request: bytes) -> tuple[bytes, bytes, bytes]:
    resp = client.call(request)
    assert resp[:4] == b"EJ00", resp[:4]
    values = parse(COMMANDS["EI"].response, resp[4:]).values
    mac, der, blob = values["mac"], values["public_key"], values["private_key"]
    assert isinstance(mac, bytes) and isinstance(der, bytes) and isinstance(blob, bytes)
    assert int(values["private_key_length"]) == len(blob)
    return mac, der, blob


def _ew(blob: bytes, message: bytes, hash_id: bytes = b"06") -> bytes:
    return b"EW" + hash_id + b"0101%04d" % len(message) + message + b";99%04d" % len(blob) + blob


def _ey(sig: bytes, message: bytes, mac: bytes, der: bytes, hash_id: bytes = b"06") -> bytes:
    return (
        b"EY" + hash_id + b"0101%04d" % len(sig) + sig + b";%04d" % len(message) + message + b";" + mac + der
    )


def _der_length(n: int) -> bytes:
    return (
        bytes([n])
        if n < 0x80
        else bytes([0x81 if n < 0x100 else 0x82]) + n.to_bytes(1 if n < 0x100 else 2, "big")
    )


_HASHES: dict[bytes, hashes.HashAlgorithm] = {
    b"01": hashes.SHA1(),
    b"05": hashes.SHA224(),
    b"06": hashes.SHA256(),
    b"07": hashes.SHA384(),
    b"08": hashes.SHA512(),
}


@pytest.mark.parametrize(
    "request_", [b"EI21024" + b"01", b"EI21024" + b"02", b"EI02048" + b"01", b"EI11032020002" + b"\x03"]
)
def test_ei_keys_are_interchangeable(pair: tuple[HsmClient, HsmClient], request_: bytes) -> None:
    proxy, ref = pair
    mac, der, blob = _ei(proxy, request_)
    # the emulator's formats: MAC under LMK pair 36-37, private key under pair 34-35
    assert mac == public_key_mac(TEST_LMK, der)
    private = decrypt_private_key_under_lmk(TEST_LMK, blob)
    bits = int(request_[3:7])
    assert private.key_size == bits
    pub = decode_public_key(der)
    assert pub.public_numbers() == private.public_key().public_numbers()
    n_bytes = pub.public_numbers().n.to_bytes(bits // 8, "big")
    if request_[7:9] == b"01":  # unsigned INTEGER: no sign byte although the top bit is set
        assert b"\x02" + _der_length(len(n_bytes)) + n_bytes in der
    else:
        assert b"\x02" + _der_length(len(n_bytes) + 1) + b"\x00" + n_bytes in der
    if len(request_) > 9:
        assert pub.public_numbers().e == 3
    message = b"sign me" * 10
    for hash_id, algorithm in _HASHES.items():
        sig_proxy = proxy.call(_ew(blob, message, hash_id))
        sig_ref = ref.call(_ew(blob, message, hash_id))
        assert sig_proxy == sig_ref  # PKCS#1 v1.5 is deterministic
        sig = sig_proxy[8:]
        assert sig_proxy[:8] == b"EX00%04d" % (bits // 8)
        pub.verify(sig, message, padding.PKCS1v15(), algorithm)
        for client in (proxy, ref):
            assert client.call(_ey(sig, message, mac, der, hash_id)) == b"EZ00"
            assert client.call(_ey(sig, message + b"!", mac, der, hash_id)) == b"EZ02"
    # a key pair from the emulator signs on the proxy, and vice versa verifies
    e_mac, e_der, e_blob = _ei(ref, request_)
    sig = proxy.call(_ew(e_blob, message))
    assert sig == ref.call(_ew(e_blob, message))
    assert proxy.call(_ey(sig[8:], message, e_mac, e_der)) == b"EZ00"


def test_ew_private_key_objects_are_cached(running_proxy: RunningProxy, emulator: RunningEmulator) -> None:
    """Signatures with one private key reuse its token object (worker key-cache hits), and stay right."""
    import asyncio

    ref = HsmClient("127.0.0.1", emulator.port)
    proxy = HsmClient("127.0.0.1", running_proxy.port)
    try:
        _mac, der, blob = _ei(ref, b"EI22048" + b"01")
        pub = decode_public_key(der)
        nodes = running_proxy.proxy.nodes

        async def ask() -> list[dict[str, int]]:
            return list(await asyncio.gather(*(n.request_stats() for n in nodes)))

        def stats() -> tuple[int, int]:
            got = asyncio.run_coroutine_threadsafe(ask(), running_proxy.loop).result(10)
            return sum(g["cache_hits"] for g in got), sum(g["cache_misses"] for g in got)

        hits0, misses0 = stats()
        for i in range(6):
            resp = proxy.call(_ew(blob, b"message %d" % i))
            assert resp[:8] == b"EX000256"
            pub.verify(resp[8:], b"message %d" % i, padding.PKCS1v15(), hashes.SHA256())
            assert resp == ref.call(_ew(blob, b"message %d" % i))
        hits1, misses1 = stats()
        # key affinity sends one key to one node: one import, then hits (at most one import per node)
        assert misses1 - misses0 <= len(nodes) and hits1 - hits0 >= 6 - len(nodes)
    finally:
        proxy.close()
        ref.close()


def test_rsa_paths_match_emulator(pair: tuple[HsmClient, HsmClient]) -> None:
    mac, der, blob = _ei(pair[1], b"EI21024" + b"02")
    sig = pair[1].call(_ew(blob, b"hello"))[8:]
    reqs = [
        b"EI51024" + b"01",  # 15 indicator
        b"EI21024" + b"03",  # 15 encoding
        b"EI20512" + b"01",  # 15 modulus
        b"EI21028" + b"01",  # 15 not a multiple of 8
        b"EI21024010017" + b"\x01\x00\x00",  # 15 exponent 65536
        b"EI21024" + b"01" + b"%01",  # 13
        b"EI21024" + b"01" + b"%07",  # 13
        _ew(blob, b"hello", b"02"),  # 15 hash id
        b"EW06" + b"0201" + b"0005hello;99%04d" % len(blob) + blob,  # 15 signature id
        b"EW06" + b"0102" + b"0005hello;99%04d" % len(blob) + blob,  # 15 pad mode
        b"EW06" + b"0101" + b"0005hello;05%04d" % len(blob) + blob,  # 12 user storage
        b"EW06" + b"0101" + b"0005hello;50%04d" % len(blob) + blob,  # 15
        _ew(blob[:-3], b"hello"),  # 78
        _ew(b"", b"hello"),  # 78
        _ew(blob[:-8], b"hello"),  # 15 (padding gone)
        _ew(bytes(len(blob)), b"hello"),  # 15
        _ew(blob, b"hello") + b"%01",  # 13
        _ey(sig, b"hello", mac, der),  # 00
        _ey(sig, b"hellO", mac, der),  # 02
        _ey(sig[:-1], b"hello", mac, der),  # 02 short signature
        _ey(sig, b"hello", bytes(4), der),  # 01 MAC
        _ey(sig, b"hello", mac, der, b"01"),  # 02 other hash
        _ey(sig, b"hello", mac, der, b"04"),  # 15
        _ey(sig, b"hello", mac, der) + b"%01",  # 13
        b"EY06"
        + b"0101"
        + b"0001x;0001y;"
        + public_key_mac(TEST_LMK, b"\x30\x03\x02\x01\x05")
        + b"\x30\x03\x02\x01\x05",
    ]
    _same(pair, reqs)


def test_gm_matches_emulator_and_hashlib(pair: tuple[HsmClient, HsmClient]) -> None:
    names = {b"01": "sha1", b"05": "sha224", b"06": "sha256", b"07": "sha384", b"08": "sha512"}
    for data in (b"", b"abc", bytes(range(256)) * 10):
        for hash_id, name in names.items():
            req = b"GM" + hash_id + b"%05d" % len(data) + data
            resp = pair[0].call(req)
            assert resp == b"GN00" + hashlib.new(name, data).digest()
            assert resp == pair[1].call(req)
    _same(pair, [b"GM0200003abc", b"GM0900000", b"GM06000"])
