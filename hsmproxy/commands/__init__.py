"""Front-side command handlers: host command -> normalized operation (or immediate reply)."""

from __future__ import annotations

from hsmproxy.commands import card, diag, keys, pin
from hsmproxy.commands.base import Handler

HANDLERS: dict[str, Handler] = {}
for _family in (diag, pin, keys, card):
    HANDLERS.update(_family.HANDLERS)
