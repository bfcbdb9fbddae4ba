"""One ISO 8583 message in, its translation (or an error answer) out: routes, keys, field 39.

Translation of a message (:meth:`Gateway.translate`), one ``iso_translate`` operation on a node
(:mod:`hsmproxy.ops.iso`):

* **request leg** (acquirer -> issuer): the MAC (field 64, or 128 when present) is verified under
  the route's ``mac_in`` ZAK (active version, then versions in grace), field 52 is translated from
  ``pin_in`` (ZPK, or BDK + KSN from field 53 with ``dukpt = true``) to ``pin_out`` in
  ``pin_out_format``, and the outgoing message is MACed under ``mac_out`` (field 64, or 128 when
  the message uses the secondary bitmap). Without ``mac_out`` a verified MAC field is removed;
  without ``mac_in`` and ``mac_out`` the MAC field passes unchanged.
* **response leg** (inline mode, issuer -> acquirer): verified under ``mac_out``, MACed under
  ``mac_in``; no PIN.

MAC input: the encoded message from the MTI (a spec's message header excluded) up to the MAC
field, exclusive. A field 64/128 of 8 bytes (16 hex characters in the ASCII spec) carries the full
8-byte MAC (CMAC truncated to 8 bytes); ISO 9797-1 padding method 1 unless ``mac_padding = 2``.

Field 39 of an error answer (the response MTI, original fields echoed except 35, 45, 52, 55 and
the MAC; the answer is MACed under the route's ``mac_in`` when it has one, except the answer to a
MAC failure, which carries no MAC: :meth:`Gateway.signed_error_answer`):

====================================  ==================================================
condition                             field 39
====================================  ==================================================
MAC missing or not verifying          the route's ``mac_failure_code`` (default ``63``)
PIN translation, HSM error ``24``     ``55`` (PIN length out of range: incorrect PIN)
PIN translation, any other HSM error  ``81`` (PIN cryptographic error: ``20`` PIN block
                                      does not decrypt under any key version, ``10``/``11``
                                      parity, ``22`` PAN, ``23`` format, ``27`` key
                                      length, ``29`` key usage, ``69`` format disabled,
                                      ``13`` LMK ...)
MAC generation error                  ``96``
no route matches                      ``92``
undecodable message, no PAN, bad KSN  ``30``
named key with no usable version      ``96``
no HSM node available / node timeout  ``96``
inline: no upstream answer in time    ``91``
inline: duplicate STAN+TID+RRN        ``94``
over the tenant's rate                the listener's ``rate_limit_code`` (``91``)
====================================  ==================================================
"""

from __future__ import annotations

import logging
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from iso8583 import DecodeError, EncodeError

from hsmproxy.cluster.router import NoNodeAvailable, Router
from hsmproxy.iso8583.codec import (
    Encoded,
    Fields,
    Spec,
    decode,
    encode,
    field_spans,
    mac_start,
    pan_of,
    response_mti,
    summary,
)
from hsmproxy.iso8583.config import IsoListenerConfig, RouteConfig
from hsmproxy.iso8583.keys import KeyVersions, NamedKeys
from hsmproxy.keys.rotation import utcnow
from hsmproxy.logs import LogThrottle
from hsmproxy.tenancy import TenantConfig

log = logging.getLogger("hsmproxy.iso8583")

Leg = Literal["request", "response", "answer"]
OK = "00"
FORMAT_ERROR = "30"
NO_ROUTE = "92"
SYSTEM_ERROR = "96"
PIN_INCORRECT = "55"
PIN_CRYPTO = "81"
TIMEOUT = "91"
DUPLICATE = "94"
#: HSM error codes of the PIN step answered 55; every other PIN-step error answers 81.
PIN_INCORRECT_ERRORS = frozenset({"24"})
#: Fields an error answer never carries.
NOT_ECHOED = frozenset({"p", "1", "35", "45", "52", "55", "64", "128"})
_HEX = frozenset(string.hexdigits)


