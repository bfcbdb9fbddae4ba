"""PKCS#11 primitives for one HSM node, used inside that node's worker process only.

Everything here runs in the node worker: the module, a logged-in session held for the worker's
life, the LMK objects, and an LRU of working-key handles. Clear PIN blocks and, on the fallback
import path, clear working keys exist only in this process and only for the duration of one
operation.

LMK objects (created by the LMK ceremony, :mod:`hsmproxy.keys.lmk`) are token objects,
sensitive and non-extractable, labelled::

    hsmproxy-lmk:<id>:<pair>:<variant>:<scheme-half>      variant LMK, e.g. hsmproxy-lmk:00:02:0:-
    hsmproxy-kblmk:<id>:<kbek|kbak>                       key-block LMK (derived keys)
    hsmproxy-lmkinfo:<id>                                 data object: scheme and check value

``<scheme-half>`` is ``-`` (no scheme variant), or ``U0 U1 T0 T1 T2`` for the scheme variant of
that key half. Working keys arrive encrypted under an LMK variant; SoftHSM2 has no DES3-ECB
unwrap, so the fallback decrypts the cryptogram with the LMK object and creates a sensitive
session object from it (counted in :attr:`Pkcs11Backend.fallback_imports`; refused when
``strict_key_custody`` is set).
"""

from __future__ import annotations

import ctypes
import hmac
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from hsmproxy.backend.errors import BackendError, DeviceError

#: Key-type variant bytes XORed into byte 0 of an LMK pair (variant 1..9).
KEY_TYPE_VARIANTS = (0x00, 0xA6, 0x5A, 0x6A, 0xDE, 0x2B, 0x50, 0x74, 0x9C, 0xFA)
#: Scheme variant bytes XORed into byte 8, per key half.
SCHEME_VARIANTS: Mapping[str, tuple[int, ...]] = {"U": (0xA6, 0x5A), "T": (0x6A, 0xDE, 0x2B)}

LMK_LABEL = "hsmproxy-lmk"
#: Seconds a failed LMK object lookup is remembered.
LMK_MISS_TTL = 5.0
#: Seconds between checks that a cached LMK object is still the one on the token.
LMK_RECHECK = 5.0
KBLMK_LABEL = "hsmproxy-kblmk"
#: SoftHSM2 (2.6.1, Debian's and Ubuntu's) keeps every session object it ever created until
#: C_Finalize, destroyed or not (about 225 bytes each, measured): a worker whose key cache churns
#: re-initialises the module once this many objects have been created (~22 MB, ~60 ms to finalise).
SOFTHSM_REINIT_AFTER = 100_000


def lmk_object_label(lmk_id: str, pair: str, variant: int, scheme: str, half: int) -> str:
    """Label of the token object holding one LMK pair variant."""
    sh = f"{scheme}{half}" if scheme in SCHEME_VARIANTS else "-"
    return f"{LMK_LABEL}:{lmk_id}:{pair}:{variant}:{sh}"


def variant_of_pair(pair: bytes, variant: int, scheme: str, half: int) -> bytes:
    """The LMK pair with the key-type variant (byte 0) and scheme variant (byte 8) applied."""
    k = bytearray(pair)
    k[0] ^= KEY_TYPE_VARIANTS[variant]
    sv = SCHEME_VARIANTS.get(scheme)
    if sv is not None:
        k[8] ^= sv[half]
    return bytes(k)


def _des_key_type(length: int) -> Any:
    if length == 16:
        return KeyType.DES2
    if length == 24:
        return KeyType.DES3
    raise BackendError("27", "DES key must be 8, 16 or 24 bytes")


@dataclass(slots=True)
class TokenInfo:
    """What the node reports about itself at start-up."""

    manufacturer: str
    model: str
    firmware: str
    label: str
    mechanisms: dict[str, bool] = field(default_factory=dict)


