"""Tamper-evident audit trail: append-only JSON lines, HMAC-chained with a key held in the HSM nodes.

Record (one JSON object per line, canonical form: keys sorted, no whitespace, ASCII)::

    {"seq", "time", "kind", "tenant", "client", "listener", "command", "result", "latency_ms",
     "correlation", "node", "key_ids", "prev", "mac"}

``kind`` is ``hostcmd`` (one per answered host command), ``console`` or ``key`` (via
:meth:`AuditWriter.event`), or a chain record: ``open`` (first record of every file: ``reason``
``new`` / ``restart`` / ``rotate``, ``previous_file``), ``checkpoint`` (every ``checkpoint_every``
records or ``checkpoint_interval`` seconds: ``count`` = records before it, ``last_mac``) and
``close`` (last record of a file: ``reason`` ``rotate`` / ``stop``, ``next_file``).
``correlation`` is the echoed message header in hex. Records never carry keys, PINs, PIN blocks
or PANs (:class:`~hsmproxy.server.hostcmd.CommandRecord` has none); ``key_ids`` is reserved.

Chain: ``mac = HMAC-SHA256(audit key, canonical(record without "mac"))`` where the record includes
``prev`` = the previous record's MAC (64 zeros for seq 0), across rotated files too. The key is the
token object ``hsmproxy-audit:<key_id>`` (``lmk load`` creates it); the writer collects the records
of one event-loop wake-up and sends ONE ``audit_mac`` op per batch, the node chains the MACs
(hsmproxy/ops/audit.py). While no node answers, records wait in memory (bounded by
``max_pending``: beyond it the oldest batch is dropped and a ``gap`` is logged at ERROR).

``[audit]``: ``path`` (enables it), ``max_bytes`` (0: no size rotation), ``rotate_daily``,
``fsync`` = ``always`` (after each record) / ``batch`` (after each batch) / ``never``, ``key_id``,
``checkpoint_every``, ``checkpoint_interval``. A rotated file is renamed
``<path>.<UTC yyyymmddTHHMMSS>.<last seq>``; the size check runs per batch (a file may exceed
``max_bytes`` by one batch).

:func:`verify_files` recomputes the chain (plain-mode MACs: each record's own ``prev``) and names
the first problem: an edited record (MAC mismatch), a deleted record (seq gap), a reordered record
(seq going back), a truncated file (a partial last line, or no ``close`` record at the end unless
``live``), a broken link (``prev`` not the previous MAC).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import time
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hsmproxy.server.hostcmd import CommandRecord

log = logging.getLogger("hsmproxy.audit")

#: Label prefix of the audit HMAC key's token object (``hsmproxy-audit:<key id>``).
AUDIT_KEY_LABEL = "hsmproxy-audit"
GENESIS = "0" * 64
FSYNC_POLICIES = ("always", "batch", "never")
#: Most records sent in one ``audit_mac`` op.
MAX_BATCH = 1000

#: Chained MACs: (prev, bodies) -> MACs (the node inserts ``prev`` into each body in turn).
ChainMac = Callable[[str, list[str]], Awaitable[list[str]]]
#: Plain MACs for verification: bodies (each with its own ``prev``) -> MACs.
PlainMac = Callable[[list[str]], list[str]]


def canonical(record: dict[str, Any]) -> bytes:
    """The canonical JSON of a record: keys sorted, no whitespace, ASCII only (what is MACed)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


class AuditConfigError(ValueError):
    """The ``[audit]`` section is invalid."""


@dataclass(frozen=True)
class AuditSettings:
    """The ``[audit]`` section."""

    path: str
    max_bytes: int = 64 * 1024 * 1024
    rotate_daily: bool = True
    fsync: str = "batch"
    key_id: str = "00"
    checkpoint_every: int = 1000
    checkpoint_interval: float = 60.0
    max_pending: int = 100_000