def pin_error_code(hsm_error: str) -> str:
    """Field 39 for an HSM error of the PIN step (see the module docstring)."""
    return PIN_INCORRECT if hsm_error in PIN_INCORRECT_ERRORS else PIN_CRYPTO


def _is_hex(text: str) -> bool:
    return bool(text) and len(text) % 2 == 0 and all(c in _HEX for c in text)


@dataclass(slots=True)
class Message:
    """A decoded message: raw bytes, decoded fields, encoded parts (for offsets)."""

    raw: bytes
    fields: Fields
    enc: Encoded

    @property
    def mti(self) -> str:
        """The message type identifier."""
        return self.fields.get("t", "")

    def match_key(self) -> tuple[str, str, str]:
        """How a response is matched to its request: STAN (11), terminal (41), RRN (37)."""
        f = self.fields
        return f.get("11", ""), f.get("41", ""), f.get("37", "")


class Gateway:
    """Routes and translations of one ISO 8583 listener (transport-free, see the module docstring)."""

    def __init__(
        self,
        listener: IsoListenerConfig,
        routes: tuple[RouteConfig, ...],
        router: Router,
        keys: NamedKeys,
        tenant: TenantConfig,
        disabled_formats: frozenset[str] = frozenset(),
    ) -> None:
        self.listener = listener
        self.spec: Spec = listener.spec
        self.routes = routes
        self.router = router
        self.keys = keys
        self.tenant = tenant
        self.disabled = sorted(disabled_formats)
        #: Warnings that can fire on every message are written at most once a second, each kind on its
        #: own (one kind never hides another).
        self._quiet_key, self._quiet_node, self._quiet_step = LogThrottle(), LogThrottle(), LogThrottle()

    # -- codec --------------------------------------------------------------------------------------

    def decode(self, raw: bytes) -> Message | Fields:
        """The decoded message, or (undecodable) the fields decoded before the error."""
        try:
            fields, enc = decode(raw, self.spec)
        except DecodeError as exc:
            log.warning("iso8583 %s: undecodable message (field %s)", self.listener.name, exc.field)
            return dict(exc.doc_dec)
        except Exception as exc:  # pyiso8583 raises ValueError subclasses; anything else is a bug
            log.warning("iso8583 %s: undecodable message (%s)", self.listener.name, type(exc).__name__)
            return {}
        return Message(bytes(raw), fields, enc)

    def route(self, fields: Mapping[str, str]) -> RouteConfig | None:
        """The first route matching the message."""
        for r in self.routes:
            if r.matches(fields):
                return r
        return None

    def error_answer(self, fields: Mapping[str, str], code: str) -> bytes | None:
        """The response MTI with field 39 = ``code`` and the original fields echoed (not 35 45 52 55
        or MACs); a minimal answer (MTI, 11, 37, 41, 39) when the echo cannot be encoded; None when
        not even that can (no usable MTI)."""
        mti = fields.get("t", "")
        if len(mti) != 4 or not mti.isdigit():
            return None
        out = {k: v for k, v in fields.items() if k not in NOT_ECHOED}
        out["t"], out["39"] = response_mti(mti), code
        for attempt in (out, {k: v for k, v in out.items() if k in ("t", "11", "37", "41", "39")}):
            try:
                return encode(attempt, self.spec)[0]
            except Exception as exc:  # EncodeError, or a partial decode pyiso8583 cannot re-encode
                log.debug(
                    "iso8583 %s: error answer not encodable (%s)", self.listener.name, type(exc).__name__
                )
        return None

    async def signed_error_answer(
        self, fields: Mapping[str, str], code: str, route: RouteConfig | None
    ) -> bytes | None:
        """:meth:`error_answer`, MACed under the route's ``mac_in`` (the acquirer zone's key) when it
        has one, except the answer to a MAC failure (and when the MAC cannot be made: unMACed)."""
        raw = self.error_answer(fields, code)
        if raw is None or route is None or route.mac_in is None or code == route.mac_failure_code:
            return raw
        msg = self.decode(raw)
        if not isinstance(msg, Message):
            return raw
        out, _ = await self.translate(msg, route, "answer")
        return out if out is not None else raw

    # -- translation --------------------------------------------------------------------------------

    def _key(self, name: str) -> KeyVersions | None:
        kv = self.keys.get(self.tenant.name, name)
        if kv is None and (held := self._quiet_key.due()) is not None:  # per message: at most once a second
            log.warning("iso8583 %s: named key %s/%s has no active version (%d such lines held back)",
                        self.listener.name, self.tenant.name, name, held)  # fmt: skip
        return kv

    def _mac_target(self, fields: Mapping[str, str]) -> str:
        if "128" in fields or "64" in fields:
            return "128" if "128" in fields else "64"
        return "128" if any(k.isdigit() and int(k) > 64 for k in fields) else "64"

    def _placeholder(self, field: str) -> str:
        spec = self.spec[field]
        size = int(spec["max_len"])
        return "0" * (2 * size if spec["data_enc"] == "b" else size)

    def _put(self, out: bytearray, enc: Encoded, spans: dict[str, tuple[int, int]], field: str,
             hex_value: str) -> None:  # fmt: skip
        start, end = spans[field]
        data = bytes.fromhex(hex_value) if self.spec[field]["data_enc"] == "b" else hex_value.encode("ascii")
        if len(data) != end - start:
            raise ValueError("value does not fit the field")
        out[start:end] = data

    async def translate(
        self, msg: Message, route: RouteConfig, leg: Leg = "request"
    ) -> tuple[bytes | None, str]:
        """(translated message, ``00``) or (None, field 39 of the error answer)."""
        fields = msg.fields
        if leg == "request":
            verify, v_alg, generate, g_alg = (
                route.mac_in,
                route.mac_in_algorithm,
                route.mac_out,
                route.mac_out_algorithm,
            )
        elif leg == "response":
            verify, v_alg, generate, g_alg = (
                route.mac_out,
                route.mac_out_algorithm,
                route.mac_in,
                route.mac_in_algorithm,
            )
        else:  # our own error answer to the acquirer side: MACed under mac_in only
            verify, v_alg, generate, g_alg = None, "3", route.mac_in, route.mac_in_algorithm
        now = utcnow()
        args: dict[str, Any] = {"lmk_ids": list(self.tenant.lmk_ids), "disabled": self.disabled}
        records = []
        affinity = ""
        start = mac_start(msg.enc)
        spans = field_spans(msg.enc)
        present = "128" if "128" in fields else "64" if "64" in fields else None
        if verify:
            kv = self._key(verify)
            if kv is None:
                return None, SYSTEM_ERROR
            if present is None or not _is_hex(fields[present]):
                return None, route.mac_failure_code
            end = spans[present][0] - len(msg.enc[present]["len"])
            args["verify"] = {
                "keys": kv.candidates(now), "key_type": kv.active.type_code, "algorithm": v_alg,
                "padding": route.mac_padding, "data": msg.raw[start:end], "mac": fields[present],
            }  # fmt: skip
            records.append(kv.active)
            affinity = kv.active.cryptogram or ""
        pin = leg == "request" and route.pin_in is not None and route.pin_out is not None and "52" in fields
        if pin:
            assert route.pin_in is not None and route.pin_out is not None
            src, dst = self._key(route.pin_in), self._key(route.pin_out)
            if src is None or dst is None:
                return None, SYSTEM_ERROR
            pan = pan_of(fields)
            if not pan.isdigit() or not _is_hex(fields["52"]):
                return None, FORMAT_ERROR
            step = {"sources": src.candidates(now), "source_type": src.active.type_code, "dukpt": route.dukpt,
                    "destination": dst.active.cryptogram, "destination_type": dst.active.type_code,
                    "pin_block": fields["52"].upper(), "source_format": route.pin_in_format,
                    "destination_format": route.pin_out_format, "pan": pan}  # fmt: skip
            if route.dukpt:
                ksn = fields.get("53", "").upper()
                if not _is_hex(ksn) or len(ksn) not in (20, 24):
                    return None, FORMAT_ERROR
                step["ksn"] = ksn
            args["pin"] = step
            records += [src.active, dst.active]
            affinity = src.active.cryptogram or ""
        out_fields = {k: v for k, v in fields.items() if k not in ("p", "1")}
        target = ""
        gen_key: KeyVersions | None = None
        if generate:
            gen_key = self._key(generate)
            if gen_key is None:
                return None, SYSTEM_ERROR
            target = self._mac_target(out_fields)
            out_fields[target] = self._placeholder(target)
            records.append(gen_key.active)
        elif verify and present is not None:
            del out_fields[present]
        if not verify and not pin and not generate:
            return msg.raw, OK
        if (gen_key is not None and present == target) or (gen_key is None and not (verify and present)):
            # Same fields, same sizes: the outgoing message is the incoming one with 52 and the MAC
            # overwritten (the MAC input ends before the MAC field, so its old value is irrelevant).
            out_raw, out_enc, out_spans = msg.raw, msg.enc, spans
        else:
            try:
                out_raw, out_enc = encode(out_fields, self.spec)
            except (EncodeError, ValueError, TypeError, KeyError):
                return None, FORMAT_ERROR
            out_spans = field_spans(out_enc)
        if gen_key is not None:
            o_start = mac_start(out_enc)
            binary = self.spec[target]["data_enc"] == "b"
            size = len(out_enc[target]["data"])
            args["generate"] = {
                "key": gen_key.active.cryptogram, "key_type": gen_key.active.type_code, "algorithm": g_alg,
                "padding": route.mac_padding, "length": size if binary else size // 2,
                "data": out_raw[o_start : out_spans[target][0] - len(out_enc[target]["len"])],
                "pin_at": out_spans["52"][0] - o_start if pin else -1,
                "pin_size": len(out_enc["52"]["data"]) if pin else 0,
                "pin_binary": self.spec["52"]["data_enc"] == "b",
            }  # fmt: skip
        variant = {r.lmk_id for r in records if not (r.cryptogram or "").startswith("S")}
        blocks = {r.lmk_id for r in records if (r.cryptogram or "").startswith("S")}
        if len(variant) > 1 or len(blocks) > 1:
            log.warning("iso8583 route %s: its keys are under different LMKs", route.name)
            return None, SYSTEM_ERROR
        args["lmk"] = next(iter(variant), self.tenant.default_lmk)
        args["kb_lmk"] = next(iter(blocks), self.tenant.keyblock_lmk)
        try:
            code, values = await self.router.execute("iso_translate", args, affinity)
        except (NoNodeAvailable, TimeoutError) as exc:
            if (held := self._quiet_node.due()) is not None:  # under overload: at most one line a second
                log.warning("iso8583 %s: no node could serve the message (%s; %d such lines held back)",
                            self.listener.name, type(exc).__name__, held)  # fmt: skip
            return None, SYSTEM_ERROR
        if code != OK:
            stage = str(values.get("stage", ""))
            if stage == "verify":
                return None, route.mac_failure_code
            if stage == "pin":
                return None, pin_error_code(code)
            if (held := self._quiet_step.due()) is not None:
                log.warning("iso8583 route %s: %s step failed on the node (%s; %d such lines held back)",
                            route.name, stage or "?", code, held)  # fmt: skip
            return None, SYSTEM_ERROR
        out = bytearray(out_raw)
        try:
            if pin:
                self._put(out, out_enc, out_spans, "52", str(values["pin_block"]))
            if gen_key is not None:
                self._put(out, out_enc, out_spans, target, str(values["mac"]))
        except (KeyError, ValueError):
            return None, PIN_CRYPTO if pin else SYSTEM_ERROR
        return bytes(out), OK

    def describe(self, fields: Mapping[str, str]) -> dict[str, str]:
        """A log-safe summary of a message (see :func:`hsmproxy.iso8583.codec.summary`)."""
        return summary(fields)
