"""Tamper-evident audit trail: append-only JSON lines, HMAC-chained with a key held in the HSM nodes.

Record (one JSON object per line, canonical form: keys sorted, no whitespace, ASCII)::

    {"seq", "time", "kind", "tenant", "client", "listener", "command", "result", "latency_ms",
     "correlation", "node", "key_ids", "prev", "mac"}

``kind`` is ``hostcmd`` (one per answered host command), ``console`` (via :meth:`AuditWriter.event`),
``key`` (one per keystore life-cycle step, see :class:`KeyTrail`), ``gap`` (``lost`` records that could
not be written: queue overflow or write error), or a chain record: ``open`` (first record of every
file: ``reason`` ``new`` / ``restart`` / ``rotate``, ``previous_file``), ``checkpoint`` (every
``checkpoint_every`` records or ``checkpoint_interval`` seconds: ``count`` = records before it) and
``close`` (last record of a file: ``reason`` ``rotate`` / ``stop``, ``next_file``). With a keystore,
chain records also carry ``key_cursor`` (the last keystore history id in the trail).
``correlation`` is the echoed message header in hex; ``node`` the node that answered (null for an
answer given without a node); ``key_ids`` the named keystore keys the request presented, as
``{"key": "tenant/name@version", "kcv": …}`` (keys that are not in the keystore: nothing). Records
never carry keys, PINs, PIN blocks or PANs (:class:`~hsmproxy.server.hostcmd.CommandRecord` has none).

Chain: ``mac = HMAC-SHA256(audit key, canonical(record without "mac"))`` where the record includes
``prev`` = the previous record's MAC (64 zeros for seq 0), across rotated files too. The key is the
token object ``hsmproxy-audit:<key_id>`` (``lmk load`` creates it); the writer collects the
records of ``linger`` seconds and sends ONE ``audit_mac`` op per batch, the node chains the MACs
(hsmproxy/ops/audit.py); the batch is then one write and, per policy, one fsync in a thread.
While no node answers, records wait in memory (bounded by ``max_pending``: beyond it the oldest
records are dropped, logged at ERROR, and a ``gap`` record says how many). While nodes answer but
more than half of ``max_pending`` records wait (traffic faster than the trail), host commands that
need a node are shed (``41``) through the router's gate (:attr:`AuditWriter.admits`).

``[audit]``: ``path`` (enables it), ``max_bytes`` (0: no size rotation), ``rotate_daily``,
``fsync`` = ``always`` (after each record) / ``batch`` (after each batch) / ``never``, ``key_id``,
``checkpoint_every``, ``checkpoint_interval``, ``max_pending`` (at least 5,000), ``linger``,
``fail_closed`` (host commands answer ``41`` while the pending queue is full or the file cannot be
written) and
``[audit.syslog]`` (:mod:`hsmproxy.audit.syslog`: every written record also goes to a SIEM).
A rotated file is renamed ``<path>.<UTC yyyymmddTHHMMSS>.<last seq>``; the size check runs per
batch (a file may exceed ``max_bytes`` by one batch).

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
import secrets
import time
import tomllib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsmproxy.audit.syslog import SyslogConfigError, SyslogSettings, SyslogSink, parse_syslog_settings
from hsmproxy.configutil import resolve_path
from hsmproxy.logs import LogThrottle

if TYPE_CHECKING:
    from hsmproxy.keys.store import KeyStore
    from hsmproxy.server.hostcmd import CommandRecord

log = logging.getLogger("hsmproxy.audit")

#: Label prefix of the audit HMAC key's token object (``hsmproxy-audit:<key id>``).
AUDIT_KEY_LABEL = "hsmproxy-audit"
GENESIS = "0" * 64
FSYNC_POLICIES = ("always", "batch", "never")
#: Most records sent in one ``audit_mac`` op.
MAX_BATCH = 1000
#: Smallest ``max_pending`` a configuration may set: half of it, where host commands are shed, stays
#: above what a healthy trail holds (a batch of at most MAX_BATCH with the node, MAX_BATCH waiting).
MIN_PENDING = 5 * MAX_BATCH
#: ``reason`` of the ``gap`` record for records dropped from a full queue.
OVERFLOW = "queue overflow"

#: Chained MACs: (prev, bodies, slot) -> MACs. Each body is the canonical text of a record without
#: ``mac`` whose ``prev`` value is ``slot`` (64 hex digits, random per writer); the node replaces it
#: with the running previous MAC, MACs the text, and goes on (no JSON work on the node).
ChainMac = Callable[[str, list[str], str], Awaitable[list[str]]]
#: A queued host-command record: listener, tenant, peer, command, error, latency, header, node,
#: key ids (:class:`~hsmproxy.server.hostcmd.CommandRecord`'s fields, as an untracked tuple).
_HostcmdItem = tuple[str, str, str, str, str, float, bytes, str, tuple[tuple[str, str], ...]]
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
    #: Seconds a record may wait for others to share its batch (one node round trip and one fsync per
    #: batch); 0: a batch per event-loop wake-up. Answers never wait for their records.
    linger: float = 0.01
    #: Host commands answer ``41`` while records cannot be taken (queue full, file not writable).
    fail_closed: bool = False
    #: ``[audit.syslog]``: a copy of every record for a SIEM (None: off).
    syslog: SyslogSettings | None = None


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
    for flag in ("rotate_daily", "fail_closed"):
        if flag in raw and not isinstance(raw[flag], bool):
            raise AuditConfigError(f"audit: {flag} must be true or false")
    try:
        syslog = parse_syslog_settings(raw.get("syslog"), base)
    except SyslogConfigError as exc:
        raise AuditConfigError(str(exc)) from None
    try:
        s = AuditSettings(
            path=resolve_path(base, raw["path"]),
            max_bytes=int(raw.get("max_bytes", AuditSettings.max_bytes)),
            rotate_daily=bool(raw.get("rotate_daily", AuditSettings.rotate_daily)),
            fsync=str(raw.get("fsync", AuditSettings.fsync)),
            key_id=str(raw.get("key_id", AuditSettings.key_id)),
            checkpoint_every=int(raw.get("checkpoint_every", AuditSettings.checkpoint_every)),
            checkpoint_interval=float(raw.get("checkpoint_interval", AuditSettings.checkpoint_interval)),
            max_pending=int(raw.get("max_pending", AuditSettings.max_pending)),
            linger=float(raw.get("linger", AuditSettings.linger)),
            fail_closed=bool(raw.get("fail_closed", False)),
            syslog=syslog,
        )
    except (TypeError, ValueError) as exc:
        raise AuditConfigError(f"audit: {exc}") from None
    if s.fsync not in FSYNC_POLICIES:
        raise AuditConfigError(f"audit: fsync must be one of {', '.join(FSYNC_POLICIES)}")
    if s.max_bytes < 0 or s.checkpoint_every < 1 or s.checkpoint_interval <= 0:
        raise AuditConfigError("audit: need max_bytes >= 0, checkpoint_every >= 1, checkpoint_interval > 0")
    if s.max_pending < MIN_PENDING:
        # half of it is the overload gate: well above what the linger keeps waiting at full speed
        raise AuditConfigError(f"audit: max_pending must be at least {MIN_PENDING}")
    if not 0 <= s.linger <= 1:
        raise AuditConfigError("audit: linger must be 0 to 1 seconds")
    return s


def load_audit_settings(config_path: str) -> AuditSettings | None:
    """The ``[audit]`` section of the config file at ``config_path`` (None: absent or no path).
    (``Settings.audit`` holds the same, validated with the rest of the config.)"""
    if not config_path:
        return None
    p = Path(config_path)
    with p.open("rb") as fh:
        data = tomllib.load(fh)
    return parse_audit_settings(data, p.resolve().parent)


def software_chain_mac(key: bytes) -> ChainMac:
    """A chained MAC provider computing in software (unit tests; same results as the node op)."""

    async def chain(prev: str, bodies: list[str], slot: str) -> list[str]:
        out = []
        for body in bodies:
            rec = json.loads(body)
            if rec.get("prev") != slot:
                raise ValueError("body without the prev slot")
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

    async def chain(prev: str, bodies: list[str], slot: str) -> list[str]:
        # not shed under overload: at most one batch is in flight, and the answers it records were sent
        args = {"key_id": key_id, "prev": prev, "bodies": bodies, "slot": slot}
        code, values = await router.execute("audit_mac", args, shed=False)
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
    #: ``[audit.syslog]``: each written record is also queued for the SIEM.
    sink: SyslogSink | None = None
    #: Keystore life-cycle records (:class:`KeyTrail`; started and stopped with the writer).
    keys: KeyTrail | None = None
    #: Records waiting for a batch: dicts, or host-command records as untracked tuples (less than half
    #: the memory of their dict while a backlog builds up, never rescanned by the collector), turned
    #: into dicts when planned.
    _pending: deque[dict[str, Any] | _HostcmdItem] = field(default_factory=deque)
    _seq: int = 0
    _mac_ok: bool = True  # the last audit_mac attempt succeeded
    _inflight: int = 0  # records of the batch out with the node (still pending: counted as such)
    _batch_full: asyncio.Event = field(default_factory=asyncio.Event)  # ends the linger early
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
    _lost: int = 0
    _flush_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: (mac slot, prev slot): random 64-hex stand-ins for the two MACs in a record's canonical text.
    _slots: tuple[str, str] = field(default_factory=lambda: (secrets.token_hex(32), secrets.token_hex(32)))
    _drop_log: LogThrottle = field(default_factory=LogThrottle)
    #: The last keystore history id written to the trail (None: no keystore records).
    key_cursor: int | None = None
    #: Records written (chain records included), and records lost (queue overflow, write errors).
    written: int = 0
    dropped: int = 0
    #: True while the last write to the file failed (cleared by the next successful write).
    failing: bool = False

    @property
    def accepting(self) -> bool:
        """False while the pending queue is full or the file cannot be written (``fail_closed`` gate)."""
        return not self.failing and self._waiting < self.settings.max_pending

    @property
    def behind(self) -> bool:
        """True while nodes MAC records but more than half of ``max_pending`` wait: more traffic than
        the trail can take (overload), not a failing trail. Host commands are then shed (their answers
        are still recorded), so the queue fills only under a flood far beyond capacity."""
        return self._mac_ok and self._waiting > self.settings.max_pending // 2

    @property
    def admits(self) -> bool:
        """The router's gate for host commands: not while :attr:`behind`, nor (``fail_closed``) while
        the trail cannot take records."""
        return not self.behind and (not self.settings.fail_closed or self.accepting)

    def room(self) -> int:
        """How many more records fit in the pending queue before the oldest would be dropped."""
        return self.settings.max_pending - self._waiting

    @property
    def _waiting(self) -> int:
        """Records not yet written: queued, and the batch with the node (it comes back if not MACed)."""
        return len(self._pending) + self._inflight

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or continue) the file and start the checkpoint timer (and the sink, the key trail)."""
        path = Path(self.settings.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        reason, previous = "new", ""
        if path.exists() and path.stat().st_size > 0:
            last = _last_record(path)
            self._seq, self._prev = int(last["seq"]) + 1, str(last["mac"])
            reason = "restart"
            if self.keys is not None:
                self.key_cursor = _key_cursor(path)
        else:
            previous = self._latest_rotated(path)
            if previous:
                last = _last_record(Path(previous))
                self._seq, self._prev = int(last["seq"]) + 1, str(last["mac"])
                if self.keys is not None:
                    self.key_cursor = _key_cursor(Path(previous))
        if self.keys is not None and self.key_cursor is None:
            self.key_cursor = 0
        self._open_file()
        self._last_checkpoint = self.clock()
        if self.sink is not None:
            self.sink.start()
        self._pending.append({"kind": "open", "reason": reason, "previous_file": Path(previous).name})
        try:
            await self.flush()
        except Exception as exc:  # no node yet: the records wait, the flush loop retries
            log.warning("audit: cannot MAC records yet (%s); retrying", exc)
            self._kick()
        self._timer = asyncio.get_running_loop().create_task(self._tick())
        if self.keys is not None:
            self.keys.start(self, self.key_cursor or 0)

    async def stop(self) -> None:
        """Write the pending records and a ``close`` record, then close the file."""
        if self.keys is not None:
            await self.keys.stop()
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        self._closed = True  # no record after the close record
        self._pending.append({"kind": "close", "reason": "stop", "next_file": ""})
        if self._flushing is not None:  # a retrying flush loop (no node answers) ends here
            await asyncio.wait([self._flushing], timeout=2.0)
            self._flushing.cancel()
            with contextlib.suppress(BaseException):
                await self._flushing
        try:
            await self.flush()
        except Exception as exc:
            log.error("audit: %d records could not be MACed at stop (%s)", len(self._pending), exc)
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.sink is not None:
            await self.sink.stop()

    # -- input -----------------------------------------------------------------------------------

    def observe(self, record: CommandRecord) -> None:
        """Proxy observer: queue one ``hostcmd`` record (written with the next batch).

        Queued as a plain tuple of strings, bytes and a float: the collector stops tracking such a
        tuple the first time it meets it, so a backlog of records (the trail behind under overload)
        is not rescanned by every collection. As objects it was: the front spent up to 90 % of its
        time in full collections once 100,000 records waited, and the nodes were ejected.
        """
        r = record
        item = (r.listener, r.tenant, r.peer, r.command, r.error, r.latency, r.header, r.node, r.key_ids)
        self._enqueue(item)

    @staticmethod
    def _hostcmd_body(item: _HostcmdItem) -> dict[str, Any]:
        listener, tenant, peer, command, error, latency, header, node, key_ids = item
        return {
            "kind": "hostcmd",
            "tenant": tenant,
            "client": peer,
            "listener": listener,
            "command": command,
            "result": error,
            "latency_ms": round(latency * 1000.0, 3),
            "correlation": header.hex().upper(),
            "node": node or None,
            "key_ids": [{"key": key, "kcv": kcv} for key, kcv in key_ids],
        }

    def event(self, kind: str, **fields: Any) -> None:
        """Queue a ``console`` or ``key`` record (fields: tenant, client, command, result, key_ids …)."""
        self._enqueue({"kind": kind, **fields})

    def _enqueue(self, body: dict[str, Any] | _HostcmdItem) -> None:
        if self._closed:
            return
        self._pending.append(body)
        if len(self._pending) >= MAX_BATCH:
            self._batch_full.set()
        if self._waiting > self.settings.max_pending:
            self._trim()
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._kick)

    def _trim(self) -> None:
        """Drop the oldest records beyond ``max_pending`` (counted; the next batch opens with a gap)."""
        dropped = self.dropped
        while self._pending and self._waiting > self.settings.max_pending:
            item = self._pending.popleft()  # a deque: O(1) per record (a list moved the whole queue)
            if isinstance(item, dict) and item.get("kind") == "gap":
                self._lost += int(item["lost"])  # a gap record dropped in turn: its count goes on
                continue
            self._lost += 1
            self.dropped += 1
        if self.dropped > dropped and self._drop_log.due() is not None:  # else a line per record
            log.error(
                "audit: records dropped (the pending queue is full), the trail has a gap: %d so far",
                self.dropped,
            )

    def _kick(self) -> None:
        self._scheduled = False
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while self._pending:
            if self.settings.linger > 0 and len(self._pending) < MAX_BATCH:
                # let the batch fill (group commit), up to MAX_BATCH records
                self._batch_full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_full.wait(), self.settings.linger)
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
        """MAC and write the pending records (one op per batch of at most MAX_BATCH); callers are
        serialised (the flush loop, :meth:`stop`, the console)."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        while self._pending:
            if self._lost:  # records dropped before they got a seq: say so in the chain
                head = self._pending[0]
                if isinstance(head, dict) and head.get("kind") == "gap" and head["reason"] == OVERFLOW:
                    head["lost"] = int(head["lost"]) + self._lost  # one gap, not two in a row
                else:
                    self._pending.appendleft({"kind": "gap", "lost": self._lost, "reason": OVERFLOW})
                self._lost = 0
            # The batch leaves the queue while the node MACs it: records dropped meanwhile (queue
            # full) are newer ones, never records of this batch about to be written.
            batch = [self._pending.popleft() for _ in range(min(MAX_BATCH, len(self._pending)))]
            self._inflight = len(batch)
            try:
                records = self._plan(batch)
                # One canonical encoding per record: its text with both MACs as slots is the line to
                # write (slots filled in) and, without the mac slot, the body the node MACs.
                mac_slot, prev_slot = self._slots
                cut = f'"mac":"{mac_slot}",'
                texts = [canonical({**r, "mac": mac_slot, "prev": prev_slot}).decode() for r in records]
                macs = await self.mac(self._prev, [t.replace(cut, "", 1) for t in texts], prev_slot)
            except BaseException as exc:  # not MACed (no node, cancelled): back in front, in order
                self._inflight = 0
                self._pending.extendleft(reversed(batch))
                self._trim()
                if not isinstance(exc, asyncio.CancelledError):
                    self._mac_ok = False  # fail open: keep serving, drop the oldest when full
                raise
            self._inflight = 0
            self._mac_ok = True
            try:
                if self._write(records, macs, texts):
                    # Off the event loop: requests keep flowing while the disk syncs, and the records
                    # that arrive meanwhile form the next batch (group commit). The flush lock keeps
                    # the file to this batch until the sync is done.
                    await asyncio.to_thread(os.fsync, self._file.fileno())
            except OSError as exc:  # disk full, I/O error: the records are lost, the chain goes on
                lost = sum(1 for r in records if int(r["seq"]) >= self._seq)
                self.dropped += lost
                self.failing = True
                log.error("audit: cannot write %s (%s): %d record(s) lost", self.settings.path, exc, lost)
                self._pending.appendleft({"kind": "gap", "lost": lost, "reason": f"write error {exc.errno}"})
                self._repair_tail()
                raise
            self.failing = False

    def _repair_tail(self) -> None:
        """After a failed write: cut a partial last line so the next record starts on a line."""
        with contextlib.suppress(OSError):
            self._file.flush()
        with contextlib.suppress(OSError):
            size = os.path.getsize(self.settings.path)
            with open(self.settings.path, "rb+") as fh:
                fh.seek(max(0, size - 65536))
                tail = fh.read()
                cut = tail.rfind(b"\n") + 1
                fh.truncate(size - len(tail) + cut)

    def _plan(self, batch: list[dict[str, Any] | _HostcmdItem]) -> list[dict[str, Any]]:
        """Number the batch, adding rotation (close/open) and checkpoint records where due."""
        out: list[dict[str, Any]] = []
        seq, since = self._seq, self._since_checkpoint
        cursor = self.key_cursor
        first = batch[0]
        rotate = self._rotation_due() and not (isinstance(first, dict) and first.get("kind") == "open")
        now = _now()  # the batch's records are written together

        def add(body: dict[str, Any]) -> None:
            nonlocal seq, since, cursor
            rec = {"seq": seq, "time": now, **body}
            if cursor is not None:
                if "history_id" in rec:
                    cursor = max(cursor, int(rec["history_id"]))
                elif rec["kind"] in ("open", "checkpoint", "close"):
                    rec["key_cursor"] = cursor
            out.append(rec)
            seq += 1
            since = 0 if body["kind"] in ("checkpoint", "open") else since + 1

        if rotate:
            stamp = dt.datetime.fromtimestamp(self.clock(), dt.UTC).strftime("%Y%m%dT%H%M%S")
            self._rotate_to = f"{self.settings.path}.{stamp}.{seq}"
            add({"kind": "close", "reason": "rotate", "next_file": Path(self.settings.path).name})
            add({"kind": "open", "reason": "rotate", "previous_file": Path(self._rotate_to).name})
        for item in batch:
            body = item if isinstance(item, dict) else self._hostcmd_body(item)
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

    def _write(self, records: list[dict[str, Any]], macs: list[str], texts: list[str]) -> bool:
        """Append the batch (one write to the OS per batch); True when the policy wants it synced."""
        policy = self.settings.fsync
        mac_slot, prev_slot = self._slots
        for rec, mac, text in zip(records, macs, texts, strict=True):
            line = text.replace(mac_slot, mac, 1).replace(prev_slot, self._prev, 1).encode("ascii") + b"\n"
            self._append(rec, mac, line, policy)
            if rec["kind"] == "close" and rec["reason"] == "rotate":
                self._rotate()
        if self._file is None:
            return False
        self._file.flush()
        return policy == "batch"

    def _append(self, rec: dict[str, Any], mac: str, line: bytes, policy: str) -> None:
        """``line``: the canonical record with ``prev`` and ``mac`` (``canonical(rec)`` once they are set)."""
        rec["prev"], rec["mac"] = self._prev, mac
        self._file.write(line)
        if policy == "always":
            self._file.flush()
            os.fsync(self._file.fileno())
        self._prev, self._seq = mac, int(rec["seq"]) + 1
        if rec["kind"] in ("checkpoint", "open"):
            self._since_checkpoint = 0
            if rec["kind"] == "checkpoint":
                self._last_checkpoint = self.clock()
        else:
            self._since_checkpoint += 1
        if "history_id" in rec and self.key_cursor is not None:
            self.key_cursor = max(self.key_cursor, int(rec["history_id"]))
        self.written += 1
        if self.sink is not None:
            self.sink.submit(rec, line)

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
        rotated = rotated_files(path)
        return str(rotated[-1]) if rotated else ""


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of the audit file ``path`` (``<path>.<time>.<last seq>``), oldest first."""
    rotated = [p for p in path.parent.glob(path.name + ".*") if p.name.rsplit(".", 1)[-1].isdigit()]
    rotated.sort(key=lambda p: int(p.name.rsplit(".", 1)[-1]))
    return rotated


