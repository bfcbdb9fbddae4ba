"""The admin console with users and roles on a running proxy (two SoftHSM2 nodes, two tenants, audit on).

Login (one-line and two-line), refusals by role (each audited), every SHOW command against what the
proxy really holds, CONFIGCMDS / CONFIGPB changing wire answers per tenant, KILL CLIENT, AUDIT
VERIFY / TAIL. The passwords never appear in the audit file or a console reply.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psec
import pytest

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk, kcv_tdes
from hsmproxy.config import load_settings
from hsmproxy.keys.store import KeyRecord, KeyState, KeyStore
from hsmproxy.server.console import hash_password
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import RunningProxy, make_nodes, start_proxy
from tests.integration.test_proxy_basic import ZPK_A, ZPK_B, _dec, _enc

PAN = "4012345678909"
PASSWORDS = {"alice": "alice-Secret-1", "oscar": "oscar-Secret-2", "audrey": "audrey-Secret-3"}
ROLES = {"alice": "admin", "oscar": "operator", "audrey": "auditor"}


def users_toml() -> str:
    """``[[console.users]]`` for alice (admin), oscar (operator), audrey (auditor)."""
    out = []
    for name, password in PASSWORDS.items():
        out.append(
            f'[[console.users]]\nname = "{name}"\nrole = "{ROLES[name]}"\n'
            f'password_hash = "{hash_password(password, log2_n=10)}"\n'
        )
    return "\n".join(out)


def write_config(config: Path, root: Path, tenant_b: str = "", users: bool = True, extra: str = "") -> Path:
    """The make_nodes config plus a second tenant on its own listener, audit, console (users)."""
    text = config.read_text().replace("[proxy]\n", "[proxy]\ndrain_timeout = 20.0\n", 1)
    text += (
        '\n[[listeners]]\nname = "host-b"\nbind = "127.0.0.1:0"\nheader_length = 4\ntenant = "bank-b"\n'
        f'\n[[tenants]]\nname = "bank-b"\nlmk_ids = ["00", "01"]\n{tenant_b}\n'
        f'\n[audit]\npath = "{root / "audit" / "audit.jsonl"}"\nfsync = "never"\n'
        '\n[console]\nbind = "127.0.0.1:0"\n\n'
    )
    if users:
        text += users_toml()
    out = root / "admin.toml"
    out.write_text(text + extra)
    return out


@dataclass
class Env:
    """A running proxy with its config file and audit path."""

    rp: RunningProxy
    config: Path
    audit: Path

    @property
    def port_a(self) -> int:
        """Listener of tenant default."""
        return self.rp.proxy.ports[0]

    @property
    def port_b(self) -> int:
        """Listener of tenant bank-b."""
        return self.rp.proxy.ports[1]

    def console(self, user: str | None = None) -> Console:
        """A console session, logged in as ``user`` when given."""
        c = Console(self.rp.proxy.console_port)
        if user is not None:
            assert c.cmd(f"LOGIN {user} {PASSWORDS[user]}") == [f"OK logged in as {user} ({ROLES[user]})"]
        return c


class Console:
    """A console session: one command line out, the reply (up to the empty line) back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.replies: list[str] = []

    def cmd(self, line: str) -> list[str]:
        """Send ``line``; return the reply lines."""
        self.sock.sendall(line.encode() + b"\n")
        while b"\n\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "console closed the connection"
            self.buf += chunk
        reply, _, self.buf = self.buf.partition(b"\n\n")
        self.replies.append(reply.decode())
        return reply.decode().split("\n")

    def json(self, line: str) -> Any:
        """Send ``line JSON``; the parsed reply."""
        reply = self.cmd(f"{line} JSON")
        assert len(reply) == 1 and not reply[0].startswith(("ERR", "DENIED")), reply
        return json.loads(reply[0])

    def closed(self) -> bool:
        """True once the console has closed this session."""
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False

    def close(self) -> None:
        """Close the session."""
        self.sock.close()


