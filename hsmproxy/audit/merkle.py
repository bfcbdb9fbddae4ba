"""Merkle trees of the audit trail v2: RFC 9162 (Certificate Transparency v2) section 2.1, SHA-256.

Pure functions and one small class, no I/O. A checkpoint of the trail is the Merkle Tree Hash (MTH)
of the records written since the previous checkpoint::

    leaf_hash(record) = SHA-256(0x00 || record bytes)
    node_hash(l, r)   = SHA-256(0x01 || l || r)
    MTH({})           = SHA-256("")
    MTH({d0})         = leaf_hash(d0)
    MTH(D[n])         = node_hash(MTH(D[0:k]), MTH(D[k:n]))   k: the largest power of two < n

Everything below except :func:`leaf_hash` works on *leaf hashes* (32 bytes each), never on record
bytes: a list of records is turned into ``[leaf_hash(r) for r in records]`` first, and a value that is
not 32 bytes long is refused (passing record bytes where a leaf hash is meant would otherwise give a
root that no RFC 9162 verifier reproduces).

* :class:`MerkleFrontier` (a compact range): the writer's running root of the open segment, O(log n)
  memory, about one hash per append.
* :func:`root_of`, :func:`inclusion_proof` / :func:`verify_inclusion` (section 2.1.3) and
  :func:`consistency_proof` / :func:`verify_consistency` (section 2.1.4) over a whole segment.

Proof paths are lists of 32-byte hashes in the RFC's order (the sibling nearest the leaf first).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

#: Length of every hash here (SHA-256).
HASH_SIZE = 32
#: MTH of the empty list: SHA-256 of the empty string.
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """The RFC 9162 leaf hash of one record's bytes: SHA-256(0x00 || data)."""
    return _sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 9162 interior node hash of two child hashes: SHA-256(0x01 || left || right)."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def _check_leaves(leaves: Sequence[bytes]) -> None:
    if any(len(h) != HASH_SIZE for h in leaves):
        raise ValueError(f"leaves must be {HASH_SIZE}-byte leaf hashes (use leaf_hash on record bytes)")


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2): where RFC 9162 splits D[n]."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleFrontier:
    """The running Merkle Tree Hash of a growing list of leaf hashes (a "compact range").

    Holds the roots of the perfect subtrees that the leaves so far decompose into, largest (leftmost)
    first: one per set bit of :attr:`size`, so at most 64 hashes for any realistic segment. Appending a
    leaf pushes it and merges the two rightmost roots while they cover equal numbers of leaves (one hash
    per append on average); :meth:`root` folds the stack right to left (``popcount(size) - 1`` hashes).

    Cost, measured with timeit (CPython 3.11 on the 2-core dev machine, 1,000 appends to a new
    frontier): 0.58 µs per :meth:`append` of a precomputed leaf hash (a SHA-256 of 65 bytes alone is
    ~0.38 µs), 1.13 µs per 300-byte record including its :func:`leaf_hash`; :meth:`root` over 1,000
    leaves 2.2 µs. At the writer's ~20,000 records/s that is about 2 % of one core.
    """

    __slots__ = ("_nodes", "_size")

    def __init__(self) -> None:
        self._nodes: list[bytes] = []
        self._size = 0

    @property
    def size(self) -> int:
        """Number of leaves appended since creation or the last :meth:`reset`."""
        return self._size

    @property
    def nodes(self) -> tuple[bytes, ...]:
        """The perfect-subtree roots, leftmost (largest) first (RFC 6962 "compact tree" order)."""
        return tuple(self._nodes)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash (:func:`leaf_hash` of a record) at the right end."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf must be a {HASH_SIZE}-byte leaf hash (use leaf_hash on record bytes)")
        nodes = self._nodes
        n = self._size
        # each trailing 1 bit of the old size is a perfect subtree as large as the one being carried
        while n & 1:
            leaf = _sha256(_NODE_PREFIX + nodes.pop() + leaf).digest()
            n >>= 1
        nodes.append(leaf)
        self._size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        """Add leaf hashes in order (as :meth:`append` for each)."""
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        """MTH of all leaves appended so far (:data:`EMPTY_ROOT` when none)."""
        nodes = self._nodes
        if not nodes:
            return EMPTY_ROOT
        root = nodes[-1]
        for i in range(len(nodes) - 2, -1, -1):
            root = _sha256(_NODE_PREFIX + nodes[i] + root).digest()
        return root

    def copy(self) -> MerkleFrontier:
        """An independent frontier in the same state (to append a batch tentatively)."""
        twin = MerkleFrontier()
        twin._nodes = self._nodes.copy()
        twin._size = self._size
        return twin

    def reset(self) -> None:
        """Start a new, empty segment (after a checkpoint)."""
        self._nodes = []
        self._size = 0