def parse_audit_settings(data: dict[str, Any], base: Path) -> AuditSettings | None:
    """The ``[audit]`` section of a parsed config (None when it has no ``path``)."""
    raw = data.get("audit")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise AuditConfigError("audit: expected a table")
    unknown = set(raw) - set(AuditSettings.__dataclass_fields__)
    if unknown:
        raise AuditConfigError(f"audit: unknown keys {sorted(unknown)}")
    if not raw.get("path"):
        return None
    p = Path(str(raw["path"]))
    try:
        s = AuditSettings(
            path=str(p if p.is_absolute() else (base / p).resolve()),
            max_bytes=int(raw.get("max_bytes", AuditSettings.max_bytes)),
            rotate_daily=bool(raw.get("rotate_daily", AuditSettings.rotate_daily)),
            fsync=str(raw.get("fsync", AuditSettings.fsync)),
            key_id=str(raw.get("key_id", AuditSettings.key_id)),
            checkpoint_every=int(raw.get("checkpoint_every", AuditSettings.checkpoint_every)),
            checkpoint_interval=float(raw.get("checkpoint_interval", AuditSettings.checkpoint_interval)),
            max_pending=int(raw.get("max_pending", AuditSettings.max_pending)),
        )
    except (TypeError, ValueError) as exc:
        raise AuditConfigError(f"audit: {exc}") from None
    if s.fsync not in FSYNC_POLICIES:
        raise AuditConfigError(f"audit: fsync must be one of {', '.join(FSYNC_POLICIES)}")
    if s.max_bytes < 0 or s.checkpoint_every < 1 or s.checkpoint_interval <= 0 or s.max_pending < 1:
        raise AuditConfigError("audit: max_bytes >= 0, checkpoint_every >= 1, checkpoint_interval > 0")
    return s


def load_audit_settings(config_path: str) -> AuditSettings | None:
    """The ``[audit]`` section of the config file at ``config_path`` (None: absent or no path)."""
    if not config_path:
        return None
    p = Path(config_path)
    with p.open("rb") as fh:
        data = tomllib.load(fh)
    return parse_audit_settings(data, p.resolve().parent)


def software_chain_mac(key: bytes) -> ChainMac:
    """A chained MAC provider computing in software (unit tests; same results as the node op)."""

    async def chain(prev: str, bodies: list[str]) -> list[str]:
        out = []
        for body in bodies:
            rec = json.loads(body)
            rec["prev"] = prev
            prev = hmac.new(key, canonical(rec), hashlib.sha256).hexdigest()
            out.append(prev)
        return out

    return chain


def software_plain_mac(key: bytes) -> PlainMac:
    """A plain MAC provider computing in software (unit tests)."""
    return lambda bodies: [
        hmac.new(key, canonical(json.loads(b)), hashlib.sha256).hexdigest() for b in bodies
    ]