def _key_cursor(path: Path) -> int | None:
    """The last keystore history id recorded in an audit file: the newest ``history_id`` of a ``key``
    record or ``key_cursor`` of a chain record (None when the file has neither)."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        chunk = 1 << 20
        while True:
            start = max(0, size - chunk)
            fh.seek(start)
            data = fh.read(size - start)
            lines = data.split(b"\n")
            if start > 0:
                lines = lines[1:]  # possibly cut
            for line in reversed(lines):
                if b'"history_id"' not in line and b'"key_cursor"' not in line:
                    continue
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    rec = json.loads(line)
                    value = rec.get("history_id", rec.get("key_cursor"))
                    if value is not None:
                        return int(value)
            if start == 0:
                return None
            chunk *= 4


#: Seconds between two looks at the keystore history when idle (the keys CLI runs elsewhere).
KEY_POLL_INTERVAL = 0.5


class KeyTrail:
    """Writes every keystore life-cycle step as one ``key`` record, exactly once.

    The keys CLI and other proxies change the keystore from other processes, and the audit file has one
    writer, so the proxy polls the keystore's history (:meth:`KeyStore.history_since`) past a cursor:
    the last history id already in the trail, read back from the file at start (``history_id`` of
    ``key`` records, ``key_cursor`` of chain records), so a restart neither repeats nor skips a step.
    A ``key`` record carries ``history_id``, ``tenant``, ``key`` (name), ``version``, ``action``
    (created, activated, rotated, rolled_back, suspended, revoked, destroyed, validated, exported …),
    ``from_state``, ``to_state``, ``kcv``, ``actor``, ``reason`` and ``at`` (the keystore's time).

    Each time it finds new steps it also refreshes ``named`` (cryptogram -> (``tenant/name@version``,
    check value)) so that host-command records name the keystore keys they used.
    """

    def __init__(
        self,
        store: KeyStore,
        named: dict[str, tuple[str, str]] | None = None,
        interval: float = KEY_POLL_INTERVAL,
    ) -> None:
        self.store = store
        self.named = named
        self.interval = interval
        self.cursor = 0
        self.recorded = 0
        self._task: asyncio.Task[None] | None = None
        self._writer: AuditWriter | None = None

    def start(self, writer: AuditWriter, cursor: int) -> None:
        """Start polling after history id ``cursor``, queueing records on ``writer``."""
        self.cursor = cursor
        self._writer = writer
        self._task = asyncio.get_running_loop().create_task(self._run(writer), name="audit-keys")

    async def stop(self) -> None:
        """Take a last look at the keystore, then stop polling (idempotent; steps made later are
        recorded after the next start)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._writer is not None:
            try:
                while (room := min(500, self._writer.room())) > 0 and self.poll(self._writer, room) == room:
                    pass
            except Exception as exc:
                log.warning("audit: cannot read the keystore history at stop (%s)", type(exc).__name__)

    def refresh_named(self) -> None:
        """Rebuild the cryptogram -> (id, check value) map of named keys (replaced wholesale)."""
        if self.named is None:
            return
        fresh = {
            r.cryptogram.upper(): (f"{r.tenant}/{r.name}@{r.version}", r.kcv)
            for r in self.store.list()
            if r.cryptogram
        }
        self.named.clear()
        self.named.update(fresh)

    def poll(self, writer: AuditWriter, limit: int = 500) -> int:
        """Queue (at most ``limit`` of) the steps after the cursor; returns how many."""
        rows = self.store.history_since(self.cursor, limit)
        for row in rows:
            writer.event(
                "key", history_id=int(row["id"]), tenant=row["tenant"], key=row["name"],
                version=int(row["version"]), action=row["action"], from_state=row["from_state"],
                to_state=row["to_state"], kcv=row["kcv"] or "", actor=row["actor"], reason=row["reason"],
                at=str(row["at"]),
            )  # fmt: skip
            self.cursor = int(row["id"])
        self.recorded += len(rows)
        return len(rows)

    async def _run(self, writer: AuditWriter) -> None:
        first = True
        while True:
            room = min(500, writer.room())
            if room < 1:  # the writer is backed up (no node): read the keystore later, lose nothing
                await asyncio.sleep(self.interval)
                continue
            try:
                found = self.poll(writer, room)
                if found or first:
                    self.refresh_named()
                    first = False
            except Exception as exc:  # keystore unavailable: try again later
                log.warning("audit: cannot read the keystore history (%s)", type(exc).__name__)
                found = 0
            if found < room:
                await asyncio.sleep(self.interval)


def proxy_audit(settings: AuditSettings, router: Any, lifecycle: Any = None) -> AuditWriter:
    """The audit writer of a running proxy: node MACs through ``router``, a syslog sink when
    configured, keystore life-cycle records when the proxy has a keystore (``lifecycle``), and its
    gate on the router (:attr:`AuditWriter.admits`)."""
    keys = None
    if lifecycle is not None:
        keys = KeyTrail(lifecycle.store, lifecycle.refused.named)
    sink = SyslogSink(settings.syslog) if settings.syslog is not None else None
    writer = AuditWriter(settings, router_chain_mac(router, settings.key_id), sink=sink, keys=keys)
    router.gate = lambda: writer.admits
    return writer


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
    #: ``gap`` records: (file, line, seq, records lost, reason) — the chain is intact, records are not.
    gaps: list[tuple[str, int, int, int, str]] = field(default_factory=list)
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
        elif rec.get("kind") == "gap":
            report.gaps.append((name, lineno, seq, int(rec.get("lost") or 0), str(rec.get("reason", ""))))
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
    except (ConfigError, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    audit = settings.audit
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
    for file, line, seq, lost, why in report.gaps:
        print(f"{file}:{line} (seq {seq}): gap: {lost} record(s) were lost before this point ({why})")
    for p in report.problems:
        print(p)
    state = "intact" if report.ok else f"NOT intact ({len(report.problems)} problems)"
    print(f"{report.files} files, {report.records} records, {report.checkpoints} checkpoints: {state}")
    return 0 if report.ok else 1
