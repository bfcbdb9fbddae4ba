"""Front-side data encryption: M0, M2 -> ``data_crypt``; helpers shared by the MAC and EMV fronts.

The front checks what needs no key, in the emulator's order (mode and output format ``15``,
input format and hex message ``15``, key type ``04``), then the LMK (``13``); everything that needs
the key (parity, key-block checks, BDK length, IV/CFB rules, data length ``80``) is the worker's.
"""

from __future__ import annotations

import string
from typing import Any

from hsmproxy.commands.base import CommandContext, Handler, Immediate, Operation, lmk_id, text
from protocols.hostcmd.fields import Values

_HEX = frozenset(string.hexdigits.encode())
_DUKPT_TYPES = frozenset({"009", "609", "809"})
_DATA_TYPES = frozenset({"00A", "00B"})


def message_bytes(v: Values, format_field: str = "input_format", allowed: str = "012") -> bytes | Immediate:
    """The ``message`` field per its format flag (``0`` binary, ``1`` hex, ``2`` text); ``15`` otherwise."""
    fmt = text(v, format_field)
    raw = v.get("message", b"")
    data = raw if isinstance(raw, bytes) else raw.encode("latin-1")
    if fmt not in allowed or len(fmt) != 1:
        return Immediate("15")
    if fmt == "1":
        if len(data) % 2 or any(b not in _HEX for b in data):
            return Immediate("15")
        return bytes.fromhex(data.decode("ascii"))
    return data


def key_args(v: Values, ctx: CommandContext) -> dict[str, Any] | Immediate:
    """LMK arguments for key resolution in the worker (``13`` for an LMK not the tenant's).

    ``lmk_id`` is the variant LMK (``%LL`` or the tenant default); ``kb_lmk`` the ``%LL`` as given
    (empty: the worker uses the first key-block LMK among ``lmk_ids``).
    """
    lmk = lmk_id(v, ctx)
    if isinstance(lmk, Immediate):
        return lmk
    return {"lmk_id": lmk, "kb_lmk": text(v, "lmk_id"), "lmk_ids": list(ctx.lmk_ids)}


def _crypt(encrypt: bool) -> Handler:
    def handler(v: Values, ctx: CommandContext) -> Immediate | Operation:
        mode, out_fmt = text(v, "mode"), text(v, "output_format")
        if out_fmt not in ("0", "1") or mode not in ("00", "01", "02", "03"):
            return Immediate("15")
        data = message_bytes(v)
        if isinstance(data, Immediate):
            return data
        key_type, key = text(v, "key_type").upper(), text(v, "key")
        if key_type not in _DUKPT_TYPES | _DATA_TYPES and not (key_type == "FFF" and key[:1] == "S"):
            return Immediate("04")
        args = key_args(v, ctx)
        if isinstance(args, Immediate):
            return args
        args.update(
            encrypt=encrypt,
            mode=mode,
            output_format=out_fmt,
            key_type=key_type,
            key=key,
            ksn=text(v, "ksn"),
            iv=text(v, "iv"),
            data=data,
        )
        return Operation("data_crypt", args, affinity=key)

    return handler


HANDLERS: dict[str, Handler] = {"M0": _crypt(True), "M2": _crypt(False)}
