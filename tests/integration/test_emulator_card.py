"""Live emulator: CW / CY Visa CVV against VECTORS.md section 6 (cross-checked with psec)."""

from __future__ import annotations

import psec
import pytest

from emulator.app import TEST_KEYBLOCK_LMK
from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.keyblock import KeyBlockHeader, wrap_key_block
from emulator.crypto.lmk import TEST_LMK, adjust_parity, encrypt_key_under_lmk
from tests.integration.conftest import HsmClient

CVK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
# psec's self-test CVK 9999..8888.. has even parity; DES ignores the parity bits, so the
# parity-adjusted key (9898..8989..) gives the same CVV.
PSEC_CVK = bytes.fromhex("99999999999999998888888888888888")

ROWS = [
    (CVK, b"4123456789012345", b"8701", b"101", b"561"),
    (CVK, b"4999988887777", b"9105", b"111", b"649"),
    (adjust_parity(PSEC_CVK), b"2222222222222222", b"3333", b"111", b"361"),
]


def cvk_lmk(clear: bytes, scheme: str = "U") -> bytes:
    """``clear`` as a CVK (402) under the test LMK."""
    return encrypt_key_under_lmk(TEST_LMK, "402", scheme, clear).encode()


@pytest.mark.parametrize("row", ROWS)
def test_cw_cy_visa_cvv_vectors(client: HsmClient, row: tuple[bytes, bytes, bytes, bytes, bytes]) -> None:
    cvk, pan, expiry, service_code, cvv = row
    with legacy_tdes():
        assert (
            psec.cvv.generate_cvv(cvk, pan.decode(), expiry.decode(), service_code.decode()) == cvv.decode()
        )
    key = cvk_lmk(cvk)
    data = pan + b";" + expiry + service_code
    assert client.call(b"CW" + key + data) == b"CX00" + cvv
    assert client.call(b"CY" + key + cvv + data) == b"CZ00"
    wrong = f"{(int(cvv) + 1) % 1000:03d}".encode()
    assert client.call(b"CY" + key + wrong + data) == b"CZ01"


def test_cw_key_block_cvk_and_x_scheme(client: HsmClient) -> None:
    block = wrap_key_block(TEST_KEYBLOCK_LMK, KeyBlockHeader("1", "C0", "T", "C", lmk_id="01"), CVK)
    assert client.call(b"CWS" + block.encode() + b"4123456789012345;8701101") == b"CX00561"
    assert client.call(b"CW" + cvk_lmk(CVK, "X") + b"4123456789012345;8701101") == b"CX00561"
    # a key block with another usage is not a CVK
    other = wrap_key_block(TEST_KEYBLOCK_LMK, KeyBlockHeader("1", "P0", "T", "B", lmk_id="01"), CVK)
    assert client.call(b"CWS" + other.encode() + b"4123456789012345;8701101") == b"CX29"


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (b"CW" + cvk_lmk(PSEC_CVK) + b"2222222222222222;3333111", b"10"),  # even parity
        (b"CW" + cvk_lmk(CVK[:8], "Z") + b"4123456789012345;8701101", b"27"),  # single length (Z)
        (b"CW" + cvk_lmk(CVK + CVK[:8], "T") + b"4123456789012345;8701101", b"27"),  # triple length
        (b"CW" + b"U" + b"G" * 32 + b"4123456789012345;8701101", b"15"),  # key not hex
        (b"CW" + cvk_lmk(CVK) + b"4123456789012345;8701101%99", b"13"),
        (b"CW" + cvk_lmk(CVK) + b"4123456789012345;87A1101", b"15"),
    ],
)
def test_cw_error_paths_keep_the_connection(client: HsmClient, request_: bytes, code: bytes) -> None:
    assert client.call(request_) == b"CX" + code
    assert client.call(b"CW" + cvk_lmk(CVK) + b"4123456789012345;8701101") == b"CX00561"


def test_cy_error_paths(client: HsmClient) -> None:
    assert client.call(b"CY" + cvk_lmk(PSEC_CVK) + b"3612222222222222222;3333111") == b"CZ10"
    assert client.call(b"CY" + cvk_lmk(CVK) + b"561" + b"4123456789012345;8701101%99") == b"CZ13"
    assert client.call(b"CY" + cvk_lmk(CVK) + b"561" + b"4123456789012345;8701101") == b"CZ00"


def test_cw_accepts_a_legacy_untagged_cvk_pair(client: HsmClient) -> None:
    """CVK A and CVK B as two untagged 16-hex cryptograms, each single-length under the LMK."""
    from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk

    cvk_a = encrypt_key_under_lmk(TEST_LMK, "402", "", bytes.fromhex("0123456789ABCDEF"))
    cvk_b = encrypt_key_under_lmk(TEST_LMK, "402", "", bytes.fromhex("FEDCBA9876543210"))
    assert client.call(f"CW{cvk_a}{cvk_b}4123456789012345;8701101".encode()) == b"CX00561"
    assert client.call(f"CY{cvk_a}{cvk_b}5614123456789012345;8701101".encode()) == b"CZ00"
