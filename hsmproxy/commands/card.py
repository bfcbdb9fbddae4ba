"""Front-side card commands: CW (generate) and CY (verify) a Visa CVV -> card operations."""

from __future__ import annotations

from hsmproxy.commands.base import Handler
from hsmproxy.commands.pin import operation

HANDLERS: dict[str, Handler] = {
    "CW": operation("cvv_generate", "cvk"),
    "CY": operation("cvv_verify", "cvk"),
}
