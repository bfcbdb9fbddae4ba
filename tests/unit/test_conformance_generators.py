"""Conformance generators, case loading and comparison rules (no sockets)."""

from __future__ import annotations

import asyncio
import random

import pytest

from conformance.client import ClientError
from conformance.generators import (
    GENERATORS,
    RANDOM_FILL_FORMATS,
    GenContext,
    Generated,
    generate,
    pin_block_check,
    request_count,
)
from conformance.runner import Case, classify, decode_escapes, load_cases
from emulator.app import build_state
from emulator.crypto.cipher import tdes_ecb_encrypt
from emulator.crypto.pinblock import encode_pin_block
from emulator.hsm import EmulatorHsm
from protocols.hostcmd.fields import parse
from protocols.hostcmd.table import COMMANDS

CTX = GenContext()


def test_every_command_has_a_generator() -> None:
    assert set(GENERATORS) == set(COMMANDS)
    assert len(GENERATORS) == 36


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_generated_requests_parse_with_the_table(command: str) -> None:
    for i in range(40):
        g = generate(command, 11, i, CTX)
        assert g.request[:2] == command.encode()
        parse(COMMANDS[command].request, g.request[2:])  # raises on any layout error


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_generated_requests_are_reproducible(command: str) -> None:
    a = [generate(command, 5, i, CTX).request for i in range(5)]
    b = [generate(command, 5, i, CTX).request for i in range(5)]
    assert a == b
    if command not in ("NO",):
        assert len(set(a)) > 1  # and random


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_generated_requests_are_mostly_valid_on_the_emulator(command: str) -> None:
    """Most random requests succeed (00) or fail verification (01/02), not a field error."""
    hsm = EmulatorHsm(build_state())
    n = 12 if command == "EI" else 60
    codes = [hsm.handle(b"0000" + generate(command, 2, i, CTX).request)[6:8] for i in range(n)]  # type: ignore[index]
    good = sum(c in (b"00", b"01", b"02") for c in codes)
    if codes.count(b"68") == n:
        pytest.skip(f"{command} has no emulator handler yet")
    # EI: moduli below 1024 answer 15 on the emulator (cryptography cannot generate them).
    assert good >= (n // 4 if command == "EI" else n // 2), codes


def test_compare_modes() -> None:
    modes = {
        c: {generate(c, 1, i, CTX).compare for i in range(60)} for c in ("A0", "JA", "EI", "CW", "CC", "JG")
    }
    assert modes["A0"] == {"kcv-via-BU"}
    assert modes["JA"] == {"pin-lmk-decode"}
    assert modes["EI"] == {"rsa-sign-verify"}
    assert modes["CW"] == {"bytes"}
    assert modes["CC"] == {"bytes", "pin-decrypt"}
    assert modes["JG"] == {"bytes", "pin-decrypt"}


def test_random_fill_translations_use_the_pin_check() -> None:
    for i in range(60):
        g = generate("CC", 1, i, CTX)
        assert (g.check is not None) == (g.values["destination_format"] in RANDOM_FILL_FORMATS)


def test_ei_is_capped() -> None:
    assert request_count("EI", 2000) == 40
    assert request_count("CW", 2000) == 2000
    assert request_count("EI", 5) == 5


def test_decode_escapes() -> None:
    assert decode_escapes(r"B20002hi\x19TRAIL") == b"B20002hi\x19TRAIL"
    assert decode_escapes("a\\\\x19") == b"a\\x19"
    assert decode_escapes("plain") == b"plain"


def test_bundled_cases_load() -> None:
    cases = load_cases()
    assert len(cases) > 100
    assert len({c.name for c in cases}) == len(cases)
    by_name = {c.name: c for c in cases}
    assert by_name["cvv-561-cw"].expect == b"CX00561"
    assert by_name["echo-trailer"].request == b"B20002hi\x19TRAIL"
    assert by_name["nc-default"].expect is None


def test_case_files_in_a_directory(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    (tmp_path / "a.toml").write_text(
        "[[case]]\nname = 'x'\ncommand = 'B20001\\x41'\nexpect = 'B300A'\n"
        "[[case]]\nname = 'y'\nrequest_hex = '4E43'\nexpect = 'reference'\n"
    )
    cases = load_cases(tmp_path)
    assert cases == [Case("x", b"B20001A", b"B300A", "a.toml"), Case("y", b"NC", None, "a.toml")]
    (tmp_path / "b.toml").write_text("[[case]]\nname = 'z'\ncommand = 'NC'\n")
    with pytest.raises(ValueError, match="no expect"):
        load_cases(tmp_path)


def _classify(ref: bytes | ClientError, tgt: bytes | ClientError, **kw: object) -> tuple[str, str]:
    return asyncio.run(classify(ref, tgt, **kw))  # type: ignore[arg-type]


def test_classify_rules() -> None:
    assert _classify(b"CX00561", b"CX00561")[0] == "same"
    assert _classify(b"CX00561", b"CX00562")[0] == "different"
    assert _classify(b"CX68", b"CX68")[0] == "unsupported"
    assert _classify(b"CX00561", b"CX68")[0] == "different"
    assert _classify(b"CX15", b"CX26")[0] == "different"
    assert _classify(b"CX00561", ClientError("timeout"))[0] == "errors"
    assert _classify(ClientError("timeout"), b"CX00561")[0] == "errors"
    # Exact expectations judge the target.
    assert _classify(b"CX00999", b"CX00561", expect=b"CX00561")[0] == "same"
    assert _classify(b"CX00561", b"CX00562", expect=b"CX00561")[0] == "different"
    assert _classify(b"CX68", b"CX68", expect=b"CX00561")[0] == "unsupported"


def test_pin_check_accepts_different_fill_and_rejects_another_pin() -> None:
    zpk = bytes.fromhex("A1A1A1A1A1A1A1A1B0B0B0B0B0B0B0B0")
    account = "401234567890"
    check = pin_block_check(zpk, "47", account, "1234")

    def values(pin: str, fill: str) -> dict[str, str | bytes]:
        block = tdes_ecb_encrypt(zpk, encode_pin_block("47", pin, account, fill=fill)).hex().upper()
        return {"pin_length": "04", "pin_block": block, "destination_format": "47"}

    ref, tgt = values("1234", "ABCDEFABCD"), values("1234", "FEDCBAFEDC")
    assert ref != tgt
    assert asyncio.run(check.fn(ref, tgt, None)) is None  # type: ignore[arg-type]
    assert asyncio.run(check.fn(ref, values("1235", "ABCDEFABCD"), None)) is not None  # type: ignore[arg-type]


def test_generated_values_hold_no_unknown_fields() -> None:
    rng = random.Random(1)
    for command, gen in GENERATORS.items():
        g = gen(rng, CTX)
        assert isinstance(g, Generated) and g.command == command
        names = {n for f in COMMANDS[command].request for n in f.names()}
        assert set(g.values) <= names, command
