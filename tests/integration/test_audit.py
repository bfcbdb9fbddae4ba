"""Audit trail on a live proxy with two SoftHSM2 nodes: records, node MACs, `hsmproxy audit verify`
against every tampering kind, keystore life-cycle records, and the ``fail_closed`` choice."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psec
import pytest

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk
from hsmproxy.audit import canonical
from hsmproxy.config import load_settings
from hsmproxy.keys.lmk import TEST_AUDIT_KEY
from hsmproxy.keys.store import KeyRecord, KeyState, KeyStore
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import make_nodes, start_proxy
from tests.integration.test_console_admin import wait_for
from tests.integration.test_proxy_basic import ZPK_A, ZPK_B, _enc

PAN = "4012345678909"
PIN = "1234"
NODES = ("node-a", "node-b")


def _verify(config: Path, *paths: Path, live: bool = False) -> subprocess.CompletedProcess[str]:
    extra = ["--live"] if live else []
    return subprocess.run(
        [sys.executable, "-m", "hsmproxy.cli", "audit", "verify", *map(str, paths), "--config", str(config),
         *extra],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def _cc_request(za: bytes, zx: bytes, block: bytes, fmt: bytes = b"01") -> bytes:
    return b"CC" + za + zx + b"12" + block + b"01" + fmt + PAN[-13:-1].encode()


class SiemReceiver(socketserver.ThreadingTCPServer):
    """A loopback syslog receiver (plain TCP) keeping every byte it gets, in a thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = threading.Lock()
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while chunk := self.request.recv(65536):
                    with receiver.lock:
                        receiver.data += chunk

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, name="siem", daemon=True)
        self.thread.start()

    def messages(self) -> list[bytes]:
        """The octet-counted frames received so far (RFC 6587: ``MSG-LEN SP MSG``)."""
        with self.lock:
            buf, out = bytes(self.data), []
        while m := re.match(rb"([1-9][0-9]*) ", buf):
            end = m.end() + int(m.group(1))
            out.append(buf[m.end() : end])
            buf = buf[end:]
        return out

    def close(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def siem() -> Iterator[SiemReceiver]:
    """The SIEM the audited proxy sends its records to."""
    receiver = SiemReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, siem: SiemReceiver) -> tuple[Path, Path, list[bytes]]:
    """Run a proxy with [audit] on two nodes, send commands, stop it: (config, audit file, secrets)."""
    root = tmp_path_factory.mktemp("audit")
    config = make_nodes(root)
    audit_path = root / "audit" / "audit.jsonl"
    port = siem.server_address[1]
    with config.open("a") as fh:
        fh.write(f'[audit]\npath = "{audit_path}"\nfsync = "always"\ncheckpoint_every = 4\n')
        fh.write(
            f'[audit.syslog]\naddress = "127.0.0.1:{port}"\nhostname = "hsm-proxy-7"\nfacility = "local2"\n'
        )
    za = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_A).encode()
    zx = encrypt_key_under_lmk(TEST_LMK, "001", "X", ZPK_B).encode()
    block = _enc(ZPK_A, psec.pinblock.encode_pinblock_iso_0(PIN, PAN)).hex().upper().encode()
    settings = load_settings(config)
    assert settings.audit is not None and settings.audit.path == str(audit_path)
    rp = start_proxy(settings)
    try:
        client = HsmClient("127.0.0.1", rp.port, header=b"AB12")
        try:
            assert client.call(b"NC")[:4] == b"ND00"
            for _ in range(5):
                assert client.call(_cc_request(za, zx, block))[:4] == b"CD00"
            assert client.call(_cc_request(za, zx, block, b"99"))[:4] != b"CD00"
        finally:
            client.close()
    finally:
        rp.stop()
    secrets = [block, za, zx, PAN.encode(), PAN[-13:-1].encode(), ZPK_A.hex().upper().encode()]
    return config, audit_path, secrets


