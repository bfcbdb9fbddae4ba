"""Open-loop load for chaos tests: mixed host commands at a fixed rate over pipelined connections.

Every request kind has an expected response computed by the emulator (the independent reference);
a few are also pinned to VECTORS.md values. A response is *wrong* when it differs from the expected
bytes, *lost* when it never arrives.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import psec

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.lmk import TEST_LMK, adjust_parity, encrypt_key_under_lmk
from protocols.framing import Framer, encode_frame
from tests.integration.conftest import HsmClient, running_emulator

HEADER = b"0000"
ACCOUNT = "4012345678909"


def _enc(key: bytes, block: bytes) -> bytes:
    with legacy_tdes():
        return bytes(psec.des.encrypt_tdes_ecb(key, block))


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def mixed_requests() -> dict[bytes, bytes]:
    """Request -> expected response (without header): CC (several key pairs), NC, CW, M6, M8, B2."""
    requests: list[bytes] = [b"NC", b"B20005hello"]
    for i in range(6):  # several ZPK pairs, so key affinity spreads them over the nodes
        zpk_a = adjust_parity(bytes([0x10 + i] * 8 + [0x20 + i] * 8))
        zpk_b = adjust_parity(bytes([0x30 + i] * 8 + [0x40 + i] * 8))
        za = encrypt_key_under_lmk(TEST_LMK, "001", "U", zpk_a).encode()
        zb = encrypt_key_under_lmk(TEST_LMK, "001", "X", zpk_b).encode()
        block = _enc(zpk_a, psec.pinblock.encode_pinblock_iso_0(f"{1234 + i}", ACCOUNT)).hex().upper()
        requests.append(b"CC" + za + zb + b"12" + block.encode() + b"0101" + ACCOUNT[-13:-1].encode())
    cvk = encrypt_key_under_lmk(TEST_LMK, "402", "U", bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"))
    requests.append(b"CW" + cvk.encode() + b"4123456789012345;8701101")
    txn = bytes.fromhex("042666B49184CFA368DE9628D0397BC9")
    mac_key = adjust_parity(_xor(txn, bytes.fromhex("000000000000FF00000000000000FF00")))
    tak = encrypt_key_under_lmk(TEST_LMK, "003", "U", mac_key).encode()
    requests.append(b"M602131003" + tak + b"0011" + b"4012345678909D987")
    requests.append(b"M802131003" + tak + b"0011" + b"4012345678909D987" + b"9CCC78173FC4FB65")  # wrong MAC
    with running_emulator() as emu:
        ref = HsmClient(emu.host, emu.port)
        try:
            expected = {r: ref.call(r) for r in requests}
        finally:
            ref.close()
    # Known answers (VECTORS.md sections 6 and 9), independent of the emulator.
    assert expected[requests[-3]] == b"CX00561"
    assert expected[requests[-2]] == b"M7009CCC78173FC4FB64"
    assert expected[requests[-1]] == b"M901"
    return expected


@dataclass
class LoadResult:
    """What a load run saw."""

    sent: int = 0
    answered: int = 0
    wrong: list[tuple[float, bytes, bytes]] = field(default_factory=list)  # (sent at, request[:2], answer)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (sent at, seconds)

    @property
    def lost(self) -> int:
        """Requests without a response."""
        return self.sent - self.answered

    def p99(self, start: float, end: float) -> float:
        """99th percentile latency (ms) of requests sent in [start, end)."""
        window = sorted(lat for at, lat in self.latencies if start <= at < end)
        if not window:
            return 0.0
        return 1000 * window[min(len(window) - 1, int(len(window) * 0.99))]


async def run_load(
    port: int,
    expected: dict[bytes, bytes],
    seconds: float,
    events: list[tuple[float, Callable[[], None]]],
    rate: int = 1000,
    connections: int = 8,
    tail: float = 5.0,
) -> LoadResult:
    """Send ``rate`` requests/s for ``seconds``, running ``events`` (offset, fn) along the way.

    Waits up to ``tail`` seconds after the last send for outstanding responses.
    """
    result = LoadResult()
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    pending: list[deque[tuple[float, bytes]]] = [deque() for _ in conns]
    kinds = itertools.cycle(sorted(expected))

    async def reader(i: int) -> None:
        framer = Framer()
        stream = conns[i][0]
        while True:
            data = await stream.read(65536)
            if not data:
                return
            for frame in framer.feed(data):
                sent_at, request = pending[i].popleft()
                now = time.monotonic()
                result.answered += 1
                result.latencies.append((sent_at, now - sent_at))
                if frame[len(HEADER) :] != expected[request]:
                    result.wrong.append((sent_at, request[:2], frame[len(HEADER) : len(HEADER) + 4]))

    readers = [asyncio.create_task(reader(i)) for i in range(len(conns))]
    start = time.monotonic()
    todo = sorted(events, key=lambda e: e[0])
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    n = 0
    try:
        while (elapsed := time.monotonic() - start) < seconds:
            while todo and todo[0][0] <= elapsed:
                todo.pop(0)[1]()
            due = int(elapsed / tick) + 1
            while n < due * per_tick:
                i = n % len(conns)
                request = next(kinds)
                pending[i].append((time.monotonic(), request))
                conns[i][1].write(encode_frame(HEADER + request))
                result.sent += 1
                n += 1
            await asyncio.sleep(tick / 2)
        for fn_at, fn in todo:  # events scheduled past the end still run
            del fn_at
            fn()
        end = time.monotonic() + tail
        while result.answered < result.sent and time.monotonic() < end:
            await asyncio.sleep(0.02)
    finally:
        for _, w in conns:
            w.close()
        for t in readers:
            t.cancel()
        outcomes = await asyncio.gather(*readers, return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, asyncio.CancelledError)]
    assert not failures, failures
    return result
