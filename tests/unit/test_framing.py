"""Framer and envelope: split reads, coalesced reads, limits."""

from __future__ import annotations

import pytest

from protocols.framing import FrameError, Framer, encode_frame
from protocols.hostcmd.envelope import (
    EnvelopeError,
    build_response,
    response_code,
    split_request,
    split_response,
)


def test_one_frame_split_over_every_byte() -> None:
    payload = b"0001NC"
    wire = encode_frame(payload)
    assert wire == b"\x00\x060001NC"
    framer = Framer()
    got: list[bytes] = []
    for b in wire:
        got += framer.feed(bytes([b]))
    assert got == [payload]
    assert framer.buffered == 0


def test_several_frames_in_one_read_and_a_partial_tail() -> None:
    wire = encode_frame(b"AAAANC") + encode_frame(b"BBBBNO00") + encode_frame(b"CCCCB2")[:3]
    framer = Framer()
    assert framer.feed(wire) == [b"AAAANC", b"BBBBNO00"]
    assert framer.buffered == 3
    assert framer.feed(b"CCCB2") == [b"CCCCB2"]


def test_zero_length_frame_is_a_frame() -> None:
    assert Framer().feed(b"\x00\x00") == [b""]


def test_over_limit_raises() -> None:
    framer = Framer(max_frame=100)
    with pytest.raises(FrameError):
        framer.feed(b"\x00\x65" + b"x" * 101)


def test_ascii4_prefix() -> None:
    framer = Framer(prefix="ascii4")
    assert encode_frame(b"0800", "ascii4") == b"00040800"
    assert framer.feed(b"0004080") == []
    assert framer.feed(b"0") == [b"0800"]
    with pytest.raises(FrameError):
        Framer(prefix="ascii4").feed(b"00x4")


def test_bad_framer_settings() -> None:
    with pytest.raises(ValueError):
        Framer(max_frame=0)
    with pytest.raises(ValueError):
        Framer(max_frame=10_000, prefix="ascii4")
    with pytest.raises(ValueError):
        encode_frame(b"x" * 70_000)


def test_envelope_split_and_response() -> None:
    req = split_request(b"HDR1CC" + b"data\x19TR", 4)
    assert (req.header, req.code, req.body) == (b"HDR1", "CC", b"data\x19TR")
    assert build_response(b"HDR1", "CC", "00", b"12", b"\x19TR") == b"HDR1CD0012\x19TR"
    resp = split_response(b"HDR1CD0012", 4)
    assert (resp.code, resp.error, resp.body) == ("CD", "00", b"12")
    with pytest.raises(EnvelopeError):
        split_request(b"HDR1C", 4)
    with pytest.raises(EnvelopeError):
        split_response(b"HDR1CD0", 4)


@pytest.mark.parametrize(
    ("cmd", "resp"), [("CC", "CD"), ("NC", "ND"), ("A0", "A1"), ("EI", "EJ"), ("XZ", "XA"), ("G0", "G1")]
)
def test_response_codes(cmd: str, resp: str) -> None:
    assert response_code(cmd) == resp


def test_zero_header_length() -> None:
    req = split_request(b"NC", 0)
    assert (req.header, req.code, req.body) == (b"", "NC", b"")
