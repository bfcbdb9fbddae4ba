"""Arbitrary request bodies for every command: the emulator answers a payShield code, never 41."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.app import build_state
from emulator.hsm import EmulatorHsm
from protocols.hostcmd.envelope import response_code
from protocols.hostcmd.table import COMMANDS

HSM = EmulatorHsm(build_state())
_alphabet = st.sampled_from(list(b"0123456789ABCDEFUTXYZSR;%#&\x19"))


@settings(max_examples=600, deadline=None)
@given(
    code=st.sampled_from(sorted(COMMANDS)),
    body=st.one_of(st.binary(max_size=200), st.lists(_alphabet, max_size=200).map(bytes)),
)
def test_any_body_gets_a_well_formed_answer(code: str, body: bytes) -> None:
    resp = HSM.handle(b"HDR1" + code.encode() + body)
    assert resp is not None
    assert resp[:4] == b"HDR1"
    assert resp[4:6] == response_code(code).encode()
    assert resp[6:8].isalnum() and resp[6:8] != b"41"
