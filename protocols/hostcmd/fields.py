"""Field kinds of payShield-style host commands, and the one generic parser/formatter.

A command layout is a tuple of field kinds (see ``table.py``). :func:`parse` walks the tuple over
the bytes after the command code; :func:`format_fields` walks it the other way. No command has
code of its own here: a layout is data.

Parsed values live in a flat ``dict[str, str | bytes]``: text fields as ``str`` (ASCII), raw
binary fields and counted messages as ``bytes``. Field names are unique within a layout.
Conditional parts (:class:`When`) look their condition up in the values parsed so far and then in
an optional context (a response layout uses the request's values as context).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

Values = dict[str, str | bytes]

TRAILER_START: Final = 0x19

HEX: Final = frozenset(string.hexdigits.upper().encode())
HEX_ANYCASE: Final = frozenset(string.hexdigits.encode())
NUM: Final = frozenset(string.digits.encode())
ALNUM: Final = frozenset((string.ascii_letters + string.digits).encode())
#: Printable ASCII except the delimiters that structure a host command.
PRINT: Final = frozenset(bytes(range(0x20, 0x7F)))
ANY: Final = frozenset(range(256))

_HEX_ANYCASE_BYTES: Final = bytes(sorted(HEX_ANYCASE))
_DELETABLE: dict[frozenset[int], bytes] = {}


def _deletable(charset: frozenset[int]) -> bytes:
    """The charset as a ``bytes.translate`` deletion table (cached per charset)."""
    table = _DELETABLE.get(charset)
    if table is None:
        table = _DELETABLE[charset] = bytes(sorted(charset))
    return table


#: Key scheme tag -> number of hex characters that follow (S and R carry their own length).
KEY_SCHEME_HEX_LENGTH: Final[Mapping[str, int]] = {
    "": 16,
    "Z": 16,
    "U": 32,
    "X": 32,
    "T": 48,
    "Y": 48,
}
KEY_BLOCK_SCHEMES: Final = frozenset("SR")
#: Schemes payShield never writes as a tag in front of a key it returns: a single-length key
#: (``Z``, ANSI X9.17, or the untagged ``0``) comes back as the bare 16 hex characters, while
#: ``U``/``T``/``X``/``Y`` (and the ``S``/``R`` blocks) keep theirs. ``Z`` + 16 hex stays a valid
#: *input* key field (:class:`Key` parses it).
UNTAGGED_OUTPUT_SCHEMES: Final = frozenset({"", "0", "Z"})


def output_key(scheme: str, hex_text: str) -> str:
    """A variant / X9.17 key field as a response carries it: ``scheme + hex``, or just the hex for
    a single-length key (schemes in :data:`UNTAGGED_OUTPUT_SCHEMES`)."""
    return hex_text if scheme in UNTAGGED_OUTPUT_SCHEMES else scheme + hex_text


class ParseError(Exception):
    """A field of a host command could not be parsed.

    ``code`` is the payShield error code the command answers with. The message names the field
    and the reason, never the field's value (it may be secret).
    """

    def __init__(self, code: str, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.code = code
        self.field_name = field_name
        self.reason = reason


class Field:
    """Base class of every field kind."""

    __slots__ = ()

    def parse(self, data: bytes, pos: int, out: Values, ctx: Mapping[str, str | bytes]) -> int:
        """Parse this field from ``data`` at ``pos`` into ``out``; return the new position."""
        raise NotImplementedError

    def format(
        self, values: Mapping[str, str | bytes], out: bytearray, ctx: Mapping[str, str | bytes]
    ) -> None:
        """Append this field's wire form, taken from ``values``, to ``out``."""
        raise NotImplementedError

    def names(self) -> tuple[str, ...]:
        """Names of the values this field produces."""
        return ()


def _text(values: Mapping[str, str | bytes], name: str) -> bytes:
    v = values[name]
    return v.encode("ascii") if isinstance(v, str) else v


