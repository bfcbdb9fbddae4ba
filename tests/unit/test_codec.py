"""The generic host-command codec: field kinds, table walking, error codes."""

from __future__ import annotations

import pytest

from protocols.hostcmd.fields import ParseError, format_fields, output_key, parse
from protocols.hostcmd.table import COMMANDS

ZPK_A = "U" + "1" * 32
ZPK_B = "T" + "2" * 48


def test_cc_request_parses_every_field() -> None:
    body = f"{ZPK_A}{ZPK_B}12{'0123456789ABCDEF'}0147{'400012345678'}".encode()
    parsed = parse(COMMANDS["CC"].request, body)
    v = parsed.values
    assert v["source_zpk"] == ZPK_A
    assert v["destination_zpk"] == ZPK_B
    assert v["max_pin_length"] == "12"
    assert v["pin_block"] == "0123456789ABCDEF"
    assert (v["source_format"], v["destination_format"]) == ("01", "47")
    assert v["account"] == "400012345678"
    assert parsed.trailer == b""
    assert format_fields(COMMANDS["CC"].request, v) == body


def test_trailer_and_lmk_id_tail() -> None:
    body = f"{ZPK_A}{ZPK_A}12{'0' * 16}0101{'1' * 12}%01\x19TRAILER".encode()
    parsed = parse(COMMANDS["CC"].request, body)
    assert parsed.values["lmk_id"] == "01"
    assert parsed.trailer == b"\x19TRAILER"


def test_untagged_single_and_x917_keys() -> None:
    # CW takes an untagged CVK as the legacy pair CVK A + CVK B (32 hex); CC takes 16-hex single keys.
    parsed = parse(COMMANDS["CW"].request, b"0123456789ABCDEFFEDCBA9876543210" + b"4123456789012345;8701101")
    assert parsed.values["cvk"] == "0123456789ABCDEFFEDCBA9876543210"
    cc = parse(COMMANDS["CC"].request, f"{'1' * 16}{ZPK_A}12{'0' * 16}0101{'1' * 12}".encode())
    assert cc.values["source_zpk"] == "1" * 16
    assert parsed.values["pan"] == "4123456789012345"
    parsed = parse(COMMANDS["CW"].request, b"X" + b"AB" * 16 + b"4999988887777;9105111")
    assert parsed.values["cvk"] == "X" + "AB" * 16


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"Q" + b"1" * 32, "26"),  # unknown key scheme
        (b"U" + b"1" * 31, "15"),  # key too short
        (b"U" + b"G" * 32, "15"),  # key not hex
    ],
)
def test_key_errors(body: bytes, code: str) -> None:
    with pytest.raises(ParseError) as err:
        parse(COMMANDS["CC"].request, body)
    assert err.value.code == code


def test_unknown_tail_is_15_and_bad_lmk_id_is_13() -> None:
    base = f"{ZPK_A}{ZPK_A}12{'0' * 16}0101{'1' * 12}".encode()
    with pytest.raises(ParseError) as err:
        parse(COMMANDS["CC"].request, base + b"EXTRA")
    assert err.value.code == "15"
    with pytest.raises(ParseError) as err:
        parse(COMMANDS["CC"].request, base + b"%X1")
    assert err.value.code == "13"


def test_format_code_errors_use_23() -> None:
    body = f"{ZPK_A}{ZPK_A}12{'0' * 16}X101{'1' * 12}".encode()
    with pytest.raises(ParseError) as err:
        parse(COMMANDS["CC"].request, body)
    assert err.value.code == "23"


def test_aes_key_block_makes_the_pin_block_32_hex() -> None:
    block = "S10096P0AE00E0000" + "A" * 80  # header says 96 characters in all
    assert len(block) == 97
    body = f"{block}{ZPK_A}12{'F' * 32}484816{'4' * 16}".encode()
    v = parse(COMMANDS["CC"].request, body).values
    assert v["source_zpk"] == block
    assert v["pin_block"] == "F" * 32
    assert v["pan"] == b"4" * 16  # ISO format 4 carries the full PAN, length-prefixed
    assert "account" not in v


def test_counted_messages_and_binary_fields() -> None:
    v = parse(COMMANDS["B2"].request, b"0005hello").values
    assert v["data"] == b"hello"
    with pytest.raises(ParseError) as err:
        parse(COMMANDS["B2"].request, b"0009hello")
    assert err.value.code == "80"
    kq = (
        b"11U"
        + b"A" * 32
        + b"\x19" * 8
        + b"\x00\x01"
        + b"\x01\x02\x03\x04"
        + b"02"
        + b"\x19\x00"
        + b";"
        + b"\xff" * 8
        + b"\x00\x00\x19TR"
    )
    parsed = parse(COMMANDS["KQ"].request, kq)
    assert parsed.values["pan_psn"] == b"\x19" * 8
    assert parsed.values["data"] == b"\x19\x00"
    assert parsed.values["arc"] == b"\x00\x00"
    assert parsed.trailer == b"\x19TR"