def rows(lines: list[str]) -> list[dict[str, str]]:
    """Parse a console table (columns start where the header's words start)."""
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    out = []
    for line in lines[1:]:
        bounds = [*starts[1:], None]
        out.append({n: line[s:e].strip() for n, s, e in zip(names, starts, bounds, strict=True)})
    return out


def wait_for(check: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll ``check()`` until truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def audit_records(path: Path) -> list[dict[str, object]]:
    """Every complete record of the audit file."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line.strip()]


def console_records(path: Path, user: str, command: str) -> list[dict[str, object]]:
    """The ``console`` audit records of ``user`` whose command starts with ``command``."""
    return [
        r
        for r in audit_records(path)
        if r.get("kind") == "console"
        and r.get("user") == user
        and str(r.get("command", "")).startswith(command)
    ]


def cc_request(fmt: str = "01") -> bytes:
    """CC: PIN 1234 under ZPK_A (format ``fmt`` in, 01 out) to ZPK_B."""
    za = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_A)
    zx = encrypt_key_under_lmk(TEST_LMK, "001", "X", ZPK_B)
    block = _enc(ZPK_A, psec.pinblock.encode_pinblock_iso_0("1234", PAN)).hex().upper()
    return f"CC{za}{zx}12{block}{fmt}01{PAN[-13:-1]}".encode()


def check_cc(resp: bytes) -> None:
    """A CC answer that really carries PIN 1234 under ZPK_B (independent decryption with psec)."""
    assert resp[:6] == b"CD0004", resp[:6]
    out = _dec(ZPK_B, bytes.fromhex(resp[6:22].decode()))
    assert psec.pinblock.decode_pinblock_iso_0(out, PAN) == "1234"


def call(port: int, payload: bytes) -> bytes:
    """One host command on a new connection."""
    client = HsmClient("127.0.0.1", port)
    try:
        return client.call(payload)
    finally:
        client.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """Proxy with users, two tenants, audit and console; stopped after the module."""
    root = tmp_path_factory.mktemp("console-admin")
    config = write_config(make_nodes(root), root)
    rp = start_proxy(load_settings(config))
    try:
        assert rp.proxy.console is not None
        rp.proxy.console.failure_delay = 0.0
        yield Env(rp, config, root / "audit" / "audit.jsonl")
    finally:
        rp.stop()


def test_login(env: Env) -> None:
    c = env.console()
    try:
        assert c.cmd("SHOW NODES")[0].startswith("DENIED login first")
        assert c.cmd("HELP")[0].startswith("HELP")  # open before login
        # a password typed without LOGIN first is neither echoed nor audited
        assert c.cmd("Typed-Too-Soon secret words") == ["ERR unknown command; try HELP"]
        assert c.cmd("LOGIN alice wrong-password") == ["DENIED login failed"]
        assert c.cmd("LOGIN mallory whatever") == ["DENIED login failed"]
        assert c.cmd("WHOAMI") == [
            "user: -",
            "role: -",
            f"client: {c.sock.getsockname()[0]}:{c.sock.getsockname()[1]}",
        ]
        assert c.cmd("LOGIN alice") == ["PASSWORD?"]  # two-line form
        assert c.cmd(PASSWORDS["alice"]) == ["OK logged in as alice (admin)"]
        assert c.json("WHOAMI") == {
            "user": "alice",
            "role": "admin",
            "client": f"127.0.0.1:{c.sock.getsockname()[1]}",
        }
    finally:
        c.close()
    # three failures close the session
    c = env.console()
    try:
        for _ in range(3):
            assert c.cmd("LOGIN oscar nope") == ["DENIED login failed"]
        wait_for(c.closed)
    finally:
        c.close()
    wait_for(lambda: len(console_records(env.audit, "-", "LOGIN oscar")) == 3)
    failed = console_records(env.audit, "-", "LOGIN")
    assert {r["command"] for r in failed} == {"LOGIN alice", "LOGIN mallory", "LOGIN oscar"}
    assert all(r["result"] == "denied" and r["role"] == "-" for r in failed)
    ok = console_records(env.audit, "alice", "LOGIN")
    assert [r["result"] for r in ok][:1] == ["ok"] and ok[0]["role"] == "admin"
    # five failures of one user from one address: that user is locked out from there
    for attempts in (3, 2):
        c = env.console()
        try:
            for _ in range(attempts):
                assert c.cmd("LOGIN eve guess") == ["DENIED login failed"]
            if attempts == 2:
                assert c.cmd("LOGIN eve guess") == [
                    "DENIED too many failed logins for this user from this address; try again later"
                ]
                assert c.cmd(f"LOGIN alice {PASSWORDS['alice']}") == ["OK logged in as alice (admin)"]
        finally:
            c.close()
    data = env.audit.read_bytes()
    for secret in (*PASSWORDS.values(), "wrong-password", "whatever", "Typed-Too-Soon"):
        assert secret.encode() not in data
    assert console_records(env.audit, "-", "(unknown command)")


def test_roles_are_enforced_and_audited(env: Env) -> None:
    auditor, operator = env.console("audrey"), env.console("oscar")
    try:
        assert auditor.cmd("SET NODE node-a STATE DRAIN test") == [
            "DENIED SET NODE needs role operator (you are auditor)"
        ]
        assert operator.cmd("SHUTDOWN") == ["DENIED SHUTDOWN needs role admin (you are operator)"]
        assert operator.cmd("CONFIGCMDS default DISABLE CC")[0].startswith(
            "DENIED CONFIGCMDS needs role admin"
        )
        assert auditor.cmd("RELOAD")[0].startswith("DENIED")
        assert auditor.cmd("KILL CLIENT 1")[0].startswith("DENIED")
        router = env.rp.proxy.router
        assert router is not None and router.state("node-a").admin.value == "READY"
        # what each may do
        assert rows(auditor.cmd("SHOW NODES"))[0]["NAME"] == "node-a"
        help_auditor = "\n".join(auditor.cmd("HELP"))
        assert (
            "AUDIT VERIFY" in help_auditor
            and "SET NODE" not in help_auditor
            and "SHUTDOWN" not in help_auditor
        )
        assert operator.cmd("SET NODE node-a STATE DRAIN test") == ["OK node-a READY -> DRAIN"]
        assert operator.cmd("SET NODE node-a STATE READY test") == ["OK node-a DRAIN -> READY"]
    finally:
        auditor.close()
        operator.close()
    wait_for(lambda: console_records(env.audit, "oscar", "SET NODE node-a STATE READY"))
    denied = console_records(env.audit, "audrey", "SET NODE")
    assert [(r["role"], r["result"], r["command"]) for r in denied] == [
        ("auditor", "denied", "SET NODE node-a STATE DRAIN test")
    ]
    assert [r["result"] for r in console_records(env.audit, "oscar", "SHUTDOWN")] == ["denied"]
    assert [r["result"] for r in console_records(env.audit, "oscar", "SET NODE")] == ["ok", "ok"]
    assert all(str(r["client"]).startswith("127.0.0.1:") for r in denied)


def test_show_commands(env: Env) -> None:
    c = env.console("audrey")
    client = HsmClient("127.0.0.1", env.port_b)
    try:
        stats_before = {r["command"]: r for r in c.json("SHOW STATS")}
        for _ in range(3):
            assert client.call(b"NC")[:4] == b"ND00"
        nc = client.call(b"NC")
        bad = client.call(cc_request("99"))  # an unknown PIN block format: an error answer
        assert bad[:2] == b"CD" and bad[2:4] != b"00"
        # VR, QH
        vr = c.json("VR")
        assert isinstance(vr, dict) and vr["product"] == "hsmproxy" and vr["version"] == "0.1.0"
        qh = c.json("QH")
        assert isinstance(qh, dict)
        assert (qh["state"], qh["nodes_up"], qh["nodes_total"]) == ("OK", 2, 2)
        assert qh["nodes"] == {"node-a": "READY/UP", "node-b": "READY/UP"} and qh["connections"] >= 1
        # GETCMDS
        cmds = {r["COMMAND"]: r for r in rows(c.cmd("GETCMDS"))}
        assert cmds["CC"] == {"COMMAND": "CC", "BANK-B": "on", "DEFAULT": "on"}
        assert {"NC", "CA", "CC", "B2"} <= set(cmds)
        # SHOW CLIENTS: this connection, with its request count
        mine = [
            r for r in rows(c.cmd("SHOW CLIENTS")) if r["PEER"] == f"127.0.0.1:{client.sock.getsockname()[1]}"
        ]
        assert len(mine) == 1
        assert (mine[0]["LISTENER"], mine[0]["TENANT"], mine[0]["REQUESTS"], mine[0]["IN_FLIGHT"]) == (
            "host-b", "bank-b", "5", "0",
        )  # fmt: skip
        assert mine[0]["SINCE"].endswith("Z")
        # SHOW STATS: exact deltas
        stats = {r["command"]: r for r in c.json("SHOW STATS")}
        before_nc = stats_before.get("NC", {"count": 0})["count"]
        assert stats["NC"]["count"] - before_nc == 4
        before_cc = stats_before.get("CC", {"count": 0, "non00": 0})
        assert (
            stats["CC"]["count"] - before_cc["count"] == 1 and stats["CC"]["non00"] - before_cc["non00"] == 1
        )
        assert stats["NC"]["max_ms"] >= stats["NC"]["avg_ms"] > 0
        # SHOW ERRORS: the CC error, no payload
        errors = rows(c.cmd("SHOW ERRORS"))
        assert errors[-1]["COMMAND"] == "CC" and errors[-1]["CODE"] == bad[2:4].decode()
        assert errors[-1]["TENANT"] == "bank-b" and errors[-1]["LISTENER"] == "host-b"
        # SHOW TENANTS
        tenants = {r["name"]: r for r in c.json("SHOW TENANTS")}
        assert set(tenants) == {"default", "bank-b"}
        assert tenants["bank-b"]["lmk_ids"] == ["00", "01"] and tenants["bank-b"]["connections"] == 1
        assert tenants["default"]["commands"] == "all" and tenants["default"]["disabled_cmds"] == []
        # SHOW LMK: check values per tenant and node equal the LMK check NC reports
        lmk = c.json("SHOW LMK")
        assert isinstance(lmk, list)
        checks = {(r["tenant"], r["lmk_id"], r["node"]): r["check"] for r in lmk}
        assert len(checks) == 2 * 2 * 2
        for node in ("node-a", "node-b"):
            assert nc[4:20].decode() == checks[("default", "00", node)] == checks[("bank-b", "00", node)]
            assert len(checks[("default", "01", node)]) == 16
        # SHOW KEYS: no keystore in this config
        assert c.cmd("SHOW KEYS") == ["ERR no [keystore] configured"]
        # SHOW CONFIG: values, secrets masked
        config = c.json("SHOW CONFIG")
        assert isinstance(config, dict)
        assert config["request_timeout"] == 2.0 and config["drain_timeout"] == 20.0
        assert all(n["pin_file"] == "***" for n in config["nodes"])
        assert {u["name"]: u["role"] for u in config["console_users"]} == ROLES
        text = "\n".join(c.cmd("SHOW CONFIG"))
        assert "tenants.bank-b.lmk_ids" in text and "scrypt$" not in text and "/pin" not in text
        # SHOW NODES JSON
        nodes = c.json("SHOW NODES")
        assert isinstance(nodes, list) and [n["name"] for n in nodes] == ["node-a", "node-b"]
    finally:
        client.close()
        c.close()
    for reply in c.replies:
        assert "scrypt$" not in reply and not any(p in reply for p in PASSWORDS.values())


def test_configcmds_per_tenant(env: Env) -> None:
    c = env.console("alice")
    try:
        check_cc(call(env.port_a, cc_request()))
        assert c.cmd("CONFIGCMDS default DISABLE CC") == ["OK default disabled: CC"]
        assert call(env.port_a, cc_request())[:4] == b"CD68"
        check_cc(call(env.port_b, cc_request()))  # the other tenant is unaffected
        assert rows(c.cmd("GETCMDS"))[0].keys() == {"COMMAND", "BANK-B", "DEFAULT"}
        cc_row = next(r for r in rows(c.cmd("GETCMDS")) if r["COMMAND"] == "CC")
        assert (cc_row["DEFAULT"], cc_row["BANK-B"]) == ("off", "on")
        assert c.cmd("CONFIGCMDS default") == ["OK default disabled: CC"]
        assert c.cmd("CONFIGCMDS default DISABLE ZZ")[0].startswith("ERR not an implemented host command")
        assert c.cmd("CONFIGCMDS nobody DISABLE CC") == ["ERR no tenant 'nobody'"]
        assert c.cmd("CONFIGCMDS default ENABLE CC") == ["OK default disabled: (none)"]
        check_cc(call(env.port_a, cc_request()))
    finally:
        c.cmd("CONFIGCMDS default ENABLE CC")
        c.close()


def test_configpb_per_tenant(env: Env) -> None:
    c = env.console("alice")
    try:
        assert c.cmd("CONFIGPB bank-b DISABLE 01") == ["OK bank-b disabled: 01"]
        assert call(env.port_b, cc_request("01"))[:4] == b"CD69"
        check_cc(call(env.port_a, cc_request("01")))
        assert c.cmd("CONFIGPB bank-b ENABLE 01") == ["OK bank-b disabled: (none)"]
        check_cc(call(env.port_b, cc_request("01")))
        assert c.cmd("CONFIGPB bank-b DISABLE X1")[0].startswith("ERR not an PIN block format")
    finally:
        c.cmd("CONFIGPB bank-b ENABLE 01")
        c.close()


def test_kill_client_closes_only_that_connection(env: Env) -> None:
    c = env.console("oscar")
    victim, other = HsmClient("127.0.0.1", env.port_a), HsmClient("127.0.0.1", env.port_a)
    try:
        assert victim.call(b"NC")[:4] == b"ND00" and other.call(b"NC")[:4] == b"ND00"
        port = victim.sock.getsockname()[1]
        ids = {r["PEER"]: r["ID"] for r in rows(c.cmd("SHOW CLIENTS"))}
        target = ids[f"127.0.0.1:{port}"]
        assert c.cmd(f"KILL CLIENT {target}") == [f"OK client {target} closed"]
        with pytest.raises(ConnectionError):
            victim.call(b"NC")
        assert other.call(b"NC")[:4] == b"ND00"
        assert f"127.0.0.1:{port}" not in {r["PEER"] for r in rows(c.cmd("SHOW CLIENTS"))}
        assert c.cmd("KILL CLIENT 999999") == ["ERR no client '999999'; see SHOW CLIENTS"]
    finally:
        victim.close()
        other.close()
        c.close()


def test_audit_verify_and_tail(env: Env) -> None:
    c = env.console("audrey")
    try:
        assert call(env.port_a, b"NC")[:4] == b"ND00"
        report = c.json("AUDIT VERIFY")
        assert isinstance(report, dict)
        assert report["state"] == "intact" and report["problems"] == [] and report["records"] > 10
        assert report["verified_with"] == "the keys the nodes reported (none pinned)"
        sealed = c.cmd("AUDIT CHECKPOINT")
        assert sealed[0].startswith("OK sealed through seq "), sealed
        after = c.json("AUDIT VERIFY")
        assert isinstance(after, dict) and after["state"] == "intact" and after["checkpoints"] >= 1
        tail = c.json("AUDIT TAIL 3")
        assert isinstance(tail, list) and len(tail) == 3
        seqs = [r["seq"] for r in tail if r["kind"] != "checkpoint"]
        assert seqs == sorted(seqs)
        assert tail[-1]["kind"] == "console" and tail[-1]["command"] == "AUDIT VERIFY"
        assert c.cmd("AUDIT TAIL 0")[0].startswith("ERR")
        text = rows(c.cmd("AUDIT TAIL 5"))
        assert len(text) == 5 and text[-1]["KIND"] == "console"
    finally:
        c.close()


def test_unauthenticated_console_without_users(tmp_path: Path) -> None:
    config = write_config(make_nodes(tmp_path), tmp_path, users=False)
    rp = start_proxy(load_settings(config))
    try:
        c = Console(rp.proxy.console_port)
        try:
            assert c.json("WHOAMI") == {
                "user": "-",
                "role": "admin",
                "client": f"127.0.0.1:{c.sock.getsockname()[1]}",
            }
            assert rows(c.cmd("SHOW NODES"))[0]["NAME"] == "node-a"
            assert c.cmd("LOGIN x y") == ["OK no users are configured: this console needs no login"]
            assert c.cmd("QUIT") == ["BYE"]
        finally:
            c.close()
    finally:
        rp.stop()


def test_console_client_in_a_pipe(env: Env) -> None:
    port = str(env.rp.proxy.console_port)
    script = f"LOGIN audrey {PASSWORDS['audrey']}\nSHOW NODES JSON\nQH\nQUIT\n"
    done = subprocess.run(
        [sys.executable, "-m", "hsmproxy.cli", "console", "--port", port],
        input=script, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "OK logged in as audrey (auditor)"
    assert [n["name"] for n in json.loads(lines[1])] == ["node-a", "node-b"]
    assert "state: OK" in lines and lines[-1] == "BYE"
    # --user with the password from the environment; a refused command makes the exit status 1
    done = subprocess.run(
        [sys.executable, "-m", "hsmproxy.cli", "console", "--port", port, "--user", "audrey"],
        input="SHUTDOWN\n", capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "HSMPROXY_CONSOLE_PASSWORD": PASSWORDS["audrey"]},
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "OK logged in as audrey (auditor)",
        "DENIED SHUTDOWN needs role admin (you are auditor)",
    ]


def test_show_keys_from_the_keystore(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    config = write_config(
        make_nodes(tmp_path),
        tmp_path,
        users=False,
        extra=f'\n[keystore]\nurl = "sqlite:///{db}"\nrotation_interval = 3600\n',
    )
    store = KeyStore.open(f"sqlite:///{db}")
    now = datetime.now(UTC)
    with legacy_tdes():
        kcv = kcv_tdes(ZPK_A).hex().upper()[:6]
    cryptogram = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_A)
    try:
        store.create(KeyRecord(
            tenant="bank-b", name="zpk-acq", version=1, key_type="ZPK", type_code="001", lmk_id="00",
            cryptogram=cryptogram, kcv=kcv, state=KeyState.ACTIVE, activation_date=now,
            expiry_date=now + timedelta(days=30), grace_until=None, rotate_every=None, grace_period=None,
            created_at=now, updated_at=now, created_by="test",
        ), actor="test", reason="console test")  # fmt: skip
    finally:
        store.close()
    rp = start_proxy(load_settings(config))
    try:
        c = Console(rp.proxy.console_port)
        try:
            keys = c.json("SHOW KEYS")
            assert [{k: v for k, v in r.items() if k != "expiry"} for r in keys] == [
                {"tenant": "bank-b", "name": "zpk-acq", "version": 1, "type": "ZPK", "lmk": "00",
                 "state": "active", "kcv": kcv},
            ]  # fmt: skip
            assert keys[0]["expiry"].startswith((now + timedelta(days=30)).date().isoformat())
            text = "\n".join(c.cmd("SHOW KEYS"))
            assert "zpk-acq" in text and cryptogram not in text and cryptogram[1:] not in text
        finally:
            c.close()
    finally:
        rp.stop()
