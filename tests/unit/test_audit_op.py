"""The node's audit_mac operation: chained with a prev slot (the writer's form), and its refusals."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, cast

import pytest

from hsmproxy.audit import GENESIS, canonical
from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops.audit import audit_mac

KEY = bytes(range(32))
SLOT = "ab" * 32


class _Key:
    def sign(self, data: bytes, mechanism: Any = None) -> bytes:
        return hmac.new(KEY, data, hashlib.sha256).digest()


class _Backend:
    def lmk_object(self, label: str) -> _Key:
        assert label == "hsmproxy-audit:00"
        return _Key()


BACKEND = cast(Pkcs11Backend, _Backend())


def _body(n: int, prev: str) -> str:
    return canonical({"seq": n, "kind": "hostcmd", "result": "00", "prev": prev}).decode()


def test_slot_bodies_chain_like_records_with_their_prev_set() -> None:
    code, values = audit_mac(
        BACKEND, {"prev": GENESIS, "slot": SLOT, "bodies": [_body(0, SLOT), _body(1, SLOT)]}
    )
    assert code == "00"
    macs = values["macs"].split()
    # independently: HMAC over the canonical record with prev = the previous MAC
    first = hmac.new(KEY, _body(0, GENESIS).encode(), hashlib.sha256).hexdigest()
    second = hmac.new(KEY, _body(1, first).encode(), hashlib.sha256).hexdigest()
    assert macs == [first, second]
    # the same as the parsing form (no slot) gives
    plain_bodies = [json.dumps({"seq": 0, "kind": "hostcmd", "result": "00"})]
    assert audit_mac(BACKEND, {"prev": GENESIS, "bodies": plain_bodies})[1]["macs"] == first


@pytest.mark.parametrize(
    ("slot", "bodies"),
    [
        (SLOT, [_body(0, "cd" * 32)]),  # slot missing from the body
        (SLOT, [_body(0, SLOT).replace("}", f',"x":{{"prev":"{SLOT}"}}}}')]),  # twice
        ("XYZ", [_body(0, "XYZ")]),  # not 64 hex digits
    ],
)
def test_bodies_without_exactly_one_valid_slot_answer_15(slot: str, bodies: list[str]) -> None:
    with pytest.raises(BackendError) as err:
        audit_mac(BACKEND, {"prev": GENESIS, "slot": slot, "bodies": bodies})
    assert err.value.code == "15"
