"""ISO 8583 gateway end to end: a fake acquirer and a fake issuer host over real TCP on loopback.

Two SoftHSM2 nodes with the test LMKs, a SQLite keystore holding named keys whose clear values the
test knows (made under the public test LMK), and three ISO 8583 listeners: service mode, inline
mode to a fake issuer, inline mode to a closed port. Everything cryptographic is checked
independently: PIN blocks with psec (ISO-0/ISO-3) and the emulator's DUKPT, MACs with psec
(ISO 9797-1 algorithms 1 and 3) and ``cryptography`` (CMAC).
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import iso8583
import psec
import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.cmac import CMAC

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.dukpt import tdes_working_key
from emulator.crypto.lmk import TEST_LMK, decrypt_key_under_lmk, encrypt_key_under_lmk, kcv_tdes
from hsmproxy.config import load_settings
from hsmproxy.iso8583.codec import load_spec
from hsmproxy.keys.store import KeyRecord, KeyState, KeyStore
from tests.integration.proxy_env import RunningProxy, make_nodes, start_proxy

SPEC = load_spec("ascii")
ZPK_ACQ = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
ZPK_ISS = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
ZPK_WRONG = bytes.fromhex("1C1C1C1C1C1C1C1C2A2A2A2A2A2A2A2A")
ZPK_KX_OLD = bytes.fromhex("4C4C4C4C4C4C4C4C5B5B5B5B5B5B5B5B")
ZPK_KX_NEW = bytes.fromhex("6D6D6D6D6D6D6D6D7C7C7C7C7C7C7C7C")
ZAK_KX_OLD = bytes.fromhex("8A8A8A8A8A8A8A8A9B9B9B9B9B9B9B9B")
ZAK_KX_NEW = bytes.fromhex("C2C2C2C2C2C2C2C2D3D3D3D3D3D3D3D3")
ZAK_ACQ = bytes.fromhex("F1F1F1F1F1F1F1F1E0E0E0E0E0E0E0E0")
ZAK_ISS = bytes.fromhex("A7A7A7A7A7A7A7A7B6B6B6B6B6B6B6B6")
ZMK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
ZMK_ISS = bytes.fromhex("3D3D3D3D3D3D3D3D4F4F4F4F4F4F4F4F")
ZPK_ISS_KX_OLD = bytes.fromhex("5E5E5E5E5E5E5E5E6B6B6B6B6B6B6B6B")
ZPK_ISS_KX_NEW = bytes.fromhex("7A7A7A7A7A7A7A7A8F8F8F8F8F8F8F8F")
BDK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
PAN = "4012345678909"
TRACK2 = "4012345678909=29121010000000000000"


# -- crypto, computed independently ------------------------------------------------------------------


def tdes(key: bytes, data: bytes, decrypt: bool = False) -> bytes:
    """TDES-ECB (psec)."""
    with legacy_tdes():
        fn = psec.des.decrypt_tdes_ecb if decrypt else psec.des.encrypt_tdes_ecb
        return bytes(fn(key, data))


def iso0_block(key: bytes, pin: str, pan: str = PAN) -> str:
    """An ISO-0 PIN block under ``key``, hex."""
    return tdes(key, psec.pinblock.encode_pinblock_iso_0(pin, pan)).hex().upper()


def mac(key: bytes, data: bytes, algorithm: str) -> bytes:
    """ISO 9797-1 alg 1/3 (psec, padding 1) or TDES CMAC (cryptography): 8 bytes."""
    with legacy_tdes():
        if algorithm == "1":
            return bytes(psec.mac.generate_cbc_mac(key, data, 1))
        if algorithm == "3":
            return bytes(psec.mac.generate_retail_mac(key[:8], key[8:], data, 1))
        c = CMAC(TripleDES(key + key[:8]))
        c.update(data)
        return c.finalize()[:8]


def build(fields: dict[str, str], mac_key: bytes | None, algorithm: str = "3") -> bytes:
    """Encode (ASCII spec) and MAC in field 64 over everything before it."""
    doc = dict(fields)
    if mac_key is not None:
        doc["64"] = "0" * 16
    raw = bytes(iso8583.encode(doc, SPEC)[0])
    if mac_key is None:
        return raw
    return raw[:-16] + mac(mac_key, raw[:-16], algorithm).hex().upper().encode()


def mac_ok(raw: bytes, key: bytes, algorithm: str = "3") -> bool:
    """The field 64 at the end of ``raw`` is the MAC of what precedes it."""
    return raw[-16:] == mac(key, raw[:-16], algorithm).hex().upper().encode()


def decode(raw: bytes) -> dict[str, str]:
    """Decode a message with the ASCII spec."""
    return iso8583.decode(raw, SPEC)[0]


def record(
    name: str,
    type_code: str,
    key_type: str,
    clear: bytes,
    grace: timedelta | None = None,
    tenant: str = "default",
    scheme: str = "U",
) -> KeyRecord:
    """An active named key under the test LMK."""
    now = datetime.now(UTC)
    with legacy_tdes():
        kcv = kcv_tdes(clear).hex().upper()[:6]
    return KeyRecord(
        tenant=tenant, name=name, version=1, key_type=key_type, type_code=type_code, lmk_id="00",
        cryptogram=encrypt_key_under_lmk(TEST_LMK, type_code, scheme, clear), kcv=kcv, state=KeyState.ACTIVE,
        activation_date=now, expiry_date=None, grace_until=None, rotate_every=None, grace_period=grace,
        created_at=now, updated_at=now, created_by="test",
    )  # fmt: skip


# -- peers ---------------------------------------------------------------------------------------------


def _read(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


class Acquirer:
    """A switch connected to a listener: sends framed messages, reads framed answers."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)

    def send(self, raw: bytes) -> None:
        """Send one message."""
        self.sock.sendall(struct.pack(">H", len(raw)) + raw)

    def recv(self) -> bytes:
        """Read one message."""
        n = struct.unpack(">H", _read(self.sock, 2))[0]
        return _read(self.sock, n)

    def call(self, raw: bytes) -> bytes:
        """Send, then read the answer."""
        self.send(raw)
        return self.recv()

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


