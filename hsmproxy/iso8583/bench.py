"""The ``iso`` scenario of ``hsmproxy bench``: 0200 with PIN + MAC translation in service mode.

Each request is an 0200 (ASCII spec, 2-byte binary framing) with a PAN, an ISO-0 PIN block under
the bench's incoming ZPK and an ISO 9797-1 algorithm 3 MAC under its incoming ZAK, acquirer ``32 =
000001``. A request counts as ok when the listener answers the translated 0200 (any other answer
counts as an error, by field 39). Requests are matched to answers by STAN per connection.

The bench keys are fixed public values under the public test variant LMK, for test setups only:
``python -m hsmproxy.iso8583.bench install-keys --config config.toml`` stores them in the
config's keystore as ``bench-zpk-in``, ``bench-zpk-out``, ``bench-zak-in``, ``bench-zak-out``
(tenant ``default``); the listener then needs this route::

    [[iso8583.routes]]
    name = "bench"
    acquirer = "000001"
    pin_in = "bench-zpk-in"
    pin_out = "bench-zpk-out"
    mac_in = "bench-zak-in"
    mac_out = "bench-zak-out"
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from datetime import UTC, datetime
from typing import Any

import iso8583
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from hsmproxy.bench import BenchResult, LoadState, drive, finish
from hsmproxy.iso8583.codec import load_spec
from protocols.framing import Framer, encode_frame

#: Public bench keys (clear, test setups only): name -> (key type, type code, LMK pair index, clear).
BENCH_KEYS: dict[str, tuple[str, str, int, bytes]] = {
    "bench-zpk-in": ("ZPK", "001", 3, bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")),
    "bench-zpk-out": ("ZPK", "001", 3, bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")),
    "bench-zak-in": ("ZAK", "008", 13, bytes.fromhex("F1F1F1F1F1F1F1F1E0E0E0E0E0E0E0E0")),
    "bench-zak-out": ("ZAK", "008", 13, bytes.fromhex("A7A7A7A7A7A7A7A7B6B6B6B6B6B6B6B6")),
}
ACQUIRER = "000001"


def _ecb(key: bytes, data: bytes) -> bytes:
    k = key + key[:8] if len(key) == 16 else key * 3 if len(key) == 8 else key
    enc = Cipher(TripleDES(k), modes.ECB()).encryptor()
    return enc.update(data) + enc.finalize()


def _under_test_lmk(pair_index: int, clear: bytes) -> str:
    """``clear`` (double length) under the public test variant LMK, scheme U, key-type variant 0."""
    from hsmproxy.keys.lmk import TEST_VARIANT_LMK

    pair = bytes.fromhex(TEST_VARIANT_LMK[pair_index])
    out = b""
    for half, v in enumerate((0xA6, 0x5A)):
        lmk = bytearray(pair)
        lmk[8] ^= v
        out += _ecb(bytes(lmk), clear[8 * half : 8 * half + 8])
    return "U" + out.hex().upper()


def _retail_mac(key: bytes, data: bytes) -> bytes:
    """ISO 9797-1 algorithm 3, padding method 1."""
    data += bytes(-len(data) % 8) if data else bytes(8)
    state = bytes(8)
    left, right = key[:8], key[8:]
    for i in range(0, len(data), 8):
        state = _ecb(left, bytes(a ^ b for a, b in zip(state, data[i : i + 8], strict=True)))
    dec = Cipher(TripleDES(right * 3), modes.ECB()).decryptor()
    state = dec.update(state) + dec.finalize()
    return _ecb(left, state)


def install_keys(store: Any, tenant: str = "default", lmk_id: str = "00") -> list[str]:
    """Store the bench keys (version 1, active) in ``store``; the names created (existing ones kept)."""
    from hsmproxy.keys.store import KeyExists, KeyRecord, KeyState

    now = datetime.now(UTC)
    created = []
    for name, (key_type, code, pair, clear) in BENCH_KEYS.items():
        record = KeyRecord(
            tenant=tenant, name=name, version=1, key_type=key_type, type_code=code, lmk_id=lmk_id,
            cryptogram=_under_test_lmk(pair, clear), kcv=_ecb(clear, bytes(8)).hex().upper()[:6],
            state=KeyState.ACTIVE, activation_date=now, expiry_date=None, grace_until=None, rotate_every=None,
            grace_period=None, created_at=now, updated_at=now, created_by="bench",
        )  # fmt: skip
        try:
            store.create(record, actor="bench", reason="bench keys (public test values)")
        except KeyExists:
            continue
        created.append(name)
    return created


def build_requests(count: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """``count`` (STAN, encoded 0200) pairs with distinct STANs."""
    spec = load_spec("ascii")
    rng = random.Random(seed)
    zpk, zak = BENCH_KEYS["bench-zpk-in"][3], BENCH_KEYS["bench-zak-in"][3]
    out = []
    for i in range(count):
        pan = "4" + "".join(rng.choice("0123456789") for _ in range(15))
        pin = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 6)))
        clear = bytes.fromhex(f"0{len(pin):X}{pin}".ljust(16, "F"))
        block = bytes(a ^ b for a, b in zip(clear, bytes.fromhex("0000" + pan[-13:-1]), strict=True))
        stan = f"{i + 1:06d}"
        doc = {
            "t": "0200", "2": pan, "3": "000000", "4": "000000001000", "7": "1127020000", "11": stan,
            "22": "051", "32": ACQUIRER, "37": f"BENCH{stan}0", "41": "BENCH001", "49": "978",
            "52": _ecb(zpk, block).hex().upper(), "64": "0" * 16,
        }  # fmt: skip
        raw = bytes(iso8583.encode(doc, spec)[0])
        out.append((stan, raw[:-16] + _retail_mac(zak, raw[:-16]).hex().upper().encode()))
    return out


class _Conn(asyncio.Protocol):
    def __init__(self, on_response: Any) -> None:
        self.framer = Framer(9999)
        self.on_response = on_response
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for frame in self.framer.feed(data):
            self.on_response(frame)


async def run_iso_bench(
    host: str,
    port: int,
    connections: int = 8,
    depth: int = 1,
    rate: float = 0.0,
    duration: float = 10.0,
    warmup: float = 1.0,
) -> BenchResult:
    """One measurement of the ``iso`` scenario (closed loop, or open loop at ``rate``)."""
    spec = load_spec("ascii")
    requests = build_requests(4096)
    loop = asyncio.get_running_loop()
    result = BenchResult(
        f"{host}:{port}", "iso", "open" if rate else "closed", connections, depth, rate, duration
    )
    latencies: list[float] = []
    state = LoadState()
    conns: list[_Conn] = []
    pending: list[dict[str, float]] = [{} for _ in range(connections)]

    def send(ci: int, intended: float | None = None) -> None:
        conn = conns[ci]
        if conn.transport is None or conn.transport.is_closing():
            return
        stan, raw = requests[state.next % len(requests)]
        state.next += 1
        pending[ci][stan] = intended if intended is not None else time.perf_counter()
        conn.transport.write(encode_frame(raw))
        if state.measuring:
            result.sent += 1

    def handler(ci: int) -> Any:
        def on_response(frame: bytes) -> None:
            now = time.perf_counter()
            try:
                fields = iso8583.decode(frame, spec)[0]
            except Exception:
                fields = {"39": "??"}
            started = pending[ci].pop(fields.get("11", ""), None)
            if state.measuring and started is not None:
                if fields.get("t") == "0200":
                    result.ok += 1
                    latencies.append(now - started)
                else:
                    code = fields.get("39", "??")
                    result.errors += 1
                    result.error_codes[code] = result.error_codes.get(code, 0) + 1
            if not rate and now < state.stop_at:
                send(ci)

        return on_response

    for ci in range(connections):
        on_response = handler(ci)

        def factory(h: Any = on_response) -> _Conn:
            return _Conn(h)

        _, proto = await loop.create_connection(factory, host, port)
        conns.append(proto)
    duration = await drive(send, state, latencies, connections, depth, rate, duration, warmup)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return finish(result, latencies, duration)


def main(argv: list[str] | None = None) -> int:
    """``python -m hsmproxy.iso8583.bench install-keys --config PATH``."""
    parser = argparse.ArgumentParser(prog="python -m hsmproxy.iso8583.bench")
    parser.add_argument("action", choices=("install-keys",))
    parser.add_argument("--config", default="config.toml")
    parser.add_argument("--tenant", default="default")
    args = parser.parse_args(argv)
    from hsmproxy.config import load_settings
    from hsmproxy.keys.cli import keystore_url
    from hsmproxy.keys.store import KeyStore

    settings = load_settings(args.config)
    store = KeyStore.open(keystore_url(settings))
    try:
        created = install_keys(store, args.tenant, settings.tenants[args.tenant].default_lmk)
    finally:
        store.close()
    print(f"bench keys created: {', '.join(created) or 'none (already there)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
