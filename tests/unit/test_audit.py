"""Audit chain (hsmproxy/audit.py) with a software MAC provider: chain, checkpoints, rotation, tampering."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
from pathlib import Path

from hsmproxy.audit import (
    GENESIS,
    AuditSettings,
    AuditWriter,
    VerifyReport,
    canonical,
    software_chain_mac,
    software_plain_mac,
    verify_files,
)
from hsmproxy.server.hostcmd import CommandRecord

KEY = bytes(range(32))


def _write(path: Path, n: int, **kw: object) -> AuditWriter:
    async def main() -> AuditWriter:
        w = AuditWriter(AuditSettings(str(path), **kw), software_chain_mac(KEY))  # type: ignore[arg-type]
        await w.start()
        for i in range(n):
            w.observe(CommandRecord("host", "default", "127.0.0.1:5000", "CC", "00", 0.0015, b"%04d" % i))
            if i % 7 == 0:
                await asyncio.sleep(0)  # several event-loop wake-ups, hence several batches
        await asyncio.sleep(0)
        await w.stop()
        return w

    return asyncio.run(main())


def _verify(*paths: Path, live: bool = False) -> VerifyReport:
    return verify_files(list(paths), software_plain_mac(KEY), live=live)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_chain_fields_and_macs(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 20, checkpoint_every=1000)
    recs = [json.loads(line) for line in _lines(path)]
    assert [r["seq"] for r in recs] == list(range(len(recs)))
    assert recs[0]["kind"] == "open" and recs[0]["prev"] == GENESIS and recs[-1]["kind"] == "close"
    host = [r for r in recs if r["kind"] == "hostcmd"]
    assert len(host) == 20
    assert host[3] | {"seq": 0, "time": "", "prev": "", "mac": ""} == {
        "seq": 0, "time": "", "kind": "hostcmd", "tenant": "default", "client": "127.0.0.1:5000",
        "listener": "host", "command": "CC", "result": "00", "latency_ms": 1.5, "correlation": "30303033",
        "node": None, "key_ids": [], "prev": "", "mac": "",
    }  # fmt: skip
    for a, b in itertools.pairwise(recs):
        assert b["prev"] == a["mac"]
    for r in recs:  # independent recomputation: HMAC-SHA256 over the canonical record without mac
        body = {k: v for k, v in r.items() if k != "mac"}
        assert r["mac"] == hmac.new(KEY, canonical(body), hashlib.sha256).hexdigest()
    report = _verify(path)
    assert report.ok and report.records == len(recs)


def test_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 25, checkpoint_every=10)
    recs = [json.loads(line) for line in _lines(path)]
    cps = [r for r in recs if r["kind"] == "checkpoint"]
    assert len(cps) == 2 and all(c["count"] == c["seq"] for c in cps)
    assert recs[-1]["kind"] == "close"
    assert _verify(path).checkpoints == 2


def test_rotation_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 60, max_bytes=2000)
    rotated = sorted(tmp_path.glob("audit.jsonl.*"))
    assert rotated, "no rotation happened"
    first = json.loads(_lines(path)[0])
    prev_last = json.loads(_lines(sorted(rotated, key=lambda p: int(p.name.rsplit(".", 1)[1]))[-1])[-1])
    assert first["kind"] == "open" and first["prev"] == prev_last["mac"] and prev_last["kind"] == "close"
    assert _verify(path, *rotated).ok
    _write(path, 3)  # a restart continues the chain in the same file
    assert json.loads(_lines(path)[-5])["kind"] == "open"
    report = _verify(path, *rotated)
    assert report.ok, [str(p) for p in report.problems]


def _tampered(tmp_path: Path, edit: object) -> VerifyReport:
    path = tmp_path / "audit.jsonl"
    _write(path, 12, checkpoint_every=5)
    lines = _lines(path)
    path.write_bytes(edit(lines))  # type: ignore[operator]
    return _verify(path)


def test_edit_detected(tmp_path: Path) -> None:
    def edit(lines: list[bytes]) -> bytes:
        lines[4] = lines[4].replace(b'"result":"00"', b'"result":"01"')
        return b"".join(lines)

    report = _tampered(tmp_path, edit)
    assert [(p.kind, p.seq, p.line) for p in report.problems] == [("edited", 4, 5)]


def test_delete_detected(tmp_path: Path) -> None:
    report = _tampered(tmp_path, lambda lines: b"".join(lines[:6] + lines[7:]))
    assert [(p.kind, p.seq) for p in report.problems][:1] == [("deleted", 7)]
    assert "seq 6 missing" in report.problems[0].message


def test_swap_detected(tmp_path: Path) -> None:
    report = _tampered(tmp_path, lambda lines: b"".join([*lines[:3], lines[4], lines[3], *lines[5:]]))
    assert report.problems and {p.kind for p in report.problems} == {"reordered"}
    assert report.problems[0].seq == 4 and report.problems[0].line == 4


def test_truncate_tail_detected(tmp_path: Path) -> None:
    report = _tampered(tmp_path, lambda lines: b"".join(lines[:-2]))
    assert [p.kind for p in report.problems] == ["truncated"]
    assert "tail was truncated" in report.problems[0].message


def test_truncate_mid_line_detected(tmp_path: Path) -> None:
    report = _tampered(tmp_path, lambda lines: b"".join(lines[:-1]) + lines[-1][:30])
    kinds = [(p.kind, p.line) for p in report.problems]
    assert kinds[0] == ("truncated", len(_lines(tmp_path / "audit.jsonl")))
    assert "partial last record" in report.problems[0].message


def test_forged_mac_with_other_key_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 3)
    report = verify_files([path], software_plain_mac(bytes(32)))
    assert {p.kind for p in report.problems} == {"edited"}
