"""The admin console: a line-based TCP listener (``[console] bind``), usable with nc or telnet.

Commands (case-insensitive keywords; node and tenant names as configured)::

    HELP
    SHOW NODES
    SHOW HISTORY <node>
    SET NODE <node> STATE <READY|DRAIN|MAINT> [reason...]
    SHOW TENANTS
    QUIT

Every reply is plain text and ends with an empty line (so scripts know where it stops); an error
is one line starting with ``ERR``. The console prints names, states, counts, reasons and token
information only: never a PIN, a key or any other secret. Bind it to loopback or an admin network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from hsmproxy.cluster.router import Router
from hsmproxy.cluster.state import AdminState, StateChange

log = logging.getLogger("hsmproxy.console")

#: Longest accepted command line.
MAX_LINE = 4096

HELP = """\
HELP                                              this text
SHOW NODES                                        nodes: states, weight, load, last change, token
SHOW HISTORY <node>                               the node's recent state changes with reasons
SET NODE <node> STATE <READY|DRAIN|MAINT> [reason] READY: serve; DRAIN: no new requests; MAINT: none
SHOW TENANTS                                      tenants: LMK ids and default LMK
QUIT                                              close this connection"""


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns separated by two spaces, left-aligned."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in (header, *rows)]
    return "\n".join(lines)


def _change(c: StateChange | None) -> tuple[str, str]:
    if c is None:
        return "-", "-"
    return _when(c.at), f"{c.what} {c.old}->{c.new}: {c.reason}"


class AdminConsole:
    """Executes console commands against the router and the settings' tenants."""

    def __init__(self, router: Router, tenants: Mapping[str, Any]) -> None:
        self.router = router
        self.tenants = tenants
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    # -- commands ---------------------------------------------------------------------------------

    def execute(self, line: str, who: str = "console") -> str:
        """One command line in, the reply text out (without the terminating empty line)."""
        words = line.split()
        if not words:
            return ""
        kw = [w.upper() for w in words]
        if kw == ["HELP"]:
            return HELP
        if kw == ["SHOW", "NODES"]:
            return self.show_nodes()
        if kw[:2] == ["SHOW", "HISTORY"] and len(words) == 3:
            return self.show_history(words[2])
        if kw == ["SHOW", "TENANTS"]:
            return self.show_tenants()
        if kw[:2] == ["SET", "NODE"] and len(words) >= 5 and kw[3] == "STATE":
            reason = " ".join(words[5:]) or "no reason given"
            return self.set_node(words[2], kw[4], f"{reason} (by {who})")
        return f"ERR unknown command {words[0][:32]!r}; try HELP"

    def show_nodes(self) -> str:
        """The SHOW NODES table."""
        now = self.router.clock()
        rows = []
        for node in self.router.nodes:
            st = self.router.state(node)
            info: Mapping[str, Any] = getattr(node, "info", None) or {}
            weight = str(st.weight)
            effective = st.effective_weight(now, self.router.settings.slowstart)
            if st.oper.value == "UP" and effective < st.weight:
                weight += f" ({100 * effective / st.weight:.0f}%)"
            when, what = _change(st.last_change)
            rows.append(
                [
                    node.name,
                    st.admin.value,
                    st.status(now),
                    weight,
                    "yes" if st.backup else "no",
                    str(st.outstanding),
                    str(st.requests),
                    str(st.ejections),
                    when,
                    what,
                    str(info.get("manufacturer", "-")),
                    str(info.get("model", "-")),
                    str(info.get("firmware", "-")),
                ]
            )
        header = ["NAME", "ADMIN", "OPER", "WEIGHT", "BACKUP", "OUTSTANDING", "REQUESTS", "EJECTIONS",
                  "LAST_CHANGE", "REASON", "MANUFACTURER", "MODEL", "FIRMWARE"]  # fmt: skip
        return table(header, rows)

    def show_history(self, name: str) -> str:
        """The SHOW HISTORY table of one node."""
        try:
            st = self.router.state(name)
        except KeyError:
            return f"ERR no node {name[:64]!r}"
        rows = [[_when(c.at), c.what, c.old, c.new, c.reason] for c in st.history]
        return table(["TIME", "WHAT", "FROM", "TO", "REASON"], rows)

    def show_tenants(self) -> str:
        """The SHOW TENANTS table (attributes read defensively: the tenant model grows)."""
        rows = []
        for key, t in self.tenants.items():
            lmk_ids = getattr(t, "lmk_ids", ()) or ()
            rows.append(
                [
                    str(getattr(t, "name", key)),
                    ",".join(str(x) for x in lmk_ids) or "-",
                    str(getattr(t, "default_lmk", "-")),
                ]
            )
        return table(["NAME", "LMK_IDS", "DEFAULT_LMK"], rows)

    def set_node(self, name: str, state: str, reason: str) -> str:
        """SET NODE <name> STATE <state>."""
        try:
            target = AdminState(state)
        except ValueError:
            return f"ERR state must be READY, DRAIN or MAINT, not {state[:16]!r}"
        try:
            old = self.router.state(name).admin
            self.router.set_admin(name, target, reason)
        except KeyError:
            return f"ERR no node {name[:64]!r}"
        return f"OK {name} {old.value} -> {target.value}"

    # -- listener ---------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port; returns the bound port."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_LINE, reuse_address=True)
        bound: int = self._server.sockets[0].getsockname()[1]
        log.info("admin console on %s:%d", host, bound)
        return bound

    async def stop(self) -> None:
        """Stop listening and close open console sessions."""
        if self._server is not None:
            self._server.close()
        for w in list(self._clients):
            w.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        peer = writer.get_extra_info("peername")
        who = f"console {peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "console"
        try:
            while True:
                try:
                    raw = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b"ERR line too long\n\n")
                    break
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").strip()
                if line.upper() in ("QUIT", "EXIT"):
                    break
                reply = self.execute(line, who)
                writer.write(reply.encode() + b"\n\n" if reply else b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
