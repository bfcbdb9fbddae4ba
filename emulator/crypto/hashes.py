"""payShield hash identifiers (GM, EW, EY): ``01`` SHA-1, ``05`` SHA-224,
``06`` SHA-256, ``07`` SHA-384, ``08`` SHA-512. Unknown identifiers raise
:class:`CryptoError` ``15``."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes

from emulator.crypto.errors import CryptoError

__all__ = ["HASH_IDS", "digest", "hash_algorithm"]

#: Hash identifier -> ``cryptography`` hash class.
HASH_IDS: dict[str, type[hashes.HashAlgorithm]] = {
    "01": hashes.SHA1,
    "05": hashes.SHA224,
    "06": hashes.SHA256,
    "07": hashes.SHA384,
    "08": hashes.SHA512,
}


def hash_algorithm(hash_id: str) -> hashes.HashAlgorithm:
    """Return a ``cryptography`` hash instance for a payShield hash identifier."""
    cls = HASH_IDS.get(hash_id)
    if cls is None:
        raise CryptoError("15", "unsupported hash identifier")
    return cls()


def digest(hash_id: str, data: bytes) -> bytes:
    """Return the digest of ``data`` with the hash ``hash_id``."""
    h = hashes.Hash(hash_algorithm(hash_id))
    h.update(data)
    return h.finalize()
