"""The emulator's command handlers, one module per family; HANDLERS maps code -> handler."""

from __future__ import annotations

from emulator.commands import diag
from emulator.hsm import Handler

HANDLERS: dict[str, Handler] = {}
for _family in (diag,):
    HANDLERS.update(_family.HANDLERS)
