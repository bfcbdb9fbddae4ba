"""GET /metrics of a running proxy: every catalogue family, counts that match the traffic, no secrets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psec
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk, kcv_tdes
from hsmproxy.config import KeystoreSettings, load_settings
from hsmproxy.keys.store import KeyRecord, KeyState, KeyStore
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import RunningProxy, start_proxy

ZPK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
CVK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
STORED_ZPK = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
PAN = "4123456789012345"
PIN = "1234"


def _http(port: int, path: str) -> tuple[int, str, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), head, body


@pytest.fixture(scope="module")
def metrics_proxy(proxy_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """A proxy with /metrics on a free port and a SQLite keystore holding one ZPK due for rotation."""
    db = tmp_path_factory.mktemp("metrics") / "keys.db"
    store = KeyStore.open(f"sqlite:///{db}")
    now = datetime.now(UTC)
    with legacy_tdes():
        kcv = kcv_tdes(STORED_ZPK).hex().upper()[:6]
    store.create(
        KeyRecord(
            tenant="default", name="zpk-metrics", version=1, key_type="ZPK", type_code="001", lmk_id="00",
            cryptogram=encrypt_key_under_lmk(TEST_LMK, "001", "U", STORED_ZPK), kcv=kcv,
            state=KeyState.ACTIVE, activation_date=now - timedelta(days=2),
            expiry_date=now + timedelta(days=3), grace_until=None, rotate_every=timedelta(days=1),
            grace_period=timedelta(0), created_at=now, updated_at=now, created_by="test",
        ),
        actor="test",
    )  # fmt: skip
    store.close()
    keystore = KeystoreSettings(url=f"sqlite:///{db}", rotation_interval=3600)
    settings = replace(load_settings(proxy_config), http_bind=("127.0.0.1", 0), keystore=keystore)
    rp = start_proxy(settings)
    yield rp
    rp.stop()


def _families(port: int) -> dict[str, Metric]:
    status, head, body = _http(port, "/metrics")
    assert status == 200 and "text/plain; version=0.0.4" in head
    return {f.name: f for f in text_string_to_metric_families(body)}


def _value(family: Metric, suffix: str = "", **labels: str) -> float:
    found = [
        s.value
        for s in family.samples
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (family.name, labels, found)
    return float(found[0])


def test_metrics_catalogue(metrics_proxy: RunningProxy) -> None:
    rp = metrics_proxy
    port = rp.proxy.http_port
    before = _families(port)  # other tests' traffic never reaches this proxy, but be exact anyway
    zpk = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK).encode()
    cvk = encrypt_key_under_lmk(TEST_LMK, "402", "U", CVK).encode()
    with legacy_tdes():
        pin_block = bytes(psec.des.encrypt_tdes_ecb(ZPK, psec.pinblock.encode_pinblock_iso_0(PIN, PAN)))
    block_hex = pin_block.hex().upper().encode()
    card = f"{PAN};8701101".encode()
    client = HsmClient("127.0.0.1", rp.port)
    try:
        for _ in range(3):
            assert client.call(b"NC")[:4] == b"ND00"
        generated = client.call(b"CW" + cvk + card)
        assert generated[:4] == b"CX00"
        cvv = generated[4:7]
        wrong = b"%03d" % ((int(cvv) + 1) % 1000)
        assert client.call(b"CY" + cvk + cvv + card)[:4] == b"CZ00"
        assert client.call(b"CY" + cvk + wrong + card)[:4] == b"CZ01"  # business outcome
        translated = client.call(b"CC" + zpk + zpk + b"12" + block_hex + b"0101" + PAN[3:15].encode())
        assert translated[:4] == b"CD00"
        bad = client.call(b"CC" + zpk[:-1] + b"X" + zpk + b"12" + block_hex + b"0101" + b"1")
        assert bad[:2] == b"CD" and bad[2:4] not in (b"00", b"01", b"02")
        client.call(b"ZZ")  # an unknown code: counted as command "other"
    finally:
        client.close()
    asyncio.run_coroutine_threadsafe(rp.proxy.metrics.refresh(), rp.loop).result(10)  # type: ignore[union-attr]
    fams = _families(port)
    commands = fams["hsmproxy_commands"]
    assert commands.type == "counter"

    def delta(**labels: str) -> float:
        old = before["hsmproxy_commands"]
        had = [s for s in old.samples if s.name.endswith("_total") and s.labels == {**labels}]
        return _value(commands, "_total", **labels) - (float(had[0].value) if had else 0.0)

    assert delta(tenant="default", command="NC", outcome="ok") == 3
    assert delta(tenant="default", command="CW", outcome="ok") == 1
    assert delta(tenant="default", command="CY", outcome="ok") == 1
    assert delta(tenant="default", command="CY", outcome="business") == 1
    assert delta(tenant="default", command="CC", outcome="ok") == 1
    cc_errors_total = sum(
        s.value
        for s in commands.samples
        if s.labels.get("command") == "CC" and s.labels.get("outcome", "").startswith("error_")
    )
    assert cc_errors_total >= 1
    assert sum(s.value for s in commands.samples if s.labels.get("command") == "other") >= 1
    assert not any(s.labels.get("command") == "ZZ" for s in commands.samples)

    latency = fams["hsmproxy_command_latency_seconds"]
    assert latency.type == "histogram"
    assert _value(latency, "_count", command="NC") >= 3
    buckets = {s.labels["le"] for s in latency.samples if s.name.endswith("_bucket")}
    assert {"0.0001", "1.0", "+Inf"} <= buckets

    conns = fams["hsmproxy_connections"]
    assert all(s.value >= 0 for s in conns.samples) and conns.samples
    assert "hsmproxy_inflight_commands" in fams
    assert _value(fams["hsmproxy_up"]) == 1 and _value(fams["hsmproxy_draining"]) == 0
    assert _value(fams["hsmproxy_admission_queued"]) == 0
    for name in ("requests_shed", "requests_expired", "admission_waited", "retries_refused", "slow_timeouts"):
        assert _value(fams[f"hsmproxy_{name}"], "_total") == 0, name

    state = fams["hsmproxy_node_state"]
    admin = fams["hsmproxy_node_admin_state"]
    for node in ("node-a", "node-b"):
        assert _value(state, node=node, state="UP") == 1
        assert _value(state, node=node, state="DOWN") == 0 and _value(state, node=node, state="EJECTED") == 0
        assert _value(admin, node=node, state="READY") == 1 and _value(admin, node=node, state="MAINT") == 0
        assert _value(fams["hsmproxy_node_outstanding"], node=node) == 0
        # the adaptive limit stays within its bounds (16 .. 256 by default); the RTTs are seconds
        assert 16 <= _value(fams["hsmproxy_node_concurrency_limit"], node=node) <= 256
        assert 0 <= _value(fams["hsmproxy_node_rtt_noload_seconds"], node=node) < 1
        for name in ("errors", "ejections", "check_failures", "worker_restarts"):
            assert _value(fams[f"hsmproxy_node_{name}"], "_total", node=node) == 0, name
        info = [s for s in fams["hsmproxy_node_info"].samples if s.labels.get("node") == node]
        assert info and info[0].name == "hsmproxy_node_info"
        labels = info[0].labels
        assert labels["manufacturer"].startswith("SoftHSM") and labels["firmware"][0].isdigit()
    requests = sum(_value(fams["hsmproxy_node_requests"], "_total", node=n) for n in ("node-a", "node-b"))
    assert requests >= 7
    hits = sum(s.value for s in fams["hsmproxy_node_key_cache_hits"].samples)
    misses = sum(s.value for s in fams["hsmproxy_node_key_cache_misses"].samples)
    assert misses >= 1 and hits + misses >= 2  # the CVK and ZPK were used more than once
    assert "hsmproxy_node_fallback_unwraps" in fams and "hsmproxy_node_native_unwraps" in fams
    unwraps = sum(s.value for s in fams["hsmproxy_node_fallback_unwraps"].samples) + sum(
        s.value for s in fams["hsmproxy_node_native_unwraps"].samples
    )
    assert unwraps >= 1
    print(f"\nkey cache: {hits:g} hits, {misses:g} misses; unwraps {unwraps:g}")

    assert _value(fams["hsmproxy_keys"], state="active") == 1
    assert _value(fams["hsmproxy_keys"], state="revoked") == 0
    assert _value(fams["hsmproxy_keys_pending_rotation"]) == 1
    assert _value(fams["hsmproxy_keys_expiring"], within="7d") == 1
    assert _value(fams["hsmproxy_keys_expiring"], within="30d") == 1

    # ``*_created`` lines carry start timestamps (digits that could match a short value by chance);
    # the 3-digit CVV is too short to scan for meaningfully.
    page = "\n".join(line for line in _http(port, "/metrics")[2].splitlines() if "_created" not in line)
    with legacy_tdes():
        kcv = kcv_tdes(STORED_ZPK).hex()[:6]
    secrets = [ZPK.hex(), CVK.hex(), STORED_ZPK.hex(), pin_block.hex(), zpk.decode(), cvk.decode()]
    secrets += [PAN, PAN[3:15], "zpk-metrics", kcv]
    for secret in secrets:
        assert secret.upper() not in page.upper(), "a secret value appears on /metrics"


def test_readyz_and_livez(metrics_proxy: RunningProxy) -> None:
    port = metrics_proxy.proxy.http_port
    assert _http(port, "/livez")[0] == 200
    assert _http(port, "/readyz")[0] == 200
    readiness = metrics_proxy.proxy.readiness
    assert readiness is not None
    readiness.draining = True
    try:
        status, _, body = _http(port, "/readyz")
        assert status == 503 and "draining" in body
        assert _http(port, "/livez")[0] == 200
    finally:
        readiness.draining = False
    checked = readiness.checked
    readiness.checked = lambda: False
    try:
        status, _, body = _http(port, "/readyz")
        assert status == 503 and "first health check" in body
    finally:
        readiness.checked = checked
    assert _http(port, "/readyz")[0] == 200


def test_a_broken_collector_answers_500_and_the_endpoint_survives() -> None:
    from hsmproxy.cluster.router import Router
    from hsmproxy.server.readiness import ReadinessServer

    def broken() -> bytes:
        raise RuntimeError("collector bug")

    async def go() -> tuple[bytes, bytes, bytes]:
        server = ReadinessServer(Router([]), broken, "text/plain")
        port = await server.start("127.0.0.1", 0)
        try:

            async def get(path: str) -> bytes:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                data = await reader.read()
                writer.close()
                await writer.wait_closed()
                return data

            return await get("/metrics"), await get("/livez"), await get("/metrics")
        finally:
            await server.stop()

    first, live, again = asyncio.run(go())
    assert first.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert first.endswith(b"metrics unavailable\n")
    assert live.startswith(b"HTTP/1.1 200 OK\r\n") and live.endswith(b"ok\n")
    assert again.startswith(b"HTTP/1.1 500 ")


def test_audit_families() -> None:
    from types import SimpleNamespace

    from hsmproxy.metrics import _LiveCollector

    assert list(_LiveCollector._audit(None)) == []
    sink = SimpleNamespace(sent=7, dropped=2, connects=3)
    audit = SimpleNamespace(
        written=10, dropped=1, checkpoints=5, refusals=11, waiting=4, unsealed=6, failing=True, sink=sink
    )
    values = {f.name: (f.type, f.samples[0].value) for f in _LiveCollector._audit(audit)}
    assert values == {
        "hsmproxy_audit_records_written": ("counter", 10.0),
        "hsmproxy_audit_records_dropped": ("counter", 1.0),
        "hsmproxy_audit_checkpoints": ("counter", 5.0),
        "hsmproxy_audit_refusals": ("counter", 11.0),
        "hsmproxy_audit_pending": ("gauge", 4.0),
        "hsmproxy_audit_unsealed": ("gauge", 6.0),
        "hsmproxy_audit_failing": ("gauge", 1.0),
        "hsmproxy_audit_syslog_sent": ("counter", 7.0),
        "hsmproxy_audit_syslog_dropped": ("counter", 2.0),
        "hsmproxy_audit_syslog_connects": ("counter", 3.0),
    }


def test_iso8583_families() -> None:
    from types import SimpleNamespace

    from hsmproxy.metrics import _LiveCollector

    assert list(_LiveCollector._iso(None)) == []
    stats = SimpleNamespace(translated=7, errors={"63": 2, "91": 1, "\x00?": 4})
    upstream = SimpleNamespace(connected=asyncio.Event())
    listener = SimpleNamespace(
        config=SimpleNamespace(tenant="default"), stats=stats, connections={1, 2}, upstream=upstream
    )
    fams = {f.name: f for f in _LiveCollector._iso(SimpleNamespace(listeners={"iso": listener}))}
    results = {s.labels["result"]: s.value for s in fams["hsmproxy_iso8583_messages"].samples}
    assert results == {"00": 7.0, "63": 2.0, "91": 1.0, "other": 4.0}
    assert fams["hsmproxy_iso8583_messages"].type == "counter"
    assert fams["hsmproxy_iso8583_connections"].samples[0].value == 2.0
    assert fams["hsmproxy_iso8583_upstream_up"].samples[0].value == 0.0


def test_iso8583_latency_histogram() -> None:
    from types import SimpleNamespace

    from hsmproxy.metrics import Metrics

    metrics = Metrics(SimpleNamespace(), ["CC"])  # type: ignore[arg-type]  # no proxy needed
    for seconds in (0.0004, 0.003, 0.003):
        metrics.observe_iso("iso", seconds)
    (hist,) = metrics.iso_latency.collect()
    assert hist.name == "hsmproxy_iso8583_latency_seconds" and hist.type == "histogram"
    assert _value(hist, "_count", listener="iso") == 3
    assert _value(hist, "_bucket", listener="iso", le="0.0005") == 1

