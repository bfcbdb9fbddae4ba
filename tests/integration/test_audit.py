"""Audit trail on a live proxy with two SoftHSM2 nodes: records, checkpoints signed inside the nodes,
`hsmproxy audit verify|prove|verify-proof` offline against every tampering kind, the SIEM as a witness,
keystore life-cycle records, a missing signing key, a kill -9 with ``ack_after_durable``, and format-1
(HMAC) trails that keep verifying on a node."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psec
import pytest

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk
from hsmproxy.audit.checkpoint import PinnedKeys
from hsmproxy.audit.form import canonical
from hsmproxy.config import load_settings
from hsmproxy.keys.store import KeyRecord, KeyState, KeyStore
from protocols.framing import Framer, encode_frame
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import AUDIT_KEYS, make_nodes, start_proxy
from tests.integration.test_console_admin import wait_for
from tests.integration.test_proxy_basic import ZPK_A, ZPK_B, _enc

PAN = "4012345678909"
PIN = "1234"
NODES = ("node-a", "node-b")


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmproxy.cli", *map(str, args)], check=False, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def _verify(keys: Path, *paths: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return _cli("audit", "verify", *paths, "--keys", keys, *extra)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def _cc_request(za: bytes, zx: bytes, block: bytes, fmt: bytes = b"01") -> bytes:
    return b"CC" + za + zx + b"12" + block + b"01" + fmt + PAN[-13:-1].encode()


def _cc_parts() -> tuple[bytes, bytes, bytes]:
    za = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_A).encode()
    zx = encrypt_key_under_lmk(TEST_LMK, "001", "X", ZPK_B).encode()
    block = _enc(ZPK_A, psec.pinblock.encode_pinblock_iso_0(PIN, PAN)).hex().upper().encode()
    return za, zx, block


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
    """The SIEM the audited proxy sends its trail to."""
    receiver = SiemReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, siem: SiemReceiver) -> tuple[Path, Path, list[bytes]]:
    """Run a proxy with [audit] on two nodes, send commands, stop it: (pinned keys, audit file, secrets)."""
    root = tmp_path_factory.mktemp("audit")
    config = make_nodes(root)
    audit_path = root / "audit" / "audit.jsonl"
    port = siem.server_address[1]
    with config.open("a") as fh:
        fh.write(
            f'[audit]\npath = "{audit_path}"\ntrusted_keys = "{root / AUDIT_KEYS}"\ncheckpoint_every = 2\n'
        )
        fh.write(
            f'[audit.syslog]\naddress = "127.0.0.1:{port}"\nhostname = "hsm-proxy-7"\nfacility = "local2"\n'
        )
    za, zx, block = _cc_parts()
    settings = load_settings(config)
    assert settings.audit is not None and settings.audit.path == str(audit_path)
    rp = start_proxy(settings)
    try:
        client = HsmClient("127.0.0.1", rp.port, header=b"AB12")
        try:
            assert client.call(b"NC")[:4] == b"ND00"
            for i in range(5):
                client.header = b"AB%02d" % i
                assert client.call(_cc_request(za, zx, block))[:4] == b"CD00"
                time.sleep(0.05)  # separate batches: several checkpoints
            assert client.call(_cc_request(za, zx, block, b"99"))[:4] != b"CD00"
            assert client.call(b"ZZ")[2:4] == b"68"
        finally:
            client.close()
    finally:
        rp.stop()
    secrets = [block, za, zx, PAN.encode(), PAN[-13:-1].encode(), ZPK_A.hex().upper().encode()]
    return root / AUDIT_KEYS, audit_path, secrets


def test_records_have_the_right_fields(audited: tuple[Path, Path, list[bytes]]) -> None:
    _, path, _ = audited
    recs = [r for r in _records(path) if "seq" in r]
    host = [r for r in recs if r["kind"] == "hostcmd"]
    assert [r["command"] for r in host] == ["NC"] + ["CC"] * 6  # executed on a node: one record each
    assert [r["correlation"] for r in host[1:6]] == [(b"AB%02d" % i).hex().upper() for i in range(5)]
    assert [r["result"] for r in host][:6] == ["00"] * 6 and host[6]["result"] not in ("00", "")
    for r in host:
        assert r["node"] in NODES and r["key_ids"] == []
        assert r["tenant"] == "default" and r["listener"] == "host" and r["client"].startswith("127.0.0.1:")
    # answered without a node: counted per (tenant, listener, command, result)
    agg = [(r["command"], r["result"], r["count"]) for r in recs if r["kind"] == "aggregate"]
    assert agg == [("ZZ", "68", 1)]
    assert recs[0]["kind"] == "open" and recs[-1]["kind"] == "close"
    assert [r["seq"] for r in recs] == list(range(len(recs)))


def test_checkpoints_are_signed_inside_the_nodes(audited: tuple[Path, Path, list[bytes]]) -> None:
    keys, path, _ = audited
    cps = [r for r in _records(path) if r.get("kind") == "checkpoint"]
    assert len(cps) >= 3 and {cp["node"] for cp in cps} <= set(NODES)
    pinned = PinnedKeys.load(keys)
    assert all(pinned.verify(cp) == "" for cp in cps)
    assert (
        path.read_bytes().splitlines()[-1].startswith(b'{"alg":"ecdsa-p256-sha256"')
    )  # the file ends sealed


def test_verify_passes_then_fails_on_an_edited_copy(
    audited: tuple[Path, Path, list[bytes]], tmp_path: Path
) -> None:
    keys, path, _ = audited
    ok = _verify(keys, path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "intact" in ok.stdout and "signed by" in ok.stdout
    copy = tmp_path / "edited.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    i = next(i for i, x in enumerate(lines) if b'"kind":"hostcmd"' in x)
    lines[i] = lines[i].replace(b'"result":"00"', b'"result":"15"')
    copy.write_bytes(b"".join(lines))
    bad = _verify(keys, copy)
    assert bad.returncode == 1 and "edited" in bad.stdout and "NOT intact" in bad.stdout, bad.stdout


def _seq_line(ls: list[bytes], seq: int) -> int:
    return next(i for i, x in enumerate(ls) if json.loads(x).get("seq") == seq)


def _cps(ls: list[bytes]) -> list[int]:
    return [i for i, x in enumerate(ls) if b'"kind":"checkpoint"' in x]


def _forge(ls: list[bytes]) -> list[bytes]:
    cp = json.loads(ls[_cps(ls)[0]])
    cp["root"] = "00" * 32
    return [*ls[: _cps(ls)[0]], canonical(cp) + b"\n", *ls[_cps(ls)[0] + 1 :]]


TAMPERING: dict[str, tuple[Callable[[list[bytes]], list[bytes]], str]] = {
    "deleted": (lambda ls: ls[: _seq_line(ls, 3)] + ls[_seq_line(ls, 3) + 1 :],
                "(seq 4): deleted: seq 3 missing"),
    "inserted": (lambda ls: [*ls[: _seq_line(ls, 3) + 1], ls[_seq_line(ls, 3)], *ls[_seq_line(ls, 3) + 1 :]],
                 "(seq 3): inserted"),
    "reordered": (lambda ls: [*ls[: _seq_line(ls, 3)], ls[_seq_line(ls, 4)], ls[_seq_line(ls, 3)],
                              *ls[_seq_line(ls, 4) + 1 :]], "reordered"),
    "truncated": (lambda ls: [*ls[:-1], ls[-1][:40]], "truncated: partial last line"),
    "unsealed": (lambda ls: ls[: _cps(ls)[-1]], "unsealed: seq"),
    "forged": (_forge, "forged: checkpoint"),
    "swapped": (lambda ls: [*ls[: _cps(ls)[0]], ls[_cps(ls)[1]], *ls[_cps(ls)[0] + 1 : _cps(ls)[1]],
                            ls[_cps(ls)[0]], *ls[_cps(ls)[1] + 1 :]], "swapped"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(TAMPERING))
def test_verify_names_each_tampering_kind(
    audited: tuple[Path, Path, list[bytes]], tmp_path: Path, kind: str
) -> None:
    keys, path, _ = audited
    edit, expected = TAMPERING[kind]
    copy = tmp_path / f"{kind}.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    copy.write_bytes(b"".join(edit(lines)))
    out = _verify(keys, copy)
    assert out.returncode == 1, out.stdout + out.stderr
    assert expected in out.stdout, out.stdout
    assert "NOT intact" in out.stdout


def test_the_siem_copy_witnesses_a_truncation(
    audited: tuple[Path, Path, list[bytes]], siem: SiemReceiver, tmp_path: Path
) -> None:
    keys, path, _ = audited
    lines = path.read_bytes().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[: _cps(lines)[-2] + 1]))  # back to an earlier checkpoint: looks whole
    assert _verify(keys, cut).returncode == 0
    witness = tmp_path / "siem.log"
    witness.write_bytes(b"\n".join(siem.messages()) + b"\n")
    out = _verify(keys, cut, extra=("--witness", str(witness)))
    assert out.returncode == 1 and "truncated" in out.stdout and "witness" in out.stdout, out.stdout
    assert _verify(keys, path, extra=("--witness", str(witness))).returncode == 0


def test_a_record_is_proved_alone(audited: tuple[Path, Path, list[bytes]], tmp_path: Path) -> None:
    keys, path, _ = audited
    host = next(r for r in _records(path) if r.get("kind") == "hostcmd")
    proof = tmp_path / "proof.json"
    made = _cli("audit", "prove", str(host["seq"]), path, "--out", proof)
    assert made.returncode == 0, made.stderr
    doc = json.loads(proof.read_text())
    assert json.loads(doc["record"]) == host and doc["format"] == "hsmproxy-audit-proof/1"
    checked = _cli("audit", "verify-proof", proof, "--keys", keys)
    assert checked.returncode == 0 and f"record {host['seq']} is in checkpoint" in checked.stdout, (
        checked.stdout
    )
    doc["record"] = doc["record"].replace('"result":"00"', '"result":"01"')
    proof.write_text(json.dumps(doc))
    assert _cli("audit", "verify-proof", proof, "--keys", keys).returncode == 1


def test_no_secret_in_the_audit_file(audited: tuple[Path, Path, list[bytes]], siem: SiemReceiver) -> None:
    _, path, secrets = audited
    for data in (path.read_bytes().upper(), b"\n".join(siem.messages()).upper()):
        for secret in secrets:
            assert secret.upper() not in data


def test_the_siem_gets_every_line(audited: tuple[Path, Path, list[bytes]], siem: SiemReceiver) -> None:
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
        seq = f'seq="{rec["seq"]}" ' if "seq" in rec else ""
        result = f' result="{rec["result"]}"' if "result" in rec else ""
        assert sd == f'[hsmproxy@32473 {seq}kind="{rec["kind"]}"{result}]'.encode()
        assert msg == line


# -- keystore life cycle ---------------------------------------------------------------------------


def _kcv(clear: bytes) -> str:
    with legacy_tdes():
        return bytes(psec.des.encrypt_tdes_ecb(clear, bytes(8))).hex().upper()[:6]


def _keys_cli(config: Path, *args: str) -> None:
    out = _cli("keys", args[0], "--config", config, "--actor", "alice", "--name", "zpk-a", *args[1:])
    assert out.returncode == 0, out.stderr


def _key_records(path: Path) -> list[dict[str, Any]]:
    return [r for r in _records(path) if r.get("kind") == "key"] if path.exists() else []


def test_key_lifecycle_steps_are_audited_exactly_once(tmp_path: Path) -> None:
    config = make_nodes(tmp_path)
    db, audit_path = tmp_path / "keys.db", tmp_path / "audit.jsonl"
    with config.open("a") as fh:
        fh.write(f'[keystore]\nurl = "sqlite:///{db}"\nrotation_interval = 3600\nrefresh_interval = 0.2\n')
        fh.write(f'[audit]\npath = "{audit_path}"\ntrusted_keys = "{tmp_path / AUDIT_KEYS}"\n')
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
    _, zx, block = _cc_parts()
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
        try:  # the revoked key is refused before a node: counted, not recorded one by one
            assert client.call(_cc_request(za.encode(), zx, block))[:4] == b"CD29"
        finally:
            client.close()
    finally:
        rp.stop()
    recs = [r for r in _records(audit_path) if "seq" in r]
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
    (used,) = [r for r in recs if r["kind"] == "hostcmd"]
    assert used["key_ids"] == [{"key": "default/zpk-a@1", "kcv": kcv}] and used["node"] in NODES
    refused = [r for r in recs if r["kind"] == "aggregate" and r["result"] == "29"]
    assert [(r["command"], r["count"]) for r in refused] == [("CC", 1)]
    assert [r["kind"] for r in recs].count("open") == 2
    assert recs[-1]["kind"] == "close" and recs[-1]["key_cursor"] == 4
    out = _verify(tmp_path / AUDIT_KEYS, audit_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert za.encode() not in audit_path.read_bytes().upper()


# -- a node without the signing key, a crash ---------------------------------------------------------


def test_without_a_signing_key_the_trail_is_written_and_left_unsealed(tmp_path: Path) -> None:
    """key_id 99 exists on no node: records are still written and commands served; the tail is unsealed."""
    config = make_nodes(tmp_path)
    audit_path = tmp_path / "audit.jsonl"
    with config.open("a") as fh:
        fh.write(f'[audit]\npath = "{audit_path}"\nkey_id = "99"\n')
    za, zx, block = _cc_parts()
    rp = start_proxy(load_settings(config))
    try:
        client = HsmClient("127.0.0.1", rp.port)
        try:
            codes = [client.call(_cc_request(za, zx, block))[2:4] for _ in range(6)]
        finally:
            client.close()
    finally:
        rp.stop()
    assert codes == [b"00"] * 6
    assert len([r for r in _records(audit_path) if r.get("kind") == "hostcmd"]) == 6
    out = _verify(tmp_path / AUDIT_KEYS, audit_path)
    assert out.returncode == 1 and "unsealed" in out.stdout and "0 checkpoints" in out.stdout, out.stdout
    live = _verify(tmp_path / AUDIT_KEYS, audit_path, extra=("--live",))
    assert live.returncode == 0 and "unsealed: seq 0.." in live.stdout, live.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "hsmproxy.cli", "--log-level", "WARNING", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, 60)


def test_every_answered_command_is_in_the_trail_after_a_kill_9_with_ack_after_durable(tmp_path: Path) -> None:
    config = make_nodes(tmp_path)
    port = _free_port()
    text = config.read_text().replace('bind = "127.0.0.1:0"', f'bind = "127.0.0.1:{port}"')
    audit_path = tmp_path / "audit" / "audit.jsonl"
    config.write_text(text + f'[audit]\npath = "{audit_path}"\ntrusted_keys = "{tmp_path / AUDIT_KEYS}"\n'
                      "ack_after_durable = true\n")  # fmt: skip
    za, zx, block = _cc_parts()
    proc = _serve(config)
    answered: list[bytes] = []  # headers of the requests answered 00 (executed on a node)
    refused = 0  # answered 41 under the burst (admission): no node, only counted

    def take(frames: list[bytes]) -> None:
        nonlocal refused
        for frame in frames:
            assert frame[4:6] == b"CD" and frame[6:8] in (b"00", b"41"), frame[:8]
            if frame[6:8] == b"00":
                answered.append(frame[:4])
            else:
                refused += 1

    try:
        _wait_listening(port, proc)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            framer = Framer(65535)
            request = _cc_request(za, zx, block)
            sent = 0
            while len(answered) < 300:  # waves of 32: each answered in full
                wave = range(sent, sent + 32)
                sock.sendall(b"".join(encode_frame(b"%04d" % i + request) for i in wave))
                sent += 32
                before = len(answered) + refused
                while len(answered) + refused < before + 32:
                    take(framer.feed(sock.recv(65536)))
            # one more wave in flight, the first of its answers read: then the writer dies with all it held
            sock.sendall(b"".join(encode_frame(b"%04d" % i + request) for i in range(sent, sent + 64)))
            take(framer.feed(sock.recv(65536)))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            sock.settimeout(2)
            try:
                while chunk := sock.recv(65536):
                    take(framer.feed(chunk))
            except OSError:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
    recorded = {bytes.fromhex(r["correlation"]) for r in _records(audit_path) if r.get("kind") == "hostcmd"}
    assert set(answered) <= recorded  # every answer a client received has its record on disk
    assert len(recorded) >= len(answered) >= 300
    crashed = _verify(tmp_path / AUDIT_KEYS, audit_path, extra=("--live",))
    assert "truncated" not in crashed.stdout or "partial last line" in crashed.stdout, crashed.stdout
    restart = _serve(config)  # the next start cuts a torn line and seals what the crash left open
    try:
        _wait_listening(port, restart)
    finally:
        restart.send_signal(signal.SIGTERM)
        restart.wait(60)
        if restart.stderr is not None:
            restart.stderr.close()
    out = _verify(tmp_path / AUDIT_KEYS, audit_path)
    assert out.returncode == 0, out.stdout + out.stderr


# -- format-1 trails ----------------------------------------------------------------------------------


def test_format_1_trails_keep_verifying_with_the_nodes_hmac_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lmk load --audit-components 2`` makes the format-1 HMAC key; a format-1 file written with it
    (by the test, as the old writer did) verifies on the node, and fails under another key."""
    import getpass

    from hsmproxy.cli import main

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
    path = tmp_path / "v1.jsonl"
    prev, lines = "0" * 64, []
    for seq, body in enumerate([{"kind": "open", "reason": "new"}, {"kind": "hostcmd", "result": "00"},
                                {"kind": "close", "reason": "stop"}]):  # fmt: skip
        rec = {**body, "seq": seq, "time": "2026-11-27T00:00:00.000Z", "prev": prev}
        prev = hmac.new(key, canonical(rec), hashlib.sha256).hexdigest()
        lines.append(canonical({**rec, "mac": prev}))
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert main(["audit", "verify", str(path), "--config", str(config), "--hmac-key-id", "07"]) == 0
    assert "format 1" in capsys.readouterr().out
    assert main(["audit", "verify", str(path), "--config", str(config), "--hmac-key-id", "00"]) == 1
    assert "edited" in capsys.readouterr().out  # the test key 00 is another key
