"""Audit trail on a live proxy with two SoftHSM2 nodes: records, node MACs, `hsmproxy audit verify`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psec
import pytest

from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk
from hsmproxy.config import load_settings
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import make_nodes, start_proxy
from tests.integration.test_proxy_basic import ZPK_A, ZPK_B, _enc

PAN = "4012345678909"
PIN = "1234"


def _verify(config: Path, *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmproxy.cli", "audit", "verify", *map(str, paths), "--config", str(config)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[bytes]]:
    """Run a proxy with [audit] on two nodes, send commands, stop it: (config, audit file, secrets)."""
    root = tmp_path_factory.mktemp("audit")
    config = make_nodes(root)
    audit_path = root / "audit" / "audit.jsonl"
    with config.open("a") as fh:
        fh.write(f'[audit]\npath = "{audit_path}"\nfsync = "always"\ncheckpoint_every = 4\n')
    za = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK_A).encode()
    zx = encrypt_key_under_lmk(TEST_LMK, "001", "X", ZPK_B).encode()
    block = _enc(ZPK_A, psec.pinblock.encode_pinblock_iso_0(PIN, PAN)).hex().upper().encode()
    rp = start_proxy(load_settings(config))
    try:
        client = HsmClient("127.0.0.1", rp.port, header=b"AB12")
        try:
            assert client.call(b"NC")[:4] == b"ND00"
            request = b"CC" + za + zx + b"12" + block + b"01"
            for _ in range(5):
                assert client.call(request + b"01" + PAN[-13:-1].encode())[:4] == b"CD00"
            assert client.call(request + b"99" + PAN[-13:-1].encode())[:4] != b"CD00"
        finally:
            client.close()
    finally:
        rp.stop()
    secrets = [block, za, zx, PAN.encode(), PAN[-13:-1].encode(), ZPK_A.hex().upper().encode()]
    return config, audit_path, secrets


def test_records_have_the_right_fields(audited: tuple[Path, Path, list[bytes]]) -> None:
    _, path, _ = audited
    recs = [json.loads(line) for line in path.read_bytes().splitlines()]
    host = [r for r in recs if r["kind"] == "hostcmd"]
    assert [r["command"] for r in host] == ["NC"] + ["CC"] * 6
    assert [r["result"] for r in host][:6] == ["00"] * 6 and host[6]["result"] not in ("00", "")
    for r in host:
        assert r["correlation"] == b"AB12".hex().upper()
        assert r["tenant"] == "default" and r["listener"] == "host" and r["client"].startswith("127.0.0.1:")
        assert r["latency_ms"] >= 0 and r["key_ids"] == []
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


def test_no_secret_in_the_audit_file(audited: tuple[Path, Path, list[bytes]]) -> None:
    _, path, secrets = audited
    data = path.read_bytes().upper()
    for secret in secrets:
        assert secret.upper() not in data
