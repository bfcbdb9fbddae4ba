"""Key scheme tags on returned keys: a single-length key (``Z``) comes back as the bare 16 hex.

payShield writes ``U``/``T``/``X``/``Y`` (and the ``S``/``R`` blocks) in front of a key it returns,
but never ``Z``: a single-length key, under the LMK or under a ZMK, is the 16 hex characters alone.
Every command of the table that returns a key (A0 under LMK and under ZMK/TMK, A6, A8, FA) is
checked here on the emulator and on the proxy, against values computed independently with psec
from the public test LMK (VECTORS.md section 5): the VECTORS.md section 10 key
``0123456789ABCDEFFEDCBA9876543210`` as ZMK (KCV ``08D7B4``) and section 6's CVK A / CVK B, whose
two untagged A6 answers side by side are the legacy CVK pair of CW (CVV ``561``). ``Z`` + 16 hex
stays a valid input, as does the untagged 16 hex.
"""

from __future__ import annotations

from collections.abc import Iterator

import psec
import pytest

from conformance.runner import load_cases
from emulator.crypto.cipher import legacy_tdes
from tests.integration.conftest import HsmClient, RunningEmulator
from tests.integration.proxy_env import RunningProxy

ZMK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")  # VECTORS.md 10, KCV 08D7B4
CVK_A, CVK_B = bytes.fromhex("0123456789ABCDEF"), bytes.fromhex("FEDCBA9876543210")  # VECTORS.md 6
CVV_TAIL = b"4123456789012345;8701101"  # VECTORS.md 6: CVV 561
#: Test LMK pairs (VECTORS.md 5) by key type: 000 ZMK, 001 ZPK (variant 0), 402 CVK (variant 4).
LMK_PAIRS = {
    "000": ("4040404040404040", "5151515151515151", 0x00),
    "001": ("6161616161616161", "7070707070707070", 0x00),
    "402": ("E0E0010101010101", "F1F1010101010101", 0xDE),
}
SCHEME_VARIANT = {"U": (0xA6, 0x5A), "T": (0x6A, 0xDE, 0x2B)}


def _ecb(key: bytes, data: bytes, decrypt: bool = False) -> bytes:
    with legacy_tdes():
        fn = psec.des.decrypt_tdes_ecb if decrypt else psec.des.encrypt_tdes_ecb
        return bytes(fn(key, data))


def _lmk_key(key_type: str, scheme: str, half: int) -> bytes:
    left, right, variant = LMK_PAIRS[key_type]
    k = bytearray.fromhex(left + right)
    k[0] ^= variant
    if scheme in SCHEME_VARIANT:
        k[8] ^= SCHEME_VARIANT[scheme][half]
    return bytes(k)