def router_chain_mac(router: Any, key_id: str) -> ChainMac:
    """A chained MAC provider sending one ``audit_mac`` op per batch through the cluster router."""

    async def chain(prev: str, bodies: list[str]) -> list[str]:
        code, values = await router.execute("audit_mac", {"key_id": key_id, "prev": prev, "bodies": bodies})
        if code != "00":
            raise RuntimeError(f"audit_mac answered {code}")
        macs = str(values["macs"]).split()
        if len(macs) != len(bodies):
            raise RuntimeError("audit_mac returned a wrong number of MACs")
        return macs

    return chain


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class AuditWriter:
    """Appends MAC-chained records to ``settings.path``; register :meth:`observe` as a Proxy observer."""

    settings: AuditSettings
    mac: ChainMac
    #: Time source (tests): returns the wall clock as seconds since the epoch.
    clock: Callable[[], float] = time.time
    _pending: list[dict[str, Any]] = field(default_factory=list)
    _seq: int = 0
    _prev: str = GENESIS
    _since_checkpoint: int = 0
    _last_checkpoint: float = 0.0
    _file: Any = None
    _day: str = ""
    _flushing: asyncio.Task[None] | None = None
    _scheduled: bool = False
    _timer: asyncio.Task[None] | None = None
    _closed: bool = False
    _rotate_to: str = ""
    #: Records written (chain records included), and records dropped while no node answered.
    written: int = 0
    dropped: int = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or continue) the file and start the checkpoint timer."""
        path = Path(self.settings.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        reason, previous = "new", ""
        if path.exists() and path.stat().st_size > 0:
            last = _last_record(path)
            self._seq, self._prev = int(last["seq"]) + 1, str(last["mac"])
            reason = "restart"
        else:
            previous = self._latest_rotated(path)
            if previous:
                last = _last_record(Path(previous))
                self._seq, self._prev = int(last["seq"]) + 1, str(last["mac"])
        self._open_file()
        self._last_checkpoint = self.clock()
        self._pending.append({"kind": "open", "reason": reason, "previous_file": Path(previous).name})
        try:
            await self.flush()
        except Exception as exc:  # no node yet: the records wait, the flush loop retries
            log.warning("audit: cannot MAC records yet (%s); retrying", exc)
            self._kick()
        self._timer = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        """Write the pending records and a ``close`` record, then close the file."""
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        self._closed = True  # no record after the close record
        self._pending.append({"kind": "close", "reason": "stop", "next_file": ""})
        if self._flushing is not None:
            with contextlib.suppress(Exception):
                await self._flushing
        try:
            await self.flush()
        except Exception as exc:
            log.error("audit: %d records could not be MACed at stop (%s)", len(self._pending), exc)
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- input -----------------------------------------------------------------------------------

    def observe(self, record: CommandRecord) -> None:
        """Proxy observer: queue one ``hostcmd`` record (written at the next event-loop wake-up)."""
        self._enqueue(
            {
                "kind": "hostcmd",
                "tenant": record.tenant,
                "client": record.peer,
                "listener": record.listener,
                "command": record.command,
                "result": record.error,
                "latency_ms": round(record.latency * 1000.0, 3),
                "correlation": record.header.hex().upper(),
                "node": None,
                "key_ids": [],
            }
        )

    def event(self, kind: str, **fields: Any) -> None:
        """Queue a ``console`` or ``key`` record (fields: tenant, client, command, result, key_ids …)."""
        self._enqueue({"kind": kind, **fields})

    def _enqueue(self, body: dict[str, Any]) -> None:
        if self._closed:
            return
        self._pending.append(body)
        if len(self._pending) > self.settings.max_pending:
            drop = len(self._pending) - self.settings.max_pending
            del self._pending[:drop]
            self.dropped += drop
            log.error("audit: %d records dropped (no node answers audit_mac): the trail has a gap", drop)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._kick)

    def _kick(self) -> None:
        self._scheduled = False
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while self._pending:
            try:
                await self.flush()
            except Exception as exc:  # no node, node error: keep the records, retry
                log.warning("audit: cannot MAC records (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _tick(self) -> None:
        interval = self.settings.checkpoint_interval
        while True:
            await asyncio.sleep(min(interval, 1.0))
            if self._since_checkpoint and self.clock() - self._last_checkpoint >= interval:
                self._enqueue({"kind": "checkpoint"})

    # -- writing ---------------------------------------------------------------------------------

    async def flush(self) -> None:
        """MAC and write the pending records (one op per batch of at most MAX_BATCH)."""
        while self._pending:
            batch = self._pending[:MAX_BATCH]
            records = self._plan(batch)
            bodies = [canonical(r).decode("ascii") for r in records]
            macs = await self.mac(self._prev, bodies)
            del self._pending[: len(batch)]
            self._write(records, macs)

    def _plan(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Number the batch, adding rotation (close/open) and checkpoint records where due."""
        out: list[dict[str, Any]] = []
        seq, since = self._seq, self._since_checkpoint
        rotate = self._rotation_due() and batch[0].get("kind") != "open"

        def add(body: dict[str, Any]) -> None:
            nonlocal seq, since
            rec = {"seq": seq, "time": _now(), **body}
            out.append(rec)
            seq += 1
            since = 0 if body["kind"] in ("checkpoint", "open") else since + 1

        if rotate:
            stamp = dt.datetime.fromtimestamp(self.clock(), dt.UTC).strftime("%Y%m%dT%H%M%S")
            self._rotate_to = f"{self.settings.path}.{stamp}.{seq}"
            add({"kind": "close", "reason": "rotate", "next_file": Path(self.settings.path).name})
            add({"kind": "open", "reason": "rotate", "previous_file": Path(self._rotate_to).name})
        for body in batch:
            add({"kind": "checkpoint", "count": seq} if body["kind"] == "checkpoint" else body)
            if since >= self.settings.checkpoint_every and body["kind"] != "close":
                add({"kind": "checkpoint", "count": seq})
        return out

    def _rotation_due(self) -> bool:
        if self._file is None:
            return False
        size = self._file.tell()
        if self.settings.max_bytes and size >= self.settings.max_bytes:
            return True
        return self.settings.rotate_daily and size > 0 and self._today() != self._day

    def _today(self) -> str:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC).strftime("%Y%m%d")

    def _write(self, records: list[dict[str, Any]], macs: list[str]) -> None:
        policy = self.settings.fsync
        for rec, mac in zip(records, macs, strict=True):
            self._append(rec, mac, policy)
            if rec["kind"] == "close" and rec["reason"] == "rotate":
                self._rotate()
        if policy == "batch" and self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def _append(self, rec: dict[str, Any], mac: str, policy: str) -> None:
        rec["prev"], rec["mac"] = self._prev, mac
        self._file.write(canonical(rec) + b"\n")
        self._file.flush()
        if policy == "always":
            os.fsync(self._file.fileno())
        self._prev, self._seq = mac, int(rec["seq"]) + 1
        if rec["kind"] in ("checkpoint", "open"):
            self._since_checkpoint = 0
            if rec["kind"] == "checkpoint":
                self._last_checkpoint = self.clock()
        else:
            self._since_checkpoint += 1
        self.written += 1

    def _rotate(self) -> None:
        """Close the full file, rename it ``<path>.<stamp>.<last seq>`` and open a new one."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.settings.path, self._rotate_to)
        self._open_file()
        log.info("audit: rotated to %s", self._rotate_to)

    def _open_file(self) -> None:
        self._file = open(self.settings.path, "ab")  # noqa: SIM115 - kept open for appending
        self._day = self._today()

    @staticmethod
    def _latest_rotated(path: Path) -> str:
        rotated = [p for p in path.parent.glob(path.name + ".*") if p.name.rsplit(".", 1)[-1].isdigit()]
        rotated.sort(key=lambda p: int(p.name.rsplit(".", 1)[-1]))
        return str(rotated[-1]) if rotated else ""


def _last_record(path: Path) -> dict[str, Any]:
    """The last complete record of an audit file (to continue its chain)."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 65536))
        tail = fh.read()
    lines = [line for line in tail.split(b"\n") if line.strip()]
    if not lines or not tail.endswith(b"\n"):
        raise AuditConfigError(f"{path}: the last audit record is incomplete; run `hsmproxy audit verify`")
    try:
        rec: dict[str, Any] = json.loads(lines[-1])
        int(rec["seq"]), str(rec["mac"])
    except (ValueError, KeyError, TypeError):
        raise AuditConfigError(
            f"{path}: the last audit record is unreadable; run hsmproxy audit verify"
        ) from None
    return rec


