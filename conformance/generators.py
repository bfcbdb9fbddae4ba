"""Random request generators: one per host command of the table.

Each generator takes a seeded :class:`random.Random` and a :class:`GenContext` and returns a
:class:`Generated`: the request (command code + data, no header), built with the shared table's
formatter so it always parses, and how to compare the two answers:

* ``check is None`` - **bytes**: the command is deterministic, the target's response must equal
  the reference's byte for byte;
* a :class:`RoundTrip` - the command has random output (new keys, random PINs, RSA key pairs,
  random PIN-block fill); the responses must have the same code and error, and the round-trip
  check must hold for *both* sides' outputs (e.g. the target's new key has the check value it
  claims, on the reference too).

Keys are random clear keys with odd parity encrypted under the public test LMK
(:data:`emulator.crypto.lmk.TEST_LMK`) with a random scheme the command accepts (none/Z single,
U/X double, T/Y triple). Round-trip checks decode values under the test LMK with
:mod:`emulator.crypto` (the runner runs alongside the emulator code), so both sides must hold the
test LMK as LMK id 00. Request seeds are ``f"{seed}/{command}/{index}"``: a reported difference is
reproduced with :func:`generate`.

Conventions the generators assume where the layout alone does not fix a meaning (they only
matter for "correct half the time" values, never for the byte comparison): KQ ARQC over the data
with the EMV common session key (R = ATC ‖ 0000 ‖ UN) and option A ICC key; M8 MAC algorithm
``1`` = ISO 9797-1 alg. 1, ``3`` = alg. 3, padding ``1``-``3`` = ISO 9797-1 methods; EY's 4-byte
public-key MAC is the one EI returned (or hsmproxy's definition, :func:`public_key_mac`); keys
under a ZMK use the variant scheme of the ZMK for U/T and plain ECB for X/Y/Z/none.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from cryptography.hazmat.primitives.asymmetric import rsa as _rsa

from emulator.app import TEST_KEYBLOCK_LMK
from emulator.crypto import card, dukpt, emv, pin_lmk, pinblock
from emulator.crypto import mac as macs
from emulator.crypto import rsa as ersa
from emulator.crypto.cipher import tdes_ecb_decrypt, tdes_ecb_encrypt
from emulator.crypto.errors import CryptoError
from emulator.crypto.hashes import hash_algorithm
from emulator.crypto.keyblock import unwrap_key_block
from emulator.crypto.lmk import (
    TEST_LMK,
    VariantLmk,
    adjust_parity,
    decrypt_key_under_lmk,
    encrypt_key_under_lmk,
    has_odd_parity,
    kcv_aes_cmac,
    kcv_tdes,
    lmk_variant,
)
from protocols.hostcmd.fields import Key, ParseError, Values, format_fields, parse
from protocols.hostcmd.table import COMMANDS

# -- results -------------------------------------------------------------------------------------


class Oracle(Protocol):
    """What a round-trip check may ask: one extra request to the reference."""

    async def reference(self, request: bytes) -> bytes:
        """Send ``request`` (code + data) to the reference; return the response without header."""
        ...


#: A round-trip check: (reference values, target values, oracle) -> None when it holds, else a
#: reason (never containing a key, PIN or PAN).
CheckFn = Callable[[Values, Values, Oracle], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """A named round-trip check for a command with random output."""

    name: str
    fn: CheckFn


@dataclass(frozen=True, slots=True)
class Generated:
    """A generated request and how to compare its answers."""

    command: str
    values: Values
    check: RoundTrip | None = None

    @property
    def request(self) -> bytes:
        """The request: command code + data (no header)."""
        return self.command.encode("ascii") + format_fields(COMMANDS[self.command].request, self.values)

    @property
    def compare(self) -> str:
        """``"bytes"`` or the round-trip check's name."""
        return "bytes" if self.check is None else self.check.name


@dataclass(slots=True)
class RsaMaterial:
    """An RSA key pair as EI returns it: private key under LMK (blob), DER public key and its MAC."""

    private_key: _rsa.RSAPrivateKey
    private_blob: bytes
    public_der: bytes
    public_mac: bytes


def public_key_mac(lmk: VariantLmk, der: bytes) -> bytes:
    """hsmproxy's public-key MAC (EI/EY): TDES CBC-MAC, padding 1, under LMK pair 36-37, 4 bytes."""
    return macs.cbc_mac(lmk.pair("36"), der, padding=1)[:4]


def _der_length(der: bytes, pos: int) -> tuple[int, int]:
    first = der[pos]
    if first < 0x80:
        return first, pos + 1
    n = first & 0x7F
    return int.from_bytes(der[pos + 1 : pos + 1 + n], "big"), pos + 1 + n


def decode_public_key(der: bytes) -> _rsa.RSAPublicKey:
    """A DER RSAPublicKey whose INTEGERs may be unsigned (EI encoding 01) or two's complement (02).

    Raises:
        ValueError: not a SEQUENCE of two INTEGERs.
    """
    if not der or der[0] != 0x30:
        raise ValueError("not a DER sequence")
    _, pos = _der_length(der, 1)
    numbers = []
    for _ in range(2):
        if der[pos] != 0x02:
            raise ValueError("not an INTEGER")
        n, pos = _der_length(der, pos + 1)
        numbers.append(int.from_bytes(der[pos : pos + n], "big"))
        pos += n
    return _rsa.RSAPublicNumbers(numbers[1], numbers[0]).public_key()


@dataclass(slots=True)
class GenContext:
    """Shared generator state: the LMK and the run's RSA key pair (made once, lazily)."""

    lmk: VariantLmk = TEST_LMK
    rsa: RsaMaterial | None = None
    _cache: dict[str, object] = field(default_factory=dict)

    def rsa_material(self, bits: int = 1024) -> RsaMaterial:
        """The run's RSA key pair (a local ``bits``-bit pair unless the runner set one from EI)."""
        if self.rsa is None:
            key = ersa.generate_rsa_key_pair(bits)
            der = ersa.public_key_der(key.public_key())
            self.rsa = RsaMaterial(
                key, ersa.encrypt_private_key_under_lmk(self.lmk, key), der, public_key_mac(self.lmk, der)
            )
        return self.rsa


