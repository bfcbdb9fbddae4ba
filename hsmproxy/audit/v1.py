"""Verification of format-1 audit trails (HMAC-SHA256 chains, written before the hash-chain format).

A format-1 record carries ``prev`` (the previous record's MAC, 64 zeros at seq 0) and ``mac`` =
HMAC-SHA256(audit key, canonical JSON of the record without ``mac``); the key is the token object
``hsmproxy-audit:<key_id>`` on the nodes, so checking needs a node: ``mac`` computes the MACs of the
bodies (plain mode of the ``audit_mac`` operation). The proxy no longer writes this format; old trails
keep verifying with ``hsmproxy audit verify --config …`` (``--hmac-key-id``, default ``00``).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsmproxy.audit.form import GENESIS, canonical
from hsmproxy.audit.verify import Problem, VerifyReport, order_files

#: Plain MACs: bodies (records without ``mac``, each with its own ``prev``) -> MACs (hex).
PlainMac = Callable[[list[str]], list[str]]


def is_version1(path: Path) -> bool:
    """True when the file's first record is a format-1 (MACed) record."""
    with path.open("rb") as fh:
        line = fh.readline()
    try:
        rec = json.loads(line)
    except ValueError:
        return False
    return isinstance(rec, dict) and "mac" in rec


def verify_v1(paths: list[str | Path], mac: PlainMac, live: bool = False) -> VerifyReport:
    """Recompute the chain of format-1 files with ``mac``: edited, deleted, reordered, truncated, broken."""
    report = VerifyReport()
    entries: list[tuple[str, int, dict[str, Any]]] = []
    for path in order_files(paths):
        report.files += 1
        lines = path.read_bytes().split(b"\n")
        for lineno, line in enumerate(lines[:-1], 1):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
                    raise ValueError
                str(rec["mac"]), str(rec["prev"])
            except (ValueError, KeyError):
                report.problems.append(Problem("invalid", str(path), lineno, None, "not a format-1 record"))
                continue
            entries.append((str(path), lineno, rec))
        if lines[-1]:
            report.problems.append(Problem("truncated", str(path), len(lines), None, "partial last record"))
    bodies = [canonical({k: v for k, v in r.items() if k != "mac"}).decode("ascii") for _, _, r in entries]
    computed = mac(bodies) if bodies else []
    present = {rec["seq"] for _, _, rec in entries}
    prev: dict[str, Any] | None = None
    for (name, lineno, rec), good in zip(entries, computed, strict=True):
        seq = int(rec["seq"])
        report.records += 1

        def problem(kind: str, message: str, name: str = name, lineno: int = lineno, seq: int = seq) -> None:
            report.problems.append(Problem(kind, name, lineno, seq, message))

        if not hmac.compare_digest(str(rec["mac"]), good):
            problem("edited", "MAC mismatch: the record was changed")
        if rec.get("kind") == "checkpoint":
            report.checkpoints += 1
        elif rec.get("kind") == "gap":
            report.gaps.append((name, lineno, seq, int(rec.get("lost") or 0), str(rec.get("reason", ""))))
        if prev is None:
            if seq == 0 and rec["prev"] != GENESIS:
                problem("edited", "seq 0 does not start from the genesis MAC")
        else:
            expected = int(prev["seq"]) + 1
            if seq == expected:
                if rec["prev"] != prev["mac"]:
                    problem("edited", f"prev is not the MAC of seq {prev['seq']} (broken link)")
            elif seq > expected:
                if all(m in present for m in range(expected, seq)):
                    problem("reordered", f"seq {seq} comes before seq {expected}..{seq - 1} (reordered)")
                else:
                    problem("deleted", f"seq {expected}..{seq - 1} missing before this record (deleted)")
            else:
                problem("reordered", f"seq {seq} follows seq {prev['seq']} (records reordered)")
        prev = rec
    if entries and not live and entries[-1][2].get("kind") != "close":
        name, lineno, rec = entries[-1]
        report.problems.append(
            Problem(
                "truncated",
                name,
                lineno,
                int(rec["seq"]),
                "no close record at the end (use --live for a file still being written)",
            )
        )
    return report
