"""The bench's CC requests are valid commands: the emulator (reference crypto) answers each with 00,
and an open-loop run against it matches every answer to its request."""

from __future__ import annotations

import asyncio

import pytest

from emulator.crypto.cipher import tdes_ecb_decrypt
from emulator.crypto.lmk import TEST_LMK, decrypt_key_under_lmk
from hsmproxy.bench import build_requests, run_bench
from tests.integration.conftest import HsmClient, RunningEmulator


@pytest.mark.parametrize("keys", ["hot", "cold"])
def test_bench_cc_requests_translate_on_the_emulator(emulator: RunningEmulator, keys: str) -> None:
    requests = build_requests("CC", 20, keys)
    if keys == "cold":
        assert len({r[2:35] for r in requests}) == 20  # a new source key each time
    client = HsmClient(*emulator.address)
    try:
        for request in requests:
            answer = client.call(request)
            assert answer[:4] == b"CD00", answer
            # the translated block under the destination key holds the PIN the request encrypted
            src = decrypt_key_under_lmk(TEST_LMK, "001", request[2:35].decode())
            dst = decrypt_key_under_lmk(TEST_LMK, "001", request[35:68].decode())
            block_in = tdes_ecb_decrypt(src, bytes.fromhex(request[70:86].decode()))
            block_out = tdes_ecb_decrypt(dst, bytes.fromhex(answer[6:22].decode()))
            assert block_in == block_out  # ISO-0 in and out, same account
    finally:
        client.close()


def test_open_loop_run_on_the_emulator_answers_every_request_ok(emulator: RunningEmulator) -> None:
    host, port = emulator.address
    r = asyncio.run(run_bench(host, port, "CC", 2, rate=200, duration=0.5, warmup=0.1, grace=10.0))
    assert (r.offered, r.ok, r.errors, r.unanswered) == (100, 100, 0, 0)
    assert (r.skipped, r.resets, r.unmatched) == (0, 0, 0)
    assert 0 < r.p50_ms <= r.p99_ms <= r.max_ms
