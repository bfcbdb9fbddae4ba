"""The written form of audit records (trail format 2): one canonical JSON line each, hash-chained.

A record line is the canonical JSON of the record (keys sorted, no whitespace, ASCII only) and holds
``seq`` (contiguous over the whole trail, rotated files included), ``time`` (UTC, milliseconds),
``kind`` and ``prev``: the hex leaf hash of the previous record line (:data:`GENESIS` for seq 0). The
leaf hash of a line is RFC 9162's ``SHA-256(0x00 || line)`` over the line's bytes as written (without
the newline), so a verifier hashes bytes, never re-serialises. Checkpoint lines
(:mod:`hsmproxy.audit.checkpoint`) are interleaved with the records but are not records: no ``seq``,
no ``prev``, not leaves.

Host-command records are the bulk of a trail (one per executed command), so they are written by a
template (:func:`hostcmd_line`) that produces exactly the canonical JSON without building a dict: the
canonical form is checked against :func:`canonical` in the tests.
"""

from __future__ import annotations

import datetime as dt
import json
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from hsmproxy.audit.merkle import leaf_hash

#: ``prev`` of the first record of a trail.
GENESIS = "0" * 64
#: ``format`` of the ``open`` record that starts every file of a version-2 trail.
FORMAT = "hsmproxy-audit/2"

#: A host-command record as queued by the fronts (a plain tuple: the collector stops tracking it):
#: listener, tenant, client, command, result, latency (seconds), correlation (the echoed header),
#: node ("" when none answered), key ids ((``tenant/name@version``, check value) pairs).
HostcmdItem = tuple[str, str, str, str, str, float, bytes, str, tuple[tuple[str, str], ...]]

# The canonical (sorted) key order of a host-command record is fixed: client command correlation
# key_ids kind latency_ms listener node prev result seq tenant time.
_HOSTCMD = (
    '{"client":%s,"command":%s,"correlation":"%s","key_ids":%s,"kind":"hostcmd","latency_ms":%r,'
    '"listener":%s,"node":%s,"prev":"%s","result":%s,"seq":%d,"tenant":%s,"time":"%s"}'
)


def canonical(record: dict[str, Any]) -> bytes:
    """The canonical JSON of a record: keys sorted, no whitespace, ASCII only."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def utc_now(now: float) -> str:
    """``now`` (seconds since the epoch) as the trail writes times: ISO 8601 UTC, milliseconds, ``Z``."""
    return dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _key_ids(key_ids: tuple[tuple[str, str], ...]) -> str:
    if not key_ids:
        return "[]"
    return "[" + ",".join(f'{{"kcv":{_quote(kcv)},"key":{_quote(key)}}}' for key, kcv in key_ids) + "]"


def hostcmd_line(item: HostcmdItem, seq: int, time: str, prev: str) -> bytes:
    """The canonical line of one host-command record (what :func:`canonical` gives for its dict)."""
    listener, tenant, client, command, result, latency, header, node, key_ids = item
    return (
        _HOSTCMD
        % (
            _quote(client), _quote(command), header.hex().upper(), _key_ids(key_ids),
            round(latency * 1000.0, 3), _quote(listener), _quote(node) if node else "null", prev,
            _quote(result), seq, _quote(tenant), time,
        )
    ).encode("ascii")  # fmt: skip


def hostcmd_record(item: HostcmdItem) -> dict[str, Any]:
    """The record dict of a host-command item, without ``seq``, ``time`` and ``prev`` (tests, sinks)."""
    listener, tenant, client, command, result, latency, header, node, key_ids = item
    return {
        "kind": "hostcmd",
        "tenant": tenant,
        "client": client,
        "listener": listener,
        "command": command,
        "result": result,
        "latency_ms": round(latency * 1000.0, 3),
        "correlation": header.hex().upper(),
        "node": node or None,
        "key_ids": [{"key": key, "kcv": kcv} for key, kcv in key_ids],
    }


def record_line(body: dict[str, Any], seq: int, time: str, prev: str) -> bytes:
    """The canonical line of any record (``body`` has ``kind`` and its fields)."""
    return canonical({**body, "seq": seq, "time": time, "prev": prev})


def line_hash(line: bytes) -> bytes:
    """The leaf hash of a written line (RFC 9162: SHA-256 of 0x00 and the line, no newline)."""
    return leaf_hash(line)
