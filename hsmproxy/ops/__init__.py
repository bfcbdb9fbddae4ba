"""Normalized payment operations, run inside node workers against PKCS#11 primitives."""

from __future__ import annotations


def load_all() -> None:
    """Import every operation module so that each registers its operations."""
    from hsmproxy.ops import audit, card, data, dukpt, emv, iso, keys, lifecycle, mac, pin, pin_lmk, rsa  # noqa: F401