def _mth(leaves: Sequence[bytes]) -> bytes:
    # Level by level, the odd node at the right end of a level moving up unchanged: the same tree as
    # the RFC's largest-power-of-two split, without recursion (10**6 leaves: ~10**6 hashes). zip() of
    # one iterator with itself yields consecutive pairs and leaves an odd last node out.
    if not leaves:
        return EMPTY_ROOT
    level = leaves
    while len(level) > 1:
        pairs = iter(level)
        upper = [
            _sha256(_NODE_PREFIX + left + right).digest() for left, right in zip(pairs, pairs, strict=False)
        ]
        if len(level) & 1:
            upper.append(level[-1])
        level = upper
    return level[0]


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH (RFC 9162 section 2.1.1) of a list of leaf hashes; :data:`EMPTY_ROOT` for none.

    Measured with timeit as :class:`MerkleFrontier`: 0.44 ms for 1,000 leaves, 0.49 s for 10**6.
    """
    _check_leaves(leaves)
    return _mth(leaves)


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path PATH(index, D[n]) of RFC 9162 section 2.1.3.1 for the leaf at ``index``.

    ``leaves`` are the tree's leaf hashes (n = ``len(leaves)``). Raises IndexError unless
    0 <= index < n. About n hashes in all.
    """
    _check_leaves(leaves)
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} is not in a tree of {len(leaves)} leaves")
    path: list[bytes] = []
    lo, hi = 0, len(leaves)
    while hi - lo > 1:  # descend from the root; the RFC lists the siblings from the leaf up
        mid = lo + _split(hi - lo)
        if index < mid:
            path.append(_mth(leaves[mid:hi]))
            hi = mid
        else:
            path.append(_mth(leaves[lo:mid]))
            lo = mid
    path.reverse()
    return path


def root_from_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes | None:
    """The root that ``path`` proves for leaf hash ``leaf`` at ``index`` in a tree of ``size``.

    RFC 9162 section 2.1.3.2 without the final comparison: None when the proof cannot be one for these
    numbers (index outside 0..size-1, a path too short or too long for them, or a value that is not a
    32-byte hash).
    """
    if not 0 <= index < size or len(leaf) != HASH_SIZE:
        return None
    fn, sn = index, size - 1
    node = leaf
    for sibling in path:
        if sn == 0 or len(sibling) != HASH_SIZE:  # sn == 0: already at the root, the path is too long
            return None
        if fn & 1 or fn == sn:
            node = node_hash(sibling, node)
            if not fn & 1:
                # the last node of its level and a left child: it moves up unchanged while it stays so
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            node = node_hash(node, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:  # the path ended below the root
        return None
    return node


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes) -> bool:
    """True when ``path`` proves leaf hash ``leaf`` at ``index`` in the tree of ``size`` leaves with
    root ``root`` (RFC 9162 section 2.1.3.2, every check of it)."""
    computed = root_from_inclusion(leaf, index, size, path)
    return computed is not None and computed == root


def consistency_proof(leaves: Sequence[bytes], first: int) -> list[bytes]:
    """PROOF(first, D[n]) of RFC 9162 section 2.1.4.1: the tree of the first ``first`` leaves is a
    prefix of the tree of all n = ``len(leaves)``. Raises ValueError unless 0 < first <= n (for
    first == n the proof is empty)."""
    _check_leaves(leaves)
    n = len(leaves)
    if not 0 < first <= n:
        raise ValueError(f"a consistency proof needs 0 < first <= {n}, not {first}")
    # SUBPROOF(m, D[lo:hi], whole) unrolled from the top; each step adds one hash at the end
    proof: list[bytes] = []
    lo, hi, m, whole = 0, n, first, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            proof.append(_mth(leaves[lo + k : hi]))
            hi = lo + k
        else:
            proof.append(_mth(leaves[lo : lo + k]))
            lo += k
            m -= k
            whole = False
    if not whole:
        proof.append(_mth(leaves[lo:hi]))
    proof.reverse()
    return proof


def verify_consistency(
    first: int, second: int, path: Sequence[bytes], first_root: bytes, second_root: bytes
) -> bool:
    """True when ``path`` proves the tree of ``first`` leaves with root ``first_root`` a prefix of the
    tree of ``second`` leaves with root ``second_root`` (RFC 9162 section 2.1.4.2, every check of it).

    Needs 0 < first <= second; first == second holds only with an empty path and equal roots.
    """
    if not 0 < first <= second:
        return False
    if len(first_root) != HASH_SIZE or len(second_root) != HASH_SIZE:
        return False
    if any(len(h) != HASH_SIZE for h in path):
        return False
    if first == second:
        return not path and first_root == second_root
    if not path:
        return False
    if first & (first - 1) == 0:  # a power of two: the old root is itself a node of the new tree
        path = [first_root, *path]
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root
