"""Who signs checkpoints: a node of the cluster (production), or a key in memory (tests).

:class:`NodeSigner` asks one node at a time, straight through its client (checkpoints are internal
work: never shed, never queued behind admission control): it learns each node's public key once
(``audit_pubkey``), names it in the statement, and has the node sign the statement's digest
(``audit_sign``). With pinned keys (``[audit] trusted_keys``) a node whose key is not pinned is never
asked to sign, so every checkpoint written verifies against the pins.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from hsmproxy.audit.checkpoint import PinnedKeys, fingerprint, statement_digest
from hsmproxy.logs import LogThrottle

log = logging.getLogger("hsmproxy.audit")

#: Builds the statement to sign for (node name, signer fingerprint).
MakeStatement = Callable[[str, str], dict[str, Any]]


class SignError(Exception):
    """No node could sign the checkpoint now (it is retried)."""


class Signer(Protocol):
    """Signs checkpoint statements."""

    async def sign(self, make: MakeStatement) -> tuple[dict[str, Any], str]:
        """The statement (built by ``make`` for the signing node and key) and its signature (hex r||s)."""
        ...


class SigningNode(Protocol):
    """What the signer needs of a node (:class:`~hsmproxy.backend.client.NodeClient`)."""

    @property
    def name(self) -> str:
        """Node name."""
        ...

    @property
    def up(self) -> bool:
        """True while the node's worker runs."""
        ...

    def submit(self, op: str, args: dict[str, Any]) -> asyncio.Future[tuple[str, Any]]:
        """Run an operation on this node."""
        ...


class NodeSigner:
    """Checkpoint signatures from the nodes' own keys (``hsmproxy-audit-sign:<key_id>``)."""

    def __init__(
        self,
        nodes: Callable[[], Sequence[SigningNode]],
        key_id: str,
        pinned: PinnedKeys | None = None,
        timeout: float = 2.0,
    ) -> None:
        #: The nodes to try, preferred first (the router's eligible nodes, then the others that are up).
        self.nodes = nodes
        self.key_id = key_id
        self.pinned = pinned
        self.timeout = timeout
        self.signers: dict[str, str] = {}  # node name -> fingerprint of its key
        #: The DER SubjectPublicKeyInfo of every key learned, by fingerprint (the console verifies the
        #: live trail with them when no keys are pinned).
        self.public_keys: dict[str, bytes] = {}
        self._quiet: dict[str, LogThrottle] = {}

    async def _ask(self, node: SigningNode, op: str, args: dict[str, Any]) -> dict[str, Any]:
        code, values = await asyncio.wait_for(node.submit(op, args), self.timeout)
        if code != "00":
            raise SignError(f"{op} answered {code} on node {node.name}")
        return dict(values)

    def _skip(self, node: str, why: str) -> None:
        throttle = self._quiet.setdefault(node, LogThrottle(60.0))
        if throttle.due() is not None:
            log.warning("audit: node %s does not sign checkpoints: %s", node, why)

    async def signer_of(self, node: SigningNode) -> str:
        """The fingerprint of ``node``'s signing key (asked once, then remembered)."""
        known = self.signers.get(node.name)
        if known is None:
            spki = bytes.fromhex(
                str((await self._ask(node, "audit_pubkey", {"key_id": self.key_id}))["spki"])
            )
            known = self.signers[node.name] = fingerprint(spki)
            self.public_keys[known] = spki
        return known

    async def learn(self) -> dict[str, bytes]:
        """Ask every node that is up for its public key (those that answer); :attr:`public_keys`."""
        for node in self.nodes():
            if node.up:
                try:
                    await self.signer_of(node)
                except Exception as exc:  # no key on that node, node busy: the others may answer
                    self._skip(node.name, f"no public key ({type(exc).__name__})")
        return dict(self.public_keys)

    async def sign(self, make: MakeStatement) -> tuple[dict[str, Any], str]:
        """Try each node until one signs; :class:`SignError` when none can."""
        last = "no node is up"
        for node in self.nodes():
            if not node.up:
                continue
            try:
                signer = await self.signer_of(node)
                if self.pinned is not None and signer not in self.pinned.keys:
                    self._skip(node.name, f"its key {signer[:16]}… is not in [audit] trusted_keys")
                    last = "no node with a pinned key is up"
                    continue
                stmt = make(node.name, signer)
                digest = statement_digest(stmt).hex()
                values = await self._ask(node, "audit_sign", {"key_id": self.key_id, "digest": digest})
                if values.get("signer") != signer:  # the key pair was replaced: learn it again
                    self.signers.pop(node.name, None)
                    last = f"node {node.name}'s signing key changed"
                    continue
                return stmt, str(values["sig"])
            except (SignError, TimeoutError, KeyError, ValueError) as exc:
                last = str(exc) or type(exc).__name__
            except Exception as exc:  # the node went down under the request (NodeDown) and the like
                last = f"node {node.name}: {type(exc).__name__}"
        raise SignError(last)


class SoftwareSigner:
    """Signs with a P-256 key in memory: unit tests and tools only (the key is not in an HSM)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | None = None, node: str = "software") -> None:
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        self.node = node
        self.der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.signer = fingerprint(self.der)
        #: False: every sign() fails (a test of an unreachable signer).
        self.available = True
        self.signed = 0

    async def sign(self, make: MakeStatement) -> tuple[dict[str, Any], str]:
        """Sign like a node would: ECDSA over the statement digest, raw r||s hex."""
        if not self.available:
            raise SignError("the software signer is switched off")
        stmt = make(self.node, self.signer)
        der = self.key.sign(statement_digest(stmt), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        r, s = utils.decode_dss_signature(der)
        self.signed += 1
        return stmt, (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()

    def pinned(self) -> PinnedKeys:
        """The pinned-keys view of this signer's public key."""
        return PinnedKeys({self.signer: self.key.public_key()})
