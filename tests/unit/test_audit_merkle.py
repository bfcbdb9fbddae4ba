"""RFC 9162 Merkle trees of the audit trail (hsmproxy.audit.merkle).

Known answers: the reference test data that Certificate Transparency implementations test against,
from github.com/transparency-dev/merkle (the successor of the Merkle code of google/trillian and
google/certificate-transparency), commit 417fb0c314750d94e53942e9f92e79b6d35915db:
``testonly/constants.go`` (LeafInputs, NodeHashes, RootHashes, CompactTrees) and the inclusion and
consistency proof vectors that ``proof/verify_test.go`` held before commit bcba819 (the same proofs are
now its ``testdata/inclusion/*/happy-path.json`` and ``testdata/consistency/*/happy-path.json``). There
leaf numbers of the inclusion vectors count from 1; here they are 0-based indexes.

Properties check the module against naive recursive transcriptions of RFC 9162 sections 2.1.1, 2.1.3.1
and 2.1.4.1 written here, and, when ``pymerkle`` is installed, against pymerkle's InmemoryTree (whose
default mode hashes as RFC 9162).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmproxy.audit.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    MerkleFrontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_inclusion,
    root_of,
    verify_consistency,
    verify_inclusion,
)

h = bytes.fromhex

# -- known answers (transparency-dev/merkle, see the module docstring) ------------------------------

LEAF_INPUTS = [
    h(""),
    h("00"),
    h("10"),
    h("2021"),
    h("3031"),
    h("40414243"),
    h("5051525354555657"),
    h("606162636465666768696a6b6c6d6e6f"),
]
#: NodeHashes: the perfect subtrees of the 8-leaf tree, by level (0: the leaf hashes), left to right.
NODE_HASHES = [
    [
        h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
        h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
        h("0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7"),
        h("07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7"),
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        h("4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658"),
        h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
        h("46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1"),
    ],
    [
        h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
        h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
    ],
    [
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
    ],
    [h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")],
]
#: RootHashes: MTH of the first n leaves, n = 0..8.
ROOTS = [
    h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    h("aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"),
    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    h("4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"),
    h("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef"),
    h("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c"),
    h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
]
_N = NODE_HASHES
#: CompactTrees: the frontier (perfect-subtree roots, leftmost first) after n = 0..8 leaves.
COMPACT = [
    [],
    [_N[0][0]],
    [_N[1][0]],
    [_N[1][0], _N[0][2]],
    [_N[2][0]],
    [_N[2][0], _N[0][4]],
    [_N[2][0], _N[1][2]],
    [_N[2][0], _N[1][2], _N[0][6]],
    [_N[3][0]],
]
#: Inclusion vectors: (0-based leaf index, tree size, audit path).
INCLUSION = [
    (0, 1, []),
    (
        0,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        5,
        8,
        [
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (2, 3, [h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (
        1,
        5,
        [
            h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
]
#: Consistency vectors: (first size, second size, proof).
CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        6,
        8,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (
        2,
        5,
        [
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
    (
        6,
        7,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
]

REF_LEAVES = [leaf_hash(d) for d in LEAF_INPUTS]


# -- naive transcriptions of RFC 9162 section 2.1 (hashlib only, recursion on slices) ----------------


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def naive_mth(leaves: Sequence[bytes]) -> bytes:
    """MTH of leaf hashes, as section 2.1.1 defines it."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node(naive_mth(leaves[:k]), naive_mth(leaves[k:]))


def naive_path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of section 2.1.3.1."""
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if m < k:
        return [*naive_path(m, leaves[:k]), naive_mth(leaves[k:])]
    return [*naive_path(m - k, leaves[k:]), naive_mth(leaves[:k])]


def naive_directions(m: int, n: int) -> list[bool]:
    """For leaf m of a tree of n: per level from the leaf up, whether the sibling is on the right."""
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*naive_directions(m, k), True]
    return [*naive_directions(m - k, n - k), False]


def naive_consistency_shape(m: int, n: int, whole: bool = True) -> tuple[bool, list[bool]]:
    """How SUBPROOF(m, D[n], true) combines: whether its seed is the old root itself (omitted from the
    proof), and per proof element from the bottom up whether it is a left sibling (part of both trees)."""
    if m == n:
        return whole, []
    k = _split(n)
    if m <= k:
        seed, lefts = naive_consistency_shape(m, k, whole)
        return seed, [*lefts, False]
    seed, lefts = naive_consistency_shape(m - k, n - k, False)
    return seed, [*lefts, True]


def naive_subproof(m: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) of section 2.1.4.1."""
    n = len(leaves)
    if m == n:
        return [] if whole else [naive_mth(leaves)]
    k = _split(n)
    if m <= k:
        return [*naive_subproof(m, leaves[:k], whole), naive_mth(leaves[k:])]
    return [*naive_subproof(m - k, leaves[k:], False), naive_mth(leaves[:k])]


