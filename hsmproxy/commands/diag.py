"""Front-side diagnostics: NC (LMK check value from a node), NO (status), B2 (echo)."""

from __future__ import annotations

from hsmproxy.commands.base import CommandContext, Handler, Immediate, Operation, lmk_id, text
from protocols.hostcmd.fields import Values

#: Firmware number reported by NC and NO (9 characters, as the emulator reports).
FIRMWARE = "1000-E000"


def nc(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """NC: LMK check value computed by a node's LMK object, plus the firmware number."""
    lmk = lmk_id(v, ctx)
    if isinstance(lmk, Immediate):
        return lmk
    return Operation("lmk_check", {"lmk_id": lmk, "firmware": FIRMWARE})


def no(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """NO: status, answered by the proxy itself."""
    mode = text(v, "mode")
    if mode == "00":
        return Immediate(
            "00",
            {
                "io_buffer_size": "2",
                "ethernet_type": "1",
                "tcp_sockets": "64",
                "firmware": FIRMWARE,
                "reserved_1": "0",
                "reserved_2": "0000",
            },
        )
    if mode == "01":
        return Immediate("00", {"pci_compliance": "0", "reserved_3": "0" * 10})
    return Immediate("15")


def b2(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """B2: echo, answered by the proxy itself."""
    return Immediate("00", {"data": v["data"]})


HANDLERS: dict[str, Handler] = {"NC": nc, "NO": no, "B2": b2}
