"""Audit trail format 2 (hsmproxy/audit/) with a software signer: chain, checkpoints, every tamper case,
proofs, refusal aggregation, write failures, restarts. Hashes and signatures are recomputed with
hashlib and cryptography in the test (audit_support), not with the code under test."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmproxy.audit.checkpoint import NO_CHECKPOINT, PinnedKeys, pem_bundle
from hsmproxy.audit.files import rotated_files
from hsmproxy.audit.form import GENESIS, canonical, hostcmd_line, hostcmd_record
from hsmproxy.audit.settings import MAX_BATCH, AuditConfigError, AuditSettings, parse_audit_settings
from hsmproxy.audit.signer import SoftwareSigner
from hsmproxy.audit.verify import ProofError, VerifyReport, prove, read_witness, verify_proof, verify_trail
from hsmproxy.audit.writer import OVERFLOW, AuditWriter
from tests.unit.audit_support import (
    TEST_SIGNING_KEY,
    FailingDisk,
    checkpoints,
    item,
    leaf,
    lines,
    mth,
    records,
    run_writer,
    signature_ok,
    statement_of,
    write_records,
)

PINNED = SoftwareSigner(TEST_SIGNING_KEY).pinned()


def _verify(*paths: Path, live: bool = False, witness: list[dict[str, Any]] | None = None) -> VerifyReport:
    return verify_trail(list(paths), PINNED, live=live, witness=witness)


def _kinds(report: VerifyReport) -> set[str]:
    return {p.kind for p in report.problems}


def _rewrite(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(x + b"\n" for x in new))


# -- the chain and the checkpoints --------------------------------------------------------------------


def test_records_chain_by_leaf_hash_and_lines_are_canonical(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, 20)
    recs = records(path)
    raw = [x for x in lines(path) if b'"seq"' in x]
    assert [r["seq"] for r in recs] == list(range(len(recs)))
    assert (
        recs[0]["kind"] == "open" and recs[0]["prev"] == GENESIS and recs[0]["format"] == "hsmproxy-audit/2"
    )
    assert recs[-1]["kind"] == "close"
    for line, rec in zip(raw, recs, strict=True):  # written exactly as the canonical JSON of the record
        assert line == json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    for a, b in itertools.pairwise(raw):
        assert json.loads(b)["prev"] == leaf(a).hex()
    host = [r for r in recs if r["kind"] == "hostcmd"]
    assert len(host) == 20
    assert host[3] | {"seq": 0, "time": "", "prev": ""} == {
        "seq": 0, "time": "", "kind": "hostcmd", "tenant": "default", "client": "127.0.0.1:5000",
        "listener": "host", "command": "CC", "result": "00", "latency_ms": 1.5, "correlation": "30303033",
        "node": "node-a", "key_ids": [], "prev": "",
    }  # fmt: skip
    report = _verify(path)
    assert report.ok, report.problems
    assert report.records == len(recs) and report.sealed == len(recs) and report.unsealed is None


def test_checkpoints_cover_every_record_once_with_a_valid_signature(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    async def body(w: AuditWriter) -> None:
        for i in range(250):
            w.hostcmd(item(i))
            if i % 7 == 6:
                await w.flush()  # small batches: a segment is cut at the end of the batch that fills it
                await asyncio.sleep(0.002)

    run_writer(path, body, checkpoint_every=40)
    raw = [x for x in lines(path) if b'"seq"' in x]
    cps = checkpoints(path)
    assert len(cps) >= 250 // 47
    assert all(40 <= cp["size"] < 40 + 7 + 7 for cp in cps[:-1])
    prev_statement = NO_CHECKPOINT
    expected_first = 0
    for cp in cps:
        assert cp["first"] == expected_first and cp["size"] == cp["last"] - cp["first"] + 1
        assert cp["root"] == mth([leaf(x) for x in raw[cp["first"] : cp["last"] + 1]]).hex()
        assert cp["prev_checkpoint"] == prev_statement
        assert signature_ok(cp, TEST_SIGNING_KEY.public_key())
        assert cp["alg"] == "ecdsa-p256-sha256" and cp["node"] == "software"
        prev_statement = hashlib.sha256(statement_of(cp)).hexdigest()
        expected_first = cp["last"] + 1
        # a checkpoint line comes after the last record it covers
        position = lines(path).index(json.dumps(cp, sort_keys=True, separators=(",", ":")).encode())
        assert position > next(i for i, x in enumerate(lines(path)) if json.loads(x).get("seq") == cp["last"])
    assert expected_first == len(raw)  # the close record is sealed too: the file ends sealed
    assert len({cp["trail"] for cp in cps}) == 1


def test_checkpoint_interval_seals_a_quiet_trail(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    now = [1_800_000_000.0]

    async def body(w: AuditWriter) -> None:
        w.hostcmd(item(1))
        await w.flush()
        assert w.checkpoints == 0
        now[0] += 1.5  # past checkpoint_interval
        for _ in range(300):
            await asyncio.sleep(0.01)
            if w.checkpoints:
                break
        assert w.checkpoints == 1 and w.unsealed == 0

    async def main() -> None:
        settings = AuditSettings(str(path), linger=0.0, checkpoint_interval=1.0)
        w = AuditWriter(settings, SoftwareSigner(TEST_SIGNING_KEY), clock=lambda: now[0])
        await w.start()
        try:
            await body(w)
        finally:
            await w.stop()

    asyncio.run(main())
    assert _verify(path).ok


def test_rotation_seals_each_file_and_the_chain_continues_across_files_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, 300, max_bytes=8000)
    write_records(path, 100, max_bytes=8000)  # a restart continues the chain
    files = [*rotated_files(path), path]
    assert len(files) >= 3
    for f in files:  # every closed file ends sealed: close record, then a checkpoint
        tail = [json.loads(x) for x in lines(f)[-3:]]
        assert tail[-1]["kind"] == "checkpoint" and any(r.get("kind") == "close" for r in tail)
    recs = records(*files)
    assert [r["seq"] for r in recs] == list(range(len(recs)))
    opens = [r for r in recs if r["kind"] == "open"]
    assert {r["reason"] for r in opens} == {"new", "rotate", "restart"} and len(
        {r["trail"] for r in opens}
    ) == 1
    report = _verify(*files)
    assert report.ok, report.problems
    assert report.files == len(files) and report.sealed == len(recs)
    # one rotated file alone: its records check, the link to earlier ones is noted, not failed
    alone = _verify(files[1])
    assert alone.ok and any("start at seq" in n for n in alone.notes)


# -- tampering ----------------------------------------------------------------------------------------


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    write_records(path, 60, checkpoint_every=25)
    assert _verify(path).ok
    return path


def _record_index(raw: list[bytes], seq: int) -> int:
    return next(i for i, x in enumerate(raw) if json.loads(x).get("seq") == seq)


def test_an_edited_record_is_found(trail: Path) -> None:
    raw = lines(trail)
    i = _record_index(raw, 10)
    raw[i] = raw[i].replace(b'"result":"00"', b'"result":"01"')
    _rewrite(trail, raw)
    report = _verify(trail)
    assert "edited" in _kinds(report)
    assert any(p.seq == 11 and "seq 10" in p.message for p in report.problems)  # the next link names it


def test_an_edited_record_whose_next_link_was_fixed_up_is_found_by_the_signed_root(trail: Path) -> None:
    raw = lines(trail)
    # rewrite seq 10 and re-chain every later record: the chain is consistent again, the root is not
    start = _record_index(raw, 10)
    raw[start] = raw[start].replace(b'"result":"00"', b'"result":"01"')
    prev = leaf(raw[start]).hex()
    for i in range(start + 1, len(raw)):
        rec = json.loads(raw[i])
        if "seq" not in rec:
            continue
        rec["prev"] = prev
        raw[i] = canonical(rec)
        prev = leaf(raw[i]).hex()
    _rewrite(trail, raw)
    report = _verify(trail)
    assert "edited" in _kinds(report)
    assert any("do not hash to the signed root" in p.message for p in report.problems)


def test_a_deleted_record_is_found(trail: Path) -> None:
    raw = lines(trail)
    del raw[_record_index(raw, 12)]
    _rewrite(trail, raw)
    report = _verify(trail)
    assert "deleted" in _kinds(report) and any(p.seq == 13 and "seq 12" in p.message for p in report.problems)


def test_an_inserted_record_is_found(trail: Path) -> None:
    raw = lines(trail)
    i = _record_index(raw, 12)
    raw.insert(i + 1, raw[i].replace(b'"correlation":"', b'"correlation":"FF'))  # a forged second seq 12
    _rewrite(trail, raw)
    assert "inserted" in _kinds(_verify(trail))


def test_reordered_records_are_found(trail: Path) -> None:
    raw = lines(trail)
    i, j = _record_index(raw, 14), _record_index(raw, 15)
    raw[i], raw[j] = raw[j], raw[i]
    _rewrite(trail, raw)
    assert "reordered" in _kinds(_verify(trail))


def test_a_partial_last_line_is_truncated(trail: Path) -> None:
    data = trail.read_bytes()
    trail.write_bytes(data[:-30])
    assert "truncated" in _kinds(_verify(trail))


def test_a_tail_cut_back_to_an_earlier_checkpoint_is_found_by_the_witness(trail: Path) -> None:
    raw = lines(trail)
    witness = [json.loads(x) for x in raw if b'"kind":"checkpoint"' in x]
    last_cp = max(i for i, x in enumerate(raw) if b'"kind":"checkpoint"' in x)
    earlier_cp = max(i for i, x in enumerate(raw[:last_cp]) if b'"kind":"checkpoint"' in x)
    _rewrite(trail, raw[: earlier_cp + 1])  # ends on a valid checkpoint: looks sealed on its own
    assert _verify(trail).ok
    report = _verify(trail, witness=witness)
    assert "truncated" in _kinds(report) and any(p.file == "witness" for p in report.problems)


def test_witness_lines_may_come_as_syslog_messages(tmp_path: Path, trail: Path) -> None:
    cps = [x for x in lines(trail) if b'"kind":"checkpoint"' in x]
    syslog = tmp_path / "siem.log"
    syslog.write_bytes(
        b"".join(b"<110>1 2026-12-04T00:00:00Z host hsmproxy 1 checkpoint [x@1] " + c + b"\n" for c in cps)
    )
    witness = read_witness(syslog)
    assert witness == [json.loads(c) for c in cps]
    assert _verify(trail, witness=witness).ok


def test_a_checkpoint_signed_by_another_key_is_forged(trail: Path) -> None:
    raw = lines(trail)
    i = next(i for i, x in enumerate(raw) if b'"kind":"checkpoint"' in x)
    other = SoftwareSigner()  # not pinned
    cp = json.loads(raw[i])

    async def resign() -> tuple[dict[str, Any], str]:
        return await other.sign(
            lambda node, signer: {k: v for k, v in cp.items() if k != "sig"} | {"signer": signer}
        )

    stmt, sig = asyncio.run(resign())
    raw[i] = canonical({**stmt, "sig": sig})
    _rewrite(trail, raw)
    report = _verify(trail)
    assert "forged" in _kinds(report) and any("not a pinned key" in p.message for p in report.problems)
    # with the other key pinned too the signature passes, but the re-signed statement no longer is
    # what the next checkpoint chains to
    both = PinnedKeys({**PINNED.keys, **other.pinned().keys})
    assert _kinds(verify_trail([trail], both)) == {"swapped"}


def test_a_changed_checkpoint_field_breaks_its_signature(trail: Path) -> None:
    raw = lines(trail)
    i = next(i for i, x in enumerate(raw) if b'"kind":"checkpoint"' in x)
    cp = json.loads(raw[i])
    cp["time"] = "2020-01-01T00:00:00.000Z"
    raw[i] = canonical(cp)
    _rewrite(trail, raw)
    assert any(p.kind == "forged" and "does not verify" in p.message for p in _verify(trail).problems)


def test_swapped_checkpoints_are_found(trail: Path) -> None:
    raw = lines(trail)
    idx = [i for i, x in enumerate(raw) if b'"kind":"checkpoint"' in x]
    assert len(idx) >= 3
    raw[idx[0]], raw[idx[1]] = raw[idx[1]], raw[idx[0]]
    _rewrite(trail, raw)
    assert "swapped" in _kinds(_verify(trail))


def test_a_checkpoint_of_another_trail_is_found(tmp_path: Path, trail: Path) -> None:
    other = tmp_path / "other.jsonl"
    write_records(other, 60, checkpoint_every=25)  # same key, same sizes, another trail id
    raw = lines(trail)
    foreign = [x for x in lines(other) if b'"kind":"checkpoint"' in x][1]
    i = [i for i, x in enumerate(raw) if b'"kind":"checkpoint"' in x][1]
    raw[i] = foreign
    _rewrite(trail, raw)
    assert "swapped" in _kinds(_verify(trail))


def test_a_deleted_checkpoint_breaks_the_checkpoint_chain(trail: Path) -> None:
    raw = lines(trail)
    i = next(i for i, x in enumerate(raw) if b'"kind":"checkpoint"' in x)
    del raw[i]
    _rewrite(trail, raw)
    assert "swapped" in _kinds(_verify(trail))


def test_the_unsealed_tail_is_reported_as_such(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    signer = SoftwareSigner(TEST_SIGNING_KEY)

    async def body(w: AuditWriter) -> None:
        for i in range(30):
            w.hostcmd(item(i))
        await w.flush()
        assert await w.checkpoint()
        signer.available = False  # the nodes cannot sign from here on
        for i in range(30, 40):
            w.hostcmd(item(i))
        await w.flush()

    run_writer(path, body, signer)
    report = _verify(path)
    assert report.unsealed is not None and report.unsealed[1] - report.unsealed[0] + 1 == 11  # 10 + close
    assert [p.kind for p in report.problems] == ["unsealed"]
    live = _verify(path, live=True)
    assert live.ok and live.unsealed == report.unsealed
    # the next start seals what the last run left open, and the trail is whole again
    write_records(path, 5)
    final = _verify(path)
    assert final.ok and final.unsealed is None and final.sealed == final.records


# -- proofs -------------------------------------------------------------------------------------------


def test_every_sealed_record_has_a_proof_that_verifies_alone(trail: Path) -> None:
    recs = records(trail)
    for rec in recs:
        proof = prove([trail], rec["seq"])
        assert json.loads(proof["record"]) == rec
        assert verify_proof(json.loads(json.dumps(proof)), PINNED) == ""


def test_a_proof_fails_when_anything_in_it_changes(trail: Path) -> None:
    proof = prove([trail], 17)
    record = proof["record"].replace('"result":"00"', '"result":"01"')
    assert "not in the checkpoint's tree" in verify_proof({**proof, "record": record}, PINNED)
    if proof["path"]:
        path = [proof["path"][0][:-1] + ("0" if proof["path"][0][-1] != "0" else "1"), *proof["path"][1:]]
        assert "not in the checkpoint's tree" in verify_proof({**proof, "path": path}, PINNED)
    assert verify_proof({**proof, "index": proof["index"] + 1}, PINNED)  # another place
    cp = json.loads(proof["checkpoint"])
    forged = canonical({**cp, "last": cp["last"] + 1, "size": cp["size"] + 1}).decode()
    assert verify_proof({**proof, "checkpoint": forged}, PINNED)
    assert "not a pinned key" in verify_proof(proof, SoftwareSigner().pinned())


def test_no_proof_for_a_missing_or_unsealed_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    signer = SoftwareSigner(TEST_SIGNING_KEY)

    async def body(w: AuditWriter) -> None:
        signer.available = False
        w.hostcmd(item(1))
        await w.flush()

    run_writer(path, body, signer)
    with pytest.raises(ProofError, match="not sealed"):
        prove([path], 1)
    with pytest.raises(ProofError, match="no record"):
        prove([path], 999)


# -- refusals are counted, not written one by one --------------------------------------------------------


def test_a_flood_of_refusals_writes_a_few_aggregate_records_with_exact_counts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    now = [1_800_000_000.0]

    async def main() -> AuditWriter:
        w = AuditWriter(
            AuditSettings(str(path), linger=0.0), SoftwareSigner(TEST_SIGNING_KEY), clock=lambda: now[0]
        )
        await w.start()
        for _second in range(3):
            for i in range(50_000):
                w.refused("default", "host", "CC", "41")
                if i % 5 == 0:
                    w.refused("default", "host", "CA", "17")
            now[0] += 1.0
            await asyncio.sleep(1.05)  # the writer's tick turns the counts into aggregate records
        await w.stop()
        return w

    w = asyncio.run(main())
    recs = records(path)
    agg = [r for r in recs if r["kind"] == "aggregate"]
    assert len(recs) < 20  # 300,000 refusals: O(seconds) records, not O(requests)
    assert w.refusals == 3 * 60_000
    assert sum(r["count"] for r in agg if r["command"] == "CC" and r["result"] == "41") == 150_000
    assert sum(r["count"] for r in agg if r["command"] == "CA" and r["result"] == "17") == 30_000
    assert all(r["first"] <= r["last"] for r in agg) and {r["tenant"] for r in agg} == {"default"}
    assert _verify(path).ok


# -- durability, failures, overflow ---------------------------------------------------------------------


def test_when_durable_fires_only_after_the_record_is_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    seen: list[bool] = []

    async def body(w: AuditWriter) -> None:
        tickets = [w.hostcmd(item(i)) for i in range(5)]

        def check(i: int = 4) -> None:
            seen.append(b'"correlation":"30303034"' in path.read_bytes())

        w.when_durable(tickets[-1], check)
        assert seen == []
        await w.flush()
        assert seen == [True]
        w.when_durable(tickets[0], check)  # already durable: at once
        assert seen == [True, True]

    run_writer(path, body)


def test_a_failed_write_keeps_every_record_and_the_chain_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    disk = FailingDisk(monkeypatch)

    async def body(w: AuditWriter) -> None:
        for i in range(5):
            w.hostcmd(item(i))
        await w.flush()
        disk.failing = True
        for i in range(5, 10):
            w.hostcmd(item(i))
        with pytest.raises(OSError):
            await w.flush()
        assert w.failing and w.waiting == 5 and w.admits  # fail open: still admitting
        size = path.stat().st_size
        disk.failing = False
        await w.flush()
        assert not w.failing and w.waiting == 0 and path.stat().st_size > size

    w = run_writer(path, body)
    host = [r for r in records(path) if r["kind"] == "hostcmd"]
    assert [r["correlation"] for r in host] == [(b"%04d" % i).hex().upper() for i in range(10)]
    assert w.dropped == 0 and not [r for r in records(path) if r["kind"] == "gap"]
    assert _verify(path).ok


def test_fail_closed_refuses_work_while_the_file_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    disk = FailingDisk(monkeypatch, errno=28)

    async def body(w: AuditWriter) -> None:
        await w.flush()
        assert w.admits
        disk.failing = True
        w.hostcmd(item(1))
        with pytest.raises(OSError):
            await w.flush()
        assert not w.admits
        disk.failing = False
        await w.flush()
        assert w.admits

    run_writer(path, body, fail_closed=True)


def test_overflow_while_failing_drops_the_oldest_into_one_gap_record_with_its_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    disk = FailingDisk(monkeypatch, failing=True)

    async def body(w: AuditWriter) -> None:
        with pytest.raises(OSError):
            await w.flush()  # the open record cannot be written
        for i in range(5000 + 123):
            w.hostcmd(item(i))
        assert w.dropped == 124  # 5,124 waiting, 5,000 kept: the open record is never dropped
        disk.failing = False
        await w.flush()

    w = run_writer(path, body, max_pending=5000)
    recs = records(path)
    assert recs[0]["kind"] == "open"
    gaps = [r for r in recs if r["kind"] == "gap"]
    assert len(gaps) == 1 and gaps[0]["lost"] == w.dropped and gaps[0]["reason"] == OVERFLOW
    host = [r for r in recs if r["kind"] == "hostcmd"]
    assert len(host) + w.dropped == 5123 and host[0]["correlation"] == (b"%04d" % w.dropped).hex().upper()
    report = _verify(path)
    assert report.ok and report.gaps[0][3] == w.dropped


def test_work_is_refused_while_half_the_queue_waits(tmp_path: Path) -> None:
    async def body(w: AuditWriter) -> None:
        for i in range(2499):  # with the open record: 2,500, half of 5,000
            w.hostcmd(item(i))
        assert w.admits
        w.hostcmd(item(2500))
        w.hostcmd(item(2501))
        assert w.behind and not w.admits
        await w.flush()
        assert w.admits

    run_writer(tmp_path / "audit.jsonl", body, max_pending=5000, linger=1.0)


def test_queued_hostcmd_records_are_not_rescanned_by_the_collector(tmp_path: Path) -> None:
    async def body(w: AuditWriter) -> None:
        for i in range(1000):
            w.hostcmd(item(i))
        gc.collect()
        assert not any(gc.is_tracked(x) for x in list(w._pending)[1:])

    run_writer(tmp_path / "audit.jsonl", body, linger=1.0)


def test_a_partial_line_left_by_a_crash_is_cut_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, 10)
    torn = b'{"client":"127.0.0.1:5000","command":"CC","corr'  # a write cut short
    with path.open("ab") as fh:
        fh.write(torn)
    write_records(path, 3)
    opens = [r for r in records(path) if r["kind"] == "open"]
    assert opens[-1]["reason"] == "restart" and opens[-1]["cut_bytes"] == len(torn)
    assert _verify(path).ok


def test_a_batch_is_one_write_and_one_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    async def body(w: AuditWriter) -> None:
        await w.flush()
        calls.clear()
        for i in range(MAX_BATCH - 1):
            w.hostcmd(item(i))
        await w.flush()
        assert len(calls) == 1

    run_writer(tmp_path / "audit.jsonl", body, linger=1.0)


# -- forms and settings -------------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)


@settings(max_examples=200)
@given(
    client=_text, tenant=_text, listener=_text, command=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2),
    result=st.sampled_from(["00", "01", "15", "41"]), latency=st.floats(0, 100, allow_nan=False),
    header=st.binary(max_size=8), node=st.sampled_from(["", "node-a", 'n"x']),
    key_ids=st.lists(st.tuples(_text, _text), max_size=3),
)  # fmt: skip
def test_the_host_command_template_is_the_canonical_json(
    client: str, tenant: str, listener: str, command: str, result: str, latency: float, header: bytes,
    node: str, key_ids: list[tuple[str, str]],
) -> None:  # fmt: skip
    it = (listener, tenant, client, command, result, latency, header, node, tuple(key_ids))
    line = hostcmd_line(it, 42, "2026-12-04T19:52:41.123Z", "ab" * 32)
    expected = canonical(
        {**hostcmd_record(it), "seq": 42, "time": "2026-12-04T19:52:41.123Z", "prev": "ab" * 32}
    )
    assert line == expected


def test_audit_settings_are_validated(tmp_path: Path) -> None:
    ok = parse_audit_settings({"audit": {"path": "a.jsonl", "ack_after_durable": True}}, tmp_path)
    assert ok is not None and ok.ack_after_durable and ok.path == str(tmp_path / "a.jsonl")
    assert ok.checkpoint_every == 1000 and ok.checkpoint_interval == 1.0
    assert parse_audit_settings({"audit": {}}, tmp_path) is None
    for bad in (
        {"fsync": "sometimes"}, {"max_pending": 10}, {"linger": 2}, {"checkpoint_every": 0},
        {"key_id": "bad id"}, {"ack_after_durable": "yes"}, {"what": 1},
    ):  # fmt: skip
        with pytest.raises(AuditConfigError):
            parse_audit_settings({"audit": {"path": "a.jsonl", **bad}}, tmp_path)


def test_the_pinned_keys_file_round_trips(tmp_path: Path) -> None:
    signer = SoftwareSigner(TEST_SIGNING_KEY)
    other = SoftwareSigner()
    pem = tmp_path / "keys.pem"
    pem.write_text(pem_bundle([("node-a", "00", signer.der), ("node-b", "00", other.der)]))
    pinned = PinnedKeys.load(pem)
    assert set(pinned.keys) == {signer.signer, other.signer}
    assert f"signer {signer.signer}" in pem.read_text()
