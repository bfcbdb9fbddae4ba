"""Run in a subprocess by test_backend_objects.py (one SoftHSM2 configuration per process).

``python -m tests.integration.backend_probe CONFIG`` opens the first node of CONFIG with the
worker's backend, brings a working key and an LMK in, replaces that LMK object from another
session (as a ceremony in another process would) and prints what it saw as one JSON object.
``... CONFIG reinit`` churns a small key cache through the worker's own loop until the module is
re-initialised (SOFTHSM_REINIT_AFTER) and prints what it saw before and after.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import sys
import threading
from typing import Any

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from emulator.crypto.lmk import TEST_LMK, adjust_parity, encrypt_key_under_lmk
from hsmproxy.backend import pkcs11_backend
from hsmproxy.backend.errors import DeviceError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.backend.worker import serve
from hsmproxy.config import load_settings
from hsmproxy.ops.registry import OPS

ZPK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
LMK_00_01 = "hsmproxy-lmk:00:00:0:-"


def _attrs(obj: Any) -> dict[str, bool]:
    return {
        "token": bool(obj[Attribute.TOKEN]),
        "private": bool(obj[Attribute.PRIVATE]),
        "sensitive": bool(obj[Attribute.SENSITIVE]),
        "extractable": bool(obj[Attribute.EXTRACTABLE]),
    }


def _ecb(obj: Any) -> str:
    return bytes(obj.encrypt(bytes(8), mechanism=Mechanism.DES3_ECB)).hex().upper()


def main(config: str) -> None:
    """Print the facts as one JSON object."""
    node = load_settings(config).nodes[0]
    os.environ.update(node.env)
    pin = node.read_pin()
    backend = Pkcs11Backend(node.module, node.token_label, pin)
    out: dict[str, Any] = {}
    key = backend.variant_key("00", "06", 0, encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK))  # a ZPK
    out["working_key"] = _attrs(key)
    out["working_key_ecb_zeros"] = _ecb(key)
    lmk = backend.lmk_object(LMK_00_01)
    token_obj = next(iter(backend.session.get_objects({Attribute.LABEL: LMK_00_01})))
    out["lmk_handle"] = _attrs(lmk)
    out["lmk_token_object"] = _attrs(token_obj)
    out["lmk_same_answer"] = _ecb(lmk) == _ecb(token_obj)
    out["lmk_for_health_check"] = _attrs(backend.lmk_object(LMK_00_01, token=True))
    other = backend.session.token.open(rw=True)  # logged in already: login is per application
    for obj in other.get_objects({Attribute.LABEL: LMK_00_01}):
        obj.destroy()
    other.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.DES2,
            Attribute.VALUE: bytes.fromhex("0123456789ABCDEF0123456789ABCDEF"), Attribute.TOKEN: True,
            Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.LABEL: LMK_00_01,
        }
    )  # fmt: skip
    out["served_before_recheck"] = backend.lmk_object(LMK_00_01) is lmk
    pkcs11_backend.LMK_RECHECK = 0.0
    try:
        backend.lmk_object(LMK_00_01)
        out["after_recheck"] = "served"
    except DeviceError:
        out["after_recheck"] = "device error"
    print(json.dumps(out))


def _call(sock: socket.socket, message: Any) -> Any:
    data = pickle.dumps(message)
    sock.sendall(struct.pack("!i", len(data)) + data)
    head = sock.recv(4, socket.MSG_WAITALL)
    (n,) = struct.unpack("!i", head)
    return pickle.loads(sock.recv(n, socket.MSG_WAITALL))


def reinit(config: str) -> None:
    """Import a new ZPK per request through ``serve`` until the worker re-initialises the module."""
    node = load_settings(config).nodes[0]
    os.environ.update(node.env)
    backend = Pkcs11Backend(node.module, node.token_label, node.read_pin(), cache_size=8)
    out: dict[str, Any] = {"reinit_after_default": backend.reinit_after}
    backend.reinit_after = 60
    first = encrypt_key_under_lmk(TEST_LMK, "001", "U", ZPK)

    def import_key(b: Pkcs11Backend, a: dict[str, Any]) -> tuple[str, Any]:
        key = b.variant_key("00", "06", 0, a["cryptogram"])
        return "00", {"ecb": _ecb(key), "handle": int(key.handle), "cached": len(b._keys)}

    OPS["probe_import"] = import_key
    front, worker = socket.socketpair()
    t = threading.Thread(target=serve, args=(backend, worker.fileno(), node.read_pin))
    t.start()
    answers = [_call(front, [(0, "probe_import", {"cryptogram": first})])[0][2]]
    # the reply goes out before the worker re-initialises: the first answer with a lower handle
    # than the one before it came from the new module
    while len(answers) < 200 and (len(answers) < 2 or answers[-1]["handle"] > answers[-2]["handle"]):
        i = len(answers)
        value = adjust_parity(bytes.fromhex(f"{i:016X}{i + 1:016X}"))
        cryptogram = encrypt_key_under_lmk(TEST_LMK, "001", "U", value)
        answers.append(_call(front, [(i, "probe_import", {"cryptogram": cryptogram})])[0][2])
    answers.pop()
    after = _call(front, [(999, "probe_import", {"cryptogram": first})])[0][2]
    stats = _call(front, "stats")[1]
    data = pickle.dumps(None)
    front.sendall(struct.pack("!i", len(data)) + data)
    t.join(10)
    # objects made and destroyed without the cache (DUKPT, key-block keys) count as well
    backend.reinit_after = backend._newest_handle + 20
    due_before = backend.reinit_due()
    for _ in range(25):
        backend.create_session_key(adjust_parity(bytes(range(16)))).destroy()
    out["uncached_objects_counted"] = (due_before, backend.reinit_due())
    out.update(
        requests_until_reinit=len(answers), handles_before=[a["handle"] for a in answers],
        cached_before=answers[-1]["cached"], first_ecb=answers[0]["ecb"], after=after,
        module_reinits=stats["module_reinits"], worker_stopped=not t.is_alive(),
    )  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[2:] == ["reinit"]:
        reinit(sys.argv[1])
    else:
        main(sys.argv[1])
