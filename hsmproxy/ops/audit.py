"""Audit-chain MACs, computed inside a node with the token's audit key.

``audit_mac`` signs audit records with HMAC-SHA256 (PKCS#11 ``CKM_SHA256_HMAC``) under the generic
secret token object ``hsmproxy-audit:<key_id>`` (sensitive, non-extractable; created by the LMK
ceremony from a value, so it is the same on every node). The key never leaves the token.

Arguments: ``key_id`` (default ``"00"``), ``bodies`` (list of JSON texts: records without ``mac``)
and ``prev``:

- ``prev`` a hex MAC and ``slot`` (chained mode, the audit writer): each body is a record's canonical
  text without ``mac`` whose ``prev`` value is ``slot`` (64 hex digits); the slot is replaced by the
  running previous MAC, the text MACed as it is, and its MAC becomes the next ``prev`` — one round
  trip for a whole batch, in order, and no JSON work here. Without ``slot`` each body is parsed and
  gets ``"prev"`` set before it is canonicalised.
- ``prev`` absent or empty (plain mode, ``hsmproxy audit verify``): each body is MACed as given
  (canonicalised; it already carries its own ``prev``).

Answers ``00`` with ``macs`` = the MACs as space-separated lowercase hex, in order; ``13`` when
the audit key is not loaded on this node; ``15`` when a body is not a JSON object, or a slot is not
64 hex digits or not in a body once.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pkcs11 import Mechanism

from hsmproxy.audit import AUDIT_KEY_LABEL, canonical
from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops.registry import OpResult, op

_HEX64 = re.compile(r"[0-9a-f]{64}")


def _record(body: str) -> dict[str, Any]:
    try:
        rec = json.loads(body)
    except ValueError:
        raise BackendError("15", "audit body is not JSON") from None
    if not isinstance(rec, dict):
        raise BackendError("15", "audit body is not a JSON object")
    rec.pop("mac", None)
    return rec


@op("audit_mac")
def audit_mac(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """HMAC-SHA256 of each audit body under the token's audit key, chained when ``prev`` is given."""
    key = backend.lmk_object(f"{AUDIT_KEY_LABEL}:{a.get('key_id', '00')}")
    prev = str(a.get("prev") or "")
    macs = []
    slot = str(a.get("slot") or "")
    if prev and slot:
        if not _HEX64.fullmatch(slot) or not _HEX64.fullmatch(prev):
            raise BackendError("15", "audit slot or prev is not 64 hex digits")
        needle = f'"prev":"{slot}"'
        for body in a["bodies"]:
            text = str(body)
            if text.count(needle) != 1:
                raise BackendError("15", "audit body does not hold the prev slot once")
            prev = bytes(
                key.sign(text.replace(slot, prev, 1).encode("ascii"), mechanism=Mechanism.SHA256_HMAC)
            ).hex()
            macs.append(prev)
        return "00", {"macs": " ".join(macs)}
    for body in a["bodies"]:
        rec = _record(str(body))
        if prev:
            rec["prev"] = prev
        mac = bytes(key.sign(canonical(rec), mechanism=Mechanism.SHA256_HMAC)).hex()
        macs.append(mac)
        if prev:
            prev = mac
    return "00", {"macs": " ".join(macs)}
