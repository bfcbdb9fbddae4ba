"""Audit chain (hsmproxy/audit.py) with a software MAC provider: chain, checkpoints, rotation, tampering."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import itertools
import json
import os
import threading
from pathlib import Path

import pytest

from hsmproxy.audit import (
    GENESIS,
    MAX_BATCH,
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
    kw.setdefault("linger", 0.0)  # a batch per event-loop wake-up: several batches per run

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


def test_broken_link_detected(tmp_path: Path) -> None:
    """A record re-MACed with the right key but a wrong ``prev``: only the link is wrong."""

    def edit(lines: list[bytes]) -> bytes:
        rec = json.loads(lines[5])
        rec["prev"] = "ab" * 32
        rec["mac"] = hmac.new(KEY, canonical({k: v for k, v in rec.items() if k != "mac"}), hashlib.sha256)
        rec["mac"] = rec["mac"].hexdigest()
        lines[5] = canonical(rec) + b"\n"
        return b"".join(lines)

    report = _tampered(tmp_path, edit)
    # its own link, and the next record's link to its (new) MAC
    assert [(p.kind, p.seq, p.line) for p in report.problems] == [("broken", 5, 6), ("broken", 6, 7)]


def test_node_and_named_keys_in_hostcmd_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    async def main() -> None:
        w = AuditWriter(AuditSettings(str(path)), software_chain_mac(KEY))
        await w.start()
        keys = (("default/zpk-a@2", "1A2B3C"), ("default/zpk-b@1", "D4E5F6"))
        w.observe(CommandRecord("host", "default", "10.0.0.1:1", "CC", "00", 0.002, b"0001", "node-b", keys))
        w.observe(CommandRecord("host", "default", "10.0.0.1:1", "XX", "68", 0.0, b"0002"))
        await w.stop()

    asyncio.run(main())
    host = [r for r in map(json.loads, _lines(path)) if r["kind"] == "hostcmd"]
    assert host[0]["node"] == "node-b" and host[0]["key_ids"] == [
        {"key": "default/zpk-a@2", "kcv": "1A2B3C"},
        {"key": "default/zpk-b@1", "kcv": "D4E5F6"},
    ]
    assert host[1]["node"] is None and host[1]["key_ids"] == []
    assert _verify(path).ok


class _Node:
    """The software MAC provider as a node that fails while ``up`` is False and answers only once
    ``release`` is set (a slow node holding a batch)."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.release = asyncio.Event()
        self.release.set()
        self._good = software_chain_mac(KEY)

    async def mac(self, prev: str, bodies: list[str], slot: str) -> list[str]:
        await self.release.wait()
        if not self.up:
            raise RuntimeError("no node")
        return await self._good(prev, bodies, slot)


def test_records_dropped_while_no_node_answers_leave_a_gap_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    node = _Node(up=False)

    async def main() -> AuditWriter:
        w = AuditWriter(AuditSettings(str(path), max_pending=3, fail_closed=True), node.mac)
        await w.start()
        assert w.accepting
        for i in range(5):
            w.observe(CommandRecord("host", "default", "p", "CC", "00", 0.0, b"%04d" % i))
        assert not w.accepting and w.dropped == 3  # open + 4 records did not fit in 3
        node.up = True
        await w.flush()
        assert w.accepting
        await w.stop()
        return w

    w = asyncio.run(main())
    recs = [json.loads(line) for line in _lines(path)]
    assert [r["kind"] for r in recs] == ["gap", "hostcmd", "hostcmd", "hostcmd", "close"]
    assert recs[0]["lost"] == 3 and recs[0]["reason"] == "queue overflow" and w.dropped == 3
    assert [r["correlation"] for r in recs[1:4]] == ["30303032", "30303033", "30303034"]
    report = _verify(path)
    assert report.ok and report.gaps == [(str(path), 1, 0, 3, "queue overflow")]


def test_queued_hostcmd_records_are_not_rescanned_by_the_collector(tmp_path: Path) -> None:
    # A backlog of 100,000 tracked records made the front spend most of its time in collections
    # under overload (nodes then timed out and were ejected); untracked tuples cost nothing there.
    async def main() -> None:
        w = AuditWriter(AuditSettings(str(tmp_path / "audit.jsonl")), software_chain_mac(KEY))
        await w.start()
        keys = (("default/zpk-a@2", "1A2B3C"),)
        w.observe(CommandRecord("host", "default", "10.0.0.1:1", "CC", "00", 0.002, b"0001", "node-b", keys))
        gc.collect()
        assert not gc.is_tracked(w._pending[-1])
        await w.stop()

    asyncio.run(main())


