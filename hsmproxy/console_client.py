"""``hsmproxy console``: a small line client for the admin console (:mod:`hsmproxy.server.console`).

On a terminal it offers readline editing, a history file (``~/.hsmproxy_console_history``) and tab
completion of the command words; ``LOGIN <user>`` asks for the password at a hidden prompt. In a
pipe it reads one command per line from stdin and prints each reply, so it can be scripted::

    printf 'LOGIN alice %s\\nSHOW NODES JSON\\n' "$PW" | hsmproxy console --port 9998

``--user NAME`` logs in first (password from ``HSMPROXY_CONSOLE_PASSWORD``, else a hidden prompt).
The exit status is 1 when a reply was an ``ERR`` or ``DENIED`` line (or the connection failed).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from hsmproxy.server.console import COMMAND_WORDS

HISTORY = Path.home() / ".hsmproxy_console_history"


class ConsoleConnection:
    """One console session over TCP: a command line out, its reply (up to the empty line) back."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def command(self, line: str) -> str | None:
        """Send ``line``; the reply text, or None when the console closed the connection."""
        self.sock.sendall(line.encode("utf-8") + b"\n")
        while b"\n\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        reply, _, self.buf = self.buf.partition(b"\n\n")
        return reply.decode("utf-8", "replace")

    def close(self) -> None:
        """Close the socket."""
        with contextlib.suppress(OSError):
            self.sock.close()


def completer(words: Iterable[str] = COMMAND_WORDS) -> Callable[[str, int], str | None]:
    """A readline completer over the console's command words (case follows what was typed)."""
    vocabulary = sorted(set(words))

    def complete(text: str, state: int) -> str | None:
        upper = text.upper()
        matches = [w if text.isupper() or not text else w.lower() for w in vocabulary if w.startswith(upper)]
        return matches[state] if state < len(matches) else None

    return complete


def _setup_readline() -> Any:
    try:
        import readline
    except ImportError:  # pragma: no cover - not on this platform
        return None
    readline.set_completer(completer())
    readline.parse_and_bind("tab: complete")
    with contextlib.suppress(OSError):
        readline.read_history_file(HISTORY)
    readline.set_history_length(1000)
    return readline


def _is_error(reply: str) -> bool:
    return reply.startswith(("ERR", "DENIED"))


def run_console(
    host: str, port: int, user: str = "", stdin: TextIO | None = None, out: TextIO | None = None
) -> int:
    """Entry for ``hsmproxy console``: interactive on a TTY, else one command per stdin line."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    try:
        conn = ConsoleConnection(host, port)
    except OSError as exc:
        print(f"console: cannot connect to {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    failed = False
    interactive = stdin.isatty()
    rl = _setup_readline() if interactive else None
    try:
        if user:
            password = os.environ.get("HSMPROXY_CONSOLE_PASSWORD") or getpass.getpass(
                f"Password for {user}: "
            )
            reply = conn.command(f"LOGIN {user}")  # the password on its own line: spaces allowed
            if reply == "PASSWORD?":
                reply = conn.command(password)
            print(reply or "console closed the connection", file=out)
            if reply is None or _is_error(reply):
                return 1
        while True:
            if interactive:
                try:
                    line = input("hsmproxy> ")
                except EOFError:
                    print(file=out)
                    break
            else:
                raw = stdin.readline()
                if not raw:
                    break
                line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            if rl is not None and len(line.split()) >= 3 and line.split()[0].upper() == "LOGIN":
                with contextlib.suppress(ValueError):  # never keep a password in the history file
                    rl.remove_history_item(rl.get_current_history_length() - 1)
            reply = conn.command(line)
            if reply == "PASSWORD?":  # LOGIN <user> without the password: ask without echo
                secret = getpass.getpass("Password: ") if interactive else stdin.readline().rstrip("\r\n")
                reply = conn.command(secret)
            if reply is None:
                break
            if reply:
                print(reply, file=out, flush=True)
            failed = failed or _is_error(reply)
            if line.strip().upper() in ("QUIT", "EXIT"):
                break
    except (ConnectionError, OSError) as exc:
        print(f"console: connection lost: {exc}", file=sys.stderr)
        failed = True
    except KeyboardInterrupt:
        print(file=out)
    finally:
        conn.close()
        if rl is not None:
            with contextlib.suppress(OSError):
                rl.write_history_file(HISTORY)
    return 1 if failed else 0