def test_records_have_the_right_fields(audited: tuple[Path, Path, list[bytes]]) -> None:
    _, path, _ = audited
    recs = _records(path)
    host = [r for r in recs if r["kind"] == "hostcmd"]
    assert [r["command"] for r in host] == ["NC"] + ["CC"] * 6
    assert [r["result"] for r in host][:6] == ["00"] * 6 and host[6]["result"] not in ("00", "")
    for r in host:
        assert r["correlation"] == b"AB12".hex().upper()
        assert r["tenant"] == "default" and r["listener"] == "host" and r["client"].startswith("127.0.0.1:")
        assert r["latency_ms"] >= 0 and r["key_ids"] == []  # no keystore: no named keys
    for r in host[:6]:  # answered by a node: the record names it
        assert r["node"] in NODES
    assert recs[0]["kind"] == "open" and recs[-1]["kind"] == "close"
    assert [r for r in recs if r["kind"] == "checkpoint"]
    assert [r["seq"] for r in recs] == list(range(len(recs)))


def test_verify_passes_then_fails_on_an_edited_copy(
    audited: tuple[Path, Path, list[bytes]], tmp_path: Path
) -> None:
    config, path, _ = audited
    ok = _verify(config, path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "intact" in ok.stdout
    copy = tmp_path / "edited.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"result":"00"', b'"result":"15"')
    copy.write_bytes(b"".join(lines))
    bad = _verify(config, copy)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"{copy}:4 (seq 3): edited" in bad.stdout


def _relink(line: bytes, prev: str) -> bytes:
    """A record whose ``prev`` is replaced and whose MAC is recomputed with the (public) test audit key:
    only the link to the previous record is wrong."""
    rec = json.loads(line)
    rec["prev"] = prev
    body = {k: v for k, v in rec.items() if k != "mac"}
    rec["mac"] = hmac.new(TEST_AUDIT_KEY, canonical(body), hashlib.sha256).hexdigest()
    return canonical(rec) + b"\n"


TAMPERING: dict[str, tuple[Callable[[list[bytes]], bytes], str]] = {
    "deleted": (lambda ls: b"".join(ls[:5] + ls[6:]), ":6 (seq 6): deleted: seq 5 missing"),
    "reordered": (lambda ls: b"".join([*ls[:3], ls[4], ls[3], *ls[5:]]), ":4 (seq 4): reordered"),
    "truncated": (lambda ls: b"".join(ls[:-2]), "truncated: no close record at the end"),
    "truncated-mid-line": (lambda ls: b"".join(ls[:-1]) + ls[-1][:40], "truncated: partial last record"),
    "broken": (lambda ls: b"".join([*ls[:4], _relink(ls[4], "ab" * 32), *ls[5:]]),
               ":5 (seq 4): broken: prev is not the MAC of seq 3"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(TAMPERING))
def test_verify_names_each_tampering_kind(
    audited: tuple[Path, Path, list[bytes]], tmp_path: Path, kind: str
) -> None:
    config, path, _ = audited
    edit, expected = TAMPERING[kind]
    copy = tmp_path / f"{kind}.jsonl"
    copy.write_bytes(edit(path.read_bytes().splitlines(keepends=True)))
    out = _verify(config, copy)
    assert out.returncode == 1, out.stdout + out.stderr
    assert expected in out.stdout, out.stdout
    assert "edited" not in out.stdout  # each kind is named as itself
    assert "NOT intact" in out.stdout


def test_no_secret_in_the_audit_file(audited: tuple[Path, Path, list[bytes]], siem: SiemReceiver) -> None:
    _, path, secrets = audited
    for data in (path.read_bytes().upper(), b"\n".join(siem.messages()).upper()):
        for secret in secrets:
            assert secret.upper() not in data


def test_the_siem_gets_every_record(audited: tuple[Path, Path, list[bytes]], siem: SiemReceiver) -> None:
    _, path, _ = audited
    lines = path.read_bytes().splitlines()
    wait_for(lambda: len(siem.messages()) >= len(lines))
    messages = siem.messages()
    assert len(messages) == len(lines)
    for message, line in zip(messages, lines, strict=True):
        rec = json.loads(line)
        m = re.fullmatch(rb"(<\d+>1 \S+ \S+ \S+ \d+ \S+) (\[[^\]]*\]) (.*)", message, re.S)
        assert m, message[:100]
        head, sd, msg = m.groups()
        pri = 18 * 8 + (6 if rec.get("result", "00") == "00" else 5)
        assert head.split(b" ") == [f"<{pri}>1".encode(), rec["time"].encode(), b"hsm-proxy-7", b"hsmproxy",
                                    head.split(b" ")[4], rec["kind"].encode()]  # fmt: skip
        result = f' result="{rec["result"]}"' if "result" in rec else ""
        assert sd == f'[hsmproxy@32473 seq="{rec["seq"]}" kind="{rec["kind"]}"{result}]'.encode()
        assert msg == line


# -- keystore life cycle ---------------------------------------------------------------------------


def _kcv(clear: bytes) -> str:
    with legacy_tdes():
        return bytes(psec.des.encrypt_tdes_ecb(clear, bytes(8))).hex().upper()[:6]


def _keys_cli(config: Path, *args: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hsmproxy.cli", "keys", args[0], "--config", str(config), "--actor", "alice",
         "--name", "zpk-a", *args[1:]],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def _key_records(path: Path) -> list[dict[str, Any]]:
    return [r for r in _records(path) if r["kind"] == "key"] if path.exists() else []


def test_key_lifecycle_steps_are_audited_exactly_once(tmp_path: Path) -> None:
    config = make_nodes(tmp_path)
    db, audit_path = tmp_path / "keys.db", tmp_path / "audit.jsonl"
    with config.open("a") as fh:
        fh.write(f'[keystore]\nurl = "sqlite:///{db}"\nrotation_interval = 3600\nrefresh_interval = 0.2\n')
        fh.write(f'[audit]\npath = "{audit_path}"\nkey_id = "00"\n')
    za = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_A)
    kcv = _kcv(ZPK_A)
    now = datetime.now(UTC)
    store = KeyStore.open(f"sqlite:///{db}")
    try:
        store.create(
            KeyRecord(
                tenant="default", name="zpk-a", version=1, key_type="ZPK", type_code="001", lmk_id="00",
                cryptogram=za, kcv=kcv, state=KeyState.ACTIVE, activation_date=None, expiry_date=None,
                grace_until=None, rotate_every=None, grace_period=None, created_at=now, updated_at=now,
                created_by="",
            ),
            actor="bob", reason="test key",
        )  # fmt: skip
    finally:
        store.close()
    zx = encrypt_key_under_lmk(TEST_LMK, "001", "X", ZPK_B).encode()
    block = _enc(ZPK_A, psec.pinblock.encode_pinblock_iso_0(PIN, PAN)).hex().upper().encode()
    settings = load_settings(config)
    rp = start_proxy(settings)
    try:
        wait_for(lambda: len(_key_records(audit_path)) == 1)  # made before the proxy ran
        client = HsmClient("127.0.0.1", rp.port)
        try:
            assert client.call(_cc_request(za.encode(), zx, block))[:4] == b"CD00"
        finally:
            client.close()
        _keys_cli(config, "suspend")  # other processes change the keystore while the proxy runs
        _keys_cli(config, "resume")
        wait_for(lambda: len(_key_records(audit_path)) == 3)
    finally:
        rp.stop()
    _keys_cli(config, "revoke", "--reason", "compromised")  # while no proxy runs
    rp = start_proxy(settings)
    try:
        wait_for(lambda: len(_key_records(audit_path)) >= 4)
        client = HsmClient("127.0.0.1", rp.port)
        try:  # the revoked key is refused, and the record says which key it was
            assert client.call(_cc_request(za.encode(), zx, block))[:4] == b"CD29"
        finally:
            client.close()
    finally:
        rp.stop()
    recs = _records(audit_path)
    keys = [r for r in recs if r["kind"] == "key"]
    assert [r["history_id"] for r in keys] == [1, 2, 3, 4]  # each step once, across the restart
    steps = [(r["action"], r["from_state"], r["to_state"], r["actor"]) for r in keys]
    assert steps == [
        ("created", None, "active", "bob"),
        ("suspended", "active", "suspended", "alice"),
        ("activated", "suspended", "active", "alice"),
        ("revoked", "active", "revoked", "alice"),
    ]
    for r in keys:
        assert (r["tenant"], r["key"], r["version"], r["kcv"]) == ("default", "zpk-a", 1, kcv)
    assert keys[3]["reason"] == "compromised"
    used, refused = [r for r in recs if r["kind"] == "hostcmd"]
    assert used["key_ids"] == [{"key": "default/zpk-a@1", "kcv": kcv}] and used["node"] in NODES
    assert refused["key_ids"] == used["key_ids"] and refused["node"] is None and refused["result"] == "29"
    assert [r["kind"] for r in recs].count("open") == 2
    assert all(r["key_cursor"] == 4 for r in recs[-1:])
    out = _verify(config, audit_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert za.encode() not in audit_path.read_bytes().upper()


# -- fail open / fail closed -----------------------------------------------------------------------


@pytest.mark.parametrize("fail_closed", [False, True])
def test_when_the_audit_cannot_be_written(proxy_config: Path, tmp_path: Path, fail_closed: bool) -> None:
    """The audit key id 99 exists on no node, so no record can be MACed and the queue fills up."""
    base = load_settings(proxy_config)
    audit = replace(
        load_settings(proxy_config).audit or _audit_settings(tmp_path),
        key_id="99", max_pending=3, fail_closed=fail_closed,
    )  # fmt: skip
    settings = replace(base, audit=audit)
    za = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_A).encode()
    zx = encrypt_key_under_lmk(TEST_LMK, "001", "X", ZPK_B).encode()
    block = _enc(ZPK_A, psec.pinblock.encode_pinblock_iso_0(PIN, PAN)).hex().upper().encode()
    rp = start_proxy(settings)
    try:
        client = HsmClient("127.0.0.1", rp.port)
        try:
            codes = [client.call(_cc_request(za, zx, block))[2:4] for _ in range(6)]
        finally:
            client.close()
        writer = rp.proxy.audit
        assert writer is not None
        dropped = writer.dropped
    finally:
        rp.stop()
    if fail_closed:  # open record + 2 commands fill the queue: the rest is refused (41, no node)
        assert codes == [b"00", b"00", b"41", b"41", b"41", b"41"]
    else:  # served; the records that did not fit are counted as lost
        assert codes == [b"00"] * 6
    assert dropped >= 3


def _audit_settings(tmp_path: Path) -> Any:
    from hsmproxy.audit import AuditSettings

    return AuditSettings(str(tmp_path / "audit.jsonl"))


# -- audit key ceremony ----------------------------------------------------------------------------


def test_audit_key_from_components(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lmk load --audit-components 2``: the node's audit key is the XOR of the typed components."""
    import asyncio
    import getpass

    from hsmproxy.audit import AuditSettings, AuditWriter, software_chain_mac
    from hsmproxy.cli import main
    from hsmproxy.server.hostcmd import CommandRecord

    config = make_nodes(tmp_path, ("node-a",))
    c1, c2 = bytes(range(32)), bytes(range(100, 132))
    key = bytes(a ^ b for a, b in zip(c1, c2, strict=True))
    typed = iter([c1.hex(), c2.hex().upper()])
    monkeypatch.setattr(getpass, "getpass", lambda _prompt="": next(typed))
    capsys.readouterr()
    assert main(["lmk", "load", "--all", "--audit-components", "2", "--audit-id", "07",
                 "--config", str(config)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    cv = hmac.new(key, bytes(16), hashlib.sha256).hexdigest()[:6].upper()  # check value: independent
    assert f"audit key 07 check value: {cv}" in out and "node-a: LMK 07 (audit) loaded" in out
    assert c1.hex() not in out.lower() and key.hex() not in out.lower()
    path = tmp_path / "audit.jsonl"

    async def write() -> None:
        w = AuditWriter(AuditSettings(str(path), key_id="07"), software_chain_mac(key))
        await w.start()
        w.observe(CommandRecord("host", "default", "127.0.0.1:1", "NC", "00", 0.0, b"0000"))
        await w.stop()

    asyncio.run(write())
    assert main(["audit", "verify", str(path), "--config", str(config), "--key-id", "07"]) == 0
    assert main(["audit", "verify", str(path), "--config", str(config), "--key-id", "00"]) == 1
    assert "edited" in capsys.readouterr().out  # the test key 00 is another key