def test_records_dropped_while_a_batch_is_being_maced_are_newer_ones_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    node = _Node()
    release = node.release

    async def main() -> AuditWriter:
        w = AuditWriter(AuditSettings(str(path), max_pending=3, linger=0.0), node.mac)
        release.set()
        await w.start()  # writes the "open" record
        release.clear()
        for i in range(2):
            w.observe(CommandRecord("host", "default", "p", "CC", "00", 0.0, b"%04d" % i))
        await asyncio.sleep(0.01)  # the flush took records 0 and 1 and waits for the node
        for i in range(2, 7):  # 5 more while 2 of 3 places are with the node: 2 to 5 are dropped
            w.observe(CommandRecord("host", "default", "p", "CC", "00", 0.0, b"%04d" % i))
        release.set()
        await w.stop()
        return w

    w = asyncio.run(main())
    recs = [json.loads(line) for line in _lines(path)]
    assert [r["kind"] for r in recs] == ["open", "hostcmd", "hostcmd", "gap", "hostcmd", "close"]
    assert [r["correlation"] for r in recs if r["kind"] == "hostcmd"] == [
        (b"%04d" % i).hex().upper() for i in (0, 1, 6)
    ]
    assert recs[3]["lost"] == 4 and w.dropped == 4
    assert _verify(path).ok


