"""What the worker's backend creates in the token: attributes of working keys and LMK handles.

Runs ``tests.integration.backend_probe`` in a subprocess (SoftHSM2 reads its configuration once per
process), against a fresh token with the test LMK.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from tests.integration.proxy_env import make_nodes

ZPK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")


def _run_probe(tmp: Path, *args: str) -> dict[str, Any]:
    config = make_nodes(tmp, ("node-a",))
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.backend_probe", str(config), *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run_probe(tmp_path_factory.mktemp("objects"))


def test_working_keys_are_sensitive_non_extractable_session_objects(probe: dict[str, Any]) -> None:
    # Not CKA_PRIVATE: a session object is this worker's alone; private costs SoftHSM2 a third more per op.
    assert probe["working_key"] == {"token": False, "private": False, "sensitive": True, "extractable": False}
    enc = Cipher(TripleDES(ZPK + ZPK[:8]), modes.ECB()).encryptor()
    assert probe["working_key_ecb_zeros"] == (enc.update(bytes(8)) + enc.finalize()).hex().upper()


def test_lmk_handles_are_session_copies_of_private_token_objects(probe: dict[str, Any]) -> None:
    sensitive = {"sensitive": True, "extractable": False}
    assert probe["lmk_token_object"] == {"token": True, "private": True, **sensitive}
    assert probe["lmk_handle"] == {"token": False, "private": True, **sensitive}
    assert probe["lmk_same_answer"] is True
    # the health check (NC) reaches the token object itself: a vanished token fails it
    assert probe["lmk_for_health_check"] == probe["lmk_token_object"]


def test_an_lmk_replaced_under_a_running_worker_is_a_device_fault_at_the_next_check(
    probe: dict[str, Any],
) -> None:
    assert probe["served_before_recheck"] is True
    assert probe["after_recheck"] == "device error"


def test_a_churning_worker_reinitialises_softhsm_and_keeps_answering(tmp_path: Path) -> None:
    # SoftHSM2 2.6 frees destroyed session objects only at C_Finalize; the worker re-initialises it
    # between batches once SOFTHSM_REINIT_AFTER objects were created (60 here, cache of 8 keys).
    r = _run_probe(tmp_path, "reinit")
    assert r["reinit_after_default"] == 100_000
    assert r["worker_stopped"] is True
    assert r["module_reinits"] == 1
    handles = r["handles_before"]
    assert handles == sorted(handles) and handles[-1] >= 60  # handles count objects ever created
    assert r["cached_before"] == 8  # the LRU stayed at its size: evicted keys were destroyed
    assert r["requests_until_reinit"] > 8
    enc = Cipher(TripleDES(ZPK + ZPK[:8]), modes.ECB()).encryptor()
    expected = (enc.update(bytes(8)) + enc.finalize()).hex().upper()
    assert r["first_ecb"] == expected
    # after: a fresh module (handle numbering restarted), the cache emptied (now the first request
    # served after the re-initialisation and this one), the same key's same answer
    assert r["after"] == {"ecb": expected, "handle": r["after"]["handle"], "cached": 2}
    assert r["after"]["handle"] < 20
    assert r["uncached_objects_counted"] == [False, True]
