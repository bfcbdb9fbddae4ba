"""Secrets scan: a full proxy run seeded with known secrets leaks none of them to logs, metrics or console.

The proxy runs in-process with ``hsmproxy.logs.configure_logging`` at DEBUG (JSON lines into a buffer) and
pytest's caplog at DEBUG (the raw, unredacted records). Host commands use known clear keys, their LMK and
ZMK cryptograms, clear and encrypted PIN blocks and a PAN, on good and failing paths (bad parity, wrong
PIN block format, unknown LMK, malformed data). Every log line, the /metrics page and the console's
SHOW NODES / SHOW TENANTS replies, and the audit trail the run wrote, are then scanned for each secret as
upper hex, lower hex and raw bytes.
(Node worker processes log in their own processes and are not scanned here.)
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from dataclasses import replace
from pathlib import Path

import psec
import pytest

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk
from hsmproxy.audit.settings import AuditSettings
from hsmproxy.config import load_settings
from hsmproxy.logs import configure_logging, remove_logging
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import start_proxy

ZPK_A = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
ZPK_B = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
CVK = bytes.fromhex("4CA2161637D0133E5E151AEA45DA2A16")
ZMK = bytes.fromhex("1C1C1C1C1C1C1C1C1F1F1F1F1F1F1F1F")
IMPORTED = bytes.fromhex("D5D44FF720683D0D70BA624AF2F246FD")
BAD_PARITY = bytes.fromhex("0023456789ABCDEFFEDCBA9876543210")
PAN = "4761739001010010"
PIN = "7391"


def _http(port: int, path: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode("latin-1")


def _console(port: int, *lines: str) -> str:
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        buf = b""
        for line in lines:
            s.sendall(line.encode() + b"\n")
            while b"\n\n" not in buf:
                chunk = s.recv(65536)
                assert chunk, "console closed the connection"
                buf += chunk
            reply, _, buf = buf.partition(b"\n\n")
            out.append(reply.decode("latin-1"))
    return "\n".join(out)


def _forms(secret: bytes | str) -> list[bytes]:
    """The ways a secret could show up: raw, upper and lower hex (and the text itself)."""
    if isinstance(secret, str):
        raw = secret.encode()
        forms = [raw, raw.upper(), raw.lower()]
        body = secret[1:] if secret[:1] in ("U", "T", "X", "Y", "Z", "S") else secret
        if len(body) >= 16:
            forms += [body.upper().encode(), body.lower().encode()]
        return forms
    return [secret, secret.hex().upper().encode(), secret.hex().lower().encode()]


def _scan(haystack: bytes, secrets: dict[str, bytes | str]) -> list[str]:
    return [f"{name} ({form!r})" for name, s in secrets.items() for form in _forms(s) if form in haystack]


def test_no_secret_reaches_logs_metrics_or_console(
    proxy_config: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    old_level = root.level
    handler = configure_logging("DEBUG", stream=stream, console=False)
    caplog.set_level(logging.DEBUG)
    with legacy_tdes():
        clear_block = bytes(psec.pinblock.encode_pinblock_iso_0(PIN, PAN))
        block_a = bytes(psec.des.encrypt_tdes_ecb(ZPK_A, clear_block))
        imported_under_zmk = bytes(psec.des.encrypt_tdes_ecb(ZMK, IMPORTED))
    za = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_A)
    zb = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_B)
    cvk = encrypt_key_under_lmk(TEST_LMK, "402", "U", CVK)
    zmk = encrypt_key_under_lmk(TEST_LMK, "000", "U", ZMK)
    bad = encrypt_key_under_lmk(TEST_LMK, "001", "U", BAD_PARITY)
    secrets: dict[str, bytes | str] = {
        "ZPK_A": ZPK_A, "ZPK_B": ZPK_B, "CVK": CVK, "ZMK": ZMK, "IMPORTED": IMPORTED,
        "BAD_PARITY": BAD_PARITY,
        "za": za, "zb": zb, "cvk": cvk, "zmk": zmk, "bad": bad, "clear_block": clear_block,
        "block_a": block_a, "imported_under_zmk": imported_under_zmk, "PAN": PAN, "account": PAN[3:15],
    }  # fmt: skip
    hb = block_a.hex().upper().encode()
    acct = PAN[3:15].encode()
    card = f"{PAN};2512101".encode()
    requests = [
        b"CC" + za.encode() + zb.encode() + b"12" + hb + b"0101" + acct,  # good
        b"CC" + za.encode() + zb.encode() + b"12" + hb + b"0103" + acct,  # Diebold out
        b"CC" + bad.encode() + zb.encode() + b"12" + hb + b"0101" + acct,  # bad parity
        b"CC" + za.encode() + zb.encode() + b"12" + hb + b"9901" + acct,  # wrong format
        b"CC" + za.encode() + zb.encode() + b"12" + hb + b"0101" + acct + b"%07",  # unknown LMK
        b"CC" + za.encode() + zb.encode() + b"12" + hb[:-3] + b"XYZ0101" + acct,  # bad data
        b"CC" + za.encode()[:-1] + b"G" + zb.encode() + b"12" + hb,  # truncated / bad key
        b"CW" + cvk.encode() + card,
        b"CY" + cvk.encode() + b"000" + card,  # verification (likely) fails
        b"A6001" + zmk.encode() + b"X" + imported_under_zmk.hex().upper().encode() + b"U",
        b"A6001" + zmk.encode() + b"X" + imported_under_zmk.hex().upper().encode() + b"U%07",
        b"BU001" + b"1" + za.encode(),
        b"NC",
        b"ZZ" + hb,  # unknown command carrying a PIN block
    ]
    audit_path = tmp_path / "audit.jsonl"  # the audit trail is scanned too
    settings = replace(
        load_settings(proxy_config), console_bind=("127.0.0.1", 0), http_bind=("127.0.0.1", 0),
        audit=AuditSettings(str(audit_path), checkpoint_every=5),
    )  # fmt: skip
    try:
        rp = start_proxy(settings)
        try:
            client = HsmClient("127.0.0.1", rp.port)
            responses = []
            try:
                for request in requests:
                    responses.append(client.call(request))
            finally:
                client.close()
            assert responses[0][:4] == b"CD00" and responses[2][2:4] == b"10" and responses[4][2:4] != b"00"
            assert responses[9][:4] in (b"A700", b"A701"), responses[9]  # 01: parity advisory
            secrets["block_b"] = responses[0][6:22].decode()  # the translated (encrypted) PIN block
            secrets["imported_under_lmk"] = responses[9][4:37].decode()
            if rp.proxy.metrics is not None:
                asyncio.run_coroutine_threadsafe(rp.proxy.metrics.refresh(), rp.loop).result(10)
            metrics = _http(rp.proxy.http_port, "/metrics")
            assert "hsmproxy_commands" in metrics
            console = _console(rp.proxy.console_port, "SHOW NODES", "SHOW TENANTS", "SHOW NODES JSON")
            assert "node-a" in console
        finally:
            rp.stop()
    finally:
        remove_logging(handler)
        root.setLevel(old_level)
    structured = stream.getvalue()
    assert structured.count("\n") >= 3, "the proxy logged (almost) nothing"
    raw_records = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.__dict__}" for r in caplog.records
    )
    audit_trail = audit_path.read_text("ascii")
    trail = [json.loads(line) for line in audit_trail.splitlines()]
    executed = sum(1 for r in trail if r["kind"] == "hostcmd")
    counted = sum(int(r["count"]) for r in trail if r["kind"] == "aggregate")
    assert executed + counted == len(requests) and executed > 0, "the audit trail misses commands"
    for where, text in (
        ("audit trail", audit_trail),
        ("structlog output", structured),
        ("log records", raw_records),
        ("/metrics", metrics),
        ("console", console),
    ):
        for encoding in ("latin-1", "utf-8"):
            leaks = _scan(text.encode(encoding, "replace"), secrets)
            assert not leaks, f"{where} leaks {leaks}"
