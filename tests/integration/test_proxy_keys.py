"""The proxy's key management commands (A0 A6 A8 BU FA) answer like the emulator, byte for byte.

Deterministic commands are compared with the emulator request by request (good and error paths);
A0 (random) is compared by round trip: the emulator's BU/A6 reproduce the proxy's check value, and
the clear key recovered independently (psec, test LMK) matches. VECTORS.md section 10 KCVs and
section 4 TR-31 rows go through the proxy.
"""

from __future__ import annotations

from collections.abc import Iterator

import psec
import pytest

from emulator.app import TEST_KEYBLOCK_LMK
from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.keyblock import KeyBlockHeader, wrap_key_block
from emulator.crypto.lmk import TEST_LMK, decrypt_key_under_lmk, encrypt_key_under_lmk, kcv_aes_cmac
from tests.integration.conftest import HsmClient, RunningEmulator
from tests.integration.proxy_env import RunningProxy

ZMK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")  # KCV 08D7B4 (VECTORS.md section 10)
ZMK3 = bytes.fromhex("0123456789ABCDEFFEDCBA987654321089ABCDEF01234567")
KEY = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
KEY3 = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98C1C1C1C1C1C1C1C1")
SINGLE = bytes.fromhex("1C1C1C1C1C1C1C1C")
EVEN = bytes.fromhex("0023456789ABCDEFFEDCBA9876543210")
AES = bytes.fromhex("3F419E1CB7079442AA37474C2EFBF8B8")  # AES KCV 08793E (VECTORS.md section 10)


def _lmk(key_type: str, scheme: str, key: bytes) -> bytes:
    return encrypt_key_under_lmk(TEST_LMK, key_type, scheme, key).encode()


def _x917(zmk: bytes, key: bytes) -> bytes:
    with legacy_tdes():
        return bytes(psec.des.encrypt_tdes_ecb(zmk, key)).hex().upper().encode()


