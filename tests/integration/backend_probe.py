"""Run in a subprocess by test_backend_objects.py (one SoftHSM2 configuration per process).

``python -m tests.integration.backend_probe CONFIG`` opens the first node of CONFIG with the
worker's backend, brings a working key and an LMK in, replaces that LMK object from another
session (as a ceremony in another process would) and prints what it saw as one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from emulator.crypto.lmk import TEST_LMK, encrypt_key_under_lmk
from hsmproxy.backend import pkcs11_backend
from hsmproxy.backend.errors import DeviceError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.config import load_settings

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


if __name__ == "__main__":
    main(sys.argv[1])
