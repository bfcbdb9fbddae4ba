"""Network management (0800 -> 0810) answered locally: echo, sign-on/off, dynamic key exchange.

Field 70 (network management information code):

* ``301`` echo test, ``001`` sign-on, ``002`` sign-off: answered ``39 = 00`` (sign-on state is
  recorded per connection for the logs; financial traffic is not refused while signed off);
* ``101`` (key change) or ``161`` (new key): **key exchange**. Field 48 carries the new working key
  under the zone's ZMK, in this layout (the Mastercard DE 48 SE 11 idea)::

      class(2) key-under-ZMK check-value(6)
      class:   "PK" = PIN key, "MK" = MAC key of the sender's zone: from the acquirer side the
               route's pin_in / mac_in under its zmk; from the upstream (inline mode) the route's
               pin_out / mac_out under its zmk_out
      key:     payShield form: 32 hex (double length) or U/X + 32 hex, T/Y + 48 hex (triple)
      check:   the first 6 hex digits of the new key's check value (TDES-ECB of zeros)

  The key is imported on a node (the ``import_key`` operation, as A6 and ``hsmproxy keys import``)
  into the LMK of the current version, its check value compared, and stored in the keystore as the
  next version of the named key: the new version becomes ``active`` and the previous one enters
  ``grace`` for its grace period (:mod:`hsmproxy.keys.rotation`'s order: new version active first).
  Answers: ``00`` done, ``30`` field 48 malformed, ``12`` no key exchange on this route (no
  ``zmk``, unknown class, or a DUKPT ``pin_in``), ``63`` check value mismatch or odd parity
  refused, ``96`` node or keystore failure.
* anything else: ``12`` (invalid transaction).

The key under the ZMK is never logged and field 48 is not echoed in the 0810.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from hsmproxy.cluster.router import NoNodeAvailable
from hsmproxy.iso8583.codec import encode, response_mti
from hsmproxy.iso8583.gateway import FORMAT_ERROR, NOT_ECHOED, OK, SYSTEM_ERROR, Gateway, Message
from hsmproxy.keys.store import KeyExists, KeyRecord, KeyState, KeyStore

log = logging.getLogger("hsmproxy.iso8583")

ECHO, SIGN_ON, SIGN_OFF = "301", "001", "002"
KEY_EXCHANGE = frozenset({"101", "161"})
INVALID_TRANSACTION = "12"
SECURITY_VIOLATION = "63"
ACTOR = "iso8583-key-exchange"
#: Where an 0800 came from: the acquirer side (a listener's connection) or the upstream link.
Side = Literal["acquirer", "upstream"]
_KEY = re.compile(r"^(?:[UX]?[0-9A-F]{32}|[TY][0-9A-F]{48})$")


def is_network(fields: dict[str, str]) -> bool:
    """True for an 0800 (network management request)."""
    return fields.get("t", "") in ("0800", "1800")


class KeyExchange:
    """Imports keys arriving in 0800 messages as the next version of a named key."""

    def __init__(self, store: KeyStore | None, on_change: Any = None) -> None:
        self.store = store
        self.on_change = on_change
        #: Successful exchanges (for tests and metrics).
        self.count = 0

    async def exchange(self, gw: Gateway, fields: dict[str, str], side: Side = "acquirer") -> str:
        """Field 39 of the 0810 for a key exchange request (see the module docstring)."""
        route = gw.route(fields)
        data = fields.get("48", "").upper()
        if route is None or self.store is None:
            return INVALID_TRANSACTION
        if side == "acquirer":
            zmk_name, keys = route.zmk, {"PK": route.pin_in if not route.dukpt else None, "MK": route.mac_in}
        else:
            zmk_name, keys = route.zmk_out, {"PK": route.pin_out, "MK": route.mac_out}
        klass, body = data[:2], data[2:]
        target = keys.get(klass)
        if target is None or zmk_name is None:
            return INVALID_TRANSACTION
        key_zmk, kcv = body[:-6], body[-6:]
        if not _KEY.match(key_zmk) or not re.fullmatch(r"[0-9A-F]{6}", kcv):
            return FORMAT_ERROR
        zmk = gw.keys.get(gw.tenant.name, zmk_name)
        current = gw.keys.get(gw.tenant.name, target)
        if zmk is None or current is None or zmk.active.cryptogram is None:
            return SYSTEM_ERROR
        old = current.active
        if (old.cryptogram or "").startswith("S"):
            return INVALID_TRANSACTION  # key-block keys are not exchanged this way yet
        scheme = "T" if len(key_zmk.lstrip("UXTY")) == 48 else "U"
        args = {
            "lmk_id": None, "default_lmk": old.lmk_id, "lmk_ids": list(gw.tenant.lmk_ids), "command": "A6",
            "key_type": old.type_code, "zmk": zmk.active.cryptogram, "key_zmk": key_zmk,
            "key_scheme_lmk": scheme, "kb_usage": None, "kb_algorithm": None, "kb_mode_of_use": None,
            "kb_version": None, "kb_exportability": None,
        }  # fmt: skip
        try:
            code, values = await gw.router.execute("import_key", args, zmk.active.cryptogram)
        except (NoNodeAvailable, TimeoutError):
            return SYSTEM_ERROR
        if code == "01":
            log.warning(
                "iso8583 key exchange %s/%s: refused, the key has even parity", gw.tenant.name, target
            )
            return SECURITY_VIOLATION
        if code != OK:
            log.warning(
                "iso8583 key exchange %s/%s: import failed on the node (%s)", gw.tenant.name, target, code
            )
            return SYSTEM_ERROR
        if str(values.get("kcv", ""))[:6].upper() != kcv:
            log.warning("iso8583 key exchange %s/%s: check value mismatch", gw.tenant.name, target)
            return SECURITY_VIOLATION
        try:
            version = await asyncio.to_thread(
                self._store_next, old, str(values["key_lmk"]), str(values["kcv"])[:6], zmk_name
            )
        except Exception as exc:
            log.warning("iso8583 key exchange %s/%s: keystore refused (%s)", gw.tenant.name, target,
                        type(exc).__name__)  # fmt: skip
            return SYSTEM_ERROR
        self.count += 1
        log.info("iso8583 key exchange: %s/%s version %d active, version %d in grace", gw.tenant.name, target,
                 version, old.version)  # fmt: skip
        await gw.keys.refresh()
        if self.on_change is not None:
            self.on_change()
        return OK

    def _store_next(self, old: KeyRecord, cryptogram: str, kcv: str, zmk_name: str) -> int:
        """Create the next version (pre-active), activate it, move ``old`` to grace; the new version."""
        assert self.store is not None
        store = self.store
        now = datetime.now(UTC)
        version = store.next_version(old.tenant, old.name)
        new = replace(
            old, version=version, cryptogram=cryptogram, kcv=kcv.upper(), state=KeyState.PRE_ACTIVE,
            activation_date=None, expiry_date=None, grace_until=None, created_at=now, updated_at=now,
        )  # fmt: skip
        try:
            store.create(new, actor=ACTOR, reason=f"key exchange under {zmk_name}")
        except KeyExists:
            raise
        store.transition(old.tenant, old.name, version, KeyState.ACTIVE, actor=ACTOR, reason="key exchange")
        store.transition(old.tenant, old.name, old.version, KeyState.GRACE, actor=ACTOR,
                         reason=f"superseded by version {version} (key exchange)",
                         grace_until=now + (old.grace_period or timedelta(0)))  # fmt: skip
        return version


async def network_answer(
    gw: Gateway, msg: Message, exchange: KeyExchange, state: dict[str, Any], side: Side = "acquirer"
) -> tuple[bytes | None, str]:
    """The 0810 for an 0800 (``state``: the connection's ``signed_on`` flag; ``side``: where it came
    from, which decides the keys a key exchange replaces)."""
    fields = msg.fields
    code70 = fields.get("70", "")
    if code70 == ECHO:
        code = OK
    elif code70 in (SIGN_ON, SIGN_OFF):
        state["signed_on"] = code70 == SIGN_ON
        log.info("iso8583 %s: %s", gw.listener.name, "sign-on" if code70 == SIGN_ON else "sign-off")
        code = OK
    elif code70 in KEY_EXCHANGE:
        code = await exchange.exchange(gw, fields, side)
    else:
        code = INVALID_TRANSACTION
    out = {k: v for k, v in fields.items() if k not in NOT_ECHOED and k != "48"}
    out["t"], out["39"] = response_mti(msg.mti), code
    try:
        return encode(out, gw.spec)[0], code
    except Exception:
        return gw.error_answer(fields, code), code