Generator = Callable[[random.Random, GenContext], Generated]

# -- building blocks -----------------------------------------------------------------------------

SCHEME_BYTES: Mapping[str, int] = {"": 8, "Z": 8, "U": 16, "X": 16, "T": 24, "Y": 24}
ANY_SCHEME = ("", "Z", "U", "X", "T", "Y")
DOUBLE = ("U", "X")
DOUBLE_TRIPLE = ("U", "X", "T", "Y")
#: PIN block formats used in random mode (ISO-0, Diebold, ISO-1, ISO-3).
PIN_FORMATS = ("01", "03", "05", "47")
RANDOM_FILL_FORMATS = frozenset({"05", "47"})
HASH_IDS = ("01", "05", "06", "07", "08")
DEC_TABLES = ("0123456789012345", "1234567890123456", "9876543210987654")


def odd_key(rng: random.Random, n: int) -> bytes:
    """A random ``n``-byte DES key with odd parity."""
    return adjust_parity(rng.randbytes(n))


def lmk_key(
    rng: random.Random, ctx: GenContext, key_type: str, schemes: tuple[str, ...] = ANY_SCHEME
) -> tuple[str, bytes]:
    """A random key of ``key_type`` under the LMK: (key field value, clear key)."""
    scheme = rng.choice(schemes)
    clear = odd_key(rng, SCHEME_BYTES[scheme])
    return encrypt_key_under_lmk(ctx.lmk, key_type, scheme, clear), clear