@dataclass
class Seen:
    """What the issuer saw of one request."""

    pin: str
    mac_ok: bool
    fields: dict[str, str]


class Issuer:
    """A fake issuer host: checks MACs (ZAK_ISS), decrypts PINs (ZPK_ISS), answers 0210 39=00 MACed."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.seen: list[Seen] = []
        self.silent: set[str] = set()  # STANs not answered
        self.bad_mac: set[str] = set()  # STANs answered with a wrong MAC
        self.pin_keys: dict[str, bytes] = {}  # acquirer (32) -> the issuer's ZPK (default ZPK_ISS)
        self.link_of: dict[str, socket.socket] = {}  # STAN -> the proxy link it came on
        self._conns: list[socket.socket] = []
        self.network: list[dict[str, str]] = []  # 0810s the proxy sent back
        self.accepted = 0
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self._conns.append(conn)
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                n = struct.unpack(">H", _read(conn, 2))[0]
                raw = _read(conn, n)
                fields = decode(raw)
                if fields["t"] == "0810":
                    self.network.append(fields)
                    continue
                pin = ""
                if "52" in fields:
                    zpk = self.pin_keys.get(fields.get("32", ""), ZPK_ISS)
                    clear = tdes(zpk, bytes.fromhex(fields["52"]), decrypt=True)
                    pin = psec.pinblock.decode_pinblock_iso_0(clear, PAN)
                self.seen.append(Seen(pin, mac_ok(raw, ZAK_ISS), fields))
                self.link_of[fields["11"]] = conn
                if fields["11"] in self.silent:
                    continue
                out = {k: v for k, v in fields.items() if k not in ("p", "1", "52", "64", "35")}
                out["t"], out["39"], out["38"] = "0210", "00", "AB1234"
                answer = build(out, ZAK_ISS)
                if fields["11"] in self.bad_mac:
                    answer = answer[:-1] + (b"0" if answer[-1:] != b"0" else b"1")
                conn.sendall(struct.pack(">H", len(answer)) + answer)
        except (ConnectionError, OSError, struct.error):
            return

    def send(self, raw: bytes, link_of: str = "") -> None:
        """Send a message to the proxy: on the link the request with STAN ``link_of`` came on, else on
        the newest."""
        conn = self.link_of[link_of] if link_of else self._conns[-1]
        conn.sendall(struct.pack(">H", len(raw)) + raw)

    def drop(self) -> None:
        """Close the connections (the proxy reconnects)."""
        for c in self._conns:
            c.shutdown(socket.SHUT_RDWR)
            c.close()
        self._conns.clear()

    def stop(self) -> None:
        """Stop accepting and close every connection."""
        self._stop = True
        self.server.close()
        for c in self._conns:
            c.close()


# -- environment -------------------------------------------------------------------------------------


@dataclass
class Env:
    """The running proxy, its keystore, the fake issuer and the listeners' ports."""

    rp: RunningProxy
    store: KeyStore
    issuer: Issuer
    ports: dict[str, int]


