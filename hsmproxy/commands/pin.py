"""Front-side PIN commands: CA, CC -> translate_pin."""

from __future__ import annotations

from hsmproxy.commands.base import CommandContext, Handler, Immediate, Operation, lmk_id, text
from protocols.hostcmd.fields import Values


def _translate(source_type: str, source_field: str, destination_field: str) -> Handler:
    def handler(v: Values, ctx: CommandContext) -> Immediate | Operation:
        lmk = lmk_id(v, ctx)
        if isinstance(lmk, Immediate):
            return lmk
        if "pan" in v:  # ISO format 4 needs AES key blocks, which the proxy does not serve yet
            return Immediate("68")
        return Operation(
            "translate_pin",
            {
                "lmk_id": lmk,
                "source_type": source_type,
                "source_key": text(v, source_field),
                "destination_type": "001",
                "destination_key": text(v, destination_field),
                "max_pin_length": text(v, "max_pin_length"),
                "pin_block": text(v, "pin_block"),
                "source_format": text(v, "source_format"),
                "destination_format": text(v, "destination_format"),
                "account": text(v, "account"),
                "disabled_formats": sorted(ctx.disabled_pin_formats),
            },
            affinity=text(v, source_field),
        )

    return handler


HANDLERS: dict[str, Handler] = {
    "CA": _translate("002", "tpk", "zpk"),
    "CC": _translate("001", "source_zpk", "destination_zpk"),
}
