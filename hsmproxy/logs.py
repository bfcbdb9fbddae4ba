"""Process-wide logging: structlog JSON lines (console renderer on a TTY) and one redaction processor.

``configure_logging`` installs a single handler on the root logger whose formatter is a structlog
``ProcessorFormatter``. Records from the standard library (every ``logging.getLogger(...)`` in hsmproxy/)
and from ``structlog.get_logger()`` take the same path and, just before rendering, pass ``redact``:

- values of keys named like a secret (pin, pin_block, key, cryptogram, clear, track, field_52, field_55,
  password, secret, ... — matched per ``_``/``-``/``.``-separated name component, so ``zpk_key`` is a
  secret but ``key_id`` or ``pin_length`` is metadata) become ``"<redacted>"``; bytes values become
  ``"<redacted N bytes>"``; ``pan`` values are masked like free-text PANs;
- in every other string (the message, tracebacks, nested values): runs of 13-19 digits are masked as PANs
  (first 6 + last 4 kept, middle ``*``), runs of 16 or more hex characters become ``"<redacted hex N>"``
  and ``b'...'`` literals of 8 or more characters become ``"<redacted bytes>"``.

Redaction is a safety net: code still must not log secrets in the first place.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

SECRET_WORDS = frozenset(
    {
        "pin", "pinblock", "key", "keys", "cryptogram", "clear", "track", "track1", "track2", "password",
        "passwd", "secret", "cvv", "cvc", "icvv", "arqc", "arpc", "mac", "plaintext", "pvv",
    }
)  # fmt: skip
SECRET_NAMES = frozenset({"field_52", "field_55", "f52", "f55", "de52", "de55", "pin_block", "clear_key"})
METADATA_SUFFIXES = frozenset(
    {
        "id", "ids", "type", "types", "name", "names", "label", "kcv", "check", "scheme", "length", "len",
        "count", "version", "state", "format", "algorithm", "usage", "ref", "tenant", "mode", "error",
    }
)  # fmt: skip
_PAN = re.compile(r"(?<![0-9])[0-9]{13,19}(?![0-9])")
_HEX = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{16,}(?![0-9A-Fa-f])")
_BYTES_LITERAL = re.compile(r"""(?<![A-Za-z0-9_])b(['"])(?:\\.|(?!\1).){8,}?\1""")
_SEPARATORS = re.compile(r"[_\-.]")
_HANDLER_MARK = "_hsmproxy_log_handler"


def mask_pan(digits: str) -> str:
    """A PAN with only its first 6 and last 4 digits kept."""
    return digits[:6] + "*" * (len(digits) - 10) + digits[-4:]


def _hex_or_pan(match: re.Match[str]) -> str:
    run = match.group(0)
    if run.isdigit() and 13 <= len(run) <= 19:
        return mask_pan(run)
    return f"<redacted hex {len(run)}>"


def redact_text(text: str) -> str:
    """``text`` with bytes literals, long hex runs and PANs masked."""
    text = _BYTES_LITERAL.sub("<redacted bytes>", text)
    text = _HEX.sub(_hex_or_pan, text)
    return _PAN.sub(lambda m: mask_pan(m.group(0)), text)


def is_secret_name(name: str) -> bool:
    """Whether a log key named ``name`` holds a secret (its value is dropped, not masked)."""
    lowered = name.lower()
    if lowered in SECRET_NAMES:
        return True
    parts = [p for p in _SEPARATORS.split(lowered) if p]
    if not parts or parts[-1] in METADATA_SUFFIXES:
        return False
    return any(p in SECRET_WORDS for p in parts) or "pin_block" in lowered


def _redact_value(name: str, value: Any) -> Any:
    if name and is_secret_name(name):
        return "<redacted>"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<redacted {len(value)} bytes>"
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**12 else redact_text(str(value))
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value("", v) for v in value]
    return redact_text(str(value))


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """The redaction processor every log line passes (see the module docstring)."""
    out: EventDict = {}
    for name, value in event_dict.items():
        if name.startswith("_"):  # structlog internals (_record, _from_structlog): never rendered
            out[name] = value
        elif name in ("event", "exception", "stack", "logger", "level", "timestamp"):
            out[name] = redact_text(value) if isinstance(value, str) else _redact_value("", value)
        else:
            out[name] = _redact_value(name, value)
    return out


def _drop_formatter_attributes(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Drop ``message``/``asctime``: attributes another handler's formatter left on a stdlib record."""
    if event_dict.get("_from_structlog") is False:
        event_dict.pop("message", None)
        event_dict.pop("asctime", None)
    return event_dict


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(str(level).upper())
    return value if isinstance(value, int) else logging.INFO


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (as logging's last-resort handler does),
    so a redirected or replaced stderr is followed instead of a closed one written to."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure_logging(
    level: str | int = "INFO", *, stream: TextIO | None = None, console: bool | None = None
) -> logging.Handler:
    """Route stdlib and structlog logging through one pipeline ending in ``redact`` and a renderer.

    JSON lines on ``stream`` (default stderr), or the console renderer when ``console`` is true (default:
    when the stream is a TTY). Replaces a handler installed by an earlier call; other root handlers (for
    example pytest's) are kept. Returns the installed handler.
    """
    out = stream if stream is not None else sys.stderr
    if console is None:
        console = bool(getattr(out, "isatty", lambda: False)())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        _drop_formatter_attributes,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        if console
        else structlog.processors.JSONRenderer()
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
    )
    handler: logging.StreamHandler[TextIO] = (
        logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    )
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_level(level))
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return handler


def remove_logging(handler: logging.Handler) -> None:
    """Undo ``configure_logging``: remove its ``handler`` and reset structlog's defaults."""
    logging.getLogger().removeHandler(handler)
    structlog.reset_defaults()


class LogThrottle:
    """At most one log line per ``interval`` seconds; counts the lines it held back."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._next = 0.0
        self._held = 0

    def due(self) -> int | None:
        """None to stay quiet; else the number of lines held back since the last one."""
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return None
        held, self._held, self._next = self._held, 0, now + self.interval
        return held