@dataclass(frozen=True, slots=True)
class Fixed(Field):
    """A fixed-length text field (hex, numeric, alphanumeric or printable)."""

    name: str
    length: int
    charset: frozenset[int] = HEX
    error: str = "15"

    def parse(self, data: bytes, pos: int, out: Values, ctx: Mapping[str, str | bytes]) -> int:
        end = pos + self.length
        chunk = data[pos:end]
        if len(chunk) != self.length:
            raise ParseError(self.error, self.name, f"expected {self.length} characters")
        if chunk.translate(None, _deletable(self.charset)):  # any byte left is outside the charset
            raise ParseError(self.error, self.name, "invalid character")
        out[self.name] = chunk.decode("latin-1")
        return end

    def format(
        self, values: Mapping[str, str | bytes], out: bytearray, ctx: Mapping[str, str | bytes]
    ) -> None:
        raw = _text(values, self.name)
        if len(raw) != self.length:
            raise ValueError(f"{self.name}: must be {self.length} characters, got {len(raw)}")
        out += raw

    def names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class Binary(Field):
    """A fixed-length field of raw bytes (KQ's PAN, ATC, ARQC ...)."""

    name: str
    length: int
    error: str = "15"

    def parse(self, data: bytes, pos: int, out: Values, ctx: Mapping[str, str | bytes]) -> int:
        end = pos + self.length
        chunk = data[pos:end]
        if len(chunk) != self.length:
            raise ParseError(self.error, self.name, f"expected {self.length} bytes")
        out[self.name] = chunk
        return end

    def format(
        self, values: Mapping[str, str | bytes], out: bytearray, ctx: Mapping[str, str | bytes]
    ) -> None:
        raw = _text(values, self.name)
        if len(raw) != self.length:
            raise ValueError(f"{self.name}: must be {self.length} bytes")
        out += raw

    def names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class Key(Field):
    """A key: optional scheme tag then hex, or a key block (``S``/``R``) carrying its own length.

    The value keeps the scheme tag, e.g. ``"U0123…"``; a key with no tag is 16 hex characters
    (32 for the legacy double-length pairs some commands take untagged, e.g. CVK A + CVK B).
    Parsing accepts a single-length key with or without ``Z``; formatting writes the value as
    given (a request may carry ``Z``). A key a command *returns* is built with
    :func:`output_key`, which leaves the ``Z`` off as payShield does.
    Key blocks: the 16-character header after the tag gives the block length in characters
    (positions 1-4, decimal, excluding the tag).
    """

    name: str
    error: str = "15"
    schemes: str = "ZUTXYSR"
    allow_untagged: bool = True
    #: Hex length of an untagged key: 16, or 32 for legacy key pairs (CVK A+B, Visa PVK pair).
    untagged_length: int = 16

    def parse(self, data: bytes, pos: int, out: Values, ctx: Mapping[str, str | bytes]) -> int:
        if pos >= len(data):
            raise ParseError(self.error, self.name, "missing key")
        tag = chr(data[pos])
        if tag in KEY_BLOCK_SCHEMES and tag in self.schemes:
            header = data[pos + 1 : pos + 17]
            if len(header) != 16 or not header[1:5].isdigit():
                raise ParseError("A2" if tag == "S" else "15", self.name, "invalid key block header")
            length = int(header[1:5])
            end = pos + 1 + length
            if length < 16 or end > len(data):
                raise ParseError("A2" if tag == "S" else "15", self.name, "key block length")
            block = data[pos:end]
            if any(b not in PRINT for b in block):
                raise ParseError("A2" if tag == "S" else "15", self.name, "invalid character")
            out[self.name] = block.decode("ascii")
            return end
        if tag in KEY_SCHEME_HEX_LENGTH and tag:
            if tag not in self.schemes:
                raise ParseError("26", self.name, "key scheme not allowed here")
            n = KEY_SCHEME_HEX_LENGTH[tag]
            start = pos + 1
        elif data[pos] in HEX_ANYCASE:
            if not self.allow_untagged:
                raise ParseError("26", self.name, "key scheme required")
            n = self.untagged_length
            start = pos
        else:
            raise ParseError("26", self.name, "invalid key scheme")
        end = start + n
        chunk = data[start:end]
        if len(chunk) != n:
            raise ParseError(self.error, self.name, "key too short")
        if chunk.translate(None, _HEX_ANYCASE_BYTES):
            raise ParseError(self.error, self.name, "key is not hex")
        out[self.name] = data[pos:end].decode("ascii").upper()
        return end

    def format(
        self, values: Mapping[str, str | bytes], out: bytearray, ctx: Mapping[str, str | bytes]
    ) -> None:
        out += _text(values, self.name)

    def names(self) -> tuple[str, ...]:
        return (self.name,)


