"""10,000 random frames at the emulator while a second client's commands keep succeeding."""

from __future__ import annotations

import random
import socket
import threading

from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk
from protocols.framing import encode_frame
from protocols.hostcmd.table import COMMANDS
from tests.integration.conftest import HsmClient, RunningEmulator

CVK = encrypt_key_under_lmk(TEST_LMK, "402", "U", bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")).encode()
GOOD = b"CW" + CVK + b"4123456789012345;8701101"  # Visa CVV 561 (VECTORS.md section 6)


def _random_frame(rng: random.Random) -> bytes:
    kind = rng.random()
    code = (
        rng.choice(sorted(COMMANDS)).encode() if kind < 0.7 else bytes(rng.randrange(256) for _ in range(2))
    )
    body_len = rng.choice((0, 1, 5, 20, 60, 200))
    alphabet = b"0123456789ABCDEFUTXYZSR;%#&\x19" if kind < 0.5 else bytes(range(256))
    body = bytes(rng.choice(alphabet) for _ in range(body_len))
    return encode_frame(b"FUZZ" + code + body)


def _fuzzer(host: str, port: int, seed: int, count: int, sent: list[int]) -> None:
    rng = random.Random(seed)
    sock = socket.create_connection((host, port), timeout=10)
    try:
        pending = bytearray()
        for _ in range(count):
            pending += _random_frame(rng)
            sent[0] += 1
            if len(pending) > 4096:
                cut = rng.randrange(1, len(pending))  # arbitrary split points
                sock.sendall(bytes(pending[:cut]))
                sock.sendall(bytes(pending[cut:]))
                pending.clear()
                sock.setblocking(False)
                try:
                    while sock.recv(1 << 16):
                        pass
                except (BlockingIOError, ConnectionError):
                    pass
                sock.setblocking(True)
        sock.sendall(bytes(pending))
    except (ConnectionError, OSError):
        pass  # a frame over the limit closes the fuzzer's own connection: expected
    finally:
        sock.close()


def test_random_frames_do_not_disturb_another_client(emulator: RunningEmulator) -> None:
    sent = [0]
    fuzz_threads = [
        threading.Thread(target=_fuzzer, args=(emulator.host, emulator.port, seed, 2500, sent))
        for seed in range(4)
    ]
    good = HsmClient(emulator.host, emulator.port)
    try:
        for t in fuzz_threads:
            t.start()
        answers = 0
        while any(t.is_alive() for t in fuzz_threads) or answers < 50:
            assert good.call(GOOD) == b"CX00561"
            answers += 1
        for t in fuzz_threads:
            t.join(60)
        assert sent[0] == 10_000
        assert good.call(GOOD) == b"CX00561"
    finally:
        good.close()