def under_lmk(key_type: str, clear: bytes, scheme: str = "") -> bytes:
    """Hex of ``clear`` under the test LMK (no tag), each 8-byte half under its LMK variant."""
    out = b"".join(
        _ecb(_lmk_key(key_type, scheme, i), clear[8 * i : 8 * i + 8]) for i in range(len(clear) // 8)
    )
    return out.hex().upper().encode()


def from_lmk(key_type: str, hex_text: bytes, scheme: str = "") -> bytes:
    """The clear key of ``hex_text`` (no tag) under the test LMK."""
    data = bytes.fromhex(hex_text.decode())
    return b"".join(
        _ecb(_lmk_key(key_type, scheme, i), data[8 * i : 8 * i + 8], decrypt=True)
        for i in range(len(data) // 8)
    )


def x917(clear: bytes) -> bytes:
    """Hex of ``clear`` under the ZMK, ANSI X9.17 (each half TDES-ECB)."""
    return _ecb(ZMK, clear).hex().upper().encode()


def kcv(clear: bytes, n: int = 3) -> bytes:
    """The TDES check value, ``n`` bytes, as hex."""
    with legacy_tdes():
        return bytes(psec.des.generate_kcv(clear, n)).hex().upper().encode()


def odd(data: bytes) -> bool:
    """Every byte has odd parity."""
    return all(bin(b).count("1") % 2 for b in data)


ZMK_LMK = b"U" + under_lmk("000", ZMK, "U")


@pytest.fixture(params=["emulator", "proxy"])
def hsm(request: pytest.FixtureRequest) -> Iterator[HsmClient]:
    """A client of the emulator, then of the proxy (SoftHSM2 nodes)."""
    if request.param == "emulator":
        running: RunningEmulator = request.getfixturevalue("emulator")
        c = HsmClient(running.host, running.port)
    else:
        proxy: RunningProxy = request.getfixturevalue("running_proxy")
        c = HsmClient("127.0.0.1", proxy.port)
    yield c
    c.close()


def test_the_independent_lmk_model_reproduces_a_known_vector() -> None:
    """The helpers above agree with the VECTORS.md KCV and with each other before they judge anything."""
    assert kcv(ZMK) == b"08D7B4"
    assert kcv(CVK_A, 8) == b"D5D44FF720683D0D"  # DES of zeros under 0123456789ABCDEF (FIPS 81 key)
    assert from_lmk("402", under_lmk("402", CVK_A)) == CVK_A


def test_fa_single_length_zpk_has_no_tag(hsm: HsmClient) -> None:
    zpk_lmk = under_lmk("001", CVK_A)
    for zpk_zmk in (b"Z" + x917(CVK_A), x917(CVK_A)):  # Z-tagged and untagged inputs
        assert hsm.call(b"FA" + ZMK_LMK + zpk_zmk + b";ZZ1") == b"FB00" + zpk_lmk + kcv(CVK_A)
        assert hsm.call(b"FA" + ZMK_LMK + zpk_zmk + b";ZZ0") == b"FB00" + zpk_lmk + b"D5D44FF720683D0D"
        assert hsm.call(b"FA" + ZMK_LMK + zpk_zmk) == b"FB00" + zpk_lmk + b"D5D44FF720683D0D"
    # A double-length ZPK keeps its tag: U (VECTORS.md 10 key, KCV 08D7B4) and X.
    resp = hsm.call(b"FA" + ZMK_LMK + b"X" + x917(ZMK) + b";XU1")
    assert resp == b"FB00U" + under_lmk("001", ZMK, "U") + b"08D7B4"
    resp = hsm.call(b"FA" + ZMK_LMK + b"X" + x917(ZMK) + b";XX1")
    assert resp == b"FB00X" + under_lmk("001", ZMK, "X") + b"08D7B4"


def test_a6_single_length_key_has_no_tag_and_pairs_into_a_cvk(hsm: HsmClient) -> None:
    answers = []
    for clear in (CVK_A, CVK_B):
        want = b"A700" + under_lmk("402", clear) + kcv(clear)
        assert hsm.call(b"A6402" + ZMK_LMK + b"Z" + x917(clear) + b"Z") == want
        assert hsm.call(b"A6402" + ZMK_LMK + x917(clear) + b"Z") == want
        answers.append(want[4:20])
    # The two bare answers side by side are the legacy CVK A + CVK B field: VECTORS.md 6 CVV 561.
    assert hsm.call(b"CW" + answers[0] + answers[1] + CVV_TAIL) == b"CX00561"
    resp = hsm.call(b"A6402" + ZMK_LMK + b"X" + x917(ZMK) + b"U")
    assert resp == b"A700U" + under_lmk("402", ZMK, "U") + b"08D7B4"


def test_a8_single_length_key_under_zmk_has_no_tag(hsm: HsmClient) -> None:
    key_lmk = under_lmk("402", CVK_A)
    for given in (b"Z" + key_lmk, key_lmk):
        assert hsm.call(b"A8402" + ZMK_LMK + given + b"Z") == b"A900" + x917(CVK_A) + kcv(CVK_A)
    # Double length keeps X (VECTORS.md 10: KCV 08D7B4).
    resp = hsm.call(b"A8402" + ZMK_LMK + b"U" + under_lmk("402", ZMK, "U") + b"X")
    assert resp == b"A900X" + x917(ZMK) + b"08D7B4"


def test_a0_mode_0_single_length_key_has_no_tag(hsm: HsmClient) -> None:
    resp = hsm.call(b"A00001Z")
    assert resp[:4] == b"A100" and len(resp) == 4 + 16 + 6, resp[:4]
    key_lmk, check = resp[4:20], resp[20:]
    clear = from_lmk("001", key_lmk)
    assert odd(clear) and check == kcv(clear)
    assert hsm.call(b"BU010" + key_lmk + b";001") == b"BV00" + check
    resp = hsm.call(b"A00001U")
    assert resp[:5] == b"A100U" and len(resp) == 4 + 33 + 6
    assert kcv(from_lmk("001", resp[5:37], "U")) == resp[37:]


def test_a0_mode_1_single_length_keys_have_no_tag(hsm: HsmClient) -> None:
    for zmk_scheme in (b"Z", b"0"):
        resp = hsm.call(b"A01001Z;0" + ZMK_LMK + zmk_scheme)
        assert resp[:4] == b"A100" and len(resp) == 4 + 16 + 16 + 6, resp[:4]
        key_lmk, key_zmk, check = resp[4:20], resp[20:36], resp[36:]
        clear = from_lmk("001", key_lmk)
        assert odd(clear) and check == kcv(clear)
        assert _ecb(ZMK, bytes.fromhex(key_zmk.decode()), decrypt=True) == clear
        # Fed back as given, the key under the ZMK imports to the same key under the LMK.
        assert hsm.call(b"A6001" + ZMK_LMK + key_zmk + b"Z") == b"A700" + key_lmk + check
    # Double length keeps both tags (U under the LMK, X under the ZMK).
    resp = hsm.call(b"A01001U;0" + ZMK_LMK + b"X")
    assert resp[:5] == b"A100U" and resp[37:38] == b"X" and len(resp) == 4 + 33 + 33 + 6
    clear = from_lmk("001", resp[5:37], "U")
    assert _ecb(ZMK, bytes.fromhex(resp[38:70].decode()), decrypt=True) == clear
    assert kcv(clear) == resp[70:]


def test_conformance_single_length_cases_match_the_independent_model() -> None:
    """The committed known-answer cases for single-length keys, recomputed here with psec."""
    cases = {c.name: c.expect for c in load_cases() if c.name.startswith("single-z-")}
    for half, clear in (("a", CVK_A), ("b", CVK_B)):
        assert cases[f"single-z-cvk-{half}-a6"] == b"A700" + under_lmk("402", clear) + kcv(clear)
        assert cases[f"single-z-cvk-{half}-a8"] == b"A900" + x917(clear) + kcv(clear)
    assert cases["single-z-zpk-fa-kcv6"] == b"FB00" + under_lmk("001", CVK_A) + kcv(CVK_A)
    assert cases["single-z-cvk-pair-cw"] == b"CX00561"
