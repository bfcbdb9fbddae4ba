"""Arbitrary bytes and split points into the framer and codec: only codec errors come out."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.framing import FrameError, Framer, encode_frame
from protocols.hostcmd.envelope import EnvelopeError, split_request
from protocols.hostcmd.fields import ParseError, parse
from protocols.hostcmd.table import COMMANDS

CODES = sorted(COMMANDS)


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8), cuts=st.lists(st.integers(0, 4000), max_size=10)
)
def test_framer_returns_exactly_what_was_framed(payloads: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_frame(p) for p in payloads)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    framer = Framer(1000)
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out += framer.feed(wire[a:b])
    assert out == payloads
    assert framer.buffered == 0


@given(st.binary(max_size=600), st.integers(0, 600))
def test_framer_on_garbage_raises_only_frame_error(data: bytes, cut: int) -> None:
    framer = Framer(256)
    try:
        framer.feed(data[:cut])
        framer.feed(data[cut:])
    except FrameError:
        pass


@settings(max_examples=400)
@given(code=st.sampled_from(CODES), body=st.binary(max_size=400), header=st.integers(0, 8))
def test_codec_on_garbage_raises_only_parse_error(code: str, body: bytes, header: int) -> None:
    payload = b"H" * header + code.encode() + body
    try:
        req = split_request(payload, header)
        parse(COMMANDS[req.code].request, req.body)
    except (ParseError, EnvelopeError):
        pass


_text = st.text(alphabet="0123456789ABCDEFUTXYZSR;%#&", max_size=200)


@settings(max_examples=400)
@given(code=st.sampled_from(CODES), body=_text)
def test_codec_on_plausible_text_raises_only_parse_error(code: str, body: str) -> None:
    try:
        parse(COMMANDS[code].request, body.encode())
    except ParseError as exc:
        assert len(exc.code) == 2
