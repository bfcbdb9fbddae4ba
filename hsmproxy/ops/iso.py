"""ISO 8583 gateway operation: MAC verify, PIN translate, MAC generate — one node round trip.

``iso_translate`` composes the operations the host commands use (no new cryptography):

1. **verify** (optional): the MAC of the incoming message under the first candidate ZAK/TAK that
   matches (the active version first, then versions still in their grace period): ISO 9797-1
   algorithm 1 or 3 (:func:`hsmproxy.ops.mac.chained_mac`, as M6/M8) or CMAC
   (:func:`hsmproxy.ops.mac.cmac`, as M6/M8 algorithm 6);
2. **pin** (optional): field 52 translated from the incoming ZPK (or the DUKPT PIN key of a BDK and
   the KSN) to the outgoing ZPK, with a format change (:func:`hsmproxy.ops.pin.translate`, as CC;
   :func:`hsmproxy.ops.dukpt.dukpt_pin_key`, as G0). With several incoming key candidates a
   candidate whose decryption is not a valid PIN block (``20``/``24``) yields to the next one;
3. **generate** (optional): the MAC of the outgoing message, whose bytes are given with a
   placeholder where the translated PIN block goes (``pin_at``), under the outgoing key.

Arguments: ``lmk`` (variant LMK id), ``kb_lmk`` (key-block LMK id), ``lmk_ids``, ``disabled``
(disabled PIN block formats) and the three optional steps (see :func:`iso_translate`).

Result: ``("00", {"pin_block", "mac", "mac_key", "pin_key"})`` (the candidate indexes that
matched), or ``(code, {"stage": "verify" | "pin" | "generate"})`` where ``code`` is the HSM error
code of the failing step (``01`` for a MAC that does not verify). Values never hold key bytes.
"""

from __future__ import annotations

import hmac
from typing import Any

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend
from hsmproxy.ops.data import Scope, resolve
from hsmproxy.ops.dukpt import dukpt_pin_key
from hsmproxy.ops.mac import MAC_USAGES, chained_mac, cmac
from hsmproxy.ops.pin import role_key, translate
from hsmproxy.ops.registry import OpResult, op

#: PIN key type code -> usage role of :data:`hsmproxy.ops.pin.USAGES`.
_PIN_ROLE = {"001": "ZPK", "002": "TPK"}
#: Decryption errors that mean "not this key" when several candidates are tried.
_WRONG_KEY = frozenset({"20", "24"})


def compute_mac(
    backend: Pkcs11Backend, scope: Scope, a: dict[str, Any], step: dict[str, Any], key: str
) -> bytes:
    """The MAC of ``step['data']`` under ``key`` (``step``: key_type, algorithm, padding, length)."""
    ref = {"key": key, "lmk_id": a["lmk"], "kb_lmk": a["kb_lmk"], "lmk_ids": a["lmk_ids"]}
    working = resolve(backend, scope, ref, "key", str(step["key_type"]), usages=MAC_USAGES)
    data = bytes(step["data"])
    algorithm = str(step["algorithm"])
    if algorithm == "cmac":
        mac = cmac(working, data)
    elif working.algorithm == "A":
        raise BackendError("15", "AES keys only support CMAC")
    else:
        mac = chained_mac(working, algorithm, data, bytes(8), int(step.get("padding", 1)), final=True)
    return mac[: int(step.get("length", 8))]


def _verify(backend: Pkcs11Backend, a: dict[str, Any], step: dict[str, Any]) -> int:
    """Index of the candidate key whose MAC matches; ``01`` when none does."""
    expected = bytes.fromhex(str(step["mac"]))
    for i, key in enumerate(step["keys"]):
        with Scope(backend) as scope:
            computed = compute_mac(backend, scope, a, {**step, "length": len(expected)}, key)
        if hmac.compare_digest(computed, expected):
            return i
    raise BackendError("01", "MAC verification failed")


