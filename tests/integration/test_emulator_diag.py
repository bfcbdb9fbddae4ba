"""Live emulator: diagnostics, echo, hash, unknown commands, trailers, broken frames."""

from __future__ import annotations

import hashlib

from tests.integration.conftest import HsmClient, RunningEmulator


def test_nc_reports_test_lmk_check_value(client: HsmClient) -> None:
    # LMK check value = TDES-ECB of 8 zero bytes under pair 00-01 of the test LMK,
    # 0101010101010101 7902CD1FD36EF8BA (computed with cryptography: 7D22274C5745C5A1).
    assert client.call(b"NC") == b"ND00" + b"7D22274C5745C5A1" + b"1000-E000"
    assert client.call(b"NC%13") == b"ND13"


def test_echo_and_trailer(client: HsmClient) -> None:
    assert client.call(b"B20005hello") == b"B300hello"
    assert client.call(b"B20002hi\x19TRAIL") == b"B300hi\x19TRAIL"


def test_gm_sha256(client: HsmClient) -> None:
    resp = client.call(b"GM0600003abc")
    assert resp == b"GN00" + hashlib.sha256(b"abc").digest()


def test_unknown_command_answers_68_and_connection_stays(client: HsmClient) -> None:
    assert client.call(b"ZZ") == b"ZA68"
    assert client.call(b"Q1whatever") == b"Q268"
    assert client.call(b"B20001x") == b"B300x"


def test_bad_field_answers_error_code(client: HsmClient) -> None:
    assert client.call(b"B20009short") == b"B380"
    assert client.call(b"GM9900003abc") == b"GN15"


def test_short_frame_closes_only_that_connection(emulator: RunningEmulator) -> None:
    bad = HsmClient(emulator.host, emulator.port)
    good = HsmClient(emulator.host, emulator.port)
    try:
        bad.send_raw(b"\x00\x03000")  # shorter than header + command code
        try:
            bad.recv()
            raise AssertionError("expected the connection to close")
        except ConnectionError:
            pass
        assert good.call(b"B20002ok") == b"B300ok"
    finally:
        bad.close()
        good.close()


def test_pipelined_requests_answer_in_order(emulator: RunningEmulator) -> None:
    from protocols.framing import encode_frame

    c = HsmClient(emulator.host, emulator.port)
    try:
        wire = b"".join(encode_frame(b"%04d" % i + b"B20004" + b"%04d" % i) for i in range(50))
        c.send_raw(wire)
        for i in range(50):
            resp = c.recv()
            assert resp == b"%04d" % i + b"B300" + b"%04d" % i
    finally:
        c.close()
