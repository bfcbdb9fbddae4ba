"""Revocation and events across a ``kill -9`` of a subprocess proxy.

The proxy (``python -m hsmproxy.cli serve``) delivers outbox events to a test webhook receiver
(asyncio, 127.0.0.1) and a JSON-lines file. A key is revoked by the keystore (as the CLI would)
while the webhook answers 500; the proxy is killed with SIGKILL before the event is delivered,
restarted, and the event arrives with the same idempotency key and a valid signature; the JSON-lines
file holds each event once. A revoked key answers 29 for CC, A8 and BU, and the nodes dropped its
cached handles.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import psec
import pytest

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk, kcv_tdes
from hsmproxy.keys.store import KeyRecord, KeyState, KeyStore
from tests.integration.proxy_env import make_nodes
from tests.integration.test_rotation import call

REPO = Path(__file__).resolve().parents[2]
SECRET = b"test-webhook-secret"
ZPK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
DST = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
ZMK = bytes.fromhex("2A2A2A2A2A2A2A2A1C1C1C1C1C1C1C1C")
PAN, ACCT = "4012345678909", "401234567890"


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 (asyncio server in a thread) recording every request."""

    status: int = 200
    requests: list[dict[str, object]] = field(default_factory=list)
    port: int = 0
    loop: asyncio.AbstractEventLoop | None = None
    server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await reader.readline()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status = self.status
            self.requests.append({"line": request_line, "headers": headers, "body": body, "status": status})
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()

    def start(self) -> None:
        """Serve in a background thread."""
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            self.server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()
            loop.run_forever()
            self.server.close()
            loop.run_until_complete(self.server.wait_closed())
            loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    def stop(self) -> None:
        """Stop the server and its thread."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def events(self, kind: str, status: int | None = None) -> list[dict[str, object]]:
        """Recorded requests carrying event ``kind`` (answered with ``status`` if given)."""
        return [r for r in list(self.requests) if json.loads(r["body"])["kind"] == kind  # type: ignore[arg-type]
                and (status is None or r["status"] == status)]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll ``check()`` until truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


class ProxyProcess:
    """``hsmproxy serve`` as a subprocess, logging to a file."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until NC answers."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hsmproxy.cli", "serve", "--config", str(self.config)],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                return call(self.port, b"NC")[:4] == b"ND00"
            except OSError:
                return False

        wait_for(ready, 60)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver, stopped after the test."""
    r = Receiver()
    r.start()
    yield r
    r.stop()


def _answers_29(port: int, request: bytes) -> bool:
    return call(port, request)[2:4] == b"29"


def _requests(zpk_lmk: str) -> dict[str, bytes]:
    dst = encrypt_key_under_lmk(TEST_LMK, "001", "U", DST)
    zmk = encrypt_key_under_lmk(TEST_LMK, "000", "U", ZMK)
    with legacy_tdes():
        block = bytes(psec.des.encrypt_tdes_ecb(ZPK, psec.pinblock.encode_pinblock_iso_0("1234", PAN)))
    return {
        "CC": f"CC{zpk_lmk}{dst}12{block.hex().upper()}0101{ACCT}".encode(),
        "A8": f"A8001{zmk}{zpk_lmk}U".encode(),
        "BU": f"BU011{zpk_lmk}".encode(),
    }


def test_revoked_event_survives_kill_9(tmp_path: Path, receiver: Receiver) -> None:
    config = make_nodes(tmp_path)
    port = _free_port()
    db, jsonl, secret = tmp_path / "keys.db", tmp_path / "events.jsonl", tmp_path / "hook.secret"
    secret.write_bytes(SECRET + b"\n")
    text = config.read_text().replace('bind = "127.0.0.1:0"', f'bind = "127.0.0.1:{port}"')
    text += (
        f'[keystore]\nurl = "sqlite:///{db}"\nrotation_interval = 3600\nrefresh_interval = 0.2\n'
        f'[[keystore.subscribers]]\nname = "hook"\nwebhook = "http://127.0.0.1:{receiver.port}/events"\n'
        f'secret_file = "{secret}"\nmax_backoff = 0.3\n'
        f'[[keystore.subscribers]]\nname = "file"\njsonl = "{jsonl}"\n'
    )
    config.write_text(text)

    store = KeyStore.open(f"sqlite:///{db}")
    now = datetime.now(UTC)
    with legacy_tdes():
        kcv = kcv_tdes(ZPK).hex().upper()[:6]
    zpk_lmk = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK)
    store.create(KeyRecord(
        tenant="default", name="zpk-ev", version=1, key_type="ZPK", type_code="001", lmk_id="00",
        cryptogram=zpk_lmk, kcv=kcv, state=KeyState.ACTIVE, activation_date=now, expiry_date=None,
        grace_until=None, rotate_every=timedelta(days=30), grace_period=None, created_at=now, updated_at=now,
        created_by="test",
    ), actor="test", reason="test key")  # fmt: skip
    requests = _requests(zpk_lmk)
    proxy = ProxyProcess(config, port, tmp_path / "proxy.log")
    try:
        proxy.start()
        # The key works on every command presenting it (and its handle gets cached on a node).
        assert call(port, requests["CC"])[:4] == b"CD00"
        assert call(port, requests["A8"])[:4] == b"A900"
        assert call(port, requests["BU"])[:4] == b"BV00"
        wait_for(lambda: receiver.events("key.created", 200))

        receiver.status = 500  # the webhook now fails: key.revoked stays undelivered
        store.transition("default", "zpk-ev", 1, KeyState.REVOKED, actor="test", reason="compromised")
        for code, req in requests.items():
            wait_for(partial(_answers_29, port, req))
            assert call(port, req)[:4] == {"CC": b"CD", "A8": b"A9", "BU": b"BV"}[code] + b"29"
        wait_for(lambda: len(receiver.events("key.revoked")) >= 2)  # retried with back-off
        wait_for(lambda: "key.revoked" in jsonl.read_text())
        log = (tmp_path / "proxy.log").read_text()
        dropped = [int(n) for n in re.findall(r"node\(s\) dropped (\d+) cached handle", log)]
        assert dropped and max(dropped) >= 1, "no node dropped the revoked key's handles"

        proxy.kill(signal.SIGKILL)  # between "key revoked" and "event delivered"
        assert not receiver.events("key.revoked", 200)
        failed_keys = {r["headers"]["idempotency-key"] for r in receiver.events("key.revoked")}  # type: ignore[index]
        assert len(failed_keys) == 1
        receiver.status = 200
        proxy.start()
        assert call(port, requests["CC"])[:4] == b"CD29"  # refused from the first request
        wait_for(lambda: receiver.events("key.revoked", 200))
    finally:
        proxy.kill(signal.SIGTERM)

    delivered = receiver.events("key.revoked", 200)
    for r in delivered:
        headers, body = r["headers"], r["body"]
        assert isinstance(headers, dict) and isinstance(body, bytes)
        assert headers["idempotency-key"] in failed_keys
        assert hmac.compare_digest(
            headers["x-hsmproxy-signature"], hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        )
        doc = json.loads(body)
        assert doc["payload"]["reason"] == "compromised" and doc["payload"]["state"] == "revoked"
        assert zpk_lmk not in body.decode() and zpk_lmk[1:] not in body.decode()
    assert not store.pending_events("hook") and not store.pending_events("file")
    lines = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
    keys = [x["idempotency_key"] for x in lines]
    assert len(keys) == len(set(keys)), "duplicate lines in the JSON-lines file"
    assert [x["kind"] for x in lines] == ["key.created", "key.revoked"]
    store.close()
