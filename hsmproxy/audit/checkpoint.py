"""Signed checkpoints of the audit trail, and the pinned public keys that verify them.

A checkpoint seals a **segment**: the records ``first`` .. ``last`` (by ``seq``) written since the
previous checkpoint. Its line, interleaved with the records after the last record it covers::

    {"alg":"ecdsa-p256-sha256","first":…,"kind":"checkpoint","last":…,"node":"node-a",
     "prev_checkpoint":"<hex>","root":"<hex>","sig":"<hex>","signer":"<hex>","size":…,"time":"…",
     "trail":"<hex>"}

* ``root``: the RFC 9162 Merkle tree hash over the leaf hashes of the segment's record lines;
  ``size`` = ``last - first + 1``.
* ``prev_checkpoint``: SHA-256 of the previous checkpoint's *statement* (64 zeros for the first), so
  checkpoints form a chain of their own across files; ``trail``: the trail's id (random, from its
  first ``open`` record), so a checkpoint of another trail does not fit.
* The **statement** is the canonical JSON of the checkpoint without ``sig``; ``sig`` is ECDSA P-256
  over SHA-256(statement), made inside an HSM node (``audit_sign``: PKCS#11 ``CKM_ECDSA`` on the
  digest) with that node's key ``hsmproxy-audit-sign:<key_id>``, which never leaves the token; hex of
  the raw ``r || s`` (32 + 32 bytes, as PKCS#11 returns it). ``signer`` is the SHA-256 of the key's
  DER SubjectPublicKeyInfo (hex), ``node`` the node that signed.

An auditor needs only the pinned public keys (a PEM file written by ``hsmproxy audit keys --out``)
to check every checkpoint offline: no HSM, no secret.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from hsmproxy.audit.form import canonical

ALGORITHM = "ecdsa-p256-sha256"
#: ``prev_checkpoint`` of a trail's first checkpoint.
NO_CHECKPOINT = "0" * 64


@dataclass(frozen=True, slots=True)
class Segment:
    """Records ``first`` .. ``last`` and the Merkle root over their leaf hashes, cut at ``time``."""

    first: int
    last: int
    root: bytes
    time: str

    @property
    def size(self) -> int:
        """How many records the segment holds."""
        return self.last - self.first + 1


def statement(trail: str, segment: Segment, prev_checkpoint: str, node: str, signer: str) -> dict[str, Any]:
    """The checkpoint's fields that are signed (everything but ``sig``)."""
    return {
        "kind": "checkpoint",
        "trail": trail,
        "first": segment.first,
        "last": segment.last,
        "size": segment.size,
        "root": segment.root.hex(),
        "prev_checkpoint": prev_checkpoint,
        "time": segment.time,
        "alg": ALGORITHM,
        "node": node,
        "signer": signer,
    }


def statement_bytes(checkpoint: dict[str, Any]) -> bytes:
    """The signed bytes of a checkpoint: its canonical JSON without ``sig``."""
    return canonical({k: v for k, v in checkpoint.items() if k != "sig"})


def statement_digest(checkpoint: dict[str, Any]) -> bytes:
    """SHA-256 of the statement: what the node signs and what the next checkpoint chains to."""
    return hashlib.sha256(statement_bytes(checkpoint)).digest()


def checkpoint_line(stmt: dict[str, Any], sig: str) -> bytes:
    """The line written for a signed statement."""
    return canonical({**stmt, "sig": sig})


def fingerprint(spki_der: bytes) -> str:
    """The ``signer`` name of a public key: SHA-256 of its DER SubjectPublicKeyInfo, hex."""
    return hashlib.sha256(spki_der).hexdigest()


class KeyFileError(ValueError):
    """A pinned-keys file cannot be read or holds something other than P-256 public keys."""


@dataclass(frozen=True)
class PinnedKeys:
    """The public keys an auditor trusts, by fingerprint."""

    keys: dict[str, ec.EllipticCurvePublicKey]

    @classmethod
    def load(cls, path: str | Path) -> PinnedKeys:
        """Read a PEM file of public keys (comment lines between the blocks are ignored)."""
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"{path}: cannot read pinned keys ({exc})") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, where: str = "pinned keys") -> PinnedKeys:
        """Parse PEM text of public keys."""
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        begin, end = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
        rest = text
        while begin in rest:
            start = rest.index(begin)
            stop = rest.find(end, start)
            if stop < 0:
                raise KeyFileError(f"{where}: a PEM block has no END line")
            block = rest[start : stop + len(end)]
            rest = rest[stop + len(end) :]
            try:
                key = serialization.load_pem_public_key(block.encode("ascii"))
            except ValueError:
                raise KeyFileError(f"{where}: a PEM block is not a public key") from None
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
                raise KeyFileError(f"{where}: only ECDSA P-256 keys sign checkpoints")
            der = key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            keys[fingerprint(der)] = key
        if not keys:
            raise KeyFileError(f"{where}: no public key in it")
        return cls(keys)

    @classmethod
    def from_der(cls, ders: Iterable[bytes]) -> PinnedKeys:
        """Keys from DER SubjectPublicKeyInfo values (e.g. as nodes report them)."""
        text = "".join(
            serialization.load_der_public_key(der)
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode("ascii")
            for der in ders
        )
        return cls.parse(text, "the nodes' keys")

    def verify(self, checkpoint: dict[str, Any]) -> str:
        """ "" when ``checkpoint``'s signature verifies under its pinned ``signer``, else why not."""
        signer = str(checkpoint.get("signer", ""))
        key = self.keys.get(signer)
        if key is None:
            return f"signer {signer[:16]}… is not a pinned key"
        if checkpoint.get("alg") != ALGORITHM:
            return f"unknown signature algorithm {str(checkpoint.get('alg'))[:32]!r}"
        try:
            raw = bytes.fromhex(str(checkpoint.get("sig", "")))
        except ValueError:
            return "the signature is not hex"
        if len(raw) != 64:
            return "the signature is not 64 bytes (r || s)"
        der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        try:
            key.verify(der, statement_digest(checkpoint), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        except InvalidSignature:
            return "the signature does not verify: the checkpoint was forged or changed"
        return ""


def pem_bundle(entries: list[tuple[str, str, bytes]]) -> str:
    """A pinned-keys file: ``(node, key id, DER SubjectPublicKeyInfo)`` entries, each with a comment."""
    out = [
        "# hsmproxy audit checkpoint signing keys: pin this file ([audit] trusted_keys, audit verify --keys)"
    ]
    for node, key_id, der in entries:
        key = serialization.load_der_public_key(der)
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        out.append(f"# node {node} key {key_id} signer {fingerprint(der)}")
        out.append(pem.decode("ascii").strip())
    return "\n".join(out) + "\n"


def parse_checkpoint(line: bytes) -> dict[str, Any] | None:
    """The checkpoint of a line, or None when the line is not a checkpoint."""
    if b'"kind":"checkpoint"' not in line:
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and rec.get("kind") == "checkpoint" else None
