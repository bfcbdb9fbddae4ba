"""Key life-cycle operations run in every node worker.

``forget_keys``: destroy the worker's cached handles of working keys whose cryptogram (as presented,
or upper-cased) has a SHA-256 hex digest in ``digests`` — broadcast by the proxy to every node as soon
as a key is revoked, destroyed, suspended or its grace period ends, so no node keeps using it.
Answers ``00`` with ``dropped`` = the number of cache entries destroyed.
"""

from __future__ import annotations

from typing import Any

from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops.registry import OpResult, op


@op("forget_keys")
def forget_keys(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """Drop the cached handles of the keys whose cryptogram digests are in ``a["digests"]``."""
    dropped = backend.forget_key_digests(frozenset(str(d) for d in a["digests"]))
    return "00", {"dropped": str(dropped)}