def test_a_failed_batch_goes_back_in_order_and_a_dropped_gap_record_keeps_its_count(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    node = _Node(up=True)

    async def main() -> AuditWriter:
        w = AuditWriter(AuditSettings(str(path), max_pending=2, linger=0.0), node.mac)
        await w.start()
        node.up = False
        for i in range(4):  # records 0 and 1 are dropped
            w.observe(CommandRecord("host", "default", "p", "CC", "00", 0.0, b"%04d" % i))
        with pytest.raises(RuntimeError):
            await w.flush()  # gap + 2 + 3 taken, not MACed, put back; the gap is over the limit
        assert w.dropped == 2 and len(w._pending) == 2
        node.up = True
        await w.stop()
        return w

    w = asyncio.run(main())
    recs = [json.loads(line) for line in _lines(path)]
    assert [r["kind"] for r in recs] == ["open", "gap", "hostcmd", "hostcmd", "close"]
    assert recs[1]["lost"] == 2 and w.dropped == 2
    assert [r["correlation"] for r in recs[2:4]] == ["30303032", "30303033"]
    assert _verify(path).ok


def test_host_commands_are_shed_while_a_working_trail_is_half_full_not_while_it_fails(tmp_path: Path) -> None:
    node = _Node()
    release = node.release

    def record(i: int) -> CommandRecord:
        return CommandRecord("host", "default", "p", "CC", "00", 0.0, b"%04d" % i)

    async def overloaded() -> list[bool]:
        w = AuditWriter(AuditSettings(str(tmp_path / "a.jsonl"), max_pending=10, linger=0.0), node.mac)
        release.set()
        await w.start()
        release.clear()
        w.observe(record(0))
        await asyncio.sleep(0.01)  # record 0 is with the node, which is slow
        assert w.room() == 9  # a batch with the node still takes room (it comes back if not MACed)
        seen = [w.admits]
        for i in range(1, 6):
            w.observe(record(i))
            seen.append(w.admits)  # 5 of 10 waiting: behind
        release.set()
        await w.flush()
        seen.append(w.admits)  # caught up
        await w.stop()
        return seen

    async def failing(fail_closed: bool) -> list[bool]:
        w = AuditWriter(AuditSettings(str(tmp_path / f"{fail_closed}.jsonl"), max_pending=4, linger=0.0,
                                      fail_closed=fail_closed), node.mac)  # fmt: skip
        await w.start()
        node.up = False
        seen = []
        for i in range(6):
            w.observe(record(i))
            with contextlib.suppress(RuntimeError):
                await w.flush()
            seen.append(w.admits)
        node.up = True
        await w.stop()
        return seen

    assert asyncio.run(overloaded()) == [True] * 5 + [False, True]  # behind at 5 waiting
    # no node MACs: fail open keeps serving (the oldest records are dropped, with a gap record);
    # fail closed refuses once the queue is full
    assert asyncio.run(failing(False)) == [True] * 6
    assert asyncio.run(failing(True)) == [True, True, True, False, False, False]


def test_a_full_batch_ends_the_linger(tmp_path: Path) -> None:
    # else a long linger would let records pile up past the overload gate on a healthy trail
    async def main() -> int:
        w = AuditWriter(AuditSettings(str(tmp_path / "a.jsonl"), linger=30.0), software_chain_mac(KEY))
        await w.start()
        for i in range(MAX_BATCH):
            w.observe(CommandRecord("host", "default", "p", "CC", "00", 0.0, b"%04d" % (i % 10000)))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if w.written > MAX_BATCH:
                break
        written = w.written
        await w.stop()
        return written

    assert asyncio.run(main()) > MAX_BATCH  # "open", the batch (and a checkpoint), long before 30 s


def test_key_trail_records_each_lifecycle_step_once_across_restarts(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from hsmproxy.audit import KeyTrail
    from hsmproxy.keys.store import KeyRecord, KeyState, KeyStore

    path = tmp_path / "audit.jsonl"
    store = KeyStore.open(f"sqlite:///{tmp_path / 'keys.db'}")
    now = datetime.now(UTC)
    store.create(
        KeyRecord(
            tenant="t1", name="zpk", version=1, key_type="ZPK", type_code="001", lmk_id="00",
            cryptogram="U" + "AB" * 16, kcv="123456", state=KeyState.PRE_ACTIVE, activation_date=None,
            expiry_date=None, grace_until=None, rotate_every=None, grace_period=None, created_at=now,
            updated_at=now, created_by="",
        ),
        actor="alice", reason="generated",
    )  # fmt: skip
    named: dict[str, tuple[str, str]] = {}

    async def run(step: KeyState | None) -> None:
        trail = KeyTrail(store, named, interval=0.01)
        w = AuditWriter(AuditSettings(str(path)), software_chain_mac(KEY), keys=trail)
        await w.start()
        if step is not None:
            store.transition("t1", "zpk", 1, step, actor="bob", reason=f"to {step.value}")
        for _ in range(200):
            await asyncio.sleep(0.01)
            if trail.cursor == len(store.history_since(0)):
                break
        await w.stop()

    try:
        asyncio.run(run(KeyState.ACTIVE))
        assert named == {"U" + "AB" * 16: ("t1/zpk@1", "123456")}
        asyncio.run(run(None))  # a restart with nothing new: nothing repeated
        store.transition("t1", "zpk", 1, KeyState.SUSPENDED, actor="carol")  # while no writer runs
        asyncio.run(run(KeyState.REVOKED))
    finally:
        store.close()
    recs = [json.loads(line) for line in _lines(path)]
    keys = [r for r in recs if r["kind"] == "key"]
    assert [(r["history_id"], r["action"], r["from_state"], r["to_state"], r["actor"]) for r in keys] == [
        (1, "created", None, "pre-active", "alice"),
        (2, "activated", "pre-active", "active", "bob"),
        (3, "suspended", "active", "suspended", "carol"),
        (4, "revoked", "suspended", "revoked", "bob"),
    ]
    assert all((r["tenant"], r["key"], r["version"], r["kcv"]) == ("t1", "zpk", 1, "123456") for r in keys)
    assert recs[-1]["kind"] == "close" and recs[-1]["key_cursor"] == 4
    assert _verify(path).ok


def test_hsmproxy_check_validates_the_audit_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hsmproxy.cli import main
    from hsmproxy.config import load_settings

    base = '[[nodes]]\nname = "a"\npin_file = "pin"\n[[listeners]]\nbind = "127.0.0.1:0"\n'
    config = tmp_path / "config.toml"
    config.write_text(base + '[audit]\npath = "audit/a.jsonl"\nfail_closed = true\n'
                      '[audit.syslog]\naddress = "127.0.0.1:6514"\nfacility = "local1"\n')  # fmt: skip
    settings = load_settings(config)
    assert settings.audit is not None and settings.audit.path == str(tmp_path / "audit" / "a.jsonl")
    assert settings.audit.fail_closed and settings.audit.syslog is not None
    assert settings.audit.syslog.facility == 17
    assert main(["check", "--config", str(config)]) == 0
    for section, message in [
        ('[audit]\npath = "a"\nfsync = "sometimes"\n', "audit: fsync must be one of always, batch, never"),
        ('[audit]\npath = "a"\nmax_bytes = "big"\n', "audit: invalid literal"),
        ('[audit]\npath = "a"\nfail_closed = "yes"\n', "audit: fail_closed must be true or false"),
        ('[audit]\npath = "a"\ncheckpoint_every = 0\n', "checkpoint_every >= 1"),
        ('[audit]\npath = "a"\nmax_pending = 100\n', "audit: max_pending must be at least 5000"),
        ('[audit]\npath = "a"\n[audit.syslog]\naddress = "x"\n', "audit.syslog: address must be HOST:PORT"),
    ]:
        config.write_text(base + section)
        capsys.readouterr()
        assert main(["check", "--config", str(config)]) == 1
        assert message in capsys.readouterr().err


def test_a_write_error_loses_the_batch_visibly_and_recovers(tmp_path: Path) -> None:
    """Disk full on one write: the batch is lost, a partial line is cut, a ``gap`` record says so, the
    fail-closed gate is shut until a write succeeds again, and the chain still verifies."""
    import errno

    path = tmp_path / "audit.jsonl"

    class FullOnce:
        def __init__(self, inner: object) -> None:
            self.inner, self.full = inner, False

        def write(self, data: bytes) -> int:
            if self.full:
                self.full = False
                self.inner.write(data[:10])  # type: ignore[attr-defined]
                self.inner.flush()  # type: ignore[attr-defined]
                raise OSError(errno.ENOSPC, "No space left on device")
            return int(self.inner.write(data))  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    async def main() -> AuditWriter:
        w = AuditWriter(AuditSettings(str(path)), software_chain_mac(KEY))
        await w.start()
        w._file = wrapper = FullOnce(w._file)
        wrapper.full = True
        w.observe(CommandRecord("host", "default", "p", "CC", "00", 0.0, b"0001"))
        w.observe(CommandRecord("host", "default", "p", "CC", "00", 0.0, b"0002"))
        try:
            await w.flush()
        except OSError:
            pass
        assert w.failing and not w.accepting and w.dropped == 2
        w.observe(CommandRecord("host", "default", "p", "CC", "00", 0.0, b"0003"))
        await w.flush()
        assert not w.failing and w.accepting
        await w.stop()
        return w

    asyncio.run(main())
    recs = [json.loads(line) for line in _lines(path)]
    assert [r["kind"] for r in recs] == ["open", "gap", "hostcmd", "close"]
    assert recs[1]["lost"] == 2 and recs[1]["reason"] == f"write error {errno.ENOSPC}"
    assert recs[2]["correlation"] == "30303033"
    assert _verify(path).ok


def test_batch_fsync_runs_off_the_event_loop_once_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync = "batch": the loop thread never waits for the disk; each sync covers a whole batch, which
    is on disk in full (written before the sync) when it runs."""
    path = tmp_path / "audit.jsonl"
    real_fsync = os.fsync
    syncs: list[tuple[str, int]] = []

    def fsync(fd: int) -> None:
        syncs.append((threading.current_thread().name, os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _write(path, 30, checkpoint_every=1000)
    loop_thread = threading.main_thread().name
    lines = _lines(path)
    assert syncs and all(name != loop_thread for name, _ in syncs)
    ends = set(itertools.accumulate(len(line) for line in lines))
    assert all(size in ends for _, size in syncs)  # each sync saw whole records only
    assert len(syncs) < len(lines)  # per batch, not per record
    assert _verify(path).ok


def test_linger_gathers_the_records_of_many_wake_ups_into_one_batch(tmp_path: Path) -> None:
    """One node round trip (and one fsync) for every record that arrived within ``linger``."""
    path = tmp_path / "audit.jsonl"
    good = software_chain_mac(KEY)
    batches: list[int] = []

    async def counting(prev: str, bodies: list[str], slot: str) -> list[str]:
        batches.append(len(bodies))
        return await good(prev, bodies, slot)

    async def main() -> None:
        w = AuditWriter(AuditSettings(str(path), linger=0.2), counting)
        await w.start()
        for i in range(30):
            w.observe(CommandRecord("host", "default", "p", "CC", "00", 0.0, b"%04d" % i))
            await asyncio.sleep(0)  # 30 event-loop wake-ups
        await asyncio.sleep(0.5)
        assert batches == [1, 30]  # the open record (at start), then the 30 in one op
        await w.stop()

    asyncio.run(main())
    assert _verify(path).ok
