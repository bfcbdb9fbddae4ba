"""Tenant configuration, resolution (certificate CN/DN/SAN, CIDR, listener fallback), rate limiting and
the dispatcher's tenant policy (17, 13, rate-limit answer) without nodes."""

from __future__ import annotations

import asyncio
import ipaddress
import tomllib
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast

import pytest

from hsmproxy.cluster.router import Router
from hsmproxy.commands import HANDLERS
from hsmproxy.commands.base import CommandContext
from hsmproxy.config import ConfigError, load_settings, parse_settings
from hsmproxy.server.hostcmd import Dispatcher
from hsmproxy.tenancy import (
    TenantRegistry,
    TenantState,
    TokenBucket,
    parse_san,
    parse_subject,
    parse_tenant,
    parse_tenants,
)

NODE = {"name": "n", "pin_file": "/dev/null"}


def _cert(cn: str, org: str = "", sans: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """A ``getpeercert()``-shaped dict."""
    subject: list[tuple[tuple[str, str], ...]] = [(("commonName", cn),)]
    if org:
        subject.append((("organizationName", org),))
    return {"subject": tuple(subject), "subjectAltName": sans}


def _registry() -> TenantRegistry:
    tenants = parse_tenants(
        [
            {
                "name": "bank-a",
                "lmk_ids": ["00", "01"],
                "clients": {
                    "listeners": ["host-a"],
                    "subjects": ["CN=switch-a,O=Bank A"],
                    "sans": ["DNS:switch.bank-a.test", "email:ops@bank-a.test"],
                    "addresses": ["10.1.0.0/16"],
                },
            },
            {
                "name": "bank-b",
                "lmk_ids": ["02"],
                "clients": {
                    "subjects": ["CN=switch-b"],
                    "sans": ["URI:spiffe://bank-b/switch"],
                    "addresses": ["10.1.2.0/24", "2001:db8::/32"],
                },
            },
        ]
    )
    return TenantRegistry(tenants, {"host-a": "bank-a", "open": "default", "strict": ""})


@pytest.mark.parametrize(
    ("cert", "tenant"),
    [
        (_cert("switch-a", "Bank A"), "bank-a"),  # every attribute of the DN pattern
        (_cert("switch-a", "Other"), None),  # O differs: the pattern does not match
        (_cert("switch-b"), "bank-b"),  # CN pattern
        (_cert("switch-b", "Any Org"), "bank-b"),
        (_cert("x", sans=(("DNS", "switch.bank-a.test"),)), "bank-a"),
        (_cert("x", sans=(("email", "ops@bank-a.test"),)), "bank-a"),
        (_cert("x", sans=(("URI", "spiffe://bank-b/switch"),)), "bank-b"),
        (_cert("x", sans=(("DNS", "spiffe://bank-b/switch"),)), None),  # the SAN type matters
        (_cert("switch-b", sans=(("DNS", "switch.bank-a.test"),)), "ambiguous"),
    ],
)
def test_certificate_resolution(cert: dict[str, Any], tenant: str | None) -> None:
    found = _registry().resolve("strict", ("192.0.2.1", 4000), cert)
    if tenant == "ambiguous":
        assert found.tenant is None and "several tenants" in found.how
    elif tenant is None:
        assert found.tenant is None and found.how == "no tenant matches"
    else:
        assert found.tenant is not None and found.tenant.name == tenant and found.how == "certificate"


def test_certificate_wins_over_address_and_address_over_listener() -> None:
    reg = _registry()
    found = reg.resolve("host-a", ("10.1.2.3", 1), _cert("switch-b"))
    assert found.tenant is not None and (found.tenant.name, found.how) == ("bank-b", "certificate")
    # A certificate that matches nobody falls through to the address, then the listener.
    found = reg.resolve("host-a", ("10.1.9.9", 1), _cert("nobody"))
    assert found.tenant is not None and (found.tenant.name, found.how) == ("bank-a", "address")
    found = reg.resolve("host-a", ("192.0.2.1", 1), _cert("nobody"))
    assert found.tenant is not None and (found.tenant.name, found.how) == ("bank-a", "listener")


@pytest.mark.parametrize(
    ("peer", "listener", "tenant", "how"),
    [
        (("10.1.2.3", 1), "strict", "bank-b", "address"),  # /24 beats /16: longest prefix
        (("10.1.3.3", 1), "strict", "bank-a", "address"),
        (("::ffff:10.1.2.3", 1, 0, 0), "strict", "bank-b", "address"),  # IPv4-mapped
        (("2001:db8::7", 1, 0, 0), "strict", "bank-b", "address"),
        (("192.0.2.1", 1), "open", "default", "listener"),
        (("192.0.2.1", 1), "host-a", "bank-a", "listener"),
        (("192.0.2.1", 1), "strict", None, "no tenant matches"),
        (None, "strict", None, "no tenant matches"),
    ],
)
def test_address_and_listener_resolution(peer: Any, listener: str, tenant: str | None, how: str) -> None:
    found = _registry().resolve(listener, peer, None)
    assert (found.tenant.name if found.tenant else None, found.how) == (tenant, how)


def test_subject_san_and_address_parsing() -> None:
    assert parse_subject("CN=a\\,b, O=Bank") == (("commonName", "a,b"), ("organizationName", "Bank"))
    assert parse_san("URI:spiffe://x/y") == ("URI", "spiffe://x/y")
    assert parse_san("email:a@b") == ("email", "a@b")
    for bad in ("XX=1", "CN", "CN="):
        with pytest.raises(ValueError, match="ATTR=value"):
            parse_subject(bad)
    with pytest.raises(ValueError, match="DNS"):
        parse_san("IP:1.2.3.4")
    with pytest.raises(ValueError, match="CIDR"):
        parse_tenant({"name": "t", "clients": {"addresses": ["10.0.0.0/99"]}}, "t")


def test_tenant_defaults_and_validation() -> None:
    t = parse_tenant({"name": "b", "lmk_ids": ["02", "03"]}, "t")
    assert (t.default_lmk, t.keyblock_lmk, t.key_namespace, t.commands) == ("02", "", "b", None)
    assert t.allows("CC")
    t = parse_tenant({"name": "a", "commands": ["cc", "NC"], "rate": 50}, "t")
    assert (t.default_lmk, t.keyblock_lmk, t.burst) == ("00", "01", 50.0)
    assert t.allows("CC") and not t.allows("CA")
    for bad, message in (
        ({"name": "x", "lmk_ids": ["02"], "default_lmk": "00"}, "default_lmk"),
        ({"name": "x", "keyblock_lmk": "05"}, "keyblock_lmk"),
        ({"name": "x", "lmk_ids": ["2"]}, "two digits"),
        ({"name": "x", "commands": "CC"}, "list"),
        ({"name": "x", "commands": ["CCC"]}, "two characters"),
        ({"name": "x", "rate": -1}, "negative"),
        ({"name": "x", "rate_limit_error": "00"}, "rate_limit_error"),
        ({"name": "x", "clients": {"certs": []}}, "unknown keys"),
        ({"lmk_ids": ["00"]}, "name"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_tenant(bad, "t")
    with pytest.raises(ValueError, match="already a client rule"):
        parse_tenants(
            [
                {"name": "a", "clients": {"addresses": ["10.0.0.0/8"]}},
                {"name": "b", "clients": {"addresses": ["10.0.0.0/8"]}},
            ]
        )


def test_listener_tenants_from_config() -> None:
    data: dict[str, Any] = {
        "nodes": [NODE],
        "listeners": [
            {"name": "a", "bind": "127.0.0.1:0"},
            {"name": "b", "bind": "127.0.0.1:0", "tenant": ""},
            {"name": "c", "bind": "127.0.0.1:0"},
        ],
        "tenants": [{"name": "bank-a", "clients": {"listeners": ["a"]}}],
    }
    s = parse_settings(data, Path("/"))
    assert [lc.tenant for lc in s.listeners] == ["bank-a", "", "default"]
    data["listeners"][0]["tenant"] = "default"
    with pytest.raises(ConfigError, match="claims it"):
        parse_settings(data, Path("/"))
    data["listeners"][0]["tenant"] = "nobody"
    data["tenants"] = []
    with pytest.raises(ConfigError, match="unknown tenant"):
        parse_settings(data, Path("/"))
    data["listeners"][0]["tenant"] = "default"
    data["tenants"] = [{"name": "bank-a", "clients": {"listeners": ["zz"]}}]
    with pytest.raises(ConfigError, match="no listener"):
        parse_settings(data, Path("/"))


def test_tls_config_errors(tmp_path: Path) -> None:
    base: dict[str, Any] = {"nodes": [NODE]}
    listener = {"name": "t", "bind": "127.0.0.1:0"}
    for tls, message in (
        ({"cert": "c.pem"}, "cert and key"),
        ({"cert": "c.pem", "key": "k.pem", "require_client_cert": True}, "client_ca"),
        ({"cert": "c.pem", "key": "k.pem", "min_version": "1.1"}, "1.2 or 1.3"),
        ({"cert": "c.pem", "key": "k.pem", "verify": True}, "unknown keys"),
        ({"cert": "missing.pem", "key": "missing.key"}, "cannot load"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_settings({**base, "listeners": [{**listener, "tls": tls}]}, tmp_path)


def test_repo_config_with_its_tenant_example_loads() -> None:
    path = Path(__file__).parents[2] / "config.toml"
    settings = load_settings(path)
    assert settings.tenants["default"].lmk_ids == ("00", "01")
    # The commented second tenant, uncommented (without its TLS files), is a valid configuration too.
    text = path.read_text()
    example = text[text.index("# -- example: a second tenant") :]
    lines = [line[2:] for line in example.splitlines() if line.startswith("# ")]
    lines = [line for line in lines if not line.startswith(("cert", "key =", "client_ca", "require", "min_"))]
    lines = [line for line in lines if line != "[listeners.tls]" and not line.startswith(("--", "Load"))]
    data = tomllib.loads(text + "\n" + "\n".join(lines))
    example_settings = parse_settings(data, path.parent)
    bank_b = example_settings.tenants["bank-b"]
    assert (bank_b.lmk_ids, bank_b.rate, bank_b.allows("JA")) == (("02",), 500.0, False)
    assert example_settings.listeners[-1].tenant == ""


def test_token_bucket_burst_delay_and_refusal() -> None:
    now = [100.0]
    bucket = TokenBucket(rate=10, burst=3, clock=lambda: now[0])
    assert [bucket.reserve(0.25) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert bucket.reserve(0.25) == pytest.approx(0.1)  # waits for the next token
    assert bucket.reserve(0.25) == pytest.approx(0.2)  # and the one after (reserved in turn)
    assert bucket.reserve(0.25) is None  # 0.3 s away: refused, nothing reserved
    now[0] += 0.5  # 5 tokens' worth: the two reservations are paid, 3 left (capped at burst)
    assert [bucket.reserve(0) for _ in range(4)] == [0.0, 0.0, 0.0, None]


def test_connection_counting() -> None:
    state = TenantState(parse_tenant({"name": "t", "max_connections": 2}, "t"))
    assert state.acquire_connection() and state.acquire_connection()
    assert not state.acquire_connection()
    state.release_connection()
    assert state.acquire_connection()
    assert (state.connections, state.refused_connections) == (2, 1)
    assert state.snapshot()["connections"] == 2


class _Router:
    """Stands in for the router: every operation 'succeeds' with no values (never reached here)."""

    calls = 0
    shed_early = 0

    def overloaded(self) -> bool:
        """Never overloaded here."""
        return False

    async def execute(self, op: str, args: dict[str, Any], affinity: str) -> tuple[str, dict[str, Any]]:
        _Router.calls += 1
        return "00", {}


def _dispatcher(tenant: dict[str, Any], foreign: frozenset[str] = frozenset()) -> Dispatcher:
    cfg = parse_tenant(tenant, "t")
    ctx = CommandContext(cfg.name, cfg.lmk_ids, cfg.default_lmk, keyblock_lmk=cfg.keyblock_lmk)
    router = cast(Router, _Router())
    return Dispatcher(router, HANDLERS, ctx, 4, frozenset({"NO"}), TenantState(cfg), foreign)


def test_dispatcher_allow_list_and_foreign_lmk() -> None:
    d = _dispatcher({"name": "b", "lmk_ids": ["02"], "commands": ["B2", "NC", "NO"]}, frozenset({"00", "01"}))
    assert d.handle(b"0000JA40123456789004") == b"0000JB17"
    assert d.handle(b"0000ZZ") == b"0000ZA68"  # unknown: 68 as before
    assert d.handle(b"0000NO00") == b"0000NP68"  # allowed but disabled
    assert d.handle(b"0000NC%00") == b"0000ND13"  # another tenant's LMK
    assert d.handle(b"0000NC%05") == b"0000ND13"  # no tenant's LMK: the handler's own check
    assert d.handle(b"0000B20002ok") == b"0000B300ok"
    assert d.tenant is not None and d.tenant.denied_commands == 1
    assert _Router.calls == 0


def test_dispatcher_rate_limit_waits_then_refuses() -> None:
    d = _dispatcher({"name": "r", "rate": 10, "burst": 1, "rate_max_delay": 0.15, "rate_limit_error": "42"})
    assert d.handle(b"0001B20002ok") == b"0001B300ok"  # the burst
    later = d.handle(b"0002B20002ok")  # waits ~0.1 s for its token
    assert later is not None and not isinstance(later, bytes)
    assert d.handle(b"0003B20002ok") == b"0003B342"  # 0.2 s away: the configured error at once

    async def wait(aw: Awaitable[bytes]) -> bytes:
        return await aw

    assert asyncio.run(wait(later)) == b"0002B300ok"
    assert d.tenant is not None and (d.tenant.rate_delayed, d.tenant.rate_rejected) == (1, 1)


def test_registry_foreign_lmks() -> None:
    reg = _registry()
    assert reg.foreign_lmks("bank-b") == frozenset({"00", "01"})
    assert reg.foreign_lmks("bank-a") == frozenset({"02"})
    assert reg.foreign_lmks("default") == frozenset({"02"})
    assert ipaddress.ip_network("10.1.0.0/16") in reg.tenants["bank-a"].config.clients.addresses
