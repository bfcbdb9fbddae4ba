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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hsmproxy.audit.settings import AuditConfigError, AuditSettings, parse_audit_settings
from hsmproxy.backend.spec import NodeSpec
from hsmproxy.cluster.state import ClusterSettings
from hsmproxy.configutil import resolve_path, split_host_port
from hsmproxy.iso8583.config import IsoConfigError, IsoSettings, parse_iso8583
from hsmproxy.server.console import ConsoleUser, parse_console_users
from hsmproxy.tenancy import TenantConfig, TlsConfig, parse_tenants, parse_tls

__all__ = [
    "ConfigError",
    "KeystoreSettings",
    "ListenerConfig",
    "Settings",
    "SubscriberConfig",
    "TenantConfig",
    "TlsConfig",
    "load_settings",
    "parse_settings",
]


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
    #: TLS (mutual when ``client_ca`` is set); ``None``: plain TCP.
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    """One ``[[keystore.subscribers]]`` entry: a webhook (HMAC-signed POST) or a JSON-lines file."""

    #: Stable name: the outbox remembers deliveries per subscriber name (default: ``kind:target``).
    name: str
    kind: str  # "webhook" | "jsonl"
    target: str  # URL or file path
    secret: bytes = b""
    max_backoff: float = 30.0


@dataclass(frozen=True, slots=True)
class KeystoreSettings:
    """``[keystore]``: the key inventory, the rotation engine and event delivery."""

    url: str
    rotation_interval: float = 60.0
    #: Seconds between refreshes of the refused-key set (revoked/destroyed/suspended/grace over).
    refresh_interval: float = 1.0
    subscribers: tuple[SubscriberConfig, ...] = ()


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
    #: ``[cluster]``: health checks, outlier detection, balancing.
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    #: Per-node ``weight`` (default 1; 0 takes no new requests) and ``backup = true`` nodes.
    node_weights: dict[str, int] = field(default_factory=dict)
    backup_nodes: frozenset[str] = frozenset()
    #: ``[console] bind`` and ``[http] bind`` (None: that listener is off).
    console_bind: tuple[str, int] | None = None
    http_bind: tuple[str, int] | None = None
    #: ``[keystore]`` (None: no key inventory, no rotation engine, no refused-key checks).
    keystore: KeystoreSettings | None = None
    #: ``protocol = "iso8583"`` listeners and ``[[iso8583.routes]]`` (None: no ISO 8583 gateway).
    iso8583: IsoSettings | None = None
    #: ``[[console.users]]`` (empty: no login, console on loopback only).
    console_users: tuple[ConsoleUser, ...] = ()
    #: ``[proxy] drain_timeout``: seconds a graceful stop waits for in-flight requests.
    drain_timeout: float = 10.0
    #: ``[audit]`` (None: no audit trail; see :mod:`hsmproxy.audit`).
    audit: AuditSettings | None = None


def _host_port(text: str, where: str) -> tuple[str, int]:
    found = split_host_port(text)
    if found is None:
        raise ConfigError(f"{where}: expected HOST:PORT, got {text!r}")
    return found


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected a boolean, got {value!r}")


def _resolve(base: Path, value: str) -> str:
    return resolve_path(base, value)


def _cluster_settings(data: dict[str, Any]) -> ClusterSettings:
    """The ``[cluster]`` section (HAProxy/Envoy names and defaults)."""
    section = data.get("cluster", {})
    known = set(ClusterSettings.__dataclass_fields__)
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"cluster: unknown keys {sorted(unknown)}")
    defaults = ClusterSettings()
    try:
        values: dict[str, Any] = {k: type(getattr(defaults, k))(section[k]) for k in known if k in section}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cluster: {exc}") from None
    cap = values.get("max_outstanding", defaults.max_outstanding)
    if "min_limit" not in values and cap < defaults.min_limit:
        values["min_limit"] = cap  # a small hard cap set alone keeps its meaning (a fixed limit)
    cs = ClusterSettings(**values)
    if cs.inter <= 0 or cs.timeout <= 0 or cs.fall < 1 or cs.rise < 1:
        raise ConfigError("cluster: inter and timeout must be positive, fall and rise at least 1")
    if cs.base_ejection_time < 0 or cs.max_ejection_time < cs.base_ejection_time or cs.slowstart < 0:
        raise ConfigError("cluster: need 0 <= base_ejection_time <= max_ejection_time, slowstart >= 0")
    if cs.affinity_spill < 0:
        raise ConfigError("cluster: affinity_spill must be >= 0")
    if cs.max_outstanding < 1:
        raise ConfigError("cluster: max_outstanding must be at least 1")
    if not 1 <= cs.min_limit <= cs.max_outstanding:
        raise ConfigError("cluster: need 1 <= min_limit <= max_outstanding")
    if not 1.0 <= cs.limit_tolerance <= 100.0:
        raise ConfigError("cluster: limit_tolerance must be between 1.0 and 100.0 (RTT over the no-load RTT)")
    if not 0 < cs.probe_interval <= 86400:
        raise ConfigError("cluster: probe_interval must be positive (seconds, at most a day)")
    if not 0 <= cs.queue_timeout <= 60 or not 0 <= cs.queue_interval <= 60 or cs.max_queue < 0:
        raise ConfigError("cluster: need queue_timeout and queue_interval in 0..60 s, max_queue >= 0")
    return cs


