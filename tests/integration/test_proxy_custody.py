"""The front process never holds clear key material.

* The front process of ``hsmproxy serve`` never loads python-pkcs11 or a PKCS#11 library: only
  node workers do (checked in /proc/<pid>/maps of a real ``serve`` process and its children).
* What workers send back to the front carries no clear key: every reply of a run that uses known
  clear keys is scanned for those keys' bytes, raw and hex.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psec
import pytest

from emulator.crypto.cipher import legacy_tdes
from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk
from tests.integration.conftest import HsmClient
from tests.integration.proxy_env import RunningProxy, make_nodes

ZPK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
ZPK2 = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
TAK = bytes.fromhex("1C1C1C1C1C1C1C1C2A2A2A2A2A2A2A2A")
CVK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(x) for x in out.split()]


def _requests() -> list[bytes]:
    z1 = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK).encode()
    z2 = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK2).encode()
    tak = encrypt_key_under_lmk(TEST_LMK, "003", "U", TAK).encode()
    cvk = encrypt_key_under_lmk(TEST_LMK, "402", "U", CVK).encode()
    with legacy_tdes():
        block = bytes(
            psec.des.encrypt_tdes_ecb(ZPK, psec.pinblock.encode_pinblock_iso_0("1234", "4012345678909"))
        )
    return [
        b"CC" + z1 + z2 + b"12" + block.hex().upper().encode() + b"0101401234567890",
        b"JE" + z1 + block.hex().upper().encode() + b"01401234567890",
        b"BU011" + z1 + b";001",
        b"A0" + b"0001U",
        b"M6" + b"00111" + b"003" + tak + b"0010" + b"0123456789ABCDEF",
        b"CW" + cvk + b"4123456789012345;8701101",
        b"NC",
    ]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_front_process_never_loads_pkcs11(tmp_path: Path) -> None:
    config = make_nodes(tmp_path)
    port = _free_port()
    env = {**os.environ, "HSMPROXY_LISTEN": f"127.0.0.1:{port}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsmproxy.cli", "--log-level", "WARNING", "serve", "--config", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = None
        deadline = time.monotonic() + 60
        while client is None:
            try:
                client = HsmClient("127.0.0.1", port)
            except OSError:
                assert time.monotonic() < deadline, "proxy did not start"
                time.sleep(0.1)
        try:
            for request in _requests():
                assert client.call(request)[2:4] == b"00"
        finally:
            client.close()
        front = _maps(proc.pid)
        assert "libsofthsm2" not in front
        assert "_pkcs11" not in front  # python-pkcs11's extension module is never imported
        workers = [pid for pid in _children(proc.pid) if "libsofthsm2" in _maps(pid)]
        assert len(workers) == 2, "each node worker has loaded the PKCS#11 module"
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_worker_replies_carry_no_clear_key(running_proxy: RunningProxy) -> None:
    captured: list[Any] = []
    originals = {}
    for node in running_proxy.proxy.nodes:
        original = node._deliver
        originals[node] = original

        def spy(results: Any, _orig: Any = original) -> None:
            captured.append(results)
            _orig(results)

        node._deliver = spy  # type: ignore[method-assign]
    client = HsmClient("127.0.0.1", running_proxy.port)
    try:
        for _ in range(3):
            for request in _requests():
                assert client.call(request)[2:4] == b"00"
    finally:
        client.close()
        for node, original in originals.items():
            node._deliver = original  # type: ignore[method-assign]
    blob = repr(captured).encode()
    assert len(captured) > 0
    for key in (ZPK, ZPK2, TAK, CVK):
        for form in (key, key[:8], key[8:], key.hex().encode(), key.hex().upper().encode()):
            assert form not in blob
