"""ISO 8583 codec helpers on pyiso8583: specs, field offsets, response MTIs, log-safe summaries.

Specs (``spec`` of a listener):

* ``ascii`` (default): pyiso8583's ``default_ascii`` (ISO 8583:1987, every field ASCII: hex bitmaps,
  field 52 as 16 hex characters, fields 64/128 as 16 hex characters) with one change: field 53
  is LLVAR (up to 48 characters) so it can carry a DUKPT KSN in hex (20 characters TDES, 24 AES);
* ``binary``: pyiso8583's ``default`` (binary bitmaps, fields 52, 55, 64, 96 and 128 binary) with
  field 53 as a binary LLVAR (up to 24 bytes, ASCII length) for the KSN;
* ``bcd``: ``binary`` with the numeric fields (2-26, 32, 33, 70, 100) packed BCD (lengths BCD);
* a ``.json`` or ``.toml`` file: either a whole pyiso8583 spec (``t``, ``p`` and fields), or
  ``base = "ascii"|"binary"|"bcd"`` plus a ``fields`` table of per-field overrides.

Field 55 (ICC data) is decoded as BER-TLV (pyemv) only to list its tags; values are never kept.
Fields 2 (masked 6+4), 35, 45, 52 and 55 never appear in summaries (:func:`summary`).
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import iso8583
from iso8583.specs import default as _binary_spec
from iso8583.specs import default_ascii as _ascii_spec
from pyemv import tlv

Spec = dict[str, dict[str, Any]]
Fields = dict[str, str]
Encoded = dict[str, dict[str, bytes]]

#: Fields never logged, never in errors or audit records (2 only masked 6+4).
SENSITIVE = frozenset({"2", "35", "45", "52", "55"})
#: Fields a summary or an echo may show as they are.
SAFE_IDS = ("11", "37", "41", "32", "33", "100", "70", "39")
_NUMERIC_FIXED = ("3", "4", "5", "6", "7", "9", "10", "11", "12", "13", "14", "15", "16", "18", "19",
                  "20", "21", "22", "23", "24", "25", "26", "70")  # fmt: skip
_NUMERIC_VAR = ("2", "32", "33", "100")
BUILTIN_SPECS = ("ascii", "binary", "bcd")


class SpecError(ValueError):
    """A spec name or file that cannot be used."""


def _builtin(name: str) -> Spec:
    if name in ("ascii", "ascii1987", "default_ascii"):
        spec: Spec = copy.deepcopy(dict(_ascii_spec))
        spec["53"] = {"data_enc": "ascii", "len_enc": "ascii", "len_type": 2, "max_len": 48,
                      "desc": "Security-Related Control Information (KSN)"}  # fmt: skip
        return spec
    if name in ("binary", "bcd"):
        spec = copy.deepcopy(dict(_binary_spec))
        spec["53"] = {"data_enc": "b", "len_enc": "ascii", "len_type": 2, "max_len": 24,
                      "desc": "Security-Related Control Information (KSN)"}  # fmt: skip
        if name == "bcd":
            for f in _NUMERIC_FIXED:
                spec[f] = {**spec[f], "data_enc": "b", "len_count": "nibbles", "left_pad": "0"}
            for f in _NUMERIC_VAR:
                spec[f] = {**spec[f], "data_enc": "b", "len_enc": "bcd", "len_type": 1,
                           "len_count": "nibbles", "left_pad": "0"}  # fmt: skip
        return spec
    raise SpecError(f"unknown spec {name!r} (built in: {', '.join(BUILTIN_SPECS)}, or a .json/.toml file)")


def load_spec(name: str, base: Path | None = None) -> Spec:
    """A built-in spec by name, or a spec file (relative to ``base``); raises :class:`SpecError`."""
    if name in BUILTIN_SPECS or name in ("ascii1987", "default_ascii"):
        return _builtin(name)
    path = Path(name)
    if path.suffix not in (".json", ".toml"):
        return _builtin(name)  # raises: unknown spec
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"spec file {path}: {exc.strerror}") from None
    try:
        data: Any = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpecError(f"spec file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {path}: expected a table")
    if "base" in data:
        spec = _builtin(str(data["base"]))
        for key, override in dict(data.get("fields", {})).items():
            spec[str(key)] = {**spec.get(str(key), {}), **dict(override)}
    else:
        spec = {str(k): dict(v) for k, v in data.items()}
    spec.setdefault("h", dict(_ascii_spec["h"]))
    for required in ("t", "p"):
        if required not in spec:
            raise SpecError(f"spec file {path}: field {required!r} is missing")
    try:  # a spec that cannot encode a minimal message is unusable
        h = spec["h"]
        header = "0" * int(h.get("max_len", 0)) * (2 if h.get("data_enc") == "b" else 1)
        iso8583.encode({"h": header, "t": "0800", "11": "000001"}, spec)
    except Exception as exc:
        raise SpecError(f"spec file {path}: {type(exc).__name__}") from None
    return spec


def decode(raw: bytes, spec: Spec) -> tuple[Fields, Encoded]:
    """pyiso8583 decode (raises :class:`iso8583.DecodeError`)."""
    return iso8583.decode(raw, spec)


def encode(fields: Mapping[str, str], spec: Spec) -> tuple[bytes, Encoded]:
    """pyiso8583 encode of a copy of ``fields`` (bitmaps recomputed)."""
    doc = {k: v for k, v in fields.items() if k not in ("p", "1")}
    raw, enc = iso8583.encode(doc, spec)
    return bytes(raw), enc


def field_spans(enc: Encoded) -> dict[str, tuple[int, int]]:
    """Field -> (start of its data, end of its data) in the encoded message (wire order)."""
    spans: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, part in enc.items():
        pos += len(part["len"])
        end = pos + len(part["data"])
        spans[name] = (pos, end)
        pos = end
    return spans


def mac_start(enc: Encoded) -> int:
    """Where MAC input starts: after the message header (the MTI is the first byte MACed)."""
    header = enc.get("h")
    return len(header["len"]) + len(header["data"]) if header else 0


def response_mti(mti: str) -> str:
    """The response MTI of a request (third digit + 1: 0200 -> 0210, 0800 -> 0810)."""
    if len(mti) == 4 and mti.isdigit() and int(mti[2]) % 2 == 0:
        return mti[:2] + str(int(mti[2]) + 1) + mti[3]
    return mti


def mask_pan(pan: str) -> str:
    """The first 6 and last 4 digits only (shorter PANs: last 4 only)."""
    if len(pan) >= 13:
        return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]
    return "*" * max(0, len(pan) - 4) + pan[-4:]


def icc_tags(value: str) -> list[str]:
    """The tags of field 55 (hex) as BER-TLV, values discarded; ``["invalid"]`` if not TLV."""
    try:
        tags = tlv.decode(bytes.fromhex(value), flatten=True, convert=lambda _t, _v: None)
    except (ValueError, tlv.DecodeError):
        return ["invalid"]
    return sorted(tags)


def summary(fields: Mapping[str, str]) -> dict[str, str]:
    """What may be logged about a message: MTI, identifiers, masked PAN, the names of secret fields."""
    out = {"mti": fields.get("t", "")}
    for f in SAFE_IDS:
        if f in fields:
            out[f] = fields[f]
    if "2" in fields:
        out["pan"] = mask_pan(fields["2"])
    present = sorted((f for f in SENSITIVE - {"2"} if f in fields), key=int)
    if present:
        out["secret_fields"] = ",".join(present)
    if "55" in fields:
        out["icc_tags"] = ",".join(icc_tags(fields["55"]))
    return out


def pan_of(fields: Mapping[str, str]) -> str:
    """The PAN from field 2, else from track 2 (field 35) up to the separator; ``""`` if none."""
    if fields.get("2"):
        return fields["2"]
    track = fields.get("35", "")
    for sep in ("=", "D", "d"):
        if sep in track:
            return track.split(sep, 1)[0].lstrip(";")
    return ""