def _optional_bind(data: dict[str, Any], section: str) -> tuple[str, int] | None:
    bind = data.get(section, {}).get("bind")
    return None if not bind else _host_port(str(bind), f"{section}.bind")


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
                tls=_tls(item.get("tls"), base, where),
            )
        )
    strict = bool(security.get("strict_key_custody", False))
    if "HSMPROXY_STRICT_KEY_CUSTODY" in os.environ:
        strict = _bool(os.environ["HSMPROXY_STRICT_KEY_CUSTODY"])
    nodes = []
    names: set[str] = set()
    node_weights: dict[str, int] = {}
    backup_nodes: set[str] = set()
    for i, item in enumerate(data.get("nodes", [])):
        where = f"nodes[{i}]"
        name = str(item.get("name", ""))
        if not name or name in names:
            raise ConfigError(f"{where}: every node needs a unique name")
        names.add(name)
        node_weights[name] = int(item.get("weight", 1))
        if not 0 <= node_weights[name] <= 256:
            raise ConfigError(f"{where}: weight must be 0..256")
        if bool(item.get("backup", False)):
            backup_nodes.add(name)
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
    try:
        tenants = parse_tenants(data.get("tenants", []))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    listeners = _listener_tenants(listeners, data.get("listeners", []), tenants)
    for lc in listeners:
        if lc.tenant and lc.tenant not in tenants:
            raise ConfigError(f"listener {lc.name}: unknown tenant {lc.tenant!r}")
    if "HSMPROXY_LISTEN" in os.environ and listeners:
        host, port = _host_port(os.environ["HSMPROXY_LISTEN"], "HSMPROXY_LISTEN")
        listeners[0] = replace(listeners[0], host=host, port=port)
    timeout = float(os.environ.get("HSMPROXY_REQUEST_TIMEOUT", proxy.get("request_timeout", 2.0)))
    if timeout <= 0:
        raise ConfigError("request_timeout must be positive")
    try:
        drain_timeout = float(proxy.get("drain_timeout", 10.0))
    except (TypeError, ValueError):
        raise ConfigError("proxy.drain_timeout: expected seconds") from None
    if drain_timeout < 0:
        raise ConfigError("proxy.drain_timeout must not be negative")
    console_bind = _optional_bind(data, "console")
    console = data.get("console", {})
    if not isinstance(console, dict):
        raise ConfigError("console: expected a table")
    try:
        console_users = parse_console_users(console.get("users"), console_bind)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Settings(
        listeners=tuple(listeners),
        nodes=tuple(nodes),
        tenants=tenants,
        request_timeout=timeout,
        strict_key_custody=strict,
        disabled_commands=frozenset(str(c) for c in proxy.get("disabled_commands", [])),
        disabled_pin_formats=frozenset(str(c) for c in proxy.get("disabled_pin_formats", [])),
        source=source,
        cluster=_cluster_settings(data),
        node_weights=node_weights,
        backup_nodes=frozenset(backup_nodes),
        console_bind=console_bind,
        console_users=console_users,
        drain_timeout=drain_timeout,
        http_bind=_optional_bind(data, "http"),
        keystore=_keystore_settings(data.get("keystore"), base),
        iso8583=_iso8583_settings(data, base, tenants),
        audit=_audit_settings(data, base),
    )


