"""The audit trail's files: the live file, its rotated predecessors, and reading a trail back.

A rotated file is renamed ``<path>.<UTC yyyymmddTHHMMSS>.<last seq>``. The writer continues a trail
across restarts from what the files hold (:func:`resume_state`): the last record's seq and hash, the
trail id, the last checkpoint, and the leaf hashes of the records after it (the unsealed tail, sealed
by the next checkpoint). A crash can leave a partial last line; :func:`cut_partial_line` removes it
(it was never acknowledged as written: its write did not complete).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsmproxy.audit.checkpoint import NO_CHECKPOINT, parse_checkpoint, statement_digest
from hsmproxy.audit.form import FORMAT, GENESIS, line_hash

#: Bytes read per step when scanning a file backwards.
_CHUNK = 1 << 20


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of the audit file ``path`` (``<path>.<time>.<last seq>``), oldest first."""
    rotated = [p for p in path.parent.glob(path.name + ".*") if p.name.rsplit(".", 1)[-1].isdigit()]
    rotated.sort(key=lambda p: int(p.name.rsplit(".", 1)[-1]))
    return rotated


def trail_files(path: Path) -> list[Path]:
    """Every file of the trail at ``path``, oldest first (rotated ones, then the live one)."""
    rotated = rotated_files(path)
    return [*rotated, path] if path.exists() else rotated


def cut_partial_line(path: Path) -> int:
    """Remove a partial last line (a write cut short by a crash); the number of bytes removed."""
    with path.open("rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        start = size
        while start > 0:
            step = min(_CHUNK, start)
            fh.seek(start - step)
            chunk = fh.read(step)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start - step + i + 1
                fh.truncate(keep)
                return size - keep
            start -= step
        fh.truncate(0)
        return size


def _lines_backwards(path: Path) -> Any:
    """Complete lines of ``path`` from the last to the first (bytes, without newlines)."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        rest = b""
        while end > 0:
            start = max(0, end - _CHUNK)
            fh.seek(start)
            data = fh.read(end - start) + rest
            lines = data.split(b"\n")
            rest = lines[0] if start > 0 else b""
            body = lines[1:] if start > 0 else lines
            for line in reversed(body):
                if line:
                    yield line
            end = start
        if rest:
            yield rest


@dataclass
class TrailState:
    """Where a trail left off: enough to append to it and seal its tail."""

    #: Next seq, and the hex leaf hash of the last record (GENESIS for an empty trail).
    seq: int = 0
    prev: str = GENESIS
    #: The trail id ("" for a new trail), and the hex SHA-256 of the last checkpoint's statement.
    trail: str = ""
    prev_checkpoint: str = NO_CHECKPOINT
    #: First seq not covered by a checkpoint, and the leaf hashes of the records from there on.
    unsealed_from: int = 0
    unsealed: list[bytes] = field(default_factory=list)
    #: The newest keystore history id recorded (``history_id`` of ``key`` records, ``key_cursor`` of
    #: ``open``/``close`` records); None when the trail holds neither.
    key_cursor: int | None = None
    #: True when the last file was written by a version-1 (HMAC) writer.
    version1: bool = False


def resume_state(files: list[Path]) -> TrailState:
    """Read a trail's files backwards until its last checkpoint (and trail id) are known."""
    state = TrailState()
    tail: list[tuple[int, bytes]] = []  # (seq, leaf hash) of records after the last checkpoint
    have_last = have_checkpoint = seen_open = False
    for path in reversed(files):
        for line in _lines_backwards(path):
            cp = parse_checkpoint(line)
            if cp is not None:
                if not have_checkpoint:
                    have_checkpoint = True
                    state.prev_checkpoint = statement_digest(cp).hex()
                    state.unsealed_from = int(cp["last"]) + 1
                    state.trail = state.trail or str(cp.get("trail", ""))
                continue
            rec = _record(line)
            if rec is None:
                continue
            if "mac" in rec:
                state.version1 = True
                if not have_last:
                    state.seq, state.prev, have_last = int(rec["seq"]) + 1, GENESIS, True
                return _finish(state, tail, have_checkpoint)
            seq = int(rec["seq"])
            if not have_last:
                state.seq, state.prev, have_last = seq + 1, line_hash(line).hex(), True
            if not have_checkpoint:
                tail.append((seq, line_hash(line)))
            if state.key_cursor is None:
                value = rec.get("history_id", rec.get("key_cursor"))
                if value is not None:
                    state.key_cursor = int(value)
            if rec.get("kind") == "open":
                seen_open = True  # every file starts with one: it names the trail and the key cursor
                if rec.get("trail") and not state.trail:
                    state.trail = str(rec["trail"])
            if have_checkpoint and seen_open:
                return _finish(state, tail, True)
    return _finish(state, tail, have_checkpoint)


def _finish(state: TrailState, tail: list[tuple[int, bytes]], have_checkpoint: bool) -> TrailState:
    if not have_checkpoint:
        state.unsealed_from = tail[-1][0] if tail else state.seq
    tail.reverse()
    state.unsealed = [h for seq, h in tail if seq >= state.unsealed_from]
    return state


def _record(line: bytes) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError):
        rec = json.loads(line)
        if isinstance(rec, dict) and isinstance(rec.get("seq"), int):
            return rec
    return None


def open_body(reason: str, trail: str, previous_file: str, cut_bytes: int = 0) -> dict[str, Any]:
    """The ``open`` record that starts every file of a version-2 trail."""
    body: dict[str, Any] = {
        "kind": "open", "reason": reason, "format": FORMAT, "trail": trail, "previous_file": previous_file,
    }  # fmt: skip
    if cut_bytes:
        body["cut_bytes"] = cut_bytes  # a partial line a crash left was removed before this record
    return body
