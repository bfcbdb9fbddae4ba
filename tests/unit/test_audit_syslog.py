"""Audit records to a SIEM: RFC 5424 over TCP (RFC 6587 octet counting) and TLS (RFC 5425), on loopback.

A small syslog server here parses the frames independently (regular expressions after RFC 5424's ABNF)
and the tests compare every field with the audit file the same writer produced.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hsmproxy.audit.form import HostcmdItem
from hsmproxy.audit.settings import AuditConfigError, AuditSettings, parse_audit_settings
from hsmproxy.audit.signer import SoftwareSigner
from hsmproxy.audit.syslog import SyslogSettings, SyslogSink
from hsmproxy.audit.writer import AuditWriter

MESSAGE = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<proc>\S+) (?P<msgid>\S+) "
    rb'(?P<sd>-|(?:\[[^ \]]+(?: [^ =\]"]+="(?:[^"\\]|\\.)*")*\])+) (?P<msg>.*)\Z',
    re.S,
)
PARAM = re.compile(rb'([^ =\]"]+)="((?:[^"\\]|\\.)*)"')


class Collector(asyncio.Protocol):
    """Server side: splits octet-counted frames (``MSG-LEN SP MSG``) into messages."""

    def __init__(self, server: SyslogServer) -> None:
        self.server, self.buf = server, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (m := re.match(rb"([1-9]\d*) ", self.buf)) and len(self.buf) >= m.end() + int(m.group(1)):
            end = m.end() + int(m.group(1))
            self.server.messages.append(self.buf[m.end() : end])
            self.buf = self.buf[end:]
        assert not self.buf or re.match(rb"\d*( |$)", self.buf), self.buf[:40]


class SyslogServer:
    """A loopback syslog receiver (plain TCP or TLS) that can be stopped and started on its port."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.context, self.port = context, 0
        self.messages: list[bytes] = []
        self.transports: list[asyncio.BaseTransport] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Collector(self), "127.0.0.1", self.port, ssl=self.context, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in self.transports:
            t.close()
        self.transports.clear()
        await self.server.wait_closed()

    async def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.messages) < count:
            assert asyncio.get_running_loop().time() < deadline, f"{len(self.messages)} of {count} messages"
            await asyncio.sleep(0.02)


def _parse(message: bytes) -> dict[str, Any]:
    m = MESSAGE.match(message)
    assert m, message[:120]
    sd = m.group("sd")
    sd_id = sd[1 : sd.index(b" ")].decode()
    params = {k.decode(): v.decode() for k, v in PARAM.findall(sd)}
    return {
        **{k: v.decode() for k, v in m.groupdict().items() if k != "sd"},
        "sd_id": sd_id,
        "params": params,
    }


def _record(i: int, error: str = "00") -> HostcmdItem:
    return ("host", "default", "127.0.0.1:5000", "CC", error, 0.001, b"%04d" % i, "node-a", ())


def _check(messages: list[bytes], path: Path, facility: int, hostname: str) -> None:
    lines = path.read_bytes().splitlines()
    assert len(messages) == len(lines)
    for message, line in zip(messages, lines, strict=True):
        rec = json.loads(line)
        got = _parse(message)
        severity = 5 if rec.get("result", "00") != "00" else 6
        assert int(got["pri"]) == facility * 8 + severity
        assert (got["ts"], got["host"], got["app"], got["proc"], got["msgid"]) == (
            rec["time"], hostname, "hsmproxy-test", str(os.getpid()), rec["kind"],
        )  # fmt: skip
        want = {"seq": str(rec["seq"]), "kind": rec["kind"]} if "seq" in rec else {"kind": "checkpoint"}
        if "result" in rec:
            want["result"] = rec["result"]
        assert got["sd_id"] == "hsmproxy@32473" and got["params"] == want
        assert got["msg"].encode() == line  # the same line as in the file, checkpoints included


def _settings(port: int, **kw: Any) -> SyslogSettings:
    base: dict[str, Any] = {"facility": 19, "hostname": "proxy-1", "app_name": "hsmproxy-test"}
    return SyslogSettings("127.0.0.1", port, **(base | kw))


async def _run_writer(path: Path, sink: SyslogSink, errors: list[str]) -> None:
    w = AuditWriter(AuditSettings(str(path), checkpoint_every=3, linger=0.0), SoftwareSigner(), sink=sink)
    await w.start()
    for i, error in enumerate(errors):
        w.hostcmd(_record(i, error))
        await w.flush()
        await asyncio.sleep(0.001)
    await w.stop()


def test_tcp_messages_carry_the_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    async def main() -> list[bytes]:
        server = SyslogServer()
        await server.start()
        try:
            sink = SyslogSink(_settings(server.port))
            await _run_writer(path, sink, ["00", "00", "15", "00", "01"])
            await server.wait_for(len(path.read_bytes().splitlines()))
            assert sink.dropped == 0 and sink.sent == len(server.messages)
            return server.messages
        finally:
            await server.stop()

    messages = asyncio.run(main())
    _check(messages, path, 19, "proxy-1")
    assert any(_parse(m)["msgid"] == "checkpoint" for m in messages)