def _audit_settings(data: dict[str, Any], base: Path) -> AuditSettings | None:
    """The ``[audit]`` section (and ``[audit.syslog]``), validated by :mod:`hsmproxy.audit`."""
    try:
        return parse_audit_settings(data, base)
    except AuditConfigError as exc:
        raise ConfigError(str(exc)) from None


def _subscriber(item: Any, base: Path, where: str) -> SubscriberConfig:
    """One ``[[keystore.subscribers]]`` entry (``webhook`` or ``jsonl``)."""
    if not isinstance(item, dict) or ("webhook" in item) == ("jsonl" in item):
        raise ConfigError(f"{where}: exactly one of webhook or jsonl is required")
    backoff = float(item.get("max_backoff", 30.0))
    if "jsonl" in item:
        path = _resolve(base, str(item["jsonl"]))
        return SubscriberConfig(str(item.get("name", f"jsonl:{path}")), "jsonl", path, b"", backoff)
    url = str(item["webhook"])
    if not url.startswith("http://"):
        raise ConfigError(f"{where}: webhook must be an http:// URL")
    if item.get("secret_file"):
        try:
            secret = Path(_resolve(base, str(item["secret_file"]))).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{where}: secret_file: {exc.strerror}") from None
    elif item.get("secret_env"):
        secret = os.environ.get(str(item["secret_env"]), "").encode()
    else:
        raise ConfigError(f"{where}: a webhook needs secret_file or secret_env (HMAC signature)")
    if not secret:
        raise ConfigError(f"{where}: the webhook secret is empty")
    return SubscriberConfig(str(item.get("name", f"webhook:{url}")), "webhook", url, secret, backoff)


def _keystore_settings(raw: Any, base: Path) -> KeystoreSettings | None:
    """The ``[keystore]`` section: ``url`` (or ``path``: SQLite), intervals, subscribers."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("keystore: expected a table")
    url = str(raw.get("url", ""))
    if not url:
        path = _resolve(base, str(raw.get("path", "var/keys.db")))
        url = f"sqlite:///{path}"
    elif url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = f"sqlite:///{_resolve(base, url[len('sqlite:///') :])}"
    rotation = float(raw.get("rotation_interval", 60.0))
    refresh = float(raw.get("refresh_interval", 1.0))
    if rotation <= 0 or refresh <= 0:
        raise ConfigError("keystore: rotation_interval and refresh_interval must be positive")
    items = raw.get("subscribers", [])
    subs = tuple(_subscriber(item, base, f"keystore.subscribers[{i}]") for i, item in enumerate(items))
    if len({s.name for s in subs}) != len(subs):
        raise ConfigError("keystore: subscriber names must be unique")
    return KeystoreSettings(url, rotation, refresh, subs)


def _tls(raw: Any, base: Path, where: str) -> TlsConfig | None:
    try:
        return parse_tls(raw, base, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _listener_tenants(
    listeners: list[ListenerConfig], items: list[Any], tenants: dict[str, TenantConfig]
) -> list[ListenerConfig]:
    """Each listener's fallback tenant: its ``tenant`` key (``""``: none, a tenant must match by
    certificate or address), else the tenant listing it in ``clients.listeners``, else ``default``."""
    explicit = {
        str(item.get("name", f"host{i}")): str(item["tenant"])
        for i, item in enumerate(items)
        if "tenant" in item
    }
    names = {lc.name for lc in listeners}
    claimed: dict[str, str] = {}
    for t in tenants.values():
        for name in t.clients.listeners:
            if name not in names:
                raise ConfigError(f"tenant {t.name}: clients.listeners names no listener {name!r}")
            if name in explicit and explicit[name] != t.name:
                raise ConfigError(f"listener {name}: tenant {explicit[name]!r}, but {t.name!r} claims it")
            claimed[name] = t.name
    return [replace(lc, tenant=explicit.get(lc.name, claimed.get(lc.name, "default"))) for lc in listeners]


def _iso8583_settings(
    data: dict[str, Any], base: Path, tenants: dict[str, TenantConfig]
) -> IsoSettings | None:
    """ISO 8583 listeners and routes, validated by :mod:`hsmproxy.iso8583.config`."""
    try:
        return parse_iso8583(data, base, tenants)
    except IsoConfigError as exc:
        raise ConfigError(str(exc)) from None


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
