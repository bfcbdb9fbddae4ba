"""EMV: KQ (verify an ARQC and/or generate an ARPC).

Request: mode 1 + scheme id 1 + MK-AC key + PAN/PSN 8 bytes + ATC 2 bytes + UN 4 bytes + data
length 2 hex + data + ``;`` + ARQC 8 bytes [+ ARC 2 bytes for modes 1/2] [+ ``%LL``] (binary fields
are raw bytes). Response: the 8-byte ARPC for modes 1 and 2.

- Mode ``0`` verify the ARQC, ``1`` verify and generate the ARPC, ``2`` generate the ARPC only.
- MK-AC: key type ``109`` (LMK pair 28-29 variant 1), double-length TDES (or an ``S`` key block
  of usage E0).
- ICC master key: EMV Book 2 A1.4.1 option A over PAN/PSN, the rightmost 16 digits of PAN ‖ PSN
  as 8 bytes of BCD.
- Scheme ``0`` Visa (CVN 10): session key = ICC master key, ARQC over the data with zero padding.
  Scheme ``1`` EMV common session key (A1.3.1): R = ATC ‖ 00 00 ‖ UN (byte 2 becomes F0 / 0F, so
  this is also the M/Chip SKD ``ATC ‖ F0 00 ‖ UN``), ARQC with EMV padding (``80 00 ..``).
- ARPC method 1: TDES(ICC master key, ARQC XOR (ARC ‖ 00..00)). Under the ICC master key, not
  the session key, as the published vectors (VECTORS.md section 11) and M/Chip do.

Errors: ``01`` ARQC verification failed (no ARPC), ``10`` MK parity, ``15`` bad mode/scheme or
PAN/PSN not BCD digits, ``27`` MK not double length.
"""

from __future__ import annotations

from typing import Literal

from emulator.commands.common import raw, resolve_key, text
from emulator.crypto.emv import (
    common_sk_diversification,
    derive_common_session_key,
    derive_icc_mk,
    generate_arpc_method1,
    verify_arqc,
)
from emulator.crypto.errors import CryptoError
from emulator.hsm import Handler, Reply
from emulator.state import EmulatorState
from protocols.hostcmd.fields import Values


def kq(state: EmulatorState, v: Values) -> Reply:
    """KQ: verify an ARQC (scheme 0 Visa / 1 EMV common session key) and/or generate an ARPC."""
    mode, scheme = text(v, "mode"), text(v, "scheme_id")
    if mode not in ("0", "1", "2") or scheme not in ("0", "1"):
        raise CryptoError("15", "invalid mode or scheme id")
    mk = resolve_key(state, v, "mk_ac", "109")
    if mk.algorithm != "T" or len(mk.key) != 16:
        raise CryptoError("27", "MK-AC must be a double-length TDES key")
    digits = raw(v, "pan_psn").hex()
    if not digits.isdecimal():
        raise CryptoError("15", "PAN/PSN is not BCD")
    icc_mk = derive_icc_mk(mk.key, digits[:14], digits[14:])
    arqc = raw(v, "arqc")
    if mode in ("0", "1"):
        padding: Literal["emv", "visa"] = "visa" if scheme == "0" else "emv"
        session_key = icc_mk
        if scheme == "1":
            r = common_sk_diversification(raw(v, "atc"), raw(v, "unpredictable_number"))
            session_key = derive_common_session_key(icc_mk, r)
        try:
            verify_arqc(session_key, raw(v, "data"), arqc, padding=padding)
        except CryptoError as exc:
            if exc.code == "01":
                return Reply(error="01")
            raise
    if mode == "0":
        return Reply()
    return Reply(values={"arpc": generate_arpc_method1(icc_mk, arqc, raw(v, "arc"))})


HANDLERS: dict[str, Handler] = {"KQ": kq}