def _stops(b: int, terminators: bytes) -> bool:
    return b in terminators or b == TRAILER_START


@dataclass(frozen=True, slots=True)
class Delimited(Field):
    """Variable-length text ended by a delimiter, the trailer or the end of data.

    The delimiter itself is not consumed (a following :class:`Literal` or :class:`Opt` does).
    """

    name: str
    max_length: int
    min_length: int = 1
    terminators: bytes = b";"
    charset: frozenset[int] = NUM
    error: str = "15"

    def parse(self, data: bytes, pos: int, out: Values, ctx: Mapping[str, str | bytes]) -> int:
        end = pos
        limit = len(data)
        terms = self.terminators
        while end < limit and not _stops(data[end], terms):
            if data[end] not in self.charset:
                raise ParseError(self.error, self.name, "invalid character")
            end += 1
            if end - pos > self.max_length:
                raise ParseError(self.error, self.name, "too long")
        if end - pos < self.min_length:
            raise ParseError(self.error, self.name, "too short")
        out[self.name] = data[pos:end].decode("latin-1")
        return end

    def format(
        self, values: Mapping[str, str | bytes], out: bytearray, ctx: Mapping[str, str | bytes]
    ) -> None:
        raw = _text(values, self.name)
        if not self.min_length <= len(raw) <= self.max_length:
            raise ValueError(f"{self.name}: length out of range")
        out += raw

    def names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class Literal(Field):
    """A required constant, typically a delimiter such as ``;``."""

    text: bytes
    error: str = "15"

    def parse(self, data: bytes, pos: int, out: Values, ctx: Mapping[str, str | bytes]) -> int:
        end = pos + len(self.text)
        if data[pos:end] != self.text:
            raise ParseError(self.error, repr(self.text.decode("latin-1")), "delimiter missing")
        return end

    def format(
        self, values: Mapping[str, str | bytes], out: bytearray, ctx: Mapping[str, str | bytes]
    ) -> None:
        out += self.text


