"""The one audit writer of a proxy: every front's records, hash-chained, group-committed, sealed.

Fronts hand records in and return at once: :meth:`AuditWriter.hostcmd` (an executed host command, as a
plain tuple), :meth:`AuditWriter.event` (ISO 8583, console, key life cycle, …) and
:meth:`AuditWriter.refused` (a request answered before it reached a node: only counted, then written
as one ``aggregate`` record per second per (tenant, listener, command, result) with ``count``,
``first`` and ``last``, so a flood of refusals costs a few records a second).

One task writes: it takes what is queued (up to ``MAX_BATCH``; after ``linger`` when idle), gives each
record its ``seq``, ``time`` (one per batch) and ``prev`` (:mod:`hsmproxy.audit.form`), appends the
lines in one write, syncs per ``[audit] fsync`` in a thread (group commit: records arriving meanwhile
form the next batch), then marks them durable. A batch that cannot be written is cut back out of the
file and returns to the head of the queue in order (the chain stays as it was); the writer retries every
second. Records wait in memory (``max_pending``); beyond it the oldest are dropped, counted, and a
``gap`` record (``lost``, ``reason``) takes their place in the chain.

**Durability rule.** A record is queued when its operation's answer is known, before that answer is
written to the client. With ``ack_after_durable`` the front holds the answer until :meth:`when_durable`
says the record's batch is on disk (per ``fsync``): an answer a client received is in the trail, even if
the process is killed right after. Without it, answers do not wait, and a crash of the process loses
at most the records not yet written (those of the last ``linger`` and the batch being written).
Host commands that need a node are refused (``41``) while half of ``max_pending`` waits
(:attr:`AuditWriter.admits`), and with ``fail_closed`` also while the file cannot be written, so no
crypto runs that the trail cannot take.

**Checkpoints** (:mod:`hsmproxy.audit.checkpoint`): the leaf hash of every record line goes into a
Merkle frontier; every ``checkpoint_every`` records or ``checkpoint_interval`` seconds the segment is
cut and a node signs its statement (:mod:`hsmproxy.audit.signer`), off the write path: records keep
flowing while the signature is out, and the checkpoint line is appended once it arrives. While a
signature cannot be had, the open segment keeps growing and is sealed by the next signature. At
rotation and stop the writer waits (bounded) for the seal, so a closed file ends sealed. Written
checkpoints go to the syslog sink too (every record does unless ``[audit.syslog] send = "checkpoints"``),
so a copy outside the box witnesses the trail (``hsmproxy audit verify --witness``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from hsmproxy.audit.checkpoint import Segment, checkpoint_line, statement, statement_digest
from hsmproxy.audit.files import cut_partial_line, open_body, resume_state, rotated_files, trail_files
from hsmproxy.audit.form import HostcmdItem, hostcmd_line, hostcmd_record, line_hash, record_line, utc_now
from hsmproxy.audit.merkle import MerkleFrontier
from hsmproxy.audit.settings import MAX_BATCH, AuditConfigError, AuditSettings
from hsmproxy.audit.signer import Signer, SignError
from hsmproxy.logs import LogThrottle

log = logging.getLogger("hsmproxy.audit")

#: ``reason`` of the ``gap`` record for records dropped from a full queue.
OVERFLOW = "queue overflow"
#: Seconds :meth:`AuditWriter.stop` and a rotation wait for the last segment's signature.
SEAL_TIMEOUT = 5.0
#: Seconds between two attempts at a checkpoint signature that failed.
SIGN_RETRY = 1.0
#: Seconds between two tries at a write that failed.
WRITE_RETRY = 1.0


class ChainRecord(dict[str, Any]):
    """A record the writer makes itself (open, close, gap, aggregate): it has no ticket, and it is never
    dropped from a full queue (the chain needs it)."""


_Item = dict[str, Any] | HostcmdItem


class RecordSink(Protocol):
    """Where written lines also go (:class:`~hsmproxy.audit.syslog.SyslogSink`)."""

    def submit_line(self, seq: int | None, kind: str, result: str, time: str, line: bytes) -> None:
        """Queue one written line (never blocks)."""
        ...

    def start(self) -> None:
        """Start delivering."""
        ...

    async def stop(self) -> None:
        """Deliver what is queued (bounded), then stop."""
        ...


class AuditWriter:
    """Appends hash-chained records to ``settings.path`` and seals them with signed checkpoints."""

    def __init__(
        self,
        settings: AuditSettings,
        signer: Signer,
        *,
        clock: Callable[[], float] = time.time,
        sink: RecordSink | None = None,
        key_cursor: bool = False,
    ) -> None:
        self.settings = settings
        self.signer = signer
        self.clock = clock
        self.sink = sink
        #: Keep ``key_cursor`` in open/close records (a keystore's history is being recorded).
        self.tracks_keys = key_cursor
        self._pending: deque[_Item] = deque()
        self._tally: dict[tuple[str, str, str, str], list[Any]] = {}
        self._batch_limit = 1 if settings.fsync == "always" else MAX_BATCH
        self._inflight = 0  # records of the batch being written (still waiting: counted as such)
        self._enqueued = 0  # records ever queued: the ticket of the newest
        self._resolved = 0  # tickets done (written, or dropped)
        self._waiters: deque[tuple[int, Callable[[], None]]] = deque()
        self._wake = asyncio.Event()
        self._lost = 0
        self._seq = 0
        self._prev = ""
        self._trail = ""
        self._prev_checkpoint = ""
        self._frontier = MerkleFrontier()
        self._segment_first = 0
        self._segment_started = 0.0
        self._sealing: asyncio.Task[None] | None = None
        self._sealed = asyncio.Event()
        self._ready: list[tuple[bytes, dict[str, Any]]] = []  # signed checkpoint lines to write
        self._file: Any = None
        self._day = ""
        self._task: asyncio.Task[None] | None = None
        self._tick: asyncio.Task[None] | None = None
        self._closed = False
        self._write_lock = asyncio.Lock()
        self._drop_log = LogThrottle()
        self._sign_log = LogThrottle(10.0)
        #: The last keystore history id in the trail (None: no keystore records).
        self.key_cursor: int | None = None
        #: Lines written (records and checkpoints), records lost (overflow, or dropped while failing),
        #: checkpoints written, refusals counted into aggregate records.
        self.written = 0
        self.dropped = 0
        self.checkpoints = 0
        self.refusals = 0
        #: The last seq under a written checkpoint (-1: none yet in this run).
        self.sealed_through = -1
        #: True while the last write to the file failed (cleared by the next successful write).
        self.failing = False

    # -- gates -------------------------------------------------------------------------------------

    @property
    def ack_after_durable(self) -> bool:
        """True: fronts hold each answer until its record is on disk (:meth:`when_durable`)."""
        return self.settings.ack_after_durable

    @property
    def waiting(self) -> int:
        """Records not yet written: queued, and the batch being written."""
        return len(self._pending) + self._inflight

    @property
    def accepting(self) -> bool:
        """False while the queue is full or the file cannot be written (the ``fail_closed`` gate)."""
        return not self.failing and self.waiting < self.settings.max_pending

    @property
    def behind(self) -> bool:
        """True while more than half of ``max_pending`` records wait: more than the disk takes."""
        return self.waiting > self.settings.max_pending // 2

    @property
    def admits(self) -> bool:
        """The gate of work that needs a node: not while :attr:`behind`, nor (``fail_closed``) while
        the trail cannot take records."""
        if self.settings.fail_closed:
            return not self.behind and self.accepting
        return not self.behind

    def room(self) -> int:
        """How many more records fit before the oldest would be dropped."""
        return self.settings.max_pending - self.waiting

    @property
    def unsealed(self) -> int:
        """Records written since the last checkpoint's segment (not yet under a signature)."""
        return self._seq - self._segment_first

    # -- input -------------------------------------------------------------------------------------

    def hostcmd(self, item: HostcmdItem) -> int:
        """Queue one executed host command; returns its ticket for :meth:`when_durable`."""
        return self._enqueue(item)

    def event(self, kind: str, **fields: Any) -> int:
        """Queue a record of ``kind`` (``iso8583``, ``console``, ``key`` …); returns its ticket."""
        return self._enqueue({"kind": kind, **fields})

    def refused(self, tenant: str, listener: str, command: str, result: str, count: int = 1) -> None:
        """Count ``count`` requests answered before they reached a node (shed, rate limit, ACL, bad
        format …)."""
        key = (tenant, listener, command, result)
        now = self.clock()
        entry = self._tally.get(key)
        if entry is None:
            self._tally[key] = [count, now, now]
        else:
            entry[0] += count
            entry[2] = now
        self.refusals += count

    def when_durable(self, ticket: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the record of ``ticket`` is on disk (at once if it already is)."""
        if ticket <= self._resolved:
            callback()
        else:
            self._waiters.append((ticket, callback))

    def _enqueue(self, item: _Item) -> int:
        if self._closed:
            return 0
        self._pending.append(item)
        self._enqueued += 1
        if self.waiting > self.settings.max_pending:
            self._trim()
        self._wake.set()
        return self._enqueued

    def _trim(self) -> None:
        """Drop the oldest queued records beyond ``max_pending`` (the next batch opens with a gap)."""
        dropped = 0
        kept: list[_Item] = []  # the writer's own records stay (the chain needs its open and close)
        while self._pending and self.waiting + len(kept) > self.settings.max_pending:
            item = self._pending.popleft()
            if isinstance(item, ChainRecord):
                if item.get("kind") == "gap":
                    self._lost += int(item["lost"])  # a gap record dropped in turn: its count goes on
                else:
                    kept.append(item)
                continue
            self._lost += 1
            dropped += 1
        self._pending.extendleft(reversed(kept))
        if dropped:
            self.dropped += dropped
            # held answers of dropped records are released (their loss is in the gap record)
            self._resolve(self._resolved + dropped)
            if self._drop_log.due() is not None:
                log.error(
                    "audit: records dropped (the queue is full), the trail has a gap: %d so far", self.dropped
                )

    def _resolve(self, upto: int) -> None:
        self._resolved = max(self._resolved, upto)
        waiters = self._waiters
        while waiters and waiters[0][0] <= self._resolved:
            _, callback = waiters.popleft()
            try:
                callback()
            except Exception:
                log.exception("audit: a durability callback failed")

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Continue the trail in the files (or start one), then start writing and sealing."""
        path = Path(self.settings.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cut = cut_partial_line(path) if path.exists() else 0
        if cut:
            log.warning("audit: removed a partial last line (%d bytes) left by a crash in %s", cut, path)
        files = trail_files(path)
        state = resume_state(files)
        if state.version1:
            raise AuditConfigError(
                f"{path}: the trail was written in format 1 (HMAC chain); move its files away (they keep "
                "verifying with `hsmproxy audit verify --config`) and start a format-2 trail"
            )
        self._seq, self._prev = state.seq, state.prev
        self._trail = state.trail or secrets.token_hex(16)
        self._prev_checkpoint = state.prev_checkpoint
        self._segment_first = state.unsealed_from
        for h in state.unsealed:
            self._frontier.append(h)
        self._segment_started = self.clock()
        if self.tracks_keys:
            self.key_cursor = state.key_cursor or 0
        reason = "restart" if path.exists() and path.stat().st_size else "new"
        previous = ""
        if reason == "new" and files:
            previous = files[-1].name
        self._open_file()
        self._pending.appendleft(
            self._with_cursor(ChainRecord(open_body(reason, self._trail, previous, cut)))
        )
        if self.sink is not None:
            self.sink.start()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="audit-writer")
        self._tick = loop.create_task(self._ticker(), name="audit-tick")
        self._wake.set()

    async def stop(self) -> None:
        """Write what is queued, a ``close`` record and its checkpoint; close the file."""
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        self._flush_tally()
        self._pending.append(self._with_cursor(ChainRecord(kind="close", reason="stop", next_file="")))
        self._closed = True  # nothing after the close record
        self._wake.set()
        if self._task is not None:
            # let the task write everything, then stop it while it waits (never in the middle of a write)
            deadline = time.monotonic() + SEAL_TIMEOUT
            while (self._pending or self._write_lock.locked()) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pending:
            log.error("audit: %d record(s) could not be written at stop", len(self._pending))
        elif self._file is not None:
            await self._seal(SEAL_TIMEOUT)
        if self._sealing is not None:
            self._sealing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sealing
        if self._file is not None:
            self._file.close()
            self._file = None
        self._resolve(self._enqueued)  # nobody waits on a stopped writer
        if self.sink is not None:
            await self.sink.stop()

    # -- writing -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.settings.linger and len(self._pending) < self._batch_limit and not self._closed:
                await asyncio.sleep(self.settings.linger)  # let a batch fill (group commit)
            while self._pending or self._ready:
                try:
                    await self.flush()
                except OSError:
                    await asyncio.sleep(WRITE_RETRY)

    async def flush(self) -> None:
        """Write everything queued now, batch by batch (serialised with the writer task)."""
        async with self._write_lock:
            while self._pending or self._ready:
                if self._rotation_due():
                    await self._rotate()
                await self._write_batch()

    async def _write_batch(self) -> None:
        pending = self._pending
        if self._lost:  # records dropped before they got a seq: say so in the chain
            gap = ChainRecord(kind="gap", lost=self._lost, reason=OVERFLOW)
            head = pending[0] if pending else None
            if isinstance(head, ChainRecord) and head.get("kind") == "open":
                pending.insert(1, gap)  # a file starts with its open record
            else:
                pending.appendleft(gap)
            self._lost = 0
        count = min(self._batch_limit, len(pending))
        if not count and not self._ready:
            return
        batch = [pending.popleft() for _ in range(count)]
        tickets = sum(1 for item in batch if not isinstance(item, ChainRecord))
        self._inflight = count
        seq, prev, frontier = self._seq, self._prev, self._frontier.copy()
        now = utc_now(self.clock())
        ready, self._ready = self._ready, []
        lines = [line for line, _ in ready]
        kinds: list[tuple[int | None, str, str, str]] = [
            (None, "checkpoint", "", str(st["time"])) for _, st in ready
        ]
        cursor = self.key_cursor
        for item in batch:
            if isinstance(item, tuple):
                line = hostcmd_line(item, seq, now, prev)
                kinds.append((seq, "hostcmd", item[4], now))
            else:
                if cursor is not None and "history_id" in item:
                    cursor = max(cursor, int(item["history_id"]))
                line = record_line(item, seq, now, prev)
                kinds.append((seq, str(item["kind"]), str(item.get("result", "")), now))
            digest = line_hash(line)
            frontier.append(digest)
            prev = digest.hex()
            seq += 1
            lines.append(line)
        try:
            await self._append(lines)
        except OSError as exc:
            self._inflight = 0
            pending.extendleft(reversed(batch))  # back in front, in order: nothing is lost
            self._ready = ready + self._ready
            if not self.failing:
                log.error(
                    "audit: cannot write %s (%s); retrying every %gs",
                    self.settings.path,
                    exc.strerror or type(exc).__name__,
                    WRITE_RETRY,
                )
            self.failing = True
            if self.waiting > self.settings.max_pending:
                self._trim()
            raise
        self._inflight = 0
        if self.failing:
            log.warning("audit: writing %s again", self.settings.path)
        self.failing = False
        self._seq, self._prev, self._frontier = seq, prev, frontier
        self.key_cursor = cursor
        self.written += len(lines)
        self.checkpoints += len(ready)
        if ready:
            self.sealed_through = int(ready[-1][1]["last"])
        self._resolve(self._resolved + tickets)
        if self.sink is not None:
            for (rec_seq, kind, result, at), line in zip(kinds, lines, strict=True):
                self.sink.submit_line(rec_seq, kind, result, at, line)
        if self._segment_due():
            self._cut()

    async def _append(self, lines: list[bytes]) -> None:
        """One write of the lines, then a sync per policy in a thread (requests keep flowing, and what
        arrives meanwhile forms the next batch); on failure the file is cut back to where it was."""
        f = self._file
        size = f.tell()
        try:
            f.write(b"\n".join(lines) + b"\n")
            f.flush()
            if self.settings.fsync != "never":
                await asyncio.to_thread(os.fsync, f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                f.truncate(size)
                f.seek(size)
            raise

    def _open_file(self) -> None:
        self._file = open(self.settings.path, "ab")  # noqa: SIM115 - kept open for appending
        self._file.seek(0, os.SEEK_END)
        self._day = self._today()

    def _today(self) -> str:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC).strftime("%Y%m%d")

    def _rotation_due(self) -> bool:
        f = self._file
        if f is None or self._closed:
            return False
        size = f.tell()
        if self.settings.max_bytes and size >= self.settings.max_bytes:
            return True
        return self.settings.rotate_daily and size > 0 and self._today() != self._day

    async def _rotate(self) -> None:
        """Close the file with a ``close`` record and its checkpoint, rename it, open the next."""
        stamp = dt.datetime.fromtimestamp(self.clock(), dt.UTC).strftime("%Y%m%dT%H%M%S")
        target = f"{self.settings.path}.{stamp}.{self._seq}"
        name = Path(self.settings.path).name
        self._pending.appendleft(
            self._with_cursor(ChainRecord(kind="close", reason="rotate", next_file=name))
        )
        # the close record alone, so nothing else lands in the old file
        limit, self._batch_limit = self._batch_limit, 1
        try:
            await self._write_batch()
        finally:
            self._batch_limit = limit
        await self._seal(SEAL_TIMEOUT)
        self._file.close()
        os.replace(self.settings.path, target)
        self._open_file()
        log.info("audit: rotated to %s", target)
        self._pending.appendleft(
            self._with_cursor(ChainRecord(open_body("rotate", self._trail, Path(target).name)))
        )

    def _with_cursor(self, body: ChainRecord) -> ChainRecord:
        if self.key_cursor is not None:
            body["key_cursor"] = self.key_cursor
        return body

    # -- checkpoints -------------------------------------------------------------------------------

    def _segment_due(self) -> bool:
        if self._sealing is not None and not self._sealing.done():
            return False  # one segment out for its signature at a time: the open one keeps growing
        n = self._frontier.size
        if n >= self.settings.checkpoint_every:
            return True
        return n > 0 and self.clock() - self._segment_started >= self.settings.checkpoint_interval

    def _cut(self) -> None:
        """Close the open segment and have it signed in the background."""
        segment = Segment(self._segment_first, self._seq - 1, self._frontier.root(), utc_now(self.clock()))
        self._frontier = MerkleFrontier()
        self._segment_first = self._seq
        self._segment_started = self.clock()
        self._sealed.clear()
        self._sealing = asyncio.get_running_loop().create_task(self._sign(segment), name="audit-seal")

    async def _sign(self, segment: Segment) -> None:
        trail, prev = self._trail, self._prev_checkpoint
        while True:
            try:
                stmt, sig = await self.signer.sign(
                    lambda node, signer: statement(trail, segment, prev, node, signer)
                )
                break
            except SignError as exc:
                if (held := self._sign_log.due()) is not None:
                    log.warning(
                        "audit: cannot sign checkpoint %d..%d (%s); %d record(s) unsealed, retrying%s",
                        segment.first,
                        segment.last,
                        exc,
                        self.unsealed + segment.size,
                        f" ({held} more such lines held back)" if held else "",
                    )
                await asyncio.sleep(SIGN_RETRY)
        self._prev_checkpoint = statement_digest(stmt).hex()
        self._ready.append((checkpoint_line(stmt, sig), stmt))
        self._sealed.set()
        self._wake.set()

    async def _seal(self, timeout: float) -> None:
        """Cut what is open and wait (at most ``timeout`` s) until every cut segment's line is written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._sealing is not None and not self._sealing.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._sealed.wait()), deadline - time.monotonic())
                continue
            if self._ready:
                await self._write_ready()
                continue
            if self._frontier.size:
                self._cut()
                continue
            return
        log.warning(
            "audit: %s ends unsealed (no checkpoint signature within %gs); the next start seals it",
            self.settings.path,
            timeout,
        )

    async def _write_ready(self) -> None:
        """Write the signed checkpoint lines that are waiting (no records with them)."""
        limit, self._batch_limit = self._batch_limit, 0
        try:
            await self._write_batch()
        finally:
            self._batch_limit = limit

    async def checkpoint(self, timeout: float = SEAL_TIMEOUT) -> bool:
        """Seal what is written now (console, tests): True once a checkpoint covers every record."""
        await self.flush()
        async with self._write_lock:
            await self._seal(timeout)
        return self._frontier.size == 0 and not self._ready

    # -- refusals and timers -------------------------------------------------------------------------

    def _flush_tally(self) -> None:
        tally, self._tally = self._tally, {}
        for (tenant, listener, command, result), (count, first, last) in tally.items():
            self._pending.append(
                ChainRecord(
                    kind="aggregate",
                    tenant=tenant,
                    listener=listener,
                    command=command,
                    result=result,
                    count=count,
                    first=utc_now(first),
                    last=utc_now(last),
                )
            )
        if tally:
            self._wake.set()

    async def _ticker(self) -> None:
        """Every second: the refusal counts become aggregate records; a due segment is cut."""
        while True:
            await asyncio.sleep(1.0)
            if self._tally:
                self._flush_tally()
            if not self._pending and self._segment_due() and not self._write_lock.locked():
                self._cut()


def hostcmd_fields(item: HostcmdItem) -> dict[str, Any]:
    """A queued host-command item as its record's fields (for tests and tools)."""
    return hostcmd_record(item)


__all__ = ["OVERFLOW", "AuditWriter", "RecordSink", "hostcmd_fields", "rotated_files"]
