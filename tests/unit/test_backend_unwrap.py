"""Native C_UnwrapKey is used where the module supports it, for keys without scheme variants."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest

from hsmproxy.backend.errors import BackendError
from hsmproxy.backend.pkcs11_backend import Pkcs11Backend


class _FakeLmk:
    def __init__(self, label: str, calls: list[tuple[str, bytes]]) -> None:
        self.label = label
        self.calls = calls

    def unwrap_key(self, _cls: Any, _type: Any, data: bytes, **_kw: Any) -> str:
        self.calls.append((self.label, data))
        return f"handle:{self.label}"

    def decrypt(self, data: bytes, **_kw: Any) -> bytes:
        self.calls.append(("decrypt:" + self.label, data))
        return bytes.fromhex("0123456789ABCDEF")  # odd parity


def _backend(native: bool, strict: bool = False) -> tuple[Pkcs11Backend, list[tuple[str, bytes]]]:
    b = object.__new__(Pkcs11Backend)
    calls: list[tuple[str, bytes]] = []
    b.native_unwrap = native
    b.strict_key_custody = strict
    b.cache_size = 8
    b.cache_hits = b.cache_misses = b.fallback_imports = b.native_unwraps = b._newest_handle = 0
    b._keys = OrderedDict()
    def lmk_object(label: str, *, token: bool = False) -> _FakeLmk:
        return _FakeLmk(label, calls)

    def create_des(value: bytes, *, token: bool) -> str:
        return f"created:{value.hex()}"

    b.lmk_object = lmk_object  # type: ignore[method-assign]
    b._create_des = create_des  # type: ignore[method-assign,assignment]
    return b, calls


def test_x917_keys_are_unwrapped_natively_in_one_call() -> None:
    b, calls = _backend(native=True)
    handle = b.variant_key("00", "06", 0, "X" + "AB" * 16)
    assert handle == "handle:hsmproxy-lmk:00:06:0:-"
    assert calls == [("hsmproxy-lmk:00:06:0:-", bytes.fromhex("AB" * 16))]
    assert (b.native_unwraps, b.fallback_imports) == (1, 0)
    assert b.variant_key("00", "06", 0, "X" + "AB" * 16) == handle  # cached
    assert b.cache_hits == 1


def test_variant_scheme_keys_need_the_fallback_and_strict_custody_refuses_it() -> None:
    b, calls = _backend(native=True)
    handle = b.variant_key("00", "06", 0, "U" + "AB" * 16)
    assert handle == "created:" + "0123456789abcdef" * 2
    assert [c[0] for c in calls] == ["decrypt:hsmproxy-lmk:00:06:0:U0", "decrypt:hsmproxy-lmk:00:06:0:U1"]
    assert b.fallback_imports == 1
    strict, _ = _backend(native=True, strict=True)
    assert strict.variant_key("00", "06", 0, "X" + "AB" * 16) == "handle:hsmproxy-lmk:00:06:0:-"
    with pytest.raises(BackendError) as err:
        strict.variant_key("00", "06", 0, "U" + "AB" * 16)
    assert err.value.code == "68"


def test_without_native_unwrap_everything_uses_the_fallback() -> None:
    b, calls = _backend(native=False)
    b.variant_key("00", "06", 0, "X" + "AB" * 16)
    assert all(c[0].startswith("decrypt:") for c in calls)
    assert (b.native_unwraps, b.fallback_imports) == (0, 1)
