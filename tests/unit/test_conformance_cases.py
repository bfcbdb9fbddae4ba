"""The bundled case corpus: up to date with its builder, expected values cross-checked with psec."""

from __future__ import annotations

import psec

from conformance import build_cases
from conformance.runner import BUNDLED_CASES, load_cases
from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.lmk import TEST_LMK, decrypt_key_under_lmk

CASES = {c.name: c for c in load_cases()}


def test_committed_toml_matches_the_builder() -> None:
    for name, text in build_cases.build().items():
        assert (BUNDLED_CASES / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale: run .venv/bin/python -m conformance.build_cases"
        )


def test_every_vector_family_is_present() -> None:
    prefixes = (
        "iso0-",
        "iso3-",
        "iso4-",
        "dukpt-tdes-",
        "dukpt-aes128-",
        "cvv-",
        "pvv-",
        "ibm-",
        "kcv-",
        "tr31-",
        "payshield-gen-",
        "mac-x919-",
        "mac-x99-",
        "gm-",
        "kq-",
    )
    for prefix in prefixes:
        assert any(n.startswith(prefix) for n in CASES), prefix
    assert {c.command for c in CASES.values()} >= {
        "CC",
        "CA",
        "JE",
        "JG",
        "G0",
        "CI",
        "CW",
        "CY",
        "DG",
        "FW",
        "EC",
        "DC",
        "DE",
        "EE",
        "EA",
        "DA",
        "BU",
        "A6",
        "M6",
        "M8",
        "GM",
        "KQ",
        "B2",
        "NC",
    }


def _decrypt_pin_block(key: bytes, block_hex: str) -> bytes:
    with legacy_tdes():
        return bytes(psec.des.decrypt_tdes_ecb(key, bytes.fromhex(block_hex)))


def test_cvv_cases_agree_with_psec() -> None:
    for cvk_hex, pan, expiry, sc, cvv in build_cases.CVV_ROWS:
        with legacy_tdes():
            assert psec.cvv.generate_cvv(bytes.fromhex(cvk_hex), pan, expiry, sc) == cvv
        assert CASES[f"cvv-{cvv}-cw"].expect == f"CX00{cvv}".encode()


def test_pvv_cases_agree_with_psec() -> None:
    for i, (pvk_hex, account, pvki, pin, pvv) in enumerate(build_cases.PVV_ROWS, 1):
        with legacy_tdes():
            assert psec.pin.generate_visa_pvv(bytes.fromhex(pvk_hex), pvki, pin, account + "0") == pvv
        assert CASES[f"pvv-row{i}-dg"].expect == f"DH00{pvv}".encode()


def test_ibm_offsets_agree_with_psec() -> None:
    vd = "1122334455667788"
    assert build_cases.IBM_TEMPLATE.replace("N", build_cases.IBM_ACCOUNT[-5:]) == vd
    for pin, offset in build_cases.IBM_ROWS:
        with legacy_tdes():
            got = psec.pin.generate_ibm3624_offset(
                build_cases.KEY_0123, build_cases.IBM_DEC, pin, vd, 0, 16, "F"
            )
        assert got == offset
        assert CASES[f"ibm-{pin}-de"].expect == f"DF00{offset.ljust(12, 'F')}".encode()


def test_dukpt_expected_pin_blocks_decode_with_psec() -> None:
    """G0/CI answers: the vector's PIN 1234 as ISO-0 under ZPK2 (decrypted and decoded by psec)."""
    for name, case in CASES.items():
        if not name.startswith(("dukpt-tdes-", "dukpt-aes128-")):
            continue
        assert case.expect is not None
        body = case.expect[4:].decode()
        assert body[:2] == "04" and body[-2:] == "01"
        clear = _decrypt_pin_block(build_cases.ZPK2, body[2:18])
        pan = "4111111111111111" if "aes" in name else "4012345678909"
        assert psec.pinblock.decode_pinblock_iso_0(clear, pan) == "1234"


def test_translation_expected_blocks_decode_with_psec() -> None:
    for i, (pin, pan, clear_hex) in enumerate(build_cases.ISO0_ROWS, 1):
        expect = CASES[f"iso0-row{i}-cc-01-01"].expect
        assert expect is not None
        block = expect[6:22].decode()
        assert _decrypt_pin_block(build_cases.ZPK2, block).hex().upper() == clear_hex
        assert psec.pinblock.decode_pinblock_iso_0(bytes.fromhex(clear_hex), pan) == pin
    expect = CASES["iso3-ibm-cc-47-01"].expect
    assert expect is not None
    clear = _decrypt_pin_block(build_cases.ZPK2, expect[6:22].decode())
    assert psec.pinblock.decode_pinblock_iso_0(clear, "0002223334445550") == "123456"


def test_keys_in_cases_decrypt_to_the_vector_keys() -> None:
    cw = CASES["cvv-561-cw"].request.decode()
    assert (
        decrypt_key_under_lmk(TEST_LMK, "402", cw[2:35]).hex().upper() == "0123456789ABCDEFFEDCBA9876543210"
    )
    with legacy_tdes():
        kcv = bytes(psec.des.generate_kcv(build_cases.KEY_0123, 8)).hex().upper()
    assert CASES["kcv-tdes-bu-legacy"].expect == f"BV00{kcv}".encode()


def test_mac_cases_agree_with_psec() -> None:
    data = b"4012345678909D987"
    key = build_cases.DUKPT_MAC_KEY_REQ
    with legacy_tdes():
        mac = bytes(psec.mac.generate_retail_mac(key[:8], key[8:], data, 1, 8)).hex().upper()
    assert CASES["mac-x919-dukpt-req-m6"].expect == f"M700{mac}".encode()
