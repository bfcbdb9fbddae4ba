"""The emulator's dispatcher: one framed payload in, one response payload out.

Every command goes through :meth:`EmulatorHsm.handle`: split the envelope, look the command up
in the shared table, parse with the generic codec, run the emulator's handler, format the
response. Errors are values: a parse or crypto failure is the response's error code, and the
connection stays usable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from emulator.crypto.errors import CryptoError
from emulator.state import EmulatorState
from protocols.hostcmd.envelope import EnvelopeError, build_response, split_request
from protocols.hostcmd.fields import ParseError, Values, format_fields, parse
from protocols.hostcmd.table import COMMANDS

log = logging.getLogger("emulator")


@dataclass(slots=True)
class Reply:
    """A handler's answer: error code and response field values."""

    error: str = "00"
    values: Values = field(default_factory=dict)


Handler = Callable[[EmulatorState, Values], Reply]


def _trailer_of(body: bytes) -> bytes:
    """Best-effort trailer for a request that failed to parse: from the first 0x19 on."""
    i = body.find(b"\x19")
    return body[i:] if i >= 0 else b""


class EmulatorHsm:
    """The reference HSM: state (LMKs, settings) plus the command handlers."""

    def __init__(self, state: EmulatorState, handlers: Mapping[str, Handler] | None = None) -> None:
        if handlers is None:
            from emulator.commands import HANDLERS

            handlers = HANDLERS
        self.state = state
        self.handlers = dict(handlers)

    @property
    def header_length(self) -> int:
        """Configured message header length."""
        return self.state.header_length

    def handle(self, payload: bytes) -> bytes | None:
        """Answer one request payload; None means the frame is unusable (close the connection)."""
        try:
            req = split_request(payload, self.state.header_length)
        except EnvelopeError:
            return None
        spec = COMMANDS.get(req.code)
        handler = self.handlers.get(req.code)
        if spec is None or handler is None or req.code in self.state.disabled_commands:
            return build_response(req.header, req.code, "68", b"", _trailer_of(req.body))
        try:
            parsed = parse(spec.request, req.body)
        except ParseError as exc:
            log.info("%s rejected: %s (%s)", req.code, exc.code, exc.field_name)
            return build_response(req.header, req.code, exc.code, b"", _trailer_of(req.body))
        try:
            reply = handler(self.state, parsed.values)
        except CryptoError as exc:
            return build_response(req.header, req.code, exc.code, b"", parsed.trailer)
        except Exception:  # a handler bug must not take the connection down
            log.exception("%s: internal error", req.code)
            return build_response(req.header, req.code, "41", b"", parsed.trailer)
        body = b""
        if reply.values:
            body = format_fields(spec.response, reply.values, parsed.values)
        return build_response(req.header, req.code, reply.error, body, parsed.trailer)