def _flip(value: bytes, bit: int) -> bytes:
    bit %= len(value) * 8
    out = bytearray(value)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _unique_leaves(n: int, salt: bytes = b"") -> list[bytes]:
    return [leaf_hash(salt + i.to_bytes(4, "big")) for i in range(n)]


# -- known-answer tests ---------------------------------------------------------------------------


def test_hashes_known_answers() -> None:
    assert NODE_HASHES[0] == REF_LEAVES
    assert ROOTS[0] == EMPTY_ROOT
    for level in range(1, 4):
        below = NODE_HASHES[level - 1]
        assert [node_hash(below[2 * i], below[2 * i + 1]) for i in range(len(below) // 2)] == NODE_HASHES[
            level
        ]


def test_roots_of_every_prefix() -> None:
    for n in range(9):
        assert root_of(REF_LEAVES[:n]) == ROOTS[n], n


def test_frontier_known_answers() -> None:
    frontier = MerkleFrontier()
    assert (frontier.size, frontier.nodes, frontier.root()) == (0, (), ROOTS[0])
    for n, leaf in enumerate(REF_LEAVES, 1):
        frontier.append(leaf)
        assert frontier.size == n
        assert list(frontier.nodes) == COMPACT[n], n
        assert frontier.root() == ROOTS[n], n
    frontier.reset()
    assert (frontier.size, frontier.nodes, frontier.root()) == (0, (), EMPTY_ROOT)
    frontier.extend(REF_LEAVES[:5])
    assert frontier.root() == ROOTS[5]
    twin = frontier.copy()
    twin.extend(REF_LEAVES[5:])
    assert (twin.size, twin.root()) == (8, ROOTS[8])
    assert (frontier.size, list(frontier.nodes), frontier.root()) == (5, COMPACT[5], ROOTS[5])


@pytest.mark.parametrize(("index", "size", "path"), INCLUSION)
def test_inclusion_known_answers(index: int, size: int, path: list[bytes]) -> None:
    assert inclusion_proof(REF_LEAVES[:size], index) == path
    assert verify_inclusion(REF_LEAVES[index], index, size, path, ROOTS[size])
    assert root_from_inclusion(REF_LEAVES[index], index, size, path) == ROOTS[size]


def test_inclusion_paths_of_the_full_tree() -> None:
    # every leaf of the 8-leaf tree: its siblings at levels 0, 1, 2 are NodeHashes entries
    for i in range(8):
        expected = [NODE_HASHES[0][i ^ 1], NODE_HASHES[1][(i >> 1) ^ 1], NODE_HASHES[2][(i >> 2) ^ 1]]
        assert inclusion_proof(REF_LEAVES, i) == expected
        assert verify_inclusion(REF_LEAVES[i], i, 8, expected, ROOTS[8])


@pytest.mark.parametrize(("first", "second", "path"), CONSISTENCY)
def test_consistency_known_answers(first: int, second: int, path: list[bytes]) -> None:
    assert consistency_proof(REF_LEAVES[:second], first) == path
    assert verify_consistency(first, second, path, ROOTS[first], ROOTS[second])


# -- argument checks ------------------------------------------------------------------------------


def test_values_that_are_not_leaf_hashes_are_refused() -> None:
    record = b'{"seq":1}'
    with pytest.raises(ValueError, match="leaf hash"):
        MerkleFrontier().append(record)
    with pytest.raises(ValueError, match="leaf hash"):
        root_of([REF_LEAVES[0], record])
    with pytest.raises(ValueError, match="leaf hash"):
        inclusion_proof([record], 0)
    with pytest.raises(ValueError, match="leaf hash"):
        consistency_proof([record, REF_LEAVES[0]], 1)
    assert not verify_inclusion(record, 0, 1, [], record)
    short = REF_LEAVES[1][:31]
    assert not verify_inclusion(REF_LEAVES[0], 0, 2, [short], ROOTS[2])
    assert not verify_consistency(1, 2, [short], ROOTS[1], ROOTS[2])


def test_proof_requests_out_of_range() -> None:
    for index in (-1, 8, 9):
        with pytest.raises(IndexError):
            inclusion_proof(REF_LEAVES, index)
    with pytest.raises(IndexError):
        inclusion_proof([], 0)
    for first in (-1, 0, 9):
        with pytest.raises(ValueError, match="consistency"):
            consistency_proof(REF_LEAVES, first)
    assert consistency_proof(REF_LEAVES, 8) == []


def test_inclusion_verification_rejects_impossible_numbers() -> None:
    leaf = REF_LEAVES[0]
    assert not verify_inclusion(leaf, 0, 0, [], EMPTY_ROOT)  # nothing is in the empty tree
    assert not verify_inclusion(leaf, 1, 1, [], leaf)  # index == size
    assert not verify_inclusion(leaf, -1, 1, [], leaf)
    assert root_from_inclusion(leaf, 0, 1, [leaf]) is None  # path longer than a 1-leaf tree's
    assert root_from_inclusion(leaf, 0, 2, []) is None  # path shorter than a 2-leaf tree's


def test_consistency_verification_edge_cases() -> None:
    assert verify_consistency(8, 8, [], ROOTS[8], ROOTS[8])
    assert not verify_consistency(8, 8, [], ROOTS[7], ROOTS[8])  # same size, different roots
    assert not verify_consistency(8, 8, [ROOTS[8]], ROOTS[8], ROOTS[8])  # same size, non-empty path
    assert not verify_consistency(0, 8, [], EMPTY_ROOT, ROOTS[8])  # RFC 9162 defines it for 0 < m only
    assert not verify_consistency(5, 4, [], ROOTS[5], ROOTS[4])
    for first in (3, 4, 6):  # an empty path for 0 < m < n (with and without the old root as its seed)
        assert not verify_consistency(first, 8, [], ROOTS[first], ROOTS[8])


# -- properties -----------------------------------------------------------------------------------

leaf_lists = st.lists(st.binary(max_size=48), max_size=300).map(
    lambda records: [leaf_hash(r) for r in records]
)


@settings(max_examples=60, deadline=None)
@given(leaf_lists)
def test_frontier_root_of_and_naive_mth_agree(leaves: list[bytes]) -> None:
    frontier = MerkleFrontier()
    for n, leaf in enumerate(leaves, 1):
        frontier.append(leaf)
        if n % 37 == 0 or n < 20:
            assert frontier.root() == root_of(leaves[:n])
        assert len(frontier.nodes) == n.bit_count()
    assert frontier.size == len(leaves)
    assert frontier.root() == root_of(leaves) == naive_mth(leaves)


def test_root_of_a_million_leaves_without_recursion() -> None:
    leaves = _unique_leaves(10**6)
    frontier = MerkleFrontier()
    frontier.extend(leaves)
    assert root_of(leaves) == frontier.root()


@settings(max_examples=60, deadline=None)
@given(leaf_lists.filter(bool), st.data())
def test_every_inclusion_proof_verifies(leaves: list[bytes], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(leaves) - 1), label="index")
    path = inclusion_proof(leaves, index)
    assert path == naive_path(index, leaves)
    assert verify_inclusion(leaves[index], index, len(leaves), path, naive_mth(leaves))


