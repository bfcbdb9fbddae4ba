"""Helpers of the audit-trail tests: a writer with a software signer, independent recomputation."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from hsmproxy.audit.form import HostcmdItem
from hsmproxy.audit.settings import AuditSettings
from hsmproxy.audit.signer import SoftwareSigner
from hsmproxy.audit.writer import AuditWriter

#: A fixed P-256 key for the tests' signer (not a secret of anything).
TEST_SIGNING_KEY = ec.derive_private_key(0x5EC2E7 * 0x1000193, ec.SECP256R1())


def item(i: int, command: str = "CC", result: str = "00", node: str = "node-a") -> HostcmdItem:
    """A host-command item as the dispatcher queues it."""
    return ("host", "default", "127.0.0.1:5000", command, result, 0.0015, b"%04d" % i, node, ())


class FailingDisk:
    """``os.fsync`` that fails with ``errno`` while :attr:`failing` (a disk error, disk full)."""

    def __init__(self, monkeypatch: Any, errno: int = 5, failing: bool = False) -> None:
        self.failing = failing
        self.errno = errno
        real = os.fsync

        def fsync(fd: int) -> None:
            if self.failing:
                raise OSError(self.errno, os.strerror(self.errno))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


def run_writer(
    path: Path,
    body: Callable[[AuditWriter], Awaitable[None]],
    signer: SoftwareSigner | None = None,
    **settings: Any,
) -> AuditWriter:
    """Start a writer on ``path``, run ``body``, stop it (a new event loop each call)."""
    settings.setdefault("linger", 0.0)

    async def main() -> AuditWriter:
        w = AuditWriter(AuditSettings(str(path), **settings), signer or SoftwareSigner(TEST_SIGNING_KEY))
        await w.start()
        try:
            await body(w)
        finally:
            await w.stop()
        return w

    return asyncio.run(main())


def write_records(path: Path, n: int, signer: SoftwareSigner | None = None, **settings: Any) -> AuditWriter:
    """``n`` host-command records in batches of 7."""

    async def body(w: AuditWriter) -> None:
        for i in range(n):
            w.hostcmd(item(i))
            if i % 7 == 6:  # batches of 7: segments are cut and files rotated at batch ends
                await w.flush()
                await asyncio.sleep(0.001)  # a signature comes back

    return run_writer(path, body, signer, **settings)


def lines(*paths: Path) -> list[bytes]:
    """Every line of the files, in order, without newlines."""
    out: list[bytes] = []
    for p in paths:
        out += p.read_bytes().splitlines()
    return out


def records(*paths: Path) -> list[dict[str, Any]]:
    """The records (not checkpoints) of the files, parsed."""
    return [r for r in (json.loads(x) for x in lines(*paths)) if "seq" in r]


def checkpoints(*paths: Path) -> list[dict[str, Any]]:
    """The checkpoints of the files, parsed."""
    return [r for r in (json.loads(x) for x in lines(*paths)) if r.get("kind") == "checkpoint"]


# -- independent recomputation (hashlib + cryptography only, not the code under test) ------------------


def leaf(line: bytes) -> bytes:
    """RFC 9162 leaf hash, written out."""
    return hashlib.sha256(b"\x00" + line).digest()


def mth(leaves: Sequence[bytes]) -> bytes:
    """RFC 9162 Merkle tree hash by its recursive definition."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def statement_of(cp: dict[str, Any]) -> bytes:
    """A checkpoint's signed bytes: canonical JSON without ``sig``."""
    body = {k: v for k, v in cp.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def signature_ok(cp: dict[str, Any], public: ec.EllipticCurvePublicKey) -> bool:
    """ECDSA P-256 over SHA-256(statement), raw r||s hex, checked with cryptography."""
    raw = bytes.fromhex(cp["sig"])
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public.verify(
            der, hashlib.sha256(statement_of(cp)).digest(), ec.ECDSA(utils.Prehashed(hashes.SHA256()))
        )
    except Exception:
        return False
    return True
