"""Front-side RSA and hashing: EI, EW, EY -> ``rsa_generate``/``rsa_sign``/``rsa_verify``; GM -> ``digest``.

Flag checks answered here in the emulator's order: EI key type indicator / encoding, modulus length
(1024-4096, a multiple of 8) and exponent (3 or 65537) ``15``; EW/EY hash id, signature id and pad
mode ``15``, EW private key flag (``12`` for user storage 00-20, else ``15``); GM hash id ``15``;
then the LMK (``13``). Everything with key material runs on a node (GM too: the HSM hashes).
"""

from __future__ import annotations

from hsmproxy.commands.base import CommandContext, Handler, Immediate, Operation, lmk_id, text
from protocols.hostcmd.fields import Values

HASH_IDS = frozenset({"01", "05", "06", "07", "08"})


def _raw(v: Values, name: str) -> bytes:
    value = v.get(name, b"")
    return value if isinstance(value, bytes) else value.encode("latin-1")


def ei(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """EI: generate an RSA key pair on a node."""
    encoding = text(v, "public_key_encoding")
    if text(v, "key_type_indicator") not in ("0", "1", "2", "3", "4") or encoding not in ("01", "02"):
        return Immediate("15")
    exponent = int.from_bytes(_raw(v, "exponent"), "big") if "exponent" in v else 65537
    bits = int(text(v, "modulus_length"))
    if not 1024 <= bits <= 4096 or bits % 8 or exponent not in (3, 65537):
        return Immediate("15")
    lmk = lmk_id(v, ctx)
    if isinstance(lmk, Immediate):
        return lmk
    args = {"lmk_id": lmk, "bits": bits, "exponent": exponent, "encoding": encoding}
    return Operation("rsa_generate", args)


def _check_ids(v: Values) -> Immediate | None:
    if text(v, "hash_id") not in HASH_IDS:
        return Immediate("15")
    if text(v, "signature_id") != "01" or text(v, "pad_mode") != "01":
        return Immediate("15")
    return None


def ew(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """EW: sign with a private key under the LMK."""
    bad = _check_ids(v)
    if bad is not None:
        return bad
    flag = text(v, "private_key_flag")
    if flag != "99":
        return Immediate("12" if int(flag) <= 20 else "15")
    lmk = lmk_id(v, ctx)
    if isinstance(lmk, Immediate):
        return lmk
    return Operation(
        "rsa_sign",
        {
            "lmk_id": lmk,
            "hash_id": text(v, "hash_id"),
            "message": _raw(v, "message"),
            "private_key": _raw(v, "private_key"),
        },
    )


def ey(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """EY: verify a signature with a MAC'd public key."""
    bad = _check_ids(v)
    if bad is not None:
        return bad
    lmk = lmk_id(v, ctx)
    if isinstance(lmk, Immediate):
        return lmk
    return Operation(
        "rsa_verify",
        {
            "lmk_id": lmk,
            "hash_id": text(v, "hash_id"),
            "signature": _raw(v, "signature"),
            "message": _raw(v, "message"),
            "mac": _raw(v, "mac"),
            "public_key": _raw(v, "public_key"),
        },
    )


def gm(v: Values, ctx: CommandContext) -> Immediate | Operation:
    """GM: hash the data on a node."""
    hash_id = text(v, "hash_id")
    if hash_id not in HASH_IDS:
        return Immediate("15")
    return Operation("digest", {"hash_id": hash_id, "data": _raw(v, "data")})


HANDLERS: dict[str, Handler] = {"EI": ei, "EW": ew, "EY": ey, "GM": gm}
