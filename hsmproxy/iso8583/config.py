"""``[[listeners]] protocol = "iso8583"`` and ``[[iso8583.routes]]``: parsed and validated.

A listener::

    [[listeners]]
    name = "iso-acq"
    protocol = "iso8583"
    bind = "127.0.0.1:8583"
    mode = "service"            # or "inline" (then `upstream` is required)
    framing = "binary2"         # 2-byte binary length, or "ascii4" (4 ASCII digits)
    spec = "ascii"              # "ascii" (default), "binary", "bcd", or a .json/.toml spec file
    upstream = "10.0.0.5:9000"  # inline mode: the host the translated requests go to
    timeout = 5.0               # inline: seconds to wait for the upstream response (then 39=91)
    tenant = "default"

A route (global ``[[iso8583.routes]]`` or per listener ``[[listeners.routes]]``; the first route
whose match keys all equal the message's fields wins; a match key left out matches anything)::

    [[iso8583.routes]]
    name = "acquirer-a"
    acquirer = "123456"         # field 32        forwarder = field 33
    terminal = "TERM0001"       # field 41        receiver = field 100
    pin_in = "zpk-acq"          # ZPK name (or BDK name with dukpt = true, KSN in field 53)
    pin_in_format = "01"        # payShield PIN block format codes: 01 ISO-0, 05 ISO-1, 47 ISO-3, 48 ISO-4
    pin_out = "zpk-iss"
    pin_out_format = "01"
    mac_in = "zak-acq"
    mac_out = "zak-iss"
    mac_algorithm = "3"         # ISO 9797-1 "1" or "3", or "cmac"
    mac_failure_code = "63"     # field 39 when the incoming MAC is wrong or missing
    zmk = "zmk-acq"             # key exchange (0800, 70 = 101/161): new keys arrive under this ZMK
    zmk_out = "zmk-iss"         # inline: key exchanges from the upstream (pin_out, mac_out)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hsmproxy.configutil import split_host_port
from hsmproxy.iso8583.codec import SpecError, load_spec

Mode = Literal["service", "inline"]
FramingKind = Literal["binary2", "ascii4"]

#: Friendly names for payShield PIN block format codes.
PIN_FORMATS = {
    "iso0": "01", "iso-0": "01", "iso1": "05", "iso-1": "05", "iso3": "47", "iso-3": "47",
    "iso4": "48", "iso-4": "48", "01": "01", "05": "05", "47": "47", "48": "48", "03": "03",
}  # fmt: skip
MAC_ALGORITHMS = {"1": "1", "alg1": "1", "3": "3", "alg3": "3", "x9.19": "3", "cmac": "cmac"}
#: Default field 39 for a MAC that does not verify (ISO 8583:1987 "63 security violation").
DEFAULT_MAC_FAILURE = "63"
_MATCH = {"acquirer": "32", "forwarder": "33", "terminal": "41", "receiver": "100"}
_ROUTE_KEYS = frozenset({
    "name", "listener", "tenant", *_MATCH, "pin_in", "dukpt", "pin_in_format", "pin_out", "pin_out_format",
    "mac_in", "mac_out", "mac_algorithm", "mac_in_algorithm", "mac_out_algorithm", "mac_padding",
    "mac_failure_code", "zmk", "zmk_out",
})  # fmt: skip
_LISTENER_KEYS = frozenset({
    "name", "protocol", "bind", "mode", "framing", "spec", "upstream", "timeout", "tenant", "routes",
    "max_connections", "max_inflight", "reconnect_max", "rate_limit_code",
})  # fmt: skip


class IsoConfigError(ValueError):
    """The ``iso8583`` configuration is invalid (the message says where and why)."""


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Which named keys apply to a message, chosen by fields 32, 33, 41 and 100."""

    name: str
    match: tuple[tuple[str, str], ...] = ()
    listener: str | None = None
    tenant: str | None = None
    pin_in: str | None = None
    dukpt: bool = False
    pin_in_format: str = "01"
    pin_out: str | None = None
    pin_out_format: str = "01"
    mac_in: str | None = None
    mac_out: str | None = None
    mac_in_algorithm: str = "3"
    mac_out_algorithm: str = "3"
    mac_padding: int = 1
    mac_failure_code: str = DEFAULT_MAC_FAILURE
    zmk: str | None = None
    #: The upstream zone's ZMK (inline mode): key exchanges from the upstream replace pin_out/mac_out.
    zmk_out: str | None = None

    def matches(self, fields: Mapping[str, str]) -> bool:
        """True when every match key equals the message's field."""
        return all(fields.get(f) == value for f, value in self.match)

    def key_names(self) -> tuple[str, ...]:
        """The named keys this route uses."""
        return tuple(
            k for k in (self.pin_in, self.pin_out, self.mac_in, self.mac_out, self.zmk, self.zmk_out) if k
        )