def test_inclusion_proofs_of_small_trees_exhaustively() -> None:
    for n in range(1, 40):
        leaves = _unique_leaves(n)
        root = naive_mth(leaves)
        for index in range(n):
            path = inclusion_proof(leaves, index)
            assert path == naive_path(index, leaves), (n, index)
            assert verify_inclusion(leaves[index], index, n, path, root), (n, index)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 300), st.data())
def test_tampered_inclusion_proofs_fail(n: int, data: st.DataObject) -> None:
    leaves = _unique_leaves(n, salt=b"tamper")  # distinct leaves: no other leaf can stand in for one
    index = data.draw(st.integers(0, n - 1), label="index")
    root = root_of(leaves)
    leaf = leaves[index]
    path = inclusion_proof(leaves, index)
    assert verify_inclusion(leaf, index, n, path, root)

    bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1), label="bit")
    assert not verify_inclusion(_flip(leaf, bit), index, n, path, root)
    assert not verify_inclusion(leaf, index, n, path, _flip(root, bit))
    if path:
        at = data.draw(st.integers(0, len(path) - 1), label="at")
        bad = list(path)
        bad[at] = _flip(bad[at], bit)
        assert not verify_inclusion(leaf, index, n, bad, root)
        assert not verify_inclusion(leaf, index, n, path[:-1], root)
        assert not verify_inclusion(leaf, index, n, path[1:], root)
    extra = data.draw(st.sampled_from([root, leaf, *path, EMPTY_ROOT]), label="extra")
    assert not verify_inclusion(leaf, index, n, [*path, extra], root)
    assert not verify_inclusion(leaf, index, n, [extra, *path], root)

    for other in {index - 1, index + 1, index ^ 1, data.draw(st.integers(-2, n + 2), label="other")}:
        if other != index:
            assert not verify_inclusion(leaf, other, n, path, root), other

    # An audit path does not fix the tree size: another size whose path to this index turns the same
    # way at every level (e.g. leaf 0 in sizes 3 and 4) computes the same root. Every other size fails.
    # The size is authenticated by the checkpoint signature over (size, root), not by the proof.
    shape = naive_directions(index, n)
    for size in {*range(max(0, n - 3), n + 4), data.draw(st.integers(0, 2 * n + 2), label="size")}:
        if size != n:
            same_shape = index < size and naive_directions(index, size) == shape
            assert verify_inclusion(leaf, index, size, path, root) is same_shape, size


