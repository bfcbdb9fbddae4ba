"""Test environment for tenants and mutual TLS: a PKI made with ``cryptography``, a node with a second
tenant's LMKs (variant ``02``, key block ``03``), and a proxy on uvloop with plain and TLS listeners.

Private keys exist only in the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from emulator.crypto.keyblock import KeyBlockLmk
from emulator.crypto.lmk import TEST_LMK, VariantLmk
from hsmproxy.backend.offline import in_child
from hsmproxy.config import Settings, load_settings
from hsmproxy.keys.ceremony import load_node
from hsmproxy.server.app import Proxy
from protocols.framing import Framer, encode_frame
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import make_nodes, start_proxy

#: Tenant B's variant LMK (id 02): the test LMK with every byte XOR 5A (parity kept). Public test data.
B_LMK = VariantLmk(tuple(bytes(b ^ 0x5A for b in pair) for pair in TEST_LMK.pairs))
#: Tenant B's AES key-block LMK (id 03). Public test data.
B_KEYBLOCK_LMK = KeyBlockLmk("1", bytes(range(32)))

TENANTS = """
[[listeners]]
name = "bank-b"
bind = "127.0.0.1:0"
tenant = "bank-b"

[[listeners]]
name = "bank-c"
bind = "127.0.0.1:0"
tenant = "bank-c"

[[listeners]]
name = "limited"
bind = "127.0.0.1:0"
tenant = "limited"

[[listeners]]
name = "strict"
bind = "127.0.0.1:0"
tenant = ""

[[listeners]]
name = "tls"
bind = "127.0.0.1:0"
tenant = ""

[listeners.tls]
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"
require_client_cert = true
min_version = "1.2"

[[listeners]]
name = "tls13"
bind = "127.0.0.1:0"
tenant = ""

[listeners.tls]
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"
min_version = "1.3"

[[tenants]]
name = "bank-a"
lmk_ids = ["00", "01"]
clients = { listeners = ["host"], subjects = ["CN=switch-a,O=Bank A"], addresses = ["127.0.0.3"] }

[[tenants]]
name = "bank-b"
lmk_ids = ["02", "03"]
default_lmk = "02"
keyblock_lmk = "03"
key_namespace = "bank-b/"
commands = ["NC", "NO", "B2", "CC", "CA", "CW", "CY", "BU", "A0", "M6", "M8"]
clients = { sans = ["URI:spiffe://bank-b/switch"], addresses = ["127.0.0.2/32"] }

[[tenants]]
name = "bank-c"
lmk_ids = ["02", "03"]
default_lmk = "02"
keyblock_lmk = "03"

[[tenants]]
name = "limited"
lmk_ids = ["00"]
commands = ["B2", "NC"]
max_connections = 2
rate = 20
burst = 5
rate_max_delay = 0.2
"""


# -- PKI ------------------------------------------------------------------------------------------


def _name(cn: str, org: str = "") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _write(root: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (root / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path = root / f"{stem}.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    subject: x509.Name,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca[1], hashes.SHA256()), key


def make_pki(root: Path) -> Path:
    """CA, server (127.0.0.1), clients ``a`` (CN), ``b`` (SAN URI), ``stranger``; ``rogue`` (other CA)."""
    root.mkdir(parents=True, exist_ok=True)
    ca = _ca("hsmproxy test CA")
    (root / "ca.pem").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    client, server = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH
    ip = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    _write(root, "server", *_leaf(ca, _name("hsmproxy"), [ip], server))
    _write(root, "a", *_leaf(ca, _name("switch-a", "Bank A"), [x509.DNSName("switch.bank-a.test")], client))
    spiffe = x509.UniformResourceIdentifier("spiffe://bank-b/switch")
    _write(root, "b", *_leaf(ca, _name("switch-b", "Bank B"), [spiffe], client))
    _write(root, "stranger", *_leaf(ca, _name("stranger", "Nobody"), [], client))
    other = _ca("another CA")
    _write(root, "rogue", *_leaf(other, _name("switch-a", "Bank A"), [], client))
    return root


def client_context(pki: Path, who: str | None, version: str | None = None) -> ssl.SSLContext:
    """A client context trusting the test CA, presenting ``who``'s certificate (None: none)."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if who is not None:
        ctx.load_cert_chain(str(pki / f"{who}.pem"), str(pki / f"{who}.key"))
    if version == "1.2":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif version == "1.3":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


class SocketClient(HsmClient):
    """:class:`HsmClient` over an already connected (e.g. TLS) socket."""

    def __init__(self, sock: socket.socket, header: bytes = b"0000") -> None:
        sock.settimeout(10)
        self.sock = sock
        self.header = header
        self.framer = Framer(65535)
        self.pending = []


def tls_client(port: int, ctx: ssl.SSLContext) -> SocketClient:
    """Connect and complete the TLS handshake (raises ssl.SSLError / OSError when refused)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return SocketClient(ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
    except BaseException:
        raw.close()
        raise


def is_refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True if a TLS connection with ``ctx`` fails the handshake or gets no answer to ``B2``.

    (With TLS 1.3 the client may finish its side of the handshake before the server checks the
    client certificate; the server's alert then arrives on the first read.)
    """
    try:
        c = tls_client(port, ctx)
    except (ssl.SSLError, OSError):
        return True
    try:
        c.sock.sendall(encode_frame(b"0000B20002ok"))
        c.recv()
    except (ssl.SSLError, OSError, ConnectionError):
        return True
    finally:
        c.close()
    return False


def client_from(source: str, port: int) -> HsmClient:
    """A plain client whose source address is ``source`` (a 127/8 loopback address)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        pytest.skip(f"cannot use {source} as a source address: {exc}")
    return SocketClient(sock)


# -- nodes and proxy ------------------------------------------------------------------------------


@dataclass
class TenancyProxy:
    """A proxy on uvloop with the tenancy listeners; ``ports[listener name]``."""

    settings: Settings
    proxy: Proxy
    ports: dict[str, int]
    pki: Path
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    stop_event: asyncio.Event

    def stop(self) -> None:
        """Stop the proxy and its node workers; wait for the thread."""
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)


def _load_tenant_b_lmks(settings: Settings) -> None:
    lmks = {
        "02": ("variant", list(B_LMK.pairs)),
        "03": ("keyblock", [B_KEYBLOCK_LMK.key]),
    }
    for spec in settings.nodes:
        in_child(load_node, spec, lmks)


def start_uvloop_proxy(settings: Settings, pki: Path) -> TenancyProxy:
    """Run a Proxy for ``settings`` on a uvloop loop in a thread; wait until it listens."""
    rp = start_proxy(settings, loop_factory=uvloop.new_event_loop)
    proxy = rp.proxy
    assert len(proxy.ports) == len(settings.listeners), "proxy did not open every listener"
    ports = {lc.name: port for lc, port in zip(settings.listeners, proxy.ports, strict=True)}
    return TenancyProxy(settings, proxy, ports, pki, rp.loop, rp.thread, rp.stop_event)


@contextmanager
def tenancy_proxy(root: Path) -> Iterator[TenancyProxy]:
    """One SoftHSM2 node with tenant A's LMKs (00, 01) and tenant B's (02, 03), served on uvloop."""
    pki = make_pki(root / "pki")
    config = make_nodes(root, ("tenancy-node",))
    config.write_text(config.read_text() + TENANTS)
    settings = load_settings(config)
    _load_tenant_b_lmks(settings)
    rp = start_uvloop_proxy(settings, pki)
    try:
        yield rp
    finally:
        rp.stop()