# -- verification ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of :func:`verify_files`: ``kind`` is edited / deleted / reordered / truncated /
    broken / invalid; ``line`` is 1-based in ``file``; ``seq`` is None when the line is unreadable."""

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
    """Result of :func:`verify_files`: intact when ``problems`` is empty."""

    records: int = 0
    checkpoints: int = 0
    files: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _read_records(path: Path, report: VerifyReport) -> list[tuple[str, int, dict[str, Any]]]:
    data = path.read_bytes()
    lines = data.split(b"\n")
    out: list[tuple[str, int, dict[str, Any]]] = []
    name = str(path)
    for lineno, line in enumerate(lines[:-1], 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
                raise ValueError("no seq")
            str(rec["mac"]), str(rec["prev"])
        except (ValueError, KeyError):
            report.problems.append(Problem("invalid", name, lineno, None, "not a valid audit record"))
            continue
        out.append((name, lineno, rec))
    if lines[-1]:
        report.problems.append(
            Problem("truncated", name, len(lines), None, f"partial last record ({len(lines[-1])} bytes)")
        )
    return out


def _first_seq(path: Path) -> int:
    with path.open("rb") as fh:
        try:
            return int(json.loads(fh.readline())["seq"])
        except (ValueError, KeyError, TypeError):
            return -1


def verify_files(paths: Sequence[str | Path], mac: PlainMac, live: bool = False) -> VerifyReport:
    """Recompute the chain of the audit files ``paths`` (ordered by their first seq) with ``mac``.

    ``live``: the newest file is still being written, so it need not end with a ``close`` record.
    """
    report = VerifyReport()
    files = sorted((Path(p) for p in paths), key=_first_seq)
    entries: list[tuple[str, int, dict[str, Any]]] = []
    for path in files:
        entries += _read_records(path, report)
        report.files += 1
    bodies = [canonical({k: v for k, v in r.items() if k != "mac"}).decode("ascii") for _, _, r in entries]
    computed = mac(bodies) if bodies else []
    present = {rec["seq"] for _, _, rec in entries}
    prev: dict[str, Any] | None = None
    for (name, lineno, rec), good in zip(entries, computed, strict=True):
        seq = int(rec["seq"])

        def problem(kind: str, message: str, name: str = name, lineno: int = lineno, seq: int = seq) -> None:
            report.problems.append(Problem(kind, name, lineno, seq, message))

        report.records += 1
        if not hmac.compare_digest(str(rec["mac"]), good):
            problem("edited", "MAC mismatch: the record was changed")
        if rec.get("kind") == "checkpoint":
            report.checkpoints += 1
            if rec.get("count") != seq:
                problem("edited", f"checkpoint count {rec.get('count')} is not its seq {seq}")
        if prev is None:
            if seq == 0 and rec["prev"] != GENESIS:
                problem("broken", "seq 0 does not start from the genesis MAC")
        else:
            expected = int(prev["seq"]) + 1
            if seq == expected:
                if rec["prev"] != prev["mac"]:
                    problem("broken", f"prev is not the MAC of seq {prev['seq']}")
            elif seq > expected:
                missing = range(expected, seq)
                if all(m in present for m in missing):
                    problem("reordered", f"seq {seq} comes before seq {expected}..{seq - 1} (reordered)")
                else:
                    lost = f"seq {expected}" if seq - expected == 1 else f"seq {expected}..{seq - 1}"
                    problem("deleted", f"{lost} missing before this record (deleted)")
            else:
                problem("reordered", f"seq {seq} follows seq {prev['seq']} (records reordered)")
        prev = rec
    if entries and not live and entries[-1][2].get("kind") != "close":
        name, lineno, rec = entries[-1]
        last_cp = max((r["seq"] for _, _, r in entries if r.get("kind") == "checkpoint"), default=None)
        report.problems.append(
            Problem(
                "truncated", name, lineno, int(rec["seq"]),
                f"no close record at the end: the tail was truncated (last checkpoint seq {last_cp}); "
                "use --live for a file still being written",
            )
        )  # fmt: skip
    return report


def _node_macs(spec: Any, key_id: str, bodies: list[str]) -> list[str]:
    """Child process: open the node's token and MAC ``bodies`` (plain mode) with its audit key."""
    from hsmproxy.keys.ceremony import _open
    from hsmproxy.ops.audit import audit_mac

    backend = _open(spec)
    try:
        _, values = audit_mac(backend, {"key_id": key_id, "bodies": bodies})
    finally:
        backend.close()
    return str(values["macs"]).split()