def test_consistency_proofs_of_small_trees_exhaustively() -> None:
    for n in range(1, 40):
        leaves = _unique_leaves(n)
        roots = [root_of(leaves[:m]) for m in range(n + 1)]
        for m in range(1, n + 1):
            proof = consistency_proof(leaves, m)
            assert proof == naive_subproof(m, leaves, True), (m, n)
            assert verify_consistency(m, n, proof, roots[m], roots[n]), (m, n)


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 300), st.data())
def test_tampered_consistency_proofs_fail(n: int, data: st.DataObject) -> None:
    leaves = _unique_leaves(n, salt=b"consistency")
    m = data.draw(st.integers(1, n - 1), label="first")
    first_root, second_root = root_of(leaves[:m]), root_of(leaves)
    proof = consistency_proof(leaves, m)
    assert verify_consistency(m, n, proof, first_root, second_root)

    bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1), label="bit")
    assert not verify_consistency(m, n, proof, _flip(first_root, bit), second_root)
    assert not verify_consistency(m, n, proof, first_root, _flip(second_root, bit))
    at = data.draw(st.integers(0, len(proof) - 1), label="at")
    bad = list(proof)
    bad[at] = _flip(bad[at], bit)
    assert not verify_consistency(m, n, bad, first_root, second_root)
    assert not verify_consistency(m, n, proof[:-1], first_root, second_root)
    assert not verify_consistency(m, n, proof[1:], first_root, second_root)
    assert not verify_consistency(m, n, [*proof, second_root], first_root, second_root)
    assert not verify_consistency(m, n, [first_root, *proof], first_root, second_root)
    # Like an audit path, a consistency proof does not fix the sizes: other sizes whose proofs combine
    # the same way verify (the checkpoint signatures cover the sizes); every other pair fails.
    shape = naive_consistency_shape(m, n)
    other_first = data.draw(st.integers(0, n + 2), label="other first")
    other_second = data.draw(st.integers(0, 2 * n + 2), label="other second")
    for m2, n2 in {
        *((m + d, n) for d in (-2, -1, 1, 2)),
        *((m, n + d) for d in (-2, -1, 1, 2)),
        (m + 1, n + 1),
        *((m - (1 << j), n - (1 << j)) for j in range(m.bit_length())),  # the proof of a right subtree
        (other_first, n),
        (m, other_second),
        (other_first, other_second),
    }:
        if (m2, n2) != (m, n):
            expected = 0 < m2 <= n2 and naive_consistency_shape(m2, n2) == shape
            assert verify_consistency(m2, n2, proof, first_root, second_root) is expected, (m2, n2)
    # a different tree (one leaf changed) is not consistent with the old root
    changed = list(leaves)
    changed[data.draw(st.integers(0, m - 1), label="changed")] = leaf_hash(b"changed")
    assert not verify_consistency(m, n, consistency_proof(changed, m), first_root, root_of(changed))


# -- an independent implementation (optional) -----------------------------------------------------


def test_agrees_with_pymerkle() -> None:
    pymerkle = pytest.importorskip("pymerkle")
    for n in [*range(1, 66), 127, 128, 129, 300]:
        rng = random.Random(n)
        records = [rng.randbytes(rng.randrange(0, 48)) for _ in range(n)]
        tree = pymerkle.InmemoryTree(algorithm="sha256")  # default mode: 0x00 / 0x01 prefixes (RFC 9162)
        for record in records:
            tree.append_entry(record)
        leaves = [leaf_hash(r) for r in records]
        for size in range(n + 1):
            assert root_of(leaves[:size]) == tree.get_root(size), (n, size)
        for index in range(n):
            theirs = tree.prove_inclusion(index + 1)  # pymerkle counts leaves from 1
            # its path starts with the leaf hash itself, then the RFC 9162 audit path
            assert [leaves[index], *inclusion_proof(leaves, index)] == list(theirs.path), (n, index)
