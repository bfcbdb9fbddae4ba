"""Card verification values: CW generate and CY verify a Visa CVV.

The CVK pair is key type 402 (LMK pair 14-15, variant 4) as one double-length key (CVK A ‖ CVK B,
scheme ``U`` or ``X``) or a TDES key block with usage ``C0``. CVV2 and iCVV are the same
computation with service code ``000`` and ``999``; the caller puts them in the request.

Error codes: ``10`` CVK parity, ``13`` unknown LMK identifier, ``15`` bad PAN / expiry / service
code, ``27`` CVK not a double-length TDES key (single or triple length, AES), ``29`` key block
usage, ``01`` (CY) the CVV does not match.
"""

from __future__ import annotations

from emulator.commands.common import resolve_key, text
from emulator.crypto.card import generate_cvv, verify_cvv
from emulator.crypto.errors import CryptoError
from emulator.hsm import Handler, Reply
from emulator.state import EmulatorState
from protocols.hostcmd.fields import Values

CVK_USAGES = frozenset({"C0"})


def _cvk(state: EmulatorState, v: Values) -> bytes:
    key = resolve_key(state, v, "cvk", "402", usages=CVK_USAGES)
    if key.algorithm != "T" or len(key.key) != 16:
        raise CryptoError("27", "CVK must be a double-length TDES key")
    return key.key


def cw(state: EmulatorState, v: Values) -> Reply:
    """CW: the 3-digit Visa CVV of PAN, expiry date and service code."""
    cvv = generate_cvv(_cvk(state, v), text(v, "pan"), text(v, "expiry"), text(v, "service_code"))
    return Reply(values={"cvv": cvv})


def cy(state: EmulatorState, v: Values) -> Reply:
    """CY: verify a Visa CVV; error ``01`` when it does not match."""
    cvk = _cvk(state, v)
    try:
        verify_cvv(cvk, text(v, "pan"), text(v, "expiry"), text(v, "service_code"), text(v, "cvv"))
    except CryptoError as exc:
        if exc.code == "01":
            return Reply(error="01")
        raise
    return Reply()


HANDLERS: dict[str, Handler] = {"CW": cw, "CY": cy}
