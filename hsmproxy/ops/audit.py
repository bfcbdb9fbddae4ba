"""Audit-trail operations inside a node: checkpoint signatures, and MACs of version-1 trails.

**Checkpoint signing key** (trail format 2): an ECDSA P-256 key pair generated inside the token by
:func:`generate_signing_key` (``hsmproxy audit keys --generate``), labelled
``hsmproxy-audit-sign:<key_id>``: the private key is a sensitive, non-extractable token object that
can only sign; the public key is a token object too. Every node has its own pair.

* ``audit_sign`` (``key_id``, ``digest``: 64 hex = a SHA-256) answers ``sig`` = the raw ``r || s``
  signature (128 hex, PKCS#11 ``CKM_ECDSA`` over the digest) and ``signer`` = SHA-256 of the public
  key's DER SubjectPublicKeyInfo, so the writer can check which key signed.
* ``audit_pubkey`` (``key_id``) answers ``spki`` = the public key's DER SubjectPublicKeyInfo (hex).

Both answer ``13`` when the key pair is not on this node and ``15`` for a malformed digest.

**Version-1 trails** were HMAC-SHA256 chains under the generic secret ``hsmproxy-audit:<key_id>``
(created by ``lmk load``); ``audit_mac`` (``key_id``, ``bodies``: records without ``mac``, each with
its own ``prev``) recomputes their MACs for ``hsmproxy audit verify`` of an old file: ``macs`` = the
MACs as space-separated lowercase hex; ``15`` when a body is not a JSON object.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops.registry import OpResult, op

#: Label prefix of the version-1 audit HMAC key (``hsmproxy-audit:<key id>``).
AUDIT_KEY_LABEL = "hsmproxy-audit"
#: Label prefix of the checkpoint signing key pair (``hsmproxy-audit-sign:<key id>``).
AUDIT_SIGN_LABEL = "hsmproxy-audit-sign"

_HEX64 = re.compile(r"[0-9a-f]{64}")
#: (backend, module initialisation, label) -> (private key, signer fingerprint): handles die with a
#: re-initialisation of the module, so its count is part of the key.
_SIGNERS: dict[tuple[int, int, str], tuple[Any, str]] = {}


def sign_label(key_id: str) -> str:
    """The token label of a node's checkpoint signing key pair."""
    return f"{AUDIT_SIGN_LABEL}:{key_id}"


def _public_key(backend: Pkcs11Backend, label: str) -> Any:
    try:
        return backend.session.get_key(object_class=ObjectClass.PUBLIC_KEY, key_type=KeyType.EC, label=label)
    except pkcs11.NoSuchKey:
        raise BackendError("13", "the audit signing key is not on this node") from None


def public_key_der(backend: Pkcs11Backend, key_id: str) -> bytes:
    """The DER SubjectPublicKeyInfo of the node's signing key (``13`` when there is none)."""
    from pkcs11.util.ec import encode_ec_public_key

    return bytes(encode_ec_public_key(_public_key(backend, sign_label(key_id))))


def _signer(backend: Pkcs11Backend, key_id: str, fresh: bool = False) -> tuple[Any, str]:
    label = sign_label(key_id)
    cache_key = (id(backend), backend.module_reinits, label)
    found = None if fresh else _SIGNERS.get(cache_key)
    if found is None:
        try:
            private = backend.session.get_key(
                object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label=label
            )
        except pkcs11.NoSuchKey:
            raise BackendError("13", "the audit signing key is not on this node") from None
        found = (private, hashlib.sha256(public_key_der(backend, key_id)).hexdigest())
        _SIGNERS[cache_key] = found
    return found


@op("audit_sign")
def audit_sign(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """ECDSA P-256 signature of a checkpoint statement's SHA-256 with the node's signing key."""
    digest = str(a.get("digest", ""))
    if not _HEX64.fullmatch(digest):
        raise BackendError("15", "the digest is not 64 lowercase hex digits")
    key_id = str(a.get("key_id", "00"))
    private, signer = _signer(backend, key_id)
    try:
        sig = bytes(private.sign(bytes.fromhex(digest), mechanism=Mechanism.ECDSA))
    except (pkcs11.exceptions.ObjectHandleInvalid, pkcs11.exceptions.KeyHandleInvalid):
        private, signer = _signer(backend, key_id, fresh=True)  # the key pair was replaced on the token
        sig = bytes(private.sign(bytes.fromhex(digest), mechanism=Mechanism.ECDSA))
    return "00", {"sig": sig.hex(), "signer": signer}


@op("audit_pubkey")
def audit_pubkey(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """The node's checkpoint signing public key (DER SubjectPublicKeyInfo, hex)."""
    return "00", {"spki": public_key_der(backend, str(a.get("key_id", "00"))).hex()}


def generate_signing_key(backend: Pkcs11Backend, key_id: str, replace: bool = False) -> tuple[bool, bytes]:
    """Generate the node's signing key pair inside the token unless one exists (or ``replace``).

    Returns (generated, DER SubjectPublicKeyInfo). The private key is sensitive, non-extractable,
    sign-only, a private token object; nothing of it leaves the token.
    """
    from pkcs11.util.ec import encode_named_curve_parameters

    label = sign_label(key_id)
    existing = list(backend.session.get_objects({Attribute.LABEL: label}))
    if existing and not replace:
        return False, public_key_der(backend, key_id)
    for obj in existing:
        obj.destroy()
    params = backend.session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
    )
    params.generate_keypair(
        store=True,
        label=label,
        public_template={Attribute.VERIFY: True, Attribute.PRIVATE: False},
        private_template={
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.PRIVATE: True,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.DERIVE: False,
        },
    )
    return True, public_key_der(backend, key_id)


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@op("audit_mac")
def audit_mac(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """HMAC-SHA256 of each version-1 audit body (canonicalised) under the token's audit HMAC key."""
    key = backend.lmk_object(f"{AUDIT_KEY_LABEL}:{a.get('key_id', '00')}")
    macs = []
    for body in a["bodies"]:
        try:
            rec = json.loads(str(body))
        except ValueError:
            raise BackendError("15", "audit body is not JSON") from None
        if not isinstance(rec, dict):
            raise BackendError("15", "audit body is not a JSON object")
        rec.pop("mac", None)
        macs.append(bytes(key.sign(_canonical(rec), mechanism=Mechanism.SHA256_HMAC)).hex())
    return "00", {"macs": " ".join(macs)}