@dataclass(frozen=True, slots=True)
class Counted(Field):
    """A message whose length is given by an earlier field.

    ``length_of`` names the length field, read in ``base`` (16 for payShield's 4-hex lengths,
    10 for decimal). The count is in bytes of the decoded message; when ``hex_when`` names a
    field and one of its values, the wire carries the message hex-encoded (two characters per
    byte). The value is the raw wire bytes.
    """

    name: str
    length_of: str
    base: int = 16
    scale_field: str = ""
    scale_values: frozenset[str] = frozenset()
    error: str = "15"
    max_length: int = 32000
    #: The length field counts bits (EI's public exponent length): bytes = ceil(bits / 8).
    bits: bool = False

    def wire_length(self, values: Mapping[str, str | bytes], ctx: Mapping[str, str | bytes]) -> int:
        """Number of wire bytes the message occupies, from the length field."""
        raw = values.get(self.length_of, ctx.get(self.length_of))
        if raw is None:
            raise ParseError(self.error, self.name, "length field missing")
        text = raw if isinstance(raw, str) else raw.decode("latin-1")
        try:
            n = int(text, self.base)
        except ValueError:
            raise ParseError(self.error, self.name, "invalid length") from None
        if self.bits:
            n = (n + 7) // 8
        if self.scale_field:
            sv = values.get(self.scale_field, ctx.get(self.scale_field))
            if isinstance(sv, bytes):
                sv = sv.decode("latin-1")
            if sv in self.scale_values:
                n *= 2
        if n > self.max_length:
            raise ParseError("80", self.name, "data length")
        return n

    def parse(self, data: bytes, pos: int, out: Values, ctx: Mapping[str, str | bytes]) -> int:
        n = self.wire_length(out, ctx)
        end = pos + n
        if end > len(data):
            raise ParseError("80", self.name, "message shorter than its length field")
        out[self.name] = data[pos:end]
        return end

    def format(
        self, values: Mapping[str, str | bytes], out: bytearray, ctx: Mapping[str, str | bytes]
    ) -> None:
        out += _text(values, self.name)

    def names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class Der(Field):
    """An ASN.1 DER element (e.g. an RSA public key) whose length is in its own header."""

    name: str
    error: str = "15"

    def parse(self, data: bytes, pos: int, out: Values, ctx: Mapping[str, str | bytes]) -> int:
        if pos + 2 > len(data) or data[pos] != 0x30:
            raise ParseError(self.error, self.name, "not a DER sequence")
        first = data[pos + 1]
        if first < 0x80:
            hdr, length = 2, first
        else:
            nbytes = first & 0x7F
            if nbytes == 0 or nbytes > 3 or pos + 2 + nbytes > len(data):
                raise ParseError(self.error, self.name, "invalid DER length")
            hdr = 2 + nbytes
            length = int.from_bytes(data[pos + 2 : pos + hdr], "big")
        end = pos + hdr + length
        if end > len(data):
            raise ParseError(self.error, self.name, "DER element truncated")
        out[self.name] = data[pos:end]
        return end

    def format(
        self, values: Mapping[str, str | bytes], out: bytearray, ctx: Mapping[str, str | bytes]
    ) -> None:
        out += _text(values, self.name)

    def names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class Opt(Field):
    """An optional block introduced by ``prefix`` (``;``, ``%``, ``#``, ``&`` …).

    Parsing: present when the data at this point starts with the prefix. Formatting: present
    when ``values`` holds the block's first named field.
    """

    prefix: bytes
    fields: tuple[Field, ...]

    def parse(self, data: bytes, pos: int, out: Values, ctx: Mapping[str, str | bytes]) -> int:
        if not data.startswith(self.prefix, pos):
            return pos
        pos += len(self.prefix)
        for f in self.fields:
            pos = f.parse(data, pos, out, ctx)
        return pos

    def format(
        self, values: Mapping[str, str | bytes], out: bytearray, ctx: Mapping[str, str | bytes]
    ) -> None:
        first = next((n for f in self.fields for n in f.names()), None)
        if first is None or first not in values:
            return
        out += self.prefix
        for f in self.fields:
            f.format(values, out, ctx)

    def names(self) -> tuple[str, ...]:
        return tuple(n for f in self.fields for n in f.names())


@dataclass(frozen=True, slots=True)
class When(Field):
    """Fields present only when an earlier field (or the context) has one of ``values``."""

    field_name: str
    values: frozenset[str]
    fields: tuple[Field, ...]
    negate: bool = False

    def applies(self, current: Mapping[str, str | bytes], ctx: Mapping[str, str | bytes]) -> bool:
        """True when the condition holds for the values parsed so far (or the context).

        ``field_name`` may name several fields separated by ``|``: the condition holds when any
        of them has one of ``values``.
        """
        hit = False
        for name in self.field_name.split("|"):
            v = current.get(name, ctx.get(name))
            if isinstance(v, bytes):
                v = v.decode("latin-1")
            if v in self.values:
                hit = True
                break
        return hit != self.negate

    def parse(self, data: bytes, pos: int, out: Values, ctx: Mapping[str, str | bytes]) -> int:
        if self.applies(out, ctx):
            for f in self.fields:
                pos = f.parse(data, pos, out, ctx)
        return pos

    def format(
        self, values: Mapping[str, str | bytes], out: bytearray, ctx: Mapping[str, str | bytes]
    ) -> None:
        if self.applies(values, ctx):
            for f in self.fields:
                f.format(values, out, ctx)

    def names(self) -> tuple[str, ...]:
        return tuple(n for f in self.fields for n in f.names())