def _ca(tmp_path: Path) -> tuple[Path, ssl.SSLContext, Path, Path]:
    """A throwaway CA: (CA file, server context for 127.0.0.1 asking for a client cert, client cert, key)."""
    now = dt.datetime.now(dt.UTC)

    def cert(
        name: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if not ca:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return b.sign(signer, hashes.SHA256())

    def write(name: str, c: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        cp, kp = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        cp.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        kp.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cp, kp

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test audit CA")])
    ca_file, _ = write("ca", cert("test audit CA", ca_key, ca_name, ca_key, True), ca_key)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server_cert, server_keyfile = write(
        "server", cert("siem", server_key, ca_name, ca_key, False), server_key
    )
    client_cert, client_keyfile = write(
        "client", cert("proxy", client_key, ca_name, ca_key, False), client_key
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_file))
    ctx.load_cert_chain(server_cert, server_keyfile)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ca_file, ctx, client_cert, client_keyfile


def test_tls_messages_carry_the_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ca_file, server_ctx, cert, key = _ca(tmp_path)

    async def main() -> list[bytes]:
        server = SyslogServer(server_ctx)
        await server.start()
        try:
            sink = SyslogSink(_settings(server.port, tls=True, ca=str(ca_file), cert=str(cert), key=str(key)))
            await _run_writer(path, sink, ["00", "10"])
            await server.wait_for(len(path.read_bytes().splitlines()))
            return server.messages
        finally:
            await server.stop()

    _check(asyncio.run(main()), path, 19, "proxy-1")


def test_tls_refuses_a_server_the_ca_did_not_sign(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, server_ctx, cert, key = _ca(tmp_path / "a")
    other_ca, _, _, _ = _ca(tmp_path / "b")  # a second CA, unrelated to the server's

    async def main() -> SyslogSink:
        server = SyslogServer(server_ctx)
        await server.start()
        try:
            sink = SyslogSink(
                _settings(server.port, tls=True, ca=str(other_ca), cert=str(cert), key=str(key))
            )
            sink.start()
            sink.submit({"seq": 0, "kind": "open", "time": "2026-01-01T00:00:00.000Z"}, b"{}")
            for _ in range(100):
                if sink.last_error:
                    break
                await asyncio.sleep(0.02)
            await sink.stop(timeout=0)
            assert server.messages == []
            return sink
        finally:
            await server.stop()

    sink = asyncio.run(main())
    assert sink.connects == 0 and sink.last_error == "connect: SSLCertVerificationError"


def test_reconnects_after_the_server_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    async def main() -> tuple[list[bytes], SyslogSink]:
        server = SyslogServer()
        await server.start()
        sink = SyslogSink(_settings(server.port, max_backoff=0.2))
        w = AuditWriter(AuditSettings(str(path), checkpoint_interval=60.0), SoftwareSigner(), sink=sink)
        await w.start()
        try:
            w.hostcmd(_record(0))
            await server.wait_for(2)  # open + one record
            await server.stop()
            for i in range(1, 4):  # written to the file while the SIEM is away
                w.hostcmd(_record(i))
                await asyncio.sleep(0.05)
            await server.start()  # same port
            w.hostcmd(_record(4))
            await server.wait_for(6)
            await w.stop()
            await server.wait_for(7)  # the close record
            return server.messages, sink
        finally:
            await server.stop()

    messages, sink = asyncio.run(main())
    assert sink.connects >= 2
    seqs = [int(_parse(m)["params"]["seq"]) for m in messages if "seq" in _parse(m)["params"]]
    assert sorted(set(seqs)) == list(range(7))  # nothing lost (a resent batch may repeat)
    lines = set(path.read_bytes().splitlines())
    assert any(_parse(m)["msgid"] == "checkpoint" for m in messages)  # the stop's seal went out too
    for m in messages:
        assert _parse(m)["msg"].encode() in lines


def test_back_pressure_drops_the_oldest_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> SyslogSink:
        sink = SyslogSink(_settings(1, max_queue=3))  # port 1: nothing listens, nothing is sent
        for i in range(10):
            sink.submit({"seq": i, "kind": "hostcmd", "time": "t", "result": "00"}, b'{"seq":%d}' % i)
        return sink

    with caplog.at_level(logging.WARNING, logger="hsmproxy.audit"):
        sink = asyncio.run(main())
    assert (sink.dropped, sink.queued) == (7, 3)
    assert "queue full (3), 1 record(s) dropped so far" in caplog.text


def test_syslog_settings_are_validated(tmp_path: Path) -> None:
    s = parse_audit_settings(
        {"audit": {"path": "a.jsonl", "syslog": {"address": "siem.example:6514", "tls": True,
                                                  "facility": "local4", "app_name": "hsm"}}},
        tmp_path,
    )  # fmt: skip
    assert s is not None and s.syslog is not None
    assert (s.syslog.host, s.syslog.port, s.syslog.tls, s.syslog.facility) == ("siem.example", 6514, True, 20)
    bad = [
        ({"address": "nohost"}, "address must be HOST:PORT"),
        ({"address": "h:1", "facility": "nope"}, "unknown facility"),
        ({"address": "h:1", "app_name": "has space"}, "app_name"),
        ({"address": "h:1", "cert": "c.pem"}, "cert and key go together"),
        ({"address": "h:1", "ca": "missing.pem"}, "ca: no such file"),
        ({"address": "h:1", "colour": "red"}, "unknown keys"),
    ]
    for raw, message in bad:
        with pytest.raises(AuditConfigError, match=message):
            parse_audit_settings({"audit": {"path": "a.jsonl", "syslog": raw}}, tmp_path)
