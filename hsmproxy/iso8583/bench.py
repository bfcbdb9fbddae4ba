"""The ``iso`` scenario of ``hsmproxy bench``: 0200 with PIN + MAC translation in service mode.

Each request is an 0200 (ASCII spec, 2-byte binary framing) with a PAN, an ISO-0 PIN block under
the bench's incoming ZPK and an ISO 9797-1 algorithm 3 MAC under its incoming ZAK, acquirer ``32 =
000001``. A request counts as ok when the listener answers the translated 0200 (any other answer
counts as an error, by field 39). Requests are matched to answers by STAN per connection.

The bench keys are fixed public values under the public test variant LMK (encrypted, and the requests
built, with the emulator's reference crypto), for test setups only:
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

from emulator.crypto.cipher import tdes_ecb_encrypt
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk, kcv_tdes
from emulator.crypto.mac import retail_mac
from hsmproxy.bench import BenchConnection, BenchResult, LoadState, drive, finish
from hsmproxy.iso8583.codec import load_spec
from protocols.framing import encode_frame

#: Public bench keys (clear, test setups only): name -> (key type, type code, clear).
BENCH_KEYS: dict[str, tuple[str, str, bytes]] = {
    "bench-zpk-in": ("ZPK", "001", bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")),
    "bench-zpk-out": ("ZPK", "001", bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")),
    "bench-zak-in": ("ZAK", "008", bytes.fromhex("F1F1F1F1F1F1F1F1E0E0E0E0E0E0E0E0")),
    "bench-zak-out": ("ZAK", "008", bytes.fromhex("A7A7A7A7A7A7A7A7B6B6B6B6B6B6B6B6")),
}
ACQUIRER = "000001"


def install_keys(store: Any, tenant: str = "default", lmk_id: str = "00") -> list[str]:
    """Store the bench keys (version 1, active) in ``store``; the names created (existing ones kept)."""
    from hsmproxy.keys.store import KeyExists, KeyRecord, KeyState

    now = datetime.now(UTC)
    created = []
    for name, (key_type, code, clear) in BENCH_KEYS.items():
        record = KeyRecord(
            tenant=tenant, name=name, version=1, key_type=key_type, type_code=code, lmk_id=lmk_id,
            cryptogram=encrypt_key_under_lmk(TEST_LMK, code, "U", clear),
            kcv=kcv_tdes(clear).hex().upper()[:6],
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
    zpk, zak = BENCH_KEYS["bench-zpk-in"][2], BENCH_KEYS["bench-zak-in"][2]
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
            "52": tdes_ecb_encrypt(zpk, block).hex().upper(), "64": "0" * 16,
        }  # fmt: skip
        raw = bytes(iso8583.encode(doc, spec)[0])
        out.append((stan, raw[:-16] + retail_mac(zak, raw[:-16]).hex().upper().encode()))
    return out


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
    conns: list[BenchConnection] = []
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

        def factory(h: Any = on_response) -> BenchConnection:
            return BenchConnection(h)

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
