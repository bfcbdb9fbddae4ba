"""Data encryption: M0 (encrypt) and M2 (decrypt).

Request: mode 2 + input format 1 + output format 1 + key type 3 + key [+ KSN descriptor 3 + KSN 20]
[+ IV] + message length 4 hex + message [+ ``%LL``]. Response: [IV] + message length 4 hex + message.

- Modes: ``00`` ECB, ``01`` CBC, ``02`` CFB-8, ``03`` CFB-64 (TDES keys only; an AES key answers
  ``15``). Every mode but ECB takes an IV (16 hex TDES, 32 hex AES) and answers the next chaining
  value: the last cipher block (CBC, CFB-64) or the last block's worth of the shift register (CFB-8).
- Input format ``0`` binary, ``1`` hex, ``2`` text (as binary); output format ``0`` binary, ``1`` hex.
  The message length is the number of characters of the message field as sent (hex: 2 per byte).
- Keys: ``00A`` ZEK, ``00B`` DEK (variant keys, or ``S`` key blocks with usage D0/21/22/23; AES
  key blocks use AES with 16-byte blocks), ``FFF`` with an ``S`` key block of a data usage, and
  the TDES DUKPT BDKs ``009``/``609``/``809`` (key-block usage B0) followed by the KSN descriptor
  and KSN: the data key is X9.24-1's *request* data variant of the transaction key put through
  the one-way TDES step, for M0 and M2 alike (what a terminal encrypts with; VECTORS.md section 2).
  The KSN descriptor (3 hex, checked by the codec) is otherwise ignored.

Errors: ``04`` key type not valid here, ``10`` key parity, ``15`` bad mode/format/hex/IV or an AES
BDK (AES DUKPT is not expressible: the KSN field is 20 hex), ``80`` empty message or ECB/CBC data
not a multiple of the block size (hsmproxy's choice for the payShield "data length" error).
"""

from __future__ import annotations

import string

from cryptography.hazmat.decrepit.ciphers import modes as decrepit_modes
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from emulator.commands.common import ClearKey, hex_bytes, raw, resolve_key, text
from emulator.crypto.cipher import expand_des_key
from emulator.crypto.dukpt import tdes_working_key
from emulator.crypto.errors import CryptoError
from emulator.hsm import Handler, Reply
from emulator.state import EmulatorState
from protocols.hostcmd.fields import Values

_HEX_CHARS = frozenset(string.hexdigits.encode())
_DUKPT_TYPES = frozenset({"009", "609", "809"})
_DATA_TYPES = frozenset({"00A", "00B"})
_DATA_USAGES = frozenset({"D0", "21", "22", "23"})


def decode_hex(data: bytes, error: str = "15") -> bytes:
    """Strictly decode hex text (even length, hex digits only; ``error`` otherwise)."""
    if len(data) % 2 or any(b not in _HEX_CHARS for b in data):
        raise CryptoError(error, "data is not hexadecimal")
    return bytes.fromhex(data.decode("ascii"))


def message_bytes(v: Values, format_field: str = "input_format", *, allowed: str = "012") -> bytes:
    """The ``message`` field decoded per its format flag: ``0`` binary, ``1`` hex, ``2`` text."""
    fmt = text(v, format_field)
    if fmt not in allowed:
        raise CryptoError("15", "invalid input format")
    data = raw(v, "message")
    return decode_hex(data) if fmt == "1" else data


def _data_key(state: EmulatorState, v: Values) -> ClearKey:
    key_type = text(v, "key_type").upper()
    if key_type in _DUKPT_TYPES:
        bdk = resolve_key(state, v, "key", key_type, usages=frozenset({"B0"}))
        if bdk.algorithm != "T" or len(bdk.key) != 16:
            raise CryptoError("15", "only double-length TDES DUKPT BDKs are supported here")
        return ClearKey(tdes_working_key(bdk.key, hex_bytes(v, "ksn"), "data_request"), "T")
    if key_type in _DATA_TYPES:
        return resolve_key(state, v, "key", key_type)
    if key_type == "FFF" and text(v, "key").startswith("S"):
        return resolve_key(state, v, "key", key_type, usages=_DATA_USAGES)
    raise CryptoError("04", "key type not valid for data encryption")


def _crypt(state: EmulatorState, v: Values, *, encrypt: bool) -> Reply:
    mode = text(v, "mode")
    out_fmt = text(v, "output_format")
    if out_fmt not in ("0", "1") or mode not in ("00", "01", "02", "03"):
        raise CryptoError("15", "invalid mode or output format")
    data = message_bytes(v)
    key = _data_key(state, v)
    aes = key.algorithm == "A"
    size = 16 if aes else 8
    algorithm = algorithms.AES(key.key) if aes else TripleDES(expand_des_key(key.key))
    iv = hex_bytes(v, "iv") if mode != "00" else b""
    cipher_mode: modes.Mode
    if mode == "00":
        cipher_mode = modes.ECB()
    elif mode == "01":
        cipher_mode = modes.CBC(iv)
    elif mode == "02":
        cipher_mode = decrepit_modes.CFB8(iv)
    elif not aes:
        cipher_mode = decrepit_modes.CFB(iv)
    else:
        raise CryptoError("15", "CFB-64 needs a TDES key")
    if not data or (mode in ("00", "01") and len(data) % size):
        raise CryptoError("80", "data length is not a whole number of blocks")
    cipher = Cipher(algorithm, cipher_mode)
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    out = ctx.update(data) + ctx.finalize()
    message = out.hex().upper().encode() if out_fmt == "1" else out
    values: Values = {"message_length": f"{len(message):04X}", "message": message}
    if mode != "00":
        values["iv"] = (iv + (out if encrypt else data))[-size:].hex().upper()
    return Reply(values=values)


def m0(state: EmulatorState, v: Values) -> Reply:
    """M0: encrypt a message (ECB/CBC/CFB) under a ZEK, DEK or DUKPT data key."""
    return _crypt(state, v, encrypt=True)


def m2(state: EmulatorState, v: Values) -> Reply:
    """M2: decrypt a message (ECB/CBC/CFB) under a ZEK, DEK or DUKPT data key."""
    return _crypt(state, v, encrypt=False)


HANDLERS: dict[str, Handler] = {"M0": m0, "M2": m2}
