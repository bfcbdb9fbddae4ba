"""Front-side EMV: KQ -> ``emv_arqc`` (mode and scheme ``15`` here, then the LMK ``13``)."""

from __future__ import annotations

from hsmproxy.commands.base import CommandContext, Handler, Immediate, Operation, text
from hsmproxy.commands.data import key_args
from protocols.hostcmd.fields import Values


def _raw(v: Values, name: str) -> bytes:
    value = v.get(name, b"")
    return value if isinstance(value, bytes) else value.encode("latin-1")


def kq(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """KQ: verify an ARQC (scheme 0 Visa / 1 EMV common session key) and/or generate an ARPC."""
    mode, scheme = text(v, "mode"), text(v, "scheme_id")
    if mode not in ("0", "1", "2") or scheme not in ("0", "1"):
        return Immediate("15")
    args = key_args(v, ctx)
    if isinstance(args, Immediate):
        return args
    key = text(v, "mk_ac")
    args.update(
        mode=mode,
        scheme=scheme,
        mk_ac=key,
        pan_psn=_raw(v, "pan_psn"),
        atc=_raw(v, "atc"),
        un=_raw(v, "unpredictable_number"),
        data=_raw(v, "data"),
        arqc=_raw(v, "arqc"),
        arc=_raw(v, "arc"),
    )
    return Operation("emv_arqc", args, affinity=key)


HANDLERS: dict[str, Handler] = {"KQ": kq}
