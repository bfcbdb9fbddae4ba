"""Offline verification of a format-2 audit trail, and inclusion proofs of single records.

:func:`verify_trail` reads the files of a trail in order and checks, with the pinned public keys only
(no HSM, no secret):

* the **records**: ``seq`` contiguous, each ``prev`` the leaf hash of the line before (the hash chain);
* the **checkpoints**: each covers the records right after the previous checkpoint's (``first`` ..
  ``last``), its ``root`` is the RFC 9162 Merkle tree hash of their lines, ``prev_checkpoint`` chains
  to the previous checkpoint's statement, ``trail`` is the trail's id, and its signature verifies under
  the pinned key named by ``signer``;
* the **tail**: records after the last checkpoint are *unsealed* (their integrity rests on the chain
  alone, which anyone can recompute): reported as such, and a problem unless ``live``;
* **witnesses**: checkpoints a SIEM received (``witness``) must be in the trail as they were sent, so a
  trail truncated back to an earlier checkpoint, or rewritten and re-signed, is caught.

Each problem names its file, line and seq and says what it means: ``edited``, ``deleted``,
``inserted``, ``reordered``, ``truncated``, ``forged`` (signature), ``swapped`` (a checkpoint out of its
place or from another trail), ``unsealed``, ``invalid`` (not a record).

:func:`prove` builds the inclusion proof of one record: the record's line, the audit path in its
segment's tree and the signed checkpoint; :func:`verify_proof` checks one against the pinned keys
without the rest of the trail.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsmproxy.audit.checkpoint import NO_CHECKPOINT, PinnedKeys, statement_digest
from hsmproxy.audit.form import GENESIS, line_hash
from hsmproxy.audit.merkle import inclusion_proof, root_of, verify_inclusion

#: ``format`` of an inclusion proof document.
PROOF_FORMAT = "hsmproxy-audit-proof/1"


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: ``line`` is 1-based in ``file``; ``seq`` None when the line has none."""

    kind: str
    file: str
    line: int
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify_trail` found: intact when ``problems`` is empty."""

    files: int = 0
    records: int = 0
    checkpoints: int = 0
    #: Records under a verified signature.
    sealed: int = 0
    #: (first, last) seq of the records after the last checkpoint (None: every record is sealed).
    unsealed: tuple[int, int] | None = None
    #: ``gap`` records: (file, line, seq, records lost, reason): the chain is intact, the trail is not.
    gaps: list[tuple[str, int, int, int, str]] = field(default_factory=list)
    #: Things worth saying that are not problems (e.g. the files start after seq 0).
    notes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    signers: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def first_line(path: Path) -> bytes:
    """The first line of a file (b"" when empty)."""
    with path.open("rb") as fh:
        return fh.readline().rstrip(b"\n")


def _first_seq(path: Path) -> int:
    try:
        return int(json.loads(first_line(path))["seq"])
    except (ValueError, KeyError, TypeError):
        return -1


def order_files(paths: list[str | Path]) -> list[Path]:
    """The files of a trail in writing order (by the seq of their first record)."""
    return sorted((Path(p) for p in paths), key=_first_seq)


@dataclass
class _Walk:
    """The verifier's running state across files."""

    report: VerifyReport
    pinned: PinnedKeys
    prev_line_hash: str = ""
    seq: int | None = None  # the last record's seq
    seen: set[int] = field(default_factory=set)
    segment_first: int | None = None  # first seq not under a checkpoint yet
    leaves: list[bytes] = field(default_factory=list)  # leaf hashes from segment_first on
    prev_checkpoint: str | None = None
    trail: str = ""
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    #: The files given start after seq 0; a checkpoint has been placed (the walk is anchored).
    partial: bool = False
    anchored: bool = False

    def problem(self, kind: str, where: tuple[str, int], seq: int | None, message: str) -> None:
        self.report.problems.append(Problem(kind, where[0], where[1], seq, message))

    def record(self, rec: dict[str, Any], line: bytes, where: tuple[str, int]) -> None:
        seq = int(rec["seq"])
        report = self.report
        report.records += 1
        digest = line_hash(line)
        if self.seq is None:
            if seq == 0 and rec.get("prev") != GENESIS:
                self.problem("edited", where, seq, "seq 0 does not start from the genesis hash")
            elif seq != 0:
                self.partial = True
                report.notes.append(
                    f"the files start at seq {seq}: the link to earlier records is not checked"
                )
            self.segment_first = seq
        else:
            expected = self.seq + 1
            if seq in self.seen:
                self.problem(
                    "inserted", where, seq, f"a second record with seq {seq} (inserted or duplicated)"
                )
            elif seq < expected:
                self.problem("reordered", where, seq, f"seq {seq} follows seq {self.seq} (records reordered)")
            elif seq > expected:
                lost = f"seq {expected}" if seq == expected + 1 else f"seq {expected}..{seq - 1}"
                self.problem(
                    "deleted", where, seq, f"{lost} missing before this record (deleted or reordered)"
                )
            elif rec.get("prev") != self.prev_line_hash:
                self.problem(
                    "edited",
                    where,
                    seq,
                    f"prev is not the hash of seq {self.seq}: that record (or this link) was changed",
                )
        self.seen.add(seq)
        self.seq = seq
        self.prev_line_hash = digest.hex()
        self.leaves.append(digest)
        if rec.get("kind") == "gap":
            report.gaps.append(
                (where[0], where[1], seq, int(rec.get("lost") or 0), str(rec.get("reason", "")))
            )
        if rec.get("kind") == "open" and rec.get("trail"):
            if self.trail and rec["trail"] != self.trail:
                self.problem("swapped", where, seq, "this file belongs to another trail (trail id differs)")
            self.trail = self.trail or str(rec["trail"])

    def checkpoint(self, cp: dict[str, Any], where: tuple[str, int]) -> None:
        report = self.report
        report.checkpoints += 1
        self.checkpoints.append(cp)
        try:
            first, last, size = int(cp["first"]), int(cp["last"]), int(cp["size"])
            root = bytes.fromhex(str(cp["root"]))
        except (KeyError, TypeError, ValueError):
            self.problem("invalid", where, None, "a checkpoint without first/last/size/root")
            return
        span = f"checkpoint {first}..{last}"
        why = self.pinned.verify(cp)
        if why:
            self.problem("forged", where, None, f"{span}: {why}")
        else:
            report.signers.add(str(cp["signer"]))
        if self.trail and cp.get("trail") != self.trail:
            self.problem("swapped", where, None, f"{span} belongs to another trail")
        digest = statement_digest(cp).hex()
        if self.prev_checkpoint is not None and cp.get("prev_checkpoint") != self.prev_checkpoint:
            self.problem(
                "swapped",
                where,
                None,
                f"{span} does not chain to the checkpoint before it "
                "(a checkpoint was removed, replaced or moved)",
            )
        elif self.prev_checkpoint is None and not self.partial and cp.get("prev_checkpoint") != NO_CHECKPOINT:
            self.problem(
                "swapped", where, None, f"{span}: the trail's first checkpoint must chain to nothing"
            )
        self.prev_checkpoint = digest
        start = self.segment_first if self.segment_first is not None else first
        if size != last - first + 1:
            self.problem("invalid", where, None, f"{span}: size {size} does not match its range")
            return
        if first != start:
            if self.partial and not self.anchored and first < start:
                report.notes.append(f"{span} starts before the first file given: its root is not checked")
            else:
                self.problem(
                    "swapped",
                    where,
                    None,
                    f"{span} should start at seq {start} (the record after the previous checkpoint)",
                )
            self.anchored = True
            self._drop_through(last)
            return
        self.anchored = True
        if self.seq is None or last > self.seq:
            self.problem(
                "truncated",
                where,
                None,
                f"{span} covers records that are not in the file before it (deleted or truncated)",
            )
            self._drop_through(last)
            return
        covered = self.leaves[:size]
        if not hmac.compare_digest(root_of(covered), root):
            self.problem(
                "edited",
                where,
                None,
                f"the records {first}..{last} do not hash to the signed root: a record in that range "
                "was edited, inserted or deleted",
            )
        elif not why:
            report.sealed += size
        self.leaves = self.leaves[size:]
        self.segment_first = last + 1

    def _drop_through(self, last: int) -> None:
        if self.segment_first is not None and last >= self.segment_first:
            self.leaves = self.leaves[last - self.segment_first + 1 :]
            self.segment_first = last + 1


def verify_trail(
    paths: list[str | Path],
    pinned: PinnedKeys,
    *,
    live: bool = False,
    witness: list[dict[str, Any]] | None = None,
) -> VerifyReport:
    """Verify the files of one trail (rotated ones included) with the pinned public keys."""
    report = VerifyReport()
    walk = _Walk(report, pinned)
    for path in order_files(paths):
        report.files += 1
        name = str(path)
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1]:
            report.problems.append(
                Problem("truncated", name, len(lines), None, f"partial last line ({len(lines[-1])} bytes)")
            )
        for lineno, line in enumerate(lines[:-1], 1):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError
            except ValueError:
                report.problems.append(Problem("invalid", name, lineno, None, "not a JSON record"))
                continue
            if rec.get("kind") == "checkpoint" and "seq" not in rec:
                walk.checkpoint(rec, (name, lineno))
            elif isinstance(rec.get("seq"), int) and isinstance(rec.get("prev"), str) and "mac" not in rec:
                walk.record(rec, line, (name, lineno))
            else:
                report.problems.append(Problem("invalid", name, lineno, None, "not a format-2 audit record"))
    if walk.leaves and walk.segment_first is not None and walk.seq is not None:
        report.unsealed = (walk.segment_first, walk.seq)
        if not live:
            report.problems.append(
                Problem(
                    "unsealed",
                    str(order_files(paths)[-1]) if paths else "",
                    0,
                    walk.segment_first,
                    f"seq {walk.segment_first}..{walk.seq} ({len(walk.leaves)} records) after the last "
                    "checkpoint are not under a signature (the proxy crashed or still writes: use --live; "
                    "the tail may also have been truncated)",
                )
            )
    for seen in witness or []:
        _check_witness(walk, seen)
    return report


def _check_witness(walk: _Walk, seen: dict[str, Any]) -> None:
    """A checkpoint from a witness (the SIEM) must be in the trail exactly as it was sent."""
    first, last = seen.get("first"), seen.get("last")
    mine = [cp for cp in walk.checkpoints if cp.get("first") == first and cp.get("last") == last]
    if any(cp == seen for cp in mine):
        return
    if walk.pinned.verify(seen):
        return  # not a valid checkpoint of ours in the first place: a witness line we cannot vouch for
    kind, text = (
        ("swapped", "differs from the witness's copy: the trail was rewritten")
        if mine
        else ("truncated", "seen by the witness is not in the trail: records and checkpoints were removed")
    )
    walk.report.problems.append(Problem(kind, "witness", 0, None, f"checkpoint {first}..{last} {text}"))


def read_witness(path: str | Path) -> list[dict[str, Any]]:
    """Checkpoints from a witness file: JSON lines, or syslog lines whose MSG is a checkpoint's JSON."""
    out: list[dict[str, Any]] = []
    for raw in Path(path).read_bytes().splitlines():
        i = raw.find(b'{"')
        if i < 0 or b'"kind":"checkpoint"' not in raw:
            continue
        try:
            rec = json.loads(raw[i:])
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "checkpoint":
            out.append(rec)
    return out


class ProofError(ValueError):
    """No proof can be made (no such record, or it is not sealed yet)."""


def prove(paths: list[str | Path], seq: int) -> dict[str, Any]:
    """The inclusion proof of record ``seq``: its line, its audit path and the checkpoint over it."""
    segment: list[bytes] = []
    record_line: bytes | None = None
    segment_first: int | None = None
    for path in order_files(paths):
        for line in path.read_bytes().split(b"\n"):
            if not line:
                continue
            rec = json.loads(line)
            if rec.get("kind") == "checkpoint" and "seq" not in rec:
                first, last = int(rec["first"]), int(rec["last"])
                if first <= seq <= last and record_line is not None and segment_first == first:
                    leaves = segment[: last - first + 1]
                    index = seq - first
                    return {
                        "format": PROOF_FORMAT, "seq": seq, "record": record_line.decode("ascii"),
                        "index": index, "size": len(leaves),
                        "path": [h.hex() for h in inclusion_proof(leaves, index)],
                        "checkpoint": line.decode("ascii"),
                    }  # fmt: skip
                if segment_first is not None and last >= segment_first:
                    segment = segment[last - segment_first + 1 :]
                segment_first = last + 1
                continue
            rseq = int(rec["seq"])
            if segment_first is None:
                segment_first = rseq
            segment.append(line_hash(line))
            if rseq == seq:
                record_line = line
    if record_line is None:
        raise ProofError(f"no record with seq {seq} in these files")
    raise ProofError(f"record {seq} is not sealed by a checkpoint yet (wait for the next one)")


def verify_proof(proof: dict[str, Any], pinned: PinnedKeys) -> str:
    """ "" when ``proof`` shows its record is in the signed trail, else what is wrong."""
    try:
        if proof.get("format") != PROOF_FORMAT:
            return f"not a proof document ({PROOF_FORMAT})"
        line = str(proof["record"]).encode("ascii")
        rec = json.loads(line)
        cp = json.loads(str(proof["checkpoint"]))
        index, size, seq = int(proof["index"]), int(proof["size"]), int(proof["seq"])
        path = [bytes.fromhex(str(h)) for h in proof["path"]]
        root = bytes.fromhex(str(cp["root"]))
        first, last = int(cp["first"]), int(cp["last"])
    except (KeyError, TypeError, ValueError, UnicodeEncodeError):
        return "the proof is malformed"
    if rec.get("seq") != seq or first + index != seq or size != last - first + 1 or size != int(cp["size"]):
        return "the record's seq does not match its place in the checkpoint"
    if not verify_inclusion(line_hash(line), index, size, path, root):
        return "the record is not in the checkpoint's tree (the record or the path was changed)"
    why = pinned.verify(cp)
    return f"the checkpoint is not valid: {why}" if why else ""
