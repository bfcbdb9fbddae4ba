"""The ``[audit]`` section: where the trail goes, how it is sealed, synced and bounded."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmproxy.audit.syslog import SyslogConfigError, SyslogSettings, parse_syslog_settings
from hsmproxy.configutil import resolve_path

FSYNC_POLICIES = ("always", "batch", "never")
#: Most records written in one batch (one write, one fsync).
MAX_BATCH = 1000
#: Smallest ``max_pending`` a configuration may set: half of it, where host commands are shed, stays
#: far above what a healthy trail holds (a batch being written, one more waiting).
MIN_PENDING = 5 * MAX_BATCH


class AuditConfigError(ValueError):
    """The ``[audit]`` section is invalid."""


@dataclass(frozen=True)
class AuditSettings:
    """The ``[audit]`` section."""

    path: str
    max_bytes: int = 64 * 1024 * 1024
    rotate_daily: bool = True
    #: ``batch``: one fsync per batch, in a thread (group commit); ``always``: every record is its own
    #: batch; ``never``: the OS writes when it likes (a process crash loses nothing written, a power cut may).
    fsync: str = "batch"
    #: The checkpoint signing key: token object ``hsmproxy-audit-sign:<key_id>`` on each node (an ECDSA
    #: P-256 key pair generated inside the HSM by ``hsmproxy audit keys --generate``).
    key_id: str = "00"
    #: PEM file of the nodes' pinned public keys (``hsmproxy audit keys --out``): only a node whose key is
    #: in it signs checkpoints; "" signs with any node's key (verification still needs the pins).
    trusted_keys: str = ""
    #: A checkpoint seals the records since the previous one once ``checkpoint_every`` records or
    #: ``checkpoint_interval`` seconds have passed (at the end of the batch that gets there, so a
    #: segment may hold up to one batch more), and at rotation and stop.
    checkpoint_every: int = 1000
    checkpoint_interval: float = 1.0
    #: Records waiting to be written before the oldest are dropped (a gap); host commands are refused
    #: (``41``) once half of it waits.
    max_pending: int = 100_000
    #: Seconds an idle writer waits for more records to share a write (group commit); 0: none.
    linger: float = 0.002
    #: ``true``: host commands and messages that need a node are refused while the file cannot be
    #: written (no crypto is done unaudited).
    fail_closed: bool = False
    #: ``true``: an answer leaves only once the batch holding its record is on disk (per ``fsync``),
    #: like PostgreSQL's ``synchronous_commit = on``; ``false``: at most the records of the batch being
    #: written can be lost in a crash of the process.
    ack_after_durable: bool = False
    #: ``[audit.syslog]``: a copy of the trail (or only its checkpoints) for a SIEM (None: off).
    syslog: SyslogSettings | None = None


_BOOLS = ("rotate_daily", "fail_closed", "ack_after_durable")


def parse_audit_settings(data: dict[str, Any], base: Path) -> AuditSettings | None:
    """The ``[audit]`` section of a parsed config (None when it is absent or has no ``path``)."""
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
    for flag in _BOOLS:
        if flag in raw and not isinstance(raw[flag], bool):
            raise AuditConfigError(f"audit: {flag} must be true or false")
    try:
        syslog = parse_syslog_settings(raw.get("syslog"), base)
    except SyslogConfigError as exc:
        raise AuditConfigError(str(exc)) from None
    d = AuditSettings
    try:
        s = AuditSettings(
            path=resolve_path(base, raw["path"]),
            max_bytes=int(raw.get("max_bytes", d.max_bytes)),
            rotate_daily=bool(raw.get("rotate_daily", d.rotate_daily)),
            fsync=str(raw.get("fsync", d.fsync)),
            key_id=str(raw.get("key_id", d.key_id)),
            trusted_keys=resolve_path(base, str(raw["trusted_keys"])) if raw.get("trusted_keys") else "",
            checkpoint_every=int(raw.get("checkpoint_every", d.checkpoint_every)),
            checkpoint_interval=float(raw.get("checkpoint_interval", d.checkpoint_interval)),
            max_pending=int(raw.get("max_pending", d.max_pending)),
            linger=float(raw.get("linger", d.linger)),
            fail_closed=bool(raw.get("fail_closed", d.fail_closed)),
            ack_after_durable=bool(raw.get("ack_after_durable", d.ack_after_durable)),
            syslog=syslog,
        )
    except (TypeError, ValueError) as exc:
        raise AuditConfigError(f"audit: {exc}") from None
    if s.fsync not in FSYNC_POLICIES:
        raise AuditConfigError(f"audit: fsync must be one of {', '.join(FSYNC_POLICIES)}")
    if not 1 <= len(s.key_id) <= 8 or not s.key_id.isalnum():
        raise AuditConfigError("audit: key_id must be 1..8 letters or digits")
    if s.max_bytes < 0 or s.checkpoint_every < 1 or s.checkpoint_interval <= 0:
        raise AuditConfigError("audit: need max_bytes >= 0, checkpoint_every >= 1, checkpoint_interval > 0")
    if s.max_pending < MIN_PENDING:
        raise AuditConfigError(f"audit: max_pending must be at least {MIN_PENDING}")
    if not 0 <= s.linger <= 1:
        raise AuditConfigError("audit: linger must be 0 to 1 seconds")
    return s


def load_audit_settings(config_path: str) -> AuditSettings | None:
    """The ``[audit]`` section of the config file at ``config_path`` (None: absent or no path)."""
    if not config_path:
        return None
    p = Path(config_path)
    with p.open("rb") as fh:
        data = tomllib.load(fh)
    return parse_audit_settings(data, p.resolve().parent)
