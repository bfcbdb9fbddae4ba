"""config.toml + ``HSMPROXY_*`` environment overrides -> typed, validated settings.

Relative paths in the file (PIN files, SoftHSM2 config paths in ``env``) are resolved against
the directory of the config file, so ``hsmproxy serve --config /etc/hsmproxy/config.toml`` and
the repo's dev config both work from any working directory.

Environment overrides (applied after the file):

* ``HSMPROXY_LISTEN`` - bind address of the first host-command listener (``HOST:PORT``);
* ``HSMPROXY_STRICT_KEY_CUSTODY`` - ``true``/``false``;
* ``HSMPROXY_REQUEST_TIMEOUT`` - seconds.

PINs are never in the file: a node names a ``pin_file`` or a ``pin_env`` variable.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsmproxy.backend.spec import NodeSpec


class ConfigError(Exception):
    """The configuration is invalid; the message says where and why."""


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One host-command listener."""

    name: str
    host: str
    port: int
    header_length: int = 4
    tenant: str = "default"
    max_connections: int = 1000
    max_inflight: int = 256


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant: its LMK ids and default LMK."""

    name: str
    lmk_ids: tuple[str, ...] = ("00", "01")
    default_lmk: str = "00"


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole validated configuration."""

    listeners: tuple[ListenerConfig, ...]
    nodes: tuple[NodeSpec, ...]
    tenants: dict[str, TenantConfig]
    request_timeout: float = 2.0
    strict_key_custody: bool = False
    disabled_commands: frozenset[str] = frozenset()
    disabled_pin_formats: frozenset[str] = frozenset()
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _host_port(text: str, where: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected a boolean, got {value!r}")


def _resolve(base: Path, value: str) -> str:
    if not value:
        return value
    p = Path(value)
    return str(p if p.is_absolute() else (base / p).resolve())


def parse_settings(data: dict[str, Any], base: Path, source: str = "") -> Settings:
    """Validate a parsed TOML document (``base`` resolves relative paths)."""
    proxy = data.get("proxy", {})
    security = data.get("security", {})
    listeners = []
    for i, item in enumerate(data.get("listeners", [])):
        where = f"listeners[{i}]"
        if item.get("protocol", "hostcmd") != "hostcmd":
            continue  # other protocols land with later issues
        host, port = _host_port(item.get("bind", ""), where)
        hl = int(item.get("header_length", 4))
        if not 0 <= hl <= 255:
            raise ConfigError(f"{where}: header_length must be 0..255")
        listeners.append(
            ListenerConfig(
                name=str(item.get("name", f"host{i}")),
                host=host,
                port=port,
                header_length=hl,
                tenant=str(item.get("tenant", "default")),
                max_connections=int(item.get("max_connections", 1000)),
                max_inflight=int(item.get("max_inflight", 256)),
            )
        )
    strict = bool(security.get("strict_key_custody", False))
    if "HSMPROXY_STRICT_KEY_CUSTODY" in os.environ:
        strict = _bool(os.environ["HSMPROXY_STRICT_KEY_CUSTODY"])
    nodes = []
    names: set[str] = set()
    for i, item in enumerate(data.get("nodes", [])):
        where = f"nodes[{i}]"
        name = str(item.get("name", ""))
        if not name or name in names:
            raise ConfigError(f"{where}: every node needs a unique name")
        names.add(name)
        if "pin" in item:
            raise ConfigError(f"{where}: never put a PIN in the config; use pin_file or pin_env")
        if not item.get("pin_file") and not item.get("pin_env"):
            raise ConfigError(f"{where}: pin_file or pin_env is required")
        env = {
            str(k): _resolve(base, str(v)) if str(v).startswith(".") else str(v)
            for k, v in item.get("env", {}).items()
        }
        nodes.append(
            NodeSpec(
                name=name,
                module=str(item.get("module", "/usr/lib/softhsm/libsofthsm2.so")),
                token_label=str(item.get("token_label", name)),
                pin_file=_resolve(base, str(item.get("pin_file", ""))),
                pin_env=str(item.get("pin_env", "")),
                env=env,
                strict_key_custody=strict,
                cache_size=int(item.get("key_cache_size", 4096)),
            )
        )
    if not nodes:
        raise ConfigError("at least one [[nodes]] entry is required")
    tenants = {"default": TenantConfig("default")}
    for i, item in enumerate(data.get("tenants", [])):
        t = TenantConfig(
            name=str(item["name"]),
            lmk_ids=tuple(str(x) for x in item.get("lmk_ids", ("00", "01"))),
            default_lmk=str(item.get("default_lmk", "00")),
        )
        if t.default_lmk not in t.lmk_ids:
            raise ConfigError(f"tenants[{i}]: default_lmk must be one of lmk_ids")
        tenants[t.name] = t
    for lc in listeners:
        if lc.tenant not in tenants:
            raise ConfigError(f"listener {lc.name}: unknown tenant {lc.tenant!r}")
    if "HSMPROXY_LISTEN" in os.environ and listeners:
        host, port = _host_port(os.environ["HSMPROXY_LISTEN"], "HSMPROXY_LISTEN")
        first = listeners[0]
        listeners[0] = ListenerConfig(
            first.name,
            host,
            port,
            first.header_length,
            first.tenant,
            first.max_connections,
            first.max_inflight,
        )
    timeout = float(os.environ.get("HSMPROXY_REQUEST_TIMEOUT", proxy.get("request_timeout", 2.0)))
    if timeout <= 0:
        raise ConfigError("request_timeout must be positive")
    return Settings(
        listeners=tuple(listeners),
        nodes=tuple(nodes),
        tenants=tenants,
        request_timeout=timeout,
        strict_key_custody=strict,
        disabled_commands=frozenset(str(c) for c in proxy.get("disabled_commands", [])),
        disabled_pin_formats=frozenset(str(c) for c in proxy.get("disabled_pin_formats", [])),
        source=source,
    )


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a config file."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return parse_settings(data, p.resolve().parent, str(p))