@dataclass(frozen=True, slots=True)
class Present(Field):
    """Fields present when the data has not ended (nor reached the trailer) at this point.

    For formatting, present when ``values`` holds the first named field. Used for trailing
    optional fields that have no introducing delimiter.
    """

    fields: tuple[Field, ...]
    #: Bytes that, found at this point, mean the optional fields are absent (e.g. ``%#&``).
    stops: bytes = b""

    def parse(self, data: bytes, pos: int, out: Values, ctx: Mapping[str, str | bytes]) -> int:
        if pos >= len(data) or data[pos] == TRAILER_START or data[pos] in self.stops:
            return pos
        for f in self.fields:
            pos = f.parse(data, pos, out, ctx)
        return pos

    def format(
        self, values: Mapping[str, str | bytes], out: bytearray, ctx: Mapping[str, str | bytes]
    ) -> None:
        first = next((n for f in self.fields for n in f.names()), None)
        if first is None or first not in values:
            return
        for f in self.fields:
            f.format(values, out, ctx)

    def names(self) -> tuple[str, ...]:
        return tuple(n for f in self.fields for n in f.names())


def key_algorithm(key_value: str | bytes | None) -> str:
    """Algorithm of a key field value: ``"A"`` for an AES key block, else ``"T"`` (TDES/DES)."""
    if isinstance(key_value, bytes):
        key_value = key_value.decode("latin-1")
    if key_value and key_value[0] in KEY_BLOCK_SCHEMES and len(key_value) > 8:
        return "A" if key_value[8] == "A" else "T"
    return "T"


@dataclass(frozen=True, slots=True)
class ByKeyAlgorithm(Field):
    """Hex whose length depends on an earlier key's algorithm (PIN block 16/32, KSN 20/24, IV 16/32)."""

    name: str
    key_field: str
    tdes_length: int
    aes_length: int
    error: str = "15"

    def length_for(self, values: Mapping[str, str | bytes], ctx: Mapping[str, str | bytes]) -> int:
        """The field length given the key found in ``values`` or ``ctx``."""
        key = values.get(self.key_field, ctx.get(self.key_field))
        return self.aes_length if key_algorithm(key) == "A" else self.tdes_length

    def parse(self, data: bytes, pos: int, out: Values, ctx: Mapping[str, str | bytes]) -> int:
        n = self.length_for(out, ctx)
        end = pos + n
        chunk = data[pos:end]
        if len(chunk) != n:
            raise ParseError(self.error, self.name, f"expected {n} characters")
        if chunk.translate(None, _HEX_ANYCASE_BYTES):
            raise ParseError(self.error, self.name, "invalid character")
        out[self.name] = chunk.decode("latin-1")
        return end

    def format(
        self, values: Mapping[str, str | bytes], out: bytearray, ctx: Mapping[str, str | bytes]
    ) -> None:
        n = self.length_for(values, ctx)
        Fixed(self.name, n, HEX, self.error).format(values, out, ctx)

    def names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class Parsed:
    """Result of :func:`parse`: field values and the trailer (``b""`` when absent)."""

    values: Values
    trailer: bytes = b""


def parse(layout: tuple[Field, ...], data: bytes, ctx: Mapping[str, str | bytes] | None = None) -> Parsed:
    """Parse ``data`` (everything after the command or error code) with ``layout``.

    A trailer (0x19 and what follows) after the last field is returned separately. Any other
    data left over is an unknown tail and raises ParseError code ``15``.
    """
    out: Values = {}
    c: Mapping[str, str | bytes] = ctx if ctx is not None else {}
    pos = 0
    for f in layout:
        pos = f.parse(data, pos, out, c)
    if pos == len(data):
        return Parsed(out)
    if data[pos] == TRAILER_START:
        return Parsed(out, data[pos:])
    raise ParseError("15", "<tail>", "unexpected data after the last field")


def format_fields(
    layout: tuple[Field, ...],
    values: Mapping[str, str | bytes],
    ctx: Mapping[str, str | bytes] | None = None,
) -> bytes:
    """Format ``values`` with ``layout`` into wire bytes (without code or trailer)."""
    out = bytearray()
    c: Mapping[str, str | bytes] = ctx if ctx is not None else {}
    for f in layout:
        f.format(values, out, c)
    return bytes(out)
