"""Tenants: their LMKs, key namespace, allowed host commands, client identities and limits.

A tenant (``[[tenants]]``) owns LMK ids (loaded on every node; ``default_lmk`` is used when a request
has no ``%LL``, ``keyblock_lmk`` for ``S`` key blocks without ``%LL``), a key namespace (a prefix
carried for key-lifecycle work), the host commands it may call (``commands``, default all), and its
clients::

    clients = { listeners = ["host-a"], subjects = ["CN=switch-a"],
                sans = ["DNS:switch.bank-a.example", "URI:spiffe://bank-a/switch", "email:ops@bank-a.test"],
                addresses = ["10.1.0.0/16", "192.0.2.7"] }

Resolution, once per connection (:meth:`TenantRegistry.resolve`): the verified mutual-TLS client
certificate (a ``subjects`` pattern — every ``ATTR=value`` it names equals the certificate subject's
— or a ``sans`` value), then the source address (longest matching prefix), then the listener's
tenant (the listener's ``tenant`` key, or a tenant listing the listener in ``clients.listeners``).
A certificate matching rules of two tenants is ambiguous and matches none. A connection that
resolves to no tenant is refused (closed), with a log line naming the peer.

Limits per tenant: ``max_connections`` (0 = none; extra connections are refused) and ``rate``
requests per second with ``burst`` (a token bucket, 0 = none). A request over the rate waits for
its token when that is at most ``rate_max_delay`` seconds away, then is served; otherwise it is
answered at once with ``rate_limit_error`` (default ``41``, payShield's internal error: payShield
has no rate-limit code). The connection stays usable either way and responses keep their order.

This module has no sockets: the listener asks it who a peer is and whether it may connect; the
dispatcher asks whether a command is allowed and when a request may run.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsmproxy.configutil import resolve_path

log = logging.getLogger("hsmproxy.tenancy")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Subject attribute names as configured -> the names Python's ``getpeercert()`` uses.
SUBJECT_ATTRIBUTES = {
    "CN": "commonName",
    "O": "organizationName",
    "OU": "organizationalUnitName",
    "C": "countryName",
    "L": "localityName",
    "ST": "stateOrProvinceName",
    "DC": "domainComponent",
    "EMAILADDRESS": "emailAddress",
    "SERIALNUMBER": "serialNumber",
    "UID": "userId",
}
#: SAN types as configured -> the names Python's ``getpeercert()`` uses.
SAN_TYPES = {"DNS": "DNS", "URI": "URI", "EMAIL": "email"}
#: Answer to a request over its tenant's rate that cannot wait (payShield has no rate-limit code).
DEFAULT_RATE_LIMIT_ERROR = "41"
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


# -- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientRules:
    """How a tenant's clients are recognised."""

    listeners: tuple[str, ...] = ()
    #: Each pattern is a tuple of (getpeercert attribute name, value) pairs that must all match.
    subjects: tuple[tuple[tuple[str, str], ...], ...] = ()
    #: (getpeercert SAN type, value) pairs.
    sans: tuple[tuple[str, str], ...] = ()
    addresses: tuple[IpNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant: LMK ids, namespace, allowed commands, clients and limits."""

    name: str
    lmk_ids: tuple[str, ...] = ("00", "01")
    default_lmk: str = "00"
    keyblock_lmk: str = "01"
    key_namespace: str = ""
    #: Host command codes the tenant may call; ``None`` = all.
    commands: frozenset[str] | None = None
    clients: ClientRules = field(default_factory=ClientRules)
    max_connections: int = 0
    rate: float = 0.0
    burst: float = 0.0
    rate_max_delay: float = 0.25
    rate_limit_error: str = DEFAULT_RATE_LIMIT_ERROR

    def allows(self, command: str) -> bool:
        """True if the tenant may call host command ``command``."""
        return self.commands is None or command in self.commands


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS on a host-command listener (``[[listeners]] tls = {...}``)."""

    cert: str
    key: str
    client_ca: str = ""
    require_client_cert: bool = False
    min_version: str = "1.2"
    handshake_timeout: float = 10.0

    def server_context(self) -> ssl.SSLContext:
        """An SSL context for the listener (TLS 1.2 or 1.3 up to 1.3; client CA when configured)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            ctx.load_verify_locations(cafile=self.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        return ctx


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{where}: expected a list of strings")
    return tuple(str(x) for x in value)


def _lmk_id(value: Any, where: str) -> str:
    text = str(value)
    if len(text) != 2 or not text.isdigit():
        raise ValueError(f"{where}: an LMK id is two digits, got {text!r}")
    return text


def parse_subject(pattern: str, where: str = "subject") -> tuple[tuple[str, str], ...]:
    """``"CN=switch-a,O=Bank A"`` -> ``(("commonName", "switch-a"), ("organizationName", "Bank A"))``.

    A ``\\,`` is a literal comma inside a value.
    """
    parts, current, escaped = [], "", False
    for ch in pattern:
        if escaped:
            current, escaped = current + ch, False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    pairs = []
    for part in parts:
        attr, sep, value = part.strip().partition("=")
        name = SUBJECT_ATTRIBUTES.get(attr.strip().upper())
        if not sep or name is None or not value.strip():
            raise ValueError(f"{where}: {pattern!r} is not ATTR=value[,ATTR=value] (CN O OU C L ST DC …)")
        pairs.append((name, value.strip()))
    return tuple(pairs)


def parse_san(value: str, where: str = "san") -> tuple[str, str]:
    """``"DNS:host"``/``"URI:spiffe://x"``/``"email:a@b"`` -> (getpeercert SAN type, value)."""
    kind, sep, rest = value.partition(":")
    san_type = SAN_TYPES.get(kind.strip().upper())
    if not sep or san_type is None or not rest:
        raise ValueError(f"{where}: {value!r} is not DNS:…, URI:… or email:…")
    return san_type, rest


def parse_address(value: str, where: str = "address") -> IpNetwork:
    """An address or CIDR (``10.0.0.0/8``, ``192.0.2.7``, ``::1``)."""
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not an IP address or CIDR") from None


def parse_tenant(item: Mapping[str, Any], where: str) -> TenantConfig:
    """Validate one ``[[tenants]]`` table (``ValueError`` names ``where``)."""
    name = str(item.get("name", ""))
    if not name:
        raise ValueError(f"{where}: a tenant needs a name")
    lmk_ids = tuple(
        _lmk_id(x, f"{where}.lmk_ids") for x in _strings(item.get("lmk_ids", ("00", "01")), where)
    )
    if not lmk_ids:
        raise ValueError(f"{where}: lmk_ids must name at least one LMK")
    default_lmk = _lmk_id(item.get("default_lmk", "00" if "00" in lmk_ids else lmk_ids[0]), where)
    if default_lmk not in lmk_ids:
        raise ValueError(f"{where}: default_lmk must be one of lmk_ids")
    keyblock_lmk = str(item.get("keyblock_lmk", "01" if "01" in lmk_ids else ""))
    if keyblock_lmk and keyblock_lmk not in lmk_ids:
        raise ValueError(f"{where}: keyblock_lmk must be one of lmk_ids")
    commands = None
    if "commands" in item:
        commands = frozenset(c.upper() for c in _strings(item["commands"], f"{where}.commands"))
        if any(len(c) != 2 for c in commands):
            raise ValueError(f"{where}.commands: host command codes are two characters")
    raw = item.get("clients", {})
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}.clients: expected a table")
    unknown = set(raw) - {"listeners", "subjects", "sans", "addresses"}
    if unknown:
        raise ValueError(f"{where}.clients: unknown keys {sorted(unknown)}")
    clients = ClientRules(
        listeners=_strings(raw.get("listeners", ()), f"{where}.clients.listeners"),
        subjects=tuple(
            parse_subject(s, f"{where}.clients.subjects") for s in _strings(raw.get("subjects", ()), where)
        ),
        sans=tuple(parse_san(s, f"{where}.clients.sans") for s in _strings(raw.get("sans", ()), where)),
        addresses=tuple(
            parse_address(a, f"{where}.clients.addresses") for a in _strings(raw.get("addresses", ()), where)
        ),
    )
    rate = float(item.get("rate", 0))
    burst = float(item.get("burst", max(rate, 1.0) if rate else 0))
    max_delay = float(item.get("rate_max_delay", 0.25))
    max_connections = int(item.get("max_connections", 0))
    if rate < 0 or burst < 0 or max_delay < 0 or max_connections < 0:
        raise ValueError(f"{where}: rate, burst, rate_max_delay and max_connections must not be negative")
    if rate and burst < 1:
        raise ValueError(f"{where}: burst must be at least 1")
    error = str(item.get("rate_limit_error", DEFAULT_RATE_LIMIT_ERROR))
    if len(error) != 2 or error == "00":
        raise ValueError(f"{where}: rate_limit_error is a two-character error code other than 00")
    return TenantConfig(
        name=name,
        lmk_ids=lmk_ids,
        default_lmk=default_lmk,
        keyblock_lmk=keyblock_lmk,
        key_namespace=str(item.get("key_namespace", name)),
        commands=commands,
        clients=clients,
        max_connections=max_connections,
        rate=rate,
        burst=burst,
        rate_max_delay=max_delay,
        rate_limit_error=error,
    )


def parse_tenants(items: Iterable[Mapping[str, Any]]) -> dict[str, TenantConfig]:
    """All tenants by name; ``default`` (LMKs 00/01) exists unless the file defines it.

    Two tenants may not claim the same listener, subject, SAN or network.
    """
    tenants = {"default": TenantConfig("default", key_namespace="default")}
    seen: dict[object, str] = {}
    for i, item in enumerate(items):
        t = parse_tenant(item, f"tenants[{i}]")
        if t.name in tenants and t.name != "default":
            raise ValueError(f"tenants[{i}]: duplicate tenant {t.name!r}")
        claims: list[object] = [("listener", x) for x in t.clients.listeners]
        claims += [("subject", frozenset(x)) for x in t.clients.subjects]
        claims += [("san", x) for x in t.clients.sans] + [("address", x) for x in t.clients.addresses]
        for claim in claims:
            other = seen.setdefault(claim, t.name)
            if other != t.name:
                raise ValueError(f"tenants[{i}]: {claim} is already a client rule of tenant {other!r}")
        tenants[t.name] = t
    return tenants


def parse_tls(raw: Any, base: Path, where: str) -> TlsConfig | None:
    """Validate a listener's ``tls`` table (paths relative to ``base``); builds the context once."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}.tls: expected a table")
    unknown = set(raw) - {
        "cert",
        "key",
        "client_ca",
        "require_client_cert",
        "min_version",
        "handshake_timeout",
    }
    if unknown:
        raise ValueError(f"{where}.tls: unknown keys {sorted(unknown)}")

    def path(name: str) -> str:
        return resolve_path(base, raw.get(name, ""))

    if not raw.get("cert") or not raw.get("key"):
        raise ValueError(f"{where}.tls: cert and key are required")
    client_ca = path("client_ca")
    require = bool(raw.get("require_client_cert", bool(client_ca)))
    if require and not client_ca:
        raise ValueError(f"{where}.tls: require_client_cert needs client_ca")
    version = str(raw.get("min_version", "1.2"))
    if version not in TLS_VERSIONS:
        raise ValueError(f"{where}.tls: min_version must be 1.2 or 1.3")
    tls = TlsConfig(
        cert=path("cert"),
        key=path("key"),
        client_ca=client_ca,
        require_client_cert=require,
        min_version=version,
        handshake_timeout=float(raw.get("handshake_timeout", 10.0)),
    )
    try:
        tls.server_context()
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{where}.tls: cannot load certificate, key or CA ({type(exc).__name__})") from None
    return tls


# -- runtime --------------------------------------------------------------------------------------


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; a token may be reserved up to ``max_delay`` ahead."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def reserve(self, max_delay: float) -> float | None:
        """Take one token: ``0.0`` now, the seconds to wait for it, or ``None`` if that exceeds ``max_delay``.

        Waiting requests hold reservations (the count goes negative), so they are served in turn.
        """
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        wait = (1 - self._tokens) / self.rate
        if wait > max_delay:
            return None
        self._tokens -= 1
        return wait


@dataclass
class TenantState:
    """A tenant's live counters: open connections, rate limiter, refusals."""

    config: TenantConfig
    connections: int = 0
    refused_connections: int = 0
    rate_delayed: int = 0
    rate_rejected: int = 0
    denied_commands: int = 0
    bucket: TokenBucket | None = None
    _last_rate_log: float = 0.0

    def __post_init__(self) -> None:
        if self.config.rate > 0 and self.bucket is None:
            self.bucket = TokenBucket(self.config.rate, self.config.burst)

    @property
    def name(self) -> str:
        """The tenant's name."""
        return self.config.name

    def acquire_connection(self) -> bool:
        """Count a new connection; False (counted as refused) when ``max_connections`` is reached."""
        limit = self.config.max_connections
        if limit and self.connections >= limit:
            self.refused_connections += 1
            return False
        self.connections += 1
        return True

    def release_connection(self) -> None:
        """A connection of this tenant closed."""
        self.connections = max(0, self.connections - 1)

    def admit_request(self) -> float | None:
        """Seconds to wait before serving a request (0.0: now), or ``None``: answer the rate-limit error."""
        if self.bucket is None:
            return 0.0
        delay = self.bucket.reserve(self.config.rate_max_delay)
        if delay is None:
            self.rate_rejected += 1
            now = time.monotonic()
            if now - self._last_rate_log >= 1.0:  # one line a second per tenant, not one per request
                self._last_rate_log = now
                log.warning(
                    "tenant %s: over its rate (%g/s, burst %g): answering %s (%d so far)",
                    self.name,
                    self.config.rate,
                    self.config.burst,
                    self.config.rate_limit_error,
                    self.rate_rejected,
                )
        elif delay > 0:
            self.rate_delayed += 1
        return delay

    def snapshot(self) -> dict[str, Any]:
        """Counters for the console and metrics (no secrets)."""
        c = self.config
        return {
            "name": c.name,
            "lmk_ids": list(c.lmk_ids),
            "default_lmk": c.default_lmk,
            "keyblock_lmk": c.keyblock_lmk,
            "key_namespace": c.key_namespace,
            "commands": "all" if c.commands is None else sorted(c.commands),
            "connections": self.connections,
            "max_connections": c.max_connections,
            "rate": c.rate,
            "burst": c.burst,
            "refused_connections": self.refused_connections,
            "rate_delayed": self.rate_delayed,
            "rate_rejected": self.rate_rejected,
            "denied_commands": self.denied_commands,
        }


@dataclass(frozen=True, slots=True)
class Resolution:
    """Who a connection is: the tenant (or ``None``) and how it was found or why not."""

    tenant: TenantState | None
    how: str
    identity: str = ""


def _peer_ip(peer: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def certificate_identity(
    peercert: Mapping[str, Any] | None,
) -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """(subject attributes -> values, SAN (type, value) pairs) from ``SSLObject.getpeercert()``."""
    subject: dict[str, set[str]] = {}
    sans: set[tuple[str, str]] = set()
    if not peercert:
        return subject, sans
    for rdn in peercert.get("subject", ()):
        for attr, value in rdn:
            subject.setdefault(str(attr), set()).add(str(value))
    for san_type, value in peercert.get("subjectAltName", ()):
        sans.add((str(san_type), str(value)))
    return subject, sans


#: Short names of subject attributes, as in RFC 4514 strings.
_RDN_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
    "localityName": "L", "stateOrProvinceName": "ST", "serialNumber": "serialNumber",
}  # fmt: skip


def certificate_subject(peercert: Mapping[str, Any] | None) -> str:
    """The client certificate's subject as ``CN=switch01,O=Bank B`` (in certificate order; "" if none)."""
    parts = []
    for rdn in (peercert or {}).get("subject", ()):
        for attr, value in rdn:
            name = _RDN_NAMES.get(str(attr), str(attr))
            text = str(value).replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")
            parts.append(f"{name}={text}")
    return ",".join(parts)


def describe_certificate(peercert: Mapping[str, Any] | None) -> str:
    """A short, loggable description of a client certificate (subject CN, no secrets in certificates)."""
    if not peercert:
        return "no client certificate"
    subject, sans = certificate_identity(peercert)
    cn = ",".join(sorted(subject.get("commonName", ()))) or "-"
    return f"certificate CN={cn}" + (f" SAN={sorted(sans)[0][1]}" if sans else "")


class TenantRegistry:
    """All tenants' live state and the per-connection resolution rules."""

    def __init__(self, tenants: Mapping[str, TenantConfig], listener_tenants: Mapping[str, str]) -> None:
        self.tenants = {name: TenantState(cfg) for name, cfg in tenants.items()}
        self.listener_tenants = dict(listener_tenants)
        owners: dict[str, set[str]] = {}
        for cfg in tenants.values():
            for lmk in cfg.lmk_ids:
                owners.setdefault(lmk, set()).add(cfg.name)
        self._owners = owners

    def update(self, tenants: Mapping[str, TenantConfig], listener_tenants: Mapping[str, str]) -> list[str]:
        """Config reload: swap in new tenant configs (synchronously); returns the removed tenants' names.

        A kept tenant keeps its live state (connections, counters); its rate limiter restarts full
        when ``rate`` or ``burst`` changed. Connections of a removed tenant keep their old state
        until they close.
        """
        states: dict[str, TenantState] = {}
        for name, cfg in tenants.items():
            state = self.tenants.get(name)
            if state is None:
                state = TenantState(cfg)
            else:
                if (cfg.rate, cfg.burst) != (state.config.rate, state.config.burst):
                    state.bucket = TokenBucket(cfg.rate, cfg.burst) if cfg.rate > 0 else None
                state.config = cfg
            states[name] = state
        removed = sorted(set(self.tenants) - set(tenants))
        owners: dict[str, set[str]] = {}
        for cfg in tenants.values():
            for lmk in cfg.lmk_ids:
                owners.setdefault(lmk, set()).add(cfg.name)
        self.tenants, self.listener_tenants, self._owners = states, dict(listener_tenants), owners
        return removed

    def foreign_lmks(self, tenant: str) -> frozenset[str]:
        """LMK ids owned by other tenants and not by ``tenant``."""
        return frozenset(lmk for lmk, names in self._owners.items() if tenant not in names)

    def resolve(self, listener: str, peer: Any, peercert: Mapping[str, Any] | None) -> Resolution:
        """The tenant of a connection: certificate, then source address, then the listener's tenant."""
        subject, sans = certificate_identity(peercert)
        if peercert:
            matches = []
            for state in self.tenants.values():
                rules = state.config.clients
                by_subject = any(
                    all(value in subject.get(attr, ()) for attr, value in pattern)
                    for pattern in rules.subjects
                )
                if by_subject or any(san in sans for san in rules.sans):
                    matches.append(state)
            if len(matches) == 1:
                return Resolution(matches[0], "certificate", describe_certificate(peercert))
            if len(matches) > 1:
                names = ", ".join(m.name for m in matches)
                return Resolution(None, f"certificate matches several tenants ({names})")
        ip = _peer_ip(peer)
        if ip is not None:
            best: tuple[int, TenantState] | None = None
            for state in self.tenants.values():
                for net in state.config.clients.addresses:
                    if ip.version == net.version and ip in net and (best is None or net.prefixlen > best[0]):
                        best = (net.prefixlen, state)
            if best is not None:
                return Resolution(best[1], "address", str(ip))
        name = self.listener_tenants.get(listener, "")
        if name:
            return Resolution(self.tenants[name], "listener", listener)
        return Resolution(None, "no tenant matches")
