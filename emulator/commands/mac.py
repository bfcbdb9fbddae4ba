"""MACs: M6 (generate), M8 (verify), MS (X9.19 MAC over a large message).

M6 / M8 request: mode 1 + input format 1 + MAC size 1 + MAC algorithm 1 + padding 1 + key type 3 +
key [+ IV 16 hex for modes 2/3] + length 4 hex + message [+ MAC for M8 modes 0/3] [+ ``%LL``].

- Mode ``0`` only block, ``1`` first, ``2`` middle, ``3`` last. Modes 1 and 2 answer the 16-hex
  intermediate chaining value (the IV of the next call); modes 0 and 3 the MAC (M6) or the verdict
  (M8: ``00`` or ``01``). Non-final blocks are not padded and must be whole 8-byte blocks.
- Input format ``0`` binary, ``1`` hex, ``2`` text. MAC size ``0`` = 8 hex, ``1`` = 16 hex.
- Algorithm ``1`` ISO 9797-1 alg. 1 (CBC-MAC; single DES for a single-length key = X9.9, TDES
  otherwise), ``3`` alg. 3 (X9.19 retail: single-DES CBC under the left half, final
  decrypt-right / encrypt-left; double-length keys only), ``6`` CMAC (hsmproxy's code: TDES-CMAC
  for double/triple keys, AES-CMAC for AES key blocks; mode 0 only, the padding flag is ignored).
  Algorithm 3's intermediate value (modes 1/2) is the single-DES CBC state under the left half.
- Padding ``0`` none (data must be whole blocks), ``1``/``2``/``3`` ISO 9797-1 methods 1-3
  (method 3 only with mode 0: its length block covers the whole message).
- Keys: ``003`` TAK, ``008`` ZAK, ``FFF`` with an ``S`` key block of a MAC usage (M0-M7).

MS request: block number 1 (``0`` only, ``1`` first, ``2`` middle, ``3`` last) + key type 1 (``0`` TAK,
``1`` ZAK) + key length 1 (``0`` single, ``1`` double) + message type 1 (``0`` binary, ``1`` hex) + key
[+ IV 16 hex for blocks 2/3] + length 4 hex + message. Answer: 16 hex, the intermediate value for
blocks 1/2 and the MAC for blocks 0/3: X9.19 (double key) or X9.9 (single key) over the whole
message with padding method 1 on the last block, so splitting a message gives the MAC of the whole.

Errors: ``01`` MAC verification failed (M8), ``04`` key type, ``05`` MS key length flag, ``10`` key
parity, ``15`` bad flags/hex/IV or an algorithm the key cannot do, ``27`` key length does not fit
the algorithm or the MS key length flag, ``80`` data not a whole number of blocks where it must be.
"""

from __future__ import annotations

from emulator.commands.common import ClearKey, hex_bytes, resolve_key, text
from emulator.commands.data import message_bytes
from emulator.crypto.cipher import tdes_cbc_encrypt, tdes_ecb_decrypt, tdes_ecb_encrypt
from emulator.crypto.errors import CryptoError
from emulator.crypto.mac import aes_cmac, check_mac, pad, tdes_cmac
from emulator.hsm import Handler, Reply
from emulator.state import EmulatorState
from protocols.hostcmd.fields import Values

_MAC_TYPES = frozenset({"003", "008"})
_MAC_USAGES = frozenset({"M0", "M1", "M3", "M5", "M6", "M7"})
_MAC_SIZES = {"0": 4, "1": 8}


def _mac_key(state: EmulatorState, v: Values, key_type: str) -> ClearKey:
    if key_type in _MAC_TYPES:
        return resolve_key(state, v, "key", key_type)
    if key_type == "FFF" and text(v, "key").startswith("S"):
        return resolve_key(state, v, "key", key_type, usages=_MAC_USAGES)
    raise CryptoError("04", "key type not valid for MAC generation")