class Pkcs11Backend:
    """One node's PKCS#11 module, session, LMK objects and working-key cache."""

    def __init__(
        self,
        module_path: str,
        token_label: str,
        pin: str,
        *,
        strict_key_custody: bool = False,
        cache_size: int = 4096,
    ) -> None:
        try:
            self._lib = pkcs11.lib(module_path)
            self._token = self._lib.get_token(token_label=token_label)
            self.session = self._token.open(user_pin=pin, rw=True)
        except (pkcs11.PKCS11Error, RuntimeError) as exc:
            raise DeviceError(f"cannot open token {token_label!r}: {type(exc).__name__}") from None
        self.token_label = token_label
        self.strict_key_custody = strict_key_custody
        self.cache_size = cache_size
        self.fallback_imports = 0
        self.native_unwraps = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.module_reinits = 0
        self._newest_handle = 0  # highest object handle seen: SoftHSM2 numbers objects in creation order
        self._lmk: dict[str, tuple[Any, Any, float]] = {}  # label -> (token object, handle used, checked)
        self._lmk_missing: dict[str, float] = {}
        self._keys: OrderedDict[tuple[str, str, str], Any] = OrderedDict()  # handle or tuple of handles
        self.info = self._probe()
        #: The module unwraps DES3-ECB cryptograms itself (used for keys without scheme variants).
        self.native_unwrap = self.info.mechanisms.get("des3_ecb_unwrap", False)
        #: Objects created after which :meth:`reinitialize` is due (0: never; see SOFTHSM_REINIT_AFTER).
        self.reinit_after = SOFTHSM_REINIT_AFTER if self.info.manufacturer.startswith("SoftHSM") else 0

    def create_object(self, template: dict[Attribute, Any]) -> Any:
        """``C_CreateObject`` in the worker's session, counted for :meth:`reinit_due`."""
        return self.noted(self.session.create_object(template))

    def noted(self, obj: Any) -> Any:
        """``obj`` (a new object), its handle counted for :meth:`reinit_due` (SoftHSM2 numbers
        objects in creation order, whatever creates them)."""
        self._newest_handle = max(self._newest_handle, int(getattr(obj, "handle", 0)))
        return obj

    def reinit_due(self) -> bool:
        """True when the module has created ``reinit_after`` objects since it was initialised."""
        return bool(self.reinit_after) and self._newest_handle >= self.reinit_after

    def reinitialize(self, pin: str) -> None:
        """Finalise and initialise the module again, then open and log in to a new session.

        Frees what SoftHSM2 holds for objects destroyed long ago. Every handle is gone afterwards:
        the key cache and the LMK copies are dropped without destroying (C_Finalize did) and are
        rebuilt on demand. Run between batches only. A module that cannot come back is a device fault.
        """
        self._keys.clear()
        self._lmk.clear()
        self._lmk_missing.clear()
        self._newest_handle = 0
        try:
            self._lib.reinitialize()
            self._token = self._lib.get_token(token_label=self.token_label)
            self.session = self._token.open(user_pin=pin, rw=True)
        except (pkcs11.PKCS11Error, RuntimeError) as exc:
            reason = type(exc).__name__
            raise DeviceError(f"cannot re-initialise token {self.token_label!r}: {reason}") from None
        self.module_reinits += 1
        _trim_heap()

    # -- start-up ---------------------------------------------------------------------------------

    def _probe(self) -> TokenInfo:
        tok = self._token
        firmware = getattr(tok, "firmware_version", None) or (0, 0)
        info = TokenInfo(
            manufacturer=str(tok.manufacturer_id).strip(),
            model=str(tok.model).strip(),
            firmware=f"{firmware[0]}.{firmware[1]}" if isinstance(firmware, tuple) else str(firmware),
            label=self.token_label,
        )
        info.mechanisms = self._try_mechanisms()
        return info

    def _try_mechanisms(self) -> dict[str, bool]:
        """Probe the mechanisms the commands need by trying them (flags are unreliable)."""
        results: dict[str, bool] = {}
        probe_key = self._create_des(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"), token=False)
        probes: dict[str, Any] = {
            "des3_ecb": lambda: probe_key.encrypt(bytes(8), mechanism=Mechanism.DES3_ECB),
            "des3_cbc": lambda: probe_key.encrypt(
                bytes(8), mechanism=Mechanism.DES3_CBC, mechanism_param=bytes(8)
            ),
            "des3_cmac": lambda: probe_key.sign(bytes(8), mechanism=Mechanism.DES3_CMAC),
            "des3_ecb_unwrap": lambda: probe_key.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.DES2,
                bytes(16),
                mechanism=Mechanism.DES3_ECB,
                template={Attribute.TOKEN: False, Attribute.SENSITIVE: True},
            ),
            "sha256": lambda: self.session.digest(b"", mechanism=Mechanism.SHA256),
        }
        for name, fn in probes.items():
            try:
                fn()
                results[name] = True
            except (pkcs11.PKCS11Error, RuntimeError, TypeError):
                results[name] = False
        try:
            aes: Any = self.session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: bytes(16),
                    Attribute.TOKEN: False,
                    Attribute.SIGN: True,
                    Attribute.ENCRYPT: True,
                }
            )
            aes.sign(b"", mechanism=Mechanism.AES_CMAC)
            aes.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)
            results["aes_cmac"] = True
            aes.destroy()
        except (pkcs11.PKCS11Error, RuntimeError):
            results["aes_cmac"] = False
        probe_key.destroy()
        return results

    # -- objects ----------------------------------------------------------------------------------

    def _create_des(
        self, value: bytes, *, token: bool, label: str | None = None, extractable: bool = False
    ) -> Any:
        if len(value) == 8:  # single DES as two-key TDES with equal halves (no DES mechanism needed)
            value = value + value
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: _des_key_type(len(value)),
            Attribute.VALUE: value,
            Attribute.TOKEN: token,
            # Session objects are visible only to this worker's own sessions, which stay logged in for
            # the worker's life, so CKA_PRIVATE adds no access control to them; SoftHSM2 still pays
            # for it on every operation (it keeps private values encrypted under its token key, held
            # in this same process): 12 against 9 us per DES3 operation. Token objects stay private.
            Attribute.PRIVATE: token,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: extractable,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.SIGN: True,
            Attribute.VERIFY: True,
        }
        if label is not None:
            template[Attribute.LABEL] = label
        return self.create_object(template)

    def create_lmk_object(self, label: str, value: bytes, key_type: str = "des") -> None:
        """Create (or replace) one sensitive, non-extractable LMK token object. Ceremony only."""
        for old in self.session.get_objects({Attribute.LABEL: label}):
            old.destroy()
        if key_type == "aes":
            self.session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: value,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.SIGN: True,
                    Attribute.VERIFY: True,
                    Attribute.LABEL: label,
                }
            )
        else:
            self._create_des(value, token=True, label=label)
        self._drop_lmk(label)
        self._lmk_missing.pop(label, None)

    def _drop_lmk(self, label: str) -> None:
        entry = self._lmk.pop(label, None)
        if entry is not None and entry[1] is not entry[0]:
            try:
                entry[1].destroy()  # the session copy
            except pkcs11.PKCS11Error:
                pass

    def _find_lmk(self, label: str) -> Any:
        template = {Attribute.LABEL: label, Attribute.CLASS: ObjectClass.SECRET_KEY}
        found = list(self.session.get_objects(template))
        return found[0] if found else None

    def lmk_object(self, label: str, *, token: bool = False) -> Any:
        """A handle for the LMK token object ``label``; ``13`` if it is not loaded.

        The handle is a session copy of the token object when the module allows one (sensitive and
        non-extractable like the original, visible to this worker only): SoftHSM2 re-reads a token
        object's file state on every use, 25 against 12 us per DES3 operation. Every ``LMK_RECHECK``
        seconds the token is asked again; an LMK object that vanished or was replaced under a running
        worker is a device fault (the node is recycled, as a stale handle was before). ``token=True``
        gives the token object itself: the health check's operation, which must reach the token.
        """
        entry = self._lmk.get(label)
        now = time.monotonic()
        if entry is not None:
            token_obj, handle, checked = entry
            if now - checked < LMK_RECHECK:
                return token_obj if token else handle
            current = self._find_lmk(label)
            if current is None or current.handle != token_obj.handle:
                raise DeviceError(f"LMK object {label} changed on the token")
            self._lmk[label] = (token_obj, handle, now)
            return token_obj if token else handle
        # A miss is remembered briefly so that requests naming an absent LMK (or probing for a
        # key-block LMK) do not search the token each time; an LMK loaded later is seen soon.
        missed_at = self._lmk_missing.get(label)
        if missed_at is not None and now - missed_at < LMK_MISS_TTL:
            raise BackendError("13", "LMK is not loaded on this node")
        token_obj = self._find_lmk(label)
        if token_obj is None:
            self._lmk_missing[label] = now
            raise BackendError("13", "LMK is not loaded on this node")
        try:
            handle = token_obj.copy({Attribute.TOKEN: False})
        except pkcs11.PKCS11Error:  # not copyable here: use the token object itself
            handle = token_obj
        self._lmk[label] = (token_obj, handle, now)
        self._lmk_missing.pop(label, None)
        return token_obj if token else handle

    def lmk_labels(self) -> list[str]:
        """Labels of every LMK object on the token."""
        out = []
        obj: Any
        for obj in self.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
            label = str(obj.label)
            if label.startswith((LMK_LABEL, KBLMK_LABEL)):
                out.append(label)
        return sorted(out)

    # -- working keys under a variant LMK ------------------------------------------------------

    def _cache_get(self, cache_key: tuple[str, str, str]) -> Any:
        handle = self._keys.get(cache_key)
        if handle is not None:
            self._keys.move_to_end(cache_key)
            self.cache_hits += 1
        else:
            self.cache_misses += 1
        return handle

    def _cache_put(self, cache_key: tuple[str, str, str], handle: Any) -> Any:
        self._keys[cache_key] = handle
        for h in _handles(handle):  # also objects made by other means (unwrap, copy)
            self.noted(h)
        if len(self._keys) > self.cache_size:
            _, old = self._keys.popitem(last=False)
            for h in _handles(old):
                try:
                    h.destroy()
                except pkcs11.PKCS11Error:
                    pass
        return handle

    def cached_object(self, cache_key: tuple[str, str, str], make: Callable[[], Any]) -> Any:
        """The cached token object for ``cache_key`` (LMK id, kind, cryptogram), or ``make()``'s, cached.

        Shares the working-key LRU (its size, hit/miss counters, destruction on eviction and on
        revocation by cryptogram digest): for objects such as RSA private keys under the LMK.
        """
        handle = self._cache_get(cache_key)
        if handle is None:
            handle = self._cache_put(cache_key, make())
        return handle

    def decrypt_cryptogram(self, lmk_id: str, pair: str, variant: int, cryptogram: str) -> bytearray:
        """The clear value of a variant cryptogram, decrypted by the LMK objects (fallback path).

        Only for compositions the module cannot do with handles (no DES3-ECB unwrap, no XOR
        derivation); the caller wipes the result. Refused under strict key custody (``68``).
        """
        if self.strict_key_custody:
            raise BackendError("68", "strict key custody: this node cannot unwrap DES3-ECB cryptograms")
        scheme = cryptogram[0] if cryptogram[:1] in ("U", "T", "X", "Y", "Z") else ""
        data = bytes.fromhex(cryptogram[1:] if scheme else cryptogram)
        clear = bytearray()
        for half in range(len(data) // 8):
            lmk = self.lmk_object(lmk_object_label(lmk_id, pair, variant, scheme, half))
            clear += lmk.decrypt(data[8 * half : 8 * half + 8], mechanism=Mechanism.DES3_ECB)
        self.fallback_imports += 1
        return clear

    def variant_key(self, lmk_id: str, pair: str, variant: int, cryptogram: str) -> Any:
        """A handle for the working key ``cryptogram`` (``[scheme]hex``) under an LMK variant.

        Cached by (LMK id, key type, cryptogram); on a miss the key is brought in by the fallback
        path: each half is decrypted with its LMK variant object and a sensitive session object
        is created from the result. Odd parity is required (``10``).
        """
        cache_key = (lmk_id, f"{variant}{pair}", cryptogram)
        handle = self._cache_get(cache_key)
        if handle is not None:
            return handle
        scheme = cryptogram[0] if cryptogram[:1] in ("U", "T", "X", "Y", "Z") else ""
        if self.native_unwrap and scheme not in SCHEME_VARIANTS:
            # Both halves sit under the same LMK variant: one C_UnwrapKey, the clear key never
            # leaves the token. (The token, not us, then decides about parity.)
            lmk = self.lmk_object(lmk_object_label(lmk_id, pair, variant, scheme, 0))
            data = bytes.fromhex(cryptogram[1:] if scheme else cryptogram)
            if len(data) == 8:
                data = data + data
            handle = lmk.unwrap_key(
                ObjectClass.SECRET_KEY,
                _des_key_type(len(data)),
                data,
                mechanism=Mechanism.DES3_ECB,
                template={Attribute.TOKEN: False, Attribute.PRIVATE: False, Attribute.SENSITIVE: True,
                          Attribute.EXTRACTABLE: False,
                          Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.SIGN: True,
                          Attribute.VERIFY: True},
            )  # fmt: skip
            self.native_unwraps += 1
            return self._cache_put(cache_key, handle)
        clear = self.decrypt_cryptogram(lmk_id, pair, variant, cryptogram)
        try:
            if not all(bin(b).count("1") % 2 for b in clear):
                raise BackendError("10", "key parity error")
            handle = self._create_des(bytes(clear), token=False)
        finally:
            clear[:] = bytes(len(clear))
        return self._cache_put(cache_key, handle)

    def variant_key_halves(self, lmk_id: str, pair: str, variant: int, cryptogram: str) -> tuple[Any, ...]:
        """Single-length handles for each 8-byte part of a variant key (CVV, X9.19 retail MAC)."""
        cache_key = (lmk_id, f"{variant}{pair}/parts", cryptogram)
        parts = self._cache_get(cache_key)
        if parts is not None:
            return tuple(parts)
        clear = self.decrypt_cryptogram(lmk_id, pair, variant, cryptogram)
        try:
            if not all(bin(b).count("1") % 2 for b in clear):
                raise BackendError("10", "key parity error")
            parts = tuple(
                self._create_des(bytes(clear[i : i + 8]), token=False) for i in range(0, len(clear), 8)
            )
        finally:
            clear[:] = bytes(len(clear))
        return tuple(self._cache_put(cache_key, parts))

    def open_keyblock(self, lmk_id: str, block: str) -> tuple[dict[str, str], bytearray]:
        """Check and decrypt a version-1 Thales key block with the token's KBEK/KBAK objects.

        Returns the header fields and the clear key (the caller wipes it). Checks run in the
        emulator's order: LMK loaded (``13``), header fields (``83``, ``AB``/``AC`` optional
        blocks, ``A6``-``AA``), version (``A1``), length and data (``83``), MAC (``A4``).
        """
        kbek = self.lmk_object(f"{KBLMK_LABEL}:{lmk_id}:kbek")
        kbak = self.lmk_object(f"{KBLMK_LABEL}:{lmk_id}:kbak")
        body = block[1:] if block.startswith("S") else block
        header, pos = parse_keyblock_header(body)
        if header["version"] != "1":
            raise BackendError("A1", "key block version does not match the LMK")
        if not body[1:5].isdecimal() or int(body[1:5]) != len(body):
            raise BackendError("83", "key block length field does not match")
        data = body[pos:]
        if not _HEX.fullmatch(data) or len(data) < 16 + 32:
            raise BackendError("83", "key block data is malformed")
        encrypted, mac = bytes.fromhex(data[:-16]), bytes.fromhex(data[-16:])
        if len(encrypted) % 16:
            raise BackendError("83", "key block data is not whole AES blocks")
        expected = bytes(kbak.sign(body[:pos].encode("ascii") + encrypted, mechanism=Mechanism.AES_CMAC))[:8]
        if not hmac.compare_digest(expected, mac):
            raise BackendError("A4", "key block authentication failure")
        clear = bytearray(
            kbek.decrypt(encrypted, mechanism=Mechanism.AES_CBC, mechanism_param=body[:16].encode("ascii"))
        )
        try:
            bits = int.from_bytes(clear[:2], "big")
            if bits % 8 or not 8 <= bits <= 8 * (len(clear) - 2):
                raise BackendError("83", "key length in key block is invalid")
            key = bytearray(clear[2 : 2 + bits // 8])
        finally:
            clear[:] = bytes(len(clear))
        self.fallback_imports += 1
        return header, key

    def keyblock_key(self, lmk_id: str, block: str) -> tuple[dict[str, str], Any]:
        """Verify and import a Thales key block (version 1, AES key-block LMK) -> (header, handle).

        The MAC (AES-CMAC under the KBAK object, header + encrypted data, 8 bytes) is checked and
        the key data decrypted (AES-CBC under the KBEK object, IV = first 16 header characters),
        both inside the token; the clear key then becomes a sensitive session object (cached).
        """
        cache_key = (lmk_id, "S", block)
        cached = self._cache_get(cache_key)
        if cached is not None:
            header_items, handle = cached
            return dict(header_items), handle
        header, key = self.open_keyblock(lmk_id, block)
        try:
            handle = self.create_session_key(key, "A" if header["algorithm"] == "A" else "T")
        finally:
            key[:] = bytes(len(key))
        self._cache_put(cache_key, (tuple(header.items()), handle))
        return header, handle

    def keyblock_clear(self, lmk_id: str, block: str) -> tuple[dict[str, str], bytearray]:
        """The header and clear key of a Thales key block (fallback path; the caller wipes it).

        For compositions PKCS#11 cannot do with a handle (DUKPT derivation from a BDK, CVV's
        single-DES halves). Refused under strict key custody (``68``).
        """
        if self.strict_key_custody:
            raise BackendError("68", "strict key custody: this node cannot release key-block keys")
        return self.open_keyblock(lmk_id, block)

    def create_session_key(self, clear: bytes | bytearray, algorithm: str = "T") -> Any:
        """A sensitive session object from clear bytes held by this worker (derived keys)."""
        if algorithm == "A":
            return self.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: bytes(clear),
                    Attribute.TOKEN: False,
                    Attribute.PRIVATE: False,  # a session object: see _create_des
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.SIGN: True,
                    Attribute.VERIFY: True,
                }
            )
        return self._create_des(bytes(clear), token=False)

    def forget_keys(self) -> None:
        """Destroy every cached working-key handle."""
        while self._keys:
            _, handles = self._keys.popitem()
            for handle in _handles(handles):
                try:
                    handle.destroy()
                except pkcs11.PKCS11Error:
                    pass

    # -- primitives -------------------------------------------------------------------------------

    @staticmethod
    def ecb_encrypt(key: Any, data: bytes) -> bytes:
        """DES3-ECB encrypt under a key handle."""
        return bytes(key.encrypt(data, mechanism=Mechanism.DES3_ECB))

    @staticmethod
    def ecb_decrypt(key: Any, data: bytes) -> bytes:
        """DES3-ECB decrypt under a key handle."""
        return bytes(key.decrypt(data, mechanism=Mechanism.DES3_ECB))

    @staticmethod
    def aes_cmac(key: Any, data: bytes) -> bytes:
        """AES-CMAC under a key handle."""
        return bytes(key.sign(data, mechanism=Mechanism.AES_CMAC))

    def random(self, n: int) -> bytes:
        """``n`` random bytes from the token's generator."""
        return bytes(self.session.generate_random(8 * n))

    def close(self) -> None:
        """Destroy session objects and close the session."""
        self.forget_keys()
        try:
            self.session.close()
        except pkcs11.PKCS11Error:
            pass

    def forget_key_digests(self, digests: frozenset[str]) -> int:
        """Destroy cached handles of keys whose cryptogram's SHA-256 hex (as cached, or upper-cased)
        is in ``digests`` (revoked or otherwise refused keys); the number of cache entries dropped."""
        import hashlib

        def refused(cryptogram: str) -> bool:
            forms = {cryptogram, cryptogram.upper()}
            return any(hashlib.sha256(c.encode()).hexdigest() in digests for c in forms)

        doomed = [k for k in self._keys if refused(k[2])]
        for cache_key in doomed:
            for handle in _handles(self._keys.pop(cache_key)):
                try:
                    handle.destroy()
                except pkcs11.PKCS11Error:
                    pass
        return len(doomed)


_KB_ALGORITHMS = frozenset("ADTEHRS")
_KB_MODES = frozenset("BCDEGNSTVXY")
_KB_EXPORTABILITY = frozenset("ENS")
_ALNUM2 = re.compile(r"[0-9A-Z]{2}")
_HEX = re.compile(r"[0-9A-Fa-f]*")


def parse_keyblock_header(body: str) -> tuple[dict[str, str], int]:
    """Validate a Thales key block header (and its optional blocks); return fields and data offset."""
    if len(body) < 16 or not body[:16].isascii() or not body[:16].isalnum():
        raise BackendError("83", "key block header is malformed")
    if not body[12:14].isdecimal():
        raise BackendError("AB", "invalid number of optional blocks")
    pos = 16
    for _ in range(int(body[12:14])):
        block_id, length_hex = body[pos : pos + 2], body[pos + 2 : pos + 4]
        if len(length_hex) != 2 or not _HEX.fullmatch(length_hex) or int(length_hex, 16) < 4:
            raise BackendError("AC", "optional block is malformed")
        end = pos + int(length_hex, 16)
        if end > len(body):
            raise BackendError("AC", "optional block is truncated")
        if not _ALNUM2.fullmatch(block_id) or not body[pos + 4 : end].isascii():
            raise BackendError("AC", "invalid optional block")
        pos = end
    h = {
        "version": body[0], "usage": body[5:7], "algorithm": body[7], "mode_of_use": body[8],
        "key_version": body[9:11], "exportability": body[11], "lmk_id": body[14:16],
    }  # fmt: skip
    for ok, code in (
        (h["version"] in ("0", "1"), "83"),
        (bool(_ALNUM2.fullmatch(h["usage"])), "A6"),
        (h["algorithm"] in _KB_ALGORITHMS, "A7"),
        (h["mode_of_use"] in _KB_MODES, "A8"),
        (bool(_ALNUM2.fullmatch(h["key_version"])), "A9"),
        (h["exportability"] in _KB_EXPORTABILITY, "AA"),
        (h["lmk_id"].isdecimal(), "83"),
    ):
        if not ok:
            raise BackendError(code, "invalid key block header field")
    return h, pos


def _handles(entry: Any) -> tuple[Any, ...]:
    """The PKCS#11 objects inside a cache entry (a handle, a tuple of handles, or (header, handle))."""
    if isinstance(entry, tuple):
        return tuple(x for x in entry if hasattr(x, "destroy"))
    return (entry,)


def _trim_heap() -> None:
    """Give freed heap pages back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own symbols: libc's
    if trim is not None:
        trim(0)


def default_module() -> str:
    """The SoftHSM2 module path on Debian/Ubuntu (override with HSMPROXY_PKCS11_MODULE)."""
    return os.environ.get("HSMPROXY_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