def run_audit(args: Any) -> int:
    """Entry for ``hsmproxy audit verify PATH... [--config PATH] [--node NAME] [--live]``."""
    import sys

    from hsmproxy.backend.errors import BackendError, DeviceError
    from hsmproxy.config import ConfigError, load_settings
    from hsmproxy.keys.ceremony import _in_child

    try:
        settings = load_settings(args.config)
        audit = load_audit_settings(args.config)
    except (ConfigError, AuditConfigError, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    key_id = args.key_id or (audit.key_id if audit is not None else "00")
    nodes = [n for n in settings.nodes if not args.node or n.name == args.node]
    if not nodes:
        print("no such node in the config", file=sys.stderr)
        return 2

    def node_mac(bodies: list[str]) -> list[str]:
        last: Exception | None = None
        for spec in nodes:  # the first node that answers
            try:
                return _in_child(_node_macs, spec, key_id, bodies)
            except (BackendError, DeviceError) as exc:
                last = exc
        raise SystemExit(f"no node could compute the audit MACs: {last}")

    missing = [p for p in args.paths if not Path(p).is_file()]
    if missing:
        print(f"no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        report = verify_files(args.paths, node_mac, live=args.live)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    for p in report.problems:
        print(p)
    state = "intact" if report.ok else f"NOT intact ({len(report.problems)} problems)"
    print(f"{report.files} files, {report.records} records, {report.checkpoints} checkpoints: {state}")
    return 0 if report.ok else 1
