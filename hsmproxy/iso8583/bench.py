"""The ``iso`` scenario of ``hsmproxy bench``: 0200 with PIN + MAC translation in service mode.

Each request is an 0200 (ASCII spec, 2-byte binary framing) with a PAN, an ISO-0 PIN block under
the bench's incoming ZPK and an ISO 9797-1 algorithm 3 MAC under its incoming ZAK, acquirer ``32 =
000001``. A request counts as ok when the listener answers the translated 0200 (any other answer
counts as an error, by field 39). Requests are matched to answers by STAN per connection (a STAN
still in flight on that connection is skipped over). The scenario runs on :mod:`hsmproxy.bench`'s
engine, so batched open-loop writes, ``offered`` / ``unanswered`` / ``resets``, ``--processes``,
``--timeline`` and ``--then-rate`` work as for host commands (``--idle`` does not: it holds
host-command connections).

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
import random
import sys
from datetime import UTC, datetime
from typing import Any

import iso8583

from emulator.crypto.cipher import tdes_ecb_encrypt
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk, kcv_tdes
from emulator.crypto.mac import retail_mac
from hsmproxy.bench import BenchResult, LoadConnection, LoadRun, clock, run_bench
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


class IsoWire:
    """The ``iso`` scenario's wire: pre-framed 0200s, matched to answers by STAN per connection.

    An answer is ok when it is the translated 0200 (checked on the MTI bytes; its STAN is found by
    walking the spec's fields 2-10 over the bitmap, no decoding); any other answer is decoded for
    its STAN and field 39.
    """

    def __init__(self, requests: list[tuple[str, bytes]], spec_name: str = "ascii") -> None:
        self.spec = load_spec(spec_name)
        self.stans = [stan.encode() for stan, _ in requests]
        self.frames = [encode_frame(raw) for _, raw in requests]
        self.path = stan_path(self.spec)

    def connection(self, run: LoadRun, index: int) -> LoadConnection:
        """A connection of ``run`` (``index`` in the whole run) sending these 0200s."""
        return IsoConnection(run, index, self)

    def match(self, message: bytes) -> tuple[bytes | None, str | None]:
        """(STAN, None) for the translated 0200, (STAN, field 39) for any other answer."""
        if message[:4] == b"0200" and self.path is not None:
            return stan_at(message, self.path), None
        try:
            fields = iso8583.decode(message, self.spec)[0]
        except Exception:
            return None, "??"
        stan = fields.get("11")
        return (stan.encode() if stan else None), (
            None if fields.get("t") == "0200" else fields.get("39", "??")
        )


def stan_path(spec: Any) -> tuple[tuple[int, int], ...] | None:
    """Per field 2..10 of ``spec``: (fixed length, length digits), to find field 11 without decoding;
    None when the spec is not ASCII with a hex bitmap and a 6-digit field 11."""

    def ascii_field(key: str) -> dict[str, Any]:
        f: dict[str, Any] = spec.get(key, {})
        return f if f.get("data_enc") == "ascii" and f.get("len_enc") == "ascii" else {}

    if spec.get("h", {}).get("max_len", 0) or ascii_field("t").get("max_len") != 4:
        return None
    if ascii_field("p").get("max_len") != 16 or ascii_field("1").get("max_len") != 16:
        return None
    if ascii_field("11").get("len_type") != 0 or ascii_field("11").get("max_len") != 6:
        return None
    path = []
    for key in map(str, range(2, 11)):
        f = ascii_field(key)
        if not f:
            return None
        digits = int(f["len_type"])
        path.append((0 if digits else int(f["max_len"]), digits))
    return tuple(path)


def stan_at(message: bytes, path: tuple[tuple[int, int], ...]) -> bytes | None:
    """Field 11 of an ASCII ``message`` laid out by ``path`` (see ``stan_path``); None when absent."""
    try:
        bitmap = int(message[4:20], 16)
        pos = 36 if bitmap >> 63 else 20  # a secondary bitmap follows the primary
        for number, (fixed, digits) in enumerate(path, start=2):
            if bitmap >> (64 - number) & 1:
                pos += fixed or digits + int(message[pos : pos + digits])
    except ValueError:
        return None
    if not bitmap >> 53 & 1:
        return None
    return message[pos : pos + 6]


class IsoConnection(LoadConnection):
    """One ISO 8583 connection: 0200s written in batches, answers matched by STAN."""

    def __init__(self, run: LoadRun, index: int, wire: IsoWire) -> None:
        super().__init__(run, index)
        self.wire = wire
        self.cursor = index * len(wire.frames) // max(1, run.plan.connections)

    def write_batch(self, base: float, rate: float, n0: int, stride: int, count: int) -> list[float]:
        """Write the requests in one write (the next request whose STAN is not in flight each time)."""
        transport = self.transport
        skipped: list[float] = []
        if transport is None or self.lost or transport.is_closing():
            return [base + (n0 + i * stride) / rate for i in range(count)]
        wire, pending, parts = self.wire, self.pending, list[bytes]()
        size = len(wire.frames)
        for i in range(count):
            t = base + (n0 + i * stride) / rate
            if len(pending) >= size:
                skipped.append(t)
                continue
            while wire.stans[self.cursor] in pending:
                self.cursor = (self.cursor + 1) % size
            pending[wire.stans[self.cursor]] = t
            parts.append(wire.frames[self.cursor])
            self.cursor = (self.cursor + 1) % size
        if parts:
            transport.write(b"".join(parts))
        return skipped

    def data_received(self, data: bytes) -> None:
        now = clock()
        if self.rest:
            data = self.rest + data
        size, pos, matched = len(data), 0, 0
        while size - pos >= 2:
            end = pos + 2 + ((data[pos] << 8) | data[pos + 1])
            if end > size:
                break
            stan, code = self.wire.match(data[pos + 2 : end])
            pos = end
            if stan is None:
                self.run.tally.unmatched += 1
            else:
                matched += self.record_answer(stan, code, now)
        self.rest = data[pos:] if pos < size else b""
        self.answered(matched, now)


def iso_wire() -> IsoWire:
    """The ``iso`` scenario's wire: 4,096 distinct 0200s."""
    return IsoWire(build_requests(4096))


async def run_iso_bench(
    host: str,
    port: int,
    connections: int = 8,
    depth: int = 1,
    rate: float = 0.0,
    duration: float = 10.0,
    warmup: float = 1.0,
    **options: Any,
) -> BenchResult:
    """One measurement of the ``iso`` scenario (closed loop, or open loop at ``rate``); ``options``
    are :func:`hsmproxy.bench.run_bench`'s (processes, then_rate, timeline ...)."""
    return await run_bench(host, port, "iso", connections, depth, rate, duration, warmup=warmup, **options)


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
