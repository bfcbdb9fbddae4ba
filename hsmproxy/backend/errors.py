"""Errors of the backend, importable without python-pkcs11."""

from __future__ import annotations

__all__ = ["BackendError", "DeviceError"]


class BackendError(Exception):
    """A primitive failed; ``code`` is the payShield error code to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class DeviceError(Exception):
    """The device (token, session, module) failed: the node is unhealthy, retry elsewhere."""