@dataclass(frozen=True, slots=True)
class IsoListenerConfig:
    """One ``protocol = "iso8583"`` listener."""

    name: str
    host: str
    port: int
    mode: Mode = "service"
    framing: FramingKind = "binary2"
    spec_name: str = "ascii"
    spec: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)
    upstream: tuple[str, int] | None = None
    timeout: float = 5.0
    tenant: str = "default"
    max_connections: int = 1000
    max_inflight: int = 256
    #: Cap of the reconnect back-off to the upstream (seconds; starts at 0.1 s, doubles).
    reconnect_max: float = 10.0
    routes: tuple[RouteConfig, ...] = ()
    #: Field 39 of a message over the tenant's ``rate`` (the tenant's ``rate_limit_error`` is a
    #: payShield code).
    rate_limit_code: str = "91"


@dataclass(frozen=True, slots=True)
class IsoSettings:
    """Every ISO 8583 listener and the global routes."""

    listeners: tuple[IsoListenerConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()

    def routes_for(self, listener: IsoListenerConfig) -> tuple[RouteConfig, ...]:
        """The listener's own routes, then the global ones that apply to it (by listener and tenant)."""
        extra = tuple(
            r for r in self.routes
            if (r.listener in (None, listener.name)) and (r.tenant in (None, listener.tenant))
        )  # fmt: skip
        return listener.routes + extra

    def key_names(self) -> set[tuple[str, str]]:
        """(tenant, name) of every named key a route uses."""
        out: set[tuple[str, str]] = set()
        for lc in self.listeners:
            for r in self.routes_for(lc):
                out.update((lc.tenant, name) for name in r.key_names())
        return out


def _host_port(text: Any, where: str) -> tuple[str, int]:
    found = split_host_port(text)
    if found is None:
        raise IsoConfigError(f"{where}: expected HOST:PORT, got {text!r}")
    return found


def _opt(item: Mapping[str, Any], key: str) -> str | None:
    value = item.get(key)
    return None if value in (None, "") else str(value)


def _choice(table: Mapping[str, str], value: Any, where: str, what: str) -> str:
    chosen = table.get(str(value).lower())
    if chosen is None:
        raise IsoConfigError(f"{where}: unknown {what} {value!r} (one of {', '.join(sorted(set(table)))})")
    return chosen


def _code(value: Any, where: str) -> str:
    code = str(value).upper()
    if len(code) != 2 or not code.isalnum():
        raise IsoConfigError(f"{where} must be 2 alphanumeric characters")
    return code


def parse_route(item: Any, where: str) -> RouteConfig:
    """One route table."""
    if not isinstance(item, dict):
        raise IsoConfigError(f"{where}: expected a table")
    unknown = set(item) - _ROUTE_KEYS
    if unknown:
        raise IsoConfigError(f"{where}: unknown keys {sorted(unknown)}")
    algorithm = item.get("mac_algorithm", "3")
    code = _code(item.get("mac_failure_code", DEFAULT_MAC_FAILURE), f"{where}: mac_failure_code")
    padding = int(item.get("mac_padding", 1))
    if padding not in (1, 2):
        raise IsoConfigError(f"{where}: mac_padding must be 1 or 2 (ISO 9797-1 padding method)")
    route = RouteConfig(
        name=str(item.get("name", where)),
        match=tuple((f, str(item[k])) for k, f in _MATCH.items() if k in item),
        listener=_opt(item, "listener"),
        tenant=_opt(item, "tenant"),
        pin_in=_opt(item, "pin_in"),
        dukpt=bool(item.get("dukpt", False)),
        pin_in_format=_choice(PIN_FORMATS, item.get("pin_in_format", "01"), where, "pin_in_format"),
        pin_out=_opt(item, "pin_out"),
        pin_out_format=_choice(PIN_FORMATS, item.get("pin_out_format", "01"), where, "pin_out_format"),
        mac_in=_opt(item, "mac_in"),
        mac_out=_opt(item, "mac_out"),
        mac_in_algorithm=_choice(MAC_ALGORITHMS, item.get("mac_in_algorithm", algorithm), where, "MAC"),
        mac_out_algorithm=_choice(MAC_ALGORITHMS, item.get("mac_out_algorithm", algorithm), where, "MAC"),
        mac_padding=padding,
        mac_failure_code=code,
        zmk=_opt(item, "zmk"),
        zmk_out=_opt(item, "zmk_out"),
    )  # fmt: skip
    if (route.pin_in is None) != (route.pin_out is None):
        raise IsoConfigError(f"{where}: pin_in and pin_out go together")
    if route.dukpt and route.pin_in is None:
        raise IsoConfigError(f"{where}: dukpt = true needs pin_in (the BDK's name)")
    return route


def parse_listener(item: Mapping[str, Any], index: int, base: Path) -> IsoListenerConfig:
    """One ``[[listeners]]`` table with ``protocol = "iso8583"``."""
    where = f"listeners[{index}]"
    unknown = set(item) - _LISTENER_KEYS
    if unknown:
        raise IsoConfigError(f"{where}: unknown keys {sorted(unknown)}")
    host, port = _host_port(item.get("bind", ""), where)
    mode = str(item.get("mode", "service"))
    if mode not in ("service", "inline"):
        raise IsoConfigError(f"{where}: mode must be service or inline")
    framing = str(item.get("framing", "binary2"))
    if framing not in ("binary2", "ascii4"):
        raise IsoConfigError(f"{where}: framing must be binary2 or ascii4")
    spec_name = str(item.get("spec", "ascii"))
    try:
        spec = load_spec(spec_name, base)
    except SpecError as exc:
        raise IsoConfigError(f"{where}: {exc}") from None
    upstream = _host_port(item["upstream"], f"{where}.upstream") if item.get("upstream") else None
    if mode == "inline" and upstream is None:
        raise IsoConfigError(f"{where}: inline mode needs upstream = HOST:PORT")
    timeout = float(item.get("timeout", 5.0))
    if timeout <= 0:
        raise IsoConfigError(f"{where}: timeout must be positive")
    routes = tuple(parse_route(r, f"{where}.routes[{i}]") for i, r in enumerate(item.get("routes", [])))
    return IsoListenerConfig(
        name=str(item.get("name", f"iso{index}")), host=host, port=port, mode=mode,  # type: ignore[arg-type]
        framing=framing, spec_name=spec_name, spec=spec, upstream=upstream,  # type: ignore[arg-type]
        timeout=timeout, tenant=str(item.get("tenant", "default")),
        max_connections=int(item.get("max_connections", 1000)),
        max_inflight=int(item.get("max_inflight", 256)),
        reconnect_max=float(item.get("reconnect_max", 10.0)), routes=routes,
        rate_limit_code=_code(item.get("rate_limit_code", "91"), f"{where}.rate_limit_code"),
    )  # fmt: skip


def parse_iso8583(data: Mapping[str, Any], base: Path, tenants: Iterable[str] = ()) -> IsoSettings | None:
    """The ISO 8583 listeners and routes of a parsed config (None when there are none).

    Raises:
        IsoConfigError: an invalid listener or route, an unknown tenant, or routes naming keys
            without a ``[keystore]``.
    """
    items = [
        (i, item) for i, item in enumerate(data.get("listeners", [])) if item.get("protocol") == "iso8583"
    ]
    section = data.get("iso8583", {})
    if not isinstance(section, dict):
        raise IsoConfigError("iso8583: expected a table")
    routes = tuple(parse_route(r, f"iso8583.routes[{i}]") for i, r in enumerate(section.get("routes", [])))
    if not items and not routes:
        return None
    listeners = tuple(parse_listener(item, i, base) for i, item in items)
    names = [lc.name for lc in listeners]
    if len(set(names)) != len(names):
        raise IsoConfigError("iso8583 listeners need unique names")
    known = set(tenants)
    for lc in listeners:
        if known and lc.tenant not in known:
            raise IsoConfigError(f"listener {lc.name}: unknown tenant {lc.tenant!r}")
    for r in routes:
        if r.listener is not None and r.listener not in names:
            raise IsoConfigError(f"route {r.name}: no iso8583 listener named {r.listener!r}")
    settings = IsoSettings(listeners, routes)
    if settings.key_names() and "keystore" not in data:
        raise IsoConfigError("iso8583 routes name keys: a [keystore] section is required")
    return settings