CONFIG = """
[keystore]
url = "sqlite:///{db}"
rotation_interval = 3600
refresh_interval = 0.2

[[listeners]]
name = "iso-svc"
protocol = "iso8583"
bind = "127.0.0.1:0"
mode = "service"

[[listeners]]
name = "iso-inline"
protocol = "iso8583"
bind = "127.0.0.1:0"
mode = "inline"
upstream = "127.0.0.1:{issuer}"
timeout = 5.0

[[listeners]]
name = "iso-slow"
protocol = "iso8583"
bind = "127.0.0.1:0"
mode = "inline"
upstream = "127.0.0.1:{issuer}"
timeout = 2.0

[[listeners]]
name = "iso-dead"
protocol = "iso8583"
bind = "127.0.0.1:0"
mode = "inline"
upstream = "127.0.0.1:{dead}"
timeout = 0.5
reconnect_max = 0.5

[[listeners]]
name = "iso-bcd"
protocol = "iso8583"
bind = "127.0.0.1:0"
mode = "service"
spec = "bcd"
framing = "ascii4"

[[tenants]]
name = "metered"
lmk_ids = ["00", "01"]
default_lmk = "00"
keyblock_lmk = "01"
max_connections = 2
rate = 0.1
burst = 2
rate_max_delay = 0

[[listeners]]
name = "iso-metered"
protocol = "iso8583"
bind = "127.0.0.1:0"
tenant = "metered"

[[iso8583.routes]]
name = "acq-service"
listener = "iso-svc"
acquirer = "111111"
pin_in = "zpk-acq"
pin_out = "zpk-iss"
pin_out_format = "iso3"
mac_in = "zak-acq"
mac_out = "zak-iss"
mac_algorithm = "3"

[[iso8583.routes]]
name = "acq-dukpt"
acquirer = "222222"
pin_in = "bdk-1"
dukpt = true
pin_out = "zpk-iss"
mac_in = "zak-acq"
mac_out = "zak-iss"
mac_algorithm = "cmac"

[[iso8583.routes]]
name = "acq-alg1"
acquirer = "333333"
mac_in = "zak-acq"
mac_out = "zak-iss"
mac_algorithm = "1"
mac_failure_code = "A0"

[[iso8583.routes]]
name = "acq-kx"
acquirer = "444444"
pin_in = "zpk-kx"
pin_out = "zpk-iss"
mac_in = "zak-kx"
mac_out = "zak-iss"
zmk = "zmk-acq"

[[iso8583.routes]]
name = "inline-kx"
listener = "iso-inline"
acquirer = "555555"
pin_in = "zpk-acq"
pin_out = "zpk-iss-kx"
mac_in = "zak-acq"
mac_out = "zak-iss"
zmk_out = "zmk-iss"

[[iso8583.routes]]
name = "acq-inline"
acquirer = "111111"
pin_in = "zpk-acq"
pin_out = "zpk-iss"
mac_in = "zak-acq"
mac_out = "zak-iss"
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """Nodes, keystore with the test's keys, the fake issuer, and a proxy with three ISO listeners."""
    root = tmp_path_factory.mktemp("iso8583")
    config = make_nodes(root)
    db = root / "keys.db"
    issuer = Issuer()
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    with config.open("a") as fh:
        fh.write(CONFIG.format(db=db, issuer=issuer.port, dead=dead_port))
    store = KeyStore.open(f"sqlite:///{db}")
    hour = timedelta(hours=1)
    for rec in (
        record("zpk-acq", "001", "ZPK", ZPK_ACQ),
        record("zpk-iss", "001", "ZPK", ZPK_ISS),
        record("zpk-kx", "001", "ZPK", ZPK_KX_OLD, grace=hour),
        record("zak-acq", "008", "ZAK", ZAK_ACQ),
        record("zak-kx", "008", "ZAK", ZAK_KX_OLD, grace=hour),
        record("zak-iss", "008", "ZAK", ZAK_ISS),
        record("zmk-acq", "000", "ZMK", ZMK),
        record("zmk-iss", "000", "ZMK", ZMK_ISS),
        record("zpk-iss-kx", "001", "ZPK", ZPK_ISS_KX_OLD, grace=hour),
        record("bdk-1", "009", "BDK", BDK),
        record("zak-acq", "008", "ZAK", ZAK_ACQ, tenant="metered", scheme="X"),
        record("zak-iss", "008", "ZAK", ZAK_ISS, tenant="metered", scheme="X"),
    ):
        store.create(rec, actor="test")
    rp = start_proxy(load_settings(Path(config)))
    try:
        assert rp.proxy.iso is not None
        yield Env(rp, store, issuer, rp.proxy.iso.ports)
    finally:
        rp.stop()
        issuer.stop()
        store.close()


