"""The emulator's command handlers, one module per family; HANDLERS maps code -> handler."""

from __future__ import annotations

from emulator.commands import card, data, diag, emv, keys, mac, pin, rsa
from emulator.hsm import Handler

HANDLERS: dict[str, Handler] = {}
for _family in (diag, keys, pin, card, data, mac, emv, rsa):
    HANDLERS.update(_family.HANDLERS)