def _pin(backend: Pkcs11Backend, a: dict[str, Any], step: dict[str, Any]) -> tuple[str, int]:
    """(translated PIN block hex, index of the incoming key candidate that decrypted it)."""
    fields = {
        "pin_block": str(step["pin_block"]),
        "source_format": str(step["source_format"]),
        "destination_format": str(step["destination_format"]),
        "pan": str(step["pan"]),
        "destination_zpk": str(step["destination"]),
        "zpk": str(step["destination"]),
        "ksn": str(step.get("ksn", "")),
    }
    last: BackendError | None = None
    sources = list(step["sources"])
    for i, source in enumerate(sources):
        pa = {"fields": {**fields, "source_zpk": source, "bdk": source}, "lmk": a["lmk"],
              "kb_lmk": a["kb_lmk"], "disabled": a["disabled"]}  # fmt: skip
        dst_type = str(step.get("destination_type", "001"))
        destination = ("destination_zpk", dst_type, _PIN_ROLE.get(dst_type, "ZPK"), "11")
        try:
            if step.get("dukpt"):
                pin_key = dukpt_pin_key(backend, pa)
                try:
                    dst = role_key(backend, pa, destination)
                    _, values = translate(backend, pa, pin_key, dst, fields["source_format"])
                finally:
                    pin_key.handle.destroy()
            else:
                src_type = str(step.get("source_type", "001"))
                src = role_key(backend, pa, ("source_zpk", src_type, _PIN_ROLE.get(src_type, "ZPK"), "10"))
                dst = role_key(backend, pa, destination)
                _, values = translate(backend, pa, src, dst, fields["source_format"])
        except BackendError as exc:
            if exc.code in _WRONG_KEY and i + 1 < len(sources):
                last = exc
                continue
            raise
        return str(values["pin_block"]), i
    raise last or BackendError("20", "no incoming PIN key")


def _splice(data: bytes, at: int, block_hex: str, binary: bool) -> bytes:
    """``data`` with the translated PIN block written over the placeholder at ``at``."""
    block = bytes.fromhex(block_hex) if binary else block_hex.encode("ascii")
    if at < 0 or at + len(block) > len(data):
        raise BackendError("15", "PIN block placeholder outside the message")
    return data[:at] + block + data[at + len(block) :]


@op("iso_translate")
def iso_translate(backend: Pkcs11Backend, a: dict[str, Any]) -> OpResult:
    """Verify the incoming MAC, translate field 52, MAC the outgoing message (each step optional).

    ``a["verify"]``: ``{"keys": [cryptogram, ...], "key_type", "algorithm": "1"|"3"|"cmac", "padding",
    "data": bytes, "mac": hex}``; ``a["pin"]``: ``{"sources": [cryptogram, ...], "source_type",
    "destination", "destination_type", "dukpt": bool, "ksn": hex, "pin_block": hex, "source_format",
    "destination_format", "pan"}``; ``a["generate"]``: ``{"key", "key_type", "algorithm", "padding",
    "length", "data": bytes, "pin_at": offset or -1, "pin_size": bytes of the placeholder,
    "pin_binary": bool}``.
    """
    values: dict[str, str | bytes] = {}
    stage = "verify"
    try:
        if a.get("verify"):
            values["mac_key"] = str(_verify(backend, a, a["verify"]))
        stage = "pin"
        pin_block = ""
        if a.get("pin"):
            pin_block, index = _pin(backend, a, a["pin"])
            values["pin_block"] = pin_block
            values["pin_key"] = str(index)
        stage = "generate"
        gen = a.get("generate")
        if gen:
            data = bytes(gen["data"])
            at = int(gen.get("pin_at", -1))
            if at >= 0 and pin_block:
                size = len(pin_block) // 2 if gen.get("pin_binary") else len(pin_block)
                if size != int(gen["pin_size"]):
                    stage = "pin"
                    raise BackendError("23", "translated PIN block does not fit field 52")
                data = _splice(data, at, pin_block, bool(gen.get("pin_binary")))
            with Scope(backend) as scope:
                values["mac"] = (
                    compute_mac(backend, scope, a, {**gen, "data": data}, str(gen["key"])).hex().upper()
                )
    except BackendError as exc:
        return exc.code, {"stage": stage}
    return "00", values