@pytest.fixture
def service(env: Env) -> Iterator[Acquirer]:
    """A connection to the service-mode listener."""
    acq = Acquirer(env.ports["iso-svc"])
    yield acq
    acq.close()


_stan = iter(range(100000, 999999))


def purchase(
    acquirer: str = "111111",
    pin: str | None = "1234",
    key: bytes = ZPK_ACQ,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """A 0200 with PAN, track 2, PIN block and the usual identifiers."""
    stan = f"{next(_stan):06d}"
    fields = {
        "t": "0200", "2": PAN, "3": "000000", "4": "000000012345", "7": "1127020000", "11": stan,
        "22": "051", "32": acquirer, "35": TRACK2, "37": f"RRN{stan}123", "41": "TERM0001", "49": "978",
    }  # fmt: skip
    if pin is not None:
        fields["52"] = iso0_block(key, pin)
    fields.update(extra or {})
    return fields


# -- service mode ------------------------------------------------------------------------------------


def test_service_translates_pin_and_mac(service: Acquirer) -> None:
    request = purchase(pin="98765", extra={"55": "9F2608AABBCCDDEEFF00119F2701809F100706011203A00000"})
    answer = service.call(build(request, ZAK_ACQ))
    out = decode(answer)
    assert out["t"] == "0200"
    assert {k: v for k, v in out.items() if k not in ("52", "64", "p")} == {
        k: v for k, v in request.items() if k != "52"
    }
    # ISO-3 under the issuer's ZPK: the issuer side gets the acquirer's PIN back
    clear = tdes(ZPK_ISS, bytes.fromhex(out["52"]), decrypt=True)
    assert psec.pinblock.decode_pinblock_iso_3(clear, PAN) == "98765"
    assert out["52"] != request["52"]
    assert mac_ok(answer, ZAK_ISS, "3")


def test_service_wrong_mac_then_connection_still_usable(service: Acquirer) -> None:
    request = purchase()
    raw = build(request, ZAK_ISS)  # MACed under the wrong zone key
    out = decode(service.call(raw))
    assert (out["t"], out["39"]) == ("0210", "63")
    assert out["11"] == request["11"] and out["37"] == request["37"] and out["41"] == request["41"]
    assert out["4"] == request["4"] and out["2"] == PAN
    assert not {"52", "35", "64"} & set(out)
    missing = decode(service.call(build(purchase(), None)))  # no MAC at all
    assert missing["39"] == "63"
    good = decode(service.call(build(purchase(pin="4321"), ZAK_ACQ)))
    assert good["t"] == "0200"
    assert psec.pinblock.decode_pinblock_iso_3(tdes(ZPK_ISS, bytes.fromhex(good["52"]), True), PAN) == "4321"


def test_service_wrong_pin_key_answers_81(service: Acquirer) -> None:
    request = purchase(key=ZPK_WRONG)
    answer = service.call(build(request, ZAK_ACQ))
    out = decode(answer)
    assert (out["t"], out["39"], out["11"]) == ("0210", "81", request["11"])
    assert "52" not in out
    assert mac_ok(answer, ZAK_ACQ)  # an error answer is MACed under the acquirer zone's key
    assert decode(service.call(build(purchase(), ZAK_ACQ)))["t"] == "0200"


def test_service_dukpt_to_zpk_with_cmac(service: Acquirer) -> None:
    ksn = "FFFF9876543210E00012"
    with legacy_tdes():
        pin_key = tdes_working_key(BDK, bytes.fromhex(ksn), "pin")
    request = purchase(acquirer="222222", pin=None, extra={"53": ksn})
    request["52"] = iso0_block(pin_key, "2468")
    answer = service.call(build(request, ZAK_ACQ, "cmac"))
    out = decode(answer)
    assert out["t"] == "0200" and out["53"] == ksn
    assert psec.pinblock.decode_pinblock_iso_0(tdes(ZPK_ISS, bytes.fromhex(out["52"]), True), PAN) == "2468"
    assert mac_ok(answer, ZAK_ISS, "cmac")
    bad_ksn = purchase(
        acquirer="222222", extra={"53": "FFFF9876543210E00013"}
    )  # PIN not under this KSN's key
    assert decode(service.call(build(bad_ksn, ZAK_ACQ, "cmac")))["39"] == "81"


def test_service_alg1_and_route_failure_code(service: Acquirer) -> None:
    request = purchase(acquirer="333333", pin=None)
    answer = service.call(build(request, ZAK_ACQ, "1"))
    assert decode(answer)["t"] == "0200" and mac_ok(answer, ZAK_ISS, "1")
    wrong = decode(service.call(build(purchase(acquirer="333333", pin=None), ZAK_ACQ, "3")))
    assert (wrong["t"], wrong["39"]) == ("0210", "A0")


def test_service_no_route_and_format_error(service: Acquirer) -> None:
    out = decode(service.call(build(purchase(acquirer="999999"), ZAK_ACQ)))
    assert (out["t"], out["39"]) == ("0210", "92")
    broken = build(purchase(), ZAK_ACQ)
    broken = broken[:20] + b"XX" + broken[22:]  # inside the bitmap-declared fields: not decodable
    answer = service.call(broken)
    assert decode(answer)["39"] == "30"
    assert decode(service.call(build(purchase(), ZAK_ACQ)))["t"] == "0200"


def test_bcd_spec_with_ascii_length_framing(env: Env) -> None:
    spec = load_spec("bcd")
    request = purchase(pin="7777")
    doc = {**request, "64": "00" * 8}
    raw = bytes(iso8583.encode(doc, spec)[0])
    raw = raw[:-8] + mac(ZAK_ACQ, raw[:-8], "3")
    with socket.create_connection(("127.0.0.1", env.ports["iso-bcd"]), timeout=15) as s:
        s.sendall(b"%04d" % len(raw) + raw)
        answer = _read(s, int(_read(s, 4)))
    out = iso8583.decode(answer, spec)[0]
    assert out["t"] == "0200" and out["2"] == PAN and out["11"] == request["11"]
    assert answer[-8:] == mac(ZAK_ISS, answer[:-8], "3")
    clear = tdes(ZPK_ISS, bytes.fromhex(out["52"]), decrypt=True)
    assert psec.pinblock.decode_pinblock_iso_0(clear, PAN) == "7777"


# -- network management ------------------------------------------------------------------------------


def test_echo_and_sign_on(service: Acquirer) -> None:
    for code in ("301", "001", "002"):
        out = decode(service.call(build({"t": "0800", "7": "1127020000", "11": "000777", "70": code}, None)))
        assert (out["t"], out["39"], out["11"], out["70"]) == ("0810", "00", "000777", code)
    assert decode(service.call(build({"t": "0800", "11": "000778", "70": "999"}, None)))["39"] == "12"


def _key_exchange(
    service: Acquirer, clear: bytes, kcv: str | None = None, klass: str = "PK"
) -> dict[str, str]:
    key_zmk = "X" + tdes(ZMK, clear).hex().upper()
    with legacy_tdes():
        check = kcv or kcv_tdes(clear).hex().upper()[:6]
    msg = {"t": "0800", "7": "1127020000", "11": "000888", "32": "444444", "48": klass + key_zmk + check,
           "70": "101"}  # fmt: skip
    return decode(service.call(build(msg, None)))


def test_key_exchange_new_key_in_use_old_in_grace(env: Env, service: Acquirer) -> None:
    assert _key_exchange(service, ZPK_KX_NEW, kcv="000000")["39"] == "63"  # wrong check value: refused
    out = _key_exchange(service, ZPK_KX_NEW)
    assert (out["t"], out["39"]) == ("0810", "00") and "48" not in out
    v1, v2 = env.store.versions("default", "zpk-kx")
    assert (v1.state, v2.state) == (KeyState.GRACE, KeyState.ACTIVE)
    assert v2.cryptogram is not None
    assert decrypt_key_under_lmk(TEST_LMK, "001", v2.cryptogram) == ZPK_KX_NEW
    for key, pin in ((ZPK_KX_NEW, "1111"), (ZPK_KX_OLD, "2222")):  # new key, and the old one during grace
        answer = decode(service.call(build(purchase(acquirer="444444", pin=pin, key=key), ZAK_KX_OLD)))
        assert answer["t"] == "0200"
        clear = tdes(ZPK_ISS, bytes.fromhex(answer["52"]), decrypt=True)
        assert psec.pinblock.decode_pinblock_iso_0(clear, PAN) == pin


def test_key_exchange_of_the_mac_key(env: Env, service: Acquirer) -> None:
    assert _key_exchange(service, ZAK_KX_NEW, klass="MK")["39"] == "00"
    v1, v2 = env.store.versions("default", "zak-kx")
    assert (v1.state, v2.state, v2.type_code) == (KeyState.GRACE, KeyState.ACTIVE, "008")
    for key in (ZAK_KX_NEW, ZAK_KX_OLD):  # the new MAC key, and the old one during its grace period
        answer = service.call(build(purchase(acquirer="444444", pin=None), key))
        assert decode(answer)["t"] == "0200" and mac_ok(answer, ZAK_ISS)
    assert decode(service.call(build(purchase(acquirer="444444", pin=None), ZAK_ACQ)))["39"] == "63"
    assert _key_exchange(service, ZAK_KX_NEW, klass="XX")["39"] == "12"


# -- inline mode -------------------------------------------------------------------------------------


def test_inline_round_trip_through_issuer(env: Env) -> None:
    acq = Acquirer(env.ports["iso-inline"])
    try:
        request = purchase(pin="5555")
        answer = acq.call(build(request, ZAK_ACQ))
        out = decode(answer)
        assert (out["t"], out["39"], out["38"], out["11"]) == ("0210", "00", "AB1234", request["11"])
        assert mac_ok(answer, ZAK_ACQ)  # response leg: verified under ZAK_ISS, MACed under ZAK_ACQ
        seen = [s for s in env.issuer.seen if s.fields["11"] == request["11"]]
        assert len(seen) == 1 and seen[0].pin == "5555" and seen[0].mac_ok
        request2 = purchase()
        env.issuer.bad_mac.add(request2["11"])
        out2 = decode(acq.call(build(request2, ZAK_ACQ)))
        assert (out2["t"], out2["39"]) == ("0210", "63")  # the issuer's MAC is wrong
    finally:
        acq.close()


def test_inline_silent_issuer_answers_91_then_recovers(env: Env) -> None:
    acq = Acquirer(env.ports["iso-slow"])
    try:
        request = purchase()
        env.issuer.silent.add(request["11"])
        out = decode(acq.call(build(request, ZAK_ACQ)))
        assert (out["t"], out["39"], out["11"]) == ("0210", "91", request["11"])
        assert [s.pin for s in env.issuer.seen if s.fields["11"] == request["11"]] == ["1234"]
        again = purchase(pin="8642")
        answer = acq.call(build(again, ZAK_ACQ))
        assert decode(answer)["39"] == "00" and mac_ok(answer, ZAK_ACQ)
    finally:
        acq.close()


def _wait(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_inline_upstream_echo_and_reconnect(env: Env) -> None:
    acq = Acquirer(env.ports["iso-inline"])
    try:
        assert decode(acq.call(build(purchase(), ZAK_ACQ)))["39"] == "00"  # the link is up
        env.issuer.send(build({"t": "0800", "7": "1127020000", "11": "424242", "70": "301"}, None))
        _wait(lambda: any(f["11"] == "424242" for f in env.issuer.network))
        (echo,) = [f for f in env.issuer.network if f["11"] == "424242"]
        assert (echo["t"], echo["39"], echo["70"]) == ("0810", "00", "301")
        accepted = env.issuer.accepted
        env.issuer.drop()
        _wait(lambda: env.issuer.accepted > accepted)  # reconnected with back-off
        request = purchase(pin="1357")
        answer = acq.call(build(request, ZAK_ACQ))
        assert decode(answer)["39"] == "00" and mac_ok(answer, ZAK_ACQ)
        assert [s.pin for s in env.issuer.seen if s.fields["11"] == request["11"]] == ["1357"]
    finally:
        acq.close()


def test_inline_key_exchange_from_the_upstream(env: Env) -> None:
    acq = Acquirer(env.ports["iso-inline"])
    try:
        env.issuer.pin_keys["555555"] = ZPK_ISS_KX_OLD
        first = purchase(acquirer="555555", pin="1470")
        assert decode(acq.call(build(first, ZAK_ACQ)))["39"] == "00"  # the link is up, the old key in use
        with legacy_tdes():
            kcv = kcv_tdes(ZPK_ISS_KX_NEW).hex().upper()[:6]
        key = "X" + tdes(ZMK_ISS, ZPK_ISS_KX_NEW).hex().upper()
        exchange = {"t": "0800", "11": "515151", "32": "555555", "48": "PK" + key + kcv, "70": "161"}
        env.issuer.send(build(exchange, None), link_of=first["11"])
        _wait(lambda: any(f["11"] == "515151" for f in env.issuer.network))
        assert [f["39"] for f in env.issuer.network if f["11"] == "515151"] == ["00"]
        v1, v2 = env.store.versions("default", "zpk-iss-kx")
        assert (v1.state, v2.state) == (KeyState.GRACE, KeyState.ACTIVE)
        env.issuer.pin_keys["555555"] = ZPK_ISS_KX_NEW  # the issuer now expects PINs under its new key
        request = purchase(acquirer="555555", pin="2580")
        assert decode(acq.call(build(request, ZAK_ACQ)))["39"] == "00"
        assert [s.pin for s in env.issuer.seen if s.fields["11"] == first["11"]] == ["1470"]
        assert [s.pin for s in env.issuer.seen if s.fields["11"] == request["11"]] == ["2580"]
    finally:
        acq.close()


def test_inline_unreachable_upstream_answers_91(env: Env) -> None:
    acq = Acquirer(env.ports["iso-dead"])
    try:
        request = purchase()
        answer = acq.call(build(request, ZAK_ACQ))
        out = decode(answer)
        assert (out["t"], out["39"], out["11"], out["37"]) == ("0210", "91", request["11"], request["37"])
        assert "52" not in out and mac_ok(answer, ZAK_ACQ)
    finally:
        acq.close()


def test_tenant_connection_limit_and_rate(env: Env) -> None:
    port = env.ports["iso-metered"]
    first, second = Acquirer(port), Acquirer(port)
    try:
        for acq in (first, second):  # admitted (0800 is not rate limited)
            assert decode(acq.call(build({"t": "0800", "11": "000001", "70": "301"}, None)))["39"] == "00"
        third = Acquirer(port)
        try:
            with pytest.raises((ConnectionError, OSError)):
                third.recv()  # tenant max_connections = 2: closed at once
        finally:
            third.close()
        requests = [purchase(acquirer="333333", pin=None) for _ in range(4)]
        frames = [build(q, ZAK_ACQ, "1") for q in requests]
        first.sock.sendall(b"".join(struct.pack(">H", len(f)) + f for f in frames))
        answers = [decode(first.recv()) for _ in requests]
        by_stan = {a["11"]: a.get("39", a["t"]) for a in answers}
        # burst 2, then 0.1/s with rate_max_delay 0: the first two translated, the others refused (91)
        assert [by_stan[q["11"]] for q in requests] == ["0200", "0200", "91", "91"]
    finally:
        first.close()
        second.close()


# -- secrets, audit, fuzz ----------------------------------------------------------------------------


class _Audit:
    """The audit writer's face to the fronts: records and refusal counts, in order."""

    ack_after_durable = False

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def event(self, kind: str, **fields: Any) -> int:
        self.records.append({"kind": kind, **fields})
        return len(self.records)

    def refused(self, tenant: str, listener: str, command: str, result: str) -> None:
        self.records.append({"kind": "refused", "tenant": tenant, "listener": listener, "mti": command,
                             "result": result})  # fmt: skip


def test_audit_records_and_no_secrets_in_logs(
    env: Env, service: Acquirer, caplog: pytest.LogCaptureFixture
) -> None:
    assert env.rp.proxy.iso is not None
    listener = env.rp.proxy.iso.listeners["iso-svc"]
    audit = _Audit()
    previous = listener._audit
    listener._audit = audit
    caplog.set_level(logging.DEBUG)
    try:
        bad = purchase(key=ZPK_WRONG)
        decode(service.call(build(bad, ZAK_ACQ)))
        decode(service.call(build(purchase(acquirer="999999"), ZAK_ACQ)))
        decode(service.call(build(purchase(), ZAK_ISS)))
    finally:
        listener._audit = previous
    results = [(r["kind"], r["mti"], r["result"]) for r in audit.records]
    # the PIN and MAC steps ran on a node (one record each, naming it); no route: only counted
    assert results == [("iso8583", "0200", "81"), ("refused", "0200", "92"), ("iso8583", "0200", "63")]
    assert {audit.records[0]["node"], audit.records[2]["node"]} <= {"node-a", "node-b"}
    assert audit.records[0]["stan"] == bad["11"] and audit.records[0]["rrn"] == bad["37"]
    assert audit.records[0]["listener"] == "iso-svc" and audit.records[0]["tenant"] == "default"
    text = caplog.text + repr(audit.records)
    assert "route" in text  # the no-route warning was captured
    for secret in (PAN, TRACK2, bad["52"], "29121010000000000000"):
        assert secret not in text


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        i = rng.randrange(len(data)) if data else 0
        if kind == 0 and data:
            data[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and data:
            data[i] = rng.randrange(256)
        elif kind == 2:
            del data[rng.randrange(len(data) + 1) :]
        elif kind == 3:
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif data:
            data[i] = ord(rng.choice("0123456789ABCDEF"))
    return bytes(data)


def test_fuzz_mutated_messages_do_not_disturb_other_connections(env: Env) -> None:
    rng = random.Random(8583)
    dukpt = purchase(acquirer="222222", extra={"53": "FFFF9876543210E00012"})
    seeds = [
        build(purchase(), ZAK_ACQ),
        build(dukpt, ZAK_ACQ, "cmac"),
        build({"t": "0800", "11": "000001", "70": "301"}, None),
        build(purchase(acquirer="444444"), ZAK_ACQ),
    ]
    fuzz = Acquirer(env.ports["iso-svc"])
    other = Acquirer(env.ports["iso-svc"])
    try:
        for round_ in range(30):
            for _ in range(10):
                fuzz.send(_mutate(rng, rng.choice(seeds)))
            request = purchase(pin=f"{round_:04d}")
            out = decode(other.call(build(request, ZAK_ACQ)))
            assert out["t"] == "0200" and out["11"] == request["11"]
            clear = tdes(ZPK_ISS, bytes.fromhex(out["52"]), decrypt=True)
            assert psec.pinblock.decode_pinblock_iso_3(clear, PAN) == f"{round_:04d}"
        fuzz.sock.sendall(b"\xff\xff" + b"x" * 100)  # a length over the limit: that connection closes
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if not fuzz.sock.recv(65536):
                    break
            except OSError:
                break
        assert decode(other.call(build(purchase(), ZAK_ACQ)))["t"] == "0200"
    finally:
        fuzz.close()
        other.close()
    fresh = Acquirer(env.ports["iso-svc"])
    try:
        assert decode(fresh.call(build(purchase(), ZAK_ACQ)))["t"] == "0200"
    finally:
        fresh.close()


def test_fuzz_bcd_listener_with_ascii_framing(env: Env) -> None:
    spec = load_spec("bcd")
    rng = random.Random(1987)
    port = env.ports["iso-bcd"]

    def bcd(fields: dict[str, str]) -> bytes:
        raw = bytes(iso8583.encode({**fields, "64": "00" * 8}, spec)[0])
        return raw[:-8] + mac(ZAK_ACQ, raw[:-8], "3")

    seeds = [
        bcd(purchase()),
        bcd(purchase(acquirer="333333", pin=None)),
        bcd({"t": "0800", "11": "000001", "70": "301"}),
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=15) as fuzz:
        for _ in range(200):
            frame = _mutate(rng, rng.choice(seeds))[:9999]
            fuzz.sendall(b"%04d" % len(frame) + frame)
        with socket.create_connection(("127.0.0.1", port), timeout=15) as other:
            request = purchase(pin="3690")
            raw = bcd(request)
            other.sendall(b"%04d" % len(raw) + raw)
            answer = _read(other, int(_read(other, 4)))
            out = iso8583.decode(answer, spec)[0]
            assert out["t"] == "0200" and out["11"] == request["11"]
            clear = tdes(ZPK_ISS, bytes.fromhex(out["52"]), decrypt=True)
            assert psec.pinblock.decode_pinblock_iso_0(clear, PAN) == "3690"
