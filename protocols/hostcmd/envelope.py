"""The host-command envelope: header, command code, error code and the optional trailer.

```
request : HEADER(m) | CMD(2) | data | [0x19 trailer]
response: HEADER echoed | RESP(2) | ERR(2) | data | [0x19 trailer echoed]
```
The 2-byte length prefix is handled by :mod:`protocols.framing`; this module sees payloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MAX_HEADER_LENGTH: Final = 255


class EnvelopeError(Exception):
    """A payload too short to hold the header and a command code (the frame is unusable)."""


@dataclass(frozen=True, slots=True)
class Request:
    """A framed host command split into its parts."""

    header: bytes
    code: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Response:
    """A framed host-command response split into its parts."""

    header: bytes
    code: str
    error: str
    body: bytes


def check_header_length(header_length: int) -> int:
    """Validate a configured header length (0..255) and return it."""
    if not 0 <= header_length <= MAX_HEADER_LENGTH:
        raise ValueError(f"header length must be 0..{MAX_HEADER_LENGTH}")
    return header_length


def split_request(payload: bytes, header_length: int) -> Request:
    """Split a request payload into header, 2-character command code and body.

    Raises:
        EnvelopeError: the payload is shorter than header + command code.
    """
    end = header_length + 2
    if len(payload) < end:
        raise EnvelopeError("frame shorter than header and command code")
    return Request(payload[:header_length], payload[header_length:end].decode("latin-1"), payload[end:])


def split_response(payload: bytes, header_length: int) -> Response:
    """Split a response payload into header, response code, error code and body.

    Raises:
        EnvelopeError: the payload is shorter than header + response code + error code.
    """
    end = header_length + 4
    if len(payload) < end:
        raise EnvelopeError("frame shorter than header, response code and error code")
    return Response(
        payload[:header_length],
        payload[header_length : header_length + 2].decode("latin-1"),
        payload[header_length + 2 : end].decode("latin-1"),
        payload[end:],
    )


def response_code(command_code: str) -> str:
    """The response code of a command: its second character incremented (``CC``→``CD``).

    ``Z`` wraps to ``A`` (``xZ``→``xA``) as payShield does.
    """
    if len(command_code) != 2:
        raise ValueError("command code must be 2 characters")
    second = command_code[1]
    if second == "Z":
        nxt = "A"
    elif second == "z":
        nxt = "a"
    else:
        nxt = chr((ord(second) + 1) & 0xFF)
    return command_code[0] + nxt


def build_request(header: bytes, code: str, body: bytes, trailer: bytes = b"") -> bytes:
    """Assemble a request payload (without the length prefix)."""
    return header + code.encode("latin-1") + body + trailer


def build_response(
    header: bytes, command_code: str, error: str, body: bytes = b"", trailer: bytes = b""
) -> bytes:
    """Assemble a response payload (without the length prefix) for ``command_code``."""
    return header + response_code(command_code).encode("latin-1") + error.encode("ascii") + body + trailer
