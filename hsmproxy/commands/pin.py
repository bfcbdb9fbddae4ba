"""Front-side PIN commands: CA CC CI G0 JA JC JE JG DA EA DC EC DE EE DG FW -> PIN operations.

Handlers only map parsed fields to an operation: the request's text fields, the variant LMK id
(``%LL`` or the tenant default) and the key-block LMK id (``%LL`` or ``01``), and the disabled PIN
block formats. An LMK the tenant does not own is passed as ``""``: the node answers ``13`` at the
point the reference answers it (after earlier field errors such as JA's PIN length).
"""

from __future__ import annotations

from typing import Any

from hsmproxy.commands.base import CommandContext, Handler, Immediate, Operation, lmk_id, text
from protocols.hostcmd.fields import Values


def base_args(v: Values, ctx: CommandContext) -> dict[str, Any]:
    """The arguments every PIN/card operation takes: fields, LMK ids, disabled formats."""
    chosen = lmk_id(v, ctx)
    lmk = "" if isinstance(chosen, Immediate) else chosen
    default_kb = ctx.keyblock_lmk if ctx.keyblock_lmk in ctx.lmk_ids else ""
    kb_lmk = lmk if "lmk_id" in v else default_kb
    fields = {name: text(v, name) for name in v}
    return {"fields": fields, "lmk": lmk, "kb_lmk": kb_lmk, "disabled": sorted(ctx.disabled_pin_formats)}


def operation(name: str, affinity_field: str, **roles: tuple[str, str, str, str]) -> Handler:
    """A handler running ``name`` with the base arguments plus key ``roles``."""

    def handler(v: Values, ctx: CommandContext) -> Immediate | Operation:
        return Operation(name, {**base_args(v, ctx), **roles}, affinity=text(v, affinity_field))

    return handler


TPK = ("tpk", "002", "TPK", "10")
ZPK = ("zpk", "001", "ZPK", "10")
#: FW key type -> the key the PIN block is under.
FW_PIN_KEYS = {"001": ("pin_key", "001", "ZPK", "10"), "002": ("pin_key", "002", "TPK", "10")}


def fw(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """FW: the PIN block's key type must be 001 (ZPK) or 002 (TPK), else ``04``."""
    role = FW_PIN_KEYS.get(text(v, "key_type"))
    if role is None:
        return Immediate("04")
    return Operation("pvv_from_pin_block", {**base_args(v, ctx), "pin_key": role}, text(v, "pin_key"))


HANDLERS: dict[str, Handler] = {
    "CA": operation("translate_pin", "tpk", source=TPK, destination=("zpk", "001", "ZPK", "11")),
    "CC": operation(
        "translate_pin",
        "source_zpk",
        source=("source_zpk", "001", "ZPK", "10"),
        destination=("destination_zpk", "001", "ZPK", "11"),
    ),
    "CI": operation("dukpt_translate_pin", "bdk"),
    "G0": operation("dukpt_translate_pin", "bdk"),
    "JA": operation("random_pin", ""),
    "JC": operation("pin_to_lmk", "tpk", pin_key=TPK),
    "JE": operation("pin_to_lmk", "zpk", pin_key=ZPK),
    "JG": operation("pin_from_lmk", "zpk", pin_key=ZPK),
    "DA": operation("verify_pin_ibm", "tpk", pin_key=TPK),
    "EA": operation("verify_pin_ibm", "zpk", pin_key=ZPK),
    "DC": operation("verify_pin_pvv", "tpk", pin_key=TPK),
    "EC": operation("verify_pin_pvv", "zpk", pin_key=ZPK),
    "DE": operation("ibm_offset", "pvk"),
    "EE": operation("ibm_pin", "pvk"),
    "DG": operation("pvv_from_lmk", "pvk"),
    "FW": fw,
}