def chained_mac(key: bytes, algorithm: str, data: bytes, iv: bytes, padding: int, *, final: bool) -> bytes:
    """ISO 9797-1 alg. 1 or 3 over one block of a (possibly split) message; 8 bytes.

    ``iv`` is the previous call's chaining value (zeros first). A non-final block is unpadded
    CBC and returns the chaining value; the final block is padded (method ``padding``, 0 = none)
    and, for algorithm 3, gets the retail step under the right half.
    """
    if algorithm == "3" and len(key) != 16:
        raise CryptoError("27", "ISO 9797-1 algorithm 3 needs a double-length key")
    if algorithm not in ("1", "3") or len(key) not in (8, 16, 24):
        raise CryptoError("27" if algorithm in ("1", "3") else "15", "invalid MAC algorithm or key")
    if final and padding:
        data = pad(data, padding)
    if not data or len(data) % 8:
        raise CryptoError("80", "MAC data is not a whole number of 8-byte blocks")
    state = tdes_cbc_encrypt(key[:8] if algorithm == "3" else key, iv, data)[-8:]
    if algorithm == "3" and final:
        state = tdes_ecb_encrypt(key[:8], tdes_ecb_decrypt(key[8:], state))
    return state


def _m6_m8(state: EmulatorState, v: Values) -> tuple[str, bytes]:
    """Common part of M6/M8: (mode, MAC or intermediate value)."""
    mode, algorithm, size = text(v, "mode"), text(v, "mac_algorithm"), text(v, "mac_size")
    padding = text(v, "padding")
    if mode not in ("0", "1", "2", "3") or size not in _MAC_SIZES or padding not in ("0", "1", "2", "3"):
        raise CryptoError("15", "invalid mode, MAC size or padding flag")
    if padding == "3" and mode != "0":
        raise CryptoError("15", "padding method 3 needs the whole message (mode 0)")
    data = message_bytes(v)
    key = _mac_key(state, v, text(v, "key_type").upper())
    if algorithm == "6":
        if mode != "0":
            raise CryptoError("15", "CMAC is only available for a single-block message")
        if key.algorithm == "A":
            return mode, aes_cmac(key.key, data)
        return mode, tdes_cmac(key.key, data)
    if key.algorithm == "A":
        raise CryptoError("15", "AES keys only support CMAC")
    iv = hex_bytes(v, "iv") if mode in ("2", "3") else bytes(8)
    return mode, chained_mac(key.key, algorithm, data, iv, int(padding), final=mode in ("0", "3"))


def m6(state: EmulatorState, v: Values) -> Reply:
    """M6: generate a MAC (or the chaining value of a first/middle block)."""
    mode, result = _m6_m8(state, v)
    if mode in ("1", "2"):
        return Reply(values={"iv": result.hex().upper()})
    return Reply(values={"mac": result[: _MAC_SIZES[text(v, "mac_size")]].hex().upper()})


def m8(state: EmulatorState, v: Values) -> Reply:
    """M8: verify a MAC (modes 0/3); first/middle blocks answer the chaining value."""
    mode, result = _m6_m8(state, v)
    if mode in ("1", "2"):
        return Reply(values={"iv": result.hex().upper()})
    try:
        check_mac(result[: _MAC_SIZES[text(v, "mac_size")]], hex_bytes(v, "mac"))
    except CryptoError:
        return Reply(error="01")
    return Reply()


def ms(state: EmulatorState, v: Values) -> Reply:
    """MS: X9.19 (double key) or X9.9 (single key) MAC over a message sent in blocks."""
    block = text(v, "block_number")
    key_type = {"0": "003", "1": "008"}.get(text(v, "key_type"))
    length = {"0": 8, "1": 16}.get(text(v, "key_length"))
    if key_type is None:
        raise CryptoError("04", "MS key type must be 0 (TAK) or 1 (ZAK)")
    if length is None:
        raise CryptoError("05", "MS key length flag must be 0 or 1")
    if block not in ("0", "1", "2", "3"):
        raise CryptoError("15", "invalid block number")
    data = message_bytes(v, "message_type", allowed="01")
    key = _mac_key(state, v, key_type)
    if key.algorithm != "T" or len(key.key) != length:
        raise CryptoError("27", "key length does not match the key length flag")
    iv = hex_bytes(v, "iv") if block in ("2", "3") else bytes(8)
    algorithm = "3" if length == 16 else "1"
    mab = chained_mac(key.key, algorithm, data, iv, 1, final=block in ("0", "3"))
    return Reply(values={"mab": mab.hex().upper()})


HANDLERS: dict[str, Handler] = {"M6": m6, "M8": m8, "MS": ms}
