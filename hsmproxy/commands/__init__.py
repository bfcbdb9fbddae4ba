"""Front-side command handlers: host command -> normalized operation (or immediate reply)."""

from __future__ import annotations

from hsmproxy.commands import card, data, diag, emv, keys, mac, pin, rsa
from hsmproxy.commands.base import Handler

HANDLERS: dict[str, Handler] = {}
for _family in (diag, pin, keys):
    HANDLERS.update(_family.HANDLERS)
HANDLERS.update(card.HANDLERS)
for _family in (data, mac, emv, rsa):
    HANDLERS.update(_family.HANDLERS)
