"""Listener behaviour: pipelined order under backpressure, connection limit, bad frames, LMK CLI."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from hsmproxy.config import load_settings
from hsmproxy.keys.lmk import kcv_tdes, prompt_components
from protocols.framing import encode_frame
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import RunningProxy, start_proxy


def test_pipelined_requests_come_back_in_order_through_backpressure(proxy_config: Path) -> None:
    settings = load_settings(proxy_config)
    settings = replace(
        settings, listeners=(replace(settings.listeners[0], max_inflight=4, max_connections=2),)
    )
    rp = start_proxy(settings)
    try:
        c = HsmClient("127.0.0.1", rp.port)
        try:
            # 300 requests in one write, mixing node work (NC) and front-only answers (B2, bad fields):
            # with at most 4 in flight the connection is paused and resumed many times.
            wire = b""
            expected = []
            for i in range(300):
                header = b"%04d" % i
                if i % 3 == 0:
                    wire += encode_frame(header + b"NC")
                    expected.append(header + b"ND007D22274C5745C5A11000-E000")
                elif i % 3 == 1:
                    wire += encode_frame(header + b"B20004" + header)
                    expected.append(header + b"B300" + header)
                else:
                    wire += encode_frame(header + b"CCQ")
                    expected.append(header + b"CD26")
            c.send_raw(wire)
            assert [c.recv() for _ in range(300)] == expected
        finally:
            c.close()
        deadline = time.monotonic() + 10
        while rp.proxy.connections and time.monotonic() < deadline:
            time.sleep(0.01)  # the closed connection is forgotten
        # The connection limit (2) refuses a third connection at once; the first two still work.
        a, b = HsmClient("127.0.0.1", rp.port), HsmClient("127.0.0.1", rp.port)
        assert a.call(b"B20002ok") == b"B300ok"
        assert b.call(b"B20002ok") == b"B300ok"
        third = socket.create_connection(("127.0.0.1", rp.port), timeout=10)
        try:
            assert third.recv(10) == b""  # closed by the proxy
            assert a.call(b"B20002ok") == b"B300ok"
            assert b.call(b"B20002ok") == b"B300ok"
        finally:
            third.close()
            a.close()
            b.close()
    finally:
        rp.stop()


def test_broken_frames_close_only_their_connection(running_proxy: RunningProxy) -> None:
    good = HsmClient("127.0.0.1", running_proxy.port)
    try:
        for junk in (b"\x00\x03abc", b"\xff\xff" + b"x" * 10):  # shorter than header + code; over the limit
            bad = socket.create_connection(("127.0.0.1", running_proxy.port), timeout=10)
            try:
                bad.sendall(junk)
                assert bad.recv(100) == b""
            finally:
                bad.close()
            assert good.call(b"NO00")[:4] == b"NP00"
    finally:
        good.close()


def test_lmk_list_shows_check_values(proxy_config: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hsmproxy.cli", "lmk", "list", "--config", str(proxy_config)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    lines = sorted(line.split("\t") for line in out.strip().splitlines())
    assert lines == [
        ["node-a", "00", "variant", "7D22274C5745C5A1"],
        ["node-a", "01", "keyblock", "DB3FB663EE8D2B66"],
        ["node-b", "00", "variant", "7D22274C5745C5A1"],
        ["node-b", "01", "keyblock", "DB3FB663EE8D2B66"],
    ]


def test_components_are_xored_and_only_check_values_printed(capsys: object) -> None:
    typed = iter(["0123456789ABCDEF FEDCBA9876543210", "0000000000000000 0000000000000001"])
    result = prompt_components(2, 16, ask=lambda _prompt: next(typed))
    assert result == bytes.fromhex("0123456789ABCDEFFEDCBA9876543211")
    printed = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "0123456789ABCDEF" not in printed
    assert (
        f"component 1 check value: {kcv_tdes(bytes.fromhex('0123456789ABCDEFFEDCBA9876543210'))[:6]}"
        in printed
    )


def test_every_answered_command_reaches_the_observers_once_in_order(proxy_config: Path) -> None:
    from hsmproxy.server.hostcmd import CommandRecord

    records: list[CommandRecord] = []
    rp = start_proxy(load_settings(proxy_config), observers=[records.append])
    try:
        c = HsmClient("127.0.0.1", rp.port, header=b"H001")
        try:
            assert c.call(b"NC")[:4] == b"ND00"  # node command
            assert c.call(b"B20002ok") == b"B300ok"  # answered by the front
            assert c.call(b"CCQ") == b"CD26"  # field error
            assert c.call(b"ZZ") == b"ZA68"  # unknown command
        finally:
            c.close()
    finally:
        rp.stop()
    assert [(r.command, r.error) for r in records] == [("NC", "00"), ("B2", "00"), ("CC", "26"), ("ZZ", "68")]
    assert all(r.header == b"H001" and r.listener == "host" and r.tenant == "default" for r in records)
    assert all(r.peer.startswith("127.0.0.1:") and r.latency >= 0 for r in records)
