"""Incremental length-prefix framers: feed bytes, get whole frames.

Two prefixes are used on payment networks:

* ``binary2`` - 2-byte big-endian length (payShield host commands, most ISO 8583 links);
* ``ascii4`` - 4 ASCII decimal digits (some ISO 8583 links).

The length counts the payload only, never the prefix itself. A frame may arrive split over
several reads and several frames may arrive in one read; the framer handles both. A declared
length over ``max_frame`` is a broken stream (there is no way to resynchronise) and raises
:class:`FrameError`; the caller closes that connection only.
"""

from __future__ import annotations

from typing import Final, Literal

PrefixKind = Literal["binary2", "ascii4"]

#: Largest payload a 2-byte binary prefix can express.
MAX_BINARY2: Final = 0xFFFF
#: Largest payload a 4-digit ASCII prefix can express.
MAX_ASCII4: Final = 9999


class FrameError(Exception):
    """The byte stream cannot be framed (over-long or malformed length prefix)."""


class Framer:
    """Accumulates bytes and yields complete payloads.

    Args:
        max_frame: largest payload accepted (default 32768, or 9999 for ascii4); a larger
            declared length raises FrameError.
        prefix: ``"binary2"`` or ``"ascii4"``.
    """

    __slots__ = ("_ascii", "_buf", "_max", "_prefix_len")

    def __init__(self, max_frame: int | None = None, prefix: PrefixKind = "binary2") -> None:
        if prefix not in ("binary2", "ascii4"):
            raise ValueError(f"unknown length prefix {prefix!r}")
        limit = MAX_BINARY2 if prefix == "binary2" else MAX_ASCII4
        if max_frame is None:
            max_frame = min(32768, limit)
        if not 1 <= max_frame <= limit:
            raise ValueError(f"max_frame must be 1..{limit} for {prefix}")
        self._buf = bytearray()
        self._max = max_frame
        self._ascii = prefix == "ascii4"
        self._prefix_len = 4 if self._ascii else 2

    @property
    def buffered(self) -> int:
        """Number of bytes received but not yet returned as a frame."""
        return len(self._buf)

    def _declared_length(self) -> int:
        head = bytes(self._buf[: self._prefix_len])
        if self._ascii:
            if not head.isdigit():
                raise FrameError("length prefix is not 4 decimal digits")
            return int(head)
        return (head[0] << 8) | head[1]

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every payload now complete, in order.

        Raises:
            FrameError: a declared length exceeds the maximum frame size.
        """
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        plen = self._prefix_len
        while len(buf) >= plen:
            length = self._declared_length()
            if length > self._max:
                raise FrameError(f"declared frame length {length} exceeds limit {self._max}")
            end = plen + length
            if len(buf) < end:
                break
            frames.append(bytes(buf[plen:end]))
            del buf[:end]
        return frames


def encode_frame(payload: bytes, prefix: PrefixKind = "binary2") -> bytes:
    """Prefix ``payload`` with its length.

    Raises:
        ValueError: the payload is too long for the prefix kind.
    """
    n = len(payload)
    if prefix == "binary2":
        if n > MAX_BINARY2:
            raise ValueError("payload too long for a 2-byte length prefix")
        return n.to_bytes(2, "big") + payload
    if n > MAX_ASCII4:
        raise ValueError("payload too long for a 4-digit length prefix")
    return b"%04d" % n + payload
