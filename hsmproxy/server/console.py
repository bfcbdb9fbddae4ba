"""The admin console: a line-based TCP listener (``[console] bind``), usable with nc, telnet or
``hsmproxy console`` (history and completion).

Protocol: one command per line; every reply ends with an empty line (so scripts know where it
stops); an error is one line starting with ``ERR``, a refusal one line starting with ``DENIED``.
Keywords are case-insensitive; node and tenant names are as configured. Tables by default; a final
``JSON`` word gives the same data as JSON (one document, on one line).

Login (``[[console.users]]``): ``LOGIN <user> <password>`` on one line, or ``LOGIN <user>``, then the
password on the next line (the console answers ``PASSWORD?``). Passwords are stored as
``scrypt$<log2 N>$<r>$<p>$<salt b64>$<hash b64>`` (:func:`hash_password`; ``hsmproxy console passwd``
prints one) and compared with :func:`hmac.compare_digest`. After each failed login the session
waits ``failure_delay`` seconds; three failures close the session, and ``MAX_FAILURES`` failures
for one user name from one address within ``LOCKOUT`` seconds refuse further logins of that user
from that address for that long. Without
configured users the console needs no login (every session is ``admin``) and must be bound to a
loopback address (config validation refuses anything else); a warning is logged at start-up.

Roles (what each may run; ``HELP``, ``QUIT``, ``WHOAMI`` and ``LOGIN`` are always allowed):

========================================  =======  ========  =====
command                                   auditor  operator  admin
========================================  =======  ========  =====
VR, QH, GETCMDS, SHOW ...                 yes      yes       yes
AUDIT VERIFY, CHECKPOINT, TAIL            yes      yes       yes
SET NODE, KILL CLIENT, RELOAD             -        yes       yes
CONFIGCMDS, CONFIGPB (security policy)    -        -         yes
SHUTDOWN [WAIT]                           -        -         yes
========================================  =======  ========  =====

Every command line (denied ones and failed logins included) is one ``console`` audit record when
``[audit]`` is on: user, role, client address, the command words (never a password) and the result
(``ok``, ``denied`` or ``error``). The console prints names, states, counts, check values and
reasons only: never a PIN, a key, a password or another secret.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import platform
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsmproxy.cluster.state import AdminState, StateChange

if TYPE_CHECKING:
    from hsmproxy.server.app import Proxy
    from hsmproxy.server.hostcmd import CommandRecord

log = logging.getLogger("hsmproxy.console")

#: Longest accepted command line.
MAX_LINE = 4096
#: Failed logins of one user from one address within LOCKOUT seconds after which they are refused.
MAX_FAILURES = 5
LOCKOUT = 300.0
#: (address, user) pairs with failed logins kept before expired ones are dropped.
MAX_TRACKED = 10_000
#: Failed logins after which a session is closed.
SESSION_FAILURES = 3
#: Recent error responses kept for SHOW ERRORS.
ERRORS_KEPT = 200

ROLES = ("auditor", "operator", "admin")
#: Command name -> least role that may run it (order of ROLES).
REQUIRED_ROLE = {
    "VR": "auditor",
    "QH": "auditor",
    "GETCMDS": "auditor",
    "SHOW": "auditor",
    "AUDIT": "auditor",
    "SET NODE": "operator",
    "KILL CLIENT": "operator",
    "RELOAD": "operator",
    "CONFIGCMDS": "admin",
    "CONFIGPB": "admin",
    "SHUTDOWN": "admin",
}
#: Commands every session may run, logged in or not.
OPEN_COMMANDS = ("HELP", "QUIT", "EXIT", "WHOAMI", "LOGIN")

#: Every command word (for completion in ``hsmproxy console``).
COMMAND_WORDS = (
    "HELP", "QUIT", "WHOAMI", "LOGIN", "VR", "QH", "GETCMDS", "SHOW", "NODES", "HISTORY", "CLIENTS",
    "STATS", "TENANTS", "KEYS", "LMK", "CONFIG", "ERRORS", "SET", "NODE", "STATE", "READY", "DRAIN",
    "MAINT", "CONFIGCMDS", "CONFIGPB", "ENABLE", "DISABLE", "RELOAD", "KILL", "CLIENT", "AUDIT",
    "VERIFY", "CHECKPOINT", "TAIL", "SHUTDOWN", "WAIT", "JSON",
)  # fmt: skip

HELP_LINES = (
    ("HELP", "HELP", "this text (the commands your role may run)"),
    ("WHOAMI", "WHOAMI", "your user and role"),
    ("LOGIN", "LOGIN <user> [<password>]", "log in (without the password: asked on the next line)"),
    ("VR", "VR", "version of hsmproxy, Python and the event loop"),
    ("QH", "QH", "health summary: overall state, nodes up, connections"),
    ("GETCMDS", "GETCMDS", "host commands implemented and, per tenant, on/off/denied"),
    ("SHOW", "SHOW NODES", "nodes: states, weight, load, last change, token"),
    ("SHOW", "SHOW HISTORY <node>", "a node's recent state changes with reasons"),
    ("SHOW", "SHOW CLIENTS", "host-command connections: id, peer, listener, tenant, load"),
    ("SHOW", "SHOW STATS", "per host command: count, non-00 answers, latency"),
    ("SHOW", "SHOW TENANTS", "tenants: LMKs, commands, limits, counters, disabled commands"),
    ("SHOW", "SHOW KEYS", "key inventory (names, versions, states, check values)"),
    ("SHOW", "SHOW LMK", "LMK check values per tenant and node"),
    ("SHOW", "SHOW CONFIG", "the effective configuration (secrets masked)"),
    ("SHOW", "SHOW ERRORS", "recent error answers: time, tenant, command, code"),
    ("SET NODE", "SET NODE <node> STATE <READY|DRAIN|MAINT> [reason]", "serve / no new / none"),
    ("CONFIGCMDS", "CONFIGCMDS <tenant> [ENABLE|DISABLE <code>...]", "runtime: disabled commands answer 68"),
    ("CONFIGPB", "CONFIGPB <tenant> [ENABLE|DISABLE <format>...]", "runtime: disabled PIN formats answer 69"),
    ("RELOAD", "RELOAD", "re-read the config file (resets CONFIGCMDS/CONFIGPB)"),
    ("KILL CLIENT", "KILL CLIENT <id>", "close one host-command connection (ids: SHOW CLIENTS)"),
    ("AUDIT", "AUDIT VERIFY", "verify chain, checkpoints and signatures of the audit files"),
    ("AUDIT", "AUDIT CHECKPOINT", "seal the trail now with a checkpoint signed by a node"),
    ("AUDIT", "AUDIT TAIL [n]", "the last n audit records (default 10)"),
    ("SHUTDOWN", "SHUTDOWN [WAIT]", "stop the proxy (WAIT: finish in-flight requests first)"),
    ("QUIT", "QUIT", "close this connection"),
)  # fmt: skip


# -- passwords and users ----------------------------------------------------------------------------

SCRYPT_LOG2_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
_HASH_RE = re.compile(r"^scrypt\$(\d{1,2})\$(\d{1,2})\$(\d{1,2})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, salt: bytes | None = None, log2_n: int = SCRYPT_LOG2_N) -> str:
    """``scrypt$<log2 N>$<r>$<p>$<salt b64>$<hash b64>`` of ``password`` (16-byte salt, 32-byte hash)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=1 << log2_n, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return f"scrypt${log2_n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    m = _HASH_RE.match(encoded)
    if m is None:
        raise ValueError("not scrypt$<log2 N>$<r>$<p>$<salt>$<hash> (hsmproxy console passwd prints one)")
    log2_n, r, p = int(m[1]), int(m[2]), int(m[3])
    if not (10 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError("scrypt parameters out of range (log2 N 10..20, r 1..32, p 1..16)")
    try:
        salt, digest = base64.b64decode(m[4], validate=True), base64.b64decode(m[5], validate=True)
    except ValueError:
        raise ValueError("salt or hash is not base64") from None
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("salt (>= 8 bytes) or hash (>= 16 bytes) too short")
    return log2_n, r, p, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches ``encoded`` (constant-time comparison); False for a bad hash."""
    try:
        log2_n, r, p, salt, digest = _parse_hash(encoded)
    except ValueError:
        return False
    got = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=1 << log2_n, r=r, p=p, dklen=len(digest), maxmem=1 << 30
    )
    return hmac.compare_digest(got, digest)


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    """One ``[[console.users]]`` entry."""

    name: str
    role: str
    password_hash: str = field(repr=False)


def parse_console_users(raw: Any, bind: tuple[str, int] | None) -> tuple[ConsoleUser, ...]:
    """Validate ``[[console.users]]`` (ValueError names the entry); no users needs a loopback bind."""
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise ValueError("console.users: expected a list of tables ([[console.users]])")
    users: list[ConsoleUser] = []
    for i, item in enumerate(raw):
        where = f"console.users[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a table")
        unknown = set(item) - {"name", "role", "password_hash"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        name, role = str(item.get("name", "")), str(item.get("role", ""))
        if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", name):
            raise ValueError(f"{where}: name must be 1-64 of A-Z a-z 0-9 _ . @ -")
        if any(u.name == name for u in users):
            raise ValueError(f"{where}: duplicate user {name!r}")
        if role not in ROLES:
            raise ValueError(f"{where}: role must be one of {', '.join(ROLES)}, not {role[:16]!r}")
        try:
            _parse_hash(str(item.get("password_hash", "")))
        except ValueError as exc:
            raise ValueError(f"{where} ({name}): password_hash: {exc}") from None
        users.append(ConsoleUser(name, role, str(item["password_hash"])))
    if not users and bind is not None and not _loopback(bind[0]):
        raise ValueError(
            f"console.bind {bind[0]}:{bind[1]} is not a loopback address: configure [[console.users]] "
            "(without users the console has no login and may only listen on loopback)"
        )
    return tuple(users)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def may_run(role: str | None, command: str) -> bool:
    """True if ``role`` may run ``command`` (a REQUIRED_ROLE key or an OPEN_COMMANDS word)."""
    if command in OPEN_COMMANDS:
        return True
    need = REQUIRED_ROLE.get(command)
    return role in ROLES and need is not None and ROLES.index(role) >= ROLES.index(need)


# -- rendering --------------------------------------------------------------------------------------


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns separated by two spaces, left-aligned."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in (header, *rows)]
    return "\n".join(lines)


@dataclass
class Table:
    """A reply that is a table (JSON: a list of objects keyed by the lower-cased headers)."""

    header: list[str]
    rows: list[list[Any]]

    def render(self, as_json: bool) -> str:
        """Text table or JSON."""
        if as_json:
            keys = [h.lower() for h in self.header]
            return json.dumps([dict(zip(keys, r, strict=True)) for r in self.rows], default=str)
        return table(self.header, [[_cell(c) for c in r] for r in self.rows])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, frozenset, set)):
        return ",".join(str(v) for v in value) or "-"
    text = str(value).replace(" ", "_")
    return text or "-"


@dataclass
class Doc:
    """A reply that is a document: key/value lines, or JSON."""

    data: dict[str, Any]

    def render(self, as_json: bool) -> str:
        """``key: value`` lines (nested keys dotted) or JSON."""
        if as_json:
            return json.dumps(self.data, default=str)
        return "\n".join(f"{k}: {v}" for k, v in _flatten(self.data))


def _flatten(data: Any, prefix: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(data, dict):
        if not data and prefix:
            yield prefix, "{}"
        for k, v in data.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list) and any(isinstance(x, (dict, list)) for x in data):
        for i, v in enumerate(data):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, json.dumps(data, default=str) if not isinstance(data, str) else data


Reply = str | Table | Doc


class CommandError(Exception):
    """A command failed: the message becomes the ``ERR`` line."""


# -- masking for SHOW CONFIG --------------------------------------------------------------------------

_SECRET_KEYS = {"pin_file", "password_hash", "secret", "key", "pin", "password"}
_URL_PASSWORD = re.compile(r"(://[^:/@]+:)[^@]*@")


def masked(value: Any, key: str = "") -> Any:
    """A JSON-friendly copy of a settings value with secrets, PIN files and password hashes masked."""
    if key in _SECRET_KEYS:
        return "***" if value else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: masked(getattr(value, f.name), f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [masked(v, key) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, bytes):
        return "***"
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1***@", value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)


# -- the console --------------------------------------------------------------------------------------


@dataclass
class Session:
    """One console connection: who is logged in."""

    peer: str
    user: str | None = None
    role: str | None = None
    failures: int = 0
    #: ``LOGIN <user>`` without a password: the next line is the password for this user.
    pending_user: str | None = None
    closed: bool = False


@dataclass
class CommandStats:
    """Per host command counters for SHOW STATS."""

    count: int = 0
    non00: int = 0
    latency_total: float = 0.0
    latency_max: float = 0.0


def _change(c: StateChange | None) -> tuple[str, str]:
    if c is None:
        return "-", "-"
    return _when(c.at), f"{c.what} {c.old}->{c.new}: {c.reason}"


class AdminConsole:
    """Executes console commands against a running :class:`~hsmproxy.server.app.Proxy`."""

    #: Seconds a session waits after a failed login (tests set 0).
    failure_delay = 1.0

    def __init__(self, proxy: Proxy, users: Sequence[ConsoleUser] = ()) -> None:
        self.proxy = proxy
        self.users = {u.name: u for u in users}
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.StreamWriter, asyncio.Task[None] | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, CommandStats] = {}
        self.errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=ERRORS_KEPT)
        #: Failed login times per (client address, user name) (lockout).
        self._failed: dict[tuple[str, str], collections.deque[float]] = {}
        self.failed_logins = 0
        self.started_at = time.time()

    # -- observer (SHOW STATS, SHOW ERRORS) ----------------------------------------------------------

    def observe(self, record: CommandRecord) -> None:
        """Proxy observer: count the command and keep the recent error answers (no field values)."""
        st = self.stats.get(record.command)
        if st is None:
            st = self.stats[record.command] = CommandStats()
        st.count += 1
        st.latency_total += record.latency
        st.latency_max = max(st.latency_max, record.latency)
        if record.error != "00":
            st.non00 += 1
            self.errors.append(
                {
                    "time": time.time(),
                    "tenant": record.tenant,
                    "listener": record.listener,
                    "client": record.peer,
                    "command": record.command,
                    "code": record.error,
                }
            )

    # -- dispatch ---------------------------------------------------------------------------------------

    def _audit(self, session: Session, command: str, result: str) -> None:
        audit = self.proxy.audit
        if audit is None:
            return
        try:
            audit.event(
                "console", user=session.user or "-", role=session.role or "-", client=session.peer,
                command=command[:200], result=result,
            )  # fmt: skip
        except Exception:  # the audit writer logs its own problems; a console command never fails on it
            log.exception("console: audit record failed")

    @property
    def open_access(self) -> bool:
        """True when no users are configured: no login, every session is admin (loopback only)."""
        return not self.users

    def new_session(self, peer: str) -> Session:
        """A session for a new connection (already admin when no users are configured)."""
        if self.open_access:
            return Session(peer, "-", "admin")
        return Session(peer)

    async def execute(self, line: str, session: Session) -> str:
        """One command line in, the reply text out (without the terminating empty line)."""
        if session.pending_user is not None:
            user, session.pending_user = session.pending_user, None
            return await self._login(session, user, line.strip())
        words = line.split()
        if not words:
            return ""
        kw = [w.upper() for w in words]
        as_json = len(kw) > 1 and kw[-1] == "JSON"
        if as_json:
            words, kw = words[:-1], kw[:-1]
        name = kw[0] if kw[0] not in ("SET", "KILL") else " ".join(kw[:2])
        shown = " ".join(words) if name != "LOGIN" else " ".join(words[:2])  # never the password
        if name == "LOGIN":
            if len(words) < 2 or len(words) > 3:
                self._audit(session, shown, "error")
                return "ERR usage: LOGIN <user> [<password>] (a password with spaces: on its own line)"
            if len(words) == 2:
                session.pending_user = words[1]
                return "PASSWORD?"
            return await self._login(session, words[1], words[2])
        if name not in OPEN_COMMANDS and name not in REQUIRED_ROLE:
            # nothing of the line is kept: it may be a password typed without LOGIN first
            self._audit(session, "(unknown command)", "error")
            return "ERR unknown command; try HELP"
        if session.role is None and name not in OPEN_COMMANDS:
            self._audit(session, shown, "denied")
            return "DENIED login first: LOGIN <user> [<password>]"
        if not may_run(session.role, name):
            self._audit(session, shown, "denied")
            log.warning("console: %s (%s) from %s denied %s", session.user, session.role, session.peer, name)
            return f"DENIED {name} needs role {REQUIRED_ROLE.get(name, 'admin')} (you are {session.role})"
        try:
            reply = await self._run(name, kw, words, session)
        except CommandError as exc:
            self._audit(session, shown, "error")
            return f"ERR {exc}"
        except Exception as exc:
            log.exception("console: %s failed", name)
            self._audit(session, shown, "error")
            return f"ERR {name} failed ({type(exc).__name__})"
        self._audit(session, shown, "ok")
        if isinstance(reply, str):
            return json.dumps({"result": reply}) if as_json and reply else reply
        return reply.render(as_json)

    async def _login(self, session: Session, user: str, password: str) -> str:
        shown = f"LOGIN {user[:64]}"
        if self.open_access:
            self._audit(session, shown, "ok")
            return "OK no users are configured: this console needs no login"
        ip = session.peer.rsplit(":", 1)[0]
        now = time.monotonic()
        if len(self._failed) > MAX_TRACKED:  # bounded memory under a spray of user names
            self._failed = {k: v for k, v in self._failed.items() if v and now - v[-1] <= LOCKOUT}
        recent = self._failed.setdefault((ip, user[:64]), collections.deque())
        while recent and now - recent[0] > LOCKOUT:
            recent.popleft()
        if len(recent) >= MAX_FAILURES:
            self._audit(session, shown, "denied")
            return "DENIED too many failed logins for this user from this address; try again later"
        known = self.users.get(user)
        # A fixed dummy hash for unknown users, so that a guess costs the same either way.
        ok = await asyncio.to_thread(
            verify_password, password, known.password_hash if known else _dummy_hash()
        )
        if known is None or not ok:
            recent.append(now)
            self.failed_logins += 1
            session.failures += 1
            self._audit(session, shown, "denied")
            log.warning("console: failed login for %r from %s", user[:64], session.peer)
            await asyncio.sleep(self.failure_delay)
            if session.failures >= SESSION_FAILURES:
                session.closed = True
            return "DENIED login failed"
        session.user, session.role, session.failures = known.name, known.role, 0
        self._audit(session, shown, "ok")
        log.info("console: %s (%s) logged in from %s", known.name, known.role, session.peer)
        return f"OK logged in as {known.name} ({known.role})"

    async def _run(self, name: str, kw: list[str], words: list[str], session: Session) -> Reply:
        n = len(kw)
        if name == "HELP":
            return self.help(session.role)
        if name == "WHOAMI":
            return Doc({"user": session.user or "-", "role": session.role or "-", "client": session.peer})
        if name == "VR" and n == 1:
            return self.version()
        if name == "QH" and n == 1:
            return self.health()
        if name == "GETCMDS" and n == 1:
            return self.getcmds()
        if name == "SHOW" and n >= 2:
            what = kw[1]
            simple: dict[str, Callable[[], Reply]] = {
                "NODES": self.show_nodes, "CLIENTS": self.show_clients, "STATS": self.show_stats,
                "TENANTS": self.show_tenants, "KEYS": self.show_keys, "CONFIG": self.show_config,
                "ERRORS": self.show_errors,
            }  # fmt: skip
            if what in simple and n == 2:
                return simple[what]()
            if what == "LMK" and n == 2:
                return await self.show_lmk()
            if what == "HISTORY" and n == 3:
                return self.show_history(words[2])
        if name == "SET NODE" and n >= 5 and kw[3] == "STATE":
            reason = " ".join(words[5:]) or "no reason given"
            return self.set_node(words[2], kw[4], f"{reason} (by console {session.peer} user {session.user})")
        if name in ("CONFIGCMDS", "CONFIGPB") and n >= 2:
            return self.configure(name, words[1], kw[2] if n > 2 else "", kw[3:])
        if name == "RELOAD" and n == 1:
            return await self.reload()
        if name == "KILL CLIENT" and n == 3:
            return self.kill_client(words[2])
        if name == "AUDIT" and n >= 2:
            if kw[1] == "VERIFY" and n == 2:
                return await self.audit_verify()
            if kw[1] == "CHECKPOINT" and n == 2:
                return await self.audit_checkpoint()
            if kw[1] == "TAIL" and n <= 3:
                return await self.audit_tail(kw[2] if n == 3 else "10")
        if name == "SHUTDOWN" and (n == 1 or (n == 2 and kw[1] == "WAIT")):
            self.proxy.request_shutdown(wait=n == 2)
            return "OK shutting down" + (" after in-flight requests finish" if n == 2 else " now")
        if name in ("QUIT", "EXIT"):
            session.closed = True
            return "BYE"
        raise CommandError(f"bad arguments for {name}; try HELP")

    # -- informational ------------------------------------------------------------------------------

    def help(self, role: str | None) -> str:
        """The commands ``role`` may run, with a line of explanation each."""
        rows = [(usage, text) for cmd, usage, text in HELP_LINES if may_run(role, cmd)]
        width = max(len(u) for u, _ in rows)
        return "\n".join(f"{u.ljust(width)}  {t}" for u, t in rows) + "\nAppend JSON for JSON output."

    def version(self) -> Doc:
        """VR: versions."""
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            ours = dist_version("hsmproxy")
        except PackageNotFoundError:
            ours = "unknown"
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        return Doc(
            {
                "product": "hsmproxy",
                "version": ours,
                "python": platform.python_version(),
                "event_loop": loop,
                "pid": os.getpid(),
                "started": _when(self.started_at),
            }
        )

    def health(self) -> Doc:
        """QH: overall state (OK / DEGRADED / DOWN / DRAINING), nodes, connections, failed logins."""
        p = self.proxy
        router = p.router
        assert router is not None
        now = router.clock()
        nodes = {n.name: f"{router.state(n).admin.value}/{router.state(n).status(now)}" for n in router.nodes}
        up = len(router.candidates())
        if p.draining:
            state = "DRAINING"
        elif up == 0:
            state = "DOWN"
        elif up < len(router.nodes):
            state = "DEGRADED"
        else:
            state = "OK"
        return Doc(
            {
                "state": state,
                "nodes_up": up,
                "nodes_total": len(router.nodes),
                "nodes": nodes,
                "connections": len(p.connections),
                "in_flight": sum(c.inflight for c in p.connections),
                "failed_logins": self.failed_logins,
                "uptime_s": int(time.time() - self.started_at),
            }
        )

    def getcmds(self) -> Table:
        """GETCMDS: implemented host commands and, per tenant, on / off (68) / denied (17)."""
        from hsmproxy.commands import HANDLERS

        tenants = sorted(self.proxy.settings.tenants.values(), key=lambda t: t.name)
        rows: list[list[Any]] = []
        for code in sorted(HANDLERS):
            row: list[Any] = [code]
            for t in tenants:
                if not t.allows(code):
                    row.append("denied")
                elif code in self.proxy.tenant_disabled_commands(t.name):
                    row.append("off")
                else:
                    row.append("on")
            rows.append(row)
        return Table(["COMMAND", *(t.name.upper() for t in tenants)], rows)

    def show_nodes(self) -> Table:
        """The SHOW NODES table."""
        router = self.proxy.router
        assert router is not None
        now = router.clock()
        rows: list[list[Any]] = []
        for node in router.nodes:
            st = router.state(node)
            info: Mapping[str, Any] = getattr(node, "info", None) or {}
            weight = str(st.weight)
            effective = st.effective_weight(now, router.settings.slowstart)
            if st.oper.value == "UP" and effective < st.weight:
                weight += f"({100 * effective / st.weight:.0f}%)"
            when, what = _change(st.last_change)
            rows.append(
                [
                    node.name, st.admin.value, st.status(now), weight, "yes" if st.backup else "no",
                    str(st.outstanding), str(st.requests), str(st.ejections), when, what,
                    str(info.get("manufacturer", "-")), str(info.get("model", "-")),
                    str(info.get("firmware", "-")),
                ]
            )  # fmt: skip
        header = ["NAME", "ADMIN", "OPER", "WEIGHT", "BACKUP", "OUTSTANDING", "REQUESTS", "EJECTIONS",
                  "LAST_CHANGE", "REASON", "MANUFACTURER", "MODEL", "FIRMWARE"]  # fmt: skip
        return _TextTable(header, rows)

    def show_history(self, name: str) -> Table:
        """The SHOW HISTORY table of one node."""
        assert self.proxy.router is not None
        try:
            st = self.proxy.router.state(name)
        except KeyError:
            raise CommandError(f"no node {name[:64]!r}") from None
        return _TextTable(
            ["TIME", "WHAT", "FROM", "TO", "REASON"],
            [[_when(c.at), c.what, c.old, c.new, c.reason] for c in st.history],
        )

    def show_clients(self) -> Table:
        """SHOW CLIENTS: one row per host-command connection."""
        rows: list[list[Any]] = []
        for c in sorted(self.proxy.connections, key=lambda c: c.conn_id):
            peer = f"{c.peer[0]}:{c.peer[1]}" if isinstance(c.peer, tuple) else str(c.peer)
            rows.append([c.conn_id, peer, c.listener, c.tenant_name, c.inflight, c.requests, _when(c.since)])
        return Table(["ID", "PEER", "LISTENER", "TENANT", "IN_FLIGHT", "REQUESTS", "SINCE"], rows)

    def show_stats(self) -> Table:
        """SHOW STATS: per host command counts, non-00 answers and latency (since start)."""
        rows: list[list[Any]] = []
        for code, st in sorted(self.stats.items()):
            avg = 1000.0 * st.latency_total / st.count if st.count else 0.0
            rows.append([code, st.count, st.non00, round(avg, 3), round(1000.0 * st.latency_max, 3)])
        return Table(["COMMAND", "COUNT", "NON00", "AVG_MS", "MAX_MS"], rows)

    def show_tenants(self) -> Table:
        """SHOW TENANTS: configuration, live counters and runtime-disabled commands/formats."""
        p = self.proxy
        rows: list[list[Any]] = []
        for name, t in p.settings.tenants.items():
            state = p.tenancy.tenants.get(name) if p.tenancy is not None else None
            snap = state.snapshot() if state is not None else {}
            rows.append(
                [
                    t.name, list(t.lmk_ids), t.default_lmk, t.keyblock_lmk or None,
                    "all" if t.commands is None else sorted(t.commands),
                    snap.get("connections", 0), t.max_connections, t.rate, t.burst,
                    snap.get("refused_connections", 0), snap.get("rate_rejected", 0),
                    snap.get("denied_commands", 0),
                    sorted(p.tenant_disabled_commands(name)), sorted(p.tenant_disabled_pin_formats(name)),
                ]
            )  # fmt: skip
        header = ["NAME", "LMK_IDS", "DEFAULT_LMK", "KEYBLOCK_LMK", "COMMANDS", "CONNECTIONS",
                  "MAX_CONNECTIONS", "RATE", "BURST", "REFUSED", "RATE_REJECTED", "DENIED", "DISABLED_CMDS",
                  "DISABLED_PB"]  # fmt: skip
        return Table(header, rows)

    def show_keys(self) -> Table:
        """SHOW KEYS: the keystore's inventory (never a cryptogram or key)."""
        lifecycle = self.proxy.lifecycle
        if lifecycle is None:
            raise CommandError("no [keystore] configured")
        rows: list[list[Any]] = []
        for r in lifecycle.store.list():
            expiry = r.expiry_date.isoformat(timespec="seconds") if r.expiry_date else None
            rows.append([r.tenant, r.name, r.version, r.key_type, r.lmk_id, r.state.value, r.kcv, expiry])
        return Table(["TENANT", "NAME", "VERSION", "TYPE", "LMK", "STATE", "KCV", "EXPIRY"], rows)

    async def show_lmk(self) -> Table:
        """SHOW LMK: each tenant's LMK ids and their check value on every node (``lmk_check``)."""
        p = self.proxy
        router = p.router
        assert router is not None
        ids = sorted({lmk for t in p.settings.tenants.values() for lmk in t.lmk_ids})

        async def check(node: Any, lmk: str) -> str:
            if not node.up:
                return "(node down)"
            try:
                code, values = await asyncio.wait_for(
                    node.submit("lmk_check", {"lmk_id": lmk, "firmware": "0000-0000"}), router.deadline
                )
            except Exception as exc:
                return f"({type(exc).__name__})"
            return str(values.get("lmk_check", "")) if code == "00" else f"(error {code})"

        pairs = [(node, lmk) for node in router.nodes for lmk in ids]
        results = await asyncio.gather(*(check(node, lmk) for node, lmk in pairs))
        checks = {(node.name, lmk): r for (node, lmk), r in zip(pairs, results, strict=True)}
        rows: list[list[Any]] = []
        for t in sorted(p.settings.tenants.values(), key=lambda t: t.name):
            for lmk in t.lmk_ids:
                for node in router.nodes:
                    role = "default" if lmk == t.default_lmk else "keyblock" if lmk == t.keyblock_lmk else "-"
                    rows.append([t.name, lmk, role, node.name, checks[(node.name, lmk)]])
        return Table(["TENANT", "LMK_ID", "USE", "NODE", "CHECK"], rows)

    def show_config(self) -> Doc:
        """SHOW CONFIG: the effective settings, secrets masked."""
        data = masked(self.proxy.settings)
        assert isinstance(data, dict)
        data.pop("extra", None)
        data["console_users"] = [
            {"name": u.name, "role": u.role, "password_hash": "***"} for u in self.users.values()
        ]
        return Doc(data)

    def show_errors(self) -> Table:
        """SHOW ERRORS: the most recent non-00 answers, newest last (no payloads)."""
        rows = [
            [_when(e["time"]), e["tenant"], e["listener"], e["client"], e["command"], e["code"]]
            for e in self.errors
        ]
        return Table(["TIME", "TENANT", "LISTENER", "CLIENT", "COMMAND", "CODE"], rows)

    # -- actions --------------------------------------------------------------------------------------

    def set_node(self, name: str, state: str, reason: str) -> str:
        """SET NODE <name> STATE <state>."""
        router = self.proxy.router
        assert router is not None
        try:
            target = AdminState(state)
        except ValueError:
            raise CommandError(f"state must be READY, DRAIN or MAINT, not {state[:16]!r}") from None
        try:
            old = router.state(name).admin
            router.set_admin(name, target, reason)
        except KeyError:
            raise CommandError(f"no node {name[:64]!r}") from None
        return f"OK {name} {old.value} -> {target.value}"

    def configure(self, name: str, tenant: str, action: str, items: list[str]) -> str:
        """CONFIGCMDS / CONFIGPB <tenant> [ENABLE|DISABLE <item>...]: runtime overrides until RELOAD."""
        p = self.proxy
        if tenant not in p.settings.tenants:
            raise CommandError(f"no tenant {tenant[:64]!r}")
        commands = name == "CONFIGCMDS"
        current = p.tenant_disabled_commands(tenant) if commands else p.tenant_disabled_pin_formats(tenant)
        if action:
            if action not in ("ENABLE", "DISABLE") or not items:
                what = "code" if commands else "format"
                raise CommandError(f"usage: {name} <tenant> ENABLE|DISABLE <{what}>...")
            if commands:
                from hsmproxy.commands import HANDLERS

                bad = [c for c in items if c not in HANDLERS]
            else:
                bad = [f for f in items if not re.fullmatch(r"\d\d", f)]
            if bad:
                what = "implemented host command" if commands else "PIN block format (two digits)"
                raise CommandError(f"not an {what}: {' '.join(b[:8] for b in bad[:8])}")
            current = current | frozenset(items) if action == "DISABLE" else current - frozenset(items)
            if commands:
                p.set_tenant_policy(tenant, disabled_commands=current)
            else:
                p.set_tenant_policy(tenant, disabled_pin_formats=current)
            log.warning("console: tenant %s %s %s %s", tenant, name, action, " ".join(items))
        return f"OK {tenant} disabled: {' '.join(sorted(current)) or '(none)'}"

    async def reload(self) -> str:
        """RELOAD: :meth:`Proxy.reload`; a broken file keeps the old config and says why."""
        from hsmproxy.config import ConfigError

        try:
            return await self.proxy.reload()
        except ConfigError as exc:
            raise CommandError(f"reload failed, the old config stays in force: {exc}") from None

    def kill_client(self, conn: str) -> str:
        """KILL CLIENT <id>: close that host-command connection."""
        for c in list(self.proxy.connections):
            if str(c.conn_id) == conn:
                c.close()
                log.warning("console: closed client %s (%s)", conn, c.peer)
                return f"OK client {conn} closed"
        raise CommandError(f"no client {conn[:16]!r}; see SHOW CLIENTS")

    # -- audit ------------------------------------------------------------------------------------------

    def _audit_files(self) -> list[Path]:
        audit = self.proxy.audit
        if audit is None:
            raise CommandError("no [audit] path configured")
        from hsmproxy.audit.files import trail_files

        return trail_files(Path(audit.settings.path))

    async def audit_verify(self) -> Doc:
        """AUDIT VERIFY: chain, trees and signatures of the live trail and its rotated files, checked
        with the pinned keys (``[audit] trusted_keys``), else with the keys the nodes reported."""
        from hsmproxy.audit.checkpoint import KeyFileError, PinnedKeys
        from hsmproxy.audit.verify import verify_trail

        audit = self.proxy.audit
        files = self._audit_files()
        assert audit is not None
        await audit.flush()
        signer = self.proxy.audit_signer
        try:
            if audit.settings.trusted_keys:
                pinned, keys = PinnedKeys.load(audit.settings.trusted_keys), "pinned keys"
            else:
                known = list((await signer.learn()).values()) if signer is not None else []
                if not known:
                    raise CommandError("cannot verify: no keys are pinned and no node has a signing key")
                pinned, keys = PinnedKeys.from_der(known), "the keys the nodes reported (none pinned)"
        except KeyFileError as exc:
            raise CommandError(f"cannot verify: {exc}") from None
        # the files are read and checked in a thread: a large trail never stalls the event loop
        report = await asyncio.to_thread(verify_trail, list(files), pinned, live=True)
        unsealed = report.unsealed
        return Doc(
            {
                "state": "intact" if report.ok else "NOT intact",
                "files": report.files,
                "records": report.records,
                "checkpoints": report.checkpoints,
                "sealed": report.sealed,
                "unsealed": f"{unsealed[0]}..{unsealed[1]}" if unsealed else "none",
                "verified_with": keys,
                "problems": [str(p) for p in report.problems[:50]],
            }
        )

    async def audit_checkpoint(self) -> str:
        """AUDIT CHECKPOINT: seal what the trail holds now with a signed checkpoint."""
        audit = self.proxy.audit
        self._audit_files()  # ERR without [audit]
        assert audit is not None
        if not await audit.checkpoint():
            raise CommandError("no node could sign a checkpoint now (the writer keeps trying)")
        return f"OK sealed through seq {audit.sealed_through}"

    async def audit_tail(self, count: str) -> Table:
        """AUDIT TAIL [n]: the last n records of the live audit file (they carry no secrets)."""
        if not count.isdigit() or not 1 <= int(count) <= 1000:
            raise CommandError("AUDIT TAIL takes a count of 1..1000")
        audit = self.proxy.audit
        self._audit_files()  # ERR without [audit]
        assert audit is not None
        await audit.flush()
        live = Path(audit.settings.path)
        lines = (await asyncio.to_thread(live.read_bytes)).split(b"\n") if live.exists() else []
        records = []
        for line in lines[-int(count) - 1 :]:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    if rec.get("kind") == "checkpoint":  # a seal: which records, signed by which node
                        rec = {"time": rec.get("time"), "kind": "checkpoint", "client": rec.get("node"),
                               "command": f"{rec.get('first')}..{rec.get('last')}"}  # fmt: skip
                    records.append(rec)
        records = records[-int(count) :]
        keys = ["seq", "time", "kind", "tenant", "client", "user", "command", "result"]
        return Table([k.upper() for k in keys], [[rec.get(k) for k in keys] for rec in records])

    # -- listener -----------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port; returns the bound port."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_LINE, reuse_address=True)
        bound: int = self._server.sockets[0].getsockname()[1]
        log.info("admin console on %s:%d (%d users)", host, bound, len(self.users))
        if self.open_access:
            log.warning(
                "admin console on %s:%d has no [[console.users]]: no login, every session is admin "
                "(loopback only); configure users for production",
                host,
                bound,
            )
        return bound

    async def stop(self) -> None:
        """Stop listening and close open console sessions."""
        if self._server is not None:
            self._server.close()
        sessions = [t for t in self._clients.values() if t is not None]
        for w in list(self._clients):
            w.close()
        for t in sessions:  # a session may be waiting (the pause after a failed login): end it now
            t.cancel()
        if sessions:
            await asyncio.wait(sessions, timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients[writer] = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        session = self.new_session(f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unknown")
        try:
            while not session.closed:
                try:
                    raw = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b"ERR line too long\n\n")
                    break
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").strip("\r\n")
                reply = await self.execute(line, session)
                writer.write(reply.encode() + b"\n\n" if reply else b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients.pop(writer, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _TextTable(Table):
    """A table whose cells keep their spaces (reasons), as SHOW NODES always printed them."""

    def render(self, as_json: bool) -> str:
        """Text table (cells verbatim) or JSON."""
        if as_json:
            return super().render(True)
        return table(self.header, [[str(c) for c in r] for r in self.rows])


@functools.cache
def _dummy_hash() -> str:
    """Verified against for unknown users (the same cost as a real check; never matches a login)."""
    return hash_password(secrets.token_hex(16))


# -- ``hsmproxy console passwd`` -------------------------------------------------------------------------


def read_new_password(stdin: Any = None, prompt: Callable[[str], str] | None = None) -> str:
    """The password to hash: asked twice at a hidden prompt on a TTY, else the first line of stdin."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        import getpass

        ask = prompt or getpass.getpass
        first = ask("Password: ")
        if ask("Again: ") != first:
            raise ValueError("the passwords differ")
    else:
        first = stdin.readline().rstrip("\r\n")
    if len(first) < 8:
        raise ValueError("a console password needs at least 8 characters")
    return first


def run_passwd(stdin: Any = None, out: Any = None) -> int:
    """``hsmproxy console passwd``: print the scrypt hash of a password read from stdin or a prompt."""
    out = out or sys.stdout
    try:
        password = read_new_password(stdin)
    except (ValueError, EOFError) as exc:
        print(f"passwd: {exc}", file=sys.stderr)
        return 1
    print(hash_password(password), file=out)
    return 0


__all__ = [
    "AdminConsole",
    "ConsoleUser",
    "hash_password",
    "parse_console_users",
    "run_passwd",
    "verify_password",
]
