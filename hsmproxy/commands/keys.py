"""Front-side key management commands: A0, A6, A8, BU, FA -> key operations on a node.

The front only maps parsed fields to operation arguments; every check that the emulator makes in a
particular order (LMK id ``13`` included) runs in the worker so that error precedence matches.
Absent optional fields are passed as ``None``.
"""

from __future__ import annotations

from typing import Any

from hsmproxy.commands.base import CommandContext, Handler, Immediate, Operation, text
from protocols.hostcmd.fields import Values

_KB_FIELDS = ("kb_usage", "kb_algorithm", "kb_mode_of_use", "kb_version", "kb_exportability")


def _args(v: Values, ctx: CommandContext, *names: str) -> dict[str, Any]:
    """Text fields by name (``None`` when absent) plus the tenant's LMK context."""
    args: dict[str, Any] = {name: (text(v, name) if name in v else None) for name in names}
    args.update(
        lmk_id=text(v, "lmk_id") if "lmk_id" in v else None,
        default_lmk=ctx.default_lmk,
        lmk_ids=list(ctx.lmk_ids),
    )
    return args


def a0(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """A0: generate a key under the LMK (and under a ZMK/TMK in mode 1)."""
    args = _args(
        v, ctx, "mode", "key_type", "key_scheme_lmk", "zmk_tmk_flag", "zmk", "key_scheme_zmk", *_KB_FIELDS
    )
    return Operation("generate_key", args, affinity=text(v, "zmk"))


def a6(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """A6: import a key from under a ZMK."""
    args = _args(v, ctx, "key_type", "zmk", "key_zmk", "key_scheme_lmk", *_KB_FIELDS)
    args["command"] = "A6"
    return Operation("import_key", args, affinity=text(v, "zmk"))


def fa(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """FA: import a ZPK from under a ZMK (scheme under LMK by key length unless given)."""
    args = _args(v, ctx, "zmk", "kcv_type")
    args.update(
        command="FA", key_type="001", key_zmk=text(v, "zpk_zmk"), key_scheme_lmk=text(v, "key_scheme_lmk")
    )
    return Operation("import_key", args, affinity=text(v, "zmk"))


def a8(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """A8: export a key from under the LMK to under a ZMK."""
    args = _args(v, ctx, "key_type", "zmk", "key_lmk", "key_scheme_zmk")
    return Operation("export_key", args, affinity=text(v, "key_lmk"))


def bu(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """BU: the check value of a key under the LMK."""
    args = _args(v, ctx, "key_type_code", "key_length_flag", "key", "key_type", "kcv_type")
    return Operation("key_check_value", args, affinity=text(v, "key"))


HANDLERS: dict[str, Handler] = {"A0": a0, "A6": a6, "A8": a8, "BU": bu, "FA": fa}
