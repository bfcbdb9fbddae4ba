"""Front-side MAC commands: M6, M8, MS -> ``mac``.

Flag checks that need no key are answered here in the emulator's order (M6/M8: mode, MAC size,
padding ``15``, padding 3 outside mode 0 ``15``, message ``15``, key type ``04``; MS: key type
``04``, key length ``05``, block number ``15``, message ``15``), then the LMK (``13``).
"""

from __future__ import annotations

from hsmproxy.commands.base import CommandContext, Handler, Immediate, Operation, text
from hsmproxy.commands.data import key_args, message_bytes
from protocols.hostcmd.fields import Values

_MAC_TYPES = frozenset({"003", "008"})
_MAC_BYTES = {"0": 4, "1": 8}


def _m6_m8(command: str) -> Handler:
    def handler(v: Values, ctx: CommandContext) -> Immediate | Operation:
        mode, size, padding = text(v, "mode"), text(v, "mac_size"), text(v, "padding")
        if mode not in ("0", "1", "2", "3") or size not in _MAC_BYTES or padding not in ("0", "1", "2", "3"):
            return Immediate("15")
        if padding == "3" and mode != "0":
            return Immediate("15")
        data = message_bytes(v)
        if isinstance(data, Immediate):
            return data
        key_type, key = text(v, "key_type").upper(), text(v, "key")
        if key_type not in _MAC_TYPES and not (key_type == "FFF" and key[:1] == "S"):
            return Immediate("04")
        args = key_args(v, ctx)
        if isinstance(args, Immediate):
            return args
        args.update(
            command=command,
            mode=mode,
            algorithm=text(v, "mac_algorithm"),
            padding=padding,
            mac_bytes=_MAC_BYTES[size],
            key_type=key_type,
            key=key,
            iv=text(v, "iv"),
            mac=text(v, "mac"),
            data=data,
        )
        return Operation("mac", args, affinity=key)

    return handler


def ms(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """MS: X9.19 (double key) or X9.9 (single key) MAC over a message sent in blocks."""
    block = text(v, "block_number")
    key_type = {"0": "003", "1": "008"}.get(text(v, "key_type"))
    length = {"0": 8, "1": 16}.get(text(v, "key_length"))
    if key_type is None:
        return Immediate("04")
    if length is None:
        return Immediate("05")
    if block not in ("0", "1", "2", "3"):
        return Immediate("15")
    data = message_bytes(v, "message_type", allowed="01")
    if isinstance(data, Immediate):
        return data
    args = key_args(v, ctx)
    if isinstance(args, Immediate):
        return args
    key = text(v, "key")
    args.update(
        command="MS",
        mode=block,
        algorithm="",
        key_length=length,
        key_type=key_type,
        key=key,
        iv=text(v, "iv"),
        data=data,
    )
    return Operation("mac", args, affinity=key)


HANDLERS: dict[str, Handler] = {"M6": _m6_m8("M6"), "M8": _m6_m8("M8"), "MS": ms}
