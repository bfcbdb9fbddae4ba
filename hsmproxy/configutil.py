"""Small parsers every configuration section shares (a leaf module: config.py imports the sections)."""

from __future__ import annotations

from pathlib import Path


def split_host_port(text: object, default_host: str = "127.0.0.1") -> tuple[str, int] | None:
    """``HOST:PORT`` (IPv6 in brackets) as (host, port); an empty host is ``default_host``. None when
    the text is not that (callers raise their own error)."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    host = host.strip("[]") or default_host
    return (host, int(port)) if host else None


def resolve_path(base: Path, value: object) -> str:
    """``value`` as a path: absolute as given, relative ones against ``base`` (the config's folder)."""
    text = str(value or "")
    if not text:
        return ""
    p = Path(text)
    return str(p if p.is_absolute() else (base / p).resolve())