def encrypt_under_zmk(zmk: bytes, scheme: str, clear: bytes) -> str:
    """``clear`` under a ZMK: U/T with the scheme variant of the ZMK, X/Y/Z/none plain ECB."""
    out = b""
    for i in range(len(clear) // 8):
        k = lmk_variant(zmk, 0, scheme, i) if scheme in ("U", "T") else zmk
        out += tdes_ecb_encrypt(k, clear[8 * i : 8 * i + 8])
    return scheme + out.hex().upper()


def random_pan(rng: random.Random) -> str:
    """A random 13-19 digit PAN."""
    n = rng.randint(13, 19)
    return rng.choice("3456") + "".join(rng.choice("0123456789") for _ in range(n - 1))


def random_pin(rng: random.Random, low: int = 4, high: int = 12) -> str:
    """A random PIN; short PINs are the common case."""
    n = rng.choice((4, 4, 4, 5, 6, 6, rng.randint(low, high)))
    n = max(low, min(high, n))
    return "".join(rng.choice("0123456789") for _ in range(n))


def digits(rng: random.Random, n: int) -> str:
    """``n`` random decimal digits."""
    return "".join(rng.choice("0123456789") for _ in range(n))


def hexs(rng: random.Random, n: int) -> str:
    """``n`` random uppercase hex characters."""
    return rng.randbytes((n + 1) // 2).hex().upper()[:n]


def clear_pin_block(rng: random.Random, fmt: str, pin: str, account: str) -> bytes:
    """The clear 8-byte PIN block, with seeded fill for the random-fill formats."""
    pad = 14 - len(pin)
    fill = None
    if fmt == "05":
        fill = "".join(rng.choice("0123456789ABCDEF") for _ in range(pad))
    elif fmt == "47":
        fill = "".join(rng.choice("ABCDEF") for _ in range(pad))
    return pinblock.encode_pin_block(fmt, pin, account, fill=fill)


def enc_pin_block(rng: random.Random, key: bytes, fmt: str, pin: str, account: str) -> str:
    """A PIN block encrypted under a TDES PIN key (16 hex)."""
    return tdes_ecb_encrypt(key, clear_pin_block(rng, fmt, pin, account)).hex().upper()


def maybe_lmk_id(rng: random.Random, values: Values) -> Values:
    """Add an explicit ``%00`` LMK identifier to one request in ten."""
    if rng.random() < 0.1:
        values["lmk_id"] = "00"
    return values


def random_ksn(rng: random.Random) -> bytes:
    """A TDES DUKPT KSN (10 bytes) with a counter of 1-10 one bits."""
    counter = 0
    for bit in rng.sample(range(21), rng.randint(1, 10)):
        counter |= 1 << bit
    prefix = int.from_bytes(rng.randbytes(8), "big") & ~((1 << 21) - 1) & ((1 << 64) - 1)
    return rng.randbytes(2) + (prefix | counter).to_bytes(8, "big")


# -- responses -----------------------------------------------------------------------------------


def parse_response(command: str, payload: bytes, request_values: Values) -> Values:
    """Parse a successful response payload (code + error + data) with the table's response layout.

    A0 is parsed by hand: its layout's optional key under ZMK (``Present``) cannot be told from
    the check value that follows it, so the key under ZMK is whatever lies between the key under
    LMK and the last 6 characters.

    Raises:
        ParseError: the response does not fit the layout.
    """
    body = payload[4:]
    if command == "A0":
        out: Values = {}
        end = Key("key_lmk").parse(body, 0, out, {})
        if len(body) - end < 6:
            raise ParseError("15", "kcv", "missing")
        if len(body) - end > 6:
            Key("key_zmk").parse(body[: len(body) - 6], end, out, {})
        out["kcv"] = body[-6:].decode("latin-1")
        return out
    return parse(COMMANDS[command].response, body, request_values).values


# -- round-trip checks ---------------------------------------------------------------------------


def _text(v: Values, name: str) -> str:
    value = v.get(name, "")
    return value if isinstance(value, str) else value.decode("latin-1")


def pin_block_check(dest_key: bytes, fmt: str, account: str, pin: str) -> RoundTrip:
    """Translation into a random-fill format: both blocks decrypt to ``pin``; other fields equal."""

    async def fn(ref: Values, tgt: Values, oracle: Oracle) -> str | None:
        for name in ref.keys() | tgt.keys():
            if name != "pin_block" and ref.get(name) != tgt.get(name):
                return f"field {name} differs"
        for side, v in (("reference", ref), ("target", tgt)):
            try:
                block = tdes_ecb_decrypt(dest_key, bytes.fromhex(_text(v, "pin_block")))
                got = pinblock.decode_pin_block(fmt, block, account)
            except (CryptoError, ValueError):
                return f"{side} PIN block does not decode under the destination key"
            if got != pin:
                return f"{side} PIN block holds another PIN"
        return None

    return RoundTrip("pin-decrypt", fn)


def _kcv_of_lmk_key(ctx: GenContext, key_type: str, value: str) -> tuple[bytes, str] | None:
    try:
        if value.startswith("S"):
            header, clear = unwrap_key_block(TEST_KEYBLOCK_LMK, value)
            if header.algorithm == "A":
                return clear, kcv_aes_cmac(clear)[:3].hex().upper()
        else:
            clear = decrypt_key_under_lmk(ctx.lmk, key_type, value)
    except CryptoError:
        return None
    return clear, kcv_tdes(clear)[:3].hex().upper()


def new_key_check(ctx: GenContext, key_type: str) -> RoundTrip:
    """A0: each side's new key has odd parity and the KCV it returned; BU on the reference agrees."""

    async def fn(ref: Values, tgt: Values, oracle: Oracle) -> str | None:
        if len(_text(ref, "key_lmk")) != len(_text(tgt, "key_lmk")):
            return "key under LMK has another length/scheme"
        if ("key_zmk" in ref) != ("key_zmk" in tgt) or len(_text(ref, "key_zmk")) != len(
            _text(tgt, "key_zmk")
        ):
            return "key under ZMK differs in presence or length"
        for side, v in (("reference", ref), ("target", tgt)):
            got = _kcv_of_lmk_key(ctx, key_type, _text(v, "key_lmk"))
            if got is None:
                return f"{side} key does not decrypt under the LMK"
            clear, kcv = got
            if not _text(v, "key_lmk").startswith("S") and not has_odd_parity(clear):
                return f"{side} key has even parity"
            if kcv != _text(v, "kcv"):
                return f"{side} KCV does not match its key"
        key = _text(tgt, "key_lmk")
        flag = (
            "1"
            if key.startswith("S")
            else {8: "0", 16: "1", 24: "2"}[SCHEME_BYTES[key[0] if key[0] in "ZUXTY" else ""]]
        )
        resp = await oracle.reference(f"BUFF{flag}{key};{key_type};001".encode("ascii"))
        if resp[2:4] == b"00" and resp[4:10].decode("latin-1") != _text(tgt, "kcv"):
            return "reference BU gives another check value for the target's key"
        return None

    return RoundTrip("kcv-via-BU", fn)


def random_pin_check(ctx: GenContext, account: str, length: int) -> RoundTrip:
    """JA: each side's PIN under LMK decodes (test LMK) to a PIN of the requested length."""

    async def fn(ref: Values, tgt: Values, oracle: Oracle) -> str | None:
        for side, v in (("reference", ref), ("target", tgt)):
            try:
                pin = pin_lmk.decrypt_pin_under_lmk(ctx.lmk, _text(v, "pin_lmk"), account)
            except CryptoError:
                return f"{side} PIN under LMK does not decode"
            if len(pin) != length:
                return f"{side} PIN has the wrong length"
        return None

    return RoundTrip("pin-lmk-decode", fn)


def rsa_pair_check(ctx: GenContext, modulus_bits: int) -> RoundTrip:
    """EI: the target's private key signs (EW on the reference) what its public key verifies."""

    async def fn(ref: Values, tgt: Values, oracle: Oracle) -> str | None:
        for side, v in (("reference", ref), ("target", tgt)):
            der = v.get("public_key")
            try:
                assert isinstance(der, bytes)
                pub = decode_public_key(der)
            except (AssertionError, ValueError, IndexError):
                return f"{side} public key is not a DER RSA key"
            if pub.key_size != modulus_bits:
                return f"{side} modulus has the wrong length"
        blob = tgt["private_key"]
        assert isinstance(blob, bytes)
        der = tgt["public_key"]
        assert isinstance(der, bytes)
        pub = decode_public_key(der)
        message = b"hsmproxy conformance EI round trip"
        req = b"EW060101%04d" % len(message) + message + b";99%04d" % len(blob) + blob
        resp = await oracle.reference(req)
        if resp[2:4] == b"00":
            sig_len = int(resp[4:8])
            signature = resp[8 : 8 + sig_len]
            try:
                pub.verify(signature, message, rsa_padding.PKCS1v15(), hash_algorithm("06"))
            except Exception:
                return "signature by the target's private key (EW on reference) does not verify"
            return None
        try:  # the reference has no EW: decode the private key locally
            priv = ersa.decrypt_private_key_under_lmk(ctx.lmk, blob)
        except CryptoError:
            return "target private key does not decrypt under the LMK"
        if priv.public_key().public_numbers() != pub.public_numbers():
            return "target private key does not match its public key"
        return None

    return RoundTrip("rsa-sign-verify", fn)


# -- generators ----------------------------------------------------------------------------------


def _g(command: str, values: Values, check: RoundTrip | None = None) -> Generated:
    return Generated(command, values, check)


def gen_nc(rng: random.Random, ctx: GenContext) -> Generated:
    """NC: diagnostics, with or without an LMK id (00, 01, or an unknown one)."""
    values: Values = {}
    r = rng.random()
    if r < 0.3:
        values["lmk_id"] = rng.choice(("00", "01", "07"))
    return _g("NC", values)


def gen_no(rng: random.Random, ctx: GenContext) -> Generated:
    """NO: status, mode 00 or 01."""
    return _g("NO", {"mode": rng.choice(("00", "01"))})


def gen_b2(rng: random.Random, ctx: GenContext) -> Generated:
    """B2: echo of 0-300 random bytes."""
    data = rng.randbytes(rng.randint(0, 300))
    return _g("B2", {"length": f"{len(data):04X}", "data": data})


def gen_gm(rng: random.Random, ctx: GenContext) -> Generated:
    """GM: hash 0-2000 random bytes with a random hash id."""
    data = rng.randbytes(rng.choice((0, 3, rng.randint(0, 2000))))
    return _g("GM", {"hash_id": rng.choice(HASH_IDS), "data_length": f"{len(data):05d}", "data": data})


#: Key types A0/A6/A8/BU generate or translate (variant LMK) and the schemes each accepts.
KEY_TYPES: Mapping[str, tuple[str, ...]] = {
    "000": DOUBLE_TRIPLE,
    "001": ANY_SCHEME,
    "002": ANY_SCHEME,
    "003": ANY_SCHEME,
    "008": ANY_SCHEME,
    "009": DOUBLE,
    "00A": ANY_SCHEME,
    "00B": ANY_SCHEME,
    "109": DOUBLE,
    "402": DOUBLE,
}
_LMK_SCHEMES_BY_LENGTH: Mapping[int, tuple[str, ...]] = {8: ("Z",), 16: ("U", "X"), 24: ("T", "Y")}


#: Key-block usages A0 asks for when generating an ``S`` key (key type FFF).
_KB_USAGES = ("P0", "K0", "M3", "D0", "B0", "C0", "V2")


def gen_a0(rng: random.Random, ctx: GenContext) -> Generated:
    """A0: generate a key (mode 0 or 1 with a ZMK; 15 % key blocks); round-trip: KCV via BU."""
    if rng.random() < 0.15:
        values: Values = {"mode": "0", "key_type": "FFF", "key_scheme_lmk": "S"}
        values.update(
            kb_usage=rng.choice(_KB_USAGES),
            kb_algorithm=rng.choice(("T2", "T3", "A1", "A2", "A3")),
            kb_mode_of_use="N",
            kb_version="00",
            kb_exportability=rng.choice("EN"),
            kb_optional_blocks="00",
        )
        return _g("A0", values, new_key_check(ctx, "FFF"))
    key_type = rng.choice(list(KEY_TYPES))
    scheme = rng.choice([s or "Z" for s in KEY_TYPES[key_type]])
    values = {"mode": rng.choice("01"), "key_type": key_type, "key_scheme_lmk": scheme}
    if values["mode"] == "1":
        values["zmk_tmk_flag"] = "0"
        values["zmk"] = lmk_key(rng, ctx, "000", DOUBLE_TRIPLE)[0]
        values["key_scheme_zmk"] = rng.choice(_LMK_SCHEMES_BY_LENGTH[SCHEME_BYTES[scheme]])
    return _g("A0", maybe_lmk_id(rng, values), new_key_check(ctx, key_type))


def gen_a6(rng: random.Random, ctx: GenContext) -> Generated:
    """A6: import a key from under a ZMK (deterministic output schemes only)."""
    key_type = rng.choice(list(KEY_TYPES))
    zmk_value, zmk = lmk_key(rng, ctx, "000", DOUBLE_TRIPLE)
    scheme = rng.choice(KEY_TYPES[key_type])
    clear = odd_key(rng, SCHEME_BYTES[scheme])
    values: Values = {
        "key_type": key_type,
        "zmk": zmk_value,
        "key_zmk": encrypt_under_zmk(zmk, scheme, clear),
        "key_scheme_lmk": rng.choice(_LMK_SCHEMES_BY_LENGTH[len(clear)]),
    }
    return _g("A6", maybe_lmk_id(rng, values))


def gen_a8(rng: random.Random, ctx: GenContext) -> Generated:
    """A8: export a key under a ZMK (variant / X9.17 schemes: deterministic)."""
    key_type = rng.choice(list(KEY_TYPES))
    key_value, clear = lmk_key(rng, ctx, key_type, KEY_TYPES[key_type])
    values: Values = {
        "key_type": key_type,
        "zmk": lmk_key(rng, ctx, "000", DOUBLE_TRIPLE)[0],
        "key_lmk": key_value,
        "key_scheme_zmk": rng.choice(_LMK_SCHEMES_BY_LENGTH[len(clear)]),
    }
    return _g("A8", maybe_lmk_id(rng, values))


def gen_bu(rng: random.Random, ctx: GenContext) -> Generated:
    """BU: check value of a key, legacy 2-character type or FF + 3-character type, KCV type 0/1."""
    key_type = rng.choice(list(KEY_TYPES))
    key_value, clear = lmk_key(rng, ctx, key_type, KEY_TYPES[key_type])
    flag = {8: "0", 16: "1", 24: "2"}[len(clear)]
    values: Values = {"key_length_flag": flag, "key": key_value}
    if key_type[0] == "0" and rng.random() < 0.3:
        values["key_type_code"] = key_type[1:]
    else:
        values["key_type_code"] = "FF"
        values["key_type"] = key_type
    if rng.random() < 0.5:
        values["reserved"] = "00"
        values["kcv_type"] = rng.choice("01")
    return _g("BU", maybe_lmk_id(rng, values))


def gen_fa(rng: random.Random, ctx: GenContext) -> Generated:
    """FA: translate a ZPK from under a ZMK to under the LMK."""
    zmk_value, zmk = lmk_key(rng, ctx, "000", DOUBLE_TRIPLE)
    scheme = rng.choice(ANY_SCHEME)
    clear = odd_key(rng, SCHEME_BYTES[scheme])
    values: Values = {"zmk": zmk_value, "zpk_zmk": encrypt_under_zmk(zmk, scheme, clear)}
    if rng.random() < 0.5:
        values["key_scheme_zmk"] = rng.choice(_LMK_SCHEMES_BY_LENGTH[len(clear)])
        values["key_scheme_lmk"] = rng.choice(_LMK_SCHEMES_BY_LENGTH[len(clear)])
        values["kcv_type"] = rng.choice("01")
    return _g("FA", maybe_lmk_id(rng, values))


def _translate(
    rng: random.Random,
    ctx: GenContext,
    command: str,
    src_type: str,
    src_field: str,
    dst_field: str,
) -> Generated:
    src_value, src = lmk_key(rng, ctx, src_type)
    dst_value, dst = lmk_key(rng, ctx, "001")
    pan = random_pan(rng)
    account = pinblock.account_from_pan(pan)
    pin = random_pin(rng)
    src_fmt, dst_fmt = rng.choice(PIN_FORMATS), rng.choice(PIN_FORMATS)
    values: Values = {
        src_field: src_value,
        dst_field: dst_value,
        "max_pin_length": "12",
        "pin_block": enc_pin_block(rng, src, src_fmt, pin, account),
        "source_format": src_fmt,
        "destination_format": dst_fmt,
        "account": account,
    }
    check = pin_block_check(dst, dst_fmt, account, pin) if dst_fmt in RANDOM_FILL_FORMATS else None
    return _g(command, maybe_lmk_id(rng, values), check)


def gen_ca(rng: random.Random, ctx: GenContext) -> Generated:
    """CA: PIN from TPK to ZPK, random formats 01/03/05/47."""
    return _translate(rng, ctx, "CA", "002", "tpk", "zpk")


def gen_cc(rng: random.Random, ctx: GenContext) -> Generated:
    """CC: PIN from ZPK to ZPK, random formats 01/03/05/47."""
    return _translate(rng, ctx, "CC", "001", "source_zpk", "destination_zpk")


def _dukpt(rng: random.Random, ctx: GenContext, command: str) -> Generated:
    bdk_value, bdk = lmk_key(rng, ctx, "009", DOUBLE)
    zpk_value, zpk = lmk_key(rng, ctx, "001")
    ksn = random_ksn(rng)
    pin_key = dukpt.tdes_working_key(bdk, ksn, "pin")
    pan = random_pan(rng)
    account = pinblock.account_from_pan(pan)
    pin = random_pin(rng)
    src_fmt = "01" if command == "CI" or rng.random() < 0.6 else rng.choice(PIN_FORMATS)
    dst_fmt = rng.choice(PIN_FORMATS)
    values: Values = {
        "bdk": bdk_value,
        "zpk": zpk_value,
        "ksn_descriptor": "A05",
        "ksn": ksn.hex().upper(),
        "pin_block": enc_pin_block(rng, pin_key, src_fmt, pin, account),
        "destination_format": dst_fmt,
        "account": account,
    }
    if command == "G0":
        values["source_format"] = src_fmt
    check = pin_block_check(zpk, dst_fmt, account, pin) if dst_fmt in RANDOM_FILL_FORMATS else None
    return _g(command, maybe_lmk_id(rng, values), check)


def gen_ci(rng: random.Random, ctx: GenContext) -> Generated:
    """CI: DUKPT PIN (random BDK, KSN and counter) to a ZPK."""
    return _dukpt(rng, ctx, "CI")


def gen_g0(rng: random.Random, ctx: GenContext) -> Generated:
    """G0: DUKPT PIN (random BDK, KSN and counter, source format) to a ZPK."""
    return _dukpt(rng, ctx, "G0")


def gen_ja(rng: random.Random, ctx: GenContext) -> Generated:
    """JA: random PIN of length 4-12; round-trip: the PIN under LMK decodes to that length."""
    account = digits(rng, 12)
    length = rng.randint(4, 12)
    values: Values = {"account": account, "pin_length": f"{length:02d}"}
    return _g("JA", maybe_lmk_id(rng, values), random_pin_check(ctx, account, length))


def _to_lmk(rng: random.Random, ctx: GenContext, command: str, key_type: str, field_name: str) -> Generated:
    key_value, key = lmk_key(rng, ctx, key_type)
    account = pinblock.account_from_pan(random_pan(rng))
    fmt = rng.choice(PIN_FORMATS)
    values: Values = {
        field_name: key_value,
        "pin_block": enc_pin_block(rng, key, fmt, random_pin(rng), account),
        "format": fmt,
        "account": account,
    }
    return _g(command, maybe_lmk_id(rng, values))


def gen_jc(rng: random.Random, ctx: GenContext) -> Generated:
    """JC: PIN block under a TPK to PIN under LMK."""
    return _to_lmk(rng, ctx, "JC", "002", "tpk")


def gen_je(rng: random.Random, ctx: GenContext) -> Generated:
    """JE: PIN block under a ZPK to PIN under LMK."""
    return _to_lmk(rng, ctx, "JE", "001", "zpk")


def gen_jg(rng: random.Random, ctx: GenContext) -> Generated:
    """JG: PIN under LMK to a PIN block under a ZPK (random-fill formats checked by decryption)."""
    zpk_value, zpk = lmk_key(rng, ctx, "001")
    account = digits(rng, 12)
    pin = random_pin(rng)
    fmt = rng.choice(PIN_FORMATS)
    values: Values = {
        "zpk": zpk_value,
        "format": fmt,
        "account": account,
        "pin_lmk": pin_lmk.encrypt_pin_under_lmk(ctx.lmk, pin, account),
    }
    check = pin_block_check(zpk, fmt, account, pin) if fmt in RANDOM_FILL_FORMATS else None
    return _g("JG", maybe_lmk_id(rng, values), check)


def _validation_data(rng: random.Random) -> str:
    vd = hexs(rng, 12)
    if rng.random() < 0.5:
        i = rng.randint(0, 11)
        vd = vd[:i] + "N" + vd[i + 1 :]
    return vd


def _ibm_offset(pvk: bytes, pin: str, dec: str, vd: str, account: str) -> str:
    return card.ibm3624_offset(pvk, pin, dec, card.thales_validation_data(vd, account))


def _ibm_verify(
    rng: random.Random, ctx: GenContext, command: str, key_type: str, field_name: str
) -> Generated:
    key_value, key = lmk_key(rng, ctx, key_type)
    pvk_value, pvk = lmk_key(rng, ctx, "002", DOUBLE)
    account = pinblock.account_from_pan(random_pan(rng))
    pin = random_pin(rng)
    fmt = rng.choice(PIN_FORMATS)
    dec, vd = rng.choice(DEC_TABLES), _validation_data(rng)
    check_length = rng.randint(4, len(pin))
    if rng.random() < 0.5:
        offset = _ibm_offset(pvk, pin, dec, vd, account)[:check_length]
    else:
        offset = digits(rng, check_length)
    values: Values = {
        field_name: key_value,
        "pvk": pvk_value,
        "max_pin_length": "12",
        "pin_block": enc_pin_block(rng, key, fmt, pin, account),
        "format": fmt,
        "check_length": f"{check_length:02d}",
        "account": account,
        "decimalisation_table": dec,
        "validation_data": vd,
        "offset": offset.ljust(12, "F"),
    }
    return _g(command, maybe_lmk_id(rng, values))


def gen_da(rng: random.Random, ctx: GenContext) -> Generated:
    """DA: verify a terminal PIN (IBM 3624), correct offset half the time."""
    return _ibm_verify(rng, ctx, "DA", "002", "tpk")


def gen_ea(rng: random.Random, ctx: GenContext) -> Generated:
    """EA: verify an interchange PIN (IBM 3624), correct offset half the time."""
    return _ibm_verify(rng, ctx, "EA", "001", "zpk")


def _pvv_verify(
    rng: random.Random, ctx: GenContext, command: str, key_type: str, field_name: str
) -> Generated:
    key_value, key = lmk_key(rng, ctx, key_type)
    pvk_value, pvk = lmk_key(rng, ctx, "002", DOUBLE)
    account = pinblock.account_from_pan(random_pan(rng))
    pin = random_pin(rng)
    fmt = rng.choice(PIN_FORMATS)
    pvki = rng.choice("0123456")
    pvv = card.generate_pvv(pvk, pin, account, pvki) if rng.random() < 0.5 else digits(rng, 4)
    values: Values = {
        field_name: key_value,
        "pvk": pvk_value,
        "pin_block": enc_pin_block(rng, key, fmt, pin, account),
        "format": fmt,
        "account": account,
        "pvki": pvki,
        "pvv": pvv,
    }
    return _g(command, maybe_lmk_id(rng, values))


def gen_dc(rng: random.Random, ctx: GenContext) -> Generated:
    """DC: verify a terminal PIN (Visa PVV), correct PVV half the time."""
    return _pvv_verify(rng, ctx, "DC", "002", "tpk")


def gen_ec(rng: random.Random, ctx: GenContext) -> Generated:
    """EC: verify an interchange PIN (Visa PVV), correct PVV half the time."""
    return _pvv_verify(rng, ctx, "EC", "001", "zpk")


def gen_de(rng: random.Random, ctx: GenContext) -> Generated:
    """DE: IBM offset from a PIN under LMK."""
    pvk_value, _ = lmk_key(rng, ctx, "002", DOUBLE)
    account = digits(rng, 12)
    pin = random_pin(rng)
    values: Values = {
        "pvk": pvk_value,
        "pin_lmk": pin_lmk.encrypt_pin_under_lmk(ctx.lmk, pin, account),
        "check_length": f"{rng.randint(4, len(pin)):02d}",
        "account": account,
        "decimalisation_table": rng.choice(DEC_TABLES),
        "validation_data": _validation_data(rng),
    }
    return _g("DE", maybe_lmk_id(rng, values))


def gen_ee(rng: random.Random, ctx: GenContext) -> Generated:
    """EE: derive a PIN from an IBM offset."""
    pvk_value, _ = lmk_key(rng, ctx, "002", DOUBLE)
    n = rng.randint(4, 12)
    values: Values = {
        "pvk": pvk_value,
        "offset": digits(rng, n).ljust(12, "F"),
        "check_length": f"{n:02d}",
        "account": digits(rng, 12),
        "decimalisation_table": rng.choice(DEC_TABLES),
        "validation_data": _validation_data(rng),
    }
    return _g("EE", maybe_lmk_id(rng, values))


def gen_dg(rng: random.Random, ctx: GenContext) -> Generated:
    """DG: Visa PVV from a PIN under LMK."""
    pvk_value, _ = lmk_key(rng, ctx, "002", DOUBLE)
    account = digits(rng, 12)
    values: Values = {
        "pvk": pvk_value,
        "pin_lmk": pin_lmk.encrypt_pin_under_lmk(ctx.lmk, random_pin(rng), account),
        "account": account,
        "pvki": rng.choice("0123456"),
    }
    return _g("DG", maybe_lmk_id(rng, values))


def gen_fw(rng: random.Random, ctx: GenContext) -> Generated:
    """FW: Visa PVV from a PIN block under a TPK (002) or ZPK (001)."""
    key_type = rng.choice(("001", "002"))
    key_value, key = lmk_key(rng, ctx, key_type)
    pvk_value, _ = lmk_key(rng, ctx, "002", DOUBLE)
    account = pinblock.account_from_pan(random_pan(rng))
    fmt = rng.choice(PIN_FORMATS)
    values: Values = {
        "key_type": key_type,
        "pin_key": key_value,
        "pvk": pvk_value,
        "pin_block": enc_pin_block(rng, key, fmt, random_pin(rng), account),
        "format": fmt,
        "account": account,
        "pvki": rng.choice("0123456"),
    }
    return _g("FW", maybe_lmk_id(rng, values))


def _card(rng: random.Random) -> tuple[str, str, str]:
    return random_pan(rng), digits(rng, 4), rng.choice(("101", "000", "999", "201", digits(rng, 3)))


def gen_cw(rng: random.Random, ctx: GenContext) -> Generated:
    """CW: CVV/CVV2/iCVV of a random card."""
    cvk_value, _ = lmk_key(rng, ctx, "402", DOUBLE)
    pan, expiry, service_code = _card(rng)
    values: Values = {"cvk": cvk_value, "pan": pan, "expiry": expiry, "service_code": service_code}
    return _g("CW", maybe_lmk_id(rng, values))


def gen_cy(rng: random.Random, ctx: GenContext) -> Generated:
    """CY: verify a CVV, correct half the time."""
    cvk_value, cvk = lmk_key(rng, ctx, "402", DOUBLE)
    pan, expiry, service_code = _card(rng)
    cvv = card.generate_cvv(cvk, pan, expiry, service_code) if rng.random() < 0.5 else digits(rng, 3)
    values: Values = {
        "cvk": cvk_value,
        "cvv": cvv,
        "pan": pan,
        "expiry": expiry,
        "service_code": service_code,
    }
    return _g("CY", maybe_lmk_id(rng, values))


def _message(rng: random.Random, input_format: str, nbytes: int) -> bytes:
    if input_format == "1":
        return rng.randbytes(nbytes).hex().upper().encode("ascii")
    if input_format == "2":
        return bytes(rng.randint(0x20, 0x7E) for _ in range(nbytes))
    return rng.randbytes(nbytes)


def _data(rng: random.Random, ctx: GenContext, command: str) -> Generated:
    mode = rng.choice(("00", "01", "01", "02", "03"))
    input_format = rng.choice("012")
    key_type = rng.choice(("00A", "00B", "00A", "00B", "009"))
    key_value, _ = lmk_key(rng, ctx, key_type, DOUBLE if key_type == "009" else ANY_SCHEME)
    nbytes = 8 * rng.randint(0, 40) if rng.random() < 0.85 else rng.randint(1, 100)
    message = _message(rng, input_format, nbytes)
    values: Values = {
        "mode": mode,
        "input_format": input_format,
        "output_format": rng.choice("01"),
        "key_type": key_type,
        "key": key_value,
        "message_length": f"{len(message):04X}",
        "message": message,
    }
    if key_type == "009":
        values["ksn_descriptor"] = "A05"
        values["ksn"] = random_ksn(rng).hex().upper()
    if mode != "00":
        values["iv"] = hexs(rng, 16)
    return _g(command, maybe_lmk_id(rng, values))


def gen_m0(rng: random.Random, ctx: GenContext) -> Generated:
    """M0: encrypt random data (ECB/CBC/CFB, binary/hex/text input) under a ZEK/DEK/DUKPT BDK."""
    return _data(rng, ctx, "M0")


def gen_m2(rng: random.Random, ctx: GenContext) -> Generated:
    """M2: decrypt random data under a ZEK/DEK/DUKPT BDK."""
    return _data(rng, ctx, "M2")


def _mac_values(rng: random.Random, ctx: GenContext) -> tuple[Values, bytes, bytes]:
    mode = rng.choice(("0", "0", "0", "1", "2", "3"))
    algorithm = rng.choice(("1", "3", "1", "3", "6"))
    key_type = rng.choice(("003", "008"))
    key_value, key = lmk_key(rng, ctx, key_type, DOUBLE if algorithm in "36" else ANY_SCHEME)
    input_format = rng.choice("012")
    nbytes = rng.choice((8 * rng.randint(0, 30), rng.randint(0, 200)))
    message = _message(rng, input_format, nbytes)
    values: Values = {
        "mode": mode,
        "input_format": input_format,
        "mac_size": rng.choice("01"),
        "mac_algorithm": algorithm,
        "padding": rng.choice("0123"),
        "key_type": key_type,
        "key": key_value,
        "message_length": f"{len(message):04X}",
        "message": message,
    }
    if mode in ("2", "3"):
        values["iv"] = hexs(rng, 16)
    data = bytes.fromhex(message.decode("ascii")) if input_format == "1" else message
    return values, key, data


def gen_m6(rng: random.Random, ctx: GenContext) -> Generated:
    """M6: MAC over random data (ISO 9797-1 alg 1/3, CMAC; padding 0-3; single/multi-block modes)."""
    return _g("M6", maybe_lmk_id(rng, _mac_values(rng, ctx)[0]))


def _expected_mac(values: Values, key: bytes, data: bytes) -> bytes | None:
    try:
        padding = int(_text(values, "padding"))
        if padding == 0:
            if len(data) % 8 or not data:
                return None
            padding = 1
        if _text(values, "mac_algorithm") == "1":
            return macs.cbc_mac(key, data, padding=padding)
        if _text(values, "mac_algorithm") == "3":
            return macs.retail_mac(key, data, padding=padding)
    except CryptoError:
        return None
    return None


def gen_m8(rng: random.Random, ctx: GenContext) -> Generated:
    """M8: verify a MAC, computed (assumed conventions) half the time, random otherwise."""
    values, key, data = _mac_values(rng, ctx)
    if values["mode"] in ("0", "3"):
        n = 8 if values["mac_size"] == "0" else 16
        mac = _expected_mac(values, key, data) if values["mode"] == "0" and rng.random() < 0.5 else None
        values["mac"] = mac.hex().upper()[:n] if mac is not None else hexs(rng, n)
    return _g("M8", maybe_lmk_id(rng, values))


def gen_ms(rng: random.Random, ctx: GenContext) -> Generated:
    """MS: X9.19 MAC of a large message block (block 0-3, TAK/ZAK, single/double key)."""
    block = rng.choice("0123")
    key_type = rng.choice("01")
    key_length = rng.choice("01")
    key_value, _ = lmk_key(
        rng, ctx, "003" if key_type == "0" else "008", ("", "Z") if key_length == "0" else DOUBLE
    )
    message_type = rng.choice("01")
    nbytes = 8 * rng.randint(1, 60) if rng.random() < 0.8 else rng.randint(1, 300)
    message = _message(rng, "1" if message_type == "1" else "0", nbytes)
    values: Values = {
        "block_number": block,
        "key_type": key_type,
        "key_length": key_length,
        "message_type": message_type,
        "key": key_value,
        "message_length": f"{nbytes:04X}",  # bytes, also for hex messages
        "message": message,
    }
    if block in ("2", "3"):
        values["iv"] = hexs(rng, 16)
    return _g("MS", maybe_lmk_id(rng, values))


def gen_kq(rng: random.Random, ctx: GenContext) -> Generated:
    """KQ: ARQC verification (+ ARPC), a correct ARQC half the time, wrong otherwise."""
    mk_value, mk = lmk_key(rng, ctx, "109", DOUBLE)
    pan, psn = digits(rng, rng.randint(14, 19)), digits(rng, 2)
    atc, un = rng.randbytes(2), rng.randbytes(4)
    data = rng.randbytes(rng.choice((8, 16, 24, 32, rng.randint(1, 64))))
    mode = rng.choice("0122")
    arqc = rng.randbytes(8)
    if rng.random() < 0.5:
        icc = emv.derive_icc_mk(mk, pan, psn)
        sk = emv.derive_common_session_key(icc, emv.common_sk_diversification(atc, un))
        arqc = emv.generate_arqc(sk, data)
    values: Values = {
        "mode": mode,
        "scheme_id": rng.choice("0112"),
        "mk_ac": mk_value,
        "pan_psn": bytes.fromhex((pan + psn)[-16:]),
        "atc": atc,
        "unpredictable_number": un,
        "data_length": f"{len(data):02X}",
        "data": data,
        "arqc": arqc,
    }
    if mode in ("1", "2"):
        values["arc"] = rng.randbytes(2)
    if mode == "2":  # ARPC only: no transaction data
        del values["data_length"], values["data"]
    return _g("KQ", maybe_lmk_id(rng, values))


#: EI moduli used in random mode: small, to keep key generation fast (below 1024 may answer 15).
EI_MODULI = (512, 768, 1024, 1024)


def gen_ei(rng: random.Random, ctx: GenContext) -> Generated:
    """EI: RSA key pair of a small modulus; round-trip: EW with the target's key, verify locally."""
    bits = rng.choice(EI_MODULI)
    values: Values = {
        "key_type_indicator": rng.choice("0123"),
        "modulus_length": f"{bits:04d}",
        "public_key_encoding": rng.choice(("01", "02")),
    }
    if rng.random() < 0.3:
        exponent = rng.choice((3, 65537))
        values["exponent_length"] = f"{exponent.bit_length():04d}"
        values["exponent"] = exponent.to_bytes((exponent.bit_length() + 7) // 8, "big")
    return _g("EI", maybe_lmk_id(rng, values), rsa_pair_check(ctx, bits))


def gen_ew(rng: random.Random, ctx: GenContext) -> Generated:
    """EW: PKCS#1 v1.5 signature of random data with the run's RSA key (deterministic)."""
    material = ctx.rsa_material()
    message = rng.randbytes(rng.randint(0, 400))
    values: Values = {
        "hash_id": rng.choice(HASH_IDS),
        "signature_id": "01",
        "pad_mode": "01",
        "message_length": f"{len(message):04d}",
        "message": message,
        "private_key_flag": "99",
        "private_key_length": f"{len(material.private_blob):04d}",
        "private_key": material.private_blob,
    }
    return _g("EW", maybe_lmk_id(rng, values))


def gen_ey(rng: random.Random, ctx: GenContext) -> Generated:
    """EY: verify a signature by the run's RSA key, valid half the time; one in ten with a bad MAC."""
    material = ctx.rsa_material()
    hash_id = rng.choice(HASH_IDS)
    message = rng.randbytes(rng.randint(0, 400))
    if rng.random() < 0.5:
        signature = ersa.sign(material.private_key, hash_id, message)
    else:
        signature = rng.randbytes(material.private_key.key_size // 8)
    values: Values = {
        "hash_id": hash_id,
        "signature_id": "01",
        "pad_mode": "01",
        "signature_length": f"{len(signature):04d}",
        "signature": signature,
        "message_length": f"{len(message):04d}",
        "message": message,
        "mac": material.public_mac if rng.random() < 0.9 else rng.randbytes(4),
        "public_key": material.public_der,
    }
    return _g("EY", maybe_lmk_id(rng, values))


#: One generator per command of the table.
GENERATORS: Mapping[str, Generator] = {
    "NC": gen_nc,
    "NO": gen_no,
    "B2": gen_b2,
    "A0": gen_a0,
    "A6": gen_a6,
    "A8": gen_a8,
    "BU": gen_bu,
    "FA": gen_fa,
    "CA": gen_ca,
    "CC": gen_cc,
    "CI": gen_ci,
    "G0": gen_g0,
    "JA": gen_ja,
    "JC": gen_jc,
    "JE": gen_je,
    "JG": gen_jg,
    "DA": gen_da,
    "EA": gen_ea,
    "DC": gen_dc,
    "EC": gen_ec,
    "DE": gen_de,
    "EE": gen_ee,
    "DG": gen_dg,
    "FW": gen_fw,
    "CW": gen_cw,
    "CY": gen_cy,
    "M0": gen_m0,
    "M2": gen_m2,
    "M6": gen_m6,
    "M8": gen_m8,
    "MS": gen_ms,
    "KQ": gen_kq,
    "EI": gen_ei,
    "EW": gen_ew,
    "EY": gen_ey,
    "GM": gen_gm,
}

#: Most random requests per run for commands that are slow by nature (RSA key generation).
RANDOM_CAPS: Mapping[str, int] = {"EI": 40}


def request_count(command: str, requested: int) -> int:
    """How many random requests a run of ``requested`` per command sends for ``command``."""
    return min(requested, RANDOM_CAPS.get(command, requested))


def generate(command: str, seed: int, index: int, ctx: GenContext) -> Generated:
    """The ``index``-th random request for ``command`` of a run with ``seed`` (reproducible)."""
    return GENERATORS[command](random.Random(f"{seed}/{command}/{index}"), ctx)