def test_response_layout_uses_request_context() -> None:
    spec = COMMANDS["GM"]
    req = parse(spec.request, b"0600003abc").values
    digest = bytes(range(32))
    wire = format_fields(spec.response, {"hash": digest}, req)
    assert wire == digest
    assert parse(spec.response, wire, req).values["hash"] == digest


def test_every_command_has_a_name_and_layouts() -> None:
    expected = set(
        "NC NO B2 A0 A6 A8 BU FA CA CC CI G0 JA JC JE JG DA EA DC EC DE EE DG FW CW CY "
        "M0 M2 M6 M8 MS KQ EI EW EY GM".split()
    )
    assert set(COMMANDS) == expected
    for spec in COMMANDS.values():
        assert spec.name
        assert isinstance(spec.request, tuple)


SINGLE = "0A61E674E88C6A7E"  # 16 hex: a single-length key (VECTORS.md 6 CVK A under the test LMK, 402)
ZMK_U = "U42BBE7D9A0A55D0EBDE055DE2791ACCD"  # VECTORS.md 10 key under the test LMK (000, U)


def test_output_key_never_tags_a_single_length_key() -> None:
    # payShield writes no tag for Z (or the untagged 0) on a key it returns; every other scheme keeps it.
    for scheme in ("", "0", "Z"):
        assert output_key(scheme, SINGLE) == SINGLE
    for scheme, hex_text in (("U", "1" * 32), ("X", "2" * 32), ("T", "3" * 48), ("Y", "4" * 48)):
        assert output_key(scheme, hex_text) == scheme + hex_text


@pytest.mark.parametrize(
    ("code", "field", "body"),
    [
        ("FA", "zpk_zmk", f"{ZMK_U}{{key}};ZZ1"),
        ("A6", "key_zmk", f"402{ZMK_U}{{key}}Z"),
        ("A8", "key_lmk", f"402{ZMK_U}{{key}}Z"),
        ("CC", "source_zpk", f"{{key}}{ZPK_A}12{'0' * 16}0101{'1' * 12}"),
    ],
)
def test_single_length_input_key_with_or_without_z(code: str, field: str, body: str) -> None:
    """Both input forms parse to the key as given, and format back unchanged (a request may say Z)."""
    for key in (SINGLE, "Z" + SINGLE, SINGLE.lower()):
        wire = body.format(key=key).encode()
        v = parse(COMMANDS[code].request, wire).values
        assert v[field] == key.upper()
        assert format_fields(COMMANDS[code].request, v) == wire.upper()


@pytest.mark.parametrize(
    ("code", "request_body", "response_body", "keys"),
    [
        ("FA", f"{ZMK_U}Z{SINGLE};ZZ1", f"{SINGLE}D5D44F", {"zpk_lmk": SINGLE, "kcv": "D5D44F"}),
        ("FA", f"{ZMK_U}Z{SINGLE};ZZ0", f"{SINGLE}D5D44FF720683D0D", {"kcv": "D5D44FF720683D0D"}),
        ("A6", f"402{ZMK_U}Z{SINGLE}Z", f"{SINGLE}D5D44F", {"key_lmk": SINGLE}),
        ("A8", f"402{ZMK_U}{SINGLE}Z", f"{SINGLE}D5D44F", {"key_zmk": SINGLE}),
        ("A0", "0001Z", f"{SINGLE}D5D44F", {"key_lmk": SINGLE, "kcv": "D5D44F"}),
        ("A0", f"1001Z;0{ZMK_U}Z", f"{SINGLE}{'1' * 16}D5D44F", {"key_lmk": SINGLE, "key_zmk": "1" * 16}),
        ("A0", f"1001U;0{ZMK_U}X", f"U{'2' * 32}X{'3' * 32}D5D44F", {"key_zmk": "X" + "3" * 32}),
    ],
)
def test_responses_carry_single_length_keys_bare(
    code: str, request_body: str, response_body: str, keys: dict[str, str]
) -> None:
    """Response layouts read a bare 16-hex key (no Z) and write it back byte for byte."""
    spec = COMMANDS[code]
    req = parse(spec.request, request_body.encode()).values
    v = parse(spec.response, response_body.encode(), req).values
    for name, value in keys.items():
        assert v[name] == value
    assert format_fields(spec.response, v, req) == response_body.encode()
