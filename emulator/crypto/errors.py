"""The one exception type of the emulator's crypto core.

Every failure is reported as a :class:`CryptoError` carrying the payShield
2-character error code that a host command should answer with. Messages are
for logs: they never contain key, PIN, PIN block or full PAN values.
"""

from __future__ import annotations

__all__ = ["CryptoError"]


class CryptoError(Exception):
    """A crypto operation failed; ``code`` is the payShield error code.

    Codes used by this package: ``01`` verification failure, ``04`` invalid
    key type code, ``10`` key parity, ``13`` invalid LMK identifier, ``14``
    PIN under LMK invalid, ``15`` invalid input data, ``20`` PIN block
    invalid, ``22`` invalid account number, ``23`` invalid PIN block format,
    ``24`` PIN length, ``25`` decimalisation table, ``26`` key scheme, ``27``
    key length, ``43`` RSA key generation, ``83`` key block format, ``84``
    key block check value (MAC) failure.
    """

    def __init__(self, code: str, message: str) -> None:
        """Create an error with the 2-character payShield ``code``."""
        if len(code) != 2:
            raise ValueError("error code must be 2 characters")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