def _variant_zmk(zmk: bytes, scheme: str, key: bytes) -> bytes:
    variants = {"U": (0xA6, 0x5A), "T": (0x6A, 0xDE, 0x2B)}[scheme]
    out = b""
    for i in range(len(key) // 8):
        k = bytearray(zmk)
        k[8] ^= variants[i]
        out += _x917(bytes(k), key[8 * i : 8 * i + 8])
    return scheme.encode() + out


def _s(usage: str, key: bytes, algorithm: str = "T", exportability: str = "E", mode: str = "N") -> bytes:
    header = KeyBlockHeader("1", usage, algorithm, mode, "00", exportability, "01")
    return b"S" + wrap_key_block(TEST_KEYBLOCK_LMK, header, key).encode()


def _tr31(zmk: bytes, header: str, key: bytes) -> bytes:
    with legacy_tdes():
        return b"R" + str(psec.tr31.wrap(zmk, header, key)).encode()


@pytest.fixture
def clients(running_proxy: RunningProxy, emulator: RunningEmulator) -> Iterator[tuple[HsmClient, HsmClient]]:
    proxy = HsmClient("127.0.0.1", running_proxy.port)
    ref = HsmClient(emulator.host, emulator.port)
    yield proxy, ref
    proxy.close()
    ref.close()


def _requests() -> list[bytes]:
    zu, zt, zx, zz = (
        _lmk("000", "U", ZMK),
        _lmk("000", "T", ZMK3),
        _lmk("000", "X", ZMK),
        _lmk("000", "Z", SINGLE),
    )
    tmk = _lmk("002", "U", ZMK)
    zs, zs_bad = _s("K0", ZMK), _s("P0", ZMK)
    under = [
        b"X" + _x917(ZMK, KEY),
        _variant_zmk(ZMK, "U", KEY),
        _variant_zmk(ZMK, "T", KEY3),
        b"Y" + _x917(ZMK, KEY3),
        b"Z" + _x917(ZMK, SINGLE),
        _x917(ZMK, SINGLE),
        b"X" + _x917(ZMK, EVEN),
        _tr31(ZMK, "B0000P0TE00E0000", KEY),
        _tr31(ZMK, "D0000P0TE00E0000", KEY),
        _tr31(ZMK, "A0000P0TE00E0000", KEY),
        _tr31(ZMK, "C0000D0AE00E0000", AES),
        _tr31(ZMK, "D0000D0AE00E0000", AES + AES),
        _tr31(ZMK, "B0000K0TB00N0100KS08AAAA", KEY3),
    ]
    bad_mac = bytearray(under[7])
    bad_mac[-1] = ord("0") if bad_mac[-1] != ord("0") else ord("1")
    under += [bytes(bad_mac), b"RB0016P0TE00E0000", zs]
    out: list[bytes] = []
    for key_zmk in under:
        for scheme in (b"U", b"T", b"X", b"Y", b"Z", b"0", b"S", b"Q"):
            out.append(b"A6001" + zu + key_zmk + scheme)
        out.append(b"A6001" + zt + key_zmk + b"U")
        out.append(b"FA" + zu + key_zmk)
        out.append(b"FA" + zu + key_zmk + b";XU1")
        out.append(b"FA" + zu + key_zmk + b";XT0")
        out.append(b"FA" + zu + key_zmk + b";XS0")
    x = under[0]
    out += [
        b"A6002" + zu + x + b"S#P0E00E00",
        b"A6FFF" + zu + x + b"S%01#K1E01N00",
        b"A6FFF" + zu + x + b"U",
        b"A600A" + zu + x + b"S#D0X00S00",
        b"A6001" + zu + x + b"S#p0N00E00",
        b"A6001" + zu + x + b"S#P0Q00E00",
        b"A6001" + zu + x + b"S#P0N00Q00",
        b"A6001" + zu + x + b"U%01",
        b"A6001" + zu + x + b"U%02",
        b"A6001" + zu + x + b"U%00",
        b"A6001" + zu + x + b"S%00",
        b"A6099" + zu + x + b"U",
        b"A6A01" + zu + x + b"U",
        b"A6001" + zx + x + b"U",
        b"A6001" + zz + x + b"U",
        b"A6001" + tmk + x + b"U",
        b"A6001" + zs + x + b"U%01",
        b"A6001" + zs + x + b"S",
        b"A6001" + zs_bad + x + b"S",
        b"A6001" + _lmk("000", "U", EVEN) + x + b"U",
        b"FA" + zs + x + b";XS1",
        b"FA" + zu + x + b"%01",
    ]
    # A8: keys under the LMK (variant and S) exported in every scheme.
    keys = [
        (b"001", _lmk("001", "U", KEY)),
        (b"001", _lmk("001", "T", KEY3)),
        (b"001", _lmk("001", "X", KEY)),
        (b"001", _lmk("001", "Y", KEY3)),
        (b"001", _lmk("001", "Z", SINGLE)),
        (b"001", _lmk("001", "", SINGLE)),
        (b"002", _lmk("002", "U", KEY)),
        (b"402", _lmk("402", "U", KEY)),
        (b"00A", _lmk("00A", "U", KEY)),
        (b"001", _lmk("001", "U", EVEN)),
        (b"001", _s("P0", KEY)),
        (b"001", _s("P0", KEY, exportability="N")),
        (b"001", _s("P0", KEY, exportability="S")),
        (b"001", _s("M3", KEY)),
        (b"00A", _s("D0", AES, algorithm="A")),
        (b"00A", _s("D0", AES + AES, algorithm="A")),
        (b"FFF", _lmk("001", "U", KEY)),
        (b"0ZZ", _lmk("001", "U", KEY)),
    ]
    for key_type, key_lmk in keys:
        for scheme in (b"U", b"T", b"X", b"Y", b"Z", b"0", b"R", b"S"):
            out.append(b"A8" + key_type + zu + key_lmk + scheme)
        out.append(b"A8" + key_type + zt + key_lmk + b"X")
        out.append(b"A8" + key_type + zs + key_lmk + b"X%01")
    out += [
        b"A8001" + zu + _s("P0", KEY) + b"X%01",
        b"A8001" + zu + _lmk("001", "U", KEY) + b"X%01",
        b"A8001" + zu + _lmk("001", "U", KEY) + b"X%02",
        b"A8001" + _lmk("000", "U", EVEN) + _lmk("001", "U", KEY) + b"X",
    ]
    # BU: legacy type codes, FF + 3-character type, length flags, KCV types, key blocks.
    for code, key_type, key in [
        (b"01", b"001", KEY),
        (b"02", b"002", KEY3),
        (b"00", b"000", ZMK),
        (b"0A", b"00A", KEY),
        (b"42", b"402", KEY),
        (b"01", b"001", SINGLE),
        (b"01", b"001", EVEN),
    ]:
        lmk_scheme = {8: "Z", 16: "U", 24: "T"}[len(key)]
        key_lmk = _lmk(key_type.decode(), lmk_scheme, key)
        for flag in (b"0", b"1", b"2", b"3"):
            out.append(b"BU" + code + flag + key_lmk)
            out.append(b"BU" + code + flag + key_lmk + b";001")
            out.append(b"BUFF" + flag + key_lmk + b";" + key_type + b";001")
        out.append(b"BU" + code + b"1" + key_lmk + b"%01")
        out.append(b"BU" + code + b"1" + key_lmk + b"%02")
    for block in (
        _s("P0", KEY),
        _s("D0", AES, algorithm="A"),
        _s("D0", AES + AES, algorithm="A"),
        _s("72", KEY3),
    ):
        out += [
            b"BUFF1" + block + b";FFF;001",
            b"BUFF1" + block + b";FFF",
            b"BU011" + block,
            b"BU011" + block + b"%00",
        ]
    tampered = bytearray(_s("P0", KEY))
    tampered[-1] = ord("0") if tampered[-1] != ord("0") else ord("1")
    v0 = bytearray(_s("P0", KEY))
    v0[1] = ord("0")
    out += [b"BU011" + bytes(tampered), b"BU011" + bytes(v0), b"BU9Z1" + _lmk("001", "U", KEY)]
    out += [b"BUFF1" + _lmk("001", "U", KEY) + b";FFF", b"BU011" + _tr31(ZMK, "B0000P0TE00E0000", KEY)]
    # A0 error paths (a successful A0 is random: see the round-trip tests).
    out += [
        b"A02001U",
        b"A00999U",
        b"A00001Q",
        b"A00001S%00",
        b"A00001U%01",
        b"A00001U%02",
        b"A00FFFU",
        b"A00FFFS#72X1N00E00",
        b"A00FFFS#72T2Q00E00",
        b"A00FFFS#72T2N00Q00",
        b"A00FFFS#7zT2N00E00",
        b"A01001U;0" + zu + b"Q",
        b"A01001U;0" + zx + b"S",
        b"A01001U;0" + zz + b"X",
        b"A01001U;1" + zu + b"X",
        b"A01001U;0" + _lmk("000", "U", EVEN) + b"X",
        b"A01001S" + zu + b"X%01",
        b"A01001U" + zs + b"X",
        b"A01001S" + zs + b"X%01",
        b"A00001S#P0A3N00E00",
        b"A01001U;0" + zu + b"Z",
        b"A01001T;0" + zu + b"U",
        b"A01001S;0" + zu + b"U#P0A2N00E00",
    ]
    return out


def _mask(resp: bytes) -> tuple[bytes, bytes, bytes]:
    """(code, key block or b"", rest): an S/R block at the start of the body is random-padded."""
    body = resp[4:]
    if body[:1] in (b"S", b"R") and body[2:6].isdigit():
        n = 1 + int(body[2:6])
        return resp[:4], body[:n], body[n:]
    return resp[:4], b"", body


def _same(proxy: bytes, want: bytes, ref: HsmClient) -> bool:
    """Equal, or equal except the random key data of a key block that opens to the same key."""
    if proxy == want:
        return True
    (code, block, rest), (want_code, want_block, want_rest) = _mask(proxy), _mask(want)
    if code != want_code or rest != want_rest or not block or block[:17] != want_block[:17]:
        return False
    if len(block) != len(want_block):
        return False
    kcv = rest[:6]
    if block[:1] == b"S":
        return ref.call(b"BUFF1" + block + b";FFF;001")[4:] == kcv
    for zmk in (ZMK, ZMK3):
        try:
            with legacy_tdes():
                _, key = psec.tr31.unwrap(zmk, block[1:].decode())
        except ValueError:
            continue
        with legacy_tdes():
            tdes = (
                bytes(psec.des.generate_kcv(key, 3)).hex().upper().encode()
                if len(key) in (8, 16, 24)
                else b""
            )
        aes = kcv_aes_cmac(key)[:3].hex().upper().encode() if len(key) in (16, 24, 32) else b""
        return kcv in (tdes, aes)
    return False


def test_proxy_keys_match_emulator(clients: tuple[HsmClient, HsmClient]) -> None:
    proxy, ref = clients
    mismatches = []
    for request in _requests():
        got, want = proxy.call(request), ref.call(request)
        if request[:2] == b"A0" and want[:4] == b"A100":  # random: same shape (round trips below)
            assert got[:4] == b"A100" and len(got) == len(want), request
        elif not _same(got, want, ref):
            mismatches.append((request[:12], len(request), got[:30], want[:30], len(got), len(want)))
    assert not mismatches, mismatches


def test_vectors_through_the_proxy(clients: tuple[HsmClient, HsmClient]) -> None:
    proxy, _ = clients
    zu = _lmk("000", "U", ZMK)
    # VECTORS.md section 10: TDES KCV 08D7B4 / 08D7B4FB629D0885; AES KCV (CMAC) 08793E25AB.
    assert proxy.call(b"BU001" + zu) == b"BV0008D7B4FB629D0885"
    assert proxy.call(b"BU001" + zu + b";001") == b"BV0008D7B4"
    assert proxy.call(b"BUFF1" + _s("D0", AES, algorithm="A") + b";FFF")[4:14] == b"08793E25AB"
    # FA/A6 of the known key: exact key under LMK and KCV.
    resp = proxy.call(b"FA" + zu + b"X" + _x917(ZMK, ZMK) + b";XU1")
    assert resp == b"FB00" + _lmk("001", "U", ZMK) + b"08D7B4"
    # VECTORS.md section 4, payShield-gen rows A/B/C (the only rows whose KBPK has odd parity, as a ZMK
    # must; the D rows need an AES-256 KBPK).
    kbpk, clear = (
        bytes.fromhex("EFE0853B256B583D868F251CE99EA1D9"),
        bytes.fromhex("5DB50B454F8389ADCE573BE50861F2BF"),
    )
    rows = [
        "A0072K0TN00N0000F40D5672C6D0EC86F860BA88D44D00F0CA9A8CE8CD2F640287A9A9EB",
        "B0080K0TN00N00001C414014375212C24995E405B5EE052CB92B67F455EA2680F6751088F9F1C228",
        "C0072K0TN00N0000C9B875FF7A5316BF221C09ED52080DE0B45632A4EA9CE87699CB565E",
    ]
    for block in rows:
        resp = proxy.call(b"A6000" + _lmk("000", "U", kbpk) + b"R" + block.encode() + b"U")
        assert resp == b"A700" + _lmk("000", "U", clear) + b"5C9405", block[:5]


def test_a0_round_trips_with_the_emulator(clients: tuple[HsmClient, HsmClient]) -> None:
    proxy, ref = clients
    zu = _lmk("000", "U", ZMK)
    for scheme, size in ((b"U", 33), (b"T", 49), (b"X", 33), (b"Y", 49), (b"Z", 16), (b"0", 16)):
        for zmk_scheme in (b"X", b"U", b"T", b"Y", b"Z", b"0", b"R"):
            resp = proxy.call(b"A01001" + scheme + b";0" + zu + zmk_scheme)
            want_error = ref.call(b"A01001" + scheme + b";0" + zu + zmk_scheme)[:4]
            assert resp[:4] == want_error
            if want_error != b"A100":
                continue
            key_lmk, key_zmk, kcv = resp[4 : 4 + size], resp[4 + size : -6], resp[-6:]
            clear = decrypt_key_under_lmk(TEST_LMK, "001", key_lmk.decode())
            assert all(bin(b).count("1") % 2 for b in clear)
            with legacy_tdes():
                assert kcv == bytes(psec.des.generate_kcv(clear, 3)).hex().upper().encode()
            assert ref.call(b"BU011" + key_lmk + b";001") in (b"BV00" + kcv, b"BV27")
            if zmk_scheme != b"0" or len(clear) == 8:
                assert ref.call(b"A6001" + zu + key_zmk + scheme) == b"A700" + key_lmk + kcv
    # Key blocks: the emulator verifies and opens the proxy's S block.
    for attrs, algorithm in ((b"#72T2N00E00", "T"), (b"#D0A3N00S00", "A"), (b"#P0D1N00E00", "D"), (b"", "T")):
        resp = proxy.call(b"A00FFFS%01" + attrs if attrs else b"A00001S")
        assert resp[:4] == b"A100", attrs
        block, kcv = resp[4:-6], resp[-6:]
        assert block[6:8] == (attrs[1:3] if attrs else b"P0") and block[8:9] == algorithm.encode()
        assert ref.call(b"BUFF1" + block + b";FFF;001")[4:] == kcv
    resp = proxy.call(b"A01FFFS;0" + zu + b"R#D0A3N00E00")
    assert resp[:4] == b"A100"
    block = resp[4 : 4 + int(resp[6:10]) + 1]
    key_zmk = resp[4 + len(block) : -6]
    with legacy_tdes():
        _, key = psec.tr31.unwrap(ZMK, key_zmk[1:].decode())
    assert ref.call(b"BUFF1" + block + b";FFF;001") == b"BV00" + resp[-6:]
    assert ref.call(b"A6FFF" + zu + key_zmk + b"S#D0N00E00")[-6:] == resp[-6:]
    assert len(key) == 32
