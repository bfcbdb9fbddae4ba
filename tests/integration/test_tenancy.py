"""Tenant isolation through the proxy: LMKs (13), command allow-lists (17), connection and rate limits.

Tenant A (``bank-a``) owns LMKs 00/01 (the test LMKs), tenants B (``bank-b``, with an allow-list) and
C (``bank-c``, every command) own 02/03, loaded on the node with other values. A's keys sent by B or
C answer 13 or 17 when they name A's LMK, and never A's result when they do not.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest

from conformance.generators import GENERATORS, GenContext, generate
from emulator.app import TEST_KEYBLOCK_LMK
from emulator.crypto.keyblock import KeyBlockHeader, KeyBlockLmk, wrap_key_block
from emulator.crypto.lmk import TEST_LMK, VariantLmk, encrypt_key_under_lmk
from protocols.framing import encode_frame
from protocols.hostcmd.fields import format_fields
from protocols.hostcmd.table import COMMANDS
from tests.integration.conftest import HsmClient
from tests.integration.tenancy_env import (
    B_KEYBLOCK_LMK,
    B_LMK,
    TenancyProxy,
    client_from,
    tenancy_proxy,
)

CVK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
KB_CVK = bytes.fromhex("99999999999999998888888888888888")
CW_A = b"4123456789012345;8701101"  # VECTORS.md: CVV 561 with CVK
CW_KB = b"2222222222222222;3333111"  # VECTORS.md: CVV 361 with KB_CVK
#: Commands answered without a key: the same answer for every tenant is right.
KEYLESS = frozenset({"B2", "NO", "GM"})
#: Commands whose successful answer is random (a new key, PIN or key pair): compared elsewhere.
RANDOM = frozenset({"A0", "JA", "EI"})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenancyProxy]:
    """The tenancy proxy (one node, LMKs 00-03, uvloop)."""
    with tenancy_proxy(tmp_path_factory.mktemp("tenancy")) as tp:
        yield tp


def _client(env: TenancyProxy, listener: str) -> HsmClient:
    return HsmClient("127.0.0.1", env.ports[listener])


def _cvk(lmk: VariantLmk) -> bytes:
    return encrypt_key_under_lmk(lmk, "402", "U", CVK).encode()


def _kb_cvk(lmk: KeyBlockLmk, lmk_id: str) -> bytes:
    header = KeyBlockHeader("1", "C0", "T", "N", lmk_id=lmk_id)
    return b"S" + wrap_key_block(lmk, header, KB_CVK).encode()


def test_each_tenant_gets_results_under_its_own_lmks(env: TenancyProxy) -> None:
    a, b = _client(env, "host"), _client(env, "bank-b")
    try:
        assert a.call(b"NC") == b"ND007D22274C5745C5A11000-E000"  # LMK 00 (the test LMK)
        assert b.call(b"NC")[:4] == b"ND00"
        assert b.call(b"NC") != a.call(b"NC")  # B's default LMK is 02
        assert a.call(b"CW" + _cvk(TEST_LMK) + CW_A) == b"CX00561"
        assert b.call(b"CW" + _cvk(B_LMK) + CW_A) == b"CX00561"
        assert b.call(b"CW" + _cvk(B_LMK) + CW_A + b"%02") == b"CX00561"
        # S keys without %LL use the tenant's key-block LMK: 01 for A, 03 for B.
        assert a.call(b"CW" + _kb_cvk(TEST_KEYBLOCK_LMK, "01") + CW_KB) == b"CX00361"
        assert b.call(b"CW" + _kb_cvk(B_KEYBLOCK_LMK, "03") + CW_KB) == b"CX00361"
        assert b.call(b"CW" + _kb_cvk(B_KEYBLOCK_LMK, "03") + CW_KB + b"%03") == b"CX00361"
    finally:
        a.close()
        b.close()


def test_tenant_b_never_gets_a_result_from_tenant_a_keys(env: TenancyProxy) -> None:
    a, b = _client(env, "host"), _client(env, "bank-b")
    cvk_a, kb_a = _cvk(TEST_LMK), _kb_cvk(TEST_KEYBLOCK_LMK, "01")
    try:
        # Naming A's LMK: 13, for variant keys, key blocks, check values, verification and generation.
        assert b.call(b"CW" + cvk_a + CW_A + b"%00") == b"CX13"
        assert b.call(b"CW" + kb_a + CW_KB + b"%01") == b"CX13"
        assert b.call(b"CY" + cvk_a + b"561" + CW_A + b"%00") == b"CZ13"
        assert b.call(b"BU421" + cvk_a + b"%00") == b"BV13"
        assert b.call(b"A00002U%00") == b"A113"
        assert b.call(b"NC%00") == b"ND13"
        assert b.call(b"NC%01") == b"ND13"
        # Not naming it: B's own LMKs are used, and A's keys do not decrypt to A's values under them.
        for request, result in (
            (b"CW" + cvk_a + CW_A, b"CX00561"),
            (b"CW" + kb_a + CW_KB, b"CX00361"),
            (b"CY" + cvk_a + b"561" + CW_A, b"CZ00"),
            (b"BU421" + cvk_a, a.call(b"BU421" + cvk_a)),
        ):
            answer = b.call(request)
            print(request[:2].decode(), "A:", result, "B:", answer)
            assert answer != result
        # And the other way round: A cannot use B's LMKs or keys.
        assert a.call(b"CW" + _cvk(B_LMK) + CW_A + b"%02") == b"CX13"
        assert a.call(b"CW" + _kb_cvk(B_KEYBLOCK_LMK, "03") + CW_KB + b"%03") == b"CX13"
        assert a.call(b"CW" + _cvk(B_LMK) + CW_A) != b"CX00561"
        assert a.call(b"CW" + _kb_cvk(B_KEYBLOCK_LMK, "03") + CW_KB) != b"CX00361"
    finally:
        a.close()
        b.close()


def test_every_command_naming_another_tenants_lmk_answers_13(env: TenancyProxy) -> None:
    """Generated requests for every command with a ``%LL`` field, sent by tenant C (all commands allowed)."""
    a, c = _client(env, "host"), _client(env, "bank-c")
    ctx = GenContext()
    seen, compared = set(), 0
    try:
        for code in sorted(GENERATORS):
            if not any(getattr(f, "name", "") == "lmk_id" for f in _fields(COMMANDS[code].request)):
                assert code in KEYLESS | {"NO"}, code
                continue
            seen.add(code)
            for index in range(3):
                gen = generate(code, 20240, index, ctx)
                values = dict(gen.values)
                for foreign in ("00", "01"):
                    values["lmk_id"] = foreign
                    request = code.encode() + format_fields(COMMANDS[code].request, values)
                    assert c.call(request)[2:4] == b"13", (code, foreign)
                values.pop("lmk_id")
                request = code.encode() + format_fields(COMMANDS[code].request, values)
                answer_a = a.call(request)
                if code in KEYLESS | RANDOM or answer_a[2:4] != b"00":
                    continue
                assert c.call(request) != answer_a, code  # A's result is never C's answer
                compared += 1
    finally:
        a.close()
        c.close()
    print(f"{len(seen)} commands with %LL; {compared} successful tenant-A answers never repeated for C")
    assert len(seen) >= 30 and compared >= 20


def _fields(layout: tuple[object, ...]) -> Iterator[object]:
    """Every field of a layout, nested ones included."""
    for f in layout:
        yield f
        for attr in ("fields", "then", "otherwise"):
            sub = getattr(f, attr, None)
            if isinstance(sub, tuple):
                yield from _fields(sub)
        cases = getattr(f, "cases", None)
        if isinstance(cases, dict):
            for sub in cases.values():
                if isinstance(sub, tuple):
                    yield from _fields(sub)


def test_command_allow_list_answers_17(env: TenancyProxy) -> None:
    b, limited = _client(env, "bank-b"), _client(env, "limited")
    state = env.proxy.tenancy
    assert state is not None
    before = state.tenants["bank-b"].denied_commands
    try:
        assert b.call(b"JA40123456789004") == b"JB17"  # JA is not in bank-b's commands
        assert b.call(b"EI21024" + b"01") == b"EJ17"
        assert b.call(b"GM060000") == b"GN17"
        assert b.call(b"ZZ") == b"ZA68"  # an unknown command is still 68
        assert b.call(b"B20002ok") == b"B300ok"  # the connection stays usable
        assert limited.call(b"CW" + _cvk(TEST_LMK) + CW_A) == b"CX17"
        assert limited.call(b"B20002ok") == b"B300ok"
    finally:
        b.close()
        limited.close()
    assert state.tenants["bank-b"].denied_commands == before + 3


def test_source_address_picks_the_tenant_and_no_match_is_refused(
    env: TenancyProxy, caplog: pytest.LogCaptureFixture
) -> None:
    port = env.ports["strict"]  # a listener without a tenant of its own
    b = client_from("127.0.0.2", port)
    a = client_from("127.0.0.3", port)
    try:
        assert a.call(b"NC") == b"ND007D22274C5745C5A11000-E000"  # bank-a by 127.0.0.3
        assert b.call(b"NC%00") == b"ND13"  # bank-b by 127.0.0.2/32
        assert b.call(b"JA40123456789004") == b"JB17"
    finally:
        a.close()
        b.close()
    with caplog.at_level(logging.WARNING, logger="hsmproxy"):
        stranger = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            assert _closed_without_answer(stranger)
        finally:
            stranger.close()
    refused = [r.getMessage() for r in caplog.records if "refusing connection" in r.getMessage()]
    assert refused and "127.0.0.1" in refused[0] and "strict" in refused[0], refused


def test_tenant_connection_limit(env: TenancyProxy) -> None:
    port = env.ports["limited"]  # tenant "limited": max_connections = 2
    state = env.proxy.tenancy
    assert state is not None
    _wait_for(lambda: state.tenants["limited"].connections == 0)
    refused_before = state.tenants["limited"].refused_connections
    first, second = HsmClient("127.0.0.1", port), HsmClient("127.0.0.1", port)
    try:
        assert first.call(b"B20002ok") == b"B300ok"
        assert second.call(b"B20002ok") == b"B300ok"
        third = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            assert _closed_without_answer(third)  # refused: closed at once
        finally:
            third.close()
        assert first.call(b"B20002ok") == b"B300ok"
        assert state.tenants["limited"].refused_connections == refused_before + 1
        # Other tenants are not affected by this tenant's limit.
        other = HsmClient("127.0.0.1", env.ports["host"])
        assert other.call(b"B20002ok") == b"B300ok"
        other.close()
    finally:
        first.close()
    _wait_for(lambda: state.tenants["limited"].connections == 1)
    again = HsmClient("127.0.0.1", port)  # a slot is free again
    try:
        assert again.call(b"B20002ok") == b"B300ok"
    finally:
        again.close()
        second.close()


def test_rate_limit_delays_then_answers_41_and_the_connection_stays_usable(env: TenancyProxy) -> None:
    """Tenant "limited": 20 requests/s, burst 5, waits of up to 0.2 s; beyond that ``41``."""
    state = env.proxy.tenancy
    assert state is not None
    tenant = state.tenants["limited"]
    c = HsmClient("127.0.0.1", env.ports["limited"])
    try:
        time.sleep(0.5)  # the bucket refills to its burst
        delayed_before = tenant.rate_delayed
        # 8 requests: 5 from the burst, 3 wait for tokens (0.05 / 0.10 / 0.15 s): all served.
        c.send_raw(b"".join(encode_frame(b"%04dB20002ok" % i) for i in range(8)))
        assert [c.recv() for _ in range(8)] == [b"%04dB300ok" % i for i in range(8)]
        assert tenant.rate_delayed >= delayed_before + 3
        # 60 more at once: some wait, the rest are answered 41 at once, all in order.
        rejected_before = tenant.rate_rejected
        started = time.monotonic()
        c.send_raw(b"".join(encode_frame(b"%04dB20002ok" % i) for i in range(60)))
        answers = [c.recv() for _ in range(60)]
        print(f"60 pipelined requests over the rate answered in {time.monotonic() - started:.3f} s")
        assert [a[:4] for a in answers] == [b"%04d" % i for i in range(60)]
        codes = [a[6:8] for a in answers]
        assert set(codes) <= {b"00", b"41"}
        assert codes.count(b"41") >= 1 and tenant.rate_rejected == rejected_before + codes.count(b"41")
        print("served:", codes.count(b"00"), "rate limited (41):", codes.count(b"41"))
        time.sleep(0.5)
        assert c.call(b"B20002ok") == b"B300ok"  # usable again once tokens are back
    finally:
        c.close()


def _closed_without_answer(sock: socket.socket) -> bool:
    """Send a B2; True if the peer closes (EOF or reset) without answering it."""
    try:
        sock.sendall(encode_frame(b"0000B20002ok"))
        return sock.recv(10) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _wait_for(predicate: object, limit: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + limit
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert predicate()
