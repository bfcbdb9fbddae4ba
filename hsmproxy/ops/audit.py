"""Audit-chain MACs, computed inside a node with the token's audit key.

``audit_mac`` signs audit records with HMAC-SHA256 (PKCS#11 ``CKM_SHA256_HMAC``) under the generic
secret token object ``hsmproxy-audit:<key_id>`` (sensitive, non-extractable; created by the LMK
ceremony from a value, so it is the same on every node). The key never leaves the token.

Arguments: ``key_id`` (default ``"00"``), ``bodies`` (list of JSON texts: records without ``mac``)
and ``prev``:

- ``prev`` a hex MAC (chained mode, the audit writer): each body gets ``"prev"`` set to the running
  previous MAC, is canonicalised and MACed, and its MAC becomes the next ``prev`` — one round trip
  for a whole batch, in order.
- ``prev`` absent or empty (plain mode, ``hsmproxy audit verify``): each body is MACed as given
  (canonicalised; it already carries its own ``prev``).

Answers ``00`` with ``macs`` = the MACs as space-separated lowercase hex, in order; ``13`` when
the audit key is not loaded on this node; ``15`` when a body is not a JSON object.
"""

from __future__ import annotations

import json
from typing import Any

from pkcs11 import Mechanism

from hsmproxy.audit import AUDIT_KEY_LABEL, canonical
from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops.registry import OpResult, op


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
    for body in a["bodies"]:
        rec = _record(str(body))
        if prev:
            rec["prev"] = prev
        mac = bytes(key.sign(canonical(rec), mechanism=Mechanism.SHA256_HMAC)).hex()
        macs.append(mac)
        if prev:
            prev = mac
    return "00", {"macs": " ".join(macs)}
